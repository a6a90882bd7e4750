"""The error every layer may raise when it refuses its input with an actionable message (the CLI prints it without
a traceback and exits 1). It lives at the bottom of the package so the engine and the registry need not import the
stages above them."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage finished its checks and refuses to pass its output on; the message says why and what to do.

    The CLI prints it without a traceback and exits 1, so DVC does not record the stage as done.
    """
