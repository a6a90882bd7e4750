"""Aligned faces -> L2-normalised embeddings on ONNX Runtime, without torch: what the served model and
``lafs embed`` / ``lafs verify`` run (:mod:`lafs.eval.embedders` adds the torch, dlib and floor embedders).

Inputs follow the training convention: aligned RGB ``uint8`` (N, 112, 112, 3) -> float ``/255``, then
``(x - 0.5) / 0.5``. ``flip=True`` is insightface's flip-sum TTA (embedding of the face plus that of its mirror).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lafs.conventions import ALIGNED_SIZE, PIXEL_MEAN, PIXEL_STD


class EmbedderError(ValueError):
    """An embedder spec or its input is unusable; the message says what was wrong and what to pass instead."""


def check_faces(faces: np.ndarray) -> np.ndarray:
    """``faces`` as a contiguous (N, 112, 112, 3) uint8 array, or an error naming the shape / dtype received."""
    faces = np.asarray(faces)
    if faces.ndim != 4 or faces.shape[1:] != (ALIGNED_SIZE, ALIGNED_SIZE, 3) or faces.dtype != np.uint8:
        raise EmbedderError(
            f"expected aligned faces of shape (N, {ALIGNED_SIZE}, {ALIGNED_SIZE}, 3) uint8 RGB, "
            f"got {faces.shape} {faces.dtype} (align photos with lafs.eval.photos.FaceFinder)"
        )
    return np.ascontiguousarray(faces)


def to_model_input(faces: np.ndarray) -> np.ndarray:
    """(N, 112, 112, 3) uint8 -> (N, 3, 112, 112) float32 in [-1, 1], computed as the training data is."""
    x = check_faces(faces).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return (x - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise EmbedderError("the model returned an all-zero embedding; it cannot be normalised (check the model)")
    return x / norms


def batches(n: int, batch_size: int) -> range:
    if batch_size < 1:
        raise EmbedderError(f"batch_size must be >= 1, got {batch_size}")
    return range(0, n, batch_size)


class OnnxEmbedder:
    """An exported model (input ``images`` (B, 3, 112, 112) float32, output ``embedding``) on ONNX Runtime CPU."""

    def __init__(self, path: str | Path, batch_size: int = 64, threads: int = 0, name: str = "onnx") -> None:
        import onnxruntime

        from lafs.faces.detect import session_options

        self.path = Path(path)
        if not self.path.is_file():
            raise EmbedderError(f"ONNX model {self.path} not found: run `lafs export` (dvc repro export) first")
        self.session = onnxruntime.InferenceSession(
            str(self.path), session_options(threads), providers=["CPUExecutionProvider"]
        )
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != ["images"]:
            raise EmbedderError(
                f"{self.path} takes inputs {inputs}, expected one input 'images' (B, 3, 112, 112) "
                "as written by lafs.export"
            )
        self.name = name
        self.batch_size = batch_size

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": x})[0]

    def embed_aligned(self, faces: np.ndarray, flip: bool = False) -> np.ndarray:
        x_all = to_model_input(faces)
        out = []
        for start in batches(len(x_all), self.batch_size):
            x = x_all[start : start + self.batch_size]
            if flip:  # the faces and their mirrors in one run: one call's overhead, a larger batch
                both = self._run(np.concatenate([x, x[..., ::-1]]))
                out.append(both[: len(x)] + both[len(x) :])
            else:
                out.append(self._run(x))
        return l2_normalise(np.concatenate(out) if out else np.zeros((0, 0), np.float32))
