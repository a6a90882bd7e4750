"""dlib's ResNet recogniser in worker processes: it costs ~110 ms of CPU per face here and holds the GIL, so
more cores means more processes.

Workers are spawned (not forked: the parent may hold torch / ONNX Runtime thread pools) and import only this
module, dlib and numpy, so they start in well under a second. Each loads the recogniser once; faces travel as
150 x 150 chips (67 kB each), already cut by the parent's shape predictor.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

_net = None


def _init(recogniser: str) -> None:
    global _net
    import dlib

    _net = dlib.face_recognition_model_v1(recogniser)


def _describe(chips: list[np.ndarray]) -> np.ndarray:
    assert _net is not None, "worker not initialised"
    return np.asarray(_net.compute_face_descriptor(chips), dtype=np.float32).reshape(len(chips), -1)


class DescriptorPool:
    """``describe(chips) -> (N, 128)`` spread over ``workers`` processes, in input order."""

    def __init__(self, recogniser: str, workers: int) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init, initargs=(recogniser,)
        )

    def describe(self, chips: list[np.ndarray]) -> np.ndarray:
        if not chips:
            return np.zeros((0, 128), np.float32)
        parts = [chips[i :: self.workers] for i in range(self.workers) if chips[i :: self.workers]]
        results = list(self._pool.map(_describe, parts))
        out = np.empty((len(chips), results[0].shape[1]), np.float32)
        for i, result in enumerate(results):
            out[i :: self.workers] = result
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
