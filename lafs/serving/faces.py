"""Photo -> face -> embedding -> decision: the serving path, on ONNX Runtime only (no torch).

The detector settings, the face-selection rule and the alignment are the ``landmarks`` stage's, and the
recogniser is the ``export`` stage's ONNX file, so a served photo is embedded exactly as the evaluate stage embedded
its test faces; the verification threshold shipped with a model was computed by evaluate on that same path (ONNX,
``evaluate.flip``). A photo without a usable face is an error with a reason code, never a made-up face.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lafs.data.images import TOO_LARGE, ImageRejected, decode_image
from lafs.eval.onnx_embedder import OnnxEmbedder
from lafs.faces.align import align_face
from lafs.faces.detect import FaceDetector, select_face

CONFIG_FILE = "serving.json"


@dataclass(frozen=True)
class ServingConfig:
    """Everything besides the two ONNX files that decides what a photo embeds to (stored as ``serving.json``)."""

    det_size: int = 320
    det_thresh: float = 0.5
    policy: Literal["central", "largest"] = "central"
    min_face_px: int = 32
    flip: bool = True
    threshold: float | None = None  # cosine above which two faces are the same person; None = not calibrated
    max_image_bytes: int = 10_000_000  # a larger upload is refused before decoding
    max_image_pixels: int = 40_000_000  # decompression-bomb guard (ingest.max_image_pixels)

    @classmethod
    def read(cls, path: Path) -> ServingConfig:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class EmbeddedFace:
    """One photo's face: unit embedding (D,), box (x1, y1, x2, y2) and 5 keypoints (5, 2) in photo pixels."""

    embedding: np.ndarray
    box: np.ndarray
    kps: np.ndarray
    det_score: float

    def row(self) -> dict[str, Any]:
        return {
            "embedding": self.embedding.astype(float).tolist(),
            "box": np.round(self.box.astype(float), 2).tolist(),
            "keypoints": np.round(self.kps.astype(float), 2).reshape(-1).tolist(),
            "det_score": round(float(self.det_score), 4),
        }


class FacePipeline:
    """SCRFD + selection + alignment + the ONNX recogniser (+ flip-sum) + L2 norm, and the calibrated threshold."""

    def __init__(self, detector: FaceDetector, recogniser: OnnxEmbedder, cfg: ServingConfig) -> None:
        self.detector = detector
        self.recogniser = recogniser
        self.cfg = cfg

    @classmethod
    def from_files(cls, detector: Path, recogniser: Path, cfg: ServingConfig, threads: int = 0) -> FacePipeline:
        det = FaceDetector(detector, det_size=cfg.det_size, det_thresh=cfg.det_thresh, threads=threads)
        return cls(det, OnnxEmbedder(recogniser, threads=threads), cfg)

    @classmethod
    def from_dir(cls, folder: Path, threads: int = 0) -> FacePipeline:
        """A folder holding ``detector.onnx``, ``recogniser.onnx`` and ``serving.json`` (the pyfunc artifacts)."""
        folder = Path(folder)
        return cls.from_files(
            folder / "detector.onnx", folder / "recogniser.onnx", ServingConfig.read(folder / CONFIG_FILE), threads
        )

    def decode(self, data: bytes, name: str = "<image>") -> np.ndarray:
        """Upright RGB uint8 of an encoded photo, or :class:`ImageRejected` (too_large, not_image, ...)."""
        if len(data) > self.cfg.max_image_bytes:
            raise ImageRejected(
                TOO_LARGE, f"{name} is {len(data):,} bytes, above the limit of {self.cfg.max_image_bytes:,}"
            )
        return decode_image(data, max_pixels=self.cfg.max_image_pixels, formats=None, name=name).rgb

    def embed(self, rgb: np.ndarray) -> EmbeddedFace:
        """The kept face of an RGB photo, or :class:`ImageRejected` (``no_face``, ``face_too_small``, ...)."""
        faces = self.detector.detect(rgb)
        face = faces[select_face(faces, (rgb.shape[1], rgb.shape[0]), self.cfg.policy, self.cfg.min_face_px)]
        crop, _ = align_face(rgb, face.kps)
        emb = self.recogniser.embed_aligned(crop[None], flip=self.cfg.flip)[0]
        return EmbeddedFace(emb, face.bbox, face.kps, face.score)

    def score(self, a: EmbeddedFace, b: EmbeddedFace) -> float:
        """Cosine similarity of two faces (embeddings are unit vectors)."""
        return float(np.dot(a.embedding, b.embedding))

    def same(self, score: float) -> bool:
        """``score`` above the calibrated threshold (the evaluate stage's rule: strictly above)."""
        if self.cfg.threshold is None:
            raise ValueError(
                "this model carries no calibrated threshold: register it from an evaluated run, or pass --threshold"
            )
        return score > self.cfg.threshold


def replace_threshold(pipeline: FacePipeline, threshold: float) -> FacePipeline:
    """The same detector and recogniser deciding at another threshold."""
    return FacePipeline(pipeline.detector, pipeline.recogniser, replace(pipeline.cfg, threshold=threshold))
