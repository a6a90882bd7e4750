"""DVC adapter for the flows: which stages exist (in dependency order), what is stale, and one stage's repro.

The flows never run stage logic themselves: every stage runs as ``dvc repro --single-item <stage>`` in a
subprocess of the flow's own interpreter, so DVC's lock file decides what reruns and records what finished,
and a crashed or killed stage cannot take the flow process down with it. Reading the stage graph and the
status goes through DVC's Python API instead (read-only, ~0.2 s instead of ~2 s per CLI start).

A failed stage is classified here, once, from its output: :class:`TransientStageError` when a service it
talks to was unreachable (worth retrying with backoff), :class:`StageFailed` otherwise (bad data, a
``StageError``, a bug: retrying cannot help).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

# Lines of a failed stage's output kept for classification and for the error message (the traceback or the
# stage's `error:` line is at the end; earlier lines can hold harmless retry warnings from urllib3/boto).
TAIL_LINES = 60

# Output patterns meaning "a service was unreachable or refused us for a moment" (S3, MLflow, the DVC remote,
# another DVC process holding the repo lock). Matched case-insensitively against the tail only.
TRANSIENT_PATTERNS: tuple[str, ...] = (
    r"connection refused",
    r"failed to establish a new connection",
    r"max retries exceeded",
    r"could not connect to the endpoint url",  # botocore EndpointConnectionError
    r"connect timeout on endpoint url",
    r"read timed out",
    r"connection (?:reset|aborted)",
    r"remote end closed connection",
    r"temporary failure in name resolution",
    r"name or service not known",
    r"\b(?:502 bad gateway|503 service unavailable|504 gateway time-?out)\b",
    r"\b(?:slowdown|requesttimeout|serviceunavailable|throttling)\b",  # S3 error codes
    r"unable to acquire lock",  # dvc: another DVC process is running in this repo
)
_TRANSIENT = re.compile("|".join(TRANSIENT_PATTERNS), re.IGNORECASE)

# "Stopped from outside", not "the stage is wrong": SIGTERM (preemption, a drained node). `lafs pretrain` /
# `lafs finetune` checkpoint and exit 143 on it, so a retry resumes; DVC itself exits 255 and reports the
# command's status as "exited with 143" (or -15 when the signal killed it outright). SIGKILL is left out: it
# is as likely the OOM killer, which a retry would only meet again.
_INTERRUPTED = re.compile(r"\bexited with (?:143|-15)\b")
_INTERRUPTED_EXIT_CODES = {143, -15}

Result = Literal["ran", "skipped", "restored"]


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage failed for a reason a retry cannot fix; ``tail`` is its last output lines."""

    transient = False
    attempts = 1  # set by the flow task to the attempt that failed

    def __init__(self, stage: str, exit_code: int, tail: str, hint: str = "") -> None:
        self.stage, self.exit_code, self.tail, self.hint = stage, exit_code, tail, hint
        kind = "transient failure" if self.transient else "failed"
        lines = [f"stage {stage!r} {kind} (dvc repro exit code {exit_code}){hint}"]
        lines += ["last output lines:", *("  " + line for line in tail.splitlines()[-15:])]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:  # pickled into Prefect states; keeps e.g. the flow's `attempts`
        return (type(self), (self.stage, self.exit_code, self.tail, self.hint), self.__dict__)


class TransientStageError(StageFailed):
    """The stage failed because a service (S3, MLflow, the DVC lock) was unavailable: retry with backoff."""

    transient = True


def is_transient(exit_code: int, tail: str) -> bool:
    """Classify a failed stage: interrupted from outside or a service unreachable -> transient."""
    return exit_code in _INTERRUPTED_EXIT_CODES or bool(_INTERRUPTED.search(tail) or _TRANSIENT.search(tail))


@dataclass
class StageRun:
    """What one stage did in a flow run (the flow's report rows)."""

    stage: str
    result: Result | Literal["failed"]
    seconds: float
    # `dvc status` of the stage just before its repro: why DVC considered it stale ({} = up to date).
    reasons: list[Any] = field(default_factory=list)
    attempts: int = 1
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_reasons(reasons: Sequence[Any]) -> str:
    """``dvc status`` entries as one line: ``changed deps: data/raw, params.yaml; changed outs: ...``."""

    def name(path: str, change: Any) -> str:  # params entries nest the changed keys: {"params.yaml": {"split": ..}}
        return f"{path} ({', '.join(sorted(change))})" if isinstance(change, dict) else path

    parts = []
    for entry in reasons:
        if isinstance(entry, dict):
            parts += [
                f"{kind}: {', '.join(name(p, c) for p, c in sorted(what.items()))}"
                if isinstance(what, dict)
                else f"{kind}: {what}"
                for kind, what in entry.items()
            ]
        else:
            parts.append(str(entry))  # e.g. "changed command", "always changed"
    return "; ".join(parts) or "up to date"


def dvc_command(*args: str) -> list[str]:
    """``dvc`` of the interpreter running the flow (``python -m dvc``), whatever ``PATH`` holds."""
    return [sys.executable, "-m", "dvc", *args]


def stage_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a stage: the caller's, with this interpreter's ``bin/`` first on ``PATH``.

    ``dvc.yaml`` commands are ``lafs <stage>``: they must resolve to the same install as the flow, not to
    whatever else ``PATH`` holds. No analytics from DVC.
    """
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")]) if env.get("PATH") else bindir
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _address(stage: Any, root_dir: str) -> str:
    """The stage's name as ``dvc repro`` takes it from the project root (DVC's own ``addressing`` is relative
    to the current directory, which need not be the project)."""
    dvcfile = os.path.relpath(stage.dvcfile.path, root_dir)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _target(root: Path, address: str) -> str:
    """An absolute DVC target for a root-relative stage address (valid from any working directory)."""
    dvcfile, _, name = address.rpartition(":")
    return f"{root / (dvcfile or 'dvc.yaml')}:{name}"


def pipeline_stages(root: Path) -> list[str]:
    """Every ``dvc.yaml`` stage of the project, in a topological order (dependencies first).

    Ties (stages whose inputs are all ready) keep their ``dvc.yaml`` order, so the order is stable and reads
    like the file. ``.dvc`` files (imports, added data) are not stages and are left out.
    """
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        position = {s: i for i, s in enumerate(stages)}
        ordered = nx.lexicographical_topological_sort(
            graph.reverse(copy=True), key=lambda s: position.get(s, len(position))
        )
        return [_address(s, repo.root_dir) for s in ordered if s in position]


def select_stages(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """``wanted`` (any order) in pipeline order; an unknown name fails before anything runs."""
    if not wanted:
        return list(available)
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: dvc.yaml declares {list(available)}")
    return [s for s in available if s in set(wanted)]


def stage_status(root: Path, stage: str) -> list[Any]:
    """``dvc status <stage>`` (that stage only): ``[]`` when up to date, else DVC's list of changes."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # keyed by DVC's cwd-relative name: take the one entry whatever its key
        return [change for changes in repo.status(targets=[_target(root, stage)]).values() for change in changes]


def _markers(stage: str) -> dict[str, Result]:
    """What DVC prints when it runs, restores or skips ``stage`` (dvc/stage/run.py, cache.py, __init__.py)."""
    return {
        f"Running stage '{stage}'": "ran",
        # DVC's run cache had outputs for exactly these deps/params: checked out, not rerun.
        f"Stage '{stage}' is cached - skipping run": "restored",
        f"Stage '{stage}' didn't change, skipping": "skipped",
    }


def run_streaming(
    cmd: Sequence[str], cwd: Path, env: Mapping[str, str], echo: TextIO | None, watch: Sequence[str] = ()
) -> tuple[int, str, set[str]]:
    """Run ``cmd``, echoing its output line by line; return (exit code, last lines, the ``watch`` strings seen).

    The child stays in our process group so that stopping the flow (Ctrl-C, a worker cancelling the run)
    reaches it too; if we leave early anyway, it gets SIGTERM (``lafs pretrain`` checkpoints on it).
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )
    try:
        assert proc.stdout is not None
        seen: set[str] = set()
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            seen.update(w for w in watch if w in line)
            if echo is not None:
                echo.write(line)
                echo.flush()
        return proc.wait(), "\n".join(tail), seen
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def repro_stage(
    root: Path, stage: str, env: Mapping[str, str] | None = None, echo: TextIO | None = sys.stdout
) -> StageRun:
    """``dvc repro --single-item <stage>``; raise :class:`TransientStageError` / :class:`StageFailed` on failure.

    ``--single-item``: only this stage, not its upstream; the flow walks the DAG itself, one task per stage.
    """
    reasons = stage_status(root, stage)
    markers = _markers(stage)
    start = time.monotonic()
    code, tail, seen = run_streaming(
        dvc_command("repro", "--single-item", stage), root, stage_env(env), echo, watch=list(markers)
    )
    seconds = round(time.monotonic() - start, 2)
    if code != 0:
        if is_transient(code, tail):
            raise TransientStageError(stage, code, tail)
        raise StageFailed(stage, code, tail, hint=": not retried, the stage itself refused or crashed")
    results = [markers[m] for m in markers if m in seen]
    # No marker seen (a DVC that words its log differently): fall back on what `dvc status` said before.
    result: Result = results[0] if results else ("ran" if reasons else "skipped")
    return StageRun(stage, result, seconds, reasons)


def default_remote(root: Path) -> str | None:
    """The DVC default remote's name (``core.remote``, repo or ``--local`` config), or None."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.config["core"].get("remote") or None


def push(root: Path, env: Mapping[str, str] | None = None, echo: TextIO | None = sys.stdout) -> str:
    """``dvc push`` to the default remote; transient failures (S3 unreachable) are retryable."""
    code, tail, _ = run_streaming(dvc_command("push"), root, stage_env(env), echo)
    if code != 0:
        if is_transient(code, tail):
            raise TransientStageError("push", code, tail)
        raise StageFailed("push", code, tail, hint=": check the remote's URL, bucket and credentials")
    return tail.splitlines()[-1] if tail else ""
