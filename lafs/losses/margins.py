"""Additive-margin softmax heads for recognition finetuning.

CosFace: logit_j = s * (cos(theta_j) - m * [j == y]).
ArcFace: logit_j = s * cos(theta_j + m * [j == y]) (with insightface's fallback past pi - m).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MarginHead(nn.Module):
    """Normalised classifier W (C x D); subclasses add the margin to the target logit only."""

    def __init__(self, embed_dim: int, num_classes: int, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__()
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1.0, 1.0)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits (B, C) with the margin on each row's target class; feed to cross-entropy."""
        cos = self.cosine(embeddings)
        index = labels.view(-1, 1)
        target = self.target_logit(cos.gather(1, index))
        return self.s * cos.scatter(1, index, target)


class CosFace(MarginHead):
    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.m


class ArcFace(MarginHead):
    def __init__(self, embed_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(embed_dim, num_classes, s, m)
        self.threshold = math.cos(math.pi - m)
        self.sinmm = math.sin(math.pi - m) * m

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        if self.m == 0:
            return cos_target
        theta = torch.acos(cos_target.clamp(-1 + 1e-7, 1 - 1e-7))
        # past theta = pi - m, cos(theta + m) would increase again; fall back to a linear penalty.
        return torch.where(cos_target > self.threshold, torch.cos(theta + self.m), cos_target - self.sinmm)


MARGIN_HEADS: dict[str, type[MarginHead]] = {"arcface": ArcFace, "cosface": CosFace}


def create_margin_head(name: str, embed_dim: int, num_classes: int, s: float, m: float) -> MarginHead:
    try:
        cls = MARGIN_HEADS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown margin head {name!r}; choose one of {sorted(MARGIN_HEADS)}") from None
    return cls(embed_dim, num_classes, s=s, m=m)
