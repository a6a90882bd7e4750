"""Preemption: SIGTERM (a preemptible cluster or ``kubectl delete``) becomes a checkpoint and a clean exit.

Training loops check the flag between steps, write ``last.pt`` and raise :class:`Preempted`; the CLI exits with
143 (128 + SIGTERM, as a shell reports it), and rerunning the same command resumes.
"""

from __future__ import annotations

import signal
from typing import Any

from lafs.errors import StageError


class Preempted(StageError):
    """SIGTERM arrived: a checkpoint was written; rerun the same command to resume."""

    exit_code = 143


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (a checkpoint, then a clean exit)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> SigtermFlag:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)
