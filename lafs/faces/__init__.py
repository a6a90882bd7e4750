"""Face geometry adapters: SCRFD detection (``detect``), ArcFace 112x112 alignment (``align``) and dense
landmarks (``dense``). insightface, onnxruntime and dlib are imported only here, so the rest of the package
takes plain arrays."""

from __future__ import annotations

from typing import Final

# Reason codes this layer adds to lafs.data.images.REASON_CODES (decode failures keep their own codes).
NO_FACE: Final = "no_face"
FACE_TOO_SMALL: Final = "face_too_small"
ALIGN_FAILED: Final = "align_failed"
PROCESSING_ERROR: Final = "processing_error"
REASON_CODES: Final = (NO_FACE, FACE_TOO_SMALL, ALIGN_FAILED, PROCESSING_ERROR)


class FaceModelError(RuntimeError):
    """A face model file is missing, ambiguous or not the kind of model expected; the message says what to do."""
