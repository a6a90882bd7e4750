"""Face verification metrics over scored pairs: LFW 10-fold accuracy, TAR@FAR, EER, ROC and AUC.

Conventions: ``scores`` are similarities (cosine of L2-normalised embeddings; higher = more likely the same
person) and a pair is predicted "same" when its score is **strictly above** the threshold. ``same`` is the
ground truth (bool or 0/1).

The 10-fold protocol is insightface's ``calculate_roc`` (arcface_torch ``eval/verification.py``) with one
change: insightface searches a fixed grid of 400 distance thresholds, which can miss the best split between
two close scores; here every split between two consecutive *distinct training* scores is a candidate (the
threshold reported is their midpoint), which makes the search exact, tie-safe (equal scores always land on
the same side) and free of test-fold leakage (test scores never add candidates). The best split is found in
one pass over the sorted scores per fold (O(n log n) overall), so 600k pairs take well under a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import auc, roc_curve

FARS = (1e-2, 1e-3, 1e-4)


def check_scores(scores: Any, same: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores and bool labels of equal length, with both classes present and no NaN."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(same).reshape(-1)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("same must be bool or 0/1 (1 = same person)")
        y = y.astype(bool)
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores but {len(y)} same labels: give one label per pair")
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).sum())
        raise ValueError(f"{bad} scores are NaN or infinite: check the embeddings (a zero vector normalises to NaN)")
    n_same = int(y.sum())
    if n_same == 0 or n_same == len(y):
        raise ValueError(f"verification needs both same and different pairs; got {n_same} same of {len(y)} pairs")
    return s, y


def contiguous_folds(n: int, n_folds: int = 10) -> np.ndarray:
    """1-based fold id per pair for ``n_folds`` contiguous folds, sized like sklearn's ``KFold(shuffle=False)``
    (insightface's choice): the first ``n % n_folds`` folds get one pair more."""
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be between 2 and the number of pairs ({n}), got {n_folds}")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    return np.repeat(np.arange(1, n_folds + 1), sizes)


def _best_split(sorted_scores: np.ndarray, sorted_same: np.ndarray) -> float:
    """The accuracy-maximising threshold (``score > threshold`` = same) on already sorted training scores.

    Candidate j predicts "same" for the distinct values ``u[j:]``; its number of correct pairs is
    (same pairs with value >= u[j]) + (different pairs with value < u[j]). Ties in accuracy go to the highest
    threshold, the fewest accepts (as in insightface, whose argmax over ascending *distance* thresholds picks
    the smallest distance). When accepting every training pair is best, the threshold sits just below the lowest
    training score (the split is what is learnt; there is no gap to take a midpoint of). The threshold is the
    midpoint of ``u[j-1]`` and ``u[j]`` (just below ``u[0]`` / at ``u[-1]`` for the two ends), kept within
    ``[u[j-1], u[j])`` should the midpoint of two adjacent floats round up, so it always realises the split.
    """
    new = np.empty(len(sorted_scores), dtype=bool)
    new[0] = True
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=new[1:])
    uniq = sorted_scores[new]
    group = np.cumsum(new) - 1
    pos = np.bincount(group, weights=sorted_same, minlength=len(uniq))
    neg = np.bincount(group, weights=~sorted_same, minlength=len(uniq))
    # correct[j] for j = 0..m: pairs at or above u[j] predicted same, below predicted different.
    correct = (pos.sum() - np.concatenate(([0.0], np.cumsum(pos)))) + np.concatenate(([0.0], np.cumsum(neg)))
    j = len(correct) - 1 - int(np.argmax(correct[::-1]))  # the last maximum: highest threshold
    if j == 0:
        return float(np.nextafter(uniq[0], -np.inf))
    if j == len(uniq):
        return float(uniq[-1])
    mid = (uniq[j - 1] + uniq[j]) / 2.0
    return float(mid if mid < uniq[j] else uniq[j - 1])


def kfold_correct(
    scores: Any, same: Any, folds: Any = None, n_folds: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LFW protocol, pair by pair: each fold is thresholded at the accuracy-maximising split of the other folds.

    Returns (correct per pair, 1-based fold id per pair, threshold per fold in fold-id order). The per-pair
    decisions are what paired tests between two models need (McNemar, bootstrap over pairs). folds: 1-based fold
    id per pair (pairs.csv); None -> n_folds contiguous folds (insightface's KFold(shuffle=False)).
    """
    s, y = check_scores(scores, same)
    f = contiguous_folds(len(s), n_folds) if folds is None else np.asarray(folds).reshape(-1)
    if len(f) != len(s):
        raise ValueError(f"{len(f)} fold ids for {len(s)} pairs: give one fold per pair (pairs.csv 'fold')")
    ids = np.unique(f)
    if len(ids) < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 folds, got fold ids {ids.tolist()}")
    order = np.argsort(s, kind="stable")
    ss, yy, ff = s[order], y[order], f[order]
    correct = np.empty(len(s), dtype=bool)
    thresholds = np.empty(len(ids))
    for i, fold in enumerate(ids):
        test = ff == fold
        thresholds[i] = _best_split(ss[~test], yy[~test])
        correct[order[test]] = (ss[test] > thresholds[i]) == yy[test]
    return correct, f, thresholds


def kfold_accuracy(scores: Any, same: Any, folds: Any = None, n_folds: int = 10) -> tuple[float, float, float]:
    """LFW protocol: for each fold, threshold chosen on the other folds (maximising accuracy there), accuracy
    on the held-out fold; returns (mean, std, mean threshold) over folds (:func:`kfold_correct`).

    std is the population std over folds (``np.std``, as insightface reports it).
    """
    correct, f, thresholds = kfold_correct(scores, same, folds, n_folds)
    accuracies = [float(correct[f == fold].mean()) for fold in np.unique(f)]
    return float(np.mean(accuracies)), float(np.std(accuracies)), float(np.mean(thresholds))


def roc(scores: Any, same: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of ``score >= threshold`` at every distinct score (sklearn's ``roc_curve``;
    the first threshold is +inf, where fpr = tpr = 0). Intermediate collinear points are kept, so the
    curve is exact for step look-ups (TAR at a FAR)."""
    s, y = check_scores(scores, same)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def tar_at_fpr_grid(fpr: np.ndarray, tpr: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Best TAR among ROC points with FAR <= each target (the ROC is non-decreasing in both axes)."""
    idx = np.searchsorted(fpr, np.asarray(targets, dtype=np.float64), side="right") - 1
    return tpr[np.clip(idx, 0, None)]


def _tars(fpr: np.ndarray, tpr: np.ndarray, n_diff: int, fars: tuple[float, ...]) -> dict[float, float | None]:
    floor = 1.0 / n_diff
    out: dict[float, float | None] = {}
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise ValueError(f"FAR targets must be in (0, 1], got {far}")
        out[far] = None if far < floor else float(tar_at_fpr_grid(fpr, tpr, np.array([far]))[0])
    return out


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    fnr = 1.0 - tpr
    gap = fpr - fnr  # non-decreasing along the ROC: -1 at the +inf threshold, +1 at the lowest
    i = int(np.argmax(gap >= 0.0))
    if gap[i] == 0.0 or i == 0:
        return float(fpr[i])
    # Segment (i-1, i): solve fpr(t) = fnr(t) for t in (0, 1].
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def tar_at_far(scores: Any, same: Any, fars: tuple[float, ...] = FARS) -> dict[float, float | None]:
    """TAR at the threshold whose FAR <= target, for each target FAR.

    A target below 1 / (number of different pairs) cannot be measured (the smallest non-zero FAR is one false
    accept): it maps to ``None`` (null in JSON) instead of the TAR at FAR 0, which would read as a result.
    """
    s, y = check_scores(scores, same)
    fpr, tpr, _ = roc(s, y)
    return _tars(fpr, tpr, int((~y).sum()), fars)


def equal_error_rate(scores: Any, same: Any) -> float:
    """The rate where FAR equals FRR (= 1 - TAR), linearly interpolated between the two ROC points around the
    crossing (FAR - FRR goes from negative to non-negative along the curve)."""
    fpr, tpr, _ = roc(scores, same)
    return _eer(fpr, tpr)


def far_key(far: float) -> str:
    """JSON key of a FAR target: ``1e-02`` (DVC and MLflow flatten to ``tar_at_far.1e-02``)."""
    return f"{far:.0e}"


def verification_report(
    scores: Any, same: Any, folds: Any = None, fars: tuple[float, ...] = FARS, n_folds: int = 10
) -> dict[str, Any]:
    """Every verification number in one JSON-ready dict (``metrics/eval.json``'s ``verification``).

    ``min_measurable_far`` = 1 / different pairs: TAR at a smaller FAR target is ``None``.
    """
    s, y = check_scores(scores, same)
    mean, std, threshold = kfold_accuracy(s, y, folds=folds, n_folds=n_folds)
    fpr, tpr, _ = roc(s, y)  # once for TAR@FAR, EER and AUC
    n_diff = int((~y).sum())
    tars = _tars(fpr, tpr, n_diff, fars)
    return {
        "accuracy_mean": mean,
        "accuracy_std": std,
        "threshold": threshold,
        "tar_at_far": {far_key(far): tar for far, tar in tars.items()},
        "eer": _eer(fpr, tpr),
        # Trapezoids over the full ROC = roc_auc_score (ties count one half), without a second sort.
        "auc": float(auc(fpr, tpr)),
        "pairs": len(s),
        "same_pairs": len(s) - n_diff,
        "min_measurable_far": 1.0 / n_diff,
    }


def pair_scores(emb_a: Any, emb_b: Any) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) embedding arrays (each row L2-normalised first)."""
    a = np.asarray(emb_a, dtype=np.float64)
    b = np.asarray(emb_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"pair_scores needs two (N, D) arrays of the same shape, got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    if not ((na > 0) & (nb > 0)).all():
        raise ValueError("an embedding is all zeros: its cosine similarity is undefined (check the model output)")
    return np.einsum("ij,ij->i", a, b) / (na * nb)
