"""The multi-node manifests: every document passes schema validation (built-in kinds against the API server's
strict schemas, the PyTorchJob against the training operator's), and the fields the training relies on."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from lafs.cli import _build_parser
from lafs.layout import STAGE_IO, Layout

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
MANIFEST = K8S / "pytorchjob.yaml"


def _script_module(path: Path):
    """A script of infra/ (not a package) imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _validator():
    return _script_module(K8S / "validate.py")


def _docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def pod_command(container: dict) -> tuple[list[str], list[str]]:
    """(the ``dvc pull`` targets, the torchrun command) of the job's ``sh -c "dvc pull ... && exec torchrun ..."``."""
    shell, flag, script = container["command"]
    assert (shell, flag) == ("sh", "-c")
    pull, run = (shlex.split(part) for part in script.split(" && exec "))
    assert pull[:2] == ["dvc", "pull"]
    return pull[2:], run


@pytest.mark.parametrize("manifest", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_passes_schema_validation(manifest):
    assert _validator().validate_file(manifest) >= 1


def test_schema_validation_catches_typos_wrong_types_and_unknown_fields():
    validator = _validator()
    job = _docs()["PyTorchJob"]
    container = ["spec", "pytorchReplicaSpecs", "Worker", "template", "spec", "containers", 0]
    for path, key, value in (
        (container, "imagePullPolcy", "Always"),  # a typo inside the embedded pod template
        (["spec", "elasticPolicy"], "maxRestart", 3),  # a typo in the operator's own fields
        (["spec", "pytorchReplicaSpecs", "Worker"], "replicas", "two"),  # a wrong type
        ([], "kind", "TFJob"),
    ):
        bad = copy.deepcopy(job)
        node = bad
        for step in path:
            node = node[step]
        node[key] = value
        with pytest.raises((jsonschema.ValidationError, SchemaNotFoundError)):  # TFJob: no schema to pass
            validator.validate_document(bad)
    pvc = copy.deepcopy(_docs()["PersistentVolumeClaim"])
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(Exception, match="accesModes"):
        validator.validate_document(pvc)


def test_pytorchjob_is_elastic_and_runs_torchrun_lafs_pretrain_on_every_node():
    job = _docs()["PyTorchJob"]
    spec = job["spec"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    elastic = spec["elasticPolicy"]
    # fixed size, elastic restarts: the per-rank order and the LR scaling depend on the world size
    assert elastic["minReplicas"] == elastic["maxReplicas"] == worker["replicas"] >= 2
    assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] == 0  # restarts: the operator's pods
    assert worker["restartPolicy"] == "OnFailure" and spec["runPolicy"]["backoffLimit"] >= 1
    pod = worker["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]  # the name the operator requires
    pulled, run = pod_command(container)
    assert run[:4] == ["torchrun", "--module", "lafs", "pretrain"]
    args = _build_parser().parse_args(run[3:])  # the arguments after `torchrun --module lafs` are a `lafs` call
    assert args.command == "pretrain"
    # the pulled files are pretrain's inputs that do not stream from S3 (faces come from the shards)
    layout = Layout(Path("."))
    needed = {str(getattr(layout, name)) for name in STAGE_IO["pretrain"].deps} - {"data/aligned", "data/shards"}
    assert set(pulled) == needed
    gpus = int(spec["nprocPerNode"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    # the image keeps the project at its WORKDIR; the checkpoint volume backs the stage's own folder there
    workdir = re.search(r"^WORKDIR (\S+)$", (REPO / "infra" / "Dockerfile").read_text(), re.M).group(1)
    assert container["workingDir"] == workdir
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["checkpoints"] == str(Layout(Path(workdir) / args.root).pretrain)
    assert mounts["dshm"] == "/dev/shm"
    assert any(e.get("secretRef", {}).get("name") == "lafs-s3" for e in container["envFrom"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "lafs-checkpoints"
    assert _docs()["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_image_holds_the_lock_and_the_dvc_config():
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    copied = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = {s for line in copied for s in line}
    assert {"dvc.yaml", "params.yaml", "dvc.lock*", ".dvc/config"} <= sources
    assert "no_scm = true" in dockerfile  # no .git in the image


def test_manifests_hold_no_credentials():
    text = MANIFEST.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    for doc in yaml.safe_load_all(text):
        for line in yaml.safe_dump(doc).splitlines():
            if re.search(r"(?i)(secret_access_key|password|token)\s*:\s*\S", line):
                raise AssertionError(f"literal credential in manifest: {line}")


# --- The Prefect Kubernetes work pool: its base job template requests GPUs ----------------------------------
def _job_template_module():
    return _script_module(REPO / "infra" / "prefect" / "job_template.py")


def _flow_run_job(template: dict, job_variables: dict) -> dict:
    """The Job manifest the prefect-kubernetes worker would create for a flow run with these job variables."""
    import asyncio
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="nightly-run"))
    return config.job_manifest


def test_work_pool_template_is_the_installed_default_plus_gpus_and_credentials():
    module = _job_template_module()
    assert module.main(["--check"]) == 0, "run: python infra/prefect/job_template.py --write"
    default, ours = module.default_template(), json.loads(module.TEMPLATE.read_text())
    assert set(ours["variables"]["properties"]) - set(default["variables"]["properties"]) == {"gpus"}
    container = ours["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["envFrom"] == [{"secretRef": {"name": "lafs-s3", "optional": True}}]
    gpus = ours["variables"]["properties"]["gpus"]
    for bad in (-1, "one", 1.5):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, gpus)


@pytest.mark.parametrize("pool", ["kubernetes_gpu", "kubernetes"])
def test_prefect_yaml_pools_render_valid_jobs_with_their_gpu_request(prefect_api, pool):
    """prefect.yaml's k8s pool definitions through the real worker's rendering: strict-valid Jobs, the GPU limit
    only where asked, and only variables the template declares (a typo such as ``gpu: 1`` would be ignored)."""
    module = _job_template_module()
    template = json.loads(module.TEMPLATE.read_text())
    job_variables = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"][pool][
        "job_variables"
    ]
    assert set(job_variables) <= set(template["variables"]["properties"])
    jsonschema.validate(job_variables, template["variables"])

    job = _flow_run_job(template, job_variables)
    _validator().validate_document(job)
    assert job["spec"]["completions"] == 1 and job["spec"]["parallelism"] == 1
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == job_variables["image"]
    if pool == "kubernetes_gpu":
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == job_variables["env"]["MLFLOW_TRACKING_URI"]
    assert not any("AWS_" in name for name in env)  # keys come from the Secret, not the pool

    # prefect-kubernetes' own default puts Job fields into the pod spec: the strict schema rejects it.
    with pytest.raises(ValidationError, match="completions"):
        _validator().validate_document(_flow_run_job(module.default_template(), job_variables))
