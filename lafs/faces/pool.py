"""Many photos through :class:`~lafs.faces.pipeline.FacePipeline` in worker processes (the landmarks stage).

Work goes in equal chunks to ``landmarks.workers`` forked processes, each loading the models once
with one ONNX Runtime thread and running a chunk in two passes (detection and alignment, then dense landmarks).
Fork where safe: workers inherit the imported modules (insightface alone takes ~1 s) and dlib's predictor
(~1 s to load, ~100 MB shared copy-on-write) instead of each paying for them again; the parent's objects are
frozen out of garbage collection meanwhile (:func:`frozen_heap`) so that workers do not copy them either.
OpenCV's thread pool is stopped while forking (see :func:`no_opencv_threads`); in a process that already
imported torch (its OpenMP pool does not survive a fork) workers are spawned instead.
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from itertools import pairwise
from pathlib import Path

from lafs.config import LandmarksParams
from lafs.faces import FaceModelError
from lafs.faces.dense import DLIB68, DenseLandmarker, load_landmarker
from lafs.faces.pipeline import FacePipeline, Job, LandmarksError, Models, Reject

log = logging.getLogger(__name__)


_WORKER: FacePipeline | None = None


# dlib's predictor, loaded by the parent before forking: workers share its ~100 MB copy-on-write and skip
# the ~1 s load. (ONNX Runtime sessions are never shared across fork: each worker makes its own.)
_INHERITED_LANDMARKER: DenseLandmarker | None = None


def _init_worker(cfg: LandmarksParams, models: Models, threads: int) -> None:
    global _WORKER
    import cv2

    cv2.setNumThreads(1)  # the process is the unit of parallelism (the parent's pool is stopped before forking)
    _WORKER = FacePipeline(cfg, models, threads=threads, landmarker=_INHERITED_LANDMARKER)


def _work(jobs: list[Job], out_dir: Path) -> tuple[list[tuple[int, dict | Reject]], int]:
    assert _WORKER is not None, "worker used before its initializer ran"
    return _WORKER.process_chunk(jobs, out_dir)


def process_jobs(
    todo: list[Job], cfg: LandmarksParams, models: Models, out_dir: Path
) -> Iterator[tuple[list[tuple[int, dict | Reject]], int]]:
    """Run the pipeline over ``todo`` in-process (one worker) or in a pool of forked workers,
    yielding each chunk's outcomes (by job index) and detector calls as it completes, in order."""
    if not todo:
        return
    workers = max(1, min(cfg.workers, math.ceil(len(todo) / 2)))
    chunks = split_chunks(todo, cfg.chunk_size, workers)
    if workers == 1:  # otherwise len(todo) >= 2 * workers - 1, and split_chunks gives every worker a chunk
        pipeline = FacePipeline(cfg, models, threads=1)  # more ORT threads only spin when cores are busy
        for chunk in chunks:
            yield pipeline.process_chunk(chunk, out_dir)
        return
    global _INHERITED_LANDMARKER
    threads = max(1, (os.cpu_count() or 1) // workers)
    # fork is unsafe on macOS, absent on Windows, and deadlocks children when this process already runs an
    # OpenMP thread pool (torch imported: e.g. under pytest, or called from a training process); the `lafs
    # landmarks` CLI never imports torch, so it keeps the fast fork path.
    method = "fork" if sys.platform.startswith("linux") and "torch" not in sys.modules else "spawn"
    if method == "fork":
        # Done once here so forked workers inherit them instead of each paying ~1 s for the import and the load.
        import insightface.model_zoo  # noqa: F401

        if models.dense_scheme == DLIB68:
            try:
                _INHERITED_LANDMARKER = load_landmarker(DLIB68, models.landmarker_path)
            except FaceModelError as exc:
                raise LandmarksError(str(exc)) from None
    try:
        with (
            no_opencv_threads(),
            frozen_heap() if method == "fork" else nullcontext(),
            ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(cfg, models, threads),
            ) as pool,
        ):
            yield from pool.map(_work, chunks, [out_dir] * len(chunks))
    except BrokenProcessPool as exc:
        raise LandmarksError(
            f"a landmarks worker process died ({exc}); the log above shows why (a model that fails to load, "
            "or memory); landmarks.workers=1 runs everything in this process with a plain traceback"
        ) from None
    finally:
        _INHERITED_LANDMARKER = None


def split_chunks(todo: list[Job], size: int, workers: int) -> list[list[Job]]:
    """``todo`` in order, cut into a multiple of ``workers`` chunks of at most ``size`` jobs whose sizes differ by
    at most one, so the workers run out of work together. Cut at ``size`` with a short last chunk, the workers'
    shares could differ by up to a chunk, ~1 s of one idle core (1,764 photos: 13 x 128 + 100)."""
    count = workers * math.ceil(len(todo) / (workers * size))
    bounds = [i * len(todo) // count for i in range(count + 1)]
    return [todo[a:b] for a, b in pairwise(bounds) if b > a]


@contextmanager
def no_opencv_threads() -> Iterator[None]:
    """Stop OpenCV's thread pool while workers are forked, restore it afterwards.

    A child forked while the parent's OpenCV pool has threads inherits the pool's state but not its threads:
    its first OpenCV call that touches the pool (even ``cv2.setNumThreads``) waits for them forever. Seen in
    tests, where the parent had already resized images.
    """
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep this process's objects out of garbage collection while workers are forked from it (``gc.freeze``).

    A forked worker's collector otherwise walks every object it inherited and writes to each header, copying
    those pages: at 17,640 photos (the jobs and manifest of 10x the shared set) each worker grew from 44 to
    67 MB of unique memory within seconds; frozen, both stay at 44 MB (benchmarks/RESULTS.md).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
