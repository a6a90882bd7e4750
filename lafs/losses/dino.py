"""DINO self-distillation loss.

L = mean over pairs (t in teacher globals, s in student views, s != t) of
    -sum_k softmax((z_t - c) / tau_t)_k * log_softmax(z_s / tau_s)_k,
with the centre c an EMA of the teacher's batch-mean logits (all-reduced under DDP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def cross_view_cross_entropy(student_logp: torch.Tensor, teacher_p: torch.Tensor) -> torch.Tensor:
    """Mean CE over every (teacher view t, student view v) pair with v != t.

    student_logp: (V, B, D) log-probabilities; teacher_p: (T, B, D) probabilities, where teacher view t
    is the same image crop as student view t (the global views come first).
    """
    num_t, batch = teacher_p.shape[0], teacher_p.shape[1]
    ce = -torch.einsum("tbd,vbd->tv", teacher_p, student_logp) / batch  # (T, V) pair losses
    keep = torch.ones_like(ce, dtype=torch.bool)
    diag = torch.arange(min(num_t, student_logp.shape[0]), device=ce.device)
    keep[diag, diag] = False
    return ce[keep].mean()


class DINOLoss(nn.Module):
    center: torch.Tensor  # registered buffer

    def __init__(
        self,
        out_dim: int,
        num_views: int,
        num_teacher_views: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.num_views = num_views
        self.num_teacher_views = num_teacher_views
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((teacher_out - self.center) / teacher_temp, dim=-1)

    def distill(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-view CE and the student's log-probabilities (V, B, D); the centre is not updated."""
        with torch.autocast(student_out.device.type, enabled=False):  # softmax / CE stay in fp32
            return self._distill(student_out, teacher_out, teacher_temp)

    def _distill(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        student_logp = student_logp.reshape(self.num_views, -1, student_logp.shape[-1])
        teacher_p = self.teacher_probs(teacher_out.float(), teacher_temp).detach()
        teacher_p = teacher_p.reshape(self.num_teacher_views, -1, teacher_p.shape[-1])
        return cross_view_cross_entropy(student_logp, teacher_p), student_logp

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """student_out: (V*B, D) view-major; teacher_out: (T*B, D). Updates the centre after use."""
        loss, _ = self.distill(student_out, teacher_out, teacher_temp)
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
