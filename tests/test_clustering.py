"""Clustering math against brute-force references, and ``lafs cluster`` end to end on real aligned faces."""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lafs.cli import main
from lafs.eval.clustering import (
    NOISE,
    ClusteringError,
    cluster_embeddings,
    cluster_report,
    curated,
    pairwise_prf,
    relabel_by_size,
    threshold_from_metrics,
)


def _clustered(n_ids: int, per_id: int, noise: float, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Identities at orthogonal centres of norm 3 (cosine 0 between them), isotropic noise of ``noise`` per axis."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * np.linalg.qr(rng.normal(size=(dim, dim)))[0][:n_ids]
    labels = np.repeat(np.arange(n_ids), per_id)
    return centres[labels] + noise * rng.normal(size=(len(labels), dim)), labels


def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, c in enumerate(labels.tolist()):
        groups.setdefault(c if c != NOISE else -1 - i, set()).add(i)
    return {frozenset(g) for g in groups.values()}


# ---- brute-force references ----


def _brute_prf(true: np.ndarray, pred: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """Loop over all pairs; a noise point (-1) shares a cluster with nobody."""
    tp = pp = ap = 0
    for i, j in itertools.combinations(range(len(true)), 2):
        together = pred[i] == pred[j] and pred[i] != NOISE
        same = true[i] == true[j]
        tp += together and same
        pp += together
        ap += same
    return (tp / pp if pp else None, tp / ap if ap else None, 2 * tp / (pp + ap) if pp + ap else None)


def _brute_nmi(true: np.ndarray, pred: np.ndarray) -> float:
    """I(T; P) / mean(H(T), H(P)) from counts (sklearn's default arithmetic normalisation); noise = singletons."""
    pred = np.array([c if c != NOISE else -1 - i for i, c in enumerate(pred.tolist())])
    n = len(true)
    ct, cp, joint = (
        Counter(true.tolist()),
        Counter(pred.tolist()),
        Counter(zip(true.tolist(), pred.tolist(), strict=True)),
    )
    mi = sum(c / n * math.log(c * n / (ct[t] * cp[p])) for (t, p), c in joint.items())
    h_t = -sum(c / n * math.log(c / n) for c in ct.values())
    h_p = -sum(c / n * math.log(c / n) for c in cp.values())
    if h_t == 0 and h_p == 0:
        return 1.0
    return mi / ((h_t + h_p) / 2)


def _brute_average_linkage(x: np.ndarray, threshold: float) -> set[frozenset[int]]:
    """Merge the two clusters of highest average cosine similarity while it is above the threshold."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    clusters = [[i] for i in range(len(x))]
    while len(clusters) > 1:
        best, pair = -np.inf, None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            s = sim[np.ix_(clusters[a], clusters[b])].mean()
            if s > best:
                best, pair = s, (a, b)
        if best <= threshold:
            break
        a, b = pair
        clusters[a] = clusters[a] + clusters.pop(b)
    return {frozenset(c) for c in clusters}


# ---- metrics ----


@pytest.mark.parametrize("seed", range(6))
def test_pairwise_prf_and_nmi_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    true = rng.integers(0, rng.integers(1, 8), n)
    pred = rng.integers(-1, rng.integers(1, 8), n)  # includes noise (-1)
    report = cluster_report(pred, true)
    got = report["pairwise"]
    want = _brute_prf(true, pred)
    for key, value in zip(("precision", "recall", "f"), want, strict=True):
        assert got[key] == pytest.approx(value, abs=1e-12) if value is not None else got[key] is None, key
    assert report["nmi"] == pytest.approx(_brute_nmi(true, pred), abs=1e-10)


def test_pairwise_known_answers() -> None:
    true = np.array([0, 0, 0, 1, 1, 2])
    assert pairwise_prf(true, true) == {"precision": 1.0, "recall": 1.0, "f": 1.0}
    # One cluster of everything: all 4 same-identity pairs found among 15 predicted pairs.
    assert pairwise_prf(true, np.zeros(6, int)) == pytest.approx({"precision": 4 / 15, "recall": 1.0, "f": 8 / 19})
    # All singletons (or all noise): no predicted pair -> precision undefined, recall 0, F 0.
    for pred in (np.arange(6), np.full(6, NOISE)):
        assert pairwise_prf(true, pred) == {"precision": None, "recall": 0.0, "f": 0.0}
    with pytest.raises(ClusteringError, match="one per face"):
        pairwise_prf(true, np.zeros(5, int))


def test_relabel_by_size_and_report_counts() -> None:
    labels = relabel_by_size(np.array([7, 3, 3, NOISE, 9, 3, 7, 5]))
    np.testing.assert_array_equal(labels, [1, 0, 0, NOISE, 2, 0, 1, 3])  # size order, ties by first appearance
    report = cluster_report(labels)
    assert report == {
        "images": 8,
        "clusters": 4,
        "singletons": 2,
        "noise": 1,
        "largest_cluster": 3,
        "images_in_groups": 5,
    }
    assert curated([f"f{i}" for i in range(8)], labels, 2) == ["f0", "f1", "f2", "f5", "f6"]


# ---- clustering ----


def test_separated_identities_are_recovered_exactly() -> None:
    emb, labels = _clustered(8, 6, noise=0.15)
    pred = cluster_embeddings(emb, threshold=0.5)
    assert _partition(pred) == _partition(labels)
    report = cluster_report(pred, labels)
    assert report["pairwise"] == {"precision": 1.0, "recall": 1.0, "f": 1.0} and report["nmi"] == pytest.approx(1.0)
    # The threshold is a similarity: near 1 nothing merges, near -1 everything does.
    assert len(set(cluster_embeddings(emb, threshold=0.9999).tolist())) == len(emb)
    assert set(cluster_embeddings(emb, threshold=-0.999).tolist()) == {0}


@pytest.mark.parametrize(("seed", "threshold"), [(0, 0.3), (1, 0.1), (2, 0.5)])
def test_agglomerative_cut_matches_brute_force_average_linkage(seed: int, threshold: float) -> None:
    emb, _ = _clustered(5, 4, noise=0.9, dim=8, seed=seed)  # overlapping: the cut decides
    got = _partition(cluster_embeddings(emb, threshold))
    assert got == _brute_average_linkage(emb, threshold)
    assert 1 < len(got) < len(emb)


def test_hdbscan_leaves_outliers_unclustered() -> None:
    """Four tight identities at cosine 0.8 from each other (chord distance 0.63) and three faces orthogonal to
    all of them (chord 1.41): the outliers leave the hierarchy before any identity forms, so they are noise;
    at threshold 0.9 (epsilon 0.45 < 0.63) the identities stay apart."""
    rng = np.random.default_rng(3)
    eye = np.eye(16)
    centres = 2 * eye[0] + eye[1:5]  # pairwise cosine 4/5
    labels = np.repeat(np.arange(4), 10)
    emb = centres[labels] + 0.02 * rng.normal(size=(40, 16))
    outliers = eye[10:13] + 0.02 * rng.normal(size=(3, 16))
    pred = cluster_embeddings(np.r_[emb, outliers], threshold=0.9, method="hdbscan", min_cluster_size=3)
    assert (pred[-3:] == NOISE).all()
    assert _partition(pred[:-3]) == _partition(labels)
    report = cluster_report(pred, np.r_[labels, [100, 101, 102]])
    assert report["noise"] == 3 and report["pairwise"]["f"] == 1.0  # noise as singletons: nothing wrongly merged
    # A threshold below the identities' similarity (epsilon above their distance) merges them.
    merged = cluster_embeddings(np.r_[emb, outliers], threshold=0.7, method="hdbscan", min_cluster_size=3)
    assert set(merged[:-3].tolist()) == {0}


def test_bad_thresholds_and_embeddings() -> None:
    emb, _ = _clustered(2, 3, noise=0.1)
    with pytest.raises(ClusteringError, match="cosine similarity"):
        cluster_embeddings(emb, threshold=1.5)
    with pytest.raises(ClusteringError, match="all-zero"):
        cluster_embeddings(np.zeros((3, 4)), threshold=0.5)
    with pytest.raises(ClusteringError, match="unknown clustering method"):
        cluster_embeddings(emb, threshold=0.5, method="kmeans")  # type: ignore[arg-type]
    assert cluster_embeddings(emb[:1], threshold=0.5).tolist() == [0]


def test_threshold_from_metrics(tmp_path: Path) -> None:
    nested = tmp_path / "eval.json"
    nested.write_text(json.dumps({"verification": {"threshold": 0.31, "accuracy_mean": 0.9}}))
    assert threshold_from_metrics(nested) == 0.31
    bare = tmp_path / "report.json"
    bare.write_text(json.dumps({"threshold": 0.42}))
    assert threshold_from_metrics(bare) == 0.42
    with pytest.raises(ClusteringError, match=r"no 'verification\.eer'"):
        threshold_from_metrics(nested, "verification.eer")
    with pytest.raises(ClusteringError, match="not found"):
        threshold_from_metrics(tmp_path / "missing.json")


# ---- the command ----


def _read_clusters(path: Path) -> list[tuple[str, int]]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "cluster"]
    return [(r["path"], int(r["cluster"])) for r in rows]


def test_cli_on_precomputed_embeddings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emb, labels = _clustered(6, 5, noise=0.15, seed=5)
    emb[-1] = np.random.default_rng(6).normal(size=16) * 5  # one face of identity 5 looks like nobody else
    np.save(tmp_path / "emb.npy", emb)
    pd.DataFrame(
        {"aligned_path": [f"data/aligned/p{i:02d}.png" for i in range(30)], "identity": [f"id{lab}" for lab in labels]}
    ).to_csv(tmp_path / "faces.csv", index=False)
    (tmp_path / "eval.json").write_text(json.dumps({"verification": {"threshold": 0.5}}))
    out = tmp_path / "out"
    code = main(
        [
            "cluster",
            "--embeddings",
            str(tmp_path / "emb.npy"),
            "--images",
            str(tmp_path / "faces.csv"),
            "--metrics",
            str(tmp_path / "eval.json"),
            "--out",
            str(out),
            "--curate-min-size",
            "3",
        ]
    )
    assert code == 0
    assert "clustered 30 faces into 7 clusters" in capsys.readouterr().out
    rows = _read_clusters(out / "clusters.csv")
    assert [p for p, _ in rows] == [f"data/aligned/p{i:02d}.png" for i in range(30)]
    metrics = json.loads((out / "cluster_metrics.json").read_text())
    assert metrics["threshold"] == 0.5 and metrics["clusters"] == 7 and metrics["singletons"] == 1
    assert metrics["pairwise"]["precision"] == 1.0 and metrics["pairwise"]["recall"] == pytest.approx(56 / 60)
    # curated.txt: the 29 faces of clusters >= 3, without the lone one, in input order
    assert (out / "curated.txt").read_text().splitlines() == [p for p, _ in rows[:29]]
    assert not (out / "embeddings.npy").exists()  # nothing was computed


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "emb.npy", np.ones((3, 4)))
    pd.DataFrame({"aligned_path": ["a.png", "b.png"]}).to_csv(tmp_path / "faces.csv", index=False)
    args = ["cluster", "--embeddings", str(tmp_path / "emb.npy"), "--out", str(tmp_path / "o")]
    assert main([*args, "--images", str(tmp_path / "faces.csv"), "--threshold", "0.5"]) == 1
    assert "3 rows but" in capsys.readouterr().err
    assert main([*args, "--metrics", str(tmp_path / "nope.json")]) == 1
    assert "run `lafs evaluate` first" in capsys.readouterr().err
    assert (
        main(["cluster", "--images", str(tmp_path / "faces.csv"), "--threshold", "0.5", "--out", str(tmp_path / "o")])
        == 1
    )
    assert "give --model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def aligned_faces(tmp_path_factory: pytest.TempPathFactory, lfw_subset: Path, shared: Path) -> tuple[Path, Path]:
    """(project root, faces.csv): 4 real photos each of 5 LFW identities, detected and aligned to 112x112 with
    the pipeline's SCRFD settings, stored as ``data/aligned/<identity>/<stem>.png``."""
    from lafs.config import LandmarksParams
    from lafs.data.images import load_rgb
    from lafs.eval.photos import FaceFinder

    root = tmp_path_factory.mktemp("cluster_faces")
    people = sorted(d for d in lfw_subset.iterdir() if len(list(d.glob("*.jpg"))) >= 4)[:5]
    assert len(people) == 5, f"{lfw_subset} should hold identities with >= 4 photos"
    finder = FaceFinder.from_params(LandmarksParams(models_root=str(shared / "models")), threads=1)
    rows = []
    for person in people:
        for photo in sorted(person.glob("*.jpg"))[:4]:
            face = finder.find(load_rgb(photo))
            rel = Path("data/aligned") / person.name / f"{photo.stem}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(face.aligned).save(root / rel)
            rows.append({"aligned_path": str(rel), "identity": person.name})
    pd.DataFrame(rows).to_csv(root / "faces.csv", index=False)
    return root, root / "faces.csv"


@pytest.mark.slow
def test_cli_clusters_real_faces_with_a_real_recogniser(aligned_faces: tuple[Path, Path], tmp_path: Path) -> None:
    """dlib's ResNet recogniser on 20 real aligned faces of 5 people, clustered at the operating point of a real
    verification report over their pairs (as `lafs evaluate` writes it): the groups follow the identities."""
    from lafs.eval.verification import pair_scores, verification_report

    root, faces_csv = aligned_faces
    out = tmp_path / "out"
    assert (
        main(
            [
                "cluster",
                "--model",
                "dlib_resnet",
                "--images",
                str(faces_csv),
                "--root",
                str(root),
                "--threshold",
                "0.9",
                "--out",
                str(out),
                "--curate-min-size",
                "2",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "cluster_metrics.json").read_text())
    assert metrics["images"] == 20 and metrics["identities"] == 5 and metrics["model"] == "dlib_resnet"
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (20, 128) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert len((out / "curated.txt").read_text().splitlines()) == metrics["images_in_groups"]

    identities = pd.read_csv(faces_csv)["identity"].to_numpy()
    i, j = np.triu_indices(len(emb), 1)
    report = verification_report(pair_scores(emb[i], emb[j]), identities[i] == identities[j])
    (tmp_path / "eval.json").write_text(json.dumps({"verification": report}))
    at_operating_point = tmp_path / "op"
    assert (
        main(
            [
                "cluster",
                "--embeddings",
                str(out / "embeddings.npy"),
                "--images",
                str(faces_csv),
                "--metrics",
                str(tmp_path / "eval.json"),
                "--out",
                str(at_operating_point),
            ]
        )
        == 0
    )
    metrics = json.loads((at_operating_point / "cluster_metrics.json").read_text())
    assert metrics["threshold"] == report["threshold"]
    assert metrics["pairwise"]["f"] >= 0.8 and metrics["nmi"] >= 0.8, metrics
    # Reclustering the saved embeddings at the first threshold reproduces the first run exactly, without the model.
    again = tmp_path / "again"
    assert (
        main(
            [
                "cluster",
                "--embeddings",
                str(out / "embeddings.npy"),
                "--images",
                str(faces_csv),
                "--threshold",
                "0.9",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    assert _read_clusters(again / "clusters.csv") == _read_clusters(out / "clusters.csv")


def test_cli_on_a_folder_with_a_model_file(aligned_faces: tuple[Path, Path], tmp_path: Path) -> None:
    """A folder of aligned faces through a saved model file (a grid ViT, the kind `load_embedder` takes)."""
    from lafs.eval.embedders import load_embedder
    from lafs.models.io import save_model
    from lafs.models.registry import create_model

    root, _ = aligned_faces
    model_path = save_model(create_model("dino_vit_tiny"), "dino_vit_tiny", {}, tmp_path / "model.pt")
    out = tmp_path / "out"
    assert (
        main(
            [
                "cluster",
                "--model",
                str(model_path),
                "--images",
                str(root / "data" / "aligned"),
                "--folder-identities",
                "--threshold",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _read_clusters(out / "clusters.csv")
    files = sorted((root / "data" / "aligned").rglob("*.png"))
    assert [p for p, _ in rows] == [str(f) for f in files]
    faces = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    want = load_embedder(str(model_path)).embed_aligned(faces)
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), want, atol=1e-5)
    metrics = json.loads((out / "cluster_metrics.json").read_text())
    assert metrics["identities"] == 5 and metrics["images"] == 20
    assert _partition(np.array([c for _, c in rows])) == _partition(cluster_embeddings(want, 0.5))
