"""LAFS: landmark-based self-supervised face recognition (CVPR 2024) as a reproducible pipeline."""

from lafs.models import create_model, list_models

__all__ = ["create_model", "list_models"]
__version__ = "0.1.0"
