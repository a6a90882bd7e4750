"""Verification metrics against answers known by construction and against brute-force reference code."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from lafs.eval import plots
from lafs.eval.verification import (
    FARS,
    contiguous_folds,
    equal_error_rate,
    kfold_accuracy,
    pair_scores,
    roc,
    tar_at_far,
    verification_report,
)

REPO = Path(__file__).resolve().parents[1]


def _separable(n_same: int = 300, n_diff: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Same pairs score in [0.6, 0.95], different pairs in [-0.4, 0.2], shuffled."""
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.uniform(0.6, 0.95, n_same), rng.uniform(-0.4, 0.2, n_diff)]
    same = np.r_[np.ones(n_same, bool), np.zeros(n_diff, bool)]
    order = rng.permutation(len(scores))
    return scores[order], same[order]


# ---- brute-force references: loops over every candidate, written for clarity, not speed ----


def _brute_kfold(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> tuple[float, float, float]:
    accs, thresholds = [], []
    for fold in np.unique(folds):
        train = folds != fold
        values = np.unique(scores[train])
        candidates = [np.nextafter(values[0], -np.inf)]  # accept all: just below the lowest training score
        candidates += [(a + b) / 2 for a, b in itertools.pairwise(values)]
        candidates.append(values[-1])  # accept none
        best_t, best_acc = None, -1.0
        for t in candidates:  # ascending, and >= keeps the last maximum: ties go to the highest threshold
            acc = np.mean((scores[train] > t) == same[train])
            if acc >= best_acc:
                best_t, best_acc = t, acc
        accs.append(np.mean((scores[~train] > best_t) == same[~train]))
        thresholds.append(best_t)
    return float(np.mean(accs)), float(np.std(accs)), float(np.mean(thresholds))


def _brute_tar(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    best = 0.0
    for t in [*np.unique(scores), np.inf]:
        if np.mean(scores[~same] >= t) <= far:
            best = max(best, float(np.mean(scores[same] >= t)))
    return best


def _ties(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes with scores rounded to 2 decimals: many exact ties, within and across classes."""
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    scores = np.round(np.where(same, rng.normal(0.35, 0.2, n), rng.normal(0.05, 0.2, n)), 2)
    return scores, same


# ---- k-fold accuracy ----


def test_perfectly_separable_is_perfect() -> None:
    scores, same = _separable()
    mean, std, threshold = kfold_accuracy(scores, same)
    assert (mean, std) == (1.0, 0.0)
    assert 0.2 < threshold < 0.6  # every fold's threshold falls in the gap between the classes
    assert equal_error_rate(scores, same) == 0.0
    report = verification_report(scores, same)
    assert report["auc"] == 1.0 and report["eer"] == 0.0
    assert report["tar_at_far"]["1e-02"] == 1.0  # 300 different pairs: FAR 1e-2 is measurable


def test_exactly_m_misclassified_pairs_at_every_threshold() -> None:
    """Separable pairs plus outliers no threshold can get right: a different pair scoring above every same pair,
    a same pair below every different pair. Each fold's best threshold stays in the gap, so the held-out
    accuracy of a fold is 1 - (its outliers) / (its size)."""
    scores, same = _separable(95, 95, seed=1)
    folds = np.tile(np.arange(1, 11), 19)  # 19 pairs per fold
    outliers = {1: 2, 3: 1, 7: 3}  # fold -> outliers added (each fold gets one more pair per outlier)
    extra_scores, extra_same, extra_folds = [], [], []
    for fold, count in outliers.items():
        for i in range(count):
            high_diff = i % 2 == 0
            extra_scores.append(0.99 if high_diff else -0.99)
            extra_same.append(not high_diff)
            extra_folds.append(fold)
    scores = np.r_[scores, extra_scores]
    same = np.r_[same, extra_same]
    folds = np.r_[folds, extra_folds]
    mean, std, _ = kfold_accuracy(scores, same, folds=folds)
    expected = [1 - outliers.get(f, 0) / (19 + outliers.get(f, 0)) for f in range(1, 11)]
    assert mean == pytest.approx(np.mean(expected), abs=1e-12)
    assert std == pytest.approx(np.std(expected), abs=1e-12)


def test_threshold_is_chosen_on_the_other_folds() -> None:
    """Fold 1 separates at 0.4, fold 2 at 0.7. Each fold tested with the other's threshold gets half its pairs
    wrong (0.5); a threshold tuned on the test fold itself would give 1.0, one tuned on all pairs at most 0.75."""
    scores = np.r_[np.full(10, 0.5), np.full(10, 0.3), np.full(10, 0.8), np.full(10, 0.6)]
    same = np.r_[np.ones(10, bool), np.zeros(10, bool), np.ones(10, bool), np.zeros(10, bool)]
    folds = np.repeat([1, 2], 20)
    mean, std, threshold = kfold_accuracy(scores, same, folds=folds)
    assert (mean, std) == (0.5, 0.0)
    assert threshold == pytest.approx((0.4 + 0.7) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kfold_matches_brute_force_with_ties(seed: int) -> None:
    scores, same = _ties(400, seed)
    folds = np.random.default_rng(seed).integers(1, 11, len(scores))
    got = kfold_accuracy(scores, same, folds=folds)
    want = _brute_kfold(scores, same, folds)
    assert got[:2] == pytest.approx(want[:2], abs=1e-12)
    assert got[2] == pytest.approx(want[2], abs=1e-12)


def test_equal_scores_fall_on_the_same_side() -> None:
    """Each fold: 0.2 (different) and a tie at 0.5 of one different and three same pairs. A search over sorted
    positions instead of distinct values would "split" the tie for 5/5 on the training fold, with a threshold at
    0.5 that then rejects the whole block (2/5); no real threshold does better than 4/5 at 0.35."""
    block = (np.array([0.2, 0.5, 0.5, 0.5, 0.5]), np.array([0, 0, 1, 1, 1], bool))
    scores, same = np.r_[block[0], block[0]], np.r_[block[1], block[1]]
    folds = np.repeat([1, 2], 5)
    assert kfold_accuracy(scores, same, folds=folds) == pytest.approx((0.8, 0.0, 0.35), abs=1e-12)


def test_folds_none_are_sklearn_contiguous_kfold() -> None:
    scores, same = _ties(403, 5)  # 403 = 10 folds of 40 + 3 one larger, as KFold sizes them
    expected = np.empty(len(scores), dtype=int)
    for fold, (_, test) in enumerate(KFold(n_splits=10, shuffle=False).split(scores), 1):
        expected[test] = fold
    np.testing.assert_array_equal(contiguous_folds(len(scores), 10), expected)
    assert kfold_accuracy(scores, same) == kfold_accuracy(scores, same, folds=expected)
    assert kfold_accuracy(scores, same, n_folds=5) == _brute_kfold(scores, same, contiguous_folds(403, 5))


def test_given_folds_follow_the_pairs_not_their_order() -> None:
    scores, same = _ties(300, 7)
    folds = np.random.default_rng(7).integers(1, 11, len(scores))
    perm = np.random.default_rng(8).permutation(len(scores))
    assert kfold_accuracy(scores, same, folds=folds) == pytest.approx(
        kfold_accuracy(scores[perm], same[perm], folds=folds[perm]), abs=1e-12
    )
    # ... while the same pairs in contiguous folds are a different protocol (different result here)
    assert kfold_accuracy(scores, same, folds=folds) != kfold_accuracy(scores, same)


# ---- TAR@FAR, EER, ROC ----


def test_tar_at_far_known_answer_and_unmeasurable_target() -> None:
    """1000 different pairs at 0.000..0.999; same pairs: 50 at 2.0 and 50 at 0.9945, above 5 different pairs."""
    scores = np.r_[np.arange(1000) / 1000, np.full(50, 2.0), np.full(50, 0.9945)]
    same = np.r_[np.zeros(1000, bool), np.ones(100, bool)]
    tars = tar_at_far(scores, same)
    assert tars[1e-2] == 1.0  # 5 false accepts = FAR 0.005 <= 0.01
    assert tars[1e-3] == 0.5  # only the 2.0 block stays above all but <= 1 different pair
    assert tars[1e-4] is None  # below 1/1000: cannot be measured with 1000 different pairs
    report = verification_report(scores, same)
    assert report["tar_at_far"] == {"1e-02": 1.0, "1e-03": 0.5, "1e-04": None}
    assert report["min_measurable_far"] == 1e-3
    json.dumps(report, allow_nan=False)  # JSON-ready: None -> null, no NaN


@pytest.mark.parametrize("seed", [0, 3])
def test_tar_at_far_matches_brute_force(seed: int) -> None:
    scores, same = _ties(3000, seed)
    fars = (1e-1, 2e-2, 1e-2, 1e-3)
    got = tar_at_far(scores, same, fars)
    for far in fars:
        assert got[far] == pytest.approx(_brute_tar(scores, same, far), abs=1e-12), far


def test_equal_error_rate_known_answer() -> None:
    # At threshold 0.5: one of four different pairs accepted (0.9), one of four same pairs rejected (0.1).
    scores = np.array([0.1, 0.6, 0.7, 0.8, 0.2, 0.3, 0.4, 0.9])
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    assert equal_error_rate(scores, same) == pytest.approx(0.25)
    # Mirror-symmetric classes: FAR(t) = FRR(-t) for every t, the curves cross at 0.
    rng = np.random.default_rng(0)
    half = rng.normal(0.3, 0.25, 500)
    eer = equal_error_rate(np.r_[half, -half], np.r_[np.ones(500, bool), np.zeros(500, bool)])
    assert eer == pytest.approx(np.mean(half < 0), abs=1e-3)


def test_equal_error_rate_is_bracketed_by_the_roc_steps() -> None:
    """On the ROC segment where FAR - FRR changes sign, the crossing lies between both rates' end values; it is
    never above the best single threshold's worse error rate."""
    scores, same = _ties(2000, 11)
    eer = equal_error_rate(scores, same)
    fpr, tpr, _ = roc(scores, same)
    fnr = 1 - tpr
    assert eer <= float(np.min(np.maximum(fpr, fnr))) + 1e-12
    for i in range(1, len(fpr)):  # the first point where FAR >= FRR closes the crossing segment
        if fpr[i] >= fnr[i]:
            assert max(fpr[i - 1], fnr[i]) - 1e-12 <= eer <= min(fpr[i], fnr[i - 1]) + 1e-12
            break
    else:
        pytest.fail("the ROC never crosses FAR = FRR")


@pytest.mark.parametrize("seed", [0, 4])
def test_report_auc_is_sklearns_roc_auc_score(seed: int) -> None:
    scores, same = _ties(2000, seed)  # ties across classes count one half
    assert verification_report(scores, same)["auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-12)


def test_bad_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="both same and different"):
        verification_report([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="one label per pair"):
        kfold_accuracy([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="NaN"):
        kfold_accuracy([0.1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="one fold per pair"):
        kfold_accuracy([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], folds=[1, 2])


def test_pair_scores_is_rowwise_cosine() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 16)), rng.normal(size=(50, 16))
    want = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(pair_scores(a * 3.0, b), want, atol=1e-12)
    with pytest.raises(ValueError, match="all zeros"):
        pair_scores(np.zeros((1, 4)), np.ones((1, 4)))


# ---- plots ----


def test_plots_write_files_and_roc_points_follow_the_roc(tmp_path: Path) -> None:
    scores, same = _ties(3000, 2)
    report = verification_report(scores, same)
    png = plots.roc_plot(scores, same, tmp_path / "plots" / "roc.png")
    hist = plots.score_histogram(scores, same, tmp_path / "plots" / "scores.png", threshold=report["threshold"])
    for path in (png, hist):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = plots.roc_points(scores, same, tmp_path / "roc.csv", max_points=50)
    with points.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["fpr", "tpr"] and 2 <= len(rows) <= 50
    fpr = np.array([float(r["fpr"]) for r in rows])
    tpr = np.array([float(r["tpr"]) for r in rows])
    assert (np.diff(fpr) > 0).all() and (np.diff(tpr) >= 0).all()
    assert (fpr[0], fpr[-1], tpr[-1]) == (0.0, 1.0, 1.0)
    for far, tar in ((f, t) for f, t in tar_at_far(scores, same, (1e-2,)).items()):
        assert far in fpr and tpr[fpr == far][0] == tar  # the FAR targets are on the grid, at their exact TAR


def test_roc_curves_draw_every_embedder_on_one_axis(tmp_path: Path, monkeypatch) -> None:
    """The model, its floors and its ceiling on the same pairs: one curve each with its AUC in the legend,
    TAR@FAR marks on the model's curve only, line styles by role."""
    scores, same = _ties(3000, 2)
    rng = np.random.default_rng(0)
    curves = {"model.pt": scores, "pixels": scores + rng.normal(0, 0.3, len(scores)), "dlib_resnet": same * 1.0}
    drawn, save = [], plots._save

    def keep(fig, path):
        drawn.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    png = plots.roc_curves(curves, same, tmp_path / "roc.png", styles={"dlib_resnet": ":"})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = drawn[0].axes[0]
    lines, labels = ax.get_legend_handles_labels()
    curve_labels = [label for label in labels if not label.startswith("TAR@FAR")]
    assert curve_labels == [f"{name} (AUC {roc_auc_score(same, s):.4f})" for name, s in curves.items()]
    assert [lines[labels.index(label)].get_linestyle() for label in curve_labels] == ["-", "--", ":"]
    assert sum(label.startswith("TAR@FAR") for label in labels) == len(FARS)  # one mark per target, model only
    with pytest.raises(ValueError, match="at least one"):
        plots.roc_curves({}, same, tmp_path / "none.png")


# ---- benchmark script ----

# The benchmark's pairs: same ~ N(0.45, 0.2), different ~ N(0.05, 0.15), half each. The best threshold (0.243)
# gets 87.5% of them right; a k-fold estimate on 600 pairs (binomial std 1.4%) lands within 5% of it.
BENCHMARK_BAYES_ACCURACY = 0.8753


def test_pairs_benchmark_prints_json() -> None:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "eval.py"),
        "--part",
        "pairs",
        "--pairs",
        "600,6000",
        "--repeats",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["pairs"] for r in rows] == [600, 6000]
    for row in rows:
        assert row["part"] == "pairs" and row["pairs_per_s"] > 0 and row["baseline_pairs_per_s"] > 0
        assert row["far_keys"] == [f"{f:.0e}" for f in FARS]
        for key in ("accuracy_mean", "baseline_accuracy_mean"):  # both protocols find the best threshold
            assert abs(row[key] - BENCHMARK_BAYES_ACCURACY) < 0.05, (key, row)
