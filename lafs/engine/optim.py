"""Optimizer parameter groups: no weight decay on biases/norms/embeddings; optional layer-wise LR decay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def param_groups(
    model: nn.Module, layer_decay: float = 1.0, layer_id: Callable[[str], int] | None = None, num_layers: int = 0
) -> list[dict[str, Any]]:
    """Groups with ``weight_decay_scale`` (0 or 1) and ``lr_scale`` (layer_decay ** (L - id)).

    The engine multiplies each group's lr by ``lr_scale`` every step; the official finetuning code
    stored the scale but never applied it.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[int, int], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(".bias") or name in skip
        lid = layer_id(name) if layer_id else 0
        key = (lid, int(no_wd))
        if key not in groups:
            scale = layer_decay ** (num_layers - lid) if layer_id else 1.0
            groups[key] = {"params": [], "weight_decay_scale": 0.0 if no_wd else 1.0, "lr_scale": scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = wd * g.get("weight_decay_scale", 1.0)
