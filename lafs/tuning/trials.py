"""Optuna's side of a trial: the seeded sampler, the pruner, what a trial suggests, and how trials count toward
the ``n_trials`` budget shared by every worker."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lafs.config import SearchDim, TuneParams, search_kind


def trial_sampler(cfg: TuneParams, trial_number: int) -> Any:
    """TPE seeded per trial: parallel workers draw differently, a resumed study draws as an uninterrupted one."""
    import optuna

    seed = int.from_bytes(hashlib.sha256(f"{cfg.sampler.seed}:{trial_number}".encode()).digest()[:4], "little")
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=cfg.sampler.n_startup_trials, constant_liar=cfg.sampler.constant_liar
    )


def pruner(cfg: TuneParams) -> Any:
    import optuna

    p = cfg.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, max_resource=p.max_resource, reduction_factor=p.reduction_factor
        )
    if p.name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.lower, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def suggest(trial, search_space: dict[str, SearchDim]) -> dict[str, Any]:
    """The trial's value for every searched param (ints for int finetune params, e.g. ``epochs``)."""
    out: dict[str, Any] = {}
    for name, dim in search_space.items():
        if dim.choices is not None:
            out[name] = trial.suggest_categorical(name, list(dim.choices))
        elif search_kind(name) is int:
            out[name] = trial.suggest_int(name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            out[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
    return out


@dataclass
class Tally:
    """Trial counts by what they mean for the budget (``finished`` = counted toward ``n_trials``)."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0  # an expected failure with an ``error`` attr (counted)
    killed: int = 0  # the worker died or was interrupted (not counted; re-queued when max_retry allows)
    surplus: int = 0  # stepped aside for a parallel worker (not counted)
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    def states(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "surplus"}


def counts(trial) -> bool:
    """Whether a trial uses up one of ``n_trials`` (finished, or running in some worker)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def tally(trials: Iterable[Any]) -> Tally:
    from optuna.trial import TrialState

    t = Tally()
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            t.complete += 1
        elif trial.state == TrialState.PRUNED:
            t.pruned += 1
        elif trial.state == TrialState.RUNNING:
            t.running += 1
        elif trial.state == TrialState.WAITING:
            t.waiting += 1
        elif trial.user_attrs.get("surplus"):
            t.surplus += 1
        elif "error" in trial.user_attrs:
            t.failed += 1
        else:
            t.killed += 1
    return t
