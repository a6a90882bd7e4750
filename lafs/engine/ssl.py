"""Self-supervised pretraining task (LAFS, DINO-face, ProS) and its training step.

One forward builds every view's tokens, runs the student on all views and the EMA teacher on the
global views, and returns the self-distillation loss. Views that share a token count run as one
backbone call (DINO's MultiCropWrapper idea), so a step is 2 student + 1 teacher backbone calls.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import torch
from torch import nn

from lafs.config import SSLParams
from lafs.data.views import jitter_landmarks, random_landmark_subset
from lafs.engine.clipping import cancel_last_layer_gradients, clip_gradients
from lafs.engine.distributed import all_true
from lafs.engine.ema import ema_update
from lafs.engine.loop import NonFiniteLossError
from lafs.engine.optim import param_groups, set_lr_wd
from lafs.engine.schedules import cosine_schedule, teacher_temp_schedule
from lafs.losses import DINOLoss, ProSLoss
from lafs.models import DINOHead, FaceViT, PrototypeHead, create_model
from lafs.models.patches import patchify, sample_patches


@dataclass
class ViewGroup:
    """Views sharing one token count: raw patches (N, T, P*P*C) and what positions they occupy."""

    tokens: torch.Tensor
    index: torch.Tensor | None  # landmark indices (N, T) / (T,); None = all landmarks or the full grid
    size: tuple[int, int]


class MultiViewNet(nn.Module):
    """Backbone + head over view groups: one backbone call per group, one head call for all."""

    def __init__(self, backbone: FaceViT, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, groups: list[ViewGroup]) -> torch.Tensor:
        feats = [self.backbone.encode(g.tokens, self.backbone.positions(g.index, g.size)) for g in groups]
        logits: torch.Tensor = self.head(torch.cat(feats))
        return logits


def _view_major(x: torch.Tensor) -> torch.Tensor:
    """(B, V, ...) -> (V*B, ...) so each view's batch is a contiguous chunk (the loss's layout)."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


class SSLTask(nn.Module):
    def __init__(self, cfg: SSLParams, student: MultiViewNet, landmark_net: nn.Module | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()  # the official teacher ran with dropout / drop-path on; ours is deterministic
        self.landmark_net = landmark_net
        if landmark_net is not None:
            for p in landmark_net.parameters():
                p.requires_grad_(False)
            landmark_net.eval()
        num_views = cfg.global_crops + cfg.local_crops
        loss_cls = ProSLoss if cfg.method == "pros" else DINOLoss
        out_dim = cfg.num_prototypes if cfg.method == "pros" else cfg.out_dim
        self.loss = loss_cls(out_dim, num_views, cfg.global_crops, cfg.student_temp, cfg.center_momentum)

    def train(self, mode: bool = True) -> SSLTask:
        super().train(mode)
        self.teacher.eval()
        if self.landmark_net is not None:
            self.landmark_net.eval()
        return self

    def view_groups(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[list[ViewGroup], list[ViewGroup]]:
        """(student groups, teacher groups) for a batch from LAFSViews / DINOFaceViews."""
        cfg = self.cfg
        if cfg.method == "dino_face" or "global" in batch:
            glob, local = _view_major(batch["global"]), _view_major(batch["local"])
            patch = self.student.backbone.patch_size
            student = [ViewGroup(patchify(glob, patch), None, (glob.shape[-2], glob.shape[-1]))]
            if local.shape[0]:
                student.append(ViewGroup(patchify(local, patch), None, (local.shape[-2], local.shape[-1])))
            return student, student[:1]
        aug = _view_major(batch["augmented"])
        size = (aug.shape[-2], aug.shape[-1])
        with torch.no_grad():
            if self.landmark_net is not None:  # landmarks from the clean crop, pixels from the augmented one
                landmarks = self.landmark_net(_view_major(batch["clean"])).float()
            else:
                landmarks = _view_major(batch["landmarks"]).float()
            landmarks = jitter_landmarks(landmarks, cfg.landmark_jitter_px, generator)
        n_glob = cfg.global_crops * batch["augmented"].shape[0]
        padding = self.student.backbone.padding_mode
        patch = self.student.backbone.patch_size
        glob_views = ViewGroup(sample_patches(aug[:n_glob], landmarks[:n_glob], patch, padding), None, size)
        student = [glob_views]
        if n_glob < aug.shape[0]:
            n_loc, k = aug.shape[0] - n_glob, landmarks.shape[1]
            idx = random_landmark_subset(n_loc, k, cfg.local_landmarks, aug.device, generator)
            pts = torch.gather(landmarks[n_glob:], 1, idx[..., None].expand(-1, -1, 2))
            student.append(ViewGroup(sample_patches(aug[n_glob:], pts, patch, padding), idx, size))
        return student, [glob_views]

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        teacher_temp: float,
        generator: torch.Generator | None = None,
        student: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and teacher health stats (entropy and std of the teacher outputs: collapse shows as a
        flat entropy / vanishing std). ``student`` may be the DDP-wrapped student."""
        student_groups, teacher_groups = self.view_groups(batch, generator)
        with torch.no_grad():
            teacher_out = self.teacher(teacher_groups)
        student_out = (student or self.student)(student_groups)
        loss = self.loss(student_out, teacher_out, teacher_temp)
        with torch.no_grad():
            probs = self.loss.teacher_probs(teacher_out.float(), teacher_temp)
            entropy = -(probs * torch.log(probs + 1e-12)).sum(-1).mean()
        return loss, {"teacher_entropy": float(entropy), "teacher_std": float(teacher_out.float().std(0).mean())}


def backbone_kwargs(cfg: SSLParams) -> dict[str, Any]:
    """Constructor kwargs of the backbone (saved with the teacher so finetuning rebuilds the same model)."""
    kwargs: dict[str, Any] = {"drop_path_rate": cfg.drop_path_rate}
    if cfg.method != "dino_face":
        kwargs |= {"num_landmarks": cfg.num_landmarks, "padding_mode": cfg.patch_padding}
    return kwargs


def build_ssl_task(cfg: SSLParams, landmark_net: nn.Module | None = None) -> SSLTask:
    """Student/teacher for ``cfg.method``; LAFS without ``landmark_net`` reads landmarks from the batch."""
    # cfg.model names a lafs_vit_* / dino_vit_* entry point, which builds a FaceViT.
    backbone = cast(FaceViT, create_model(cfg.model, **backbone_kwargs(cfg)))
    if cfg.method == "pros":
        head: nn.Module = PrototypeHead(
            backbone.embed_dim, cfg.num_prototypes, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers
        )
    else:
        head = DINOHead(
            backbone.embed_dim,
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            cfg.head_layers,
            norm_last_layer=cfg.norm_last_layer,
        )
    return SSLTask(cfg, MultiViewNet(backbone, head), landmark_net)


class SSLTrainer:
    """Optimizer, schedules and the training step for an :class:`SSLTask` (DDP-ready: pass the wrapped
    student as ``student_ddp``; the EMA and clipping act on the unwrapped module)."""

    def __init__(
        self, task: SSLTask, iters_per_epoch: int, world_batch: int | None = None, student_ddp: nn.Module | None = None
    ) -> None:
        cfg = task.cfg
        self.task, self.cfg = task, cfg
        self.student_call = student_ddp or task.student
        self.iters_per_epoch = iters_per_epoch
        world_batch = world_batch or cfg.batch_size
        base_lr = cfg.lr * world_batch / 256.0  # linear scaling rule (DINO / LAFS)
        self.lr = cosine_schedule(base_lr, cfg.min_lr, cfg.epochs, iters_per_epoch, cfg.warmup_epochs)
        self.wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, iters_per_epoch)
        self.momentum = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, iters_per_epoch)
        self.teacher_temp = teacher_temp_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, cfg.epochs
        )
        device = next(task.student.parameters()).device
        self.device = device
        self.optimizer = torch.optim.AdamW(param_groups(task.student), lr=base_lr, **_fused(device))
        self.autocast_dtype = torch.bfloat16 if resolve_dtype(cfg.dtype, device) == "bf16" else None

    def autocast(self) -> AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(
        self, batch: dict[str, torch.Tensor], it: int, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        """One optimisation step at global iteration ``it``; raises NonFiniteLossError on NaN/inf."""
        task, cfg = self.task, self.cfg
        epoch = it // self.iters_per_epoch
        set_lr_wd(self.optimizer, float(self.lr[it]), float(self.wd[it]))
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast():
            temp = float(self.teacher_temp[epoch])
            loss, stats = task(batch, temp, generator, student=self.student_call)
        if not all_true(bool(torch.isfinite(loss)), self.device):  # every rank stops, none hangs in backward
            raise NonFiniteLossError(f"loss is {loss.item()} at iteration {it} (epoch {epoch}); stopping")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(task.student, cfg.clip_grad)
        cancel_last_layer_gradients(task.student.head, epoch, cfg.freeze_last_layer)
        self.optimizer.step()
        momentum = float(self.momentum[it])
        ema_update(task.teacher, task.student, momentum)
        return {
            "loss": float(loss.detach()),
            "lr": float(self.lr[it]),
            "wd": float(self.wd[it]),
            "momentum": momentum,
            "teacher_temp": temp,
            **stats,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.task.student.state_dict(),
            "teacher": self.task.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.task.loss.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task.student.load_state_dict(state["student"])
        self.task.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.task.loss.load_state_dict(state["loss"])


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """||after - before|| / ||before|| over the floating-point tensors of two state dicts: how far training moved
    a network from its initialisation (a teacher that barely moved learned nothing, whatever its loss says)."""
    diff = base = 0.0
    for name, w0 in before.items():
        if w0.is_floating_point():
            diff += float((after[name].float() - w0.float()).pow(2).sum())
            base += float(w0.float().pow(2).sum())
    return (diff / base) ** 0.5 if base else 0.0


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> 'bf16' only where bf16 matmul is native; emulated bf16 on AVX2 CPUs is ~100x slower."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"


class _FusedKwargs(TypedDict, total=False):  # typed so that ``**`` into AdamW type-checks
    fused: bool


def _fused(device: torch.device) -> _FusedKwargs:
    # fused AdamW: one kernel over all parameters (CPU support since torch 2.4, CUDA long before).
    return {"fused": True} if device.type in ("cpu", "cuda") else {}
