"""The base job template of the ``lafs-k8s`` Prefect work pool: prefect-kubernetes' default, plus GPUs.

Each flow run of a Kubernetes work pool is one Job built from this template. The default template requests no
accelerator, so a pipeline run's pretrain / finetune stages would land on a CPU node; this one adds

- a ``gpus`` job variable, rendered into the container's ``resources.limits["nvidia.com/gpu"]`` (unset: a CPU pod,
  the key is dropped) and a toleration of the usual ``nvidia.com/gpu`` node taint;
- the ``lafs-s3`` Secret (AWS keys for the DVC remote and MLflow artifacts) as environment, as the PyTorchJob
  uses it: credentials never sit in ``prefect.yaml`` or the pool;
- ``completions`` / ``parallelism`` moved from the pod spec, where the default places them and where the API
  server's strict schema rejects them, to the Job spec.

The JSON beside this file is its output (``tests/test_k8s.py`` fails while it is stale):

    python infra/prefect/job_template.py --write
    prefect work-pool create lafs-k8s --type kubernetes --base-job-template infra/prefect/kubernetes-job-template.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("kubernetes-job-template.json")
GPU_RESOURCE = "nvidia.com/gpu"
CREDENTIALS_SECRET = "lafs-s3"


def default_template() -> dict[str, Any]:
    """prefect-kubernetes' own default base job template (``prefect work-pool get-default-base-job-template``)."""
    from prefect_kubernetes.worker import KubernetesWorker

    return copy.deepcopy(KubernetesWorker.get_default_base_job_template())


def gpu_template(default: dict[str, Any]) -> dict[str, Any]:
    """``default`` with the GPU request, the GPU toleration, the credentials Secret and the Job fields in place."""
    template = copy.deepcopy(default)
    job = template["job_configuration"]["job_manifest"]["spec"]
    pod = job["template"]["spec"]
    for field in ("completions", "parallelism"):
        if field in pod:
            job[field] = pod.pop(field)
    container = pod["containers"][0]
    container["resources"]["limits"][GPU_RESOURCE] = "{{ gpus }}"
    container["envFrom"] = [{"secretRef": {"name": CREDENTIALS_SECRET, "optional": True}}]
    pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    template["variables"]["properties"]["gpus"] = {
        "anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}],
        "default": None,
        "title": "GPUs",
        "description": "NVIDIA GPUs for the flow-run pod (nvidia.com/gpu limit); unset: a CPU-only pod.",
    }
    return template


def render() -> str:
    return json.dumps(gpu_template(default_template()), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv == ["--write"]:
        TEMPLATE.write_text(text)
    elif argv == ["--check"]:
        if TEMPLATE.read_text() != text:
            print(f"{TEMPLATE} is stale: run python {Path(__file__).name} --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
