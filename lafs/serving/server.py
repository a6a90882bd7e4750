"""``mlflow models serve`` for a model as a child process on 127.0.0.1, ready once it answers ``/ping``: what the
serve benchmark and the HTTP tests run (users run the same command themselves, README)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ServerError(RuntimeError):
    """The model server exited or did not answer in time; the message carries the end of its log."""


def serve_command(model: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]


@contextmanager
def mlflow_serve(model: str, port: int, log: Path, workers: int = 1, timeout_s: float = 180.0) -> Iterator[str]:
    """Serve ``model`` (``models:/...``, ``runs:/...`` or a pyfunc folder) with ``workers`` uvicorn processes;
    yields the base URL and stops the whole process group on exit. The venv's ``bin`` leads ``PATH`` (MLflow
    starts ``uvicorn`` by name); loopback bypasses any proxy."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_MODELS_WORKERS": str(workers),
        "NO_PROXY": "127.0.0.1",
    }
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            serve_command(model, port), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            _wait_ready(proc, url, log, timeout_s)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except OSError:
            if proc.poll() is not None:
                raise ServerError(
                    f"mlflow models serve exited with {proc.returncode}: {log.read_text()[-3000:]}"
                ) from None
            if time.monotonic() > deadline:
                raise ServerError(
                    f"mlflow models serve did not answer {url}/ping in {timeout_s:.0f} s (log: {log})"
                ) from None
            time.sleep(0.5)
