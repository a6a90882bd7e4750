"""Supervised finetuning: margin-head recognition loss, landmark regulariser, layer-decayed AdamW, one step.

The recogniser is a part fViT that places its own patches with a *trainable* landmark net; a frozen copy of
that net (as it came out of the landmark_net stage) anchors it early on: loss = CE(margin logits) +
w(epoch) * MSE(landmarks / 111, frozen landmarks / 111). Grid models (``dino_vit_*``) have no landmark net
and train on the margin loss alone. Schedules are precomputed per iteration (resume needs no state).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lafs.config import FinetuneParams
from lafs.engine.clipping import clip_gradients
from lafs.engine.loop import NonFiniteLossError
from lafs.engine.optim import param_groups, set_lr_wd
from lafs.engine.schedules import cosine_schedule
from lafs.engine.ssl import _fused, resolve_dtype
from lafs.losses import StepWeight, create_margin_head, landmark_regulariser
from lafs.losses.landmark_reg import OFFICIAL_SCHEDULE
from lafs.models import FaceViT

# The official regulariser steps are defined over the official 34 finetuning epochs.
OFFICIAL_EPOCHS = 34

__all__ = [
    "OFFICIAL_EPOCHS",
    "FinetuneTrainer",
    "NonFiniteLossError",
    "embed",
    "finetune_param_groups",
    "frozen_copy",
    "reg_weight_schedule",
]


def reg_weight_schedule(epochs: int, multiplier: float = 1.0) -> np.ndarray:
    """Per-epoch regulariser weight: the official steps (1000 / 100 / 1 / 0.11 / 0 from epochs 0 / 8 / 14 /
    21 / 28 of 34) stretched to ``epochs``; epoch e takes the official weight at the official epoch where
    it starts (floor(e * 34 / epochs)), so 34 epochs reproduce the official schedule exactly."""
    weight = StepWeight(OFFICIAL_SCHEDULE)
    return np.array([multiplier * weight(math.floor(e * OFFICIAL_EPOCHS / epochs)) for e in range(epochs)])


def frozen_copy(net: nn.Module) -> nn.Module:
    """An eval-mode copy without gradients: the regulariser's fixed reference."""
    frozen = copy.deepcopy(net).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def finetune_param_groups(model: FaceViT, head: nn.Module, cfg: FinetuneParams) -> list[dict[str, Any]]:
    """AdamW groups: the backbone's with layer-wise lr decay (``model.layer_id``, depth + 1 layers), the
    landmark net's decayed weights at ``landmark_weight_decay`` (official 'stn*' rule), the head at full lr.

    ``weight_decay_scale`` holds each group's absolute weight decay, so the step calls ``set_lr_wd(opt, lr,
    1.0)``: two decay values (backbone 0.1, landmark net 0.05) cannot be one schedule times a 0/1 scale.
    """
    depth = len(model.blocks)
    groups = param_groups(model, cfg.layer_decay, model.layer_id, depth + 1)
    landmark_ids = {id(p) for p in model.landmark_net.parameters()} if model.landmark_net is not None else set()
    out: list[dict[str, Any]] = []
    for group in groups:
        decay = group["weight_decay_scale"] > 0
        parts = {
            False: [p for p in group["params"] if id(p) not in landmark_ids],
            True: [p for p in group["params"] if id(p) in landmark_ids],
        }
        for is_landmark, params in parts.items():
            if not params:
                continue
            wd = (cfg.landmark_weight_decay if is_landmark else cfg.weight_decay) if decay else 0.0
            out.append(
                {
                    "params": params,
                    "lr_scale": group["lr_scale"],
                    "weight_decay_scale": wd,
                    "name": f"{'landmark_net' if is_landmark else 'backbone'}.{'decay' if decay else 'no_decay'}",
                }
            )
    out.append(
        {"params": list(head.parameters()), "lr_scale": 1.0, "weight_decay_scale": cfg.weight_decay, "name": "head"}
    )
    return out


@torch.no_grad()
def embed(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]], device: torch.device) -> torch.Tensor:
    """L2-normalised embeddings (N, D) of every image in ``batches`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    out = [F.normalize(model(images.to(device)).float(), dim=-1).cpu() for images, _ in batches]
    model.train(was_training)
    return torch.cat(out)


class FinetuneTrainer:
    """Margin head, frozen landmark reference, optimizer, schedules and the training step for a recogniser."""

    def __init__(
        self,
        model: FaceViT,
        num_classes: int,
        cfg: FinetuneParams,
        iters_per_epoch: int,
        reference: nn.Module | None = None,
    ) -> None:
        self.frozen_landmarks = model.landmark_net is not None and not cfg.train_landmark_net
        anchored = model.landmark_net is not None and cfg.train_landmark_net and cfg.reg_weight > 0
        if anchored and reference is None:
            raise ValueError("reg_weight > 0 needs the frozen reference landmark net (see frozen_copy)")
        if self.frozen_landmarks and model.landmark_net is not None:  # frozen_landmarks implies a landmark net
            model.landmark_net.requires_grad_(False)
        self.cfg, self.model = cfg, model
        self.device = next(model.parameters()).device
        self.head = create_margin_head(cfg.head, model.embedding_dim, num_classes, cfg.s, cfg.m).to(self.device)
        self.reference = reference if anchored else None
        self.iters_per_epoch = iters_per_epoch
        self.lr = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, iters_per_epoch, cfg.warmup_epochs)
        self.reg_weight = reg_weight_schedule(cfg.epochs, cfg.reg_weight)
        self.optimizer = torch.optim.AdamW(
            finetune_param_groups(model, self.head, cfg), lr=cfg.lr, **_fused(self.device)
        )
        self.autocast_dtype = torch.bfloat16 if resolve_dtype(cfg.dtype, self.device) == "bf16" else None
        self._params = nn.ModuleList([model, self.head])  # one module for per-parameter clipping
        # Under torchrun: averages the gradients over the ranks before clipping (distributed.average_gradients).
        self.grad_sync: Callable[[Iterator[nn.Parameter]], None] | None = None

    def autocast(self) -> AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, it: int) -> dict[str, float]:
        """One optimisation step at global iteration ``it``; raises NonFiniteLossError on NaN/inf."""
        epoch = it // self.iters_per_epoch
        lr, reg_w = float(self.lr[it]), float(self.reg_weight[epoch])
        set_lr_wd(self.optimizer, lr, 1.0)  # groups hold absolute weight decays (finetune_param_groups)
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        self.model.train()
        if self.frozen_landmarks and self.model.landmark_net is not None:
            self.model.landmark_net.eval()  # frozen means its batch-norm statistics too
        with self.autocast():
            if self.reference is not None:
                emb, landmarks = self.model.forward_with_landmarks(images)
                with torch.no_grad():
                    anchor = self.reference(images)
                reg = landmark_regulariser(landmarks, anchor, self.model.img_size)
            else:
                emb, reg = self.model(images), None
            logits = self.head(emb, labels)
            ce = F.cross_entropy(logits.float(), labels)
            loss = ce + reg_w * reg if reg is not None else ce
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at iteration {it} (epoch {epoch}); stopping")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self._params.parameters())
        clip_gradients(self._params, self.cfg.clip_grad)
        self.optimizer.step()
        with torch.no_grad():  # accuracy of the plain cosine classifier (no margin)
            acc = (self.head.cosine(emb.detach()).argmax(1) == labels).float().mean()
        metrics = {
            "loss": float(loss.detach()),
            "ce_loss": float(ce.detach()),
            "lr": lr,
            "reg_weight": reg_w,
            "train_acc": float(acc),
        }
        if reg is not None:
            metrics["reg_loss"] = float(reg.detach())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
