"""Stage ``landmarks``: one aligned face and its landmarks per ingested photo.

For each image of ``data/manifest.parquet`` (decoded with :func:`lafs.data.images.load_rgb`): SCRFD
finds faces with 5 keypoints (:mod:`lafs.faces.detect`), ``landmarks.policy`` keeps one, the photo is warped
to the 112x112 ArcFace template (:mod:`lafs.faces.align`) and a dense landmark set is measured on the
original photo and mapped into the aligned frame (:mod:`lafs.faces.dense`).

Outputs (the :class:`~lafs.layout.Layout` paths, relative to the project root):

- ``data/aligned/<identity>/<name>.png``: aligned faces, lossless. ``<name>`` is the raw file's name with its
  suffix replaced; when two raw files differ only by suffix, both keep their full name plus ``.png``.
- ``data/landmarks.parquet``: one row per accepted image, in manifest order (see :data:`SCHEMA`). Points are
  flat ``x0, y0, x1, y1, ...`` lists; ``bbox``/``kps5`` are in original-photo pixels, ``kps5_aligned`` and
  ``dense`` in aligned-crop pixels (some jaw points of ``dense`` fall outside the tight 112 crop).
  The schema metadata holds the resolved params and the fingerprint that decides reuse.
- ``data/rejects.csv``: path, reason, message, sha256 of every image this stage rejected (``no_face``,
  ``face_too_small``, ``align_failed``, decode failures); ingest keeps its own ``data/ingest_rejects.csv``.
- ``metrics/landmarks.json``: counts, reject fraction, mean detection score, mean inter-ocular distance.

Incremental: when the previous table was made with the same detector/landmarker files (sha256) and the same
output-affecting params, rows and rejects of images whose (path, sha256) is unchanged are reused and only new
or changed images are processed; rows of images that left the manifest are dropped and their aligned files
deleted. Under DVC this needs ``persist: true`` on the outputs (DVC deletes outputs before running a stage).

The work is in :mod:`lafs.faces.pipeline` (one photo), :mod:`lafs.faces.pool` (many, in worker processes) and
:mod:`lafs.data.landmark_table` (the table, its reuse fingerprint and the rejects file).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lafs.config import Params
from lafs.data import images
from lafs.data.landmark_table import RowStore, fingerprint, points, read_previous, write_rejects, write_table
from lafs.faces import REASON_CODES as FACE_REASON_CODES
from lafs.faces.align import ALIGNED_SIZE, inter_ocular
from lafs.faces.dense import NUM_POINTS
from lafs.faces.pipeline import Job, LandmarksError, Models, Reject, resolve_models
from lafs.faces.pool import process_jobs
from lafs.layout import Layout
from lafs.stages import RunOptions, write_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LandmarksSummary:
    """What ``run`` did; ``metrics()`` is written to ``metrics/landmarks.json``."""

    images: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    processed: int  # images decoded and detected in this run
    reused: int  # images whose previous row or reject was kept
    detector_calls: int
    multi_face_images: int
    mean_det_score: float
    mean_inter_ocular_px: float
    dense_in_crop_fraction: float
    dense_scheme: str
    dense_points: int
    detector: str
    seconds: float = field(default=0.0, compare=False)

    @property
    def reject_fraction(self) -> float:
        return self.rejected / self.images if self.images else 0.0

    def metrics(self) -> dict[str, object]:
        # Timing and reuse counts are left out: metrics must not change when nothing changed.
        return {
            "images": self.images,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "reject_fraction": round(self.reject_fraction, 6),
            "rejected_by_reason": dict(self.rejected_by_reason),
            "multi_face_images": self.multi_face_images,
            "mean_det_score": round(self.mean_det_score, 6),
            "mean_inter_ocular_px": round(self.mean_inter_ocular_px, 4),
            "dense_in_crop_fraction": round(self.dense_in_crop_fraction, 6),
            "dense_scheme": self.dense_scheme,
            "dense_points": self.dense_points,
            "detector": self.detector,
        }

    def describe(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.rejected_by_reason.items() if v) or "none"
        rate = self.processed / self.seconds if self.seconds else 0.0
        return (
            f"landmarks: {self.accepted} of {self.images} images aligned ({self.dense_scheme}, {self.detector}); "
            f"{self.rejected} rejected ({self.reject_fraction:.1%}: {reasons}); {self.processed} processed, "
            f"{self.reused} reused in {self.seconds:.1f} s ({rate:.0f} images/s)"
        )


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> LandmarksSummary:
    """Detect, align and landmark every image of the manifest (see the module docstring); raise
    :class:`LandmarksError` when inputs/models are unusable or the rejected fraction exceeds
    ``landmarks.max_reject_fraction`` (after writing every output, so the reasons can be read)."""
    start = time.perf_counter()
    cfg, out_dir = params.landmarks, layout.root  # table paths are relative to the root
    manifest = _read_manifest(layout.manifest)
    models = resolve_models(cfg)
    fp = fingerprint(cfg, models)
    jobs = [
        Job(i, r["path"], r["identity"], r["sha256"], aligned)
        for i, (r, aligned) in enumerate(zip(manifest, _aligned_paths(manifest, layout), strict=True))
    ]
    prev_table, prev_position, prev_rejects = read_previous(layout.landmarks, layout.landmark_rejects, fp)
    prev_aligned = prev_table.column("aligned_path").to_pylist() if prev_table is not None else []
    store = RowStore(jobs, models, cfg.det_size)
    rejected: dict[int, Reject] = {}
    todo: list[Job] = []
    reuse_jobs: list[int] = []
    reuse_rows: list[int] = []
    for job in jobs:
        key = (job.path, job.sha256)
        pos = prev_position.get(key)
        if pos is not None and prev_aligned[pos] == job.aligned_path and (out_dir / job.aligned_path).is_file():
            reuse_jobs.append(job.index)
            reuse_rows.append(pos)
        elif key in prev_rejects:
            rejected[job.index] = prev_rejects[key]
        else:
            todo.append(job)
    if reuse_jobs:
        store.put_previous(reuse_jobs, prev_table, reuse_rows)
    del prev_table, prev_aligned, prev_position
    reused = len(reuse_jobs) + len(rejected)
    log.info("landmarks: %d images, %d reused, %d to process", len(jobs), reused, len(todo))
    detector_calls = 0
    for done, calls in process_jobs(todo, cfg, models, out_dir):
        detector_calls += calls
        for index, outcome in done:
            if isinstance(outcome, Reject):
                rejected[index] = outcome
            else:
                store.put(index, outcome)

    table = store.table()
    rejects = [rejected[i] for i in sorted(rejected)]
    _prune_aligned(layout, set(table.column("aligned_path").to_pylist()))
    write_table(layout.landmarks, table, cfg, fp)
    write_rejects(layout.landmark_rejects, rejects)
    summary = _summarise(table, rejects, models, len(todo), reused, detector_calls, time.perf_counter() - start)
    write_metrics(layout.metrics("landmarks"), summary.metrics())
    log.info(summary.describe())

    if summary.reject_fraction > cfg.max_reject_fraction:
        raise LandmarksError(
            f"{summary.rejected} of {summary.images} images rejected ({summary.reject_fraction:.1%}), more than "
            f"landmarks.max_reject_fraction={cfg.max_reject_fraction:.1%}. Each image's reason is in "
            f"{layout.landmark_rejects}; if the photos are fine, try a larger landmarks.det_size, a lower "
            "landmarks.det_thresh or landmarks.min_face_px, or raise landmarks.max_reject_fraction."
        )
    return summary


def _read_manifest(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise LandmarksError(f"{path} not found: run `lafs ingest` (or `dvc repro ingest`) first")
    try:
        # ParquetFile, not read_table: the latter imports pyarrow.dataset, ~0.4 s on every stage run.
        table = pq.ParquetFile(path).read()
    except (OSError, pa.ArrowInvalid) as exc:
        raise LandmarksError(f"{path} is not a readable parquet file ({exc}); rerun `lafs ingest`") from None
    missing = {"path", "identity", "sha256"} - set(table.column_names)
    if missing:
        raise LandmarksError(f"{path} lacks columns {sorted(missing)}; rerun `lafs ingest` with this version")
    rows = table.select(["path", "identity", "sha256"]).to_pylist()
    if not rows:
        raise LandmarksError(f"{path} lists no images; check ingest's source and data/ingest_rejects.csv")
    return rows


def _aligned_paths(manifest: list[dict[str, str]], layout: Layout) -> list[str]:
    """``data/aligned/<path under data/raw with suffix .png>``; full name + ``.png`` where suffixes collide."""
    raw, aligned = layout.relative(layout.raw), layout.relative(layout.aligned)

    def under_raw(p: str) -> Path:
        path = Path(p)
        try:
            return path.relative_to(raw)
        except ValueError:
            return Path(*path.parts[-2:])

    rel = [under_raw(r["path"]) for r in manifest]
    counts = Counter(p.with_suffix(".png") for p in rel)
    out = []
    for p in rel:
        target = p.with_suffix(".png")
        if counts[target] > 1:
            target = p.with_name(p.name + ".png")
        out.append((aligned / target).as_posix())
    return out


def _prune_aligned(layout: Layout, keep: set[str]) -> None:
    """Delete aligned files no row points to (images that left the manifest or are now rejected)."""
    if not layout.aligned.is_dir():
        return
    for path in sorted(layout.aligned.rglob("*"), reverse=True):
        rel = layout.relative(path).as_posix()
        if path.is_file() and rel not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _summarise(
    table: pa.Table,
    rejects: list[Reject],
    models: Models,
    processed: int,
    reused: int,
    detector_calls: int,
    seconds: float,
) -> LandmarksSummary:
    by_reason = Counter(r.reason for r in rejects)
    codes = list(FACE_REASON_CODES) + [c for c in images.REASON_CODES if c not in FACE_REASON_CODES]
    codes += sorted(set(by_reason) - set(codes))
    n = table.num_rows
    if n:
        dense = points(table, "dense").reshape(n, -1, 2)
        kps5 = points(table, "kps5").reshape(n, 5, 2)
        in_crop = float(((dense >= 0) & (dense < ALIGNED_SIZE)).all(axis=2).mean())
        eye_px = float(np.mean([inter_ocular(k) for k in kps5]))
        multi = int((table.column("num_faces").to_numpy() > 1).sum())
        score = float(table.column("det_score").to_numpy().astype(np.float64).mean())
    else:
        in_crop = eye_px = score = 0.0
        multi = 0
    return LandmarksSummary(
        images=n + len(rejects),
        accepted=n,
        rejected=len(rejects),
        rejected_by_reason={c: by_reason.get(c, 0) for c in codes if by_reason.get(c) or c in FACE_REASON_CODES},
        processed=processed,
        reused=reused,
        detector_calls=detector_calls,
        multi_face_images=multi,
        mean_det_score=score,
        mean_inter_ocular_px=eye_px,
        dense_in_crop_fraction=in_crop,
        dense_scheme=models.dense_scheme,
        dense_points=NUM_POINTS[models.dense_scheme],
        detector=models.detector_name,
        seconds=seconds,
    )
