import torch

from lafs.models.patches import grid_points, patchify, sample_patches


def test_patch_at_integer_landmark_is_exact_pixels():
    img = torch.arange(3 * 20 * 24, dtype=torch.float32).reshape(1, 3, 20, 24)
    x, y = 9, 7
    tokens = sample_patches(img, torch.tensor([[[x, y]]], dtype=torch.float32), patch_size=8)
    patch = tokens.reshape(8, 8, 3).permute(2, 0, 1)  # (p1 p2 c) -> (c, p1, p2)
    expected = img[0, :, y - 4 : y + 4, x - 4 : x + 4]
    assert torch.equal(patch, expected)


def test_vectorised_sampling_matches_per_landmark_and_off_image_is_zero():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 112, 112, generator=g)
    pts = torch.rand(2, 5, 2, generator=g) * 111
    pts[0, 0] = torch.tensor([-30.0, -30.0])  # fully outside: zeros padding
    tokens = sample_patches(img, pts)
    for i in range(5):
        single = sample_patches(img, pts[:, i : i + 1])
        torch.testing.assert_close(tokens[:, i : i + 1], single)
    assert torch.count_nonzero(tokens[0, 0]) == 0


def test_sampling_on_grid_equals_patchify():
    img = torch.rand(2, 3, 112, 112)
    pts = grid_points(112, 112, 8).expand(2, -1, -1)
    torch.testing.assert_close(sample_patches(img, pts), patchify(img, 8))
    assert patchify(torch.rand(1, 3, 48, 48)).shape == (1, 36, 192)


def test_sampling_is_differentiable_in_points():
    img = torch.rand(1, 3, 32, 32)
    pts = torch.tensor([[[10.3, 12.7]]], requires_grad=True)
    sample_patches(img, pts).sum().backward()
    assert pts.grad is not None and torch.isfinite(pts.grad).all()
