"""Confidence intervals and paired tests over verification pairs (lafs.eval.significance, kfold_correct)."""

from __future__ import annotations

import numpy as np
import pytest

from lafs.eval.significance import accuracy_ci, paired_test
from lafs.eval.verification import kfold_accuracy, kfold_correct


def test_kfold_correct_is_the_protocol_pair_by_pair():
    rng = np.random.default_rng(0)
    same = np.repeat([True, False], 300)
    scores = np.where(same, rng.normal(0.6, 0.2, 600), rng.normal(0.3, 0.2, 600))
    folds = np.tile(np.arange(1, 11), 60)
    correct, f, thresholds = kfold_correct(scores, same, folds)
    mean, _, threshold = kfold_accuracy(scores, same, folds)
    assert mean == pytest.approx(np.mean([correct[f == k].mean() for k in range(1, 11)]))
    assert threshold == pytest.approx(thresholds.mean()) and len(thresholds) == 10
    # each pair is decided by its own fold's threshold
    k = f - 1
    assert np.array_equal(correct, (scores > thresholds[k]) == same)
    assert 0.75 < correct.mean() < 0.85  # two unit-variance-0.2 Gaussians 0.3 apart: ~0.77 expected


def test_accuracy_ci_brackets_the_accuracy_and_narrows_with_more_pairs():
    rng = np.random.default_rng(1)
    small, large = rng.random(100) < 0.8, rng.random(10_000) < 0.8
    lo_s, hi_s = accuracy_ci(small)
    lo_l, hi_l = accuracy_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    # binomial standard error: 1.96 * sqrt(0.16 / n) = 0.078 at n=100, 0.0078 at 10k
    assert 0.12 < hi_s - lo_s < 0.19 and 0.012 < hi_l - lo_l < 0.019
    assert accuracy_ci(np.ones(50, dtype=bool)) == (1.0, 1.0)


def test_mcnemar_exact_p_matches_the_binomial_by_hand():
    # 10 pairs only A gets right, 2 only B, 88 both: p = 2 * P(X <= 2 | n=12, 1/2) = 2 * 79 / 4096
    a = np.array([1] * 10 + [0] * 2 + [1] * 88, dtype=bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 88, dtype=bool)
    t = paired_test(a, b)
    assert (t["a_only"], t["b_only"], t["pairs"]) == (10, 2, 100)
    assert t["mcnemar_p"] == pytest.approx(2 * 79 / 4096)
    assert t["difference"] == pytest.approx(0.08) and t["ci_low"] < 0.08 < t["ci_high"]
    assert t["ci_low"] > 0  # 10 vs 2 discordant pairs: A is better at 95%
    swapped = paired_test(b, a)
    assert swapped["difference"] == pytest.approx(-0.08) and swapped["mcnemar_p"] == t["mcnemar_p"]


def test_identical_models_are_not_different():
    a = np.random.default_rng(2).random(200) < 0.7
    t = paired_test(a, a)
    assert t["mcnemar_p"] == 1.0 and t["difference"] == 0.0 and (t["ci_low"], t["ci_high"]) == (0.0, 0.0)


def test_bad_decisions_are_refused():
    with pytest.raises(ValueError, match="same pairs"):
        paired_test(np.ones(5, bool), np.ones(6, bool))
    with pytest.raises(ValueError, match="bool or 0/1"):
        accuracy_ci(np.array([0.2, 0.9]))
