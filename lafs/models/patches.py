"""Patch extraction at arbitrary points (landmarks) or on a regular grid.

Coordinates are in pixels with pixel ``(row i, col j)`` centred at ``(x=j, y=i)``, the convention of
dlib / insightface landmark files. A patch of size P at point ``(x, y)`` covers the pixel offsets
``-P//2 .. P - P//2 - 1`` in each axis (the official LAFS sampler's -4..+3 for P=8), so at integer
coordinates bilinear sampling returns the image pixels exactly, and at the grid centres ``P/2 + P*k``
it reproduces an ordinary non-overlapping patchify.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F


@cache
def _offsets(patch_size: int) -> tuple[int, ...]:
    lo = -(patch_size // 2)
    return tuple(range(lo, lo + patch_size))


def patch_offsets(
    patch_size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(P, P, 2) pixel offsets (dx, dy) of a patch, row-major (p1 = row, p2 = column)."""
    o = torch.tensor(_offsets(patch_size), device=device, dtype=dtype)
    dy, dx = torch.meshgrid(o, o, indexing="ij")
    return torch.stack((dx, dy), dim=-1)


def sample_patches(
    images: torch.Tensor,
    points: torch.Tensor,
    patch_size: int = 8,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Bilinearly sample one P x P patch per point in a single ``grid_sample`` call.

    images: (B, C, H, W); points: (B, N, 2) pixel (x, y).
    Returns (B, N, P*P*C) tokens flattened in (p1 p2 c) order, the official LAFS token layout.
    Points off the image are sampled with ``padding_mode`` ("zeros" as in the official code, or
    "border"): landmarks mapped into the tight ArcFace crop (e.g. jaw points) can fall outside it.
    """
    if images.ndim != 4 or points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(
            f"expected images (B,C,H,W) and points (B,N,2), got {tuple(images.shape)}, {tuple(points.shape)}"
        )
    b, c, h, w = images.shape
    n = points.shape[1]
    # float64 here: the pixel -> [-1, 1] -> pixel round trip drifts by ~1e-6 px in float32, which would
    # blend neighbours; in float64 an integer landmark returns its pixels exactly after the cast back.
    # ONNX Runtime has no float64 GridSample kernel, so an exported graph samples in float32 instead (the
    # export stage's parity check bounds the effect); eager PyTorch is unchanged.
    work = torch.float32 if torch.onnx.is_in_onnx_export() else torch.float64
    pts = points.to(work)
    grid = pts[:, :, None, None, :] + patch_offsets(patch_size, pts.device, pts.dtype)  # (B,N,P,P,2)
    # align_corners=False: pixel centre j sits at normalised (2j + 1) / W - 1.
    scale = torch.tensor((2.0 / w, 2.0 / h), device=pts.device, dtype=pts.dtype)
    grid = ((grid + 0.5) * scale - 1.0).reshape(b, n * patch_size, patch_size, 2)
    out = F.grid_sample(images.to(work), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False).to(
        images.dtype
    )  # (B, C, N*P, P)
    out = out.reshape(b, c, n, patch_size, patch_size).permute(0, 2, 3, 4, 1)
    return out.reshape(b, n, patch_size * patch_size * c)


def patchify(images: torch.Tensor, patch_size: int = 8) -> torch.Tensor:
    """Regular non-overlapping patches, (B, C, H, W) -> (B, (H/P)*(W/P), P*P*C) in (p1 p2 c) order.

    Equals ``sample_patches`` at ``grid_points`` but is a pure reshape (no interpolation cost).
    """
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def grid_points(height: int, width: int, patch_size: int = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, 2) centres (x, y) of the regular patch grid, row-major, matching ``patchify``'s order."""
    ys = torch.arange(height // patch_size, device=device) * patch_size + patch_size // 2
    xs = torch.arange(width // patch_size, device=device) * patch_size + patch_size // 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).reshape(-1, 2).float()
