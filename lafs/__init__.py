"""LAFS: landmark-based self-supervised face recognition (CVPR 2024) as a reproducible pipeline.

``create_model`` / ``list_models`` are imported lazily: ``lafs <stage>`` (every DVC stage, ``local-params``)
should not pay for importing torch and timm unless the stage needs them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_model", "list_models"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lafs import models

        return getattr(models, name)
    raise AttributeError(f"module 'lafs' has no attribute {name!r}")
