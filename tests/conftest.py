"""Shared test helpers: where ../shared is, and an offline-safe environment.

Tests use the real LFW subset and detector models staged in ``../shared`` (see its MANIFEST.md). Without
them a test is skipped with the reason, except under ``CI=true``, where a missing ``../shared`` is a broken
CI machine and must fail loudly instead of turning the suite green by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Telemetry off before anything imports Prefect / DVC / MLflow; tests that need MLflow set their own
# MLFLOW_TRACKING_URI to a tmp store.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, with dummy AWS credentials in the env."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the dev extras (pip install -e '.[dev]')")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
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
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start on port {port} (exit code {proc.poll()})")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
