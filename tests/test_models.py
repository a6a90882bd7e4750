import pytest
import torch

import lafs
from lafs.models import DINOHead, FaceViT, PrototypeHead
from lafs.models.vit import num_params

FAST = [n for n in lafs.list_models() if not n.endswith("_base")]


def _forward(model: torch.nn.Module, name: str, batch: int = 2) -> torch.Tensor:
    x = torch.randn(batch, 3, 112, 112)
    if name.startswith("lafs_"):
        return model(x, torch.rand(batch, model.num_landmarks, 2) * 111)
    return model(x)


@pytest.mark.parametrize("name", lafs.list_models())
def test_every_registered_model_forward(name):
    kwargs = {"num_landmarks": 68} if name.startswith(("lafs_", "landmark_")) else {}
    model = lafs.create_model(name, **kwargs).eval()
    with torch.no_grad():
        out = _forward(model, name)
    if name.startswith("landmark_"):
        assert out.shape == (2, 68, 2)
    else:
        assert out.shape == (2, model.embed_dim)
    assert torch.isfinite(out).all()


def test_official_size_matches_the_paper():
    vit = lafs.create_model("dino_vit_base")
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, vit.blocks[0].attn.head_dim) == (
        768,
        12,
        11,
        64,
    )
    assert vit.blocks[0].mlp.fc1.out_features == 2048
    assert abs(num_params(vit) / 1e6 - 64.08) < 0.05  # 64.08M measured on the official class


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match="lafs_vit_tiny"):
        lafs.create_model("lafs_vit_huge")


def test_local_views_use_the_position_of_each_landmark_index():
    vit = lafs.create_model("lafs_vit_tiny", num_landmarks=10).eval()
    img = torch.rand(1, 3, 112, 112)
    pts = torch.rand(1, 10, 2) * 100
    idx = torch.tensor([[3, 3, 7]])
    tokens, pos = vit.tokenize(img, pts[:, idx[0]], idx)
    assert tokens.shape == (1, 3, 192)
    torch.testing.assert_close(pos[0], vit.pos_embed[0, 1:][idx[0]])


def test_grid_positions_are_interpolated_for_small_crops():
    vit = lafs.create_model("dino_vit_tiny").eval()
    assert vit(torch.rand(2, 3, 48, 48)).shape == (2, 192)


def test_landmark_net_inside_vit_places_patches():
    vit = lafs.create_model("lafs_vit_tiny", num_landmarks=68, landmark_net="landmark_net_mnv3_small").eval()
    emb, landmarks = vit.forward_with_landmarks(torch.rand(2, 3, 112, 112))
    assert emb.shape == (2, 192) and landmarks.shape == (2, 68, 2)


def test_landmark_net_refinement_starts_at_the_heatmap_points_and_learns():
    """Zero-initialised, the refinement step leaves the heatmap step's points as they are, and a loss on the refined
    points reaches its weights and biases (through the sampled features), so training can move them."""
    net = lafs.create_model("landmark_net_mnv3_small", num_landmarks=68).eval()
    x = torch.rand(2, 3, 112, 112)
    coarse, refined = net.stages(x)
    assert torch.equal(coarse, refined) and torch.equal(net(x), refined)
    refined.square().mean().backward()
    assert net.refine_weight[0].grad.abs().sum() > 0 and net.refine_bias[0].grad.abs().sum() > 0


def test_model_without_landmarks_refuses_clearly():
    vit = lafs.create_model("lafs_vit_tiny", num_landmarks=68)
    with pytest.raises(ValueError, match="needs landmarks"):
        vit(torch.rand(1, 3, 112, 112))


def test_dino_head_norm_last_layer():
    head = DINOHead(32, out_dim=50, hidden_dim=16, bottleneck_dim=8)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    out = head(torch.randn(4, 32))
    # rows of the effective weight are unit vectors, so |logit| <= 1 for the L2-normalised bottleneck
    assert out.shape == (4, 50) and out.abs().max() <= 1 + 1e-5
    assert DINOHead(32, 50, 16, 8, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_prototype_head_outputs_cosines():
    head = PrototypeHead(32, num_prototypes=20, hidden_dim=16, bottleneck_dim=8)
    out = head(torch.randn(4, 32))
    assert out.shape == (4, 20) and out.abs().max() <= 1 + 1e-5


def test_facevit_rejects_bad_config():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        FaceViT(img_size=100, patch_size=8)


def test_tokens_embedding_projects_every_landmark_token_and_keeps_ssl_on_the_cls_token():
    torch.manual_seed(0)
    model = lafs.create_model("lafs_vit_mini", num_landmarks=68, embedding="tokens", embedding_dim=32).eval()
    x, lm = torch.randn(3, 3, 112, 112), torch.rand(3, 68, 2) * 111
    with torch.no_grad():
        emb = model(x, lm)
        tokens, pos = model.tokenize(x, lm)
        cls = model.encode(tokens, pos)
        expected = model.embedding_head(model.features(tokens, pos)[:, 1:])
    assert emb.shape == (3, 32) and model.embedding_dim == 32
    assert torch.equal(emb, expected)
    assert cls.shape == (3, model.embed_dim)  # what DINO / ProS train, whatever the embedding
    # The projection is position-aware: moving one landmark's patch changes the embedding.
    moved = lm.clone()
    moved[:, 30] += 6.0
    with torch.no_grad():
        assert not torch.allclose(model(x, moved), emb)
    # A landmark subset (an SSL local view) has no place in the flattened projection.
    with pytest.raises(ValueError, match="projects all 68 tokens"):
        model(x, lm[:, :24], torch.arange(24))


def test_cls_embedding_refuses_another_width():
    with pytest.raises(ValueError, match="embedding_dim 64 needs embedding='tokens'"):
        FaceViT(num_landmarks=4, embed_dim=32, depth=1, num_heads=1, head_dim=32, mlp_dim=64, embedding_dim=64)
    with pytest.raises(ValueError, match="embedding must be"):
        FaceViT(num_landmarks=4, embed_dim=32, depth=1, num_heads=1, head_dim=32, mlp_dim=64, embedding="mean")
