"""Verification plots: ROCs (log FAR axis; a model beside its floors and ceiling), same/different score
histograms, and ROC points for ``dvc plots``.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through ``pyplot``, so no
display or global backend is touched (safe in stages, Prefect workers and tests running in parallel).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lafs.eval.verification import FARS, check_scores, far_key, roc, tar_at_far, tar_at_fpr_grid


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def roc_plot(
    scores: Any, same: Any, path: str | Path, fars: tuple[float, ...] = FARS, title: str = "Verification ROC"
) -> Path:
    """ROC of one model's scores (:func:`roc_curves` with one curve, labelled ``ROC``)."""
    return roc_curves({"ROC": scores}, same, path, fars=fars, title=title)


def roc_curves(
    curves: Mapping[str, Any],
    same: Any,
    path: str | Path,
    fars: tuple[float, ...] = FARS,
    title: str = "Verification ROC",
    styles: Mapping[str, str] | None = None,
) -> Path:
    """ROCs of several embedders on the same pairs (``curves``: label -> scores; the first is the model, drawn
    solid with each measurable TAR@FAR target marked, the others in ``styles[label]`` line styles, default
    dashed), with a log-scaled FAR axis (where face verification operating points live) and each AUC in the
    legend: the model reads against its floors and ceiling at every operating point, not at one accuracy.

    FAR 0 cannot sit on a log axis, so the curves start at the smallest measurable FAR (1 / different pairs).
    """
    if not curves:
        raise ValueError("roc_curves needs at least one label -> scores curve")
    labels = list(curves)
    checked = {label: check_scores(curves[label], same) for label in labels}
    y = checked[labels[0]][1]
    n_diff = int((~y).sum())
    floor = 1.0 / n_diff
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for label in labels:
        s, _ = checked[label]
        style = "-" if label == labels[0] else (styles or {}).get(label, "--")
        _draw_roc(ax, s, y, label, floor, style)
    model_scores = checked[labels[0]][0]
    for far, tar in tar_at_far(model_scores, y, fars).items():
        if tar is not None:
            ax.plot([far], [tar], "o", label=f"TAR@FAR {far_key(far)} = {tar:.4f}")
        else:  # said in the legend, so a missing mark is not read as a missing metric
            ax.plot([], [], " ", label=f"TAR@FAR {far_key(far)}: not measurable (< 1/{n_diff} pairs)")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(f"{title}: {len(y)} pairs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _draw_roc(ax: Any, s: np.ndarray, y: np.ndarray, label: str, floor: float, style: str) -> None:
    from sklearn.metrics import roc_auc_score

    fpr, tpr, _ = roc(s, y)
    grid = np.r_[floor, fpr[fpr >= floor]]
    ax.step(
        grid,
        tar_at_fpr_grid(fpr, tpr, grid),
        where="post",
        linestyle=style,
        label=f"{label} (AUC {roc_auc_score(y, s):.4f})",
    )


def score_histogram(scores: Any, same: Any, path: str | Path, threshold: float | None = None, bins: int = 50) -> Path:
    """Same-person vs different-person score histograms (density, shared bins), with the threshold if given:
    shows how far apart the classes are and where the operating point cuts them."""
    s, y = check_scores(scores, same)
    edges = np.histogram_bin_edges(s, bins=bins)
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    ax.hist(s[y], bins=edges, density=True, alpha=0.6, label=f"same ({int(y.sum())})")
    ax.hist(s[~y], bins=edges, density=True, alpha=0.6, label=f"different ({int((~y).sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_points(scores: Any, same: Any, path: str | Path, max_points: int = 200, fars: tuple[float, ...] = FARS) -> Path:
    """CSV ``fpr,tpr`` for ``dvc plots``: at most ``max_points`` rows, so the file stays small at any pair count.

    The FAR grid mixes linear steps over [0, 1] with log steps from the smallest measurable FAR (1 / different
    pairs) and holds every measurable target in ``fars`` exactly; each row's TAR is the best ROC TAR at FAR <=
    that value (as :func:`~lafs.eval.verification.tar_at_far` reports it), so rows at the targets agree with
    the metrics.
    """
    if max_points < 4:
        raise ValueError(f"max_points must be >= 4 (both ends and a few steps), got {max_points}")
    s, y = check_scores(scores, same)
    fpr, tpr, _ = roc(s, y)
    floor = 1.0 / int((~y).sum())
    targets = [f for f in fars if f >= floor]
    budget = max_points - len(targets) - 2  # minus the targets and the two ends
    n_log = budget // 2
    grid = np.unique(
        np.r_[
            0.0,
            1.0,
            targets,
            np.linspace(0.0, 1.0, budget - n_log + 2)[1:-1],
            np.logspace(np.log10(floor), 0.0, n_log + 1)[:-1],
        ]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["fpr", "tpr"])
        for x, t in zip(grid, tar_at_fpr_grid(fpr, tpr, grid), strict=True):
            writer.writerow([repr(float(x)), repr(float(t))])
    return path
