"""tune stage: Optuna over real finetune runs on real aligned faces (the session's tiny project).

The expensive scenarios run once per module and several tests read their results: a study SIGKILLed mid-trial
and resumed (``lafs tune`` in subprocesses), and two workers sharing one sqlite storage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from lafs.config import ConfigError, FinetuneParams, Params, TuneParams, parse_params
from lafs.layout import Layout
from lafs.stages import StageError
from lafs.stages.finetune import FinetunePaths, WarmStart, train, tuned_overlay, warm_state
from lafs.stages.finetune import run as finetune_run
from lafs.stages.tune import PARENT_ATTR, TunePaths, _Objective, fingerprint
from lafs.stages.tune import search as run
from lafs.tuning.storage import first_open_lock, masked, storage_url
from lafs.tuning.trials import suggest, tally, trial_sampler

# A finetune trial of a few seconds on the tiny project (its teacher is lafs_vit_tiny with 68 landmarks).
FINETUNE = {
    "model": "lafs_vit_tiny",
    "landmark_net": "landmark_net_mnv3_small",
    "num_landmarks": 68,
    "epochs": 1,
    "warmup_epochs": 0,
    "batch_size": 8,
    "fewshot_k": 2,
    "num_workers": 0,
    "device": "cpu",
    "dtype": "fp32",
    "val_folds": 2,
    "val_pairs_per_fold": 8,
    "s": 16.0,
    "patience": None,
}
# A pruner certain to prune: no accuracy reaches the 1.01 floor, and it applies from epoch 1 on, so the enqueued
# one-epoch trial 0 completes and the two-epoch trial 1 is pruned after its second epoch (whatever it scores).
PRUNING = {
    "search_space": {"epochs": {"choices": [1, 2]}},
    "enqueue": [{"epochs": 1}, {"epochs": 2}],
    "pruner": {"name": "threshold", "lower": 1.01, "n_warmup_steps": 1},
    "sampler": {"n_startup_trials": 1},
    "heartbeat_s": 1,
}


# ------------------------------------------------------------------------------------------ fast checks


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lrr": {"low": 0.1, "high": 0.2}}, "'lrr' is not a finetune param"),
        ({"head": {"low": 0, "high": 1}}, "not numeric"),
        ({"epochs": {"low": 1.5, "high": 4}}, "is an integer"),
        ({"lr": {"low": -1.0, "high": 1.0}}, "greater than 0"),
        ({"head": {"choices": ["cosface", "softmax"]}}, "'softmax' is not a valid finetune.head"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "low must be < high"),
        ({"lr": {"low": 0.1, "high": 0.2, "choices": [0.1]}}, "not both"),
        ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "log scale needs low > 0"),
    ],
)
def test_search_space_must_hold_finetune_params_and_values_they_accept(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"tune": {"search_space": space}})


def test_enqueued_trials_must_lie_in_the_search_space():
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    with pytest.raises(ConfigError, match=r"enqueue\[0\]\.lr: 0\.5 is outside"):
        parse_params({"tune": {"search_space": space, "enqueue": [{"lr": 0.5}]}})
    with pytest.raises(ConfigError, match=r"enqueue\[0\]\.m: not in search_space"):
        parse_params({"tune": {"search_space": space, "enqueue": [{"m": 0.3}]}})


def test_params_yaml_spells_out_every_tune_setting():
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["tune"]
    assert set(data) == set(TuneParams.model_fields)
    cfg = parse_params({"tune": data}).tune  # valid, its enqueued baseline inside its search space
    assert cfg.enqueue and all(set(trial) <= set(cfg.search_space) for trial in cfg.enqueue)


def test_suggestions_follow_the_finetune_param_types():
    cfg = parse_params(
        {
            "tune": {
                "search_space": {
                    "epochs": {"low": 1, "high": 6},
                    "lr": {"low": 1e-5, "high": 1e-2, "log": True},
                    "head": {"choices": ["cosface", "arcface"]},
                    "fewshot_k": {"choices": [1, None]},
                }
            }
        }
    ).tune
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(8):
        values = suggest(study.ask(), cfg.search_space)
        assert type(values["epochs"]) is int and 1 <= values["epochs"] <= 6
        assert isinstance(values["lr"], float) and 1e-5 <= values["lr"] <= 1e-2
        assert values["head"] in ("cosface", "arcface") and values["fewshot_k"] in (1, None)
        FinetuneParams(**{**values, "warmup_epochs": 0})  # what a trial overlays is a valid finetune section


def test_storage_defaults_to_an_absolute_sqlite_file_and_passwords_are_masked(tmp_path, monkeypatch):
    paths = TunePaths.of(Layout(tmp_path), TuneParams().out)
    assert (
        storage_url(TuneParams(), paths.layout.root, paths.study_dir)
        == f"sqlite:///{tmp_path.resolve()}/models/tune/optuna.db"
    )
    relative = TuneParams(storage="sqlite:///studies/x.db")
    assert storage_url(relative, paths.layout.root, paths.study_dir) == f"sqlite:///{tmp_path.resolve()}/studies/x.db"
    url = "postgresql+psycopg://tuner:s3cr3t@db.example:5432/optuna"
    assert storage_url(TuneParams(storage=url), paths.layout.root, paths.study_dir) == url
    shown = masked(url)
    assert "s3cr3t" not in shown and "tuner:***@db.example:5432/optuna" in shown
    monkeypatch.setenv("TUNE_DB_PASSWORD", "s3cr3t")  # the password can stay out of params.yaml and dvc.lock
    from_env = TuneParams(storage="postgresql+psycopg://tuner:${TUNE_DB_PASSWORD}@db.example:5432/optuna")
    assert storage_url(from_env, paths.layout.root, paths.study_dir) == url


def test_budget_counts_finished_trials_not_killed_or_surplus_ones():
    def trial(state, **attrs):
        values = {"value": 0.5} if state == TrialState.COMPLETE else {}
        return optuna.trial.create_trial(state=state, user_attrs=attrs, **values)

    trials = [
        trial(TrialState.COMPLETE),
        trial(TrialState.PRUNED),
        trial(TrialState.FAIL, error="diverged"),
        trial(TrialState.FAIL),
        trial(TrialState.FAIL, surplus=True),
        trial(TrialState.WAITING),
    ]
    t = tally(trials)
    assert (t.complete, t.pruned, t.failed, t.killed, t.surplus, t.waiting) == (1, 1, 1, 1, 1, 1)
    assert t.finished == 3


def test_fingerprint_follows_search_and_inputs_not_budget(tmp_path):
    paths = TunePaths.of(Layout(tmp_path), TuneParams().out)
    for f in (paths.finetune.teacher, paths.finetune.landmark_net, paths.finetune.layout.splits / "a.csv"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    cfg, ft = TuneParams(), FinetuneParams()
    base = fingerprint(cfg, ft, paths)
    assert fingerprint(cfg.model_copy(update={"n_trials": 99, "timeout_s": 5.0}), ft, paths) == base
    assert fingerprint(cfg, ft.model_copy(update={"experiment": "elsewhere"}), paths) == base  # tune sets it
    assert fingerprint(cfg, ft.model_copy(update={"s": 32.0}), paths) != base
    assert (
        fingerprint(parse_params({"tune": {"search_space": {"lr": {"low": 1e-4, "high": 1e-3}}}}).tune, ft, paths)
        != base
    )
    (paths.finetune.layout.splits / "a.csv").write_text("y")
    assert fingerprint(cfg, ft, paths) != base


# ------------------------------------------------------------------------------------- real scenarios


def _project(tmp: Path, tiny_project: Path, tune: dict, **finetune) -> Path:
    """A project root reading the tiny project's data and models (linked) and writing its own outputs."""
    root = tmp / "project"
    (root / "models").mkdir(parents=True)
    (root / "data").symlink_to(tiny_project / "data")
    for name in ("landmark_net.pt", "pretrain"):
        (root / "models" / name).symlink_to(tiny_project / "models" / name)
    (root / "params.yaml").write_text(yaml.safe_dump({"finetune": {**FINETUNE, **finetune}, "tune": tune}))
    return root


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}


def _tune_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "lafs", "tune", "--params", str(root / "params.yaml"), "--root", str(root)]


def _ok(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, err: str) -> str:
    """``out`` of a ``lafs tune`` that succeeded; else fail showing its output."""
    assert proc.returncode == 0, f"lafs tune -> {proc.returncode}\n{out}\n{err[-4000:]}"
    return out


def _open_storage(url: str, timeout: float = 300.0) -> optuna.storages.RDBStorage:
    """The worker's storage once it exists (opened under the same lock the workers take)."""
    db = Path(url.removeprefix("sqlite:///"))
    deadline = time.monotonic() + timeout
    while not db.exists() or db.stat().st_size == 0:
        assert time.monotonic() < deadline, f"{db} never appeared"
        time.sleep(0.5)
    with first_open_lock(url):
        return optuna.storages.RDBStorage(url)


def _children(uri: str, experiment: str, parent: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def _workers(root: Path, env: dict[str, str], tmp: Path, tag: str) -> list[tuple[subprocess.Popen, Path]]:
    """Two ``lafs tune`` processes started together on the same project (so on the same study)."""
    out = []
    for n in range(2):
        log = tmp / f"{tag}-{n}.log"
        with log.open("w") as handle:  # the child keeps its own descriptor
            out.append(
                (
                    subprocess.Popen(
                        _tune_cmd(root), cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True
                    ),
                    log,
                )
            )
    return out


@dataclass
class Resumed:
    root: Path
    url: str  # Optuna storage
    uri: str  # MLflow
    killed_at: list[optuna.trial.FrozenTrial]  # the study's trials when both workers were killed
    parent_before: str
    study: optuna.Study
    outs: list[str]  # the resuming workers' output


N_TRIALS = 4


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_project) -> Resumed:
    """One scenario for every multi-process property (process start-up is the cost here): two ``lafs tune``
    workers start together on new Optuna and MLflow stores, both are SIGKILLed once a trial has completed
    while another runs, then two workers resume the study to the end."""
    tmp = tmp_path_factory.mktemp("tune_resume")
    root = _project(tmp, tiny_project, {**PRUNING, "n_trials": N_TRIALS, "study_name": "kill-resume"})
    url = f"sqlite:///{root.resolve()}/models/tune/optuna.db"
    env = _env(tmp)
    first = _workers(root, env, tmp, "killed")
    try:
        storage = _open_storage(url)
        deadline = time.monotonic() + 400
        while True:
            for proc, log in first:
                assert proc.poll() is None, f"a worker ended before it was killed:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, first[0][1].read_text()[-4000:]
            try:
                study = optuna.load_study(study_name="kill-resume", storage=storage)
            except KeyError:  # not created yet
                time.sleep(0.5)
                continue
            trials = study.get_trials(deepcopy=True)
            states = [t.state for t in trials]
            if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                break
            time.sleep(0.3)
    finally:
        for proc, _ in first:
            proc.kill()  # SIGKILL: no handler runs, trials stay RUNNING with their heartbeats stopped
            proc.wait(timeout=30)
    parent_before = study.user_attrs[PARENT_ATTR]
    outs = []
    for proc, log in _workers(root, env, tmp, "resumed"):
        proc.wait(timeout=600)
        outs.append(_ok(proc, log.read_text(), ""))
    study = optuna.load_study(study_name="kill-resume", storage=storage)
    return Resumed(root, url, env["MLFLOW_TRACKING_URI"], trials, parent_before, study, outs)


def _ran(out: str) -> int:
    return int(out.split("ran ")[1].split()[0])


@pytest.mark.slow
def test_killed_study_resumes_keeping_finished_trials_and_running_only_the_rest(resumed):
    before = {t.number: t for t in resumed.killed_at}
    after = {t.number: t for t in resumed.study.get_trials()}
    finished_before = [n for n, t in before.items() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    for n in finished_before:  # kept as they were, not rerun
        assert (after[n].state, after[n].value) == (before[n].state, before[n].value)
        assert after[n].datetime_complete == before[n].datetime_complete
    killed = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert killed
    for n in killed:  # stale once its heartbeat stopped: failed (not counted) and re-queued once, same params
        assert after[n].state == TrialState.FAIL and "error" not in after[n].user_attrs
        (retry,) = [t for t in after.values() if t.system_attrs.get("failed_trial") == n]
        if n == 1:
            assert retry.params == {"epochs": 2}  # trial 1's enqueued params
    t = tally(after.values())
    assert (t.finished, t.killed, t.running, t.waiting) == (N_TRIALS, len(killed), 0, 0)
    assert sum(_ran(out) for out in resumed.outs) == N_TRIALS - len(finished_before)
    assert all("resumed with " in out for out in resumed.outs)
    kept = {p.parent.name for p in (resumed.root / "models" / "tune").rglob("*.pt")}
    assert kept == {f"trial_{resumed.study.best_trial.number:04d}"}  # only the best trial keeps its weights


@pytest.mark.slow
def test_two_workers_share_one_study_and_stop_at_n_trials_together(resumed):
    """Neither worker starts a trial beyond the budget: the study ends with exactly n_trials finished (a
    trial that lost a race for the last slot would be a FAIL marked ``surplus``, not counted)."""
    study = resumed.study
    counted = [
        t
        for t in study.get_trials()
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and "error" in t.user_attrs)
    ]
    assert len(counted) == N_TRIALS
    summaries = [out.strip().splitlines()[-1] for out in resumed.outs]
    expected = tally(study.get_trials()).states()
    for line in summaries:  # both end on the same, complete study
        assert line.startswith("study kill-resume:")
        assert ", ".join(f"{k} {v}" for k, v in expected.items() if v) in line


def test_trial_samplers_are_seeded_per_trial():
    """Parallel workers with one tune.sampler.seed must not draw the same params for their startup trials."""
    cfg = TuneParams()
    draws = []
    for number in range(4):
        study = optuna.create_study(sampler=trial_sampler(cfg, number))
        draws.append(study.ask().suggest_float("lr", 1e-5, 1e-2, log=True))
    assert len(set(draws)) == 4
    study = optuna.create_study(sampler=trial_sampler(cfg, 2))
    assert study.ask().suggest_float("lr", 1e-5, 1e-2, log=True) == draws[2]  # and resumes repeat them


@pytest.mark.slow
def test_pruned_trial_is_recorded_in_the_study_and_as_a_child_run(resumed):
    pruned = [t for t in resumed.study.get_trials() if t.state == TrialState.PRUNED]
    assert pruned and pruned[0].system_attrs.get("failed_trial") == 1  # the re-queued two-epoch trial
    assert all(t.params["epochs"] == 2 and t.user_attrs["pruned_at_epoch"] == 1 for t in pruned)
    assert all(sorted(t.intermediate_values) == [0, 1] for t in pruned)  # reported every epoch
    runs = {r.info.run_id: r for r in _children(resumed.uri, "lafs-tune", resumed.parent_before)}
    for trial in pruned:
        run_ = runs[trial.user_attrs["mlflow_run_id"]]
        assert run_.info.status == "KILLED"
        assert run_.data.tags["pruned"] == "true" and run_.data.tags["optuna.trial"] == str(trial.number)


@pytest.mark.slow
def test_every_trial_is_a_child_of_one_parent_run_kept_across_the_resume(resumed):
    study = resumed.study
    assert study.user_attrs[PARENT_ATTR] == resumed.parent_before
    client = mlflow.MlflowClient(resumed.uri)
    exp = client.get_experiment_by_name("lafs-tune")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [resumed.parent_before]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["storage"] == resumed.url
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    children = {r.info.run_id: r for r in _children(resumed.uri, "lafs-tune", resumed.parent_before)}
    finished = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == N_TRIALS
    for trial in finished:
        run_ = children[trial.user_attrs["mlflow_run_id"]]
        assert run_.data.tags["optuna.state"] == trial.state.name
        assert run_.data.params["epochs"] == str(trial.params["epochs"])  # the trial's finetune params
    assert len(children) >= len(finished)  # plus the killed trial's run, if it had started
    assert all(r.info.status != "RUNNING" for r in children.values())  # the dead worker's run was closed


@pytest.mark.slow
def test_best_params_file_is_valid_finetune_params_that_finetune_overlays(resumed):
    study = resumed.study
    best_file = resumed.root / "params" / "best_finetune.yaml"
    text = best_file.read_text()
    assert "kill-resume" in text.splitlines()[0] and f"trial #{study.best_trial.number}" in text
    assert yaml.safe_load(text) == study.best_params
    base = FinetuneParams(**FINETUNE)  # tuned_params: params/best_finetune.yaml, as in params.yaml
    cfg, overlay = tuned_overlay(base, Layout(resumed.root))
    assert overlay == study.best_params and cfg.epochs == study.best_params["epochs"] and cfg.s == base.s
    metrics = json.loads((resumed.root / "metrics" / "tune.json").read_text())
    assert metrics["best_value"] == pytest.approx(study.best_value)
    assert metrics["trials"] == tally(study.get_trials()).states()
    assert metrics["trials"]["complete"] + metrics["trials"]["pruned"] == N_TRIALS


def test_a_finetune_section_that_cannot_train_fails_before_any_trial(tiny_project, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = _project(tmp_path, tiny_project, {})
    (root / "models" / "pretrain").unlink()  # no pretrained teacher
    with pytest.raises(StageError, match=r"cannot train, so no trial can: .*teacher_backbone\.pt not found"):
        run(TuneParams(), FinetuneParams(**FINETUNE), TunePaths.of(Layout(root), TuneParams().out))
    assert not (root / "models" / "tune").exists()  # no study was opened


@pytest.mark.slow
def test_other_params_on_an_existing_study_are_refused(resumed, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", resumed.uri)
    cfg = parse_params({"tune": {**PRUNING, "n_trials": N_TRIALS, "study_name": "kill-resume"}}).tune
    other = FinetuneParams(**{**FINETUNE, "s": 32.0})
    with pytest.raises(StageError, match="created with other search/finetune params"):
        run(cfg, other, TunePaths.of(Layout(resumed.root), TuneParams().out))


@pytest.mark.slow
def test_timeout_stops_starting_trials_and_a_larger_budget_resumes_the_study(resumed, tmp_path, monkeypatch):
    """On a copy of the resumed study: n_trials 4 -> 10 resumes it (same parent run), and a timeout that has
    passed before the first trial could start starts none."""
    shutil.copy(resumed.root / "models" / "tune" / "optuna.db", tmp_path / "optuna.db")
    shutil.copy(Path(resumed.uri.removeprefix("sqlite:///")), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = parse_params(
        {"tune": {**PRUNING, "n_trials": 10, "timeout_s": 1e-3, "study_name": "kill-resume", "storage": storage}}
    ).tune
    layout = Layout(resumed.root)
    paths = TunePaths(
        layout,
        FinetunePaths.of(layout),
        tmp_path / "tune",
        tmp_path / "best.yaml",
        tmp_path / "tune.json",
        tmp_path / "tune_best",
    )
    summary = run(cfg, FinetuneParams(**FINETUNE), paths)
    assert (summary.ran, summary.resumed) == (0, N_TRIALS)
    assert len(optuna.load_study(study_name="kill-resume", storage=storage).trials) == len(resumed.study.trials)
    assert yaml.safe_load(paths.best_params.read_text()) == resumed.study.best_params
    parent = mlflow.MlflowClient(uri).get_run(summary.parent_run_id)
    assert parent.info.run_id == resumed.parent_before  # reopened, then closed again
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["finished_trials"], parent.data.tags["n_trials"]) == (str(N_TRIALS), "10")


def test_trial_overrides_fix_finetune_params_of_every_trial_but_not_searched_ones():
    base = {"search_space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}
    with pytest.raises(ConfigError, match=r"trial_overrides\.nope: not a finetune param"):
        parse_params({"tune": {**base, "trial_overrides": {"nope": 1}}})
    with pytest.raises(ConfigError, match=r"trial_overrides\.lr: searched in search_space"):
        parse_params({"tune": {**base, "trial_overrides": {"lr": 0.1}}})
    cfg = parse_params({"tune": {**base, "trial_overrides": {"epochs": 2}}}).tune
    objective = _Objective.__new__(_Objective)
    objective.cfg, objective.finetune_cfg = cfg, FinetuneParams(**{**FINETUNE, "epochs": 6})
    trial = objective.trial_params({"lr": 0.002})
    assert (trial.epochs, trial.lr, trial.tuned_params) == (2, 0.002, None)


def test_final_finetune_continues_the_best_truncated_trial_exactly(tiny_project, tmp_path, monkeypatch):
    """With trials truncated on the final schedule, the best trial's checkpoint goes to models/tune_best and the
    finetune stage continues it: the same weights and validation curve as training the best params from the
    first step, minus the trial's epochs. Other params do not continue it; the other trials' weights are gone."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = _project(tmp_path, tiny_project, {})
    schedule = {**FINETUNE, "epochs": 3, "warmup_epochs": 1}
    tune = TuneParams(
        n_trials=2,
        trial_epochs=1,
        search_space={"m": {"low": 0.2, "high": 0.4}},
        sampler={"n_startup_trials": 1},
        pruner={"name": "none"},
        study_name="continued",
    )
    summary = run(tune, FinetuneParams(**schedule), TunePaths.of(Layout(root), TuneParams().out))
    paths = FinetunePaths.of(Layout(root))
    ws = WarmStart(paths.warm_start)
    info = json.loads(ws.info.read_text())
    assert ws.last.exists() and ws.model.exists()
    assert (info["checkpoint"], info["trial"], info["epochs_run"]) == (True, summary.best_trial, 1)
    trial_dirs = sorted((root / "models" / "tune" / "continued").glob("trial_*"))
    assert [sorted(p.name for p in d.glob("*.pt")) != [] for d in trial_dirs] == [
        int(d.name[-4:]) == summary.best_trial for d in trial_dirs
    ]

    final_cfg = FinetuneParams(**schedule, tuned_params="params/best_finetune.yaml")
    continued = finetune_run(Params(finetune=final_cfg), Layout(root))
    iters_per_epoch = continued.iterations // 3
    assert continued.warm_start["trial"] == summary.best_trial
    assert continued.resumed_from == iters_per_epoch
    assert continued.val_history[0] == pytest.approx(summary.best_value, abs=0)

    tuned, _ = tuned_overlay(final_cfg, Layout(root))
    fresh_paths = replace(paths, out_dir=tmp_path / "fresh", metrics=tmp_path / "fresh.json", warm_start=None)
    fresh = train(tuned, fresh_paths)
    assert fresh.resumed_from == 0 and fresh.val_history == continued.val_history
    ours, theirs = torch.load(paths.model, weights_only=True), torch.load(fresh_paths.model, weights_only=True)
    assert ours["epoch"] == theirs["epoch"]
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key

    state = torch.load(ws.last, weights_only=True)
    for changed in ({"epochs": 4}, {"lr": tuned.lr * 2}, {"seed": 1}):
        assert warm_state(ws.folder, tuned.model_copy(update=changed), state["inputs"]) == (None, {})
    bookkeeping = {"experiment": "elsewhere", "checkpoint_every": 7, "num_workers": 2}
    assert warm_state(ws.folder, tuned.model_copy(update=bookkeeping), state["inputs"])[0] is not None
    assert warm_state(ws.folder, tuned, {**state["inputs"], "teacher": "0" * 64}) == (None, {})


def test_compressed_trials_leave_no_checkpoint_to_continue(tiny_project, tmp_path, monkeypatch):
    """Trials on another schedule (tune.trial_overrides) are not the final run's first epochs: tune_best records
    why and holds no weights, and the finetune trains from its first step."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = _project(tmp_path, tiny_project, {})
    tune = TuneParams(n_trials=1, trial_overrides={"epochs": 1, "warmup_epochs": 0}, study_name="compressed")
    run(
        tune,
        FinetuneParams(**{**FINETUNE, "epochs": 2, "warmup_epochs": 1}),
        TunePaths.of(Layout(root), TuneParams().out),
    )
    ws = WarmStart(Layout(root).tune_best)
    info = json.loads(ws.info.read_text())
    assert info["checkpoint"] is False and "trial_overrides" in info["reason"]
    assert not ws.last.exists() and not ws.model.exists()
    assert json.loads((root / "metrics" / "tune.json").read_text())["warm_start"]["checkpoint"] is False


def test_trial_epochs_truncate_each_trial_on_the_final_schedule(tiny_project, tmp_path, monkeypatch):
    """tune.trial_epochs: every trial runs the first epochs of the finetune's own (3-epoch) schedule, not a
    compressed one; its value is the best validation accuracy so far, and its run is closed as finished."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    root = _project(tmp_path, tiny_project, {})
    tune = TuneParams(
        n_trials=2,
        trial_epochs=1,
        search_space={"m": {"low": 0.2, "high": 0.4}},
        sampler={"n_startup_trials": 1},
        study_name="truncated",
    )
    run(
        tune,
        FinetuneParams(**{**FINETUNE, "epochs": 3, "warmup_epochs": 1}),
        TunePaths.of(Layout(root), TuneParams().out),
    )
    study = optuna.load_study(study_name="truncated", storage=storage_url(tune, root, root / "models" / "tune"))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(t.user_attrs["epochs_run"] == 1 and t.value == t.intermediate_values[0] for t in trials)
    client = mlflow.MlflowClient(uri)
    for t in trials:
        finetune_run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert finetune_run.info.status == "FINISHED" and finetune_run.data.params["epochs"] == "3"
