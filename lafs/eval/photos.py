"""Raw photo -> the face every evaluated model sees: the SCRFD box, its 5 keypoints and the 112x112 crop.

One detector serves every candidate (ours embed the aligned crop; dlib's recogniser gets the same detection,
as a box in its own convention, for its 68-point alignment), so accuracy differences come from the recognisers,
not from face finding. The
detector settings are the ``landmarks`` section's, the ones the training faces were made with.

LFW scores every pair of its protocol, so a photo where SCRFD finds no usable face is never dropped: it gets
the **fallback face**, the box where SCRFD puts LFW faces on average (LFW photos are crops centred on the
labelled face) with the mean keypoints inside it, and is counted as missed. ``lafs.stages.evaluate`` can
instead score pairs with a missed face as errors (``evaluate.missed_faces: wrong``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from lafs.config import LandmarksParams
from lafs.data.images import ImageRejected
from lafs.faces.align import align_face
from lafs.faces.detect import FaceDetector, Policy, find_detector_file, find_pack
from lafs.faces.pipeline import find_face, open_detector

# Measured on 200 shared LFW photos (every 9th file, 150 px), SCRFD 500m at 320 px, all 200 detected: the mean
# box as fractions of the photo (x1, y1, x2, y2; std 0.03-0.04 each) and the mean 5 keypoints as fractions of
# the box (eyes, nose, mouth corners).
FALLBACK_BOX: Final = (0.3154, 0.2476, 0.6909, 0.7662)
FALLBACK_KPS_IN_BOX: Final = ((0.2787, 0.3937), (0.7212, 0.3907), (0.5029, 0.5757), (0.3182, 0.7398), (0.6922, 0.7375))


@dataclass(frozen=True)
class PhotoFace:
    """The face of one photo: aligned crop (112, 112, 3) uint8, box (x1, y1, x2, y2) and keypoints (5, 2) in
    photo pixels, and whether the detector found it (``False``: the fallback face; ``reason`` says why)."""

    aligned: np.ndarray
    box: np.ndarray
    kps: np.ndarray
    detected: bool
    reason: str = ""


def fallback_face(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(box (4,), keypoints (5, 2)) where SCRFD finds the face of an LFW-style centred crop on average."""
    scale = np.array((width, height, width, height), dtype=np.float32)
    box = np.array(FALLBACK_BOX, dtype=np.float32) * scale
    size = box[2:] - box[:2]
    kps = box[:2] + np.array(FALLBACK_KPS_IN_BOX, dtype=np.float32) * size
    return box, kps.astype(np.float32)


class FaceFinder:
    """The landmarks stage's face finding (:func:`lafs.faces.pipeline.find_face`: SCRFD, the face-selection
    policy, ArcFace alignment), with the fallback face for misses."""

    def __init__(self, detector: FaceDetector, policy: Policy = "central", min_face_px: int = 32) -> None:
        self.detector = detector
        self.policy = policy
        self.min_face_px = min_face_px

    @classmethod
    def from_params(cls, cfg: LandmarksParams, threads: int = 0) -> FaceFinder:
        """The detector file and settings of the ``landmarks`` section; ``threads`` ONNX Runtime threads
        (0 = all cores)."""
        path = find_detector_file(find_pack(cfg.models_root, cfg.detector), cfg.detector_file)
        return cls(open_detector(cfg, path, threads), cfg.policy, cfg.min_face_px)

    def find(self, rgb: np.ndarray) -> PhotoFace:
        """The kept face of an RGB uint8 photo, or the fallback face (``detected=False``)."""
        try:
            found = find_face(self.detector, rgb, self.policy, self.min_face_px)
            return PhotoFace(found.crop, found.face.bbox, found.face.kps, True)
        except ImageRejected as exc:  # no face / too small / degenerate keypoints
            box, kps = fallback_face(rgb.shape[1], rgb.shape[0])
            crop, _ = align_face(rgb, kps)
            return PhotoFace(crop, box, kps, False, exc.code)
