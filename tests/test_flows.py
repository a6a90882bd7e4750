"""The ``lafs-pipeline`` Prefect flow over the real DVC stages, on a tiny real project (a git + DVC copy).

Real Prefect runs against one session-wide test server. The flow runs the data stages (ingest -> split; the
torch stages would add minutes and run through the same flow in test_e2e) through ``dvc repro``; a second
run skips every stage (DVC's lock decides, not Prefect); an override reruns exactly the stage that reads it
and is recorded (run parameters, artifact); an S3 endpoint that is down when ingest starts is retried with
backoff until it is up; a genuine stage error is not retried.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import boto3
import pytest
import yaml
from conftest import REPO, TINY_RUN, copy_project, free_port, set_run, start_moto_server

from flows.dvc_runner import StageFailed, is_transient, pipeline_stages, select_stages, stage_status
from flows.pipeline import REPORT_KEY, pipeline

# The data stages: real photos, detector and dlib, GX; the training stages run through the flow in test_e2e.
DATA_STAGES = ["ingest", "landmarks", "validate", "split"]
FAST_RETRY = {"retries": 3, "retry_delay_seconds": 3.0}  # backoff 3, 6, 12 s


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _task_runs(flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def _run(**kwargs: Any) -> tuple[dict[str, Any] | BaseException, UUID]:
    """One flow run; (its report or its exception, its flow-run id)."""
    state = pipeline(**kwargs, return_state=True)
    return state.result(raise_on_failure=False), state.state_details.flow_run_id


def _results(report: dict[str, Any]) -> dict[str, str]:
    return {r["stage"]: r["result"] for r in report["stages"]}


def _mtimes(root: Path) -> dict[str, int]:
    paths = [p for top in ("data", "models", "metrics") for p in (root / top).rglob("*")]
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in paths if p.is_file()}


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, prefect_api: str, lfw_subset: Path, shared: Path
) -> Iterator[tuple[Path, dict[str, Any], UUID]]:
    """A tiny real project after one flow run over the data stages: (root, report, flow-run id)."""
    tmp = tmp_path_factory.mktemp("flows")
    root, env = copy_project(tmp)
    set_run(root, TINY_RUN)
    with pytest.MonkeyPatch.context() as mp:  # the stages run in subprocesses: they get the copy's env
        for key in ("PATH", "PYTHONPATH", "MLFLOW_TRACKING_URI"):
            mp.setenv(key, env[key])
        report, run_id = _run(
            data=str(lfw_subset), models=str(shared / "models"), stages=DATA_STAGES, root=str(root), **FAST_RETRY
        )
        assert isinstance(report, dict), f"first flow run failed: {report}"
        yield root, report, run_id


def test_stage_order_comes_from_dvc_and_respects_every_dependency():
    order = pipeline_stages(REPO)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(order) == sorted(stages)
    outs = {}
    for name, spec in stages.items():
        for out in [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]:
            outs[next(iter(out)) if isinstance(out, dict) else out] = name
    for name, spec in stages.items():
        for dep in spec.get("deps", []):
            producer = next((s for o, s in outs.items() if dep == o or dep.startswith(f"{o}/")), None)
            if producer is not None:
                assert order.index(producer) < order.index(name), f"{producer} must run before {name}"
    assert select_stages(order, ["pretrain", "ingest"]) == ["ingest", "pretrain"]
    with pytest.raises(ValueError, match="unknown stage"):
        select_stages(order, ["ingest", "no_such_stage"])


# Tails of real failed `dvc repro` runs (MLflow killed under landmark_net; S3 endpoint down under ingest; a
# preempted pretrain; split refusing a missing pairs file; a crash) and how they must be classified.
FAILURES = [
    (
        "mlflow.exceptions.MlflowException: API request to http://127.0.0.1:39701/api/2.0/mlflow/experiments/"
        "get-by-name failed with exception HTTPConnectionPool(host='127.0.0.1', port=39701): Max retries exceeded "
        "with url: ... [Errno 111] Connection refused\nERROR: failed to reproduce 'landmark_net': failed to run: "
        "lafs landmark_net, exited with 1",
        True,
    ),
    (
        "error: cannot list s3://faces/lfw at http://127.0.0.1:4566: Could not connect to the endpoint URL: "
        '"http://127.0.0.1:4566/faces?list-type=2" (check the bucket name, ...)\nERROR: failed to reproduce '
        "'ingest': failed to run: lafs ingest, exited with 1",
        True,
    ),
    (
        "SIGTERM: checkpoint written at iteration 40\nERROR: failed to reproduce 'pretrain': failed to run: lafs "
        "pretrain --out models/pretrain --restart-on-change, exited with 143",
        True,
    ),
    ("ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated abruptly.", True),
    (
        "error: split.pairs_file: [Errno 2] No such file or directory: '/x/pairs.txt'\nERROR: failed to reproduce "
        "'split': failed to run: lafs split, exited with 1",
        False,
    ),
    (
        "ValueError: operands could not be broadcast together\nERROR: failed to reproduce 'finetune': failed to run: "
        "lafs finetune --out models/finetune --restart-on-change, exited with 1",
        False,
    ),
]


@pytest.mark.parametrize(("tail", "transient"), FAILURES)
def test_failures_are_classified_from_the_stage_output(tail, transient):
    assert is_transient(255, tail) is transient  # DVC exits 255 whatever the command's own status was


def test_first_run_runs_every_stage_through_dvc(project):
    root, report, run_id = project
    assert report["status"] == "completed"
    assert _results(report) == dict.fromkeys(DATA_STAGES, "ran")
    assert all(r["reasons"] and r["attempts"] == 1 for r in report["stages"])  # stale before, first attempt
    for stage in DATA_STAGES:
        assert stage_status(root, stage) == [], stage  # DVC recorded every stage as done
    assert (root / "data/splits/pairs.csv").is_file()
    runs = _task_runs(run_id)
    assert {f"repro-{s}" for s in DATA_STAGES} <= set(runs)
    assert all(runs[f"repro-{s}"].state.is_completed() for s in DATA_STAGES)
    # DATA/MODELS went the make-pipeline way: set in params.yaml, beside the values set before.
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["ingest"]["source"] == report["overrides"]["ingest.source"]
    assert report["changed"]["ingest.source.new"] == params["ingest"]["source"]
    assert params["ingest"]["max_identities"] == TINY_RUN["ingest"]["max_identities"]


def test_second_run_skips_every_stage(project, monkeypatch):
    root, _, _ = project
    monkeypatch.setenv("PYTHONPATH", str(root))
    before = _mtimes(root)
    report, _ = _run(stages=DATA_STAGES, root=str(root), **FAST_RETRY)
    assert _results(report) == dict.fromkeys(DATA_STAGES, "skipped")
    assert all(r["reasons"] == [] for r in report["stages"])
    assert _mtimes(root) == before


def test_override_reruns_only_the_stage_that_reads_it_and_is_recorded(project, monkeypatch):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    root, _, _ = project
    monkeypatch.setenv("PYTHONPATH", str(root))
    seed = yaml.safe_load((root / "params.yaml").read_text())["split"]["seed"] + 1
    report, run_id = _run(overrides={"split.seed": seed}, stages=DATA_STAGES, root=str(root), **FAST_RETRY)
    assert _results(report) == {**dict.fromkeys(DATA_STAGES, "skipped"), "split": "ran"}
    (why,) = [r["reasons"] for r in report["stages"] if r["stage"] == "split"]
    assert why == [{"changed deps": {"params.yaml": {"split": "modified"}}}]
    assert yaml.safe_load((root / "params.yaml").read_text())["split"]["seed"] == seed
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["split"]["params"]["params.yaml"]["split"]["seed"] == seed

    with _client() as client:
        assert client.read_flow_run(run_id).parameters["overrides"] == {"split.seed": seed}
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[REPORT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
            )
        )
    assert f'"split.seed": {seed}' in artifact.data  # the resolved overrides, as JSON
    assert "| `split` | ran | 1 |" in artifact.data and "| `ingest` | skipped | 1 |" in artifact.data


def test_genuine_stage_error_is_not_retried_and_keeps_finished_stages(project, monkeypatch, tmp_path):
    root, _, _ = project
    monkeypatch.setenv("PYTHONPATH", str(root))
    missing = tmp_path / "no_such_pairs.txt"
    try:
        # Bad input: the verification protocol file does not exist. The stage refuses (StageError, exit 1).
        error, run_id = _run(
            overrides={"split.pairs_file": str(missing)}, stages=DATA_STAGES, root=str(root), **FAST_RETRY
        )
        assert isinstance(error, StageFailed) and not error.transient, error
        assert error.stage == "split" and "error: split.pairs_file" in error.tail  # the stage's own message
        assert "not retried" in str(error)
        runs = _task_runs(run_id)
        assert runs["repro-split"].state.is_failed() and runs["repro-split"].run_count == 1  # no retry
        for stage in ("ingest", "landmarks", "validate"):  # what finished before is still recorded as done
            assert stage_status(root, stage) == [], stage
    finally:  # back to generated pairs (an empty value removes the key): split's lock entry matches again
        report, _ = _run(overrides={"split.pairs_file": ""}, stages=["split"], root=str(root), **FAST_RETRY)
    assert isinstance(report, dict) and stage_status(root, "split") == []


def _start_s3_when_retrying(port: int, log: Path, photos: list[Path], started: list, done: threading.Event) -> None:
    """Wait until the ingest task is waiting for its retry, then bring the S3 endpoint up with the photos."""
    import time

    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateName,
    )

    waiting = TaskRunFilter(
        name=TaskRunFilterName(any_=["repro-ingest"]),
        state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["AwaitingRetry"])),
    )
    deadline = time.monotonic() + 120
    with _client() as client:
        while not client.read_task_runs(task_run_filter=waiting):
            if done.is_set() or time.monotonic() > deadline:  # the flow ended (failed) without a retry
                return
            time.sleep(0.3)
    started.append(start_moto_server(port, log))
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    s3.create_bucket(Bucket="faces")
    for photo in photos:
        s3.upload_file(str(photo), "faces", f"lfw/{photo.parent.name}/{photo.name}")


def test_unreachable_s3_is_retried_with_backoff(prefect_api, lfw_subset, tmp_path, monkeypatch):
    root, env = copy_project(tmp_path)
    port = free_port()  # nothing listens here until the first attempt has failed
    for key in ("PATH", "PYTHONPATH", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, env[key])
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    identities = sorted(p for p in lfw_subset.iterdir() if len(list(p.glob("*.jpg"))) >= 2)[:3]
    photos = [f for d in identities for f in sorted(d.glob("*.jpg"))[:2]]
    started: list = []
    done = threading.Event()
    helper = threading.Thread(target=_start_s3_when_retrying, args=(port, tmp_path / "moto.log", photos, started, done))
    helper.start()
    try:
        report, run_id = _run(
            data="s3://faces/lfw",
            overrides={"ingest.s3_endpoint_url": f"http://127.0.0.1:{port}"},
            stages=["ingest"],
            root=str(root),
            **FAST_RETRY,
        )
        done.set()
        helper.join(timeout=150)
        assert not isinstance(report, BaseException) or started, f"flow failed before any retry: {report}"
        assert started, "the ingest task never waited for a retry"
        assert isinstance(report, dict), f"flow failed although S3 came up: {report}"
        (row,) = report["stages"]
        assert row["result"] == "ran" and row["attempts"] >= 2
        assert _task_runs(run_id)["repro-ingest"].run_count == row["attempts"]
        metrics = json.loads((root / "metrics/ingest.json").read_text())
        assert metrics["images"] == len(photos)
    finally:
        done.set()
        helper.join(timeout=150)
        for proc in started:
            proc.terminate()
            proc.wait(timeout=10)


def test_promote_flow_builds_the_lafs_promote_command_and_refuses_contradictions(tmp_path):
    from flows.promote import promote_args

    report = tmp_path / "promotion.md"
    assert promote_args("lafs-face", "3", None, False, {"register.min_gain": 0.01}, report) == [
        "promote",
        "--report",
        str(report),
        "--model-name",
        "lafs-face",
        "--version",
        "3",
        "--set",
        "register.min_gain=0.01",
    ]
    assert promote_args(None, None, None, True, None, report)[3:] == ["--rollback"]
    with pytest.raises(ValueError, match="rollback"):
        promote_args(None, "3", None, True, None, report)
    with pytest.raises(ValueError, match="not both"):
        promote_args(None, "3", "challenger", False, None, report)


def test_tune_helpers_take_the_visible_gpus_in_turn(monkeypatch):
    from flows.search import helper_gpu, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    assert [helper_gpu(n, ["2", "3"]) for n in (1, 2, 3)] == [
        {"CUDA_VISIBLE_DEVICES": "3"},
        {"CUDA_VISIBLE_DEVICES": "2"},
        {"CUDA_VISIBLE_DEVICES": "3"},
    ]
    assert helper_gpu(1, ["0"]) == {} and helper_gpu(1, []) == {}  # one GPU or none: nothing to spread
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
