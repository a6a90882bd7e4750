"""Confidence intervals and paired tests over verification pairs (is model A really better than B on these pairs?).

Both work on the per-pair decisions of the 10-fold protocol (:func:`lafs.eval.verification.kfold_correct`):
every model is scored on the same pairs, so two models' decisions are paired. The interval of one model's accuracy
is a bootstrap over pairs; the difference of two models is tested with McNemar's exact test (binomial on the pairs
where exactly one model is right) and its interval is a paired bootstrap over pairs (scipy's ``bootstrap``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000


def _decisions(correct: Any) -> np.ndarray:
    c = np.asarray(correct).reshape(-1)
    if c.dtype != bool and not np.isin(c, (0, 1)).all():
        raise ValueError("per-pair decisions must be bool or 0/1 (1 = the model decided the pair correctly)")
    if len(c) < 2:
        raise ValueError(f"a confidence interval needs at least 2 pairs, got {len(c)}")
    return c.astype(np.float64)


def accuracy_ci(
    correct: Any, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval (over pairs) of the fraction of pairs decided correctly."""
    c = _decisions(correct)
    if c.min() == c.max():  # every resample has the same mean: the interval is that point
        return float(c[0]), float(c[0])
    res = stats.bootstrap(
        (c,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def paired_test(
    correct_a: Any, correct_b: Any, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """A vs B on the same pairs: accuracy difference (A - B) with a paired bootstrap interval, and McNemar's exact
    two-sided p-value. ``a_only`` / ``b_only``: pairs only A / only B decided correctly (the discordant pairs)."""
    a, b = _decisions(correct_a), _decisions(correct_b)
    if len(a) != len(b):
        raise ValueError(f"paired test needs the same pairs for both models, got {len(a)} and {len(b)} decisions")
    a_only = int(((a == 1) & (b == 0)).sum())
    b_only = int(((a == 0) & (b == 1)).sum())
    discordant = a_only + b_only
    p_value = 1.0 if discordant == 0 else float(stats.binomtest(a_only, discordant, 0.5).pvalue)
    if discordant == 0:
        low = high = 0.0
    else:
        res = stats.bootstrap(
            (a, b),
            _difference,
            paired=True,
            confidence_level=confidence,
            n_resamples=n_resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {
        "difference": float(a.mean() - b.mean()),
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "a_only": a_only,
        "b_only": b_only,
        "mcnemar_p": p_value,
        "pairs": len(a),
    }
