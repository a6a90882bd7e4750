"""infra/: the compose file (parsed: Docker is not available here) and infra/local/services.py for real.

The local roles are started as a user would (``python infra/local/services.py start``): every server must be
healthy, listen on 127.0.0.1 only, do its job (MLflow proxies artifacts into the S3 server's bucket, DVC
pushes to its remote there), come back on the same URL after a restart, and leave no process behind on stop.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import psutil
import pytest
import yaml
from conftest import REPO, LocalServices, process_group, service_env, sh

INFRA = REPO / "infra"
COMPOSE = INFRA / "compose.yaml"
SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD")


# --- compose.yaml ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def _flat_command(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def test_compose_has_every_role_with_healthchecks_and_ordered_startup(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-buckets", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    for name, svc in services.items():
        if name != "minio-buckets":  # a one-shot job: it completes instead of being healthy
            assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no healthcheck"
    deps = {name: svc.get("depends_on", {}) for name, svc in services.items()}
    assert deps["mlflow"]["postgres"]["condition"] == "service_healthy"
    assert deps["mlflow"]["minio-buckets"]["condition"] == "service_completed_successfully"
    assert deps["minio-buckets"]["minio"]["condition"] == "service_healthy"
    assert deps["prefect-server"]["postgres"]["condition"] == "service_healthy"
    assert deps["prefect-worker"]["prefect-server"]["condition"] == "service_healthy"
    assert deps["prefect-worker"]["mlflow"]["condition"] == "service_healthy"


def test_compose_ports_are_loopback_only(compose):
    published = [(name, port) for name, svc in compose["services"].items() for port in svc.get("ports", [])]
    assert published, "no published ports at all"
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_compose_wires_postgres_databases_minio_buckets_and_the_servers(compose):
    services = compose["services"]
    init = (INFRA / "postgres" / "init.sql").read_text()
    databases = set(re.findall(r"^CREATE DATABASE (\w+);", init, re.MULTILINE))
    assert databases == {"mlflow", "optuna", "prefect"}
    (mount,) = [v for v in services["postgres"]["volumes"] if "init.sql" in v]
    source, target = mount.split(":")[:2]
    assert (INFRA / source).resolve() == INFRA / "postgres" / "init.sql"
    assert target.startswith("/docker-entrypoint-initdb.d/")

    mlflow = services["mlflow"]
    assert _env(mlflow)["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert _env(mlflow)["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    bucket = re.search(r"--artifacts-destination[= ]s3://([\w.-]+)/", _flat_command(mlflow)).group(1)
    assert f"lafs/{bucket}" in _flat_command(services["minio-buckets"])  # the job creates it
    assert _env(mlflow)["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert _env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    # Optuna's storage URL is a tune param (recorded in dvc.lock): the worker gets the password from libpq's env
    assert _env(services["prefect-worker"])["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    worker = services["prefect-worker"]
    assert _env(worker)["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert _env(worker)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    pool = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"]["local"]["name"]
    assert _flat_command(worker).split("--pool ")[1].split()[0] == pool  # the pool prefect.yaml deploys to


def test_compose_credentials_come_only_from_the_env_file(compose):
    text = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    referenced = set(re.findall(r"\$\{(\w+)", text))
    example = dict(
        line.split("=", 1)
        for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert referenced <= set(example), f"not documented in infra/.env.example: {referenced - set(example)}"
    for secret in SECRETS:  # required everywhere: compose refuses to start without them, no default value
        uses = re.findall(rf"\$\{{{secret}(:\?|:-|\}})", text)
        assert uses and set(uses) == {":?"}, (secret, uses)
    for name, svc in compose["services"].items():
        for key, value in _env(svc).items():
            if any(word in key for word in ("PASSWORD", "SECRET")):
                assert value.startswith("${") and value.endswith("}"), f"{name}.{key} is a literal"
    proc = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
    assert proc.returncode == 0, "infra/.env must be git-ignored"


# --- infra/local/services.py -------------------------------------------------------------------------------------


def _listening(pgid: int) -> set:
    return {c.laddr for p in process_group(pgid) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}


def test_local_services_are_healthy_and_loopback_only(local_services):
    import urllib.request

    state = local_services.state()
    assert set(state["services"]) == {"s3", "mlflow", "prefect"}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    health = {"s3": "/", "mlflow": "/health", "prefect": "/health"}
    for role, info in state["services"].items():
        assert info["url"].startswith("http://127.0.0.1:"), info["url"]
        with opener.open(info["url"] + health[role], timeout=10) as resp:
            assert resp.status == 200, role
        listening = _listening(info["pid"])
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}, (role, listening)
        assert info["port"] in {a.port for a in listening}
    assert local_services.run("status").stdout.count("healthy") == 3
    env = json.loads(local_services.run("env", "--json").stdout)
    assert env["MLFLOW_TRACKING_URI"] == state["services"]["mlflow"]["url"]
    assert env["PREFECT_API_URL"] == state["services"]["prefect"]["url"]
    urls = [v for v in env.values() if v.startswith("http")]
    assert urls and all(v.startswith("http://127.0.0.1:") for v in urls)
    assert local_services.secret not in json.dumps(env) + (local_services.state_dir / "services.json").read_text()


def test_mlflow_server_proxies_artifacts_into_the_s3_bucket(local_services, tmp_path, monkeypatch):
    import boto3
    import mlflow

    state = local_services.state()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, local_services.base_env[key])
    client = mlflow.MlflowClient(state["services"]["mlflow"]["url"])
    run = client.create_run(client.create_experiment("infra-test"))
    (tmp_path / "note.txt").write_text("proxied")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    s3 = boto3.client("s3", endpoint_url=state["services"]["s3"]["url"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=state["buckets"]["mlflow"]).get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys


def test_dvc_remote_on_the_s3_server_pushes(local_services, tmp_path):
    import boto3

    state, env = local_services.state(), local_services.base_env
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(["git", "init", "-q"], repo, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    assert "s3://" in local_services.run("dvc-remote", "--repo", str(repo)).stdout
    tracked = (repo / ".dvc" / "config").read_text()
    local = (repo / ".dvc" / "config.local").read_text()
    assert f"s3://{state['buckets']['dvc']}/dvc" in tracked and "127.0.0.1" not in tracked  # endpoint: per machine
    assert state["services"]["s3"]["url"] in local
    assert local_services.secret not in tracked + local
    (repo / "blob.txt").write_text("versioned data\n")
    sh([sys.executable, "-m", "dvc", "add", "-q", "blob.txt"], repo, env)
    sh([sys.executable, "-m", "dvc", "push", "-q"], repo, env)
    s3 = boto3.client(
        "s3",
        endpoint_url=state["services"]["s3"]["url"],
        aws_access_key_id="x",
        aws_secret_access_key="x",
        region_name="us-east-1",
    )
    # the bucket is shared with other tests (test_e2e pushes the pipeline to it): look for this blob's own object
    digest = hashlib.md5(b"versioned data\n").hexdigest()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=state["buckets"]["dvc"], Prefix="dvc/").get("Contents", [])]
    assert any(k.endswith(f"{digest[:2]}/{digest[2:]}") for k in keys), keys


def test_a_stopped_role_restarts_on_the_same_url(local_services):
    """s3 is in memory: after a restart its buckets are created again, and MLflow (which proxies into one of
    them) keeps working. MLflow's own kill and restart mid-run is exercised by test_e2e."""
    import boto3

    before = local_services.state()["services"]["s3"]
    assert "stopped" in local_services.run("stop", "s3").stdout
    assert process_group(before["pid"]) == [] and "s3" not in local_services.state()["services"]
    assert "down" in local_services.run("status", "s3").stdout
    local_services.run("start", "s3")
    after = local_services.state()["services"]["s3"]
    assert after["url"] == before["url"] and after["pid"] != before["pid"]
    s3 = boto3.client(
        "s3", endpoint_url=after["url"], aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
    )
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == set(local_services.state()["buckets"].values())
    assert "healthy" in local_services.run("status", "mlflow").stdout


def test_mlflow_refuses_to_start_without_s3_credentials(tmp_path):
    env = {k: v for k, v in service_env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    services = LocalServices(tmp_path / "services", service_env())
    try:
        services.run("start", "s3")
        proc = services.run("start", "mlflow", env=env, check=False)
        assert proc.returncode == 1 and "AWS_ACCESS_KEY_ID" in proc.stderr
        assert "mlflow" not in services.state()["services"]
    finally:
        services.run("stop")


def test_stop_leaves_no_process(local_services):
    """Last in this module: stops the session's services (a later user's ``ensure_running`` starts them again).
    MLflow forks about ten workers, Prefect its server processes: every group must be gone."""
    groups = {role: info["pid"] for role, info in local_services.state()["services"].items()}
    assert set(groups) == {"s3", "mlflow", "prefect"} and all(process_group(pid) for pid in groups.values())
    assert local_services.run("stop").stdout.count("stopped") == 3
    assert {role: len(process_group(pid)) for role, pid in groups.items()} == dict.fromkeys(groups, 0)
    assert local_services.state()["services"] == {}
    assert local_services.run("status").stdout.count("down") == 3
