"""The command-line ending every ``python -m flows.<name>`` shares: run the flow, print, map to an exit code.

``make pipeline`` and cron read the exit code, and the failed stage's own output (streamed above) already
explains what went wrong, so an expected failure ends as one ``error:`` line and exit 1, not a traceback.
Anything else (a bug) still raises with its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from flows.dvc_runner import StageFailed
from lafs.config import ConfigError

Result = TypeVar("Result")

# A stage (or `lafs promote`) failed, a params override was refused, or a flow argument was out of range.
EXPECTED_FAILURES = (StageFailed, ConfigError, ValueError)


def run_flow(start: Callable[[], Result], render: Callable[[Result], str]) -> int:
    """``start()`` the flow; on success print ``render(result)`` and return 0, on an expected failure print
    ``error: <message>`` to stderr and return 1."""
    try:
        result = start()
    except EXPECTED_FAILURES as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render(result))
    return 0
