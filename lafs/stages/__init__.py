"""Pipeline stages: one ``run(cfg, out_dir) -> summary`` function per module, called by the ``lafs`` CLI,
the same-named ``dvc.yaml`` stage and the Prefect task alike."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage finished its checks and refuses to pass its output on; the message says why and what to do.

    The CLI prints it without a traceback and exits 1, so DVC does not record the stage as done.
    """
