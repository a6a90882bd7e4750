"""Stage ``tune``: Optuna search over the finetune params, every trial a real finetune run.

The study lives in an RDB storage (default: sqlite under ``models/tune/``, which is not a DVC out, so DVC
never deletes it). That makes a study durable and shared:

- **resume**: rerunning ``lafs tune`` loads the study; finished trials count toward ``n_trials`` and only the
  rest run. A worker killed mid-trial stops sending heartbeats; once its trial is stale it is marked failed and
  (``max_retry``) re-queued with the same params.
- **parallel workers**: several ``lafs tune`` processes on one storage share the budget. Before a trial starts,
  the trials already finished or running elsewhere are counted, so the study ends with exactly ``n_trials``.

The best trial's checkpoint is kept and copied to ``models/tune_best/`` (a :class:`WarmStart`): with truncated
trials of the final schedule (``trial_epochs``, no ``trial_overrides``) it is the final finetune's first epochs,
which that stage continues instead of training them again.

One MLflow parent run per study (its id is a study user attr, so resumes and workers reuse it); each trial's
finetune run is its child (``mlflow.parentRunId``), tagged with the trial number and final state. Optuna's
``MLflowCallback`` is not used: it logs a *second* run per trial after the fact and opens no parent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lafs.atomic import copy_atomic, write_text
from lafs.config import FinetuneParams, Params, TuneParams, resolved
from lafs.data.images import file_sha256
from lafs.layout import Layout
from lafs.stages import RunOptions, StageError, write_metrics
from lafs.stages.finetune import FinetunePaths, WarmStart, build_recogniser, select_data, train
from lafs.tuning.storage import masked, open_storage, storage_url
from lafs.tuning.tracker import StudyTracker
from lafs.tuning.trials import counts, pruner, suggest, tally, trial_sampler

log = logging.getLogger(__name__)

# Study user attrs: what ties a study to its MLflow parent run and to the params it was created with.
PARENT_ATTR = "mlflow_parent_run_id"
FINGERPRINT_ATTR = "fingerprint"
# Finetune params the stage sets itself on every trial (tracking goes to the tune run; no overlay of an old best).
_OVERLAID = ("experiment", "tracking_uri", "tuned_params")
PARENT_WAIT_S = 120.0  # how long a worker waits for the study's creator to record the MLflow parent run


@dataclass(frozen=True)
class TunePaths:
    layout: Layout  # its root anchors relative sqlite storage paths
    finetune: FinetunePaths  # every trial's inputs; out_dir is per trial
    study_dir: Path  # storage (default) and one directory per trial
    best_params: Path  # tune.out
    metrics: Path
    warm_start: Path  # the best trial's checkpoint: the folder the finetune stage continues from

    @classmethod
    def of(cls, layout: Layout, best_params: str) -> TunePaths:
        """The pipeline's files (``best_params``: ``tune.out``, relative to the root)."""
        return cls(
            layout,
            FinetunePaths.of(layout),
            layout.tune_studies,
            layout.resolve(best_params),
            layout.metrics("tune"),
            layout.tune_best,
        )


@dataclass
class TuneSummary:
    study_name: str
    n_trials: int
    states: dict[str, int]  # counts over the whole study: complete, pruned, failed, killed, running, waiting
    ran: int  # trials this process ran
    resumed: int  # finished trials the study already held when this process started
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    parent_run_id: str

    def describe(self) -> str:
        resumed = f", resumed with {self.resumed} finished" if self.resumed else ""
        counts = ", ".join(f"{k} {v}" for k, v in self.states.items() if v)
        return (
            f"study {self.study_name}: ran {self.ran} trial(s){resumed}; {counts}; best trial "
            f"#{self.best_trial} val_accuracy {self.best_value:.4f} with {self.best_params}"
        )


class TrialFailed(Exception):
    """A trial that ended in an expected failure (invalid param combination, diverged finetune): FAIL state,
    counted toward ``n_trials`` (its message is the trial's ``error`` user attr)."""


class _Truncated(Exception):
    """``tune.trial_epochs`` epochs of the trial's schedule are done: the trial ends with its best so far."""

    def __init__(self, history: list[float]) -> None:
        super().__init__(f"stopped after {len(history)} epochs (tune.trial_epochs)")
        self.best_val_accuracy = max(history)
        self.best_epoch = history.index(self.best_val_accuracy)
        self.epochs_run = len(history)


class _Surplus(Exception):
    """Two workers started the last free slot at once; the later trial steps aside (FAIL, ``surplus`` attr)."""


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's (name, sha256) list."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else ():
        h.update(f"{f.relative_to(path)}\0{_digest(f)}\n".encode())
    return h.hexdigest()


def fingerprint(cfg: TuneParams, finetune_cfg: FinetuneParams, paths: TunePaths) -> str:
    """What makes two trials comparable: the search (space, sampler, pruner), the finetune params the trials
    start from and the finetune inputs (the splits hold every image's sha256). Budget and bookkeeping
    (n_trials, timeout, storage, tracking) are left out, so raising n_trials extends the same study."""
    ft = paths.finetune
    inputs = {
        "splits": _digest(ft.layout.splits),
        "teacher": _digest(ft.teacher),
        "landmark_net": _digest(ft.landmark_net),
    }
    tune_params = resolved(cfg)
    base = {k: v for k, v in resolved(finetune_cfg).items() if k not in _OVERLAID}
    data = {
        key: tune_params[key]
        for key in ("direction", "sampler", "pruner", "search_space", "enqueue", "trial_overrides", "trial_epochs")
    }
    data |= {"finetune": base, "inputs": inputs}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- study


def _open_study(cfg: TuneParams, name: str, storage: Any, tracker: StudyTracker, fp: str, params: dict[str, Any]):
    """Create the study or load it (``load_if_exists``), whoever created it recording the MLflow parent run.

    ``create_study`` fails on an existing name atomically in the storage, so exactly one of several workers
    starting together is the creator; the others wait for it to record the parent run id.
    """
    import optuna

    kwargs = {"study_name": name, "storage": storage, "sampler": trial_sampler(cfg, 0), "pruner": pruner(cfg)}
    try:
        study = optuna.create_study(direction=cfg.direction, load_if_exists=False, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)  # load_if_exists, knowing we are not the creator
    else:
        for trial in cfg.enqueue:
            study.enqueue_trial(dict(trial), skip_if_exists=True)
        study.set_user_attr(FINGERPRINT_ATTR, fp)
        study.set_user_attr(PARENT_ATTR, tracker.create_parent(name, params))
        return study, False
    deadline = time.monotonic() + PARENT_WAIT_S
    while PARENT_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(1.0)
    attrs = study.user_attrs
    if attrs.get(FINGERPRINT_ATTR, fp) != fp:
        raise StageError(
            f"study {name!r} in {masked(storage.url)} was created with other search/finetune params "
            "or inputs; its trials are not comparable with these. Use another tune.study_name (or "
            "null for a name derived from the params), or delete the study"
        )
    if PARENT_ATTR not in attrs or not tracker.reopen(attrs[PARENT_ATTR]):
        log.warning("study %s has no usable MLflow parent run; opening a new one", name)
        study.set_user_attr(FINGERPRINT_ATTR, fp)
        study.set_user_attr(PARENT_ATTR, tracker.create_parent(name, params))
    return study, True


class _Objective:
    """One trial: suggest params, overlay them on the finetune section, train, report every epoch."""

    def __init__(
        self,
        cfg: TuneParams,
        finetune_cfg: FinetuneParams,
        paths: TunePaths,
        tracker: StudyTracker,
        parent_run_id: str,
        trial_dir: Callable[[int], Path],
    ) -> None:
        self.cfg, self.finetune_cfg, self.paths, self.tracker = cfg, finetune_cfg, paths, tracker
        self.parent_run_id, self.trial_dir = parent_run_id, trial_dir
        self.surplus = False

    def trial_params(self, suggested: dict[str, Any]) -> FinetuneParams:
        from pydantic import ValidationError

        data = {
            **resolved(self.finetune_cfg),
            **self.cfg.trial_overrides,
            **suggested,
            "experiment": self.cfg.experiment,
            "tracking_uri": self.cfg.tracking_uri,
            "tuned_params": None,
        }
        try:
            return FinetuneParams.model_validate(data)
        except ValidationError as exc:
            reasons = "; ".join(e["msg"] for e in exc.errors())
            raise TrialFailed(
                f"suggested params {suggested} are not valid finetune params ({reasons}); narrow tune.search_space"
            ) from None

    def __call__(self, trial) -> float:
        import mlflow
        import optuna

        study = trial.study
        self.surplus = False
        ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts(t)]
        if len(ahead) >= self.cfg.n_trials:
            self.surplus = True
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"trial {trial.number}: {len(ahead)} trials ahead of it already fill n_trials")
        study.sampler = trial_sampler(self.cfg, trial.number)  # TPE reads the history from storage: only the RNG is new
        trial.set_user_attr("mlflow_run_id", None)  # a re-queued trial inherits the dead one's attrs
        run_id: str | None = None
        history: list[float] = []  # validation accuracy per epoch

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            nonlocal run_id
            if run_id is None and mlflow.active_run() is not None:  # the finetune run of this trial
                run_id = mlflow.active_run().info.run_id
                trial.set_user_attr("mlflow_run_id", run_id)
                mlflow.set_tags(
                    {
                        "optuna.study": study.study_name,
                        "optuna.trial": trial.number,
                        "mlflow.runName": f"trial-{trial.number:04d}",
                    }
                )
            value = float(metrics["val_accuracy"])
            trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", epoch)
                raise optuna.TrialPruned(
                    f"val_accuracy {value:.4f} after epoch {epoch}: pruned by the {self.cfg.pruner.name} pruner"
                )
            history.append(value)
            if self.cfg.trial_epochs is not None and len(history) >= self.cfg.trial_epochs:
                raise _Truncated(history)

        out_dir = self.trial_dir(trial.number)
        try:
            try:
                trial_cfg = self.trial_params(suggest(trial, self.cfg.search_space))
                trial_paths = dataclasses.replace(
                    self.paths.finetune, out_dir=out_dir, metrics=out_dir / "metrics.json", warm_start=None
                )
                summary = train(trial_cfg, trial_paths, on_epoch=on_epoch, parent_run_id=self.parent_run_id)
            except StageError as exc:  # the finetune refused (e.g. a diverged loss at this lr): a result too
                raise TrialFailed(str(exc)) from None
            except _Truncated as stop:  # tune.trial_epochs reached: the schedule's first epochs are the trial
                summary = stop
        except optuna.TrialPruned:
            _drop_checkpoints(out_dir)
            self.tracker.tag(run_id, {"optuna.state": "PRUNED", "pruned": "true"}, "KILLED")
            raise
        except TrialFailed as exc:
            _drop_checkpoints(out_dir)
            trial.set_user_attr("error", str(exc))
            self.tracker.tag(run_id, {"optuna.state": "FAIL"}, "FAILED")
            raise
        trial.set_user_attr("best_epoch", summary.best_epoch)
        trial.set_user_attr("epochs_run", summary.epochs_run)
        self.tracker.tag(run_id, {"optuna.state": "COMPLETE"}, "FINISHED" if isinstance(summary, _Truncated) else None)
        self.tracker.client.log_metric(
            self.parent_run_id, "trial_val_accuracy", summary.best_val_accuracy, step=trial.number
        )
        return float(summary.best_val_accuracy)


def _drop_checkpoints(folder: Path) -> None:
    """Weights of a trial that is not the best: keep only its small files."""
    for f in folder.rglob("*.pt") if folder.exists() else ():
        f.unlink(missing_ok=True)


def _best_number(study) -> int | None:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial.number if complete else None


def _sweep(study, trial_dir: Callable[[int], Path]) -> None:
    """Drop the checkpoints of every finished trial but the best (one trial's weights on disk, not n_trials')."""
    from optuna.trial import TrialState

    keep = _best_number(study)
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.RUNNING, TrialState.WAITING) and t.number != keep:
            _drop_checkpoints(trial_dir(t.number))


def continuable(cfg: TuneParams) -> str | None:
    """None when a trial is the final finetune's own schedule (so its checkpoint continues into it), else why
    not."""
    if cfg.trial_overrides:
        return f"trials ran with tune.trial_overrides {dict(cfg.trial_overrides)}, not the final schedule"
    return None


def export_warm_start(cfg: TuneParams, study, trial_dir: Callable[[int], Path], folder: Path) -> dict[str, Any]:
    """Copy the best trial's checkpoint into the :class:`WarmStart` ``folder`` (or record why there is none);
    the info written to its ``warm_start.json``."""
    best = study.best_trial
    ws, src = WarmStart(folder), WarmStart(trial_dir(best.number))
    info: dict[str, Any] = {
        "study": study.study_name,
        "trial": best.number,
        "val_accuracy": best.value,
        "epochs_run": best.user_attrs.get("epochs_run"),
        "params": dict(best.params),
    }
    reason = continuable(cfg)
    if reason is None and not (src.last.exists() and src.model.exists()):
        reason = f"trial {best.number}'s checkpoint is gone from {src.folder}"
    if reason is None:
        copy_atomic(src.model, ws.model)
        copy_atomic(src.last, ws.last)
    else:
        ws.last.unlink(missing_ok=True)
        ws.model.unlink(missing_ok=True)
    info |= {"checkpoint": reason is None} | ({"reason": reason} if reason else {})
    write_text(ws.info, json.dumps(info, indent=2) + "\n")
    return info


# --------------------------------------------------------------------------------------------------- run


def preflight(finetune_cfg: FinetuneParams, paths: FinetunePaths) -> None:
    """Fail before the study when the finetune section cannot train at all (missing splits or teacher, too few
    identities, a teacher of another model): inside a trial such a StageError would read as that trial's
    result and be repeated n_trials times."""
    try:
        select_data(finetune_cfg, paths)
        build_recogniser(finetune_cfg, paths)
    except StageError as exc:
        raise StageError(f"the finetune section cannot train, so no trial can: {exc}") from None


def default_study_name(fp: str) -> str:
    return f"finetune-{fp[:12]}"


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> TuneSummary:
    """The stage: the study of ``params.tune`` over the ``finetune`` section, best params to ``tune.out``."""
    return search(params.tune, params.finetune, TunePaths.of(layout, params.tune.out))


def search(cfg: TuneParams, finetune_cfg: FinetuneParams, paths: TunePaths) -> TuneSummary:
    """Run trials until the study holds ``n_trials`` finished ones (or ``timeout_s``), then write the best."""
    import optuna
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    preflight(finetune_cfg, paths.finetune)
    url = storage_url(cfg, paths.layout.root, paths.study_dir)
    fp = fingerprint(cfg, finetune_cfg, paths)
    name = cfg.study_name or default_study_name(fp)
    tracker = StudyTracker(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry) if cfg.max_retry else None

    def on_stale(study, trial) -> None:  # a dead worker's trial: close its MLflow run, re-queue its params
        tracker.killed(trial.user_attrs.get("mlflow_run_id"))
        if retry is not None:
            retry(study, trial)

    storage = open_storage(cfg, url, on_stale)
    params = {**resolved(cfg), "storage": masked(url), "study_name": name, "fingerprint": fp}
    study, resumed = _open_study(cfg, name, storage, tracker, fp, params)
    parent = study.user_attrs[PARENT_ATTR]
    study_dir = paths.study_dir / name

    def trial_dir(number: int) -> Path:
        return study_dir / f"trial_{number:04d}"

    objective = _Objective(cfg, finetune_cfg, paths, tracker, parent, trial_dir)
    deadline = None if cfg.timeout_s is None else time.monotonic() + cfg.timeout_s
    start = tally(study.get_trials(deepcopy=False))
    log.info("study %s in %s: %d of %d trials finished", name, masked(url), start.finished, cfg.n_trials)
    ran = 0
    try:
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # frees the slots of dead workers
            # Child runs listed before the trials are read: with no trial running anywhere, any still RUNNING
            # belongs to a dead worker (killed before its first epoch tagged the run with its trial).
            open_runs = tracker.running_children(parent)
            now = tally(study.get_trials(deepcopy=False))
            if now.running == 0:
                for run_id in open_runs:
                    tracker.killed(run_id)
            if now.finished >= cfg.n_trials or (deadline is not None and time.monotonic() >= deadline):
                break
            if now.finished + now.running >= cfg.n_trials:  # the last slots are taken by other workers:
                time.sleep(min(5.0, cfg.heartbeat_s))  # wait for them to finish (or to go stale and free one)
                continue
            study.optimize(objective, n_trials=1, catch=(TrialFailed, _Surplus), gc_after_trial=True)
            ran += 0 if objective.surplus else 1
            _sweep(study, trial_dir)
    except BaseException as exc:
        if tally(study.get_trials(deepcopy=False)).running == 0:  # else another worker carries the study on
            tracker.client.set_terminated(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    _sweep(study, trial_dir)
    return _finish(cfg, study, paths, tracker, parent, ran, start.finished if resumed else 0, trial_dir)


def _finish(
    cfg: TuneParams,
    study,
    paths: TunePaths,
    tracker: StudyTracker,
    parent: str,
    ran: int,
    resumed: int,
    trial_dir: Callable[[int], Path],
) -> TuneSummary:
    """Write the best trial's params and the study metrics; log the best to the parent run."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    final = tally(trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    metrics = {"study": study.study_name, "n_trials": cfg.n_trials, "trials": final.states()}
    if not complete:
        write_metrics(paths.metrics, metrics)
        errors = sorted({t.user_attrs["error"] for t in trials if "error" in t.user_attrs})
        raise StageError(
            f"study {study.study_name}: no trial completed ({final.states()}); "
            f"errors: {errors or 'none recorded'}. Widen tune.search_space or relax the pruner"
        )
    best = study.best_trial
    header = (
        f"# Written by `lafs tune`: best of {final.finished} finished trials in Optuna study "
        f"{study.study_name!r}:\n# trial #{best.number}, val_accuracy {best.value:.6f}. "
        "Overlaid on params.yaml's finetune section by `lafs finetune` (finetune.tuned_params).\n"
    )
    write_text(paths.best_params, header + yaml.safe_dump(dict(best.params), sort_keys=True))
    warm = export_warm_start(cfg, study, trial_dir, paths.warm_start)
    write_metrics(
        paths.metrics,
        {
            **metrics,
            "best_value": best.value,
            "best_trial": best.number,
            "best_params": dict(best.params),
            "warm_start": {k: warm[k] for k in ("checkpoint", "epochs_run", "reason") if k in warm},
        },
    )
    tracker.client.log_metric(parent, "best_val_accuracy", best.value, step=final.finished)
    # tags, not params: MLflow params are immutable and a resumed study with a larger n_trials may find a new best
    tracker.tag(
        parent,
        {
            "best_trial": best.number,
            "finished_trials": final.finished,
            "n_trials": cfg.n_trials,
            **{f"best.{k}": v for k, v in best.params.items()},
        },
    )
    tracker.client.log_artifact(parent, str(paths.best_params))
    if final.running == 0:  # else a worker is still at it and closes the run when it ends; a resume reopens it
        tracker.client.set_terminated(parent, "FINISHED")
    return TuneSummary(
        study.study_name,
        cfg.n_trials,
        final.states(),
        ran,
        resumed,
        best.number,
        float(best.value),
        dict(best.params),
        parent,
    )
