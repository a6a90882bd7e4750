"""Tests that fail when learning breaks: the product's stages on real faces must learn something.

One project on the shared LFW subset (every identity with >= 2 photos, ~1.2k faces): ingest -> landmarks ->
split -> landmark_net (its NME gate at the params default) -> finetune of the default CPU recogniser (landmark
ViT, tokens embedding) from scratch, then its verification accuracy on held-out people next to the raw-pixel
floor on exactly the same pairs; and an SSL run whose teacher must move away from its initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import single_torch_thread

from lafs.config import FinetuneParams, LandmarkNetParams, load_params, parse_params
from lafs.data.datasets import read_faces
from lafs.eval.embedders import load_embedder
from lafs.eval.verification import kfold_accuracy, pair_scores
from lafs.layout import Layout

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def subset_project(tmp_path_factory: pytest.TempPathFactory, lfw_subset: Path, shared: Path) -> Path:
    """Every stage up to landmark_net on the subset's people with >= 2 photos, test pairs on a quarter of them."""
    from lafs.stages import ingest, landmark_net, landmarks, split

    root = tmp_path_factory.mktemp("subset_project")
    params = parse_params(
        {
            "ingest": {"source": str(lfw_subset), "max_identities": 322, "max_images_per_identity": 8},
            "landmarks": {"models_root": str(shared / "models")},
            "split": {"test_fraction": 0.25, "folds": 5, "pairs_per_fold": 100, "fewshot_k": [1]},
            # the NME gate stays at params.yaml's default: this is the test that runs it unrelaxed
            "landmark_net": {"epochs": 3, "batch_size": 32, "threads": 2},
        }
    )
    default_gate = load_params(REPO / "params.yaml").landmark_net.max_nme
    assert params.landmark_net.max_nme == LandmarkNetParams().max_nme == default_gate
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        layout = Layout(root)
        for stage in (ingest, landmarks, split):
            stage.run(params, layout)
        summary = landmark_net.run(params, layout)
    # The stage's own gate (max_nme at its default) has passed; 3 short epochs on ~900 faces do not yet beat the
    # mean shape (measured 15% vs 11.6%), so only a sane range is asserted beyond the gate.
    assert summary.nme < 1.5 * summary.mean_shape_nme
    return root


def _test_faces(root: Path) -> tuple[list[str], torch.Tensor, pd.DataFrame]:
    pairs = pd.read_csv(root / "data" / "splits" / "pairs.csv")
    paths = sorted(set(pairs["path1"]) | set(pairs["path2"]))
    return paths, read_faces([root / p for p in paths]), pairs


def _accuracy(emb: np.ndarray, paths: list[str], pairs: pd.DataFrame) -> float:
    index = {p: i for i, p in enumerate(paths)}
    scores = pair_scores(emb[[index[p] for p in pairs["path1"]]], emb[[index[p] for p in pairs["path2"]]])
    return kfold_accuracy(scores, pairs["same"].to_numpy(), folds=pairs["fold"].to_numpy())[0]


def test_a_short_finetune_beats_the_pixel_floor_on_held_out_people(subset_project, shared, tmp_path, monkeypatch):
    from lafs.stages import finetune

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    defaults = load_params(REPO / "params.yaml").finetune
    cfg = FinetuneParams(
        **{
            **defaults.model_dump(),
            "init": "scratch",
            "epochs": 8,
            "batch_size": 32,
            "num_workers": 0,
            "tuned_params": None,
            "val_fraction": 0.1,
            "val_folds": 4,
        }
    )
    paths = finetune.FinetunePaths.of(Layout(subset_project), tmp_path / "finetune")
    with single_torch_thread():
        torch.set_num_threads(2)
        finetune.train(cfg, paths)
        names, faces, pairs = _test_faces(subset_project)
        faces = faces.permute(0, 2, 3, 1).numpy()  # (N, 112, 112, 3) uint8, what every embedder takes
        learned = _accuracy(load_embedder(paths.model).embed_aligned(faces), names, pairs)
    floor = _accuracy(load_embedder("pixels").embed_aligned(faces), names, pairs)
    # Measured on this set: the pixel floor ~0.60-0.65; the recogniser after 8 short epochs well above it.
    assert floor > 0.55
    assert learned > floor + 0.05, f"finetuned recogniser {learned:.3f} does not beat the pixel floor {floor:.3f}"
    detector = shared / "models" / "scrfd_500m" / "det_500m.onnx"
    _served_path_decides_like_the_evaluated_one(subset_project, paths.model, detector, names, faces, pairs, tmp_path)


def _served_path_decides_like_the_evaluated_one(
    root: Path, model: Path, detector: Path, names: list[str], faces: np.ndarray, pairs: pd.DataFrame, tmp_path: Path
) -> None:
    """The learned model exported and served (raw photo -> SCRFD -> alignment -> ONNX, flip-sum) at the threshold
    calibrated on the aligned faces decides real test pairs as the evaluation did, and mostly right."""
    from lafs.export import export_onnx
    from lafs.models.io import load_model
    from lafs.serving.faces import FacePipeline, ServingConfig

    onnx = export_onnx(load_model(model), tmp_path / "model.onnx")
    emb = load_embedder(onnx).embed_aligned(faces, flip=True)
    index = {p: i for i, p in enumerate(names)}
    scores = pair_scores(emb[[index[p] for p in pairs["path1"]]], emb[[index[p] for p in pairs["path2"]]])
    threshold = kfold_accuracy(scores, pairs["same"].to_numpy(), folds=pairs["fold"].to_numpy())[2]
    raw = pd.read_parquet(root / "data" / "landmarks.parquet", columns=["aligned_path", "path"])
    photo = dict(zip(raw["aligned_path"], raw["path"], strict=True))
    pipeline = FacePipeline.from_files(detector, onnx, ServingConfig(threshold=threshold))
    sample = pairs.sample(60, random_state=0)
    served = []
    for a, b in zip(sample["path1"], sample["path2"], strict=True):
        fa, fb = (pipeline.embed(pipeline.decode((root / photo[p]).read_bytes())) for p in (a, b))
        served.append(pipeline.same(pipeline.score(fa, fb)))
    evaluated = scores[sample.index.to_numpy()] > threshold
    assert np.mean(np.array(served) == evaluated) >= 0.95
    assert np.mean(np.array(served) == sample["same"].to_numpy().astype(bool)) > 0.6


def test_ssl_moves_the_teacher_away_from_its_initialisation(subset_project, tmp_path, monkeypatch):
    """Pretraining at the params.yaml settings (two short epochs here, ~110 steps of 16) must change the teacher
    measurably: the old default (lr 5e-4 x 16/256, EMA from 0.996, 74 steps) moved it 0.06%."""
    from lafs.stages import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    defaults = load_params(REPO / "params.yaml").pretrain
    cfg = defaults.model_copy(
        update={"epochs": 2, "batch_size": 16, "num_workers": 0, "nproc_per_node": 1, "device": "cpu"}
    )
    with single_torch_thread():
        layout = Layout(subset_project)
        pretrain.train(
            cfg, pretrain.PretrainPaths(layout, tmp_path / "pretrain", layout.landmark_net, tmp_path / "pretrain.json")
        )
    moved = json.loads((tmp_path / "pretrain.json").read_text())["teacher_relative_change"]
    assert moved > 0.005, f"the teacher moved {moved:.2e} (relative L2) from its initialisation: SSL learned nothing"
