"""End to end: `make pipeline DATA=... MODELS=...` in a fresh git+DVC copy of the project.

Checks what a user relies on: the stages run and write their outputs, a second run is a no-op (DVC
skips every stage, outputs untouched, `dvc status` clean) even though the Makefile sets DATA/MODELS in
params.yaml each time, a changed override reruns the stage, and `dvc metrics show` lists the metrics. And the
DVC way without make: a fresh clone runs `dvc repro` on params.yaml alone and takes overrides from
`dvc exp run --set-param`, which `dvc exp show` lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, TINY_RUN, copy_project, set_run, sh

from lafs.data.recordio import write_records
from lafs.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the checkout as a new git + DVC repo, sharing the venv (the stamp makes setup a no-op)."""
    return copy_project(tmp_path)


def _mtimes(root: Path) -> dict[str, int]:
    paths = [*(root / "data").rglob("*"), *(root / "metrics").rglob("*")]
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in paths if p.is_file()}


def test_make_pipeline_runs_then_is_a_noop(project: tuple[Path, dict[str, str]], shared: Path) -> None:
    root, env = project
    data, models = shared / "data" / "lfw_subset", shared / "models"
    if not data.is_dir():
        pytest.fail(f"{data} missing")
    set_run(root, TINY_RUN)  # keep the run small; values set before survive the Makefile's DATA/MODELS
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
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["ingest"] == {**params["ingest"], **TINY_RUN["ingest"], "source": str(data)}
    assert params["landmarks"]["models_root"] == str(models)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["ingest"]["params"]["params.yaml"]["ingest"]["source"] == str(data)
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

    # A different override reruns the stage; the make-owned key is set again.
    set_run(root, {"ingest": {"source": "/elsewhere", "max_identities": 12}})
    third = sh(make, root, env)
    assert "Running stage 'ingest'" in third
    assert pd.read_parquet(root / "data/manifest.parquet")["identity"].nunique() == 12


def test_fresh_clone_runs_dvc_repro_and_takes_overrides_from_dvc_exp_run(project, shared: Path) -> None:
    """No set-up step between clone and `dvc repro`: params.yaml alone is a complete configuration, and
    `dvc exp run --set-param` is how a run is pointed elsewhere (listed by `dvc exp show`)."""
    root, env = project
    data = shared / "data" / "lfw_subset"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    sh([*git, "add", "-A"], root, env)
    sh([*git, "commit", "-q", "-m", "fresh"], root, env)
    dvc = str(BIN / "dvc")
    status = json.loads(sh([dvc, "status", "--json"], root, env))  # reads every stage's params
    assert {"ingest", "landmarks", "finetune", "register"} <= set(status)  # all stale, none broken

    sets = {"ingest.source": str(data), "ingest.max_identities": 3, "ingest.max_images_per_identity": 2}
    out = sh(
        [dvc, "exp", "run", "--name", "subset3", *(f"--set-param={k}={v}" for k, v in sets.items()), "ingest"],
        root,
        env,
    )
    assert "Running stage 'ingest'" in out
    manifest = pd.read_parquet(root / "data/manifest.parquet")
    assert len(manifest) == 6 and manifest["identity"].nunique() == 3
    shown = json.loads(sh([dvc, "exp", "show", "--json"], root, env))
    exps = [e for commit in shown for e in (commit.get("experiments") or [])]
    (exp,) = [e for e in exps if e.get("name") == "subset3"]
    values = exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["ingest"]
    assert {f"ingest.{k}": v for k, v in values.items() if f"ingest.{k}" in sets} == sets


def test_a_recordio_pack_feeds_pretraining_and_finetuning_through_shards(project, shared: Path) -> None:
    """The at-scale data path on a small set: an insightface ``.rec`` pack (written here from 16 shared people x 3
    photos) is ingested, aligned and written as WebDataset shards, pretraining and finetuning stream the shards,
    and a second ``dvc repro`` changes nothing (the shards are byte-identical outputs, so nothing downstream
    reruns either)."""
    root, env = project
    people = sorted(p for p in (shared / "data" / "lfw_subset").iterdir() if len(list(p.glob("*.jpg"))) >= 2)[:16]
    faces = [(label, f.read_bytes()) for label, p in enumerate(people) for f in sorted(p.glob("*.jpg"))[:3]]
    (root.parent / "pack").mkdir()
    rec = write_records(root.parent / "pack" / "train.rec", faces)
    stream = {"data_source": "shards", "num_workers": 2}
    set_run(
        root,
        {
            **TINY_RUN,
            "ingest": {**TINY_RUN["ingest"], "source": str(rec)},
            "landmarks": {"models_root": str(shared / "models")},
            "shards": {"write": True, "samples_per_shard": 10},
            "pretrain": {**TINY_RUN["pretrain"], **stream},
            "finetune": {**TINY_RUN["finetune"], **stream},
        },
    )
    dvc = str(BIN / "dvc")
    first = sh([dvc, "repro", "finetune"], root, env)
    for stage in ("ingest", "landmarks", "split", "shards", "pretrain", "tune", "finetune"):
        assert f"Running stage '{stage}'" in first, stage
    index = json.loads((root / "data/shards/index.json").read_text())
    splits = {n: pd.read_csv(root / f"data/splits/{n}.csv") for n in ("ssl", "finetune")}
    for name, table in splits.items():
        assert sum(len(s["identities"]) for s in index["sets"][name]["shards"]) == len(table) > 10
    ssl = json.loads((root / "metrics/pretrain.json").read_text())
    assert ssl["iterations"] == 2 * (len(splits["ssl"]) // (2 * 4))  # one epoch: whole batches of 4 per worker
    trained = load_checkpoint(root / "models/tune_best/last.pt")  # the trial that finetune continues
    assert trained["config"]["data_source"] == "shards" and "shards_index" in trained["inputs"]
    assert load_checkpoint(root / "models/finetune/model.pt")["config"]["data_source"] == "shards"

    second = sh([dvc, "repro", "finetune"], root, env)
    assert "Running stage" not in second
    assert "Stage 'shards' didn't change, skipping" in second
