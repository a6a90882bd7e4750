"""ONNX export of the landmark recogniser (landmark net inside the graph): parity with PyTorch on real aligned
faces at batch sizes other than the traced one, the graph's interface, the parity gate, and the export stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lafs.config import ExportParams, Params
from lafs.eval.embedders import OnnxEmbedder, load_embedder
from lafs.export import ExportError, export_onnx, parity, require_parity
from lafs.layout import Layout
from lafs.models.io import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_file):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(load_model(tiny_model_file), path)


def test_onnx_matches_pytorch_on_real_faces(exported, tiny_model_file, real_faces):
    check = parity(load_model(tiny_model_file), exported, real_faces.aligned, batch_size=5)  # batches of 5 and 3
    assert check.images == 8
    assert check.min_cosine >= 0.9999, check
    assert check.max_abs_diff < 1e-3


def test_graph_interface_and_dynamic_batch(exported, tiny_model_file, real_faces):
    import onnx

    graph = onnx.load(str(exported)).graph
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == ("images", "embedding")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [3, 112, 112] and isinstance(dims[0], str)  # symbolic batch
    assert {n.op_type for n in graph.node} >= {"GridSample", "Conv"}  # landmark net + patch sampling inside
    embedder = load_embedder(exported, batch_size=8, threads=1)
    assert isinstance(embedder, OnnxEmbedder)
    whole = embedder.embed_aligned(real_faces.aligned)
    single = np.concatenate([embedder.embed_aligned(real_faces.aligned[i : i + 1]) for i in range(8)])
    np.testing.assert_allclose(whole, single, atol=1e-5)
    flip_torch = load_embedder(tiny_model_file).embed_aligned(real_faces.aligned, flip=True)
    flip_onnx = embedder.embed_aligned(real_faces.aligned, flip=True)
    assert np.einsum("ij,ij->i", flip_torch, flip_onnx).min() >= 0.9999


def test_parity_gate_catches_a_graph_of_another_model(exported, real_faces):
    from conftest import tiny_recogniser

    other = tiny_recogniser(seed=1)
    check = parity(other, exported, real_faces.aligned)
    assert check.min_cosine < 0.99
    with pytest.raises(ExportError, match="parity failed"):
        require_parity(check, 0.9999)


def test_export_stage_writes_onnx_and_parity_metrics(tmp_path, tiny_model_file, real_faces):
    from lafs.stages import StageError
    from lafs.stages import export as export_stage

    root = tmp_path
    (root / "models" / "finetune").mkdir(parents=True)
    (root / "models" / "finetune" / "model.pt").write_bytes(tiny_model_file.read_bytes())
    rows = []
    for i, (face, ident) in enumerate(zip(real_faces.aligned, real_faces.identities, strict=True)):
        rel = f"data/aligned/{ident}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(face).save(root / rel)
        rows.append({"aligned_path": rel, "identity": ident, "label": 0, "sha256": str(i)})
    (root / "data" / "splits").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "data" / "splits" / "test.csv", index=False)

    summary = export_stage.run(Params(export=ExportParams(parity_images=6)), Layout(root))
    assert summary.images == 6 and summary.min_cosine >= 0.9999
    metrics = json.loads((root / "metrics" / "export.json").read_text())
    assert metrics["passed"] is True and metrics["opset"] == 17 and metrics["images"] == 6
    assert metrics["onnx_bytes"] == (root / "models" / "model.onnx").stat().st_size > 0
    assert "exported lafs_vit_tiny" in summary.describe()

    (root / "data" / "splits" / "test.csv").unlink()
    with pytest.raises(StageError, match="run the split stage"):
        export_stage.run(Params(), Layout(root))


@pytest.mark.integration  # several processes / a real training run
def test_embeddings_benchmark_times_both_runtimes_side_by_side():
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "eval.py"),
        "--part",
        "embeddings",
        "--batches",
        "1,4",
        "--threads",
        "1",
        "--images",
        "8",
        "--repeats",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["batch"], r["threads"]) for r in rows] == [(1, 1), (4, 1)]
    for row in rows:
        assert row["part"] == "embeddings" and row["model"] == "lafs_vit_tiny" and row["images"] == 8
        assert row["torch_img_per_s"] > 0 and row["onnx_img_per_s"] > 0
        assert row["onnx_speedup"] == pytest.approx(row["onnx_img_per_s"] / row["torch_img_per_s"], rel=0.05)
