"""LAFS / DINO-face multi-view transforms and the batch-level landmark augmentations."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lafs.data.views import (
    GLOBAL1,
    GLOBAL2,
    LOCAL,
    DINOFaceViews,
    LAFSViews,
    PhotometricRecipe,
    jitter_landmarks,
    photometric,
    random_landmark_subset,
    take_landmarks,
)

# Rounded ArcFace template points, made asymmetric at the mouth so flips are visible in the carried
# coordinates: mouth-left (3) sits higher than mouth-right (4).
POINTS_5 = torch.tensor([[38.0, 52.0], [74.0, 52.0], [56.0, 72.0], [42.0, 88.0], [70.0, 96.0]])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # DataLoader workers run single-threaded; tiny 112-px ops are also faster that way on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dot_image(points: torch.Tensor, size: int = 112, background: float = 0.0) -> torch.Tensor:
    """(3, size, size) image with a white 3x3 square centred on each integer point."""
    img = torch.full((3, size, size), background)
    for x, y in points.long().tolist():
        img[:, y - 1 : y + 2, x - 1 : x + 2] = 1.0
    return img


def unnormalise(views: torch.Tensor) -> torch.Tensor:
    return (views + 1) / 2


def dot_centre(view: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Strength and (x, y) centroid of what differs from the view's uniform background (a single dot).

    A centroid, not an argmax: an upscaled 3x3 square is a plateau after clamping, and colour ops applied
    per pixel (or a symmetric blur) keep a symmetric blob's centre where it was.
    """
    background = view.flatten(1).median(dim=1).values[:, None, None]
    dev = (view - background).abs().sum(dim=0)
    dev = torch.where(dev > 1e-4, dev, torch.zeros_like(dev)).double()
    ys, xs = torch.meshgrid(torch.arange(view.shape[-2]), torch.arange(view.shape[-1]), indexing="ij")
    total = dev.sum().clamp_min(1e-12)
    return float(dev.max()), torch.tensor([float((dev * xs).sum() / total), float((dev * ys).sum() / total)])


def test_lafs_views_shapes_range_and_input_types():
    g = gen(0)
    image_u8 = torch.randint(0, 256, (3, 120, 100), dtype=torch.uint8, generator=g)
    landmarks = torch.rand(68, 2, generator=g) * 90 + 5
    views = LAFSViews()
    out = views(image_u8.float() / 255, landmarks, gen(1))
    assert set(out) == {"clean", "augmented", "landmarks"}
    assert out["clean"].shape == out["augmented"].shape == (10, 3, 112, 112)
    assert out["landmarks"].shape == (10, 68, 2)
    for key in ("clean", "augmented"):
        assert out[key].dtype == torch.float32
        assert out[key].min() >= -1.0 and out[key].max() <= 1.0
    # uint8 tensors and PIL images are the same picture.
    pil = Image.fromarray(image_u8.permute(1, 2, 0).numpy())
    for other in (views(image_u8, landmarks, gen(1)), views(pil, landmarks, gen(1))):
        for key in out:
            assert torch.allclose(other[key], out[key], atol=1e-6)
    assert "landmarks" not in LAFSViews(global_crops=2, local_crops=1)(image_u8, None, gen(1))


def test_lafs_views_clean_and_augmented_share_geometry():
    img = dot_image(POINTS_5)
    on = LAFSViews()(img, POINTS_5, gen(3))
    off = LAFSViews(photometric=False)(img, POINTS_5, gen(3))
    # Geometry and colour use separate streams: the crops do not depend on the colour recipe.
    assert torch.equal(on["clean"], off["clean"]) and torch.equal(on["landmarks"], off["landmarks"])
    assert torch.equal(off["augmented"], off["clean"])
    assert not torch.equal(on["augmented"], on["clean"])

    # With colour augmentation on, a single dot is still in the same place in both versions of each view.
    one_dot = dot_image(torch.tensor([[45.0, 62.0]]), background=0.2)
    out = LAFSViews()(one_dot, None, gen(4))
    for clean, augmented in zip(unnormalise(out["clean"]), unnormalise(out["augmented"]), strict=True):
        strength_clean, at_clean = dot_centre(clean)
        strength_aug, at_aug = dot_centre(augmented)
        assert strength_clean > 0.5 and strength_aug > 0.1  # 0.4-1 scale crops always contain the dot
        assert (at_clean - at_aug).abs().max() < 0.5  # measured: <= 0.25 px (blur/solarise reshape it)


def test_lafs_views_carry_landmarks_through_crop_resize_and_flip():
    img = dot_image(POINTS_5 + 8, size=128)  # 128 px source: crops are both up- and downscaled
    out = LAFSViews(global_crops=2, local_crops=14, photometric=False)(img, POINTS_5 + 8, gen(5))
    clean = unnormalise(out["clean"]).mean(dim=1)
    flipped, errors = 0, []
    for view, lm in zip(clean, out["landmarks"], strict=True):
        for x, y in lm.tolist():
            if not (6 <= x <= 105 and 6 <= y <= 105):  # the whole blob must be inside the view
                continue
            cx, cy = round(x), round(y)
            window = view[cy - 5 : cy + 6, cx - 5 : cx + 6]
            assert window.max() > 0.5
            _, centre = dot_centre(window[None])
            errors.append(float((centre + torch.tensor([cx - 5, cy - 5]) - torch.tensor([x, y])).abs().max()))
        # Indices stay semantic under flips: the left eye is always on the image left.
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
        flipped += bool(lm[3, 1] > lm[4, 1])  # only a flip puts the higher mouth corner on the right
    assert 0 < flipped < 16
    assert len(errors) > 40 and max(errors) < 0.25  # measured: ~0.06 px


def test_view_recipes_follow_the_official_code():
    assert LAFSViews().recipes == [GLOBAL1, GLOBAL2] + [LOCAL] * 8
    assert (GLOBAL1.blur_p, GLOBAL1.solarize_p) == (1.0, 0.0)
    assert (GLOBAL2.blur_p, GLOBAL2.solarize_p) == (0.1, 0.2)
    assert (LOCAL.blur_p, LOCAL.solarize_p) == (0.5, 0.0)
    assert (GLOBAL1.jitter_p, GLOBAL1.grayscale_p) == (0.8, 0.2)


@pytest.mark.parametrize(
    ("recipe", "image", "applied", "rate"),
    [
        # Each op in isolation on an image where its effect is unmistakable; rates over 400 draws.
        (
            PhotometricRecipe(blur_p=0, solarize_p=0.2, jitter_p=0, grayscale_p=0),
            torch.full((3, 8, 8), 0.9),
            lambda out: bool(out.max() < 0.5),
            0.2,
        ),
        (
            PhotometricRecipe(blur_p=0, jitter_p=0, grayscale_p=0.2),
            torch.tensor([0.9, 0.1, 0.3])[:, None, None].expand(3, 8, 8),
            lambda out: bool((out[0] == out[1]).all()),
            0.2,
        ),
        # sigma >= 1 so every blur visibly flattens a checkerboard (at sigma 0.1 it is numerically a no-op).
        (
            PhotometricRecipe(blur_p=0.5, blur_sigma=(1.0, 2.0), jitter_p=0, grayscale_p=0),
            (torch.arange(64.0) % 2).reshape(1, 8, 8).expand(3, 8, 8),
            lambda out: bool(out.max() < 0.99),
            0.5,
        ),
        (
            PhotometricRecipe(blur_p=0, jitter_p=0.8, grayscale_p=0),
            torch.full((3, 8, 8), 0.5),
            lambda out: bool((out - 0.5).abs().max() > 1e-3),
            0.8,
        ),
    ],
)
def test_photometric_probabilities(recipe, image, applied, rate):
    g = gen(0)
    hits = sum(applied(photometric(image, recipe, g)) for _ in range(400))
    assert abs(hits / 400 - rate) < 0.07


def test_lafs_views_need_a_flip_permutation_for_unknown_schemes():
    img = torch.rand(3, 112, 112, generator=gen(0))
    with pytest.raises(ValueError, match="no known flip permutation for 7"):
        LAFSViews(local_crops=0)(img, torch.rand(7, 2) * 100, gen(0))
    out = LAFSViews(local_crops=0, flip_perm=torch.arange(7))(img, torch.rand(7, 2) * 100, gen(0))
    assert out["landmarks"].shape == (2, 7, 2)


def test_lafs_views_deterministic_per_seed():
    img = torch.rand(3, 112, 112, generator=gen(0))
    lm = torch.rand(5, 2, generator=gen(1)) * 100
    views = LAFSViews(local_crops=2)
    a, b, c = views(img, lm, gen(7)), views(img, lm, gen(7)), views(img, lm, gen(8))
    for key in a:
        assert torch.equal(a[key], b[key])
        assert not torch.equal(a[key], c[key])


def test_dino_face_views_shapes_range_determinism():
    img = torch.rand(3, 112, 112, generator=gen(0))
    views = DINOFaceViews()
    out = views(img, generator=gen(1))
    assert out["global"].shape == (2, 3, 112, 112)
    assert out["local"].shape == (8, 3, 48, 48)
    for v in out.values():
        assert v.min() >= -1.0 and v.max() <= 1.0 and v.min() < 0 < v.max()
    again, other = views(img, generator=gen(1)), views(img, generator=gen(2))
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(out["global"], other["global"])
    assert DINOFaceViews(local_crops=0)(img, None, gen(1))["local"].shape == (0, 3, 48, 48)


def test_jitter_landmarks_std_and_determinism():
    lm = torch.rand(256, 196, 2, generator=gen(0)) * 111
    out = jitter_landmarks(lm, 5.0, gen(1))
    noise = out - lm
    assert abs(float(noise.std()) - 5.0) < 0.1
    assert abs(float(noise.mean())) < 0.05
    assert abs(float(torch.corrcoef(noise.reshape(-1, 2).T)[0, 1])) < 0.02  # x and y independent
    assert torch.equal(out, jitter_landmarks(lm, 5.0, gen(1)))
    assert torch.equal(jitter_landmarks(lm, 0.0), lm)


def test_random_landmark_subset_with_replacement():
    idx = random_landmark_subset(64, 196, 36, device="cpu", generator=gen(0))
    assert idx.shape == (64, 36) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < 196
    rows_with_duplicates = sum(len(set(row)) < 36 for row in idx.tolist())
    assert rows_with_duplicates > 32  # without replacement there would be none (~96% of rows expected)
    assert len(set(idx.flatten().tolist())) > 190
    assert torch.equal(idx, random_landmark_subset(64, 196, 36, generator=gen(0)))
    landmarks = torch.rand(64, 196, 2)
    picked = take_landmarks(landmarks, idx)
    assert picked.shape == (64, 36, 2)
    assert torch.equal(picked[5, 7], landmarks[5, idx[5, 7]])
