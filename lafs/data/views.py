"""Multi-view self-supervised transforms (LAFS and the DINO-face baseline) and the landmark-level
augmentations LAFS applies to batches in the training step.

Every random draw comes from an explicit ``torch.Generator`` (torchvision's random transforms read the
global RNG, which DataLoader workers share in ways that are hard to reproduce), and the photometric
ops are the ``torchvision.transforms.v2.functional`` kernels with parameters drawn here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from lafs.conventions import ALIGNED_SIZE, PIXEL_MEAN, PIXEL_STD
from lafs.data.transforms import CropFlip, LandmarkAugment, flip_permutation

NORM_MEAN = (PIXEL_MEAN,) * 3  # per channel: values in [-1, 1] (lafs.conventions)
NORM_STD = (PIXEL_STD,) * 3
# PIL's ImageOps.solarize default threshold (128 on uint8), which the official recipe relies on.
SOLARIZE_THRESHOLD = 128 / 255


@dataclass(frozen=True)
class PhotometricRecipe:
    """DINO's colour recipe for one kind of view: ColorJitter with probability ``jitter_p`` (random op
    order, as torchvision), RandomGrayscale, Gaussian blur with sigma ~ U(blur_sigma), solarisation."""

    blur_p: float
    solarize_p: float = 0.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)


# DINO: global view 1 always blurred; global view 2 rarely blurred but solarised; locals half blurred.
GLOBAL1 = PhotometricRecipe(blur_p=1.0)
GLOBAL2 = PhotometricRecipe(blur_p=0.1, solarize_p=0.2)
LOCAL = PhotometricRecipe(blur_p=0.5)


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(generator)


def color_jitter(
    image: torch.Tensor, recipe: PhotometricRecipe, generator: torch.Generator, apply: bool = True
) -> torch.Tensor:
    """Brightness/contrast/saturation/hue with factors drawn as torchvision's ColorJitter, in random order.

    The parameters are drawn even when ``apply`` is False so the stream position does not depend on it.
    """
    order = torch.randperm(4, generator=generator).tolist()
    factors = (
        _uniform(generator, 1 - recipe.brightness, 1 + recipe.brightness),
        _uniform(generator, 1 - recipe.contrast, 1 + recipe.contrast),
        _uniform(generator, 1 - recipe.saturation, 1 + recipe.saturation),
        _uniform(generator, -recipe.hue, recipe.hue),
    )
    if not apply:
        return image
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in order:
        image = ops[i](image, factors[i])
    return image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur with a kernel covering +-3 sigma (PIL's GaussianBlur radius, used by DINO, is sigma)."""
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(image, [k, k], [sigma, sigma])


def photometric(image: torch.Tensor, recipe: PhotometricRecipe, generator: torch.Generator) -> torch.Tensor:
    """Apply a recipe to a (3, H, W) image in [0, 1]. Every coin is always tossed, so the number of draws
    (hence the rest of the stream) does not depend on the outcomes."""
    image = color_jitter(image, recipe, generator, apply=_rand(generator) < recipe.jitter_p)
    if _rand(generator) < recipe.grayscale_p:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    do_blur = _rand(generator) < recipe.blur_p
    sigma = _uniform(generator, *recipe.blur_sigma)
    if do_blur:
        image = gaussian_blur(image, sigma)
    if _rand(generator) < recipe.solarize_p:
        image = TF.solarize(image, SOLARIZE_THRESHOLD)
    return image


def normalise(image: torch.Tensor) -> torch.Tensor:
    return TF.normalize(image, list(NORM_MEAN), list(NORM_STD))


def to_float_image(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """PIL image or (3, H, W) uint8/float tensor -> plain float32 (3, H, W) tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image.convert("RGB"))
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected a PIL image or a (3, H, W) tensor, got {shape}")
    image = image.as_subclass(torch.Tensor)
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    return image.float()


def _resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    # Seeded from the global RNG, so DataLoader's per-worker seeding still makes views differ per worker.
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


def _split(generator: torch.Generator) -> tuple[torch.Generator, torch.Generator]:
    """Independent geometry and colour streams: the crops then do not depend on the photometric recipe
    (switching colour augmentation off leaves the clean views bit-identical)."""
    seeds = torch.randint(0, 2**62, (2,), generator=generator).tolist()
    return torch.Generator().manual_seed(seeds[0]), torch.Generator().manual_seed(seeds[1])


def _source(
    image: torch.Tensor | Image.Image, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Generator, torch.Generator]:
    """What every view maker starts from: the float image, and its geometry and colour streams."""
    return to_float_image(image), *_split(_resolve_generator(generator))


def _check_crop_counts(global_crops: int, local_crops: int) -> None:
    # the teacher sees only global views: without one there is nothing to distil from
    if global_crops < 1 or local_crops < 0:
        raise ValueError(f"need global_crops >= 1 and local_crops >= 0, got {global_crops}, {local_crops}")


def _augmented(view: torch.Tensor, recipe: PhotometricRecipe, generator: torch.Generator, colour: bool) -> torch.Tensor:
    """The normalised training view: ``recipe`` applied when ``colour`` is on; off, no draws from ``generator``."""
    return normalise(photometric(view, recipe, generator) if colour else view)


def _global_recipe(index: int) -> PhotometricRecipe:
    # DINO defines two global recipes; extra global views (not used by default) alternate between them.
    return GLOBAL1 if index % 2 == 0 else GLOBAL2


class LAFSViews:
    """LAFS views: V = global_crops + local_crops pairs of one 112-px crop each, clean and augmented.

    As the official ``DataAugmentation_LAFS``: every view, local ones included, is a RandomResizedCrop at
    ``size`` with ``scale`` (0.4, 1), bicubic, plus a horizontal flip with p=0.5. The clean version is only
    normalised (the frozen landmark CNN predicts on it); the augmented version (where patches are sampled)
    gets DINO's colour recipe: global view 1 always blurred, global view 2 blur 0.1 + solarise 0.2,
    locals blur 0.5. Locals become "local" only later, by keeping a random subset of landmarks.
    Landmarks given in the source image are carried through crop and flip exactly.
    """

    def __init__(
        self,
        global_crops: int = 2,
        local_crops: int = 8,
        size: int = ALIGNED_SIZE,
        scale: tuple[float, float] = (0.4, 1.0),
        flip_perm: torch.Tensor | None = None,
        photometric: bool = True,
    ) -> None:
        _check_crop_counts(global_crops, local_crops)
        self.global_crops = global_crops
        self.local_crops = local_crops
        self.size = size
        self.scale = scale
        self.flip_perm = flip_perm
        self.photometric = photometric
        self.recipes = [_global_recipe(i) for i in range(global_crops)] + [LOCAL] * local_crops

    def __call__(
        self,
        image: torch.Tensor | Image.Image,
        landmarks: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        img, geo_gen, colour_gen = _source(image, generator)
        flip_perm = self.flip_perm
        if landmarks is not None:
            landmarks = torch.as_tensor(landmarks, dtype=torch.float32)
            if landmarks.ndim != 2 or landmarks.shape[1] != 2:
                raise ValueError(f"landmarks must be (K, 2) pixel (x, y), got {tuple(landmarks.shape)}")
            if flip_perm is None:
                flip_perm = flip_permutation(landmarks.shape[0])
        aug = LandmarkAugment(size=self.size, scale=self.scale, flip_perm=flip_perm)
        clean, augmented, carried = [], [], []
        for recipe in self.recipes:
            geometry: CropFlip = aug.sample(img.shape[-2], img.shape[-1], geo_gen)
            view, lm = aug.apply(img, landmarks, geometry)
            clean.append(normalise(view))
            augmented.append(_augmented(view, recipe, colour_gen, self.photometric))
            if lm is not None:
                carried.append(lm)
        out = {"clean": torch.stack(clean), "augmented": torch.stack(augmented)}
        if carried:
            out["landmarks"] = torch.stack(carried)
        return out


class DINOFaceViews:
    """DINO multi-crop on faces (the DINO-face baseline): ``global_crops`` crops at ``global_size`` with
    ``global_scale`` and ``local_crops`` crops at ``local_size`` with ``local_scale``, each flipped and
    colour-augmented with DINO's per-view recipe, normalised with mean = std = 0.5 like LAFS so the two
    methods differ only in where their patches come from."""

    def __init__(
        self,
        global_crops: int = 2,
        local_crops: int = 8,
        global_size: int = ALIGNED_SIZE,
        local_size: int = 48,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        photometric: bool = True,
    ) -> None:
        _check_crop_counts(global_crops, local_crops)
        self.global_crops = global_crops
        self.local_crops = local_crops
        self.local_size = local_size
        self.photometric = photometric
        self.global_aug = LandmarkAugment(size=global_size, scale=global_scale)
        self.local_aug = LandmarkAugment(size=local_size, scale=local_scale)

    def _view(
        self,
        img: torch.Tensor,
        aug: LandmarkAugment,
        recipe: PhotometricRecipe,
        geo_gen: torch.Generator,
        colour_gen: torch.Generator,
    ) -> torch.Tensor:
        view, _ = aug.apply(img, None, aug.sample(img.shape[-2], img.shape[-1], geo_gen))
        return _augmented(view, recipe, colour_gen, self.photometric)

    def __call__(
        self,
        image: torch.Tensor | Image.Image,
        landmarks: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """``landmarks`` is accepted and ignored, so a dataset can call either view maker the same way."""
        del landmarks
        img, geo_gen, colour_gen = _source(image, generator)
        globals_ = [
            self._view(img, self.global_aug, _global_recipe(i), geo_gen, colour_gen) for i in range(self.global_crops)
        ]
        locals_ = [self._view(img, self.local_aug, LOCAL, geo_gen, colour_gen) for _ in range(self.local_crops)]
        local = torch.stack(locals_) if locals_ else torch.empty(0, 3, self.local_size, self.local_size)
        return {"global": torch.stack(globals_), "local": local}


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # A CPU generator can drive draws for CUDA tensors: draw where the generator lives, then move.
    return generator.device if generator is not None else device


def jitter_landmarks(landmarks: torch.Tensor, std_px: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add i.i.d. Gaussian noise of ``std_px`` pixels to every coordinate of (B, K, 2) landmarks (LAFS
    "landmark perturbation", official std 5 px), so the student never sees the exact same patches."""
    if std_px == 0:
        return landmarks
    draw_on = _draw_device(generator, landmarks.device)
    noise = torch.randn(landmarks.shape, generator=generator, device=draw_on, dtype=landmarks.dtype)
    return landmarks + std_px * noise.to(landmarks.device)


def random_landmark_subset(
    batch: int,
    num_landmarks: int,
    subset: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, subset) landmark indices drawn uniformly WITH replacement, as the official ``torch.randint``
    (36 of 196): the LAFS "local landmark crops". Duplicates are possible and the order is random."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_on = _draw_device(generator, device)
    idx = torch.randint(0, num_landmarks, (batch, subset), generator=generator, device=draw_on)
    return idx.to(device)


def take_landmarks(landmarks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather (B, K, 2) landmarks at (B, S) indices -> (B, S, 2)."""
    return torch.gather(landmarks, 1, index[..., None].expand(-1, -1, landmarks.shape[-1]))
