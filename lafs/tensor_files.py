"""Tensor-state files written by this project (checkpoints, model files): saved atomically, loaded with
``weights_only=True`` (plain tensors and containers, never arbitrary pickled objects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lafs.atomic import replacing


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or not a plain-tensor file; the message names it."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write to a temp file in the same directory, fsync, then rename: a crash never leaves half a file.

    Saved through a file handle: given a path, torch names the archive's folder after the (random) temp file, so
    equal states would give different bytes, and DVC and the resume fingerprints would see a new file."""
    path = Path(path)
    with replacing(path, fsync=True) as tmp, tmp.open("wb") as fh:
        torch.save(state, fh)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (or others) for unsafe / corrupt files
        raise CheckpointError(
            f"refusing to load {path}: not a plain-tensor checkpoint ({type(exc).__name__}: {exc}). "
            "Only load checkpoints written by this project."
        ) from exc
