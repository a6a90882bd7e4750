"""Face ViT whose tokens are patches at facial landmarks (part fViT) or on a regular grid (fViT).

One class serves LAFS (``tokenizer="landmark"``) and the DINO-face baseline (``tokenizer="grid"``), so
the two methods differ only in where patches come from. Transformer blocks are timm's.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.layers.weight_init import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from lafs.conventions import ALIGNED_SIZE
from lafs.models.patches import patchify, sample_patches

Tokenizer = Literal["landmark", "grid"]
Embedding = Literal["cls", "tokens"]


@cache
def _attention_class(head_dim: int) -> type[Attention]:
    """timm Attention with a fixed head width: the official 11 heads x 64 (704) do not divide 768."""

    def __init__(self: Attention, dim: int, **kwargs: Any) -> None:
        Attention.__init__(self, dim, attn_head_dim=head_dim, **kwargs)

    return type(f"Attention{head_dim}", (Attention,), {"__init__": __init__})


class FaceViT(nn.Module):
    """ViT on 112x112 aligned faces.

    landmark tokenizer: one P x P patch per landmark, with a learned position embedding per landmark
    *index* (slot i means "landmark i", so a random subset of landmarks keeps its identities).
    grid tokenizer: ordinary patchify; the position grid is interpolated for smaller crops (DINO).

    The recognition embedding (``forward``) is the normalised cls token (``embedding="cls"``, the official
    part fViT) or a projection of *every* output token, flattened in position order (``"tokens"``: Dropout ->
    Linear(N * D -> embedding_dim) -> BatchNorm, insightface's flatten-FC-BN output layer). With landmark
    tokens, slot i is always landmark i, so the flattened projection keeps which facial part said what; pooled
    into one cls token that is lost, and small ViTs trained from scratch on LFW-sized data did not learn at
    all that way (benchmarks/RESULTS.md, "Recogniser head"). Self-supervised pretraining always trains the cls
    token (``encode``), whatever the embedding.
    """

    def __init__(
        self,
        *,
        tokenizer: Tokenizer = "landmark",
        num_landmarks: int = 196,
        img_size: int = ALIGNED_SIZE,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 11,
        head_dim: int = 64,
        mlp_dim: int = 2048,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        padding_mode: str = "zeros",
        landmark_net: nn.Module | None = None,
        embedding: Embedding = "cls",
        embedding_dim: int | None = None,
        embedding_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if tokenizer not in ("landmark", "grid"):
            raise ValueError(f"tokenizer must be 'landmark' or 'grid', got {tokenizer!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if landmark_net is not None and tokenizer != "landmark":
            raise ValueError("a landmark network only makes sense with tokenizer='landmark'")
        if embedding not in ("cls", "tokens"):
            raise ValueError(f"embedding must be 'cls' or 'tokens', got {embedding!r}")
        if embedding == "cls" and embedding_dim not in (None, embed_dim):
            raise ValueError(
                f"embedding='cls' returns the {embed_dim}-d cls token; embedding_dim {embedding_dim} "
                "needs embedding='tokens'"
            )
        self.tokenizer = tokenizer
        self.img_size = img_size
        self.patch_size = patch_size
        self.padding_mode = padding_mode
        self.grid_size = img_size // patch_size
        self.num_positions = num_landmarks if tokenizer == "landmark" else self.grid_size**2
        self.num_landmarks = num_landmarks if tokenizer == "landmark" else 0
        self.embed_dim = self.num_features = embed_dim
        self.patch_dim = patch_size * patch_size * in_chans

        self.patch_embed = nn.Linear(self.patch_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_positions + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        attn = _attention_class(head_dim)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_dim / embed_dim,
                    qkv_bias=qkv_bias,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    attn_layer=attn,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.embedding = embedding
        self.embedding_dim = embedding_dim or embed_dim
        self.embedding_head = (
            None
            if embedding == "cls"
            else nn.Sequential(
                nn.Flatten(),
                nn.Dropout(embedding_dropout),
                nn.Linear(self.num_positions * embed_dim, self.embedding_dim),
                nn.BatchNorm1d(self.embedding_dim),
            )
        )
        self.landmark_net = landmark_net
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("landmark_net"):
                continue
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- tokenisation -------------------------------------------------------------------------------
    def landmark_positions(self, index: torch.Tensor) -> torch.Tensor:
        """Position embeddings for landmark indices (N,) or (B, N) -> (1 or B, N, D)."""
        table = self.pos_embed[0, 1:]
        pos = table[index]
        return pos.unsqueeze(0) if index.ndim == 1 else pos

    def grid_positions(self, height: int, width: int) -> torch.Tensor:
        """Grid position embeddings, bicubically resized for crops other than img_size (as DINO does)."""
        gh, gw = height // self.patch_size, width // self.patch_size
        table = self.pos_embed[:, 1:]
        if (gh, gw) == (self.grid_size, self.grid_size):
            return table
        grid = table.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)

    def positions(self, index: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """Position embeddings of a token set: by landmark index, or by grid for an image ``size``."""
        if self.tokenizer == "grid":
            return self.grid_positions(*size)
        if index is None:
            index = torch.arange(self.num_landmarks, device=self.pos_embed.device)
        return self.landmark_positions(index)

    def tokenize(
        self,
        images: torch.Tensor,
        landmarks: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw patch tokens (B, N, P*P*C) and their position embeddings (1|B, N, D).

        landmarks: (B, N, 2) pixel (x, y); ``index`` says which landmark each point is (default
        0..N-1). Without landmarks, the model's own landmark network predicts them.
        """
        if self.tokenizer == "grid":
            return patchify(images, self.patch_size), self.grid_positions(*images.shape[-2:])
        if landmarks is None:
            if self.landmark_net is None:
                raise ValueError("landmark tokenizer needs landmarks (or a model built with a landmark_net)")
            landmarks = self.landmark_net(images)
        if index is None and landmarks.shape[1] != self.num_landmarks:
            raise ValueError(
                f"got {landmarks.shape[1]} landmarks, model expects {self.num_landmarks}; pass `index` for a subset"
            )
        tokens = sample_patches(images, landmarks, self.patch_size, self.padding_mode)
        return tokens, self.positions(index, cast(tuple[int, int], images.shape[-2:]))  # torch.Size (H, W)

    # -- encoding -----------------------------------------------------------------------------------
    def features(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Transformer over [cls, tokens]; returns the normalised output sequence (B, 1 + N, D)."""
        x = self.patch_embed(tokens) + pos
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat((cls, x), dim=1))
        out: torch.Tensor = self.norm(self.blocks(x))
        return out

    def encode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The normalised cls embedding (B, D) of any token set (a landmark subset too): what SSL trains."""
        return self.features(tokens, pos)[:, 0]

    def forward(
        self,
        images: torch.Tensor,
        landmarks: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The recognition embedding (B, embedding_dim); ``embedding="tokens"`` needs the full token set."""
        tokens, pos = self.tokenize(images, landmarks, index)
        if self.embedding_head is None:
            return self.encode(tokens, pos)
        if tokens.shape[1] != self.num_positions:
            raise ValueError(f"embedding='tokens' projects all {self.num_positions} tokens, got {tokens.shape[1]}")
        emb: torch.Tensor = self.embedding_head(self.features(tokens, pos)[:, 1:])
        return emb

    def forward_with_landmarks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and the landmarks the model's own landmark network placed (for the regulariser)."""
        if self.landmark_net is None:
            raise ValueError("forward_with_landmarks needs a model built with a landmark_net")
        landmarks = self.landmark_net(images)
        return self.forward(images, landmarks), landmarks

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def layer_id(self, name: str) -> int:
        """Depth index for layer-wise LR decay: 0 = embeddings, i+1 = block i, depth+1 = final norm."""
        if name.startswith(("cls_token", "pos_embed", "patch_embed", "landmark_net")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1  # final norm and embedding head


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["FaceViT", "num_params"]
