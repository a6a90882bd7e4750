"""Checkpoints: atomic writes and safe loads.

Saved state holds only tensors and plain containers, so loading with ``weights_only=True`` works and a
checkpoint carrying a pickled arbitrary object is refused instead of executing code.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch

from lafs.errors import StageError
from lafs.tensor_files import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["ChangedCheckpointError", "CheckpointError", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)


class ChangedCheckpointError(StageError):
    """``last.pt`` belongs to a run with other params or inputs; the CLI prints the message, no traceback."""


def resume_state(
    last: Path,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    *,
    stage: str,
    input_names: str,
    restart_on_change: bool,
    map_location: str | torch.device = "cpu",
    set_aside: bool = True,
    before_set_aside: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """The ``last`` checkpoint to resume from, or None to start over (no checkpoint, or one set aside).

    Resuming a checkpoint written with other params (``config``, the resolved section) or other input files
    (``inputs``, their sha256) would silently splice two different runs into one model, so a changed
    fingerprint is refused, naming the ``stage`` params and the ``input_names`` it covers. With
    ``restart_on_change`` the old checkpoint is moved to ``<name>.previous.pt`` rather than deleted: the
    change may have been a mistake, and that run can be resumed again by moving it back.

    Under DDP every rank calls this and reaches the same decision (same file, same fingerprint); only the
    rank with ``set_aside`` moves the file, after ``before_set_aside`` (a barrier, so no rank is still
    reading it).
    """
    if not last.exists():
        return None
    state = load_checkpoint(last, map_location=map_location)
    if (state.get("config"), state.get("inputs")) == (config, inputs):
        return state
    changed = [f"params {k} {was!r} -> {now!r}" for k, was, now in _differences(state.get("config") or {}, config)]
    changed += [f"input {k}" for k, _, _ in _differences(state.get("inputs") or {}, inputs)]  # digests say nothing
    if not restart_on_change:
        raise ChangedCheckpointError(
            f"{last} was written with different {stage} params or inputs ({input_names}): {', '.join(changed)}; "
            "restore them to resume, or pass --restart-on-change to set it aside and start over"
        )
    if before_set_aside is not None:
        before_set_aside()
    if set_aside:
        aside = last.with_suffix(".previous.pt")
        last.replace(aside)
        log.warning("%s %s changed: %s moved to %s; starting over", stage, ", ".join(changed), last, aside)
    return None


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose value differs: what made a checkpoint stale."""
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors / plain data (loadable with weights_only=True)."""
    # The legacy tuple, get_state()'s runtime default; numpy's stub types the no-argument call as the dict form.
    np_state = cast(tuple[str, npt.NDArray[np.uint32], int, int, float], np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": list(_flatten_python_state(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten_python_state(s: tuple[Any, ...]) -> tuple[Any, ...]:
    version, internal, gauss = s
    return version, list(internal), gauss
