"""Landmarks must follow crop, resize and flip exactly: checked against the pixels themselves."""

from __future__ import annotations

import math

import pytest
import torch

from lafs.data.transforms import (
    FLIP_PERM_5,
    FLIP_PERM_68,
    LandmarkAugment,
    crop_resize,
    flip_permutation,
    flip_permutation_from_mean_shape,
    hflip,
    random_resized_crop_box,
)

# insightface's 112x112 ArcFace alignment template (left eye, right eye, nose, mouth left, mouth right).
ARCFACE_5 = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def symmetric_mean_shape_68(width: int = 112) -> torch.Tensor:
    """A synthetic face laid out point by point from the iBUG 68 definitions (not from the flip table)."""
    cx = (width - 1) / 2
    pts: list[tuple[float, float]] = []
    for i in range(17):  # jaw: image-left temple, down round the chin, up to the image-right temple
        t = math.pi - math.pi * i / 16
        pts.append((cx + 45 * math.cos(t), 50 + 55 * math.sin(t)))
    for i in range(5):  # image-left brow, outer to inner
        pts.append((cx - 38 + 7.5 * i, 33 - 3 * math.sin(math.pi * i / 4)))
    for i in range(5):  # image-right brow, inner to outer
        pts.append((cx + 8 + 7.5 * i, 33 - 3 * math.sin(math.pi * (4 - i) / 4)))
    for i in range(4):  # nose bridge, top to tip
        pts.append((cx, 40 + 8 * i))
    for i in range(5):  # nostrils, image-left to image-right
        pts.append((cx - 10 + 5 * i, 70 + (2 if i == 2 else 0)))
    for ex in (cx - 20, cx + 20):  # eyes: left corner, two upper-lid points, right corner, two lower-lid
        for k in range(6):
            phi = math.pi - math.pi * k / 3
            pts.append((ex + 8 * math.cos(phi), 45 - 3 * math.sin(phi)))
    for k in range(12):  # outer lip: left corner, over the top, right corner, back along the bottom
        phi = math.pi - 2 * math.pi * k / 12
        pts.append((cx + 18 * math.cos(phi), 88 - 8 * math.sin(phi)))
    for k in range(8):  # inner lip, same order
        phi = math.pi - 2 * math.pi * k / 8
        pts.append((cx + 12 * math.cos(phi), 88 - 4 * math.sin(phi)))
    return torch.tensor(pts, dtype=torch.float32)


def coded_image(height: int, width: int, points: torch.Tensor, unit: float = 1.0) -> torch.Tensor:
    """Zero image with pixel value (k + 1) * unit at integer landmark k, so each pixel names its landmark."""
    img = torch.zeros(1, height, width)
    for k, (x, y) in enumerate(points.long().tolist()):
        img[0, y, x] = (k + 1) * unit
    return img


def distinct_points(k: int, y_range: tuple[int, int], x_range: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    (y0, y1), (x0, x1) = y_range, x_range
    flat = torch.randperm((y1 - y0) * (x1 - x0), generator=g)[:k]
    return torch.stack((flat % (x1 - x0) + x0, flat // (x1 - x0) + y0), dim=1).float()


def test_flip_perm_68_is_an_involution_and_a_permutation():
    assert sorted(FLIP_PERM_68.tolist()) == list(range(68))
    assert torch.equal(FLIP_PERM_68[FLIP_PERM_68], torch.arange(68))
    assert torch.equal(FLIP_PERM_5[FLIP_PERM_5], torch.arange(5))
    # Midline points map to themselves: nose bridge, nose tip, lip centres, chin.
    fixed = (torch.arange(68) == FLIP_PERM_68).nonzero().flatten().tolist()
    assert fixed == [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]


def test_flip_perm_from_mean_shape_matches_tables():
    assert torch.equal(flip_permutation_from_mean_shape(symmetric_mean_shape_68(), 112), FLIP_PERM_68)
    assert torch.equal(flip_permutation_from_mean_shape(ARCFACE_5, 112), FLIP_PERM_5)


def test_flip_permutation_lookup_and_errors():
    assert torch.equal(flip_permutation(68), FLIP_PERM_68)
    assert torch.equal(flip_permutation(5), FLIP_PERM_5)
    with pytest.raises(ValueError, match="no known flip permutation for 106"):
        flip_permutation(106)
    # An unknown scheme is fine with a mean shape: a 68-point shape relabelled as "K points" in a new order.
    order = torch.randperm(68, generator=torch.Generator().manual_seed(0))
    mean = symmetric_mean_shape_68()[order]
    perm = flip_permutation(68, mean_shape=mean, width=112)
    assert torch.equal(order[perm], FLIP_PERM_68[order])
    with pytest.raises(ValueError, match="width"):
        flip_permutation(68, mean_shape=mean)
    lopsided = symmetric_mean_shape_68()
    lopsided[:, 0] = lopsided[:, 0] * 0.5  # squashed to the left: the mirror matching is meaningless
    with pytest.raises(ValueError, match="not left/right symmetric"):
        flip_permutation_from_mean_shape(lopsided, 112)


@pytest.mark.parametrize("box", [(5, 7, 40, 48), (-4, -6, 40, 48), (30, 40, 40, 48)])
def test_crop_and_flip_move_pixels_and_landmarks_together(box):
    top, left, h, w = box
    # Landmarks inside the part of the box that overlaps the 64x80 image.
    pts = distinct_points(68, (max(top, 0), min(top + h, 64)), (max(left, 0), min(left + w, 80)), seed=1)
    img = coded_image(64, 80, pts)
    out, lm = crop_resize(img, pts, box, (h, w))
    assert out.shape == (1, h, w)
    assert torch.equal(lm, lm.round())
    for k, (x, y) in enumerate(lm.long().tolist()):
        assert out[0, y, x] == k + 1
    flipped, flm = hflip(out, lm, FLIP_PERM_68)
    assert int((flipped > 0).sum()) == 68  # nothing lost, nothing invented
    for i, (x, y) in enumerate(flm.long().tolist()):
        # Flipped landmark i sits on the pixel of original landmark FLIP_PERM_68[i].
        assert flipped[0, y, x] == FLIP_PERM_68[i] + 1


def test_flipping_a_symmetric_face_gives_the_same_face():
    # The re-indexing is semantically right: after the flip, landmark i is again where landmark i belongs.
    mean = symmetric_mean_shape_68()
    _, flipped = hflip(torch.zeros(1, 112, 112), mean, FLIP_PERM_68)
    assert torch.allclose(flipped, mean, atol=1e-4)
    _, unpermuted = hflip(torch.zeros(1, 112, 112), mean, None)
    assert not torch.allclose(unpermuted, mean, atol=1.0)


def test_crop_outside_image_is_zero_padded():
    img = torch.ones(3, 10, 10)
    out, _ = crop_resize(img, None, (-2, -3, 6, 6), 6)
    assert torch.equal(out[:, :2], torch.zeros(3, 2, 6)) and torch.equal(out[:, :, :3], torch.zeros(3, 6, 3))
    assert torch.equal(out[:, 2:, 3:], torch.ones(3, 4, 3))


def centroid(img: torch.Tensor) -> tuple[float, float]:
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    m = img.double().sum(dim=0)
    return float((m * xs).sum() / m.sum()), float((m * ys).sum() / m.sum())


@pytest.mark.parametrize("out_size", [40, 47, 60])
def test_upscaled_point_is_at_the_blob_centroid(out_size):
    # A single bright pixel upsampled bicubically is a symmetric blob (with signed lobes) centred where
    # the resampler puts the source pixel centre; its intensity centroid is that point.
    img = torch.zeros(1, 60, 60)
    img[0, 30, 25] = 1.0
    out, lm = crop_resize(img, torch.tensor([[25.0, 30.0]]), (22, 17, 20, 20), out_size)
    cx, cy = centroid(out)
    assert abs(cx - float(lm[0, 0])) < 0.05 and abs(cy - float(lm[0, 1])) < 0.05
    if out_size == 40:
        assert lm[0].tolist() == [16.5, 16.5]  # 2x: (25 - 17 + 0.5) * 2 - 0.5


@pytest.mark.parametrize("out_size", [40, 33])
def test_downscaled_gaussian_blob_centroid(out_size):
    ys, xs = torch.meshgrid(torch.arange(80.0), torch.arange(80.0), indexing="ij")
    cx, cy = 37.3, 41.6
    img = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 3.0**2))[None]
    out, lm = crop_resize(img, torch.tensor([[cx, cy]]), (0, 0, 80, 80), out_size)
    ox, oy = centroid(out)
    assert abs(ox - float(lm[0, 0])) < 0.05 and abs(oy - float(lm[0, 1])) < 0.05


@pytest.mark.parametrize("perm", [FLIP_PERM_68, FLIP_PERM_5])
def test_flip_twice_is_identity(perm):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 37, 53, generator=g)
    lm = torch.rand(perm.numel(), 2, generator=g) * torch.tensor([53.0, 37.0])
    img2, lm2 = hflip(*hflip(img, lm, perm), perm)
    assert torch.equal(img2, img)
    assert torch.allclose(lm2, lm, atol=1e-5)


def test_random_resized_crop_box_reproducible_and_valid():
    boxes = [
        random_resized_crop_box(100, 120, (0.4, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(s))
        for s in range(200)
    ]
    again = [
        random_resized_crop_box(100, 120, (0.4, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(s))
        for s in range(200)
    ]
    assert boxes == again
    assert len(set(boxes)) > 150
    for top, left, h, w in boxes:
        assert top >= 0 and top + h <= 100 and left >= 0 and left + w <= 120
        assert 0.38 <= h * w / 12000 <= 1.0
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_random_resized_crop_box_fallbacks_to_central_crop():
    g = torch.Generator().manual_seed(0)
    # An area above the image never fits: the whole (in-ratio) image.
    assert random_resized_crop_box(50, 50, (2.0, 3.0), (3 / 4, 4 / 3), g) == (0, 0, 50, 50)
    # Aspect range wider than the square image: full width, height cut to the minimum ratio.
    assert random_resized_crop_box(60, 60, (2.0, 3.0), (3.0, 4.0), g) == (20, 0, 20, 60)


def test_landmark_augment_carries_coded_pixels_when_not_resizing():
    img_pts = distinct_points(5, (30, 50), (30, 50), seed=3)
    img = coded_image(80, 80, img_pts, unit=0.125)  # codes stay inside [0, 1], which the augment clamps to
    aug = LandmarkAugment(size=64, scale=(0.64, 0.64), ratio=(1.0, 1.0), flip_p=1.0)
    out, lm = aug(img, img_pts, torch.Generator().manual_seed(0))  # crop 64x64 from 80x80: no resize
    for i, (x, y) in enumerate(lm.long().tolist()):
        assert out[0, y, x] == (FLIP_PERM_5[i] + 1) * 0.125
    assert int((out > 0).sum()) == 5
    with pytest.raises(ValueError, match="no known flip permutation"):
        aug(torch.zeros(1, 80, 80), torch.zeros(7, 2), torch.Generator().manual_seed(0))
