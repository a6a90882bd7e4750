"""Named model sizes. ``base`` is the official LAFS size (dim 768, depth 12, 11 heads of 64, MLP 2048);
``mini``, ``tiny`` and ``small`` keep the same code path but train on a CPU (``mini`` is the default CPU
recogniser: ~300 images/s for a training step on 2 cores in bf16)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lafs.models.landmark_net import LandmarkNet
from lafs.models.registry import create_model, register_model
from lafs.models.vit import FaceViT

SIZES: dict[str, dict[str, int]] = {
    "mini": {"embed_dim": 128, "depth": 4, "num_heads": 2, "head_dim": 64, "mlp_dim": 512},
    "tiny": {"embed_dim": 192, "depth": 6, "num_heads": 3, "head_dim": 64, "mlp_dim": 768},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "head_dim": 64, "mlp_dim": 1536},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 11, "head_dim": 64, "mlp_dim": 2048},
}


def _landmark_vit(size: str, landmark_net: str | nn.Module | None = None, **kwargs: Any) -> FaceViT:
    num_landmarks = kwargs.setdefault("num_landmarks", 196)
    if isinstance(landmark_net, str):
        landmark_net = create_model(landmark_net, num_landmarks=num_landmarks)
    return FaceViT(tokenizer="landmark", landmark_net=landmark_net, **{**SIZES[size], **kwargs})


def _grid_vit(size: str, **kwargs: Any) -> FaceViT:
    return FaceViT(tokenizer="grid", **{**SIZES[size], **kwargs})


@register_model
def lafs_vit_mini(**kwargs: Any) -> FaceViT:
    return _landmark_vit("mini", **kwargs)


@register_model
def lafs_vit_tiny(**kwargs: Any) -> FaceViT:
    return _landmark_vit("tiny", **kwargs)


@register_model
def lafs_vit_small(**kwargs: Any) -> FaceViT:
    return _landmark_vit("small", **kwargs)


@register_model
def lafs_vit_base(**kwargs: Any) -> FaceViT:
    """The official part fViT (64.1M parameters at K=196)."""
    return _landmark_vit("base", **kwargs)


@register_model
def dino_vit_mini(**kwargs: Any) -> FaceViT:
    return _grid_vit("mini", **kwargs)


@register_model
def dino_vit_tiny(**kwargs: Any) -> FaceViT:
    return _grid_vit("tiny", **kwargs)


@register_model
def dino_vit_small(**kwargs: Any) -> FaceViT:
    return _grid_vit("small", **kwargs)


@register_model
def dino_vit_base(**kwargs: Any) -> FaceViT:
    """The fViT used by the DINO-face baseline: same transformer, regular 8x8 grid."""
    return _grid_vit("base", **kwargs)


@register_model
def landmark_net_mnv3_small(**kwargs: Any) -> LandmarkNet:
    return LandmarkNet(**{"backbone": "mobilenetv3_small_100", **kwargs})


@register_model
def landmark_net_mnv3_large(**kwargs: Any) -> LandmarkNet:
    """The official landmark CNN family (MobileNetV3-Large)."""
    return LandmarkNet(**{"backbone": "mobilenetv3_large_100", **kwargs})
