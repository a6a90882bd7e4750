"""Prefect hands pretraining to a Kubernetes cluster: submit the PyTorchJob of ``infra/k8s/pytorchjob.yaml``
through the Kubernetes API, stream its status and its pods' logs into the flow run, end with the job.

The local process pool (``flows.pipeline``: ``dvc repro`` stage by stage) stays the default; this task is for
when the training stage needs GPUs the Prefect worker does not have. A job that ends ``Failed`` fails the task,
and Prefect's retry submits it again (a job of the same name left from a failed attempt is deleted first; one
still running is attached to, not duplicated). After it succeeds, ``dvc repro pretrain`` records the teacher
(see the manifest's header).

    python -m flows.cluster --namespace lafs          # kubeconfig / in-cluster credentials, as kubectl
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

MANIFEST = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "pytorchjob.yaml"
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_LABEL = "training.kubeflow.org/job-name"  # the label the training operator puts on a job's pods


class ClusterJobFailed(RuntimeError):
    """The PyTorchJob ended Failed (or did not end in time); the message carries the operator's reason."""


def job_document(manifest: Path = MANIFEST) -> dict[str, Any]:
    (job,) = [d for d in yaml.safe_load_all(manifest.read_text()) if d and d.get("kind") == "PyTorchJob"]
    return job


def job_phase(job: dict[str, Any]) -> tuple[str, str]:
    """(the latest true condition of the job: Created / Running / Restarting / Succeeded / Failed, its message)."""
    true = [c for c in job.get("status", {}).get("conditions") or [] if c.get("status") == "True"]
    if not true:
        return "Pending", ""
    last = true[-1]
    return last["type"], last.get("message", "")


def api_client(host: str | None) -> Any:
    """A Kubernetes API client: ``host`` as given (no credentials: a local proxy or test server), else the
    in-cluster service account, else the kubeconfig, as kubectl would."""
    from kubernetes import client, config

    if host is not None:
        configuration = client.Configuration()
        configuration.host = host
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _submit(custom: Any, namespace: str, body: dict[str, Any], log: Any) -> None:
    """Create the job; a same-named one from a failed attempt is deleted first, a running one is attached to."""
    from kubernetes.client.exceptions import ApiException

    name = body["metadata"]["name"]
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        log.info("submitted PyTorchJob %s/%s", namespace, name)
        return
    except ApiException as exc:
        if exc.status != 409:
            raise
    phase, _ = job_phase(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
    if phase not in ("Succeeded", "Failed"):
        log.info("PyTorchJob %s/%s is already %s: following it", namespace, name, phase)
        return
    log.info("PyTorchJob %s/%s is left from an earlier attempt (%s): replacing it", namespace, name, phase)
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def _stream_logs(core: Any, namespace: str, name: str, seen: dict[str, int], log: Any) -> None:
    """Log the lines each of the job's pods printed since the last call (``seen``: lines per pod so far)."""
    from kubernetes.client.exceptions import ApiException

    pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={name}").items
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        try:
            text = core.read_namespaced_pod_log(pod.metadata.name, namespace, container="pytorch")
        except ApiException:  # not started yet, or gone
            continue
        lines = text.splitlines()
        for line in lines[seen.get(pod.metadata.name, 0) :]:
            log.info("[%s] %s", pod.metadata.name, line)
        seen[pod.metadata.name] = len(lines)


@task(name="train-on-cluster", retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE)
def train_on_cluster(
    namespace: str = "default",
    manifest: Path = MANIFEST,
    host: str | None = None,
    poll_seconds: float = 10.0,
    timeout_seconds: float = 7 * 24 * 3600,
) -> dict[str, Any]:
    """Submit the PyTorchJob, follow it to its end, return its final status; raise :class:`ClusterJobFailed`."""
    from kubernetes import client

    log = get_run_logger()
    body = job_document(manifest)
    name = body["metadata"]["name"]
    api = api_client(host)
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    _submit(custom, namespace, body, log)
    seen: dict[str, int] = {}
    phase, deadline = "", time.monotonic() + timeout_seconds
    while True:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        _stream_logs(core, namespace, name, seen, log)
        now, message = job_phase(job)
        if now != phase:
            log.info("PyTorchJob %s: %s %s", name, now, message)
            phase = now
        if phase == "Succeeded":
            return job.get("status", {})
        if phase == "Failed":
            raise ClusterJobFailed(f"PyTorchJob {namespace}/{name} failed: {message}")
        if time.monotonic() > deadline:
            raise ClusterJobFailed(f"PyTorchJob {namespace}/{name} still {phase} after {timeout_seconds:.0f} s")
        time.sleep(poll_seconds)


@flow(name="lafs-pretrain-on-cluster")
def pretrain_on_cluster(
    namespace: str = "default", host: str | None = None, poll_seconds: float = 10.0, retry_delay_seconds: float = 30.0
) -> dict:
    """Pretraining as a PyTorchJob on the cluster (the Kubernetes work pool's GPUs stay free for it)."""
    task = train_on_cluster.with_options(retry_delay_seconds=retry_delay_seconds)
    return task(namespace=namespace, host=host, poll_seconds=poll_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--host", default=None, help="API server URL (default: in-cluster or kubeconfig)")
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="between status checks")
    parser.add_argument("--retry-delay", type=float, default=30.0, help="seconds before a failed job is resubmitted")
    args = parser.parse_args(argv)
    state = pretrain_on_cluster(
        namespace=args.namespace,
        host=args.host,
        poll_seconds=args.poll_seconds,
        retry_delay_seconds=args.retry_delay,
        return_state=True,
    )
    print(f"flow run {state.state_details.flow_run_id}: {state.name}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    raise SystemExit(main())
