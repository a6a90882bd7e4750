"""Face clustering (FaceNet section 5.3 style): group embeddings of unlabelled faces into identities.

The default is scikit-learn's ``AgglomerativeClustering`` with cosine distance and average linkage, cut where
the average similarity between two clusters drops to the verification threshold ``t`` (``distance_threshold
= 1 - t``): two groups merge when their faces are, on average, what the verifier calls "the same person". The
threshold is the operating point of a verification report (``metrics/eval.json``'s
``verification.threshold``, picked by 10-fold accuracy), or given. ``HDBSCAN`` is the option for sets with
many one-off faces: it leaves low-density points unclustered (label -1, "noise") instead of forcing them into a
group. Its groups are then merged with the same rule as above (average linkage over the groups' templates, the
normalised means of their faces, cut at similarity ``t``), so ``t`` means the same for both methods. HDBSCAN's own
``cluster_selection_epsilon`` would be the natural knob, but scikit-learn 1.9 raises ``TypeError: only
0-dimensional arrays can be converted to Python scalars`` with it on NumPy >= 2.4 (scikit-learn#33219, fix open
as #34243), so it is not used.

Agglomerative clustering holds all pairwise distances (O(n^2) memory: 10,000 faces take a few hundred MB);
3,000 random 64-d embeddings cluster in ~3 s here (HDBSCAN: ~6 s, trees do not help in 64 dimensions).

With known identities, quality is reported as pairwise precision / recall / F-measure over all pairs of
images put in one cluster (the usual face-clustering measure, Otto et al. 2018) and NMI. Pair counts come
from the contingency table (sum of C(n_ij, 2) over its cells), never from an O(n^2) loop over pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

Method = Literal["agglomerative", "hdbscan"]
NOISE = -1  # HDBSCAN's label for a face it leaves unclustered


class ClusteringError(ValueError):
    """Bad clustering input (threshold, embeddings, metrics file); the message says what to pass instead."""


def _unit(embeddings: Any) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ClusteringError(f"embeddings must be a non-empty (N, D) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.isfinite(x).all() or not (norms > 0).all():
        raise ClusteringError("embeddings hold NaN/inf or all-zero rows: cosine similarity is undefined for them")
    return x / norms


def relabel_by_size(labels: Any) -> np.ndarray:
    """Cluster ids renumbered 0, 1, ... from the largest cluster down (ties: first appearance); noise stays -1.

    Makes ``clusters.csv`` readable (cluster 0 is the biggest group) and independent of the algorithm's ids.
    """
    labels = np.asarray(labels).reshape(-1)
    out = np.full(len(labels), NOISE, dtype=np.int64)
    kept = labels != NOISE
    if not kept.any():
        return out
    ids, first, inverse, sizes = np.unique(labels[kept], return_index=True, return_inverse=True, return_counts=True)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.lexsort((first, -sizes))] = np.arange(len(ids))
    out[kept] = rank[inverse]
    return out


def cluster_embeddings(
    embeddings: Any, threshold: float, method: Method = "agglomerative", min_cluster_size: int = 2
) -> np.ndarray:
    """Cluster id per embedding (0 = largest cluster; -1 = HDBSCAN noise) at similarity threshold ``threshold``.

    ``min_cluster_size`` is HDBSCAN's (agglomerative clustering keeps singletons as clusters of one).
    """
    if not -1.0 < threshold <= 1.0:
        raise ClusteringError(
            f"threshold {threshold} is not a cosine similarity in (-1, 1]: pass the verification "
            "threshold (e.g. metrics/eval.json verification.threshold)"
        )
    x = _unit(embeddings)
    if len(x) == 1:
        return np.zeros(1, dtype=np.int64)
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        model = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=max(1.0 - threshold, 1e-12)
        )
        return relabel_by_size(model.fit_predict(x))
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        if min_cluster_size < 2:
            raise ClusteringError(f"HDBSCAN needs min_cluster_size >= 2, got {min_cluster_size}")
        if len(x) < min_cluster_size:
            return np.full(len(x), NOISE, dtype=np.int64)
        # Euclidean distance of unit vectors is monotone in cosine distance, and KD-trees serve it.
        groups = HDBSCAN(min_cluster_size=min_cluster_size, metric="euclidean", copy=True).fit_predict(x)
        return relabel_by_size(merge_groups(x, groups, threshold))
    raise ClusteringError(f"unknown clustering method {method!r}: use 'agglomerative' or 'hdbscan'")


def merge_groups(unit: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Merge groups (noise untouched) whose templates (normalised mean of their unit embeddings) join under
    average-linkage cosine clustering at similarity ``threshold``."""
    from sklearn.cluster import AgglomerativeClustering

    ids = np.unique(labels[labels != NOISE])
    if len(ids) < 2:
        return labels
    templates = np.stack([unit[labels == i].mean(axis=0) for i in ids])
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    merged = AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=max(1.0 - threshold, 1e-12)
    ).fit_predict(templates)
    out = labels.copy()
    for group, target in zip(ids.tolist(), merged.tolist(), strict=True):
        out[labels == group] = target
    return out


def noise_as_singletons(labels: Any) -> np.ndarray:
    """Each noise point (-1) as its own cluster: unclustered faces are claimed to be nobody else."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1).copy()
    noise = labels == NOISE
    start = labels.max(initial=-1) + 1
    labels[noise] = start + np.arange(int(noise.sum()))
    return labels


def _pairs(counts: np.ndarray) -> int:
    counts = np.asarray(counts, dtype=np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pair_counts(labels_true: Any, labels_pred: Any) -> tuple[int, int, int]:
    """(pairs in one cluster and of one identity, pairs in one cluster, pairs of one identity)."""
    true = np.asarray(labels_true).reshape(-1)
    pred = noise_as_singletons(labels_pred)
    if len(true) != len(pred):
        raise ClusteringError(f"{len(true)} identity labels for {len(pred)} clustered faces: give one per face")
    table = contingency_matrix(true, pred, sparse=True)  # rows: identities, columns: clusters
    together = _pairs(table.data)
    predicted = _pairs(np.asarray(table.sum(axis=0)).ravel())
    actual = _pairs(np.asarray(table.sum(axis=1)).ravel())
    return together, predicted, actual


def pairwise_prf(labels_true: Any, labels_pred: Any) -> dict[str, float | None]:
    """Pairwise precision (same-cluster pairs that share an identity), recall (same-identity pairs put in one
    cluster) and F-measure. Precision is ``None`` when no two faces share a cluster, recall when no two share an
    identity; F = 2 TP / (predicted pairs + actual pairs), their harmonic mean when both exist."""
    together, predicted, actual = pair_counts(labels_true, labels_pred)
    return {
        "precision": together / predicted if predicted else None,
        "recall": together / actual if actual else None,
        "f": 2 * together / (predicted + actual) if predicted + actual else None,
    }


def cluster_report(labels_pred: Any, labels_true: Any = None) -> dict[str, Any]:
    """Cluster statistics; with ``labels_true`` also pairwise P/R/F and NMI (noise counted as singletons)."""
    pred = np.asarray(labels_pred, dtype=np.int64).reshape(-1)
    clustered = pred[pred != NOISE]
    sizes = np.bincount(clustered) if len(clustered) else np.zeros(0, dtype=np.int64)
    sizes = sizes[sizes > 0]
    report: dict[str, Any] = {
        "images": len(pred),
        "clusters": len(sizes),
        "singletons": int((sizes == 1).sum()),
        "noise": int((pred == NOISE).sum()),
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        "images_in_groups": int(sizes[sizes >= 2].sum()),
    }
    if labels_true is not None:
        true = np.asarray(labels_true).reshape(-1)
        report["identities"] = len(np.unique(true))
        report["pairwise"] = pairwise_prf(true, pred)
        report["nmi"] = float(normalized_mutual_info_score(true, noise_as_singletons(pred)))
    return report


def curated(paths: Sequence[str], labels: Any, min_size: int) -> list[str]:
    """The images in clusters of at least ``min_size`` faces, in input order: a cleaned, unlabelled image list
    (small clusters and noise are mostly mis-detections, rare people and outliers)."""
    labels = np.asarray(labels).reshape(-1)
    if len(paths) != len(labels):
        raise ClusteringError(f"{len(paths)} paths for {len(labels)} cluster labels")
    if min_size < 1:
        raise ClusteringError(f"curate min size must be >= 1, got {min_size}")
    ids, counts = np.unique(labels[labels != NOISE], return_counts=True)
    keep = set(ids[counts >= min_size].tolist())
    return [p for p, c in zip(paths, labels.tolist(), strict=True) if c in keep]


def threshold_from_metrics(path: str | Path, key: str = "verification.threshold") -> float:
    """The similarity threshold stored under the dotted ``key`` of a metrics JSON (``metrics/eval.json``); a bare
    verification report (``{"threshold": ...}`` at the top) works too."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        hint = "run `lafs evaluate` first, or pass --threshold"
        raise ClusteringError(f"metrics file {path} not found: {hint}") from None
    except json.JSONDecodeError as exc:
        raise ClusteringError(f"{path} is not valid JSON ({exc})") from None
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if isinstance(data, dict) and key == "verification.threshold" and "threshold" in data:
                node = data["threshold"]
                break
            keys = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise ClusteringError(
                f"{path} has no {key!r} (stopped at {part!r}; found {keys}): pass --metrics-key or --threshold"
            )
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise ClusteringError(f"{path}: {key!r} is {node!r}, not a number")
    return float(node)
