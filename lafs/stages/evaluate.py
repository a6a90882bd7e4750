"""Stage ``evaluate``: verification, few-shot identification and end-to-end latency of any recogniser.

Two entry points share every step (faces -> embeddings -> scores -> metrics and plots):

- :func:`run`, the pipeline stage (``lafs evaluate``, ``dvc repro evaluate``): the finetuned model
  ``models/finetune/model.pt`` on the split's test protocol (``data/splits/pairs.csv`` over the aligned test
  faces, or ``evaluate.pairs`` = an LFW pairs file over ``evaluate.images_root`` photos), few-shot
  identification on ``data/splits/test.csv``, and latency + verification accuracy of every
  ``evaluate.candidates`` model (``models/model.onnx``, the PyTorch model, optionally ``dlib_resnet``) on
  raw photos of ``data/manifest.parquet``. Writes ``metrics/eval.json``, ``plots/roc.png``,
  ``plots/scores.png``, ``plots/roc.csv`` and logs them all to one MLflow run.
- :func:`run_model` (``lafs evaluate --model M --images DIR --pairs FILE --out OUT``): any model file, ``.onnx``
  or ``dlib_resnet`` on a folder of raw photos and an LFW pairs file -> ``OUT/metrics.json`` (same nested keys)
  and the same plots. No MLflow run: it is a measurement, not a pipeline step.

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
                 "budgets": {"100ms": {budget_ms, meets, best, best_accuracy}, ...}}}
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lafs.config import EvaluateParams, LandmarksParams, resolved
from lafs.data.images import ImageRejected, load_rgb
from lafs.data.pairs import PairsFormatError, read_pairs_csv
from lafs.eval.embedders import DLIB_RESNET, Embedder, EmbedderError, load_embedder
from lafs.eval.faceset import FaceSet, FaceSetError, PairIndex, aligned_faceset, embed, pairs_from_rows, photo_faceset
from lafs.eval.latency import budget_report, end_to_end, measure_latency, pinned_threads
from lafs.eval.photos import FaceFinder
from lafs.faces import FaceModelError
from lafs.stages import StageError, write_metrics
from lafs.tracking import RunLogger

log = logging.getLogger(__name__)

WRONG_SCORE = 2.0  # |cosine| <= 1: +-2 is on the wrong side of every threshold a fold can pick


@dataclass(frozen=True)
class EvaluatePaths:
    """Inputs and outputs of the pipeline stage, relative to the project root."""

    root: Path = Path(".")

    @property
    def model(self) -> Path:
        return self.root / "models" / "finetune" / "model.pt"

    @property
    def onnx(self) -> Path:
        return self.root / "models" / "model.onnx"

    @property
    def splits(self) -> Path:
        return self.root / "data" / "splits"

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "manifest.parquet"

    @property
    def landmarks(self) -> Path:
        return self.root / "data" / "landmarks.parquet"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics" / "eval.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


@dataclass
class EvaluateSummary:
    report: dict[str, Any]
    metrics_path: Path
    plots: list[Path]
    seconds: float

    def describe(self) -> str:
        v = self.report["verification"]
        parts = [f"verification {v['accuracy_mean']:.4f} +- {v['accuracy_std']:.4f} on {v['pairs']} pairs "
                 f"(EER {v['eer']:.4f}, AUC {v['auc']:.4f})"]
        if "fewshot" in self.report:
            parts.append("few-shot top-1 " + ", ".join(f"{k} {r['top1']:.3f}" for k, r in self.report["fewshot"].items()
                                                    if r.get("top1") is not None))
        missed = self.report["faces"]["missed"]
        if missed:
            parts.append(f"{missed} photos without a detected face ({self.report['faces']['missed_policy']})")
        lat = self.report.get("latency", {})
        if lat.get("candidates"):
            crit = lat["criterion"]
            parts.append("latency " + crit + " " + ", ".join(f"{n} {c[crit + '_ms']:.0f} ms"
                                                            for n, c in lat["candidates"].items()))
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


def verify(embedder: Embedder, faces: FaceSet, pairs: PairIndex, cfg: EvaluateParams
           ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(verification report, scores, embeddings) of ``embedder`` on the protocol."""
    from lafs.eval.verification import verification_report

    emb = embed(embedder, faces, cfg.flip, cfg.batch_size)
    scores = apply_missed_policy(pair_scores(emb, pairs), missed_pairs(faces, pairs), pairs.same, cfg.missed_faces)
    return verification_report(scores, pairs.same, folds=pairs.folds), scores, emb


def write_plots(scores: np.ndarray, same: np.ndarray, threshold: float, out_dir: Path) -> list[Path]:
    from lafs.eval.plots import roc_plot, roc_points, score_histogram

    out_dir.mkdir(parents=True, exist_ok=True)
    return [roc_plot(scores, same, out_dir / "roc.png"),
            score_histogram(scores, same, out_dir / "scores.png", threshold=threshold),
            roc_points(scores, same, out_dir / "roc.csv")]


def faces_section(faces: FaceSet, pairs: PairIndex, policy: str) -> dict[str, Any]:
    return {"images": len(faces), "detected": len(faces) - faces.missed, "missed": faces.missed,
            "missed_policy": policy, "pairs_with_missed_face": int(missed_pairs(faces, pairs).sum())}


# -- latency ------------------------------------------------------------------------------------------------
def latency_section(cfg: EvaluateParams, landmarks: LandmarksParams, specs: dict[str, str],
                    photos: list[np.ndarray], accuracy: dict[str, float]) -> dict[str, Any]:
    """Time every candidate end to end on ``photos`` (threads pinned), then the budget report."""
    candidates: dict[str, dict[str, Any]] = {}
    with pinned_threads(cfg.latency_threads):
        finder = _finder(landmarks, threads=cfg.latency_threads)
        for name, spec in specs.items():
            embedder = _embedder(spec, batch_size=1, threads=cfg.latency_threads)
            stats = measure_latency(end_to_end(finder, embedder, cfg.flip), photos, cfg.latency_warmup)
            candidates[name] = {**stats.as_dict(), "accuracy": accuracy.get(name)}
            log.info("latency %s: p50 %.1f ms, p95 %.1f ms", name, stats.p50_ms, stats.p95_ms)
    return {"criterion": cfg.latency_criterion, "threads": cfg.latency_threads, "flip": cfg.flip,
            "images": len(photos), "warmup": cfg.latency_warmup, "candidates": candidates,
            "budgets": budget_report(candidates, cfg.latency_budgets_ms, cfg.latency_criterion)}


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


def _numeric(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested report as dotted keys (MLflow metrics; strings, lists and None are skipped)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numeric(value, f"{name}."))
        elif isinstance(value, int | float) and np.isfinite(float(value)):
            out[name] = float(value)
    return out


def _split_file(path: Path) -> Path:
    if not path.is_file():
        raise StageError(f"{path} not found: run the split stage first (dvc repro split)")
    return path


# -- the pipeline stage -------------------------------------------------------------------------------------
def run(cfg: EvaluateParams, landmarks: LandmarksParams, paths: EvaluatePaths = EvaluatePaths()) -> EvaluateSummary:
    """Evaluate the finetuned model (and time every candidate); write eval.json and plots; one MLflow run."""
    start = time.perf_counter()
    root = paths.root
    if not paths.model.is_file():
        raise StageError(f"{paths.model} not found: run the finetune stage first (dvc repro finetune)")
    specs = {"onnx": str(paths.onnx), "torch": str(paths.model), DLIB_RESNET: DLIB_RESNET}
    specs = {name: specs[name] for name in cfg.candidates}
    if "onnx" in specs and not paths.onnx.is_file():
        raise StageError(f"{paths.onnx} not found: run the export stage first (dvc repro export), or drop 'onnx' "
                         "from evaluate.candidates")
    if not paths.manifest.is_file():
        raise StageError(f"{paths.manifest} not found: run the ingest stage first (latency is timed on raw photos)")
    model = _embedder(paths.model, cfg.batch_size, cfg.threads)
    test = pd.read_csv(_split_file(paths.splits / "test.csv"))  # few-shot identification on the test identities
    need_photos = DLIB_RESNET in specs

    try:
        if cfg.pairs == "split":
            rows = read_pairs_csv(_split_file(paths.splits / "pairs.csv"))
            keys = [*test["aligned_path"], *(str(r[k]) for r in rows for k in ("path1", "path2"))]
            faces = aligned_faceset(root, keys, paths.landmarks if need_photos else None)
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
    accuracy = {"torch": report["accuracy_mean"]}
    for name, spec in specs.items():
        if name != "torch":
            accuracy[name] = verify(_embedder(spec, cfg.batch_size, cfg.threads), faces, pairs,
                                    cfg)[0]["accuracy_mean"]

    raw = pd.read_parquet(paths.manifest, columns=["path"])["path"].head(cfg.latency_images)
    latency = latency_section(cfg, landmarks, specs, _load_photos([root / p for p in raw]), accuracy)

    out = {"verification": report, "fewshot": fewshot, "faces": faces_section(faces, pairs, cfg.missed_faces),
           "model": {"spec": str(paths.model.relative_to(root)), "embed_dim": int(emb.shape[1]), "flip": cfg.flip},
           "latency": latency}
    write_metrics(paths.metrics, out)
    plots = write_plots(scores, pairs.same, report["threshold"], paths.plots)
    logger = RunLogger(True, cfg.experiment, "evaluate", resolved(cfg), uri=cfg.tracking_uri,
                       tags={"stage": "evaluate", "model": str(paths.model.relative_to(root))}, system_metrics=False)
    status = "FAILED"
    try:
        logger.log_metrics(_numeric(out), step=0)
        for path in (paths.metrics, *plots):
            logger.log_artifact(path, "evaluate")
        status = "FINISHED"
    finally:
        logger.end(status)
    return EvaluateSummary(out, paths.metrics, plots, time.perf_counter() - start)


# -- any model, from the command line -----------------------------------------------------------------------
def run_model(cfg: EvaluateParams, landmarks: LandmarksParams, spec: str, images: Path, pairs_file: Path,
              out_dir: Path) -> EvaluateSummary:
    """``spec`` (model file, ``.onnx`` or ``dlib_resnet``) on the photos of ``images`` named by ``pairs_file``:
    ``out_dir/metrics.json`` (verification, faces, model, latency of this model) and the plots."""
    start = time.perf_counter()
    embedder = _embedder(spec, cfg.batch_size, cfg.threads)
    try:
        faces, pairs = photo_faceset(_finder(landmarks), images, pairs_file)
    except (FaceSetError, PairsFormatError) as exc:
        raise StageError(str(exc)) from None
    report, scores, emb = verify(embedder, faces, pairs, cfg)
    photos = _load_photos(list(faces.photos or [])[: cfg.latency_images])
    latency = latency_section(cfg, landmarks, {embedder.name: str(spec)}, photos,
                              {embedder.name: report["accuracy_mean"]})
    out = {"verification": report, "faces": faces_section(faces, pairs, cfg.missed_faces),
           "model": {"spec": str(spec), "embed_dim": int(emb.shape[1]), "flip": cfg.flip}, "latency": latency}
    metrics = out_dir / "metrics.json"
    write_metrics(metrics, out)
    plots = write_plots(scores, pairs.same, report["threshold"], out_dir)
    return EvaluateSummary(out, metrics, plots, time.perf_counter() - start)
