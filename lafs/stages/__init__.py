"""Pipeline stages: one ``run(cfg, out_dir) -> summary`` function per module, called by the ``lafs`` CLI,
the same-named ``dvc.yaml`` stage and the Prefect task alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lafs.errors import StageError

__all__ = ["StageError", "write_metrics"]


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """A stage's DVC metrics file (``dvc metrics show`` reads it), replaced atomically."""
    from lafs.atomic import write_text

    write_text(path, json.dumps(metrics, indent=2) + "\n")
