"""Landmark network: a small timm CNN that regresses K (x, y) landmarks from an aligned face.

Replaces the official stage-1 landmark CNN (MobileNetV3-Large, never released): we train it on the
dense landmarks of the extraction stage, freeze it for LAFS pretraining and fine-tune it with the
recogniser (regularised towards its frozen copy).
"""

from __future__ import annotations

import timm
import torch
from torch import nn


class LandmarkNet(nn.Module):
    """CNN -> global pool -> dropout -> Linear(2K); outputs pixel coordinates (B, K, 2).

    The head predicts coordinates normalised to [-1, 1] (the ``grid_sample`` frame), so points just
    outside the crop (jaw points in the tight ArcFace template) remain representable; unlike the
    official per-sample min-max rescaling, the output keeps the face's real scale.
    """

    def __init__(
        self,
        num_landmarks: int = 68,
        backbone: str = "mobilenetv3_large_100",
        img_size: int = 112,
        dropout: float = 0.5,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.num_landmarks = num_landmarks
        self.img_size = img_size
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(_pooled_dim(self.backbone), 2 * num_landmarks))
        nn.init.zeros_(self.head[1].weight)
        nn.init.zeros_(self.head[1].bias)

    def to_pixels(self, normalised: torch.Tensor) -> torch.Tensor:
        return (normalised + 1.0) * (self.img_size / 2.0) - 0.5

    def to_normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels + 0.5) * (2.0 / self.img_size) - 1.0

    @torch.no_grad()
    def init_mean_shape(self, mean_landmarks: torch.Tensor) -> None:
        """Start from the mean face shape (K, 2 pixels) so early predictions are already plausible."""
        self.head[1].bias.copy_(self.to_normalised(mean_landmarks.float()).reshape(-1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.head(self.backbone(images))
        return self.to_pixels(out.float().reshape(-1, self.num_landmarks, 2))


def _pooled_dim(backbone: nn.Module) -> int:
    # timm MobileNetV3 with num_classes=0 returns its 1280-d conv-head output, not num_features (960).
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
