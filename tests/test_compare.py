"""`lafs compare`: scratch / DINO-face / LAFS x full / few-shot at equal budgets, on the tiny real project."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_PROJECT, single_torch_thread

from lafs.config import parse_params
from lafs.layout import Layout
from lafs.stages.compare import ComparePaths, cells, finetune_config, pretrain_config
from lafs.stages.compare import compare as run

FINETUNE = {
    "model": "lafs_vit_tiny",
    "landmark_net": "landmark_net_mnv3_small",
    "num_landmarks": 68,
    "num_workers": 0,
    "device": "cpu",
    "dtype": "fp32",
    "lr": 1e-3,
    "warmup_epochs": 1,
    "patience": 1,
}
COMPARE = {
    "fewshot_k": [1],
    "size": "tiny",
    "pretrain_epochs": 1,
    "pretrain_batch_size": 8,
    "finetune_epochs": 1,
    "finetune_batch_size": 4,
    "experiment": "t-compare",
}


def _params(**compare):
    return parse_params({"pretrain": TINY_PROJECT["pretrain"], "finetune": FINETUNE, "compare": {**COMPARE, **compare}})


def test_every_cell_gets_the_same_budget_and_its_own_architecture():
    params = _params(finetune_epochs=3, finetune_batch_size=16)
    configs = {c.name: finetune_config(params.compare, params.finetune, c) for c in cells(params.compare)}
    assert sorted(configs) == ["dino_face-full", "dino_face-k1", "lafs-full", "lafs-k1", "scratch-full", "scratch-k1"]
    budgets = {(c.epochs, c.batch_size, c.seed, c.warmup_epochs, c.patience, c.tuned_params) for c in configs.values()}
    assert budgets == {(3, 16, 0, 1, None, None)}  # equal budgets; no early stopping, no tuned params
    assert {n: (c.init, c.model, c.fewshot_k) for n, c in configs.items()} == {
        "scratch-full": ("scratch", "lafs_vit_tiny", None),
        "scratch-k1": ("scratch", "lafs_vit_tiny", 1),
        "dino_face-full": ("pretrained", "dino_vit_tiny", None),
        "dino_face-k1": ("pretrained", "dino_vit_tiny", 1),
        "lafs-full": ("pretrained", "lafs_vit_tiny", None),
        "lafs-k1": ("pretrained", "lafs_vit_tiny", 1),
    }
    ssl = {m: pretrain_config(params.compare, params.pretrain, m) for m in ("dino_face", "lafs")}
    assert {(s.epochs, s.batch_size, s.seed) for s in ssl.values()} == {(1, 8, 0)}
    assert (ssl["dino_face"].model, ssl["lafs"].model) == ("dino_vit_tiny", "lafs_vit_tiny")


@pytest.mark.slow
def test_compare_fills_the_table_logs_a_parent_run_and_resumes(tiny_project, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = _params()
    paths = ComparePaths(Layout(tiny_project), tmp_path / "reports" / "comparison")
    with single_torch_thread():
        summary = run(params.compare, params.pretrain, params.finetune, paths)
    assert sorted(summary.ran) == sorted(c.name for c in cells(params.compare)) and not summary.skipped
    table = (tmp_path / "reports" / "comparison.md").read_text()
    cells_table = table.split("## Paired tests")[0]
    rows = [line for line in cells_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6
    for cell in cells(params.compare):
        result = json.loads((paths.out_dir / cell.name / "result.json").read_text())
        v = result["verification"]
        correct = np.array([c == "1" for c in result["pair_correct"]])
        assert v["pairs"] == len(correct) == 16
        # the fold mean is the mean of the per-pair decisions (equal folds), inside its own bootstrap interval
        assert v["accuracy_mean"] == pytest.approx(correct.mean())
        low, high = v["accuracy_ci95"]
        assert low <= v["accuracy_mean"] <= high and (low < high or correct.all() or not correct.any())
        assert any(f"{v['accuracy_mean']:.3f} ± {v['accuracy_std']:.3f}" in r and result["model"] in r for r in rows)
        assert result["budget"]["finetune_epochs"] == 1
    tests = table.split("## Paired tests")[1]
    assert len([r for r in tests.splitlines() if r.startswith("| full |") or r.startswith("| k1 |")]) == 6
    full = {
        c: json.loads((paths.out_dir / f"{c}-full" / "result.json").read_text())["finetune"]["iterations"]
        for c in ("scratch", "dino_face", "lafs")
    }
    assert len(set(full.values())) == 1  # equal steps within a data column

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and "lafs-k1.accuracy_mean" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    cell_runs = {r.data.tags.get("compare.cell"): r for r in children if "compare.cell" in r.data.tags}
    assert sorted(cell_runs) == sorted(summary.ran)
    assert all("test.accuracy_mean" in r.data.metrics for r in cell_runs.values())
    assert {r.data.tags.get("compare.role") for r in children} >= {"pretrain-dino_face", "pretrain-lafs"}

    # resume: a cell with a result is not run again; a deleted one is
    (paths.out_dir / "lafs-k1" / "result.json").unlink()
    before = (paths.out_dir / "scratch-full" / "result.json").stat().st_mtime_ns
    with single_torch_thread():
        again = run(params.compare, params.pretrain, params.finetune, paths)
    assert again.ran == ["lafs-k1"] and len(again.skipped) == 5
    assert again.parent_run_id == summary.parent_run_id
    assert (paths.out_dir / "scratch-full" / "result.json").stat().st_mtime_ns == before
