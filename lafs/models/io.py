"""Model files: ``{"model": registry name, "kwargs": constructor kwargs, "state_dict": ..., **extra}``.

One format for every network a stage hands to another (landmark net, pretrained teacher backbone,
finetuned recogniser), so any of them can be rebuilt by name and loaded with ``weights_only=True``.
A nested model (the finetuned part fViT owns its landmark net) is described by ``kwargs`` holding the
nested model's registry name, e.g. ``{"num_landmarks": 68, "landmark_net": "landmark_net_mnv3_small"}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lafs.models.registry import create_model
from lafs.tensor_files import load_checkpoint, save_checkpoint


class ModelFileError(RuntimeError):
    """A model file is missing or is not in the ``{"model", "kwargs", "state_dict"}`` format."""


def save_model(module: nn.Module, name: str, kwargs: dict[str, Any], path: str | Path, **extra: Any) -> Path:
    """Atomically write ``module``'s weights with what rebuilds it (``extra``: config, metrics, ...)."""
    state = {
        "model": name,
        "kwargs": dict(kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        **extra,
    }
    return save_checkpoint(state, path)


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The raw dict of a model file (safe load), checked for the keys that rebuild the model."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} not found: run the stage that writes it first")
    state = load_checkpoint(path, map_location="cpu")
    missing = [k for k in ("model", "kwargs", "state_dict") if k not in state]
    if missing:
        raise ModelFileError(
            f"{path} is not a model file (missing {missing}); expected one written by lafs.models.io.save_model"
        )
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu", eval_mode: bool = True) -> nn.Module:
    """Rebuild the registered model named in ``path`` and load its weights (strict)."""
    state = read_model_file(path)
    module = create_model(state["model"], **state["kwargs"])
    module.load_state_dict(state["state_dict"])
    module = module.to(device)
    return module.eval() if eval_mode else module
