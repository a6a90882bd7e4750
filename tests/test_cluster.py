"""Prefect hands pretraining to the cluster (``flows.cluster.train_on_cluster``), against a Kubernetes API on
127.0.0.1 that replays the training operator's responses.

No Kubernetes API server installs from a package registry here (the PyPI names tried hold other software), so
the server is a small HTTP server for the few endpoints the task calls, answering with the objects the API
returns (a PyTorchJob whose status conditions advance Created -> Running -> Succeeded or Failed, the job's pods
by the operator's label, their logs, 409 on a duplicate name). The client side is the real ``kubernetes``
client and a real Prefect flow run (``python -m flows.cluster`` against the session's test server): the first
job fails, the task's retry replaces it, the second succeeds, and the flow run's logs hold the job's status
changes and its pods' log lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import REPO, free_port

from flows.cluster import JOB_LABEL, job_document, job_phase

JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/(?P<ns>[^/]+)/pytorchjobs(?:/(?P<name>[^/?]+))?")
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<pod>[^/?]+)/log)?")
# Each attempt's conditions, one more per GET of the job; the first attempt's job fails.
SCRIPTS = [
    ["Created", "Running", ("Failed", "lafs-pretrain-worker-1 exited with code 137 (OOMKilled)")],
    ["Created", "Running", "Running", ("Succeeded", "PyTorchJob lafs-pretrain is successfully completed.")],
]


class FakeOperator:
    """The API objects of the jobs created so far, and what the client asked for."""

    def __init__(self) -> None:
        self.scripts = list(SCRIPTS)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.ticks: dict[str, int] = {}
        self.calls: list[str] = []
        self.created = 0

    def job(self, name: str) -> dict[str, Any]:
        job = self.jobs[name]
        script = self.scripts[min(job["attempt"], len(self.scripts) - 1)]
        tick = min(self.ticks[name], len(script) - 1)
        self.ticks[name] += 1
        conditions = []
        for step in script[: tick + 1]:
            kind, message = step if isinstance(step, tuple) else (step, f"PyTorchJob {name} is {step.lower()}.")
            for c in conditions:
                c["status"] = "False" if kind in ("Succeeded", "Failed", "Restarting") else c["status"]
            conditions.append({"type": kind, "status": "True", "reason": f"PyTorchJob{kind}", "message": message})
        return {**job["body"], "status": {"conditions": conditions}}

    def log(self, name: str, pod: str) -> str:
        return "".join(f"{pod}: step {i}\n" for i in range(self.ticks.get(name, 0)))


def _handler(operator: FakeOperator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _status(self, code: int, reason: str, message: str) -> None:
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}
            self._send(code, {**body, "message": message})

        def do_POST(self) -> None:
            operator.calls.append(f"POST {self.path}")
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = body["metadata"]["name"]
            if not JOBS.match(self.path):
                return self._status(404, "NotFound", self.path)
            if name in operator.jobs:
                return self._status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{name}" already exists')
            body["metadata"] |= {"uid": f"uid-{operator.created}", "namespace": JOBS.match(self.path)["ns"]}
            operator.jobs[name] = {"body": body, "attempt": operator.created}
            operator.ticks[name] = 0
            operator.created += 1
            self._send(201, body)

        def do_DELETE(self) -> None:
            operator.calls.append(f"DELETE {self.path}")
            found = JOBS.match(self.path)
            if not found or found["name"] not in operator.jobs:
                return self._status(404, "NotFound", self.path)
            operator.jobs.pop(found["name"])
            self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        def do_GET(self) -> None:
            operator.calls.append(f"GET {self.path}")
            job, pods = JOBS.match(self.path), PODS.match(self.path)
            if job and job["name"] in operator.jobs:
                return self._send(200, operator.job(job["name"]))
            if pods and pods["pod"]:
                name = pods["pod"].rsplit("-worker-", 1)[0]
                return self._send(200, operator.log(name, pods["pod"]), "text/plain")
            if pods:
                selector = re.search(r"labelSelector=([^&]+)", self.path)
                wanted = selector and selector[1].replace("%3D", "=").replace("%2F", "/")
                items = [
                    {"metadata": {"name": f"{n}-worker-{i}", "labels": {JOB_LABEL: n}}}
                    for n in operator.jobs
                    for i in range(2)
                    if wanted == f"{JOB_LABEL}={n}"
                ]
                return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            self._status(404, "NotFound", self.path)

    return Handler


@pytest.fixture
def api() -> Iterator[tuple[str, FakeOperator]]:
    operator = FakeOperator()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(operator))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", operator
    finally:
        server.shutdown()


def test_job_phase_reads_the_latest_true_condition():
    assert job_phase({}) == ("Pending", "")
    job = {"status": {"conditions": [{"type": "Created", "status": "False"}, {"type": "Running", "status": "True"}]}}
    assert job_phase(job) == ("Running", "")


def _run_flow(host: str, api_url: str) -> tuple[subprocess.CompletedProcess, str]:
    """``python -m flows.cluster`` in its own process (as a deployment runs it; an in-process flow run would leave
    Prefect's background threads in this process, and the forked DataLoader workers of later tests die of them):
    its result and its flow run's id."""
    cmd = [sys.executable, "-m", "flows.cluster", "--namespace", "lafs", "--host", host]
    cmd += ["--poll-seconds", "0.01", "--retry-delay", "0"]
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    found = re.search(r"flow run ([0-9a-f-]{36}): ", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr[-3000:]
    return done, found[1]


def _flow_run_logs(flow_run: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run])))
    return "\n".join(log.message for log in found)


def test_a_failed_job_fails_the_task_and_the_retry_replaces_it_and_streams_its_logs(prefect_api, api):
    host, operator = api
    done, flow_run = _run_flow(host, prefect_api)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Completed" in done.stdout
    name = job_document()["metadata"]["name"]
    jobs = "/apis/kubeflow.org/v1/namespaces/lafs/pytorchjobs"
    assert operator.calls.count(f"POST {jobs}") == 3  # created; a 409 on the retry; created again
    assert operator.calls.count(f"DELETE {jobs}/{name}") == 1  # the failed job, replaced
    assert operator.jobs[name]["body"]["spec"] == job_document()["spec"]  # the manifest as written
    assert job_phase(operator.job(name))[0] == "Succeeded"
    text = _flow_run_logs(flow_run)
    assert "PyTorchJob lafs-pretrain: Running" in text and "OOMKilled" in text
    assert "PyTorchJob lafs-pretrain: Succeeded" in text
    assert "[lafs-pretrain-worker-1] lafs-pretrain-worker-1: step 2" in text  # the pods' log lines


def test_a_job_that_keeps_failing_fails_the_flow(prefect_api, api):
    host, operator = api
    operator.scripts = [SCRIPTS[0]]  # every attempt fails
    done, flow_run = _run_flow(host, prefect_api)
    assert done.returncode == 1 and "Failed" in done.stdout
    assert operator.created == 2  # the first attempt and its retry
    assert "OOMKilled" in _flow_run_logs(flow_run)
