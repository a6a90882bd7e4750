"""The one reader of aligned face files (the landmarks stage's ``data/aligned/...png``): training, evaluation,
export and clustering all decode faces here, so they see the same pixels and the same errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lafs.faces.align import ALIGNED_SIZE


class AlignedFaceError(ValueError):
    """An aligned face file is missing, unreadable or not an aligned face; the message says what to rerun."""


def read_aligned(paths: Sequence[Path], size: int = ALIGNED_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8 RGB, decoded once into one preallocated array (~37 KB a 112 px face)."""
    faces = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        if not Path(path).is_file():
            raise AlignedFaceError(f"aligned face {path} not found: rerun the landmarks stage (dvc repro landmarks)")
        try:
            with Image.open(path) as img:
                face = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise AlignedFaceError(f"cannot read aligned face {path}: {exc}") from None
        if face.shape[:2] != (size, size):
            raise AlignedFaceError(
                f"{path} is {face.shape[1]}x{face.shape[0]}, not an aligned {size}x{size} face: "
                "align photos first (the landmarks stage writes data/aligned)"
            )
        faces[i] = face
    return faces
