"""Losses: DINO, ProS, additive-margin heads (ArcFace / CosFace), landmark regulariser."""

from lafs.losses.dino import DINOLoss
from lafs.losses.landmark_reg import StepWeight, landmark_regulariser
from lafs.losses.margins import ArcFace, CosFace, create_margin_head
from lafs.losses.pros import ProSLoss

__all__ = ["ArcFace", "CosFace", "DINOLoss", "ProSLoss", "StepWeight", "create_margin_head", "landmark_regulariser"]
