"""Projection heads for self-supervised pretraining.

DINOHead: MLP -> bottleneck -> L2 norm -> weight-normalised linear (logits over out_dim "prototypes").
PrototypeHead (ProS): MLP -> L2 norm -> cosine similarity to L2-normalised learnable prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.weight_init import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool) -> nn.Sequential:
    if nlayers < 1:
        raise ValueError(f"nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
    for _ in range(nlayers - 2):
        layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
        layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
    layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
    layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
    return nn.Sequential(*layers)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """z = W_g * V / ||V|| . normalise(MLP(x)); with norm_last_layer the scale g is fixed to 1."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 100_000,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.mlp.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        logits: torch.Tensor = self.last_layer(x)
        return logits


class PrototypeHead(nn.Module):
    """ProS head: logits = <normalise(MLP(x)), normalise(prototypes)> (cosine similarities)."""

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int = 4096,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.mlp.apply(_init_linear)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))
        trunc_normal_(self.prototypes, std=0.02)

    @property
    def last_layer(self) -> nn.Parameter:
        return self.prototypes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).t()
