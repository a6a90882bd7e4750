"""Prefect flow ``lafs-pipeline``: the DVC pipeline, one task per ``dvc.yaml`` stage, in dependency order.

What Prefect adds over ``dvc repro``: a schedule, retries with backoff when a service (S3, MLflow) was briefly
unreachable, and a record of every run (parameters, per-stage result, logs) on the Prefect server. What it
does not do: decide what reruns. Each task is ``dvc repro --single-item <stage>``, run one at a time (DVC
locks the repo), with Prefect's task caching off, so DVC's lock file alone says whether a stage is stale.

Overrides go the DVC way: they are set in ``params.yaml`` itself, comments kept, as ``dvc exp run
--set-param`` does (:func:`lafs.params_edit.set_params`, also behind ``make pipeline`` and ``lafs set-params``);
every stage tracks its own section, so a changed value reruns exactly the stages that read it, and
``dvc params diff`` / ``dvc exp show`` list what a run changed. An override stays until it is changed (an empty
value sets null) or ``git checkout params.yaml``. Run it::

    python -m flows.pipeline --data ../shared/data/lfw_subset --models ../shared/models --set pretrain.epochs=1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.runtime import task_run as current_task_run
from prefect.states import State
from prefect.tasks import Task, exponential_backoff

from flows.cli import run_flow
from flows.dvc_runner import (
    StageFailed,
    StageRun,
    TransientStageError,
    default_remote,
    describe_reasons,
    pipeline_stages,
    repro_stage,
    select_stages,
)
from flows.dvc_runner import push as dvc_push
from lafs.cli import parse_sets
from lafs.config import PARAMS_FILE
from lafs.params_edit import set_params
from lafs.tracking import flatten

# Defaults for the retry policy of stage tasks: 3 retries after 10, 20, 40 s cover an MLflow server restart
# (20-40 s on this machine) or an S3 endpoint coming back; flow parameters change them per run.
RETRIES = 3
RETRY_DELAY_SECONDS = 10.0
REPORT_KEY = "lafs-pipeline-report"


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the service was unreachable, never a real failure."""
    try:
        state.result()
    except TransientStageError:
        return True
    except BaseException:
        return False
    return False


def _with_attempt(exc: StageFailed) -> StageFailed:
    """Record on the exception which attempt failed (the flow's report shows it; Prefect logs the message)."""
    exc.attempts = current_task_run.run_count
    return exc


@task(name="apply-overrides", cache_policy=NO_CACHE)
def apply_overrides(root: Path, sets: dict[str, Any]) -> dict[str, Any]:
    """Set ``sets`` in params.yaml (validated before writing); return the values that changed, old -> new."""
    changed = set_params(root / PARAMS_FILE, sets)
    logger = get_run_logger()
    for key, (old, new) in changed.items():
        logger.info("%s: %s: %r -> %r", PARAMS_FILE, key, old, new)
    logger.info("%s: %d value(s) changed", PARAMS_FILE, len(changed))
    return {key: {"old": old, "new": new} for key, (old, new) in changed.items()}


@task(name="discover-stages", cache_policy=NO_CACHE)
def discover_stages(root: Path, wanted: list[str] | None) -> list[str]:
    """The stages to run: all of ``dvc.yaml`` (or the ``wanted`` subset), dependencies first."""
    order = select_stages(pipeline_stages(root), wanted)
    get_run_logger().info("stages in order: %s", " -> ".join(order))
    return order


@task(
    name="dvc-repro",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(RETRY_DELAY_SECONDS),
    retry_condition_fn=retry_if_transient,
)
def repro(root: Path, stage: str) -> dict[str, Any]:
    """One stage: ``dvc repro --single-item <stage>``; its output streams to stdout (and the worker's log)."""
    try:
        run = repro_stage(root, stage)
    except StageFailed as exc:
        raise _with_attempt(exc) from None
    run.attempts = current_task_run.run_count
    get_run_logger().info(
        "stage %s: %s in %.1f s (dvc status before: %s)", stage, run.result, run.seconds, describe_reasons(run.reasons)
    )
    return run.as_dict()


@task(
    name="dvc-push",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(RETRY_DELAY_SECONDS),
    retry_condition_fn=retry_if_transient,
)
def push_outputs(root: Path) -> str:
    """``dvc push`` to the default remote, if one is configured (else a warning: nothing to push to)."""
    logger = get_run_logger()
    remote = default_remote(root)
    if remote is None:
        logger.warning("push requested but the project has no default DVC remote (dvc remote add -d ...)")
        return "skipped: no default remote"
    try:
        last = dvc_push(root)
    except StageFailed as exc:
        raise _with_attempt(exc) from None
    logger.info("dvc push to %r: %s", remote, last)
    return f"pushed to {remote}: {last}"


def _markdown(report: dict[str, Any]) -> str:
    rows = ["| stage | result | attempts | seconds | dvc status before the run |", "|---|---|---|---|---|"]
    for r in report["stages"]:
        why = describe_reasons(r["reasons"])
        if r["error"]:
            why = f"{why} — **{r['error']}**"
        rows.append(f"| `{r['stage']}` | {r['result']} | {r['attempts']} | {r['seconds']} | {why} |")
    overrides = json.dumps(
        {"requested": report["overrides"], "changed in params.yaml": report["changed"]},
        indent=2,
        sort_keys=True,
        default=str,
    )
    notes = [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(
        [
            f"# {report['flow']}: {report['status']}",
            "",
            *rows,
            "",
            *notes,
            "",
            f"push: {report['push']}",
            "",
            "## Resolved overrides",
            "",
            "```json",
            overrides,
            "```",
        ]
    )


def publish(report: dict[str, Any], key: str = REPORT_KEY) -> None:
    """The run's report as Prefect artifacts: markdown (stages, overrides) and a table (one row per stage)."""
    create_markdown_artifact(_markdown(report), key=key, description="stage results and overrides")
    create_table_artifact(
        [{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()} for r in report["stages"]],
        key=f"{key}-stages",
        description="one row per stage: ran / skipped / restored / failed",
    )


def new_report(flow_name: str, project: Path, sets: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    """The report a flow fills in and publishes; secret-looking keys are dropped (lafs.tracking.flatten)."""
    return {
        "flow": flow_name,
        "status": "running",
        "root": str(project),
        "overrides": flatten(sets),
        "changed": flatten(applied),
        "stages": [],
        "notes": [],
        "push": "not requested",
    }


def run_stages(
    project: Path,
    order: Sequence[str],
    report: dict[str, Any],
    retries: int = RETRIES,
    retry_delay_seconds: float = RETRY_DELAY_SECONDS,
) -> None:
    """Run ``order`` one stage (one task) at a time, appending report rows; a failed stage stops the rest and
    its exception is re-raised (after its row is recorded)."""
    policy = {"retries": retries, "retry_delay_seconds": exponential_backoff(retry_delay_seconds)}
    for stage in order:
        state = repro.with_options(task_run_name=f"repro-{stage}", **policy)(project, stage, return_state=True)
        if state.is_failed():
            exc = state.result(raise_on_failure=False)
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            report["stages"].append(
                StageRun(stage, "failed", 0.0, attempts=getattr(exc, "attempts", 1), error=first_line).as_dict()
            )
            raise exc if isinstance(exc, BaseException) else RuntimeError(f"stage {stage!r}: {first_line}")
        report["stages"].append(state.result())


@flow(name="lafs-pipeline", description="Run the DVC pipeline stage by stage; DVC decides what reruns.")
def pipeline(
    overrides: dict[str, Any] | None = None,
    data: str | None = None,
    models: str | None = None,
    stages: list[str] | None = None,
    push: bool = False,
    root: str = ".",
    retries: int = RETRIES,
    retry_delay_seconds: float = RETRY_DELAY_SECONDS,
) -> dict[str, Any]:
    """Run the pipeline; return (and publish as artifacts) the per-stage report.

    Args:
        overrides: dotted params, e.g. ``{"finetune.epochs": 1}``, set in params.yaml; an empty value (``""`` /
            ``None``) sets null.
        data: ``ingest.source`` (a folder, ``s3://bucket/prefix`` or ``lfw``), like ``make pipeline DATA=``;
            None leaves params.yaml's value.
        models: ``landmarks.models_root`` (insightface root), like ``make pipeline MODELS=``; same rules.
        stages: run only these ``dvc.yaml`` stages (still in pipeline order, upstream not checked).
        push: ``dvc push`` the outputs at the end when a default DVC remote is configured.
        root: the project (git + DVC repo) directory.
        retries, retry_delay_seconds: per-stage retries on transient failures, exponential backoff base.
    """
    project = Path(root).resolve()
    sets = dict(overrides or {})
    if data is not None:
        sets["ingest.source"] = data
    if models is not None:
        sets["landmarks.models_root"] = models
    applied = apply_overrides(project, sets)
    order = discover_stages(project, stages)
    report = new_report("lafs-pipeline", project, sets, applied)
    try:
        run_stages(project, order, report, retries, retry_delay_seconds)
        if push:
            policy = {"retries": retries, "retry_delay_seconds": exponential_backoff(retry_delay_seconds)}
            report["push"] = push_outputs.with_options(**policy)(project)
        report["status"] = "completed"
        return report
    except BaseException:
        report["status"] = "failed"
        raise
    finally:
        publish(report)


def describe(report: dict[str, Any]) -> str:
    """One line per stage, for the terminal (``make pipeline``)."""
    lines = [f"{report['flow']} {report['status']}: {report['root']}"]
    lines += [
        f"  {r['stage']:<14} {r['result']:<9} {r['seconds']:>8.1f} s  attempts={r['attempts']}"
        for r in report["stages"]
    ]
    lines += [f"  {note}" for note in report["notes"]]
    lines.append(f"  push: {report['push']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted param set in params.yaml (repeatable; empty sets null)",
    )
    parser.add_argument("--data", default=None, help="ingest.source (make pipeline DATA=...)")
    parser.add_argument("--models", default=None, help="landmarks.models_root (make pipeline MODELS=...)")
    parser.add_argument("--stage", action="append", default=None, dest="stages", help="run only this stage")
    parser.add_argument("--push", action="store_true", help="dvc push at the end (needs a default remote)")
    parser.add_argument("--root", default=".", help="project directory (default: .)")
    parser.add_argument("--retries", type=int, default=RETRIES)
    parser.add_argument("--retry-delay", type=float, default=RETRY_DELAY_SECONDS, help="backoff base, seconds")
    args = parser.parse_args(argv)
    return run_flow(
        lambda: pipeline(
            overrides=parse_sets(args.set),
            data=args.data,
            models=args.models,
            stages=args.stages,
            push=args.push,
            root=args.root,
            retries=args.retries,
            retry_delay_seconds=args.retry_delay,
        ),
        describe,
    )


if __name__ == "__main__":
    raise SystemExit(main())
