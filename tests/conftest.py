"""Shared test helpers: where ../shared is, and an offline-safe environment.

Tests use the real LFW subset and detector models staged in ``../shared`` (see its MANIFEST.md). Without
them a test is skipped with the reason, except under ``CI=true``, where a missing ``../shared`` is a broken
CI machine and must fail loudly instead of turning the suite green by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Telemetry off before anything imports Prefect / DVC / MLflow; tests that need MLflow set their own
# MLFLOW_TRACKING_URI to a tmp store.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Test tiers: `make test-fast` runs `-m "not slow and not integration"` (unit tests: no server process, no
# pipeline stage run, no multi-process training); `make test` runs everything. A test is integration when it
# uses one of these fixtures (servers, a project built by real stages, detector runs over real photos) or is
# marked so by hand (subprocess / DDP tests).
INTEGRATION_FIXTURES = {
    "s3_endpoint",
    "mlflow_server",
    "prefect_api",
    "local_services",
    "tiny_project",
    "real_faces",
    "tracking",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def shared_dir(*parts: str) -> Path:
    """``$LAFS_SHARED`` or ``<repo>/../shared``, joined with ``parts``; fail (CI) or skip if missing."""
    root = Path(os.environ.get("LAFS_SHARED") or REPO.parent / "shared")
    path = root.joinpath(*parts)
    if not path.exists():
        reason = (
            f"shared test data not found: {path} (set LAFS_SHARED to the folder holding data/ and models/, "
            "or place it next to the checkout as ../shared)"
        )
        if in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared root (data/, models/); fails under CI, skips elsewhere, when missing."""
    return shared_dir()


@pytest.fixture(scope="session")
def lfw_subset() -> Path:
    """The staged LFW subset: ``<Identity>/<Identity>_NNNN.jpg``, 1,764 photos of 844 identities."""
    return shared_dir("data", "lfw_subset")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto_server(port: int, log: Path, timeout: float = 30.0) -> subprocess.Popen:
    """moto's S3 server on ``127.0.0.1:port`` (in memory: buckets die with it), once it accepts connections."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the dev extras (pip install -e '.[dev]')")
    with log.open("w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on port {port} (exit code {proc.poll()}): {log.read_text()}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, with dummy AWS credentials in the env."""
    port = free_port()
    proc = start_moto_server(port, tmp_path_factory.mktemp("moto") / "moto.log")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MlflowServer:
    """A running ``mlflow server`` process: ``uri`` for clients, ``db`` (sqlite backend), ``artifacts``."""

    def __init__(self, uri: str, db: Path, artifacts: str, proc: subprocess.Popen, log: Path) -> None:
        self.uri, self.db, self.artifacts, self.proc, self.log = uri, db, artifacts, proc, log

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the server's own process group (it forks workers), SIGKILL what is left after 15 s."""
        import signal

        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_mlflow_server(
    workdir: Path,
    artifacts: str | None = None,
    env: dict[str, str] | None = None,
    db: Path | None = None,
    timeout: float = 120.0,
) -> MlflowServer:
    """Start ``mlflow server`` on a free 127.0.0.1 port with a sqlite backend (``db``, default in
    ``workdir``), artifacts proxied to ``artifacts`` (default ``workdir/artifacts``); poll ``/health``.

    ``db`` may be an existing database: restarting on it is how a test checks what survived a dead server.
    The caller stops it (:meth:`MlflowServer.stop`); a server that does not come up fails with its log.
    """
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if exe is None:
        pytest.fail("mlflow CLI not found: install the project (pip install -e '.[dev]')")
    workdir.mkdir(parents=True, exist_ok=True)
    db = db or workdir / "mlflow.db"
    artifacts = artifacts or (workdir / "artifacts").as_uri()
    port = free_port()
    log = workdir / f"mlflow-server-{port}.log"
    cmd = [
        exe,
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--artifacts-destination",
        artifacts,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with log.open("w") as out:  # the child keeps its own descriptor
        # Job execution (huey consumers for GenAI jobs: 8 extra processes) is not used by this project.
        server_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", db, artifacts, proc, log)
    deadline = time.monotonic() + timeout  # first start on a new database runs migrations (~20 s here)
    while not server.healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(
                f"mlflow server did not become healthy on port {port} (exit code {proc.poll()}):\n"
                f"{log.read_text()[-3000:]}"
            )
        time.sleep(0.5)
    return server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[MlflowServer]:
    """One real MLflow tracking + registry server for the session: sqlite backend in tmp, artifacts proxied
    by the server to a bucket on the moto S3 server (clients need no S3 credentials, as in production).

    Tests share it: use a unique experiment / registered-model name per test.
    """
    import boto3

    bucket = "mlflow-artifacts"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    server = start_mlflow_server(
        tmp_path_factory.mktemp("mlflow"), f"s3://{bucket}/artifacts", env={"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    )
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """One intra-op torch thread while inside: on a shared, oversubscribed CPU (2 cores, several test runs)
    two OpenMP threads spin against each other and a small training step gets ~10x slower, not faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Every stage up to pretraining, scaled to seconds: 16 real identities x <= 4 photos (50 faces), 2 test folds.
TINY_PROJECT = {
    "ingest": {"max_identities": 16, "max_images_per_identity": 4},
    "split": {"protocol": "generated", "test_fraction": 0.25, "folds": 2, "pairs_per_fold": 8, "fewshot_k": [1, 2]},
    "landmark_net": {"epochs": 1, "batch_size": 8, "num_workers": 0, "max_nme": 10.0},
    "pretrain": {
        "method": "lafs",
        "model": "lafs_vit_tiny",
        "landmark_net": "landmark_net_mnv3_small",
        "num_landmarks": 68,
        "out_dim": 64,
        "hidden_dim": 32,
        "bottleneck_dim": 16,
        "epochs": 1,
        "batch_size": 8,
        "local_crops": 2,
        "local_landmarks": 12,
        "num_workers": 0,
        "nproc_per_node": 1,
        "device": "cpu",
        "dtype": "fp32",
        "warmup_epochs": 0,
        "warmup_teacher_temp_epochs": 1,
    },
}


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, lfw_subset: Path, shared: Path) -> Path:
    """A project root after ingest -> landmarks -> split -> landmark_net -> pretrain (LAFS, ``lafs_vit_tiny``)
    on real photos, built once per session: ``data/``, ``models/landmark_net.pt``,
    ``models/pretrain/teacher_backbone.pt``. Treat it as read-only (write outputs to your own tmp dirs);
    ``TINY_PROJECT`` holds the params used."""
    from lafs.config import parse_params
    from lafs.layout import Layout
    from lafs.stages import ingest, landmark_net, landmarks, pretrain, split

    root = tmp_path_factory.mktemp("tiny_project")
    params = parse_params(
        {
            **TINY_PROJECT,
            "ingest": {**TINY_PROJECT["ingest"], "source": str(lfw_subset)},
            "landmarks": {"models_root": str(shared / "models")},
        }
    )
    with pytest.MonkeyPatch.context() as mp, single_torch_thread():
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")  # the stages' runs: a throwaway store
        layout = Layout(root)
        for stage in (ingest, landmarks, split, landmark_net, pretrain):
            stage.run(params, layout)
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory, tiny_project: Path) -> Path:
    """``tiny_project``'s ssl and finetune sets as WebDataset shards (8 faces each, so several per set), written
    by the shards stage in a root that links the project's data: the folder to pass as ``shards_uri``."""
    from lafs.config import Params, ShardsParams
    from lafs.layout import Layout
    from lafs.stages import shards

    root = tmp_path_factory.mktemp("tiny_shards")
    (root / "data").mkdir()
    for name in ("aligned", "splits", "landmarks.parquet"):
        (root / "data" / name).symlink_to(tiny_project / "data" / name)
    layout = Layout(root)
    shards.run(Params(shards=ShardsParams(write=True, samples_per_shard=8)), layout)
    return layout.shards


# --- A fresh git + DVC copy of the checkout (make pipeline, the Prefect flows, the end-to-end test) ---------
BIN = Path(sys.executable).parent
# Workspace outputs and machine state that must not leak from the checkout into a copy.
_COPY_SKIP_AT_ROOT = {
    ".venv",
    ".git",
    ".dvc",
    "data",
    "metrics",
    "models",
    "plots",
    "reports",
    "params",
    "mlruns",
    "mlflow.db",
    "mlartifacts",
    ".prefect",
    ".services",
    "params.local.yaml",
    "dvc.lock",
    "build",
    "optuna.db",
}
_COPY_SKIP_ANYWHERE = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def section_runner(stage: str) -> Callable[[Any, Path], Any]:
    """``run(cfg, root)`` for a stage: the stage contract with ``cfg`` as its params section (the others at their
    defaults) on the project at ``root``."""
    import importlib

    from lafs.config import Params
    from lafs.layout import Layout

    def run(cfg: Any, root: Path) -> Any:
        return importlib.import_module(f"lafs.stages.{stage}").run(Params(**{stage: cfg}), Layout(Path(root)))

    return run


def set_run(root: Path, run: dict[str, dict]) -> None:
    """Set a nested run spec (TINY_RUN, E2E_RUN) in ``root``'s params.yaml."""
    from lafs.params_edit import dotted, set_params

    set_params(root / "params.yaml", dotted(run))


def _copy_ignore(folder: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in _COPY_SKIP_ANYWHERE or n.endswith(".egg-info")}
    if Path(folder) == REPO:
        skip |= _COPY_SKIP_AT_ROOT & set(names)
    return skip


def sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 1200) -> str:
    """Run ``cmd``; on failure show its output (the assertion message is all CI shows)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def copy_project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """``tmp_path/project``: the checkout's code, dvc.yaml and params as a new git + DVC repo (no outputs, no
    lock), sharing the venv; and the environment to run it in (this venv first on PATH, the copy's code on
    PYTHONPATH, MLflow and Prefect state in ``tmp_path``, no telemetry).
    """
    dst = tmp_path / "project"
    shutil.copytree(REPO, dst, ignore=_copy_ignore, symlinks=True)
    (dst / ".venv").symlink_to(REPO / ".venv")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # The venv's `lafs` is an editable install of the checkout: run the copy's code instead.
        "PYTHONPATH": str(dst),
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "SCIKIT_LEARN_DATA": str(tmp_path / "sklearn"),  # never the user's cache
    }
    env.pop("MAKEFLAGS", None)
    sh(["git", "init", "-q"], dst, env)
    sh([str(BIN / "dvc"), "init", "-q"], dst, env)
    sh([str(BIN / "dvc"), "config", "core.analytics", "false"], dst, env)
    return dst, env


# Every stage of dvc.yaml, scaled down to seconds: 16 identities x 3 photos, 2 verification folds, one short
# epoch each. Set in a copy's params.yaml (set_run), as `dvc exp run -S` / `make pipeline SET=...` would.
TINY_RUN = {
    "ingest": {"max_identities": 16, "max_images_per_identity": 3},
    "validate": {"min_eval_identities": 4},
    "split": {"protocol": "generated", "test_fraction": 0.4, "folds": 2, "pairs_per_fold": 6},
    "landmark_net": {"epochs": 1, "batch_size": 8, "num_workers": 0, "max_nme": 10.0},
    "pretrain": {
        "out_dim": 64,
        "hidden_dim": 32,
        "bottleneck_dim": 16,
        "epochs": 1,
        "batch_size": 4,
        "local_crops": 2,
        "local_landmarks": 12,
        "num_workers": 0,
        "nproc_per_node": 1,
    },
    "finetune": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "num_workers": 0},
    "tune": {"n_trials": 1},  # the enqueued baseline only
    "register": {"min_margin_over_floor": None},  # one epoch on 48 faces cannot be asked to beat a floor
}


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One Prefect test server (temporary sqlite database) for the whole session; yields its API URL.

    Starting it costs 10-15 s here, so every test that runs flows in-process shares it. Subprocesses do not
    inherit it: give them ``PREFECT_API_URL`` explicitly.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


# --- Real faces and a tiny recogniser for the embedder / export / evaluate tests -----------------------------
TINY_RECOGNISER = {"num_landmarks": 68, "landmark_net": "landmark_net_mnv3_small"}


def tiny_recogniser(seed: int = 0):
    """An untrained ``lafs_vit_tiny`` with its landmark net, whose landmarks depend on the image (a zero-init
    head would put every patch at one point): what ``models/finetune/model.pt`` holds, at test size."""
    import torch

    from lafs.models import create_model

    torch.manual_seed(seed)
    model = create_model("lafs_vit_tiny", **TINY_RECOGNISER).eval()
    grid = torch.stack(torch.meshgrid(torch.linspace(24, 88, 8), torch.linspace(20, 92, 9), indexing="ij"), -1)
    with torch.no_grad():
        model.landmark_net.init_mean_shape(grid.reshape(-1, 2)[:68].flip(-1))
        model.landmark_net.offset.weight.normal_(0.0, 0.02)
    return model


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_recogniser()`` saved in the model-file format (:mod:`lafs.models.io`), like the finetune stage's."""
    from lafs.models.io import save_model

    path = tmp_path_factory.mktemp("tiny_model") / "model.pt"
    return save_model(tiny_recogniser(), "lafs_vit_tiny", TINY_RECOGNISER, path, embed_dim=192)


@pytest.fixture(scope="session")
def real_faces(lfw_subset: Path, shared: Path):
    """8 shared photos (4 people x 2) detected and aligned by the project's own SCRFD + ArcFace path
    (:class:`lafs.eval.photos.FaceFinder`): ``.files``, ``.photos`` (RGB uint8), ``.boxes`` (N, 4), ``.kps``
    (N, 5, 2), ``.aligned`` (N, 112, 112, 3) uint8 and ``.identities``."""
    from types import SimpleNamespace

    import numpy as np

    from lafs.config import LandmarksParams
    from lafs.data.images import load_rgb
    from lafs.eval.photos import FaceFinder

    people = [d for d in sorted(lfw_subset.iterdir()) if len(list(d.glob("*.jpg"))) >= 2][:4]
    files = [f for d in people for f in sorted(d.glob("*.jpg"))[:2]]
    finder = FaceFinder.from_params(LandmarksParams(models_root=str(shared / "models")), threads=1)
    photos = [load_rgb(f) for f in files]
    found = [finder.find(p) for p in photos]
    assert all(f.detected for f in found), "SCRFD should find every one of these LFW faces"
    return SimpleNamespace(
        files=files,
        photos=photos,
        boxes=np.stack([f.box for f in found]),
        kps=np.stack([f.kps for f in found]),
        aligned=np.stack([f.aligned for f in found]),
        identities=[f.parent.name for f in files],
    )


# --- infra/local/services.py: the compose roles (S3, MLflow, Prefect) as local processes ---------------------
SERVICES_SCRIPT = REPO / "infra" / "local" / "services.py"


class LocalServices:
    """``infra/local/services.py`` run as a user runs it, on one state directory.

    ``env`` is a client environment for them: no proxies, AWS credentials (a random secret per session, so a
    test can grep logs and MLflow for it), the servers' URLs (``services.py env``), this venv first on PATH.
    """

    def __init__(self, state_dir: Path, env: dict[str, str]) -> None:
        self.state_dir, self.base_env = state_dir, env

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, str(SERVICES_SCRIPT), "--state-dir", str(self.state_dir), *args],
            cwd=REPO,
            env=env or self.base_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check:
            what = f"services.py {shlex.join(args)} -> {proc.returncode}"
            assert proc.returncode == 0, f"{what}\n{proc.stdout}{proc.stderr}"
        return proc

    def state(self) -> dict:
        import json

        return json.loads((self.state_dir / "services.json").read_text())

    def ensure_running(self) -> None:
        """Start whatever role is not running (``start`` is idempotent: healthy roles are left alone)."""
        self.run("start")

    @property
    def env(self) -> dict[str, str]:
        import json

        return {**self.base_env, **json.loads(self.run("env", "--json").stdout)}

    @property
    def secret(self) -> str:
        return self.base_env["AWS_SECRET_ACCESS_KEY"]


def service_env() -> dict[str, str]:
    """The calling environment without proxies or a Prefect server, with fresh dummy AWS credentials."""
    import secrets

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "PREFECT_API_URL"}
    env.update(
        AWS_ACCESS_KEY_ID=f"lafs-test-{secrets.token_hex(4)}",
        AWS_SECRET_ACCESS_KEY=secrets.token_urlsafe(24),
        AWS_DEFAULT_REGION="us-east-1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # no cron runs from deployments registered by tests
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )
    return env


def process_group(pgid: int) -> list:
    """Live (non-zombie) processes of process group ``pgid``."""
    import psutil

    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


@pytest.fixture(scope="session")
def local_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    """S3 (moto), MLflow (sqlite, artifacts proxied to S3) and Prefect servers on 127.0.0.1, started once per
    session by ``infra/local/services.py start`` and stopped at the end, leaving no process behind.

    Shared (starting MLflow on a new database costs 20-60 s here): a test that stops a role starts it again.
    """
    services = LocalServices(tmp_path_factory.mktemp("services"), service_env())
    try:
        services.run("start")
        yield services
    finally:
        groups = (
            {role: info["pid"] for role, info in services.state()["services"].items()}
            if (services.state_dir / "services.json").exists()
            else {}
        )
        services.run("stop", check=False)
        left = {role: [p.pid for p in process_group(pid)] for role, pid in groups.items() if process_group(pid)}
        assert not left, f"services.py stop left processes behind: {left}"
