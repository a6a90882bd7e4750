"""Stage ``evaluate``: verification, few-shot identification and end-to-end latency of any recogniser.

Two entry points share every step (faces -> embeddings -> scores -> metrics and plots):

- :func:`run`, the pipeline stage (``lafs evaluate``, ``dvc repro evaluate``): the finetuned model
  ``models/finetune/model.pt`` on the split's test protocol (``data/splits/pairs.csv`` over the aligned test
  faces, or ``evaluate.pairs`` = an LFW pairs file over ``evaluate.images_root`` photos), few-shot
  identification on ``data/splits/test.csv``, and latency + verification accuracy of every
  ``evaluate.candidates`` model (``models/model.onnx``, the PyTorch model, optionally ``dlib_resnet``) on
  raw photos of ``data/manifest.parquet``. Writes ``metrics/eval.json``, ``plots/roc.png``,
  ``plots/scores.png``, ``plots/roc.csv``, ``reports/evaluation.md`` and logs them all to one MLflow run.
- :func:`run_model` (``lafs evaluate --model M --images DIR --pairs FILE --out OUT``): any model file, ``.onnx``,
  ``dlib_resnet``, ``pixels`` or ``hog`` on a folder of raw photos and an LFW pairs file -> ``OUT/metrics.json``
  (same nested keys), ``OUT/evaluation.md`` and the same plots. No MLflow run: it is a measurement, not a
  pipeline step. ``--no-floors`` leaves out the floors and the ceiling (the model alone).

Every report sets the model beside its baselines, scored on the same faces, pairs, folds and missed-face
policy: the non-learned floors (``evaluate.floors``: grey pixels, HOG) it must beat to have learnt anything,
and the reference ceiling (``evaluate.ceiling``: dlib's ResNet) it is measured against. The ROC plot holds all
their curves; ``evaluation.md`` tabulates accuracy +- std, AUC, EER and TAR@FAR for each.

Photos are detected with the ``landmarks`` section's SCRFD detector and policy, for dlib too (its shape
predictor gets a box placed from the SCRFD keypoints, :func:`lafs.faces.dense.dlib_box`), so all
models see the same faces. A photo without a usable face keeps the
fallback face (:mod:`lafs.eval.photos`; ``missed_faces: centre_crop``) or makes every pair holding it an
error (``missed_faces: wrong``): scored outside the cosine range, below any threshold for a same pair and
above it for a different one. Either way it is counted in ``faces``, and no pair is dropped.

``eval.json``::

    {"verification": {accuracy_mean, accuracy_std, threshold, tar_at_far: {1e-02, 1e-03, 1e-04}, eer, auc,
                      pairs, ...},
     "fewshot": {"k1": {"top1", ...}, ...},                      (pipeline only)
     "faces": {images, detected, missed, missed_policy, pairs_with_missed_face},
     "model": {spec, embed_dim, flip},
     "latency": {criterion, threads, flip, images, warmup,
                 "candidates": {name: {p50_ms, p95_ms, mean_ms, accuracy}},
                 "budgets": {"100ms": {budget_ms, meets, best, best_accuracy}, ...}},
     "floors": {"pixels": {<verification keys>}, "hog": {...}},   ({} when none)
     "ceiling": {"dlib_resnet": {<verification keys>}},          ({} when evaluate.ceiling is null)
     "margin_over_floor": model accuracy - best floor accuracy,  (null without floors)
     "gap_to_ceiling": ceiling accuracy - model accuracy,        (null without a ceiling)
     "test_set": {pairs, faces, pairs_sha256, faces_sha256},     (what the scores were measured on)
     "serving": {model, flip, threshold, accuracy_mean}}         (pipeline only: the served path's calibration)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lafs.config import EvaluateParams, LandmarksParams, Params, resolved
from lafs.data.images import ImageRejected, load_rgb
from lafs.data.pairs import PairsFormatError, read_pairs_csv
from lafs.eval.embedders import DLIB_RESNET, HOG, PIXELS, Embedder, EmbedderError, load_embedder
from lafs.eval.faceset import (
    FaceSet,
    FaceSetError,
    PairIndex,
    aligned_faceset,
    embed,
    pairs_from_rows,
    photo_faceset,
    restrict_to_pairs,
    test_set_fingerprint,
)
from lafs.eval.latency import budget_report, end_to_end, measure_latency, pinned_threads
from lafs.eval.photos import FaceFinder
from lafs.faces import FaceModelError
from lafs.layout import Layout
from lafs.stages import RunOptions, StageError, write_metrics
from lafs.tracking import RunLogger, metric_leaves

log = logging.getLogger(__name__)

WRONG_SCORE = 2.0  # |cosine| <= 1: +-2 is on the wrong side of every threshold a fold can pick


@dataclass
class EvaluateSummary:
    report: dict[str, Any]
    metrics_path: Path
    plots: list[Path]
    seconds: float

    def describe(self) -> str:
        v = self.report["verification"]
        parts = [
            f"verification {v['accuracy_mean']:.4f} +- {v['accuracy_std']:.4f} on {v['pairs']} pairs "
            f"(EER {v['eer']:.4f}, AUC {v['auc']:.4f})"
        ]
        if "fewshot" in self.report:
            parts.append(
                "few-shot top-1 "
                + ", ".join(
                    f"{k} {r['top1']:.3f}" for k, r in self.report["fewshot"].items() if r.get("top1") is not None
                )
            )
        parts += baseline_summary(self.report)
        missed = self.report["faces"]["missed"]
        if missed:
            parts.append(f"{missed} photos without a detected face ({self.report['faces']['missed_policy']})")
        lat = self.report.get("latency", {})
        if lat.get("candidates"):
            crit = lat["criterion"]
            parts.append(
                "latency "
                + crit
                + " "
                + ", ".join(f"{n} {c[crit + '_ms']:.0f} ms" for n, c in lat["candidates"].items())
            )
        return "; ".join(parts) + f" -> {self.metrics_path} ({self.seconds:.0f} s)"


# -- scoring ------------------------------------------------------------------------------------------------
def pair_scores(emb: np.ndarray, pairs: PairIndex) -> np.ndarray:
    """Cosine of each pair (embeddings are L2-normalised)."""
    return np.einsum("ij,ij->i", emb[pairs.first], emb[pairs.second]).astype(np.float64)


def missed_pairs(faces: FaceSet, pairs: PairIndex) -> np.ndarray:
    return ~(faces.detected[pairs.first] & faces.detected[pairs.second])


def apply_missed_policy(scores: np.ndarray, missed: np.ndarray, same: np.ndarray, policy: str) -> np.ndarray:
    """``wrong``: pairs with a missed face are scored as errors (LFW's "failed pair" convention)."""
    if policy != "wrong" or not missed.any():
        return scores
    out = scores.copy()
    out[missed] = np.where(same[missed], -WRONG_SCORE, WRONG_SCORE)
    return out


def verify(
    embedder: Embedder, faces: FaceSet, pairs: PairIndex, cfg: EvaluateParams
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(verification report, scores, embeddings) of ``embedder`` on the protocol."""
    from lafs.eval.verification import verification_report

    emb = embed(embedder, faces, cfg.flip, cfg.batch_size)
    scores = apply_missed_policy(pair_scores(emb, pairs), missed_pairs(faces, pairs), pairs.same, cfg.missed_faces)
    return verification_report(scores, pairs.same, folds=pairs.folds), scores, emb


def write_plots(rows: list[Row], same: np.ndarray, out_dir: Path) -> list[Path]:
    """``roc.png`` (every row's ROC, the model first), and the model's ``scores.png`` and ``roc.csv``."""
    from lafs.eval.plots import roc_curves, roc_points, score_histogram

    out_dir.mkdir(parents=True, exist_ok=True)
    model = rows[0]
    styles = {row.label: LINE_STYLES[row.role] for row in rows[1:]}  # the model's curve is always solid
    return [
        roc_curves({row.label: row.scores for row in rows}, same, out_dir / "roc.png", styles=styles),
        score_histogram(model.scores, same, out_dir / "scores.png", threshold=model.report["threshold"]),
        roc_points(model.scores, same, out_dir / "roc.csv"),
    ]


def faces_section(faces: FaceSet, pairs: PairIndex, policy: str) -> dict[str, Any]:
    return {
        "images": len(faces),
        "detected": len(faces) - faces.missed,
        "missed": faces.missed,
        "missed_policy": policy,
        "pairs_with_missed_face": int(missed_pairs(faces, pairs).sum()),
    }


# -- floors and ceiling -------------------------------------------------------------------------------------
LINE_STYLES = {"model": "-", "floor": "--", "ceiling": ":"}


def protocol_section(splits: Path) -> dict[str, Any]:
    """The split's protocol counts (``protocol.json``: name, pairs in the protocol file, scored, missing by
    reason), so a reported accuracy always says over how many of the protocol's pairs it was measured."""
    path = splits / "protocol.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    keys = ("name", "pairs_in_file", "pairs_scored", "pairs_missing", "missing_by_reason", "test_identities")
    return {k: data[k] for k in keys if k in data}


def serving_section(
    cfg: EvaluateParams, report: dict[str, Any], scored: dict[str, tuple[dict[str, Any], np.ndarray]]
) -> dict[str, Any]:
    """The calibration a served model ships with: the threshold of the ONNX recogniser (what serving runs) with
    ``evaluate.flip``, on these pairs; the torch model's when the onnx candidate was not scored (export's
    parity check keeps the two within cosine 1e-4)."""
    model, r = ("onnx", scored["onnx"][0]) if "onnx" in scored else ("torch", report)
    return {"model": model, "flip": cfg.flip, "threshold": r["threshold"], "accuracy_mean": r["accuracy_mean"]}


@dataclass(frozen=True)
class Row:
    """One embedder on the protocol: its label (a spec, or a model file's name), role (``model``, ``floor``,
    ``ceiling``), verification report and per-pair scores."""

    label: str
    role: str
    report: dict[str, Any]
    scores: np.ndarray


def baseline_roles(cfg: EvaluateParams, enabled: bool = True) -> dict[str, str]:
    """Spec -> role of every baseline the report sets beside the model (none when not ``enabled``)."""
    if not enabled:
        return {}
    roles = dict.fromkeys(cfg.floors, "floor")
    if cfg.ceiling is not None:
        roles[cfg.ceiling] = "ceiling"
    return roles


def score_baselines(
    roles: dict[str, str],
    cfg: EvaluateParams,
    faces: FaceSet,
    pairs: PairIndex,
    known: dict[str, tuple[dict[str, Any], np.ndarray]],
) -> list[Row]:
    """A row per baseline, scored through :func:`verify` like the model; ``known`` (spec -> (report, scores)
    already computed, e.g. a candidate that is also the ceiling) is reused, not embedded twice."""
    rows = []
    for spec, role in roles.items():
        if spec not in known:
            start = time.perf_counter()
            run = cfg if role != "ceiling" or cfg.ceiling_flip else cfg.model_copy(update={"flip": False})
            known[spec] = verify(_embedder(spec, cfg.batch_size, cfg.threads), faces, pairs, run)[:2]
            log.info(
                "%s %s: %.4f on %d pairs, %d faces in %.1f s",
                role,
                spec,
                known[spec][0]["accuracy_mean"],
                len(pairs),
                len(faces),
                time.perf_counter() - start,
            )
        rows.append(Row(spec, role, *known[spec]))
    return rows


def baselines_section(model: Row, baselines: list[Row]) -> dict[str, Any]:
    """eval.json's ``floors``, ``ceiling``, ``margin_over_floor`` (model - best floor) and ``gap_to_ceiling``
    (ceiling - model), accuracies of the same folds."""
    floors = {r.label: r.report for r in baselines if r.role == "floor"}
    ceiling = {r.label: r.report for r in baselines if r.role == "ceiling"}
    acc = model.report["accuracy_mean"]
    best_floor = max((r["accuracy_mean"] for r in floors.values()), default=None)
    top = max((r["accuracy_mean"] for r in ceiling.values()), default=None)
    return {
        "floors": floors,
        "ceiling": ceiling,
        "margin_over_floor": None if best_floor is None else acc - best_floor,
        "gap_to_ceiling": None if top is None else top - acc,
    }


def baseline_summary(report: dict[str, Any]) -> list[str]:
    """``describe()`` parts: each floor and ceiling accuracy and the margin, beside the model's."""
    parts = []
    for key in ("floors", "ceiling"):
        if report.get(key):
            parts.append(f"{key} " + ", ".join(f"{n} {r['accuracy_mean']:.4f}" for n, r in report[key].items()))
    if report.get("margin_over_floor") is not None:
        parts.append(f"margin over best floor {report['margin_over_floor']:+.4f}")
    return parts


def comparison_rows(model: Row, baselines: list[Row]) -> list[Row]:
    """The model first, then each baseline that is not the model itself (``--model dlib_resnet`` with the
    dlib ceiling is one row, role ``model, ceiling``): one curve and one table row per embedder."""
    rows = [model]
    for row in baselines:
        if row.label == model.label:
            rows[0] = Row(model.label, f"{model.role}, {row.role}", model.report, model.scores)
        else:
            rows.append(row)
    return rows


def _tar_cell(tar: float | None, min_far: float) -> str:
    return f"{tar:.4f}" if tar is not None else f"n/a (FAR < 1/{round(1 / min_far)})"


def _protocol_lines(protocol: dict[str, Any]) -> list[str]:
    if protocol.get("pairs_in_file") is None:
        return []
    missing = ", ".join(f"{n} {reason}" for reason, n in protocol.get("missing_by_reason", {}).items()) or "none"
    return [
        f"Protocol {protocol['name']}: {protocol['pairs_scored']} of its {protocol['pairs_in_file']} pairs "
        f"scored; {protocol['pairs_missing']} missing a photo ({missing}).",
        "",
    ]


def markdown_report(rows: list[Row], out: dict[str, Any]) -> str:
    """``evaluation.md``: accuracy +- std, AUC, EER and TAR@FAR of the model, its floors and its ceiling on one
    protocol, then the margin over the best floor and the gap to the ceiling."""
    fars = list(rows[0].report["tar_at_far"])
    v = rows[0].report
    lines = [
        "# Evaluation: the model beside its floors and ceiling",
        "",
        f"{v['pairs']} pairs ({v['same_pairs']} same), {out['faces']['images']} faces "
        f"({out['faces']['missed']} missed: {out['faces']['missed_policy']}), flip TTA {out['model']['flip']}; "
        "accuracy is the mean +- std over the protocol's folds (threshold chosen on the other folds).",
        "",
        *_protocol_lines(out.get("protocol") or {}),
        "| embedder | role | accuracy | AUC | EER | " + " | ".join(f"TAR@FAR {f}" for f in fars) + " |",
        "|---|---|---|---|---|" + "---|" * len(fars),
    ]
    for row in rows:
        r = row.report
        tars = " | ".join(_tar_cell(r["tar_at_far"][f], r["min_measurable_far"]) for f in fars)
        lines.append(
            f"| {row.label} | {row.role} | {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} | "
            f"{r['auc']:.4f} | {r['eer']:.4f} | {tars} |"
        )
    lines.append("")
    for key, text in (("margin_over_floor", "margin over the best floor"), ("gap_to_ceiling", "gap to the ceiling")):
        if out.get(key) is not None:
            lines.append(f"- {text}: {out[key]:+.4f} accuracy")
    return "\n".join(lines).rstrip() + "\n"


def write_report(rows: list[Row], out: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_report(rows, out))
    return path


def model_label(spec: str | Path) -> str:
    """A short label for plots and tables: a built-in embedder's name, else the model file's name."""
    return str(spec) if str(spec) in (DLIB_RESNET, PIXELS, HOG) else Path(spec).name


# -- latency ------------------------------------------------------------------------------------------------
def latency_section(
    cfg: EvaluateParams,
    landmarks: LandmarksParams,
    specs: dict[str, str],
    photos: list[np.ndarray],
    accuracy: dict[str, float],
) -> dict[str, Any]:
    """Time every candidate end to end on ``photos`` (threads pinned), then the budget report."""
    candidates: dict[str, dict[str, Any]] = {}
    with pinned_threads(cfg.latency_threads):
        finder = _finder(landmarks, threads=cfg.latency_threads)
        for name, spec in specs.items():
            embedder = _embedder(spec, batch_size=1, threads=cfg.latency_threads)
            stats = measure_latency(end_to_end(finder, embedder, cfg.flip), photos, cfg.latency_warmup)
            candidates[name] = {**stats.as_dict(), "accuracy": accuracy.get(name)}
            log.info("latency %s: p50 %.1f ms, p95 %.1f ms", name, stats.p50_ms, stats.p95_ms)
    return {
        "criterion": cfg.latency_criterion,
        "threads": cfg.latency_threads,
        "flip": cfg.flip,
        "images": len(photos),
        "warmup": cfg.latency_warmup,
        "candidates": candidates,
        "budgets": budget_report(candidates, cfg.latency_budgets_ms, cfg.latency_criterion),
    }


def _load_photos(paths: list[Path]) -> list[np.ndarray]:
    photos = []
    for path in paths:
        try:
            photos.append(load_rgb(path))
        except ImageRejected as exc:
            raise StageError(f"latency photo {path}: {exc}; rerun ingest") from None
    return photos


# -- helpers ------------------------------------------------------------------------------------------------
def _finder(landmarks: LandmarksParams, threads: int = 0) -> FaceFinder:
    try:
        return FaceFinder.from_params(landmarks, threads=threads)
    except FaceModelError as exc:
        raise StageError(f"{exc} (evaluate detects faces with the landmarks section's detector)") from None


def _embedder(spec: str | Path, batch_size: int, threads: int) -> Embedder:
    """``threads`` 0 = every core (ONNX Runtime threads, dlib worker processes)."""
    try:
        return load_embedder(spec, batch_size=batch_size, threads=threads or os.cpu_count() or 1)
    except EmbedderError as exc:
        raise StageError(str(exc)) from None


def _split_file(path: Path) -> Path:
    if not path.is_file():
        raise StageError(f"{path} not found: run the split stage first (dvc repro split)")
    return path


# -- the pipeline stage -------------------------------------------------------------------------------------
def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> EvaluateSummary:
    """Evaluate the finetuned model (and time every candidate); write eval.json and plots; one MLflow run."""
    start = time.perf_counter()
    cfg, landmarks, root = params.evaluate, params.landmarks, layout.root
    if not layout.model.is_file():
        raise StageError(f"{layout.model} not found: run the finetune stage first (dvc repro finetune)")
    specs = {"onnx": str(layout.onnx), "torch": str(layout.model), DLIB_RESNET: DLIB_RESNET, PIXELS: PIXELS, HOG: HOG}
    specs = {name: specs[name] for name in cfg.candidates}
    roles = baseline_roles(cfg)
    if "onnx" in specs and not layout.onnx.is_file():
        raise StageError(
            f"{layout.onnx} not found: run the export stage first (dvc repro export), or drop 'onnx' "
            "from evaluate.candidates"
        )
    if not layout.manifest.is_file():
        raise StageError(f"{layout.manifest} not found: run the ingest stage first (latency is timed on raw photos)")
    model = _embedder(layout.model, cfg.batch_size, cfg.threads)
    test = pd.read_csv(_split_file(layout.splits / "test.csv"))  # few-shot identification on the test identities
    need_photos = DLIB_RESNET in specs or DLIB_RESNET in roles

    try:
        if cfg.pairs == "split":
            rows = read_pairs_csv(_split_file(layout.splits / "pairs.csv"))
            keys = [*test["aligned_path"], *(str(r[k]) for r in rows for k in ("path1", "path2"))]
            faces = aligned_faceset(root, keys, layout.landmarks if need_photos else None)
            pairs = pairs_from_rows(rows, faces)
            test_faces = faces
        else:
            faces, pairs = photo_faceset(_finder(landmarks), Path(cfg.images_root or "."), Path(cfg.pairs))
            test_faces = aligned_faceset(root, list(test["aligned_path"]))
    except (FaceSetError, PairsFormatError) as exc:
        raise StageError(str(exc)) from None

    report, scores, emb = verify(model, faces, pairs, cfg)
    if test_faces is not faces:
        emb = embed(model, test_faces, cfg.flip, cfg.batch_size)
    where = test_faces.index()
    test_emb = emb[[where[k] for k in test["aligned_path"]]]
    from lafs.eval.fewshot import fewshot_identification

    fewshot = fewshot_identification(test_emb, test["label"].to_numpy(), ks=cfg.fewshot_k, seed=cfg.fewshot_seed)
    pair_faces, pair_index = restrict_to_pairs(faces, pairs)  # the others only verify: no few-shot faces
    scored = {
        name: verify(_embedder(spec, cfg.batch_size, cfg.threads), pair_faces, pair_index, cfg)[:2]
        for name, spec in specs.items()
        if name != "torch"
    }
    accuracy = {"torch": report["accuracy_mean"], **{name: r["accuracy_mean"] for name, (r, _) in scored.items()}}
    model = Row(model_label(layout.model), "model", report, scores)
    baselines = score_baselines(roles, cfg, pair_faces, pair_index, scored)  # built-in candidates: named by spec

    raw = pd.read_parquet(layout.manifest, columns=["path"])["path"].head(cfg.latency_images)
    latency = latency_section(cfg, landmarks, specs, _load_photos([root / p for p in raw]), accuracy)

    out = {
        "verification": report,
        "fewshot": fewshot,
        "faces": faces_section(faces, pairs, cfg.missed_faces),
        "model": {"spec": str(layout.model.relative_to(root)), "embed_dim": int(emb.shape[1]), "flip": cfg.flip},
        "latency": latency,
        **baselines_section(model, baselines),
        "protocol": protocol_section(layout.splits),
        "test_set": test_set_fingerprint(faces, pairs),
        "serving": serving_section(cfg, report, scored),
    }
    write_metrics(layout.metrics("evaluate"), out)
    rows = comparison_rows(model, baselines)
    plots = write_plots(rows, pairs.same, layout.plots)
    markdown = write_report(rows, out, layout.evaluation_report)
    logger = RunLogger(
        True,
        cfg.experiment,
        "evaluate",
        resolved(cfg),
        uri=cfg.tracking_uri,
        tags={"stage": "evaluate", "model": str(layout.model.relative_to(root))},
        system_metrics=False,
    )
    status = "FAILED"
    try:
        logger.log_metrics(metric_leaves(out), step=0)
        for path in (layout.metrics("evaluate"), *plots, markdown):
            logger.log_artifact(path, "evaluate")
        status = "FINISHED"
    finally:
        logger.end(status)
    return EvaluateSummary(out, layout.metrics("evaluate"), plots, time.perf_counter() - start)


# -- any model, from the command line -----------------------------------------------------------------------
def run_model(
    cfg: EvaluateParams,
    landmarks: LandmarksParams,
    spec: str,
    images: Path,
    pairs_file: Path,
    out_dir: Path,
    baselines: bool = True,
) -> EvaluateSummary:
    """``spec`` (model file, ``.onnx``, ``dlib_resnet``, ``pixels`` or ``hog``) on the photos of ``images`` named
    by ``pairs_file``: ``out_dir/metrics.json`` (verification, faces, model, latency of this model; with
    ``baselines``, the floors and ceiling of ``cfg`` too), ``out_dir/evaluation.md`` and the plots."""
    start = time.perf_counter()
    embedder = _embedder(spec, cfg.batch_size, cfg.threads)
    try:
        faces, pairs = photo_faceset(_finder(landmarks), images, pairs_file)
    except (FaceSetError, PairsFormatError) as exc:
        raise StageError(str(exc)) from None
    report, scores, emb = verify(embedder, faces, pairs, cfg)
    photos = _load_photos(list(faces.photos or [])[: cfg.latency_images])
    latency = latency_section(
        cfg, landmarks, {embedder.name: str(spec)}, photos, {embedder.name: report["accuracy_mean"]}
    )
    model = Row(model_label(spec), "model", report, scores)
    found = score_baselines(baseline_roles(cfg, baselines), cfg, faces, pairs, {str(spec): (report, scores)})
    out = {
        "verification": report,
        "faces": faces_section(faces, pairs, cfg.missed_faces),
        "model": {"spec": str(spec), "embed_dim": int(emb.shape[1]), "flip": cfg.flip},
        "latency": latency,
        **baselines_section(model, found),
        "test_set": test_set_fingerprint(faces, pairs),
    }
    metrics = out_dir / "metrics.json"
    write_metrics(metrics, out)
    rows = comparison_rows(model, found)
    plots = write_plots(rows, pairs.same, out_dir)
    write_report(rows, out, out_dir / "evaluation.md")
    return EvaluateSummary(out, metrics, plots, time.perf_counter() - start)
