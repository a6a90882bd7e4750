"""Geometric image ops that carry landmarks exactly.

Coordinates are pixels ``(x, y)`` with pixel ``(row i, col j)`` centred at ``(x=j, y=i)`` (see
``lafs.models.patches``). Resizing follows the ``align_corners=False`` convention of torchvision /
``grid_sample``: output pixel centre ``p`` samples input position ``(p + 0.5) * in / out - 0.5``, so the
landmark map below is the exact inverse of what the resampler does and a landmark stays on the same
image content through crop, resize and flip. The landmark network is trained on these labels, so an
off-by-half-pixel here would become a systematic bias of every predicted landmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lafs.conventions import ALIGNED_SIZE

Box = tuple[int, int, int, int]  # (top, left, height, width), as torchvision's crop
Size = int | tuple[int, int]

# Index i of the mirrored face is index FLIP_PERM[i] of the original face (subject's left <-> right).
# iBUG 300-W / dlib 68 points, 0-based: jaw 0-16 reversed; brows 17-21 <-> 26-22; nose bridge 27-30 on
# the midline; nostrils 31-35 reversed; eyes 36-41 <-> 45,44,43,42,47,46 (corner, lids, corner, lids
# keep their clockwise order); outer lip 48-59 and inner lip 60-67 mirrored about 51/57 and 62/66.
FLIP_PERM_68 = torch.tensor(
    [
        16,
        15,
        14,
        13,
        12,
        11,
        10,
        9,
        8,
        7,
        6,
        5,
        4,
        3,
        2,
        1,
        0,  # jaw
        26,
        25,
        24,
        23,
        22,
        21,
        20,
        19,
        18,
        17,  # brows
        27,
        28,
        29,
        30,  # nose bridge
        35,
        34,
        33,
        32,
        31,  # nostrils
        45,
        44,
        43,
        42,
        47,
        46,  # eye on the image left
        39,
        38,
        37,
        36,
        41,
        40,  # eye on the image right
        54,
        53,
        52,
        51,
        50,
        49,
        48,
        59,
        58,
        57,
        56,
        55,  # outer lip
        64,
        63,
        62,
        61,
        60,
        67,
        66,
        65,
    ],  # inner lip
    dtype=torch.long,
)
# insightface / SCRFD 5 points: left eye, right eye, nose, left mouth corner, right mouth corner.
FLIP_PERM_5 = torch.tensor([1, 0, 2, 4, 3], dtype=torch.long)

_KNOWN_FLIP_PERMS = {68: FLIP_PERM_68, 5: FLIP_PERM_5}


def flip_permutation_from_mean_shape(mean: torch.Tensor, width: int, max_mismatch: float = 0.05) -> torch.Tensor:
    """Derive a flip permutation from a (roughly symmetric) mean shape (K, 2) in an image of ``width``.

    For schemes without a published table (e.g. insightface 106 points or a learned 196-point set):
    each mirrored point is matched one-to-one to its nearest original point (Hungarian assignment, so no
    two points claim the same partner). Raises if the result is not an involution, or if mirrored points land
    on average more than ``max_mismatch`` of the width from their partners: either means the mean shape is too
    asymmetric for the matching to be trusted (an involution alone can happen by chance).
    """
    from scipy.optimize import linear_sum_assignment  # lazy: keeps DataLoader worker imports light

    mean = torch.as_tensor(mean, dtype=torch.float64)
    if mean.ndim != 2 or mean.shape[1] != 2:
        raise ValueError(f"mean shape must be (K, 2) pixel (x, y), got {tuple(mean.shape)}")
    mirrored = mean.clone()
    mirrored[:, 0] = width - 1 - mirrored[:, 0]
    # cost[i, k]: how far original point i lands, once mirrored, from where landmark k sits.
    cost = torch.cdist(mirrored, mean).numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = torch.empty(mean.shape[0], dtype=torch.long)
    perm[torch.as_tensor(cols)] = torch.as_tensor(rows)
    mismatch = float(cost[rows, cols].mean())
    if not torch.equal(perm[perm], torch.arange(mean.shape[0])) or mismatch > max_mismatch * width:
        raise ValueError(
            "the flip permutation derived from the mean shape is not an involution or its mirrored points miss "
            f"their partners by {mismatch:.1f} px on average: the mean shape is not left/right symmetric about "
            f"x = {(width - 1) / 2} (check `width`, or pass an explicit table)"
        )
    return perm


def flip_permutation(
    num_landmarks: int, mean_shape: torch.Tensor | None = None, width: int | None = None
) -> torch.Tensor:
    """The left/right permutation for a landmark scheme: a known table (68, 5) or one derived from
    ``mean_shape`` (K, 2) in an image of ``width`` pixels."""
    if num_landmarks in _KNOWN_FLIP_PERMS and mean_shape is None:
        return _KNOWN_FLIP_PERMS[num_landmarks].clone()
    if mean_shape is None:
        raise ValueError(
            f"no known flip permutation for {num_landmarks} landmarks (known: "
            f"{sorted(_KNOWN_FLIP_PERMS)}); pass mean_shape=(K, 2) pixel landmarks and width= to derive one, "
            "or torch.arange(K) if the indices carry no left/right meaning"
        )
    if mean_shape.shape[0] != num_landmarks:
        raise ValueError(f"mean_shape has {mean_shape.shape[0]} points, expected {num_landmarks}")
    if width is None:
        raise ValueError("width= (pixels of the image the mean shape lives in) is needed to mirror it")
    return flip_permutation_from_mean_shape(mean_shape, width)


def _pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def crop_resize(
    image: torch.Tensor, landmarks: torch.Tensor | None, box: Box, size: Size
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Crop ``box`` = (top, left, height, width) from a (C, H, W) image and resize it to ``size`` (bicubic,
    antialiased); parts of the box outside the image are zero. Landmarks (K, 2) follow exactly.

    No clamping: bicubic can overshoot [0, 1]; callers that need the range clamp (``LandmarkAugment``).
    """
    top, left, height, width = (int(v) for v in box)
    if height <= 0 or width <= 0:
        raise ValueError(f"crop box must have positive height and width, got {box}")
    out_h, out_w = _pair(size)
    out = TF.crop(image, top, left, height, width)
    if (out_h, out_w) != (height, width):
        out = TF.resize(out, [out_h, out_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if landmarks is None:
        return out, None
    if not landmarks.is_floating_point():
        landmarks = landmarks.float()
    offset = torch.tensor((left, top), dtype=landmarks.dtype, device=landmarks.device)
    scale = torch.tensor((out_w / width, out_h / height), dtype=landmarks.dtype, device=landmarks.device)
    return out, (landmarks - offset + 0.5) * scale - 0.5


def hflip(
    image: torch.Tensor, landmarks: torch.Tensor | None, flip_perm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mirror a (C, H, W) image; landmarks get x' = W - 1 - x and are re-indexed by ``flip_perm`` so the
    left eye stays "left eye". ``flip_perm=None`` keeps the indices (only for index-free point sets)."""
    out = TF.horizontal_flip(image)
    if landmarks is None:
        return out, None
    mirrored = landmarks.clone() if landmarks.is_floating_point() else landmarks.float()
    mirrored[..., 0] = image.shape[-1] - 1 - mirrored[..., 0]
    if flip_perm is not None:
        if flip_perm.numel() != landmarks.shape[-2]:
            raise ValueError(f"flip_perm has {flip_perm.numel()} entries for {landmarks.shape[-2]} landmarks")
        mirrored = mirrored[..., flip_perm.to(landmarks.device), :]
    return out, mirrored


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Box:
    """RandomResizedCrop's box sampling (area fraction in ``scale``, log-uniform aspect in ``ratio``, 10
    tries, then the central-crop fallback), driven by an explicit generator so views are reproducible."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # Fallback: the largest central crop whose aspect ratio is inside ``ratio``.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class CropFlip:
    """The geometry of one view: a crop box and whether it is mirrored (after the resize)."""

    box: Box
    flip: bool


@dataclass(frozen=True)
class LandmarkAugment:
    """Random resized crop + random horizontal flip applied to an image and its landmarks together.

    Sampling (``sample``) is split from application (``apply``) so the clean and the colour-augmented
    version of a LAFS view can share one geometry. Images are (C, H, W) floats in [0, 1]; the output
    is clamped back to [0, 1] because bicubic overshoots (PIL clamps the same way when it resamples).
    ``flip_perm=None`` looks the permutation up by K (68, 5) and raises for other schemes; pass
    ``torch.arange(K)`` for point sets whose indices have no left/right meaning.
    """

    size: Size = ALIGNED_SIZE
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    flip_perm: torch.Tensor | None = None

    def sample(self, height: int, width: int, generator: torch.Generator | None = None) -> CropFlip:
        box = random_resized_crop_box(height, width, self.scale, self.ratio, generator)
        flip = bool(torch.rand((), generator=generator) < self.flip_p)
        return CropFlip(box, flip)

    def apply(
        self, image: torch.Tensor, landmarks: torch.Tensor | None, geometry: CropFlip
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, lm = crop_resize(image, landmarks, geometry.box, self.size)
        if geometry.flip:
            perm = self.flip_perm
            if perm is None and lm is not None:
                # Never mirror without re-indexing by accident: unknown schemes must pass a permutation.
                perm = flip_permutation(lm.shape[-2])
            out, lm = hflip(out, lm, perm)
        return out.clamp(0.0, 1.0), lm

    def __call__(
        self, image: torch.Tensor, landmarks: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.apply(image, landmarks, self.sample(image.shape[-2], image.shape[-1], generator))
