"""Prefect flow ``lafs-search``: the ``tune`` stage (Optuna), optionally with extra workers, then ``finetune``.

The tune stage keeps its Optuna study in an RDB storage and lets several ``lafs tune`` processes share it
(lafs/stages/tune.py): the budget ``tune.n_trials`` is counted across all of them and every one of them waits
for the others' trials before it writes the best params, so they all write the same files. This flow uses
that: ``workers - 1`` helper processes (``lafs tune``, outside DVC: DVC's lock allows one repro at a time)
run beside the one ``dvc repro --single-item tune`` that DVC records, then the ``then`` stages (default
``finetune``, which overlays ``params/best_finetune.yaml``) run through DVC. Helpers start only when DVC
says tune is stale, so an unchanged study costs nothing. On one machine the default sqlite storage works;
across machines point ``tune.storage`` at Postgres (infra/compose.yaml has an ``optuna`` database).

    python -m flows.search --n-trials 20 --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.cli import run_flow
from flows.dvc_runner import run_streaming, stage_env, stage_status
from flows.pipeline import (
    RETRIES,
    RETRY_DELAY_SECONDS,
    apply_overrides,
    describe,
    discover_stages,
    new_report,
    publish,
    run_stages,
)
from lafs.cli import parse_sets

REPORT_KEY = "lafs-search-report"


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (or their indices)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def helper_gpu(number: int, gpus: Sequence[str]) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` for tune helper ``number`` (1, 2, ...): with several GPUs the workers take them in
    turn (the DVC-recorded worker is on the first), so N workers on N GPUs do not all train on ``cuda:0``."""
    return {"CUDA_VISIBLE_DEVICES": gpus[number % len(gpus)]} if len(gpus) > 1 else {}


@task(name="tune-worker", cache_policy=NO_CACHE)
def tune_worker(root: Path, number: int) -> str:
    """One extra ``lafs tune`` process on the shared study; its output goes to the log, not the terminal."""
    logger = get_run_logger()
    env = {**stage_env(), **helper_gpu(number, visible_gpus())}
    code, tail, _ = run_streaming([sys.executable, "-m", "lafs", "tune"], root, env, echo=None)
    last = tail.splitlines()[-1] if tail else ""
    if code:
        # Not fatal: the DVC-recorded worker carries the study on (a dead helper's trial goes stale and reruns).
        logger.warning("tune helper %d exited with %d:\n%s", number, code, tail)
        return f"tune helper {number}: failed (exit {code}): {last}"
    logger.info("tune helper %d: %s", number, last)
    return f"tune helper {number}: {last}"


@flow(name="lafs-search", description="Optuna search (tune stage, optionally several workers), then finetune.")
def search(
    n_trials: int | None = None,
    workers: int = 1,
    overrides: dict[str, Any] | None = None,
    then: list[str] | None = None,
    root: str = ".",
    retries: int = RETRIES,
    retry_delay_seconds: float = RETRY_DELAY_SECONDS,
) -> dict[str, Any]:
    """Run the search; return (and publish) the report.

    Args:
        n_trials: ``tune.n_trials`` (the study's total budget; raising it extends the same study).
        workers: processes sharing the study: the DVC-recorded one plus ``workers - 1`` helpers.
        overrides: more dotted params set in params.yaml (``tune.*``, ``finetune.*``); "" sets null.
        then: stages run after tune through DVC (default ``["finetune"]``; add export, evaluate, register).
        root, retries, retry_delay_seconds: as in ``lafs-pipeline``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    project = Path(root).resolve()
    sets = dict(overrides or {})
    if n_trials is not None:
        sets["tune.n_trials"] = n_trials
    applied = apply_overrides(project, sets)
    after = ["finetune"] if then is None else list(then)
    after = discover_stages(project, after) if after else []  # known stages, in pipeline order
    report = new_report("lafs-search", project, sets, applied)
    helpers = []
    try:
        if workers > 1 and stage_status(project, "tune"):
            helpers = [
                tune_worker.with_options(task_run_name=f"tune-worker-{i}").submit(project, i) for i in range(1, workers)
            ]
        elif workers > 1:
            report["notes"].append("tune is up to date: no helper workers started")
        run_stages(project, ["tune"], report, retries, retry_delay_seconds)
        report["notes"] += [h.result() for h in helpers]
        run_stages(project, after, report, retries, retry_delay_seconds)
        report["status"] = "completed"
        return report
    except BaseException:
        report["status"] = "failed"
        for helper in helpers:  # never leave helpers running past the flow
            helper.wait()
        raise
    finally:
        publish(report, REPORT_KEY)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-trials", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--then", action="append", default=None, help="stage after tune (repeatable)")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    return run_flow(
        lambda: search(
            n_trials=args.n_trials, workers=args.workers, overrides=parse_sets(args.set), then=args.then, root=args.root
        ),
        describe,
    )


if __name__ == "__main__":
    raise SystemExit(main())
