"""Per-iteration schedules precomputed as arrays (DINO style): index by global step, resume for free."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0, start_warmup: float = 0.0
) -> np.ndarray:
    """Linear warmup from ``start_warmup`` to ``base`` over warmup_epochs, then cosine to ``final``."""
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(start_warmup, base, warmup_iters, endpoint=False) if warmup_iters else np.array([])
    iters = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * iters_per_epoch
    return schedule


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warmup_temp -> temp, then constant.

    LAFS goes 0.07 -> 0.04 (sharpening over time); DINO goes 0.04 -> 0.07.
    """
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp)))
