"""SCRFD face detection with 5 keypoints, and the rule that keeps one face per photo.

Only the detector ONNX file of an insightface pack is loaded, through ``insightface.model_zoo.get_model``:
that is the SCRFD class ``FaceAnalysis`` routes the file to, so boxes and keypoints equal
``FaceAnalysis(...).get()`` at the same ``det_size``. ``FaceAnalysis`` itself is not used: it opens every
model of the pack (recognition, gender/age, ...) and downloads the pack when the folder layout is not the
one it expects.

Batched detector input was measured and not used: the staged SCRFD graphs accept a batch dimension, but on
CPU a batch of 8 or 16 costs the same CPU time per image as one image (140-160 images/s per core at 320 px,
dynamic or static shapes), so throughput comes from worker processes instead (``lafs.faces.pool``).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np

from lafs.data.images import ImageRejected
from lafs.faces import FACE_TOO_SMALL, NO_FACE, FaceModelError

if TYPE_CHECKING:
    import onnxruntime

DEFAULT_ROOT = Path("~/.insightface")
Policy = Literal["central", "largest"]


@dataclass(frozen=True)
class Face:
    """One detection in original-image pixels: box (x1, y1, x2, y2), score, 5 keypoints (eyes, nose, mouth
    corners; left/right as seen in the image)."""

    bbox: np.ndarray  # (4,) float32
    score: float
    kps: np.ndarray  # (5, 2) float32

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def center(self) -> tuple[float, float]:
        return float(self.bbox[0] + self.bbox[2]) / 2, float(self.bbox[1] + self.bbox[3]) / 2


def models_root(root: str | Path | None) -> Path:
    """The insightface model root: ``root`` or insightface's own default ``~/.insightface``."""
    return (Path(root) if root else DEFAULT_ROOT).expanduser()


def find_pack(root: str | Path | None, pack: str) -> Path:
    """The folder of ``pack``: ``<root>/models/<pack>`` (insightface's layout) or ``<root>/<pack>`` (a folder of
    packs, e.g. ``../shared/models``)."""
    base = models_root(root)
    candidates = [base / "models" / pack, base / pack]
    for path in candidates:
        if path.is_dir():
            return path
    where = "insightface's default root" if not root else "landmarks.models_root"
    raise FaceModelError(
        f"insightface pack {pack!r} not found: looked for {candidates[0]} and {candidates[1]} ({where} = {base}). "
        f"Either point landmarks.models_root at a folder holding models/{pack}/ or {pack}/ (offline: "
        f"`make pipeline MODELS=../shared/models`, which holds scrfd_500m and scrfd_2.5g), or download an "
        f"insightface pack, e.g. `insightface-cli model.download buffalo_s --root {base}` (writes "
        f"{base}/models/buffalo_s with det_500m.onnx and 2d106det.onnx), and set landmarks.detector=buffalo_s."
    )


def find_detector_file(pack_dir: Path, pattern: str = "det_*.onnx") -> Path:
    """The one file of ``pack_dir`` matching ``pattern``; an error lists what is there when none or several match."""
    matches = sorted(Path(p) for p in glob.glob(str(pack_dir / pattern)))
    if len(matches) == 1:
        return matches[0]
    present = sorted(p.name for p in pack_dir.glob("*.onnx")) or ["no .onnx files"]
    if not matches:
        raise FaceModelError(
            f"no detector matching {pattern!r} in {pack_dir} (it holds: {', '.join(present)}); set "
            "landmarks.detector_file to the SCRFD file's name or glob"
        )
    raise FaceModelError(
        f"{len(matches)} files match {pattern!r} in {pack_dir}: {', '.join(p.name for p in matches)}; set "
        "landmarks.detector_file to exactly one of them"
    )


def session_options(threads: int = 0) -> onnxruntime.SessionOptions:
    """ORT options with ``threads`` intra-op threads (0 = ORT's default, all cores): worker processes use 1,
    so two workers do not fight over two cores."""
    import onnxruntime  # lazily: only processes that run a model pay for the import

    opts = onnxruntime.SessionOptions()
    opts.log_severity_level = 3
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


class FaceDetector:
    """SCRFD on upright RGB ``uint8`` photos; ``calls`` counts detector runs (tests use it to prove reuse)."""

    def __init__(self, model_path: str | Path, *, det_size: int = 320, det_thresh: float = 0.5, threads: int = 0):
        import onnxruntime
        from insightface.model_zoo import get_model

        onnxruntime.set_default_logger_severity(3)
        path = Path(model_path)
        if not path.is_file():
            raise FaceModelError(f"detector file {path} does not exist")
        try:
            model = get_model(str(path), providers=["CPUExecutionProvider"], sess_options=session_options(threads))
        except Exception as exc:  # onnxruntime raises its own types for a corrupt/foreign file
            raise FaceModelError(f"{path} cannot be loaded as an ONNX model ({exc})") from exc
        if model is None or getattr(model, "taskname", None) != "detection" or not getattr(model, "use_kps", False):
            raise FaceModelError(
                f"{path} is not an SCRFD detector with keypoints (insightface routed it to "
                f"{getattr(model, 'taskname', None)!r}); set landmarks.detector_file to the pack's det_*.onnx"
            )
        model.prepare(ctx_id=-1, input_size=(det_size, det_size), det_thresh=det_thresh)
        self.model_path = path
        self.det_size = det_size
        self.det_thresh = det_thresh
        self.calls = 0
        self._model = model

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces above ``det_thresh``, highest score first (the detector's NMS order)."""
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # insightface models take OpenCV's BGR order
        boxes, kpss = self._model.detect(bgr, max_num=0)
        self.calls += 1
        return [
            Face(bbox=boxes[i, :4].astype(np.float32), score=float(boxes[i, 4]), kps=kpss[i].astype(np.float32))
            for i in range(boxes.shape[0])
        ]


def select_face(faces: list[Face], image_wh: tuple[int, int], policy: Policy, min_face_px: int) -> int:
    """Index of the face to keep, or :class:`ImageRejected` (``no_face`` / ``face_too_small``).

    Faces whose box is smaller than ``min_face_px`` on either side are never chosen (they would be upsampled
    into the 112 px template), so a small face in the background cannot win over the subject. Among the rest,
    ``central`` keeps the box centre nearest the image centre (LFW photos are centred on the labelled person;
    ties go to the larger face), ``largest`` the largest box area (ties go to the higher score).
    """
    if not faces:
        raise ImageRejected(NO_FACE, "no face found above landmarks.det_thresh")
    eligible = [i for i, f in enumerate(faces) if min(f.width, f.height) >= min_face_px]
    if not eligible:
        biggest = max(faces, key=lambda f: min(f.width, f.height))
        raise ImageRejected(
            FACE_TOO_SMALL,
            f"{len(faces)} face(s) found, the largest is {biggest.width:.0f}x{biggest.height:.0f} px, below "
            f"landmarks.min_face_px={min_face_px}",
        )
    if policy == "largest":
        return max(eligible, key=lambda i: (faces[i].width * faces[i].height, faces[i].score))
    if policy == "central":
        cx, cy = image_wh[0] / 2, image_wh[1] / 2

        def offcentre(i: int) -> tuple[float, float]:
            fx, fy = faces[i].center
            return (fx - cx) ** 2 + (fy - cy) ** 2, -faces[i].width * faces[i].height

        return min(eligible, key=offcentre)
    raise ValueError(f"unknown face policy {policy!r} (expected 'central' or 'largest')")
