#!/usr/bin/env python
"""The roles of ``infra/compose.yaml`` on one machine, without containers: for tests and local use.

    python infra/local/services.py start [s3 mlflow prefect]   # start (all by default), wait until healthy
    eval "$(python infra/local/services.py env)"               # MLFLOW_TRACKING_URI, PREFECT_API_URL, ...
    python infra/local/services.py dvc-remote                  # DVC default remote on the S3 server
    python infra/local/services.py status
    python infra/local/services.py stop [roles]                # SIGTERM, then SIGKILL; nothing left behind

=========  ==========================================================  ================================
role       process                                                     compose counterpart
=========  ==========================================================  ================================
s3         ``moto_server`` (in memory: buckets are created at start)    MinIO + its bucket job
mlflow     ``mlflow server``, sqlite backend, artifacts proxied to S3   MLflow server on Postgres + MinIO
prefect    ``prefect server start``, sqlite in the state directory      Prefect server on Postgres
=========  ==========================================================  ================================

Every server binds 127.0.0.1 on a free port (kept in the state file, so a restarted role comes back on the
same URL). Each runs in its own session, so ``stop`` signals its whole process group (servers fork workers)
after checking that the pid is still the process it started. Credentials are never written anywhere:
the MLflow server reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from the environment (any values
work against moto). The state file (``services.json``) holds pids, ports, URLs and log paths only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

ROLES = ("s3", "mlflow", "prefect")  # start order (mlflow needs s3); stop goes in reverse
HOST = "127.0.0.1"
PROJECT = Path(__file__).resolve().parents[2]
BUCKETS = {"mlflow": "lafs-mlflow", "dvc": "lafs-dvc", "data": "lafs-data"}
STARTUP_TIMEOUT = {"s3": 60.0, "mlflow": 240.0, "prefect": 240.0}  # first MLflow start runs DB migrations
STOP_TIMEOUT = 20.0
_LOOPBACK = "127.0.0.1,localhost"
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class ServiceError(RuntimeError):
    """A role could not be started or stopped; the message says which, why and where its log is."""


# --- state ---------------------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    return Path(os.environ.get("LAFS_SERVICES_DIR") or PROJECT / ".services")


def load_state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "services.json"
    if not path.exists():
        return {"ports": {}, "services": {}, "buckets": BUCKETS}
    return json.loads(path.read_text())


def save_state(state_dir: Path, state: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "services.json.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(state_dir / "services.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- processes -----------------------------------------------------------------------------------------------


def _exe(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        raise ServiceError(
            f"{name} not found next to {sys.executable} or on PATH: install the project's dev "
            "extras (pip install -e '.[dev]')"
        )
    return exe


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment for a server, minus proxies (all traffic stays on the loopback)."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env.update(NO_PROXY=_LOOPBACK, no_proxy=_LOOPBACK, DO_NOT_TRACK="1", **extra)
    return env


def _alive(info: dict[str, Any]) -> bool:
    """Is the process in ``info`` still the one we started (same pid *and* start time)?"""
    try:
        proc = psutil.Process(info["pid"])
        return abs(proc.create_time() - info["create_time"]) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of process group ``pgid``: a server and every worker it forked."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_group(info: dict[str, Any], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the role's process group, SIGKILL whatever is left after ``timeout``; only if it is ours."""
    pgid = info["pid"]  # started with start_new_session: the leader's pid is the group id
    if not _alive(info) and not group_members(pgid):
        return
    if _alive(info) or group_members(pgid):
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_members(pgid):
        _signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    left = group_members(pgid)
    if left:
        raise ServiceError(f"processes {[p.pid for p in left]} of group {pgid} survived SIGKILL")


# --- health --------------------------------------------------------------------------------------------------

_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except OSError:
        return False


def health_url(role: str, url: str) -> str:
    return {"s3": url + "/", "mlflow": url + "/health", "prefect": url + "/api/health"}[role]


# --- roles ---------------------------------------------------------------------------------------------------


def _command(role: str, port: int, state_dir: Path, state: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    if role == "s3":
        return [_exe("moto_server"), "-H", HOST, "-p", str(port)], _child_env({})
    if role == "mlflow":
        s3 = state["services"].get("s3")
        if s3 is None or not _alive(s3):
            raise ServiceError("mlflow needs the s3 role for its artifacts: start it first (start s3 mlflow)")
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]
        if missing:
            raise ServiceError(
                f"mlflow proxies artifacts to S3 and needs {', '.join(missing)} in the environment "
                "(for the local moto server any values work, e.g. export AWS_ACCESS_KEY_ID=dev)"
            )
        db = state_dir / "mlflow.db"
        cmd = [
            _exe("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            f"s3://{state['buckets']['mlflow']}/artifacts",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        return cmd, _child_env(
            {
                "MLFLOW_S3_ENDPOINT_URL": s3["url"],
                "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            }
        )
    if role == "prefect":
        env = _child_env({"PREFECT_HOME": str(state_dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        env.pop("PREFECT_API_URL", None)  # the server must not talk to another server
        return [_exe("prefect"), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"], env
    raise ServiceError(f"unknown role {role!r}: choose from {', '.join(ROLES)}")


def _create_buckets(url: str, buckets: dict[str, str]) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=url, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), config=Config(proxies={})
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in sorted(set(buckets.values()) - existing):
        client.create_bucket(Bucket=bucket)


def launch_role(role: str, state_dir: Path, state: dict[str, Any]) -> subprocess.Popen | None:
    """Spawn ``role``'s server and record it in ``state``; None if it already runs healthy."""
    info = state["services"].get(role)
    if info is not None and _alive(info) and http_ok(health_url(role, info["url"].removesuffix("/api"))):
        return None
    if info is not None:
        stop_group(info)  # a half-dead leftover of an earlier start
    port = state["ports"].get(role) or free_port()
    cmd, env = _command(role, port, state_dir, state)
    log = state_dir / f"{role}.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=state_dir,
            start_new_session=True,
        )
    url = f"http://{HOST}:{port}" + ("/api" if role == "prefect" else "")
    state["ports"][role] = port
    state["services"][role] = {
        "pid": proc.pid,
        "create_time": psutil.Process(proc.pid).create_time(),
        "port": port,
        "url": url,
        "log": str(log),
    }
    save_state(state_dir, state)  # recorded before waiting: a failed start can still be stopped
    return proc


def wait_healthy(role: str, proc: subprocess.Popen, state_dir: Path, state: dict[str, Any]) -> None:
    """Poll ``role``'s health endpoint; on exit or timeout stop what is left and raise with its log."""
    info = state["services"][role]
    base = info["url"].removesuffix("/api")
    deadline = time.monotonic() + STARTUP_TIMEOUT[role]
    while not http_ok(health_url(role, base)):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(info)
            del state["services"][role]
            save_state(state_dir, state)
            why = f"exited with {proc.returncode}" if proc.poll() is not None else "not healthy in time"
            log = Path(info["log"])
            raise ServiceError(f"{role} on {base} {why}; last log lines ({log}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    if role == "s3":
        _create_buckets(base, state["buckets"])


def start_roles(roles: Sequence[str], state_dir: Path, state: dict[str, Any]) -> None:
    """Start ``roles``: s3 first (MLflow needs it), then the others side by side (their first start runs
    database migrations for tens of seconds each)."""
    for group in ([r for r in roles if r == "s3"], [r for r in roles if r != "s3"]):
        launched: dict[str, subprocess.Popen] = {}
        try:
            for role in group:
                proc = launch_role(role, state_dir, state)
                if proc is not None:  # None: already running and healthy
                    launched[role] = proc
            for role, proc in launched.items():
                wait_healthy(role, proc, state_dir, state)
        except ServiceError:
            for role in launched:  # do not leave the others started here half-way
                info = state["services"].pop(role, None)
                if info is not None:
                    stop_group(info)
            save_state(state_dir, state)
            raise


def stop_role(role: str, state_dir: Path, state: dict[str, Any]) -> bool:
    """Stop ``role`` if the state file records it; False when there was nothing to stop."""
    info = state["services"].pop(role, None)
    if info is not None:
        stop_group(info)
    save_state(state_dir, state)
    return info is not None


def environment(state: dict[str, Any]) -> dict[str, str]:
    """Client settings for the running roles (no credentials: those stay in the caller's environment)."""
    services, env = state["services"], {}
    if "s3" in services:
        env.update(
            MLFLOW_S3_ENDPOINT_URL=services["s3"]["url"],
            AWS_ENDPOINT_URL_S3=services["s3"]["url"],
            LAFS_S3_ENDPOINT_URL=services["s3"]["url"],
            LAFS_DVC_REMOTE_URL=f"s3://{state['buckets']['dvc']}/dvc",
        )
    if "mlflow" in services:
        env["MLFLOW_TRACKING_URI"] = services["mlflow"]["url"]
    if "prefect" in services:
        env["PREFECT_API_URL"] = services["prefect"]["url"]
    if env:
        env.update(NO_PROXY=_LOOPBACK, no_proxy=_LOOPBACK)
    return env


def configure_dvc_remote(repo: Path, state: dict[str, Any], endpoint: str | None, name: str = "s3") -> str:
    """``dvc remote add -d <name> s3://<bucket>/dvc`` (the URL is safe to commit) and the endpoint in the
    untracked ``.dvc/config.local`` (it is per machine). Credentials come from the AWS environment."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or (state["services"].get("s3") or {}).get("url")
    if not endpoint:
        raise ServiceError("no S3 endpoint: start the s3 role, pass --endpoint or set AWS_ENDPOINT_URL_S3")
    url = f"s3://{state['buckets']['dvc']}/dvc"
    dvc = [sys.executable, "-m", "dvc"]
    for args in (
        ["remote", "add", "--default", "--force", name, url],
        ["remote", "modify", "--local", name, "endpointurl", endpoint],
    ):
        proc = subprocess.run([*dvc, *args], cwd=repo, capture_output=True, text=True)
        if proc.returncode:
            raise ServiceError(f"dvc {' '.join(args)} failed in {repo}:\n{proc.stdout}{proc.stderr}")
    return f"DVC remote {name!r} = {url} (endpoint {endpoint}, in .dvc/config.local)"


# --- CLI -----------------------------------------------------------------------------------------------------


def _roles(names: Sequence[str]) -> list[str]:
    unknown = sorted(set(names) - set(ROLES))
    if unknown:
        raise ServiceError(f"unknown role(s) {unknown}: choose from {', '.join(ROLES)}")
    return [r for r in ROLES if r in names] if names else list(ROLES)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="pids, ports, logs and server data (default: $LAFS_SERVICES_DIR or <project>/.services)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "status"):
        sub.add_parser(name).add_argument("roles", nargs="*", metavar="role", help=f"any of {', '.join(ROLES)}")
    env_p = sub.add_parser("env", help="client settings of the running roles as shell exports")
    env_p.add_argument("--json", action="store_true")
    remote = sub.add_parser("dvc-remote", help="point the project's default DVC remote at the S3 server")
    remote.add_argument("--repo", type=Path, default=Path("."))
    remote.add_argument("--endpoint", default=None, help="default: the running s3 role, else $AWS_ENDPOINT_URL_S3")
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    state = load_state(state_dir)
    try:
        if args.command == "start":
            start_roles(_roles(args.roles), state_dir, state)
            for role in _roles(args.roles):
                info = state["services"][role]
                print(f"{role:<8} {info['url']}  pid {info['pid']}  log {info['log']}")
        elif args.command == "stop":
            for role in reversed(_roles(args.roles)):
                print(f"{role:<8} {'stopped' if stop_role(role, state_dir, state) else 'not running'}")
        elif args.command == "status":
            for role in _roles(args.roles):
                info = state["services"].get(role)
                base = info and info["url"].removesuffix("/api")
                health = "healthy" if info and _alive(info) and http_ok(health_url(role, base)) else "down"
                print(f"{role:<8} {health:<8} {info['url'] if info else '-'}")
        elif args.command == "env":
            env = environment(state)
            print(
                json.dumps(env, indent=2)
                if args.json
                else "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
            )
        elif args.command == "dvc-remote":
            print(configure_dvc_remote(args.repo.resolve(), state, args.endpoint))
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
