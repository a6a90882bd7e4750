"""Pipeline stages: one ``run(cfg, out_dir) -> summary`` function per module, called by the ``lafs`` CLI,
the same-named ``dvc.yaml`` stage and the Prefect task alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class StageError(RuntimeError):
    """A stage finished its checks and refuses to pass its output on; the message says why and what to do.

    The CLI prints it without a traceback and exits 1, so DVC does not record the stage as done.
    """


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """A stage's DVC metrics file (``dvc metrics show`` reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
