"""End to end: the whole pipeline through Prefect against real local services, on real faces.

What runs, all on 127.0.0.1 (``infra/local/services.py``: moto S3, MLflow server with S3-proxied artifacts,
Prefect server), in a fresh git + DVC copy of the project with tiny params:

1. ``prefect.yaml`` is deployed (``prefect deploy --all``: nightly pipeline, weekly search, on-demand promote)
   and a process worker runs ``lafs-pipeline/nightly``: every ``dvc.yaml`` stage from ingest to register.
2. The MLflow server is killed as the first stage that logs to it (``landmark_net``) starts, and restarted
   once that stage's task is waiting for its retry: the flow's transient-failure retry completes the run,
   no finished stage is lost (``dvc status`` clean), and the stage really was retried.
3. The flow pushes the outputs to the DVC remote on S3; a fresh ``git clone`` + ``dvc pull`` restores them.
4. The model is registered and holds the ``champion`` alias; a second run (``python -m flows.pipeline
   --stage finetune ... --stage register``, recorded on the same server) with a deliberately worse model (no
   pretraining: a random ViT) registers a challenger that the gate rejects: ``champion`` stays put.
5. Promotion on demand through the ``lafs-promote/on-demand`` deployment: the gate for the challenger again
   (rejected, the decision recorded as an artifact), champion unchanged.
6. The AWS secret of the session appears in no log (services, worker, flow runs), no MLflow param or tag, no
   file DVC or the flow wrote; every service URL is 127.0.0.1, no proxy is set, MLflow artifacts are proxied.
7. ``lafs-search/weekly`` through the worker: the DVC-recorded tune and one helper worker share the Optuna
   study, which ends with exactly ``n_trials``; DVC's record of tune's outputs still holds afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from conftest import BIN, REPO, TINY_PROJECT, LocalServices, copy_project, process_group, set_run, sh

pytestmark = pytest.mark.slow

REGISTRY_STAGES = ("tune", "finetune", "export", "evaluate", "register")
# TINY_PROJECT (20 identities x <= 5 photos) for the data and pretraining stages, and the training, export,
# evaluation and registry stages scaled to seconds: one Optuna trial (the enqueued baseline), one epoch.
FINETUNE = {
    "model": "lafs_vit_tiny",
    "landmark_net": "landmark_net_mnv3_small",
    "num_landmarks": 68,
    "epochs": 1,
    "warmup_epochs": 0,
    "batch_size": 8,
    "num_workers": 0,
    "device": "cpu",
    "dtype": "fp32",
    "val_folds": 2,
    "val_pairs_per_fold": 8,
    "s": 16.0,
}
E2E_RUN = {
    **TINY_PROJECT,
    "validate": {"min_eval_identities": 4},
    "tune": {"n_trials": 1},
    "finetune": FINETUNE,
    "export": {"parity_images": 4},
    "evaluate": {"fewshot_k": [1, 2], "latency_images": 3, "latency_warmup": 1, "candidates": ["onnx"]},
    "register": {"min_margin_over_floor": None},  # a few steps on 48 faces cannot be asked to beat a floor
}
# The challenger of run 2: no self-supervised pretraining (a random ViT), run through finetune -> register only
# (tune, which tracks the finetune params too, stays stale: its best params from run 1 still overlay finetune).
# On 16 pairs either model can win by one pair, so the gate asks a gain of 0.5 accuracy that no model at this
# scale reaches: the rejection, and the champion staying put, must not depend on which one it was.
WORSE = {"finetune.init": "scratch", "register.min_gain": 0.5}
AFTER_TUNE = ["finetune", "export", "evaluate", "register"]
RETRY = {"retries": 4, "retry_delay_seconds": 8.0}  # backoff 8, 16, 32, 64 s: covers an MLflow restart
FLOW_TIMEOUT = 900


@contextmanager
def prefect(url: str) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def _task_runs(url: str, flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with prefect(url) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def _wait_for_task(url: str, flow_run_id: UUID, name: str, states: set[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _task_runs(url, flow_run_id).get(name)
        if run is not None and run.state is not None and run.state.name in states:
            return True
        time.sleep(0.3)
    return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _report_rows(url: str, flow_run_id: UUID) -> dict[str, str]:
    """Stage -> result from the flow run's table artifact."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with prefect(url) as client:
        (table,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["lafs-pipeline-report-stages"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    return {r["stage"]: r["result"] for r in rows}


@pytest.fixture(scope="module")
def stack(
    local_services: LocalServices, tmp_path_factory: pytest.TempPathFactory, lfw_subset: Path, shared: Path
) -> Iterator[dict[str, Any]]:
    """The project copy, deployed to the local Prefect server, with a process worker running."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = [s for s in REGISTRY_STAGES if s not in stages]
    if missing:
        pytest.fail(f"dvc.yaml has no {missing} stage(s) yet: the end-to-end test needs the full pipeline")
    local_services.ensure_running()
    tmp = tmp_path_factory.mktemp("e2e")
    root, project_env = copy_project(tmp)
    set_run(root, E2E_RUN)
    env = {
        **local_services.env,
        "PYTHONPATH": project_env["PYTHONPATH"],
        "PREFECT_HOME": str(tmp / "prefect"),
        "SCIKIT_LEARN_DATA": project_env["SCIKIT_LEARN_DATA"],
        "DVC_NO_ANALYTICS": "1",
        # fail fast while MLflow is down (its client otherwise retries for minutes): the flow retries
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "OMP_NUM_THREADS": "2",
    }
    local_services.run("dvc-remote", "--repo", str(root))
    prefect_cli = str(BIN / "prefect")
    sh([prefect_cli, "work-pool", "create", "lafs-process", "--type", "process", "--overwrite"], root, env)
    sh([prefect_cli, "--no-prompt", "deploy", "--all"], root, env, timeout=300)
    log = tmp / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [prefect_cli, "worker", "start", "--pool", "lafs-process", "--type", "process"],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield {
            "root": root,
            "env": env,
            "tmp": tmp,
            "worker_log": log,
            "data": str(lfw_subset),
            "models": str(shared / "models"),
        }
    finally:
        os.killpg(worker.pid, signal.SIGINT)  # a Prefect worker shuts down on Ctrl-C (it ignores SIGTERM here)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        assert not process_group(worker.pid), "worker left processes behind"


def _kill_and_restart_mlflow(services: LocalServices, url: str, flow_run_id: UUID, events: list[str]) -> None:
    """Kill MLflow as landmark_net (the first stage that logs to it) starts; restart it once that stage's task
    waits for a retry (or after 240 s, so the run can finish and the test fails on the missing retry)."""
    if not _wait_for_task(url, flow_run_id, "repro-landmark_net", {"Running"}, timeout=FLOW_TIMEOUT):
        events.append("landmark_net never started")
        return
    pid = services.state()["services"]["mlflow"]["pid"]
    os.killpg(pid, signal.SIGKILL)  # our own server's process group
    events.append("killed")
    retried = _wait_for_task(url, flow_run_id, "repro-landmark_net", {"AwaitingRetry"}, timeout=240)
    events.append("awaiting retry" if retried else "no retry seen")
    services.run("start", "mlflow")
    events.append("restarted")


def _wait_for_flow_run(url: str, flow_run_id: UUID, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with prefect(url) as client:
            run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    pytest.fail(f"flow run {flow_run_id} not finished after {timeout} s")


def _yaml(value: Any) -> str:
    """``value`` as the one-line YAML that ``--set KEY=VALUE`` parses back (``1.0e-07``, not JSON's ``1e-07``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("...\n").strip()


def _secret_free(secret: str, *texts: str) -> None:
    for i, text in enumerate(texts):
        assert secret not in text, f"the AWS secret leaked into text #{i}"


def test_full_pipeline_through_prefect_on_local_services(stack, local_services):
    import boto3
    import mlflow
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.deployments import run_deployment

    root, env = stack["root"], stack["env"]
    url, mlflow_url = env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"]
    assert url.startswith("http://127.0.0.1:") and mlflow_url.startswith("http://127.0.0.1:")
    assert not any("proxy" in k.lower() and "no_proxy" not in k.lower() for k in env)
    order = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]

    with prefect(url) as client:
        names = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
    assert {"lafs-pipeline/nightly", "lafs-search/weekly", "lafs-promote/on-demand"} <= names

    # --- run 1: the deployment, executed by the worker; MLflow dies and comes back mid-run ------------------
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        flow_run = run_deployment(
            "lafs-pipeline/nightly",
            timeout=0,
            parameters={"data": stack["data"], "models": stack["models"], "push": True, **RETRY},
        )
    events: list[str] = []
    chaos = threading.Thread(target=_kill_and_restart_mlflow, args=(local_services, url, flow_run.id, events))
    chaos.start()
    finished = _wait_for_flow_run(url, flow_run.id, FLOW_TIMEOUT)
    chaos.join(timeout=300)
    worker_log = stack["worker_log"].read_text()
    assert finished.state.is_completed(), f"{finished.state}\n{worker_log[-6000:]}"
    assert events == ["killed", "awaiting retry", "restarted"], events
    runs = _task_runs(url, flow_run.id)
    assert runs["repro-landmark_net"].run_count >= 2  # failed on the dead server, retried, then done
    assert all(runs[f"repro-{s}"].state.is_completed() for s in order)
    assert _report_rows(url, flow_run.id) == dict.fromkeys(order, "ran")
    status = sh([sys.executable, "-m", "dvc", "status"], root, env)
    assert "Data and pipelines are up to date" in status  # no finished stage lost to the outage

    # --- outputs on the DVC remote; a fresh clone pulls them back ---------------------------------------------
    state = local_services.state()
    s3 = boto3.client(
        "s3",
        endpoint_url=state["services"]["s3"]["url"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    assert s3.list_objects_v2(Bucket=state["buckets"]["dvc"]).get("KeyCount", 0) > 0
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost"]
    sh([*git, "add", "-A"], root, env)
    sh([*git, "commit", "-q", "-m", "e2e run"], root, env)
    clone = stack["tmp"] / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], stack["tmp"], env)
    sh(
        [
            sys.executable,
            "-m",
            "dvc",
            "remote",
            "modify",
            "--local",
            "s3",
            "endpointurl",
            state["services"]["s3"]["url"],
        ],
        clone,
        env,
    )
    sh([sys.executable, "-m", "dvc", "pull", "-q"], clone, env)
    assert "Data and pipelines are up to date" in sh([sys.executable, "-m", "dvc", "status"], clone, env)
    for out in ("models/finetune/model.pt", "models/model.onnx", "data/landmarks.parquet", "models/landmark_net.pt"):
        assert _sha256(clone / out) == _sha256(root / out), out

    # --- the registry: champion is the first version ------------------------------------------------------------
    model_name = yaml.safe_load((root / "params.yaml").read_text())["register"]["model_name"]
    client = mlflow.MlflowClient(mlflow_url)
    champion = client.get_model_version_by_alias(model_name, "champion")
    first_metrics = json.loads((root / "metrics/eval.json").read_text())

    # --- run 2: `python -m flows.pipeline` with a worse model; the gate keeps the champion ------------------
    cmd = [
        sys.executable,
        "-m",
        "flows.pipeline",
        "--retries",
        "2",
        "--retry-delay",
        "5",
        *(f"--set={k}={_yaml(v)}" for k, v in WORSE.items()),
        *(f"--stage={s}" for s in AFTER_TUNE),
    ]
    second = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=FLOW_TIMEOUT)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    worse_metrics = json.loads((root / "metrics/eval.json").read_text())
    gain = worse_metrics["verification"]["accuracy_mean"] - first_metrics["verification"]["accuracy_mean"]
    assert gain < WORSE["register.min_gain"], (worse_metrics["verification"], first_metrics["verification"])
    assert client.get_model_version_by_alias(model_name, "champion").version == champion.version
    challenger = client.get_model_version_by_alias(model_name, "challenger")
    assert int(challenger.version) > int(champion.version)
    promotion = json.loads((root / "metrics/promotion.json").read_text())
    assert promotion["promoted"] is False and promotion["decision"] == "rejected", promotion
    assert promotion["champion_version"] == int(champion.version) == promotion["compared_to"]
    for stage in AFTER_TUNE:
        assert f"Running stage '{stage}'" in second.stdout, stage
    assert "Running stage 'tune'" not in second.stdout

    # --- promotion on demand through its deployment: the gate for the challenger again -------------------------
    with temporary_settings({PREFECT_API_URL: url}):
        gate = run_deployment("lafs-promote/on-demand", timeout=0, parameters={})
    assert _wait_for_flow_run(url, gate.id, 300).state.is_completed()
    assert _task_runs(url, gate.id)["lafs-promote"].state.is_completed()
    assert client.get_model_version_by_alias(model_name, "champion").version == champion.version
    with prefect(url) as pclient:
        (decision,) = pclient.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["lafs-promotion"]), flow_run_id=ArtifactFilterFlowRunId(any_=[gate.id])
            )
        )
    assert "rejected" in decision.data and f"v{challenger.version}" in decision.data

    # --- no credential anywhere ------------------------------------------------------------------------------
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with prefect(url) as pclient:
        logs = pclient.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id, gate.id])))
        run_params = json.dumps(pclient.read_flow_run(flow_run.id).parameters)
    secret = local_services.secret
    mlflow_text = []
    for exp in client.search_experiments():
        assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location  # proxied by the server
        for run in client.search_runs([exp.experiment_id]):
            mlflow_text.append(json.dumps({**run.data.params, **run.data.tags}))
    for mv in client.search_model_versions(f"name='{model_name}'"):
        mlflow_text.append(json.dumps(mv.tags) + mv.source)
    files = [
        p.read_text(errors="replace")
        for p in (
            *local_services.state_dir.glob("*.log"),
            root / "dvc.lock",
            root / "params.yaml",
            root / ".dvc" / "config",
            root / ".dvc" / "config.local",
        )
    ]
    _secret_free(
        secret,
        worker_log,
        second.stdout,
        second.stderr,
        "\n".join(log.message for log in logs),
        run_params,
        *mlflow_text,
        *files,
    )
    assert mlflow_text and logs


def test_search_flow_shares_one_study_between_two_workers(stack):
    """``lafs-search/weekly`` through the worker, after the main test (its trained inputs; tune is stale there,
    since run 2 changed the finetune params): the DVC-recorded ``tune`` and one helper ``lafs tune`` share the
    study, which ends with exactly ``n_trials``; both write the same outputs, so DVC's record holds."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root, env = stack["root"], stack["env"]
    url = env["PREFECT_API_URL"]
    if not (root / "models/pretrain/teacher_backbone.pt").exists():
        pytest.fail("needs the trained project of test_full_pipeline_through_prefect_on_local_services (run both)")
    with temporary_settings({PREFECT_API_URL: url}):
        run = run_deployment(
            "lafs-search/weekly", timeout=0, parameters={"n_trials": 2, "workers": 2, "then": [], **RETRY}
        )
    finished = _wait_for_flow_run(url, run.id, FLOW_TIMEOUT)
    assert finished.state.is_completed(), f"{finished.state}\n{stack['worker_log'].read_text()[-6000:]}"
    runs = _task_runs(url, run.id)
    assert runs["repro-tune"].state.is_completed() and runs["tune-worker-1"].state.is_completed()
    tune = json.loads((root / "metrics/tune.json").read_text())
    assert tune["n_trials"] == 2 and tune["trials"]["complete"] + tune["trials"]["pruned"] == 2, tune
    assert tune["trials"]["running"] == 0
    status = sh([sys.executable, "-m", "dvc", "status", "tune"], root, env)
    assert "up to date" in status  # the helper's copy of the outputs is what DVC recorded
