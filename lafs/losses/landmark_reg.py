"""Landmark-position regulariser for finetuning.

R = w(epoch) * mean((p / (S - 1) - p_frozen / (S - 1))^2): the trainable landmark network is anchored
to its frozen pretraining copy early on, then released (official weights 1000/100/1/0.11/0 by epoch).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from lafs.conventions import ALIGNED_SIZE

# (first epoch, weight) steps of the official schedule (train_largescale.py).
OFFICIAL_SCHEDULE: tuple[tuple[int, float], ...] = ((0, 1000.0), (8, 100.0), (14, 1.0), (21, 0.11), (28, 0.0))


def landmark_regulariser(pred: torch.Tensor, frozen: torch.Tensor, img_size: int = ALIGNED_SIZE) -> torch.Tensor:
    scale = 1.0 / (img_size - 1)
    return torch.mean((pred.float() * scale - frozen.float().detach() * scale) ** 2)


class StepWeight:
    """Piecewise-constant weight by epoch from ``(first_epoch, weight)`` steps."""

    def __init__(self, steps: Sequence[Sequence[float]] = OFFICIAL_SCHEDULE) -> None:
        pairs = sorted((int(e), float(w)) for e, w in steps)
        if not pairs or pairs[0][0] != 0:
            raise ValueError(f"regulariser schedule must start at epoch 0, got {list(steps)!r}")
        self.starts = [e for e, _ in pairs]
        self.weights = [w for _, w in pairs]

    def __call__(self, epoch: int) -> float:
        return self.weights[bisect.bisect_right(self.starts, epoch) - 1]
