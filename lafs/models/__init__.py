"""Models: landmark-patch / grid face ViTs, the landmark network, SSL heads, and their registry."""

from lafs.models import zoo as _zoo  # noqa: F401  (registers the named models)
from lafs.models.heads import DINOHead, PrototypeHead
from lafs.models.landmark_net import LandmarkNet
from lafs.models.registry import create_model, list_models, register_model
from lafs.models.vit import FaceViT

__all__ = ["DINOHead", "FaceViT", "LandmarkNet", "PrototypeHead", "create_model", "list_models", "register_model"]
