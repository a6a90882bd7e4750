"""The pretraining-step benchmark runs end to end and reports sane numbers (no timing assertions: the machine
is shared, so only the shape of the report is checked)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "pretrain_step.py"
KEYS = ("images_per_s", "step_ms", "peak_mem_mb", "gflops_per_image", "achieved_gflops")


def _run(*extra: str) -> list[dict]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--model",
        "lafs_vit_tiny",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--threads",
        "2",
        "--out-dim",
        "64",
        "--num-landmarks",
        "16",
        "--local-crops",
        "2",
        "--local-landmarks",
        "4",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_pretrain_step_reports_positive_finite_numbers(tmp_path) -> None:
    out = tmp_path / "bench.jsonl"
    rows = _run("--out", str(out))
    assert len(rows) == 1
    row = rows[0]
    assert row["impl"] == "ours" and row["model"] == "lafs_vit_tiny" and row["out_dim"] == 64
    for key in KEYS:
        assert isinstance(row[key], float | int) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert math.isfinite(row["loss"])
    # the --out file gets the same line appended
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


@pytest.mark.integration  # several processes / a real training run
def test_loader_part_reports_loader_and_fed_throughput(tmp_path, lfw_subset) -> None:
    from PIL import Image

    faces = tmp_path / "aligned"
    faces.mkdir()
    for photo in sorted(lfw_subset.glob("*/*.jpg"))[:8]:  # 112x112 stand-ins for aligned faces: same decode cost
        Image.open(photo).convert("RGB").resize((112, 112)).save(faces / f"{photo.stem}.png")
    rows = _run("--loader", str(faces), "--loader-workers", "1", "--no-flops")
    assert [r["impl"] for r in rows] == ["ours", "loader", "summary"]
    loader, summary = rows[1], rows[2]
    assert loader["images"] == 8 and loader["loader_workers"] == 1
    for key in ("loader_images_per_s", "fed_images_per_s"):
        assert math.isfinite(loader[key]) and loader[key] > 0, (key, loader[key])
    assert summary["loader_vs_step"] == round(loader["loader_images_per_s"] / rows[0]["images_per_s"], 3)


@pytest.mark.integration  # torchrun + subprocesses
def test_gpu_check_dry_run_reports_every_part(tmp_path):
    """benchmarks/gpu_check.sh, ready for a CUDA machine, runs its three parts at toy sizes on the CPU: the SSL
    step, a DDP step (gloo, ranks in sync) and a finetune smoke run whose loss falls."""
    out = tmp_path / "gpu.json"
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    assert report["pretrain_step"]["images_per_s"] > 0 and report["pretrain_step"]["model"] == "lafs_vit_tiny"
    assert report["ddp"]["backend"] == "gloo" and report["ddp"]["ranks_in_sync"] is True
    ft = report["finetune"]
    assert ft["finite"] and ft["last_loss"] < ft["first_loss"] and ft["images_per_s"] > 0


@pytest.mark.integration  # loader worker processes
def test_shard_loader_reads_the_same_number_of_faces_from_files_and_shards(tmp_path, lfw_subset) -> None:
    from PIL import Image

    faces = tmp_path / "aligned"
    faces.mkdir()
    for photo in sorted(lfw_subset.glob("*/*.jpg"))[:10]:
        Image.open(photo).convert("RGB").resize((112, 112)).save(faces / f"{photo.stem}.png")
    out = tmp_path / "loader.json"
    cmd = [sys.executable, "benchmarks/shard_loader.py", "--aligned", str(faces), "--work", str(tmp_path / "w")]
    cmd += ["--faces", "300", "--per-shard", "64", "--batch", "16", "--shuffle-buffer", "50", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(list((tmp_path / "w" / "shards").glob("*.tar"))) == 5  # 300 faces, 64 to a tar
    assert result["files"]["images"] == result["shards"]["images"] == 288  # whole batches of 16 per worker
    for part in ("files", "shards"):
        assert math.isfinite(result[part]["images_per_s"]) and result[part]["images_per_s"] > 0
    assert result["shards_vs_files"] == round(result["shards"]["images_per_s"] / result["files"]["images_per_s"], 2)
