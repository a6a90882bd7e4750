"""ProS prototype-matching loss (Prototype-based Self-Distillation, WACV 2024).

Student and teacher features are compared with the same set of learnable prototypes (cosine
similarities, see ``PrototypeHead``); the student's similarity distribution over the prototypes is
aligned with the teacher's sharpened, centred one:
    L = CE_cross_view(softmax((s_t - c)/tau_t), log_softmax(s_s/tau_s)) + lambda * KL(mean_b p_s || uniform)
The mean-entropy term spreads the batch over prototypes, the usual guard against prototype collapse.
"""

from __future__ import annotations

import torch

from lafs.losses.dino import DINOLoss


class ProSLoss(DINOLoss):
    def __init__(
        self,
        num_prototypes: int,
        num_views: int,
        num_teacher_views: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        me_max_weight: float = 1.0,
    ) -> None:
        super().__init__(num_prototypes, num_views, num_teacher_views, student_temp, center_momentum)
        self.me_max_weight = me_max_weight

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        loss, student_logp = self.distill(student_out, teacher_out, teacher_temp)
        if self.me_max_weight:
            mean_p = student_logp.exp().mean(dim=(0, 1))
            # KL(mean_p || uniform) = log M - H(mean_p) >= 0: the mean-entropy term, offset to stay >= 0
            kl_uniform = (mean_p * torch.log(mean_p * mean_p.numel() + 1e-12)).sum()
            loss = loss + self.me_max_weight * kl_uniform
        self.update_center(teacher_out)
        return loss
