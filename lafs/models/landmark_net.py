"""Landmark network: a small timm CNN that places K (x, y) landmarks on an aligned face (or a crop of one).

Replaces the official stage-1 landmark CNN (MobileNetV3-Large, never released): we train it on the
dense landmarks of the extraction stage, freeze it for LAFS pretraining and fine-tune it with the
recogniser (regularised towards its frozen copy).

Why integral regression and not global-pool + Linear (the first version): pooling throws away *where* a feature
fired, so the head had to re-derive each point's position from a 1280-d summary; trained from scratch on ~1.5k
faces it barely beat the mean shape (10.7% vs 12.9% NME). A per-landmark heatmap read out by soft-argmax keeps the
spatial layout (a feature at cell (i, j) votes for position (i, j)), is differentiable, and is translation-
equivariant, which is exactly what random resized crops need.

Why a refinement step: the heatmap net fitted its *training* faces no better than the held-out ones (6.3% vs 7.6%
NME after 40 epochs), i.e. it underfits, and a finer heatmap alone did not help (stride 8: 7.57% vs 7.63%). A
cascaded-regression step (what dlib's own predictor does, many times over) reads the features *around each
landmark's current estimate* and regresses a per-landmark correction: local evidence a soft-argmax over the
whole map dilutes (benchmarks/RESULTS.md, "Landmark network").
"""

from __future__ import annotations

from typing import cast

import timm
import torch
from timm.models import FeatureInfo
from torch import nn
from torch.nn import functional as F

from lafs.conventions import ALIGNED_SIZE


class LandmarkNet(nn.Module):
    """timm CNN -> FPN-lite heatmaps -> soft-argmax + global offset; outputs pixel coordinates (B, K, 2).

    - ``heatmap_stride`` 8 (14x14 at 112 px) or 16 (7x7): the stride-32 features are upsampled and added to the
      finer levels (1x1 laterals), then a 3x3 conv and a 1x1 conv give one heatmap per landmark. 8, because the
      refinement samples this map: one stride-16 cell (16 px) is too coarse a step (held-out NME after 10
      epochs with refinement: 11.9% at stride 16, 7.8% at stride 8).
    - The soft-argmax of a heatmap is bounded by the crop, but LAFS global views are 0.4-1 area crops that cut
      off the jaw or the brows, and those points must still be placed (off-crop patches are zero-padded). So
      each landmark also gets an offset regressed from the pooled stride-32 features, initialised to the mean
      shape (``init_mean_shape``): the offset carries points outside the crop, the heatmap the precise
      in-crop position.
    - ``refine_steps`` cascade steps: the fused map is sampled on a ``refine_patch`` x ``refine_patch`` grid
      (one cell apart) around each current estimate, and a per-landmark linear map of those features moves the
      point. Zero-initialised, so training starts from the coarse estimate; ``stages`` returns every step's
      points for a loss on each.

    Coordinates are predicted in the [-1, 1] ``grid_sample`` frame (``to_normalised`` / ``to_pixels``); unlike
    the official per-sample min-max rescaling, the output keeps the face's real scale.
    """

    def __init__(
        self,
        num_landmarks: int = 68,
        backbone: str = "mobilenetv3_large_100",
        img_size: int = ALIGNED_SIZE,
        heatmap_stride: int = 8,
        width: int = 128,
        refine_steps: int = 1,
        refine_patch: int = 3,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        levels = {16: (3, 4), 8: (2, 3, 4)}
        if heatmap_stride not in levels:
            raise ValueError(f"heatmap_stride must be 8 or 16, got {heatmap_stride}")
        self.num_landmarks = num_landmarks
        self.img_size = img_size
        # Stages 2-4 of a 5-stage timm CNN are its stride-8, -16 and -32 outputs (MobileNetV3, EfficientNet, ...).
        self.backbone = timm.create_model(
            backbone, pretrained=pretrained, features_only=True, out_indices=levels[heatmap_stride]
        )
        channels: list[int] = cast(FeatureInfo, self.backbone.feature_info).channels()  # features_only model
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.Hardswish()
        )
        self.heatmaps = nn.Conv2d(width, num_landmarks, 1)
        self.offset = nn.Linear(channels[-1], 2 * num_landmarks)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        # Sampling grid of a refinement step in feature cells, (P*P, 2) as (x, y).
        r = torch.linspace(-1.0, 1.0, refine_patch) if refine_patch > 1 else torch.zeros(1)
        gy, gx = torch.meshgrid(r, r, indexing="ij")
        self.register_buffer("refine_grid", torch.stack([gx, gy], dim=-1).reshape(-1, 2), persistent=False)
        self.refine_weight = nn.ParameterList(
            nn.Parameter(torch.zeros(num_landmarks, width * refine_patch**2, 2)) for _ in range(refine_steps)
        )
        self.refine_bias = nn.ParameterList(nn.Parameter(torch.zeros(num_landmarks, 2)) for _ in range(refine_steps))

    def to_pixels(self, normalised: torch.Tensor) -> torch.Tensor:
        return (normalised + 1.0) * (self.img_size / 2.0) - 0.5

    def to_normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels + 0.5) * (2.0 / self.img_size) - 1.0

    @torch.no_grad()
    def init_mean_shape(self, mean_landmarks: torch.Tensor) -> None:
        """Start from the mean face shape (K, 2 pixels) so early predictions are already plausible (the
        heatmaps start near-uniform, whose soft-argmax is the crop centre, i.e. offset 0)."""
        self.offset.bias.copy_(self.to_normalised(mean_landmarks.float()).reshape(-1))

    def stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Pixel coordinates (B, K, 2) after the heatmap step and after each refinement step (the last is the
        output)."""
        features = self.backbone(images)
        x = self.laterals[-1](features[-1])
        for lateral, feature in zip(self.laterals[-2::-1], features[-2::-1], strict=True):
            x = F.interpolate(x, size=feature.shape[-2:], mode="bilinear", align_corners=False) + lateral(feature)
        fmap = self.fuse(x)
        offset = self.offset(features[-1].mean(dim=(2, 3))).reshape(-1, self.num_landmarks, 2)
        points = soft_argmax(self.heatmaps(fmap)) + offset
        out = [points]
        cell = self.refine_grid * (2.0 / fmap.shape[-1])  # one feature cell in the [-1, 1] frame
        for weight, bias in zip(self.refine_weight, self.refine_bias, strict=True):
            # The sampling positions are not a path for gradients: each step learns a correction, not where to look.
            where = points.detach().unsqueeze(2) + cell  # (B, K, P*P, 2)
            local = F.grid_sample(
                fmap, where.to(fmap.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
            )  # (B, C, K, P*P)
            local = local.permute(0, 2, 1, 3).flatten(2)  # (B, K, C*P*P)
            points = points + torch.einsum("bkc,kcd->bkd", local, weight) + bias
            out.append(points)
        return [self.to_pixels(p.float()) for p in out]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(images)[-1]


def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) heatmap logits -> (B, K, 2) expected (x, y) of each softmax map, in the [-1, 1] frame where
    cell centres sit at (2 * i + 1) / n - 1 (the ``align_corners=False`` convention of ``to_normalised``)."""
    b, k, h, w = logits.shape
    prob = logits.flatten(2).softmax(dim=-1).reshape(b, k, h, w)
    xs = (torch.arange(w, dtype=prob.dtype, device=prob.device) * 2.0 + 1.0) / w - 1.0
    ys = (torch.arange(h, dtype=prob.dtype, device=prob.device) * 2.0 + 1.0) / h - 1.0
    return torch.stack(((prob.sum(dim=2) * xs).sum(dim=-1), (prob.sum(dim=3) * ys).sum(dim=-1)), dim=-1)
