"""Pipeline stages, one module per ``dvc.yaml`` stage, all with the same entry point::

    run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> Summary

``params`` is the whole validated params.yaml (a stage reads its own section and the ones it shares: tune the
finetune section, evaluate and register the landmarks detector); ``layout`` names every file below the
project root (:mod:`lafs.layout`, checked against ``dvc.yaml``); ``options`` says how to run, not what. The
summary's ``describe()`` is the CLI's one line and the stage writes ``layout.metrics(<stage>)``. Expected
failures raise :class:`StageError` with what to do. The ``lafs`` CLI, ``dvc repro`` (through the CLI) and the
Prefect flows (through DVC) all reach this one function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lafs.errors import StageError

__all__ = ["RunOptions", "StageError", "Summary", "write_metrics"]


@dataclass(frozen=True)
class RunOptions:
    """How a stage runs (never what it computes, so not a param DVC tracks)."""

    # A checkpoint written with other params or inputs is set aside (kept as *.previous.pt) instead of refused;
    # dvc.yaml passes it, since there a params change means a new run. Stages without checkpoints ignore it.
    restart_on_change: bool = False


class Summary(Protocol):
    def describe(self) -> str: ...


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """A stage's DVC metrics file (``dvc metrics show`` reads it), replaced atomically."""
    from lafs.atomic import write_text

    write_text(path, json.dumps(metrics, indent=2) + "\n")
