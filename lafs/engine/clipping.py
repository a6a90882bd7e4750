"""DINO-style gradient handling: per-parameter norm clipping and a frozen last layer early on."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Scale each parameter's gradient to norm <= clip (not one global norm); returns the norms."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    if clip > 0:
        coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


def cancel_last_layer_gradients(head: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Zero the head's last-layer gradients for the first epochs: stabilises DINO's start."""
    if epoch >= freeze_last_layer:
        return
    last = head.last_layer
    # A Parameter (PrototypeHead) or a module (DINOHead's weight-normalised Linear).
    params = [last] if isinstance(last, nn.Parameter) else list(cast(nn.Module, last).parameters())
    for p in params:
        p.grad = None
