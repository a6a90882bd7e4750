"""The recogniser's input convention, shared by alignment, training, export, evaluation and serving: RGB faces
aligned to the ArcFace template at ``ALIGNED_SIZE`` px, pixel values ``x / 255`` mapped to [-1, 1] as
``(x - PIXEL_MEAN) / PIXEL_STD`` (LAFS's, and so DINO-face's here, normalisation)."""

from __future__ import annotations

from typing import Final

ALIGNED_SIZE: Final = 112  # ArcFace template size; a multiple of 112, so insightface's 128-grid x-shift never applies
PIXEL_MEAN: Final = 0.5
PIXEL_STD: Final = 0.5
