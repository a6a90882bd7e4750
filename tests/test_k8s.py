"""The multi-node manifests: parse them and check the fields the training setup relies on."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lafs.cli import _build_parser
from lafs.layout import Layout

MANIFEST = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "pytorchjob.yaml"


def _docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def test_pytorchjob_runs_torchrun_lafs_pretrain_on_every_node():
    job = _docs()["PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    nproc = int(job["spec"]["nprocPerNode"])
    for role in ("Master", "Worker"):
        pod = specs[role]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]  # name the operator requires
        cmd = container["command"]
        assert cmd[:4] == ["torchrun", "--module", "lafs", "pretrain"]
        # the arguments after `torchrun --module lafs` must be a valid `lafs` command line
        args = _build_parser().parse_args(cmd[3:])
        assert args.command == "pretrain"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        # the checkpoint volume backs the stage's own folder below the project root (the working directory)
        assert mounts["checkpoints"] == str(Layout(Path(container["workingDir"]) / args.root).pretrain)
        assert mounts["dshm"] == "/dev/shm"
        assert any(e.get("secretRef", {}).get("name") == "lafs-s3" for e in container["envFrom"])
        assert pod["initContainers"][0]["command"][:2] == ["dvc", "pull"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "lafs-checkpoints"
    assert _docs()["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_manifests_hold_no_credentials():
    text = MANIFEST.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    for doc in yaml.safe_load_all(text):
        for line in yaml.safe_dump(doc).splitlines():
            if re.search(r"(?i)(secret_access_key|password|token)\s*:\s*\S", line):
                raise AssertionError(f"literal credential in manifest: {line}")
