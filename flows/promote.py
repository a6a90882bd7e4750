"""Prefect flow ``lafs-promote``: the promotion gate on demand, or a rollback (``lafs promote``).

The ``register`` stage gates every new model version automatically; this flow is for the other cases: gate a
given version or alias again (say after changing ``register.min_gain``), or put the previous champion back.
All logic is in ``lafs.registry`` behind ``lafs promote``; the flow adds retries while MLflow is unreachable
and records the decision as a markdown artifact.

    python -m flows.promote --rollback
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.cli import run_flow
from flows.dvc_runner import StageFailed, TransientStageError, is_transient, run_streaming, stage_env
from flows.pipeline import RETRIES, RETRY_DELAY_SECONDS, retry_if_transient
from lafs.cli import parse_sets

REPORT_KEY = "lafs-promotion"


def promote_args(
    model_name: str | None,
    version: str | None,
    alias: str | None,
    rollback: bool,
    overrides: dict[str, Any] | None,
    report: Path,
) -> list[str]:
    """The ``lafs promote`` command line; contradictory choices fail here, before MLflow is contacted."""
    if rollback and (version or alias):
        raise ValueError("rollback restores the previous champion: do not combine it with version or alias")
    if version and alias:
        raise ValueError(f"give a version ({version!r}) or an alias ({alias!r}), not both")
    args = ["promote", "--report", str(report)]
    if model_name:
        args += ["--model-name", model_name]
    if rollback:
        args.append("--rollback")
    elif version:
        args += ["--version", str(version)]
    elif alias:
        args += ["--alias", alias]
    for key, value in (overrides or {}).items():  # one-off gate params: JSON is valid YAML for --set
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


@task(
    name="lafs-promote",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(RETRY_DELAY_SECONDS),
    retry_condition_fn=retry_if_transient,
)
def run_promote(root: Path, args: list[str]) -> str:
    """``lafs promote ...``; its last output line (the decision) is the result."""
    code, tail, _ = run_streaming([sys.executable, "-m", "lafs", *args], root, stage_env(), echo=sys.stdout)
    if code:
        get_run_logger().error("lafs promote exited with %d:\n%s", code, tail)
        if is_transient(code, tail):
            raise TransientStageError("promote", code, tail)
        raise StageFailed("promote", code, tail, hint=": the gate refused or the version/alias does not exist")
    return tail.splitlines()[-1] if tail else ""


@flow(name="lafs-promote", description="Promotion gate on demand (lafs promote), or rollback of the champion.")
def promote(
    model_name: str | None = None,
    version: str | None = None,
    alias: str | None = None,
    rollback: bool = False,
    overrides: dict[str, Any] | None = None,
    root: str = ".",
    retries: int = RETRIES,
    retry_delay_seconds: float = RETRY_DELAY_SECONDS,
) -> dict[str, Any]:
    """Gate ``version`` / ``alias`` (default: the challenger) of ``model_name`` (default: register.model_name)
    against the champion, or ``rollback``; ``overrides`` are one-off ``register.*`` gate params."""
    project = Path(root).resolve()
    with tempfile.TemporaryDirectory(prefix="lafs-promote-") as tmp:
        report = Path(tmp) / "promotion.md"
        args = promote_args(model_name, version, alias, rollback, overrides, report)
        policy = {"retries": retries, "retry_delay_seconds": exponential_backoff(retry_delay_seconds)}
        decision = run_promote.with_options(task_run_name="lafs-promote", **policy)(project, args)
        markdown = report.read_text() if report.exists() else f"# lafs promote\n\n{decision}\n"
    create_markdown_artifact(markdown, key=REPORT_KEY, description="promotion decision")
    shown = [args[0], *args[3:]]  # without "--report <tmp file>"
    return {"command": f"lafs {shlex.join(shown)}", "decision": decision}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--version", default=None)
    parser.add_argument("--alias", default=None)
    parser.add_argument("--rollback", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. register.min_gain=0.01")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    return run_flow(
        lambda: promote(
            model_name=args.model_name,
            version=args.version,
            alias=args.alias,
            rollback=args.rollback,
            overrides=parse_sets(args.set),
            root=args.root,
        ),
        lambda result: result["decision"],
    )


if __name__ == "__main__":
    raise SystemExit(main())
