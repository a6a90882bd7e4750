"""Pretraining stage on real face photos: single process, DDP on gloo, exact resume, SIGTERM, NaN, MLflow."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from lafs.config import SSLParams, resolved
from lafs.data.shards import write_index, write_shard_set
from lafs.engine.checkpoint import load_checkpoint, save_checkpoint
from lafs.engine.ssl import NonFiniteLossError, SSLTrainer
from lafs.layout import Layout
from lafs.models import create_model
from lafs.stages import StageError
from lafs.stages.pretrain import PretrainPaths
from lafs.stages.pretrain import train as run
from lafs.stages.shards import records

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model": "lafs_vit_tiny",
    "landmark_net": "landmark_net_mnv3_small",
    "num_landmarks": 68,
    "out_dim": 128,
    "hidden_dim": 64,
    "bottleneck_dim": 32,
    "num_prototypes": 64,
    "local_crops": 2,
    "local_landmarks": 12,
    "epochs": 2,
    "batch_size": 4,
    "warmup_epochs": 0,
    "warmup_teacher_temp_epochs": 1,
    "num_workers": 0,
    "dtype": "fp32",
    "checkpoint_every": 2,
    "nproc_per_node": 1,
    "device": "cpu",
    "deterministic": True,
}


def _mean_shape() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(68, 2, generator=g) * 70 + 20


@pytest.fixture(scope="module")
def ssl_data(tmp_path_factory, lfw_subset) -> Path:
    """A data dir shaped like the split stage's output: 16 real faces at 112 px, dense landmarks, a net."""
    root = tmp_path_factory.mktemp("ssl")
    data = root / "data"
    files = sorted(lfw_subset.glob("*/*.jpg"))[:16]
    rows = []
    for f in files:
        rel = Path("data/aligned") / f.parent.name / (f.stem + ".png")  # relative to the project root
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").crop((19, 19, 131, 131)).save(root / rel)
        rows.append({"aligned_path": str(rel), "identity": f.parent.name, "label": 0, "sha256": f.stem})
    (data / "splits").mkdir()
    pd.DataFrame(rows).to_csv(data / "splits" / "ssl.csv", index=False)
    dense = [(_mean_shape() + torch.randn(68, 2)).reshape(-1).tolist() for _ in rows]
    pd.DataFrame({"aligned_path": [r["aligned_path"] for r in rows], "dense": dense}).to_parquet(
        data / "landmarks.parquet"
    )
    net = create_model("landmark_net_mnv3_small", num_landmarks=68)
    net.init_mean_shape(_mean_shape())
    save_checkpoint(
        {"model": "landmark_net_mnv3_small", "kwargs": {"num_landmarks": 68}, "state_dict": net.state_dict()},
        root / "models" / "landmark_net.pt",
    )
    shards = Layout(root).shards  # the same faces as shards of 5 (four tars, the last one short)
    shards.mkdir()
    write_index(shards, {"ssl": write_shard_set(records(Layout(root), "ssl"), shards, "ssl", 5)}, 5)
    return root


def _paths(root: Path, out: str) -> PretrainPaths:
    layout = Layout(root)
    return PretrainPaths(layout, root / out, layout.landmark_net, root / out / "metrics.json")


def _script(root: Path, out: str, cfg: dict) -> list[str]:
    code = (
        "import json, sys; from pathlib import Path\n"
        "from lafs.config import SSLParams\n"
        "from lafs.layout import Layout\n"
        "from lafs.engine.preemption import Preempted\n"
        "from lafs.stages.pretrain import PretrainPaths, train\n"
        f"cfg = SSLParams(**json.loads({json.dumps(json.dumps(cfg))}))\n"
        f"root = Path({str(root)!r})\n"
        f"paths = PretrainPaths(Layout(root), root / {out!r}, Layout(root).landmark_net,"
        f" root / {out!r} / 'metrics.json')\n"
        "try:\n    print(train(cfg, paths).describe())\n"
        "except Preempted as e:\n    print(e); sys.exit(143)\n"
    )
    return [sys.executable, "-c", code]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("method", ["lafs", "dino_face", "pros"])
def test_pretrain_runs_each_method_on_real_faces(ssl_data, method, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    model = "dino_vit_tiny" if method == "dino_face" else "lafs_vit_tiny"
    cfg = SSLParams(**{**TINY, "method": method, "model": model, "epochs": 1})
    paths = _paths(ssl_data, f"out_{method}")
    summary = run(cfg, paths)
    assert summary.iterations == 4 and summary.final_loss == summary.final_loss  # 16 images / batch 4, not NaN
    state = load_checkpoint(paths.last)
    assert state["iteration"] == 4 and state["config"] == resolved(cfg)
    teacher = load_checkpoint(paths.teacher)
    backbone = create_model(teacher["model"], **teacher["kwargs"])
    backbone.load_state_dict(teacher["state_dict"])
    assert json.loads(paths.metrics.read_text())["iterations"] == 4


def test_extracted_landmarks_mode(ssl_data, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = SSLParams(**{**TINY, "landmark_source": "extracted", "epochs": 1})
    assert run(cfg, _paths(ssl_data, "out_extracted")).iterations == 4


def test_mlflow_run_has_params_metrics_and_teacher(ssl_data, monkeypatch, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = SSLParams(**{**TINY, "epochs": 1, "experiment": "t-pretrain"})
    run(cfg, _paths(ssl_data, "out_mlflow"))
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("t-pretrain")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.params["method"] == "lafs" and r.data.params["out_dim"] == "128"
    for key in ("loss", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy", "images_per_s"):
        assert len(client.get_metric_history(r.info.run_id, key)) == 4, key
    artifacts = [a.path for a in client.list_artifacts(r.info.run_id, "teacher")]
    assert artifacts == ["teacher/teacher_backbone.pt"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(ssl_data, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    real_step = SSLTrainer.train_step

    def step(self, batch, it, generator=None):
        if it == 3:
            raise NonFiniteLossError(f"loss is nan at iteration {it}")
        return real_step(self, batch, it, generator)

    monkeypatch.setattr(SSLTrainer, "train_step", step)
    paths = _paths(ssl_data, "out_nan")
    with pytest.raises(StageError, match=r"iteration 3.*last good checkpoint"):
        run(SSLParams(**TINY), paths)
    assert load_checkpoint(paths.last)["iteration"] == 2


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    return {**{f"s.{k}": v for k, v in state["student"].items()}, **{f"t.{k}": v for k, v in state["teacher"].items()}}


@pytest.mark.integration  # several processes / a real training run
@pytest.mark.parametrize("source", ["files", "shards"])
def test_sigkill_then_resume_matches_uninterrupted_run(ssl_data, tmp_path, source):
    """Files through the resumable sampler; shards as a stream over two loader workers (16 faces, batch 2:
    killed mid-epoch, a worker other than the first is next)."""
    cfg = {**TINY, "checkpoint_every": 1, "num_workers": 1}
    if source == "shards":
        cfg |= {"data_source": "shards", "num_workers": 2, "batch_size": 2, "epochs": 1}
    env = _env(tmp_path)
    ref = subprocess.run(_script(ssl_data, f"ref_{source}", cfg), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    # interrupted run: SIGKILL once a checkpoint mid-training exists, then rerun the same command
    killed = f"killed_{source}"
    proc = subprocess.Popen(_script(ssl_data, killed, cfg), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last = ssl_data / killed / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.exists() and load_checkpoint(last)["iteration"] >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = load_checkpoint(last)["iteration"]
    assert 3 <= killed_at < 8
    resumed = subprocess.run(_script(ssl_data, killed, cfg), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at iteration" in resumed.stdout
    a, b = _final_weights(ssl_data / f"ref_{source}" / "last.pt"), _final_weights(last)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.integration  # several processes / a real training run
def test_sigterm_writes_checkpoint_and_exits_cleanly(ssl_data, tmp_path):
    cfg = {**TINY, "checkpoint_every": 100, "epochs": 3}
    proc = subprocess.Popen(
        _script(ssl_data, "term", cfg), env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1)
    deadline = time.time() + 300
    while time.time() < deadline and not (ssl_data / "term" / "last.pt").exists():
        # the first checkpoint comes at the end of epoch 1; send SIGTERM while epoch 2 runs
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM at iteration" in out and "Traceback" not in err
    it = load_checkpoint(ssl_data / "term" / "last.pt")["iteration"]
    assert 4 <= it < 12


def test_rerun_of_a_finished_run_changes_nothing_and_refuses_changed_params(ssl_data, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    paths = _paths(ssl_data, "out_changed")
    run(SSLParams(**{**TINY, "epochs": 1}), paths)
    teacher, metrics = paths.teacher.read_bytes(), json.loads(paths.metrics.read_text())
    # the same params again: nothing to train, the same teacher bytes (downstream stays valid), the same figures
    assert run(SSLParams(**{**TINY, "epochs": 1}), paths).resumed_from == metrics["iterations"]
    assert paths.teacher.read_bytes() == teacher
    again = json.loads(paths.metrics.read_text())
    assert math.isfinite(again["final_loss"]) and again["final_loss"] == metrics["final_loss"]
    assert again["teacher_entropy"] == metrics["teacher_entropy"] is not None
    with pytest.raises(StageError, match="different pretrain params or inputs"):
        run(SSLParams(**{**TINY, "epochs": 1, "lr": 1e-3}), paths)


@pytest.mark.integration  # several processes / a real training run
@pytest.mark.parametrize("source", ["files", "shards"])
def test_two_process_gloo_ddp_keeps_ranks_identical(ssl_data, tmp_path, source):
    """Each rank reads its own half: the sampler's indices, or its own contiguous run of the shards."""
    cfg = {**TINY, "epochs": 1, "batch_size": 2, "data_source": source}
    script = _script(ssl_data, f"ddp_{source}", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python", *script]
    res = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((ssl_data / f"ddp_{source}" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] is True
    assert metrics["iterations"] == 4  # 16 images / 2 ranks / batch 2


def test_checkpoint_mirrored_to_s3_and_resumed_from_it(ssl_data, s3_endpoint, monkeypatch, tmp_path):
    """A real S3-compatible server (moto) on 127.0.0.1: last.pt is uploaded, and a job on a fresh disk resumes."""
    import boto3

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    boto3.client("s3").create_bucket(Bucket="ckpt")
    cfg = SSLParams(**{**TINY, "epochs": 1, "checkpoint_uri": "s3://ckpt/runs/a"})
    first = _paths(ssl_data, "out_s3_first")
    run(cfg, first)
    obj = boto3.client("s3").get_object(Bucket="ckpt", Key="runs/a/last.pt")
    assert obj["ContentLength"] == first.last.stat().st_size
    # a new machine: empty checkpoint dir, same params -> it downloads last.pt and finds the run complete
    second = _paths(ssl_data, "out_s3_second")
    summary = run(cfg, second)
    assert summary.resumed_from == 4 and summary.iterations == 4


@pytest.mark.integration  # several processes / a real training run
def test_two_node_run_through_the_cli_launcher(ssl_data, tmp_path):
    """Multi-node on one machine: two `lafs pretrain` launches (nnodes=2) meet at a c10d rendezvous on 127.0.0.1."""
    from conftest import free_port

    sets = [
        f"pretrain.{k}={json.dumps(v)}"
        for k, v in {
            **TINY,
            "epochs": 1,
            "batch_size": 2,
            "nnodes": 2,
            "rdzv_endpoint": f"127.0.0.1:{free_port()}",
        }.items()
    ]
    procs = []
    for node in (0, 1):
        overrides = [a for s in [*sets, f"pretrain.node_rank={node}"] for a in ("--set", s)]
        cmd = [
            sys.executable,
            "-m",
            "lafs",
            "pretrain",
            "--root",
            str(ssl_data),
            "--params",
            str(REPO / "params.yaml"),
            *overrides,
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    metrics = json.loads((ssl_data / "metrics" / "pretrain.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] is True and metrics["iterations"] == 4


@pytest.mark.integration  # two torchrun agents, a killed worker, S3
def test_the_pytorchjob_pod_command_survives_a_killed_worker(ssl_data, s3_endpoint, monkeypatch, tmp_path):
    """The PyTorchJob's container command (its torchrun part) as the training operator runs it: two pods on
    127.0.0.1, each with its own disk, in the environment an elastic PyTorchJob injects (PET_*). One worker is
    SIGKILLed mid-run: both pods fail (maxRestarts 0), the operator's restart brings up new pods on empty disks,
    they resume from the checkpoint mirrored to S3 (moto), and the job ends with the same weights as an
    uninterrupted one."""
    import boto3
    import psutil
    import yaml
    from conftest import free_port
    from test_k8s import _docs, pod_command

    job = _docs()["PyTorchJob"]
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    _, command = pod_command(container)
    command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]  # `torchrun` of this venv
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    boto3.client("s3").create_bucket(Bucket="jobs")
    elastic = job["spec"]["elasticPolicy"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def start(name: str, attempt: int = 0) -> tuple[list[subprocess.Popen], list[Path]]:
        port, procs, roots = free_port(), [], []
        for pod in (0, 1):
            root = tmp_path / name / f"pod{pod}-{attempt}"  # the image's working directory: a new disk per pod
            (root / "models").mkdir(parents=True)
            (root / "data").symlink_to(ssl_data / "data")  # what `dvc pull` and the S3 shards give the pod
            (root / "models" / "landmark_net.pt").symlink_to(ssl_data / "models" / "landmark_net.pt")
            pretrain = {**TINY, "epochs": 2, "batch_size": 2, "checkpoint_every": 1, "data_source": "shards"}
            pretrain |= {"checkpoint_uri": f"s3://jobs/{name}"}
            pod_params = {**params, "pretrain": {**params["pretrain"], **pretrain}}
            (root / "params.yaml").write_text(yaml.safe_dump(pod_params))
            env = {
                **_env(tmp_path),
                "PET_NNODES": f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
                "PET_NPROC_PER_NODE": "1",
                "PET_RDZV_BACKEND": elastic["rdzvBackend"],
                "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}",
                "PET_RDZV_ID": f"{name}-{attempt}",
                "PET_MAX_RESTARTS": str(elastic["maxRestarts"]),
            }
            out = subprocess.PIPE
            procs.append(subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
            roots.append(root)
        return procs, roots

    def finish(procs: list[subprocess.Popen], ok: bool = True) -> str:
        outs = [p.communicate(timeout=600)[0] for p in procs]
        for p, out in zip(procs, outs, strict=True):
            assert (p.returncode == 0) == ok, out[-3000:]
        return "\n".join(outs)

    def mirrored(name: str) -> dict[str, torch.Tensor]:
        local = tmp_path / f"{name}.pt"
        boto3.client("s3").download_file("jobs", f"{name}/last.pt", str(local))
        assert load_checkpoint(local)["iteration"] == 8  # 2 epochs x 16 faces / (2 ranks x batch 2)
        return _final_weights(local)

    finish(start("ref")[0])
    procs, roots = start("killed")
    deadline = time.time() + 300
    lasts = [Layout(r).pretrain / "last.pt" for r in roots]
    while time.time() < deadline and not any(p.exists() and load_checkpoint(p)["iteration"] >= 3 for p in lasts):
        time.sleep(0.2)
    workers = psutil.Process(procs[1].pid).children(recursive=True)
    assert workers, "pod 1 has no worker process to kill"
    for worker in workers:
        worker.kill()
    finish(procs, ok=False)  # the pods fail; the operator restarts them (restartPolicy OnFailure, backoffLimit)
    assert job["spec"]["runPolicy"]["backoffLimit"] >= 1
    out = finish(start("killed", attempt=1)[0])
    assert "resumed at iteration" in out
    a, b = mirrored("ref"), mirrored("killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
