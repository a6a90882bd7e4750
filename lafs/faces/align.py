"""Alignment to the 112x112 ArcFace template from the 5 SCRFD keypoints (insightface ``norm_crop``).

The similarity matrix is returned with the crop so any point measured on the original photo (the dense
landmarks) lands in the aligned frame through the same transform as the pixels.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np

from lafs.conventions import ALIGNED_SIZE
from lafs.data.images import ImageRejected
from lafs.faces import ALIGN_FAILED


def similarity_matrix(kps5: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """2x3 matrix mapping original-photo pixels to the ``size`` ArcFace frame (insightface ``estimate_norm``)."""
    from insightface.utils import face_align

    kps5 = np.asarray(kps5, dtype=np.float32).reshape(5, 2)
    with warnings.catch_warnings():
        # scikit-image 0.26 deprecates SimilarityTransform.estimate, which insightface 2.1 still calls.
        warnings.simplefilter("ignore", FutureWarning)
        matrix = face_align.estimate_norm(kps5, image_size=size)
    matrix = np.asarray(matrix, dtype=np.float64)
    if not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:, :2])) < 1e-8:
        raise ImageRejected(ALIGN_FAILED, f"the 5 keypoints are degenerate ({kps5.round(1).tolist()})")
    return matrix


def align_face(image: np.ndarray, kps5: np.ndarray, size: int = ALIGNED_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` x ``size`` aligned crop (pixels outside the photo are black, as in ``norm_crop``) and the
    2x3 matrix that made it."""
    matrix = similarity_matrix(kps5, size)
    crop = cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)
    return crop, matrix


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine ``matrix`` to (N, 2) points."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]


def inter_ocular(kps5: np.ndarray) -> float:
    """Distance between the two eye keypoints (the scale unit for landmark errors)."""
    kps5 = np.asarray(kps5, dtype=np.float64).reshape(5, 2)
    return float(np.linalg.norm(kps5[0] - kps5[1]))
