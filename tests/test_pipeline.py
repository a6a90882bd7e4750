"""End to end: `make pipeline DATA=... MODELS=...` in a fresh git+DVC copy of the project.

Checks what a user relies on: the stages run and write their outputs, a second run is a no-op (DVC
skips every stage, outputs untouched, `dvc status` clean) even though the Makefile rewrites
params.local.yaml each time, a changed override reruns the stage, and `dvc metrics show` lists the metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Workspace outputs and machine state that must not leak from the checkout into the fresh copy.
SKIP_AT_ROOT = {
    ".venv",
    ".git",
    ".dvc",
    "data",
    "metrics",
    "models",
    "plots",
    "reports",
    "mlruns",
    "mlflow.db",
    ".prefect",
    "params.local.yaml",
    "dvc.lock",
    "build",
}
SKIP_ANYWHERE = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def _ignore(folder: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in SKIP_ANYWHERE or n.endswith(".egg-info")}
    if Path(folder) == REPO:
        skip |= SKIP_AT_ROOT & set(names)
    return skip


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run ``cmd``; on failure show its output (the assertion message is all CI shows)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the checkout as a new git + DVC repo, sharing the venv (the stamp makes setup a no-op)."""
    dst = tmp_path / "project"
    shutil.copytree(REPO, dst, ignore=_ignore, symlinks=True)
    (dst / ".venv").symlink_to(REPO / ".venv")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # The venv's `lafs` is an editable install of the checkout: run the copy's code instead.
        "PYTHONPATH": str(dst),
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "SCIKIT_LEARN_DATA": str(tmp_path / "sklearn"),  # never the user's cache
    }
    env.pop("MAKEFLAGS", None)
    sh(["git", "init", "-q"], dst, env)
    sh([str(BIN / "dvc"), "init", "-q"], dst, env)
    sh([str(BIN / "dvc"), "config", "core.analytics", "false"], dst, env)
    return dst, env


# Every stage, scaled down to seconds: 16 identities x 3 photos, 2 verification folds, one short epoch each.
TINY_RUN = {
    "ingest": {"max_identities": 16, "max_images_per_identity": 3},
    "validate": {"min_eval_identities": 4},
    "split": {"test_fraction": 0.4, "folds": 2, "pairs_per_fold": 6},
    "landmark_net": {"epochs": 1, "batch_size": 8, "num_workers": 0, "max_nme": 10.0},
    "pretrain": {"model": "lafs_vit_tiny", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "epochs": 1,
                 "batch_size": 4, "local_crops": 2, "local_landmarks": 12, "num_workers": 0, "nproc_per_node": 1},
}


def _mtimes(root: Path) -> dict[str, int]:
    paths = [*(root / "data").rglob("*"), *(root / "metrics").rglob("*")]
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in paths if p.is_file()}


def test_make_pipeline_runs_then_is_a_noop(project: tuple[Path, dict[str, str]], shared: Path) -> None:
    root, env = project
    data, models = shared / "data" / "lfw_subset", shared / "models"
    if not data.is_dir():
        pytest.fail(f"{data} missing")
    # Keep the run small; keys added by hand survive the Makefile's rewrite of params.local.yaml.
    (root / "params.local.yaml").write_text(yaml.safe_dump(TINY_RUN))
    make = ["make", "-o", "setup", "pipeline", f"DATA={data}", f"MODELS={models}"]
    counts = {p.name: len(list(p.iterdir())) for p in sorted(data.iterdir()) if p.is_dir()}
    expected = sum(min(counts[n], 3) for n in [n for n in counts if counts[n] >= 2][:16])

    first = sh(make, root, env)
    assert "Running stage 'ingest'" in first
    manifest = pd.read_parquet(root / "data/manifest.parquet")
    assert len(manifest) == expected and manifest["identity"].nunique() == 16
    for stage in ("landmarks", "validate", "split", "landmark_net", "pretrain"):
        assert f"Running stage '{stage}'" in first, stage
    assert (root / "models/pretrain/last.pt").is_file() and (root / "models/pretrain/teacher_backbone.pt").is_file()
    assert json.loads((root / "metrics/validation.json").read_text())["success"] is True
    assert all((root / p).is_file() for p in manifest["path"])
    metrics = json.loads((root / "metrics/ingest.json").read_text())
    assert metrics["images"] == expected and metrics["rejected"] == 0
    local = yaml.safe_load((root / "params.local.yaml").read_text())
    assert local["ingest"] == {**TINY_RUN["ingest"], "source": str(data)}
    assert local["landmarks"]["models_root"] == str(models)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["ingest"]["params"]["params.local.yaml"]["ingest"]["source"] == str(data)
    assert "metrics/ingest.json" in first and "images" in first  # `dvc metrics show` output

    before = _mtimes(root)
    second = sh(make, root, env)
    assert "Running stage" not in second
    for stage in ("ingest", "landmarks", "validate", "split", "landmark_net", "pretrain"):
        assert f"Stage '{stage}' didn't change, skipping" in second, stage
    assert _mtimes(root) == before
    status = sh([str(BIN / "dvc"), "status"], root, env)
    assert "Data and pipelines are up to date" in status

    shown = json.loads(sh([str(BIN / "dvc"), "metrics", "show", "--json"], root, env))
    assert shown[""]["data"]["metrics/ingest.json"]["data"]["images"] == expected

    # A different override reruns the stage; the make-owned key is rewritten.
    (root / "params.local.yaml").write_text(
        yaml.safe_dump({**TINY_RUN, "ingest": {**TINY_RUN["ingest"], "source": "/elsewhere", "max_identities": 12}})
    )
    third = sh(make, root, env)
    assert "Running stage 'ingest'" in third
    assert pd.read_parquet(root / "data/manifest.parquet")["identity"].nunique() == 12
