"""Stage ``landmarks``: one aligned face and its landmarks per ingested photo.

For each image of ``data/manifest.parquet`` (decoded with :func:`lafs.data.images.load_rgb`): SCRFD
finds faces with 5 keypoints (:mod:`lafs.faces.detect`), ``landmarks.policy`` keeps one, the photo is warped
to the 112x112 ArcFace template (:mod:`lafs.faces.align`) and a dense landmark set is measured on the
original photo and mapped into the aligned frame (:mod:`lafs.faces.dense`).

Outputs (paths relative to ``out_dir``, the project root under DVC):

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

Parallel: work goes in equal chunks to ``landmarks.workers`` forked processes, each loading the models once
with one ONNX Runtime thread and running a chunk in two passes (detection and alignment, then dense landmarks).
Fork where safe: workers inherit the imported modules (insightface alone takes ~1 s) and dlib's predictor
(~1 s to load, ~100 MB shared copy-on-write) instead of each paying for them again; the parent's objects are
frozen out of garbage collection meanwhile (:func:`_frozen_heap`) so that workers do not copy them either.
OpenCV's thread pool is stopped while forking (see :func:`_no_opencv_threads`); in a process that already
imported torch (its OpenMP pool does not survive a fork) workers are spawned instead.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lafs.atomic import replacing, write_bytes
from lafs.config import LandmarksParams, resolved
from lafs.data import images
from lafs.data.images import ImageRejected, file_sha256
from lafs.faces import PROCESSING_ERROR, FaceModelError
from lafs.faces import REASON_CODES as FACE_REASON_CODES
from lafs.faces.align import ALIGNED_SIZE, align_face, inter_ocular, transform_points
from lafs.faces.dense import DLIB68, NUM_POINTS, DenseLandmarker, load_landmarker, resolve_scheme
from lafs.faces.detect import Face, FaceDetector, find_detector_file, find_pack, select_face
from lafs.stages import StageError, write_metrics

log = logging.getLogger(__name__)

MANIFEST = Path("data/manifest.parquet")
RAW_DIR = Path("data/raw")
ALIGNED_DIR = Path("data/aligned")
TABLE = Path("data/landmarks.parquet")
REJECTS = Path("data/rejects.csv")
METRICS = Path("metrics/landmarks.json")
REJECT_COLUMNS = ("path", "reason", "message", "sha256")
# Bump when the meaning of an output changes, so existing tables are recomputed instead of reused.
FORMAT_VERSION = 2  # 2: dlib68 runs on a dlib-style box built from the 5 points (lafs.faces.dense.dlib_box)
FINGERPRINT_KEY = b"lafs.landmarks.fingerprint"
PARAMS_KEY = b"lafs.landmarks.params"
# Decoded photos a worker keeps between a chunk's detection and dense-landmark passes (~100 MB of RGB at most).
HELD_PIXELS = 32_000_000

SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # manifest path of the raw photo, relative to the project root
        ("identity", pa.string()),
        ("sha256", pa.string()),  # of the raw file (from the manifest)
        ("aligned_path", pa.string()),  # relative to the project root
        ("num_faces", pa.int32()),  # faces above det_thresh
        ("face_index", pa.int32()),  # the kept face, in detector order (highest score first)
        ("det_score", pa.float32()),
        ("bbox", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 (original pixels)
        ("kps5", pa.list_(pa.float32(), 10)),  # eyes, nose, mouth corners (original pixels)
        ("kps5_aligned", pa.list_(pa.float32(), 10)),  # same points in the aligned crop
        ("dense", pa.list_(pa.float32())),  # 2K values in the aligned crop (K = 68 or 106)
        ("dense_scheme", pa.string()),  # dlib68 | insightface106
        ("detector", pa.string()),  # <pack>/<file>
        ("detector_sha256", pa.string()),
        ("landmarker_sha256", pa.string()),
        ("det_size", pa.int32()),
    ]
)


POINT_COLUMNS = ("bbox", "kps5", "kps5_aligned", "dense")


class LandmarksError(StageError):
    """The manifest or models are unusable, or too many images were rejected."""


@dataclass(frozen=True)
class Models:
    """Resolved model files; plain data so it can be sent to worker processes."""

    detector_path: Path
    detector_name: str
    detector_sha256: str
    dense_scheme: str
    landmarker_path: Path
    landmarker_sha256: str


@dataclass(frozen=True)
class Job:
    index: int
    path: str
    identity: str
    sha256: str
    aligned_path: str


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    message: str
    sha256: str


@dataclass(frozen=True)
class _Aligned:
    """A photo whose face is detected and aligned, waiting for its dense landmarks (second pass of a chunk)."""

    job: Job
    rgb: np.ndarray
    face: Face
    num_faces: int
    index: int
    matrix: np.ndarray


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


def resolve_models(cfg: LandmarksParams) -> Models:
    """Find the detector and dense-landmark files named by ``cfg`` and hash them."""
    try:
        pack = find_pack(cfg.models_root, cfg.detector)
        detector = find_detector_file(pack, cfg.detector_file)
        scheme, landmarker = resolve_scheme(cfg.dense, pack)
    except FaceModelError as exc:
        raise LandmarksError(str(exc)) from None
    return Models(
        detector_path=detector,
        detector_name=f"{cfg.detector}/{detector.name}",
        detector_sha256=file_sha256(detector),
        dense_scheme=scheme,
        landmarker_path=landmarker,
        landmarker_sha256=file_sha256(landmarker),
    )


def fingerprint(cfg: LandmarksParams, models: Models) -> dict[str, Any]:
    """Everything that changes an output row; a previous table is reused only when this is equal."""
    return {
        "format": FORMAT_VERSION,
        "aligned_size": ALIGNED_SIZE,
        "detector_sha256": models.detector_sha256,
        "landmarker_sha256": models.landmarker_sha256,
        "dense_scheme": models.dense_scheme,
        "det_size": cfg.det_size,
        "det_thresh": cfg.det_thresh,
        "min_face_px": cfg.min_face_px,
        "policy": cfg.policy,
    }


class FacePipeline:
    """Models loaded once (per worker process) and applied to a chunk of photos at a time."""

    def __init__(
        self, cfg: LandmarksParams, models: Models, threads: int = 0, landmarker: DenseLandmarker | None = None
    ):
        try:
            self.detector = FaceDetector(
                models.detector_path, det_size=cfg.det_size, det_thresh=cfg.det_thresh, threads=threads
            )
            self.landmarker = landmarker or load_landmarker(
                models.dense_scheme, models.landmarker_path, threads=threads
            )
        except FaceModelError as exc:
            raise LandmarksError(str(exc)) from None
        self.cfg = cfg

    def process(self, job: Job, out_dir: Path) -> dict[str, Any]:
        """The face's numbers for ``job`` (the aligned PNG is written), or :class:`ImageRejected`. Only what
        varies per face: :class:`_RowStore` takes the paths from the job and the model/param columns from the run."""
        return self.landmark(self.align(job, out_dir))

    def align(self, job: Job, out_dir: Path) -> _Aligned:
        """Decode, detect, choose the face and write its aligned PNG (:class:`ImageRejected` when there is none)."""
        import cv2

        rgb = images.load_rgb(out_dir / job.path)
        faces = self.detector.detect(rgb)
        index = select_face(faces, (rgb.shape[1], rgb.shape[0]), self.cfg.policy, self.cfg.min_face_px)
        crop, matrix = align_face(rgb, faces[index].kps)
        ok, png = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"PNG encoding of the aligned face of {job.path} failed")
        write_bytes(out_dir / job.aligned_path, png.tobytes())
        return _Aligned(job, rgb, faces[index], len(faces), index, matrix)

    def landmark(self, item: _Aligned) -> dict[str, Any]:
        """The table numbers of an aligned face, its dense landmarks measured on the original photo."""
        face, matrix = item.face, item.matrix
        dense = transform_points(self.landmarker(item.rgb, face), matrix)
        return {
            "num_faces": item.num_faces,
            "face_index": item.index,
            "det_score": face.score,
            # float32 arrays, not lists: cheaper to pickle back to the parent
            "bbox": face.bbox.astype(np.float32),
            "kps5": face.kps.astype(np.float32).ravel(),
            "kps5_aligned": transform_points(face.kps, matrix).astype(np.float32).ravel(),
            "dense": dense.astype(np.float32).ravel(),
        }

    def process_chunk(self, jobs: list[Job], out_dir: Path) -> tuple[list[tuple[int, dict | Reject]], int]:
        """Outcomes of ``jobs`` (row or reject, by job index) and the detector calls made.

        Two passes: every photo is detected and aligned first, then every dense landmark call runs. The results
        are those of one photo at a time, ~8% sooner: dlib's 100 MB of regression trees and the detector's working
        set no longer push each other out of the CPU cache between photos (dlib 2.9 -> 1.8 ms per photo in one
        process; benchmarks/RESULTS.md). Decoded photos wait between the passes only up to :data:`HELD_PIXELS`.
        """
        before = self.detector.calls
        outcomes: list[tuple[int, dict | Reject]] = []
        held: list[_Aligned] = []
        held_pixels = 0
        for job in jobs:
            item = self._guarded(job, self.align, job, out_dir)
            if isinstance(item, Reject):
                outcomes.append((job.index, item))
                continue
            held.append(item)
            held_pixels += item.rgb.shape[0] * item.rgb.shape[1]
            if held_pixels >= HELD_PIXELS:
                outcomes += [(i.job.index, self._guarded(i.job, self.landmark, i)) for i in held]
                held, held_pixels = [], 0
        outcomes += [(i.job.index, self._guarded(i.job, self.landmark, i)) for i in held]
        return outcomes, self.detector.calls - before

    @staticmethod
    def _guarded(job: Job, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``, or the :class:`Reject` of ``job`` when it raises."""
        try:
            return step(*args)
        except ImageRejected as exc:
            return Reject(job.path, exc.code, exc.message, job.sha256)
        except Exception as exc:  # one odd photo must not stop the others; the reject fraction still guards
            log.exception("landmarks: unexpected failure on %s", job.path)
            message = f"{type(exc).__name__}: {exc} (a bug? the traceback is in the stage log)"
            return Reject(job.path, PROCESSING_ERROR, message, job.sha256)


class _RowStore:
    """The table's per-face numbers in numpy columns preallocated for every job, filled as chunks arrive.

    ~650 bytes per image where a Python dict per row took ~2 KB and many small Arrow tables more still, so the
    parent's memory stays nearly flat as the manifest grows (benchmarks/landmarks.py measures 1x vs 10x). Path
    columns come from the jobs; the model/param columns are the same for every row of a run (the fingerprint
    guarantees it for reused rows), so neither is stored per row.
    """

    NUMBERS = (("num_faces", np.int32), ("face_index", np.int32), ("det_score", np.float32))
    POINTS = (("bbox", 4), ("kps5", 10), ("kps5_aligned", 10))

    def __init__(self, jobs: list[Job], models: Models, det_size: int) -> None:
        n, dense = len(jobs), 2 * NUM_POINTS[models.dense_scheme]
        self.jobs = jobs
        self.accepted = np.zeros(n, dtype=bool)
        self.numbers = {name: np.zeros(n, dtype) for name, dtype in self.NUMBERS}
        self.points = {name: np.zeros((n, size), np.float32) for name, size in (*self.POINTS, ("dense", dense))}
        self.constants = {
            "dense_scheme": models.dense_scheme,
            "detector": models.detector_name,
            "detector_sha256": models.detector_sha256,
            "landmarker_sha256": models.landmarker_sha256,
            "det_size": det_size,
        }

    def put(self, index: int, row: dict[str, Any]) -> None:
        self.accepted[index] = True
        for name, column in self.numbers.items():
            column[index] = row[name]
        for name, column in self.points.items():
            column[index] = np.asarray(row[name], dtype=np.float32).ravel()

    def put_previous(self, indices: list[int], previous: pa.Table, positions: list[int]) -> None:
        """Rows ``positions`` of the previous run's table, as the jobs ``indices``."""
        rows = previous.take(pa.array(positions, pa.int64()))
        self.accepted[indices] = True
        for name, column in self.numbers.items():
            column[indices] = rows.column(name).to_numpy()
        for name, column in self.points.items():
            column[indices] = _points(rows, name).reshape(len(indices), -1)

    def table(self) -> pa.Table:
        keep = np.flatnonzero(self.accepted)
        jobs = [self.jobs[i] for i in keep]
        columns: dict[str, pa.Array] = {
            name: pa.array([getattr(job, name) for job in jobs], pa.string())
            for name in ("path", "identity", "sha256", "aligned_path")
        }
        columns |= {name: pa.array(column[keep]) for name, column in self.numbers.items()}
        for name, column in self.points.items():
            values, width = pa.array(column[keep].ravel()), column.shape[1]
            if pa.types.is_fixed_size_list(SCHEMA.field(name).type):
                columns[name] = pa.FixedSizeListArray.from_arrays(values, width)
            else:
                columns[name] = pa.ListArray.from_arrays(pa.array(np.arange(len(keep) + 1) * width, pa.int32()), values)
        columns |= {
            name: pa.array([value] * len(keep), SCHEMA.field(name).type) for name, value in self.constants.items()
        }
        return pa.table([columns[name] for name in SCHEMA.names], schema=SCHEMA)


_WORKER: FacePipeline | None = None
# dlib's predictor, loaded by the parent before forking: workers share its ~100 MB copy-on-write and skip
# the ~1 s load. (ONNX Runtime sessions are never shared across fork: each worker makes its own.)
_INHERITED_LANDMARKER: DenseLandmarker | None = None


def _init_worker(cfg: LandmarksParams, models: Models, threads: int) -> None:
    global _WORKER
    import cv2

    cv2.setNumThreads(1)  # the process is the unit of parallelism (the parent's pool is stopped before forking)
    _WORKER = FacePipeline(cfg, models, threads=threads, landmarker=_INHERITED_LANDMARKER)


def _work(jobs: list[Job], out_dir: Path) -> tuple[list[tuple[int, dict | Reject]], int]:
    assert _WORKER is not None, "worker used before its initializer ran"
    return _WORKER.process_chunk(jobs, out_dir)


def run(cfg: LandmarksParams, out_dir: Path) -> LandmarksSummary:
    """Detect, align and landmark every image of the manifest under ``out_dir`` (see the module docstring);
    raise :class:`LandmarksError` when inputs/models are unusable or the rejected fraction exceeds
    ``cfg.max_reject_fraction`` (after writing every output, so the reasons can be read)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir / MANIFEST)
    models = resolve_models(cfg)
    fp = fingerprint(cfg, models)
    jobs = [
        Job(i, r["path"], r["identity"], r["sha256"], aligned)
        for i, (r, aligned) in enumerate(zip(manifest, _aligned_paths(manifest), strict=True))
    ]
    prev_table, prev_position, prev_rejects = _previous(out_dir, fp)
    prev_aligned = prev_table.column("aligned_path").to_pylist() if prev_table is not None else []
    store = _RowStore(jobs, models, cfg.det_size)
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
    for done, calls in _process(todo, cfg, models, out_dir):
        detector_calls += calls
        for index, outcome in done:
            if isinstance(outcome, Reject):
                rejected[index] = outcome
            else:
                store.put(index, outcome)

    table = store.table()
    rejects = [rejected[i] for i in sorted(rejected)]
    _prune_aligned(out_dir, set(table.column("aligned_path").to_pylist()))
    _write_table(out_dir / TABLE, table, cfg, fp)
    _write_rejects(out_dir / REJECTS, rejects)
    summary = _summarise(table, rejects, models, len(todo), reused, detector_calls, time.perf_counter() - start)
    write_metrics(out_dir / METRICS, summary.metrics())
    log.info(summary.describe())

    if summary.reject_fraction > cfg.max_reject_fraction:
        raise LandmarksError(
            f"{summary.rejected} of {summary.images} images rejected ({summary.reject_fraction:.1%}), more than "
            f"landmarks.max_reject_fraction={cfg.max_reject_fraction:.1%}. Each image's reason is in "
            f"{out_dir / REJECTS}; if the photos are fine, try a larger landmarks.det_size, a lower "
            "landmarks.det_thresh or landmarks.min_face_px, or raise landmarks.max_reject_fraction."
        )
    return summary


def _process(
    todo: list[Job], cfg: LandmarksParams, models: Models, out_dir: Path
) -> Iterator[tuple[list[tuple[int, dict | Reject]], int]]:
    """Run the pipeline over ``todo`` in-process (one worker) or in a pool of forked workers,
    yielding each chunk's outcomes (by job index) and detector calls as it completes, in order."""
    if not todo:
        return
    workers = max(1, min(cfg.workers, math.ceil(len(todo) / 2)))
    chunks = _chunks(todo, cfg.chunk_size, workers)
    if workers == 1:  # otherwise len(todo) >= 2 * workers - 1, and _chunks gives every worker a chunk
        pipeline = FacePipeline(cfg, models, threads=1)  # more ORT threads only spin when cores are busy
        for chunk in chunks:
            yield pipeline.process_chunk(chunk, out_dir)
        return
    global _INHERITED_LANDMARKER
    threads = max(1, (os.cpu_count() or 1) // workers)
    # fork is unsafe on macOS, absent on Windows, and deadlocks children when this process already runs an
    # OpenMP thread pool (torch imported: e.g. under pytest, or called from a training process); the `lafs
    # landmarks` CLI never imports torch, so it keeps the fast fork path.
    method = "fork" if sys.platform.startswith("linux") and "torch" not in sys.modules else "spawn"
    if method == "fork":
        # Done once here so forked workers inherit them instead of each paying ~1 s for the import and the load.
        import insightface.model_zoo  # noqa: F401

        if models.dense_scheme == DLIB68:
            try:
                _INHERITED_LANDMARKER = load_landmarker(DLIB68, models.landmarker_path)
            except FaceModelError as exc:
                raise LandmarksError(str(exc)) from None
    try:
        with (
            _no_opencv_threads(),
            _frozen_heap() if method == "fork" else nullcontext(),
            ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(cfg, models, threads),
            ) as pool,
        ):
            yield from pool.map(_work, chunks, [out_dir] * len(chunks))
    except BrokenProcessPool as exc:
        raise LandmarksError(
            f"a landmarks worker process died ({exc}); the log above shows why (a model that fails to load, "
            "or memory); landmarks.workers=1 runs everything in this process with a plain traceback"
        ) from None
    finally:
        _INHERITED_LANDMARKER = None


def _chunks(todo: list[Job], size: int, workers: int) -> list[list[Job]]:
    """``todo`` in order, cut into a multiple of ``workers`` chunks of at most ``size`` jobs whose sizes differ by
    at most one, so the workers run out of work together. Cut at ``size`` with a short last chunk, the workers'
    shares could differ by up to a chunk, ~1 s of one idle core (1,764 photos: 13 x 128 + 100)."""
    count = workers * math.ceil(len(todo) / (workers * size))
    bounds = [i * len(todo) // count for i in range(count + 1)]
    return [todo[a:b] for a, b in pairwise(bounds) if b > a]


@contextmanager
def _no_opencv_threads() -> Iterator[None]:
    """Stop OpenCV's thread pool while workers are forked, restore it afterwards.

    A child forked while the parent's OpenCV pool has threads inherits the pool's state but not its threads:
    its first OpenCV call that touches the pool (even ``cv2.setNumThreads``) waits for them forever. Seen in
    tests, where the parent had already resized images.
    """
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep this process's objects out of garbage collection while workers are forked from it (``gc.freeze``).

    A forked worker's collector otherwise walks every object it inherited and writes to each header, copying
    those pages: at 17,640 photos (the jobs and manifest of 10x the shared set) each worker grew from 44 to
    67 MB of unique memory within seconds; frozen, both stay at 44 MB (benchmarks/RESULTS.md).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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


def _aligned_paths(manifest: list[dict[str, str]]) -> list[str]:
    """``data/aligned/<path under data/raw with suffix .png>``; full name + ``.png`` where suffixes collide."""

    def under_raw(p: str) -> Path:
        path = Path(p)
        try:
            return path.relative_to(RAW_DIR)
        except ValueError:
            return Path(*path.parts[-2:])

    rel = [under_raw(r["path"]) for r in manifest]
    counts = Counter(p.with_suffix(".png") for p in rel)
    out = []
    for p in rel:
        target = p.with_suffix(".png")
        if counts[target] > 1:
            target = p.with_name(p.name + ".png")
        out.append((ALIGNED_DIR / target).as_posix())
    return out


def _previous(
    out_dir: Path, fp: dict[str, Any]
) -> tuple[pa.Table | None, dict[tuple[str, str], int], dict[tuple[str, str], Reject]]:
    """The previous run's table, its row position per (path, sha256), and its rejects, if it used the same
    fingerprint."""
    table_path = out_dir / TABLE
    if not table_path.is_file():
        return None, {}, {}
    try:
        table = pq.ParquetFile(table_path).read()
        meta = table.schema.metadata or {}
        previous_fp = json.loads(meta.get(FINGERPRINT_KEY, b"null"))
    except (OSError, pa.ArrowInvalid, json.JSONDecodeError) as exc:
        log.warning("landmarks: ignoring unreadable previous %s (%s)", table_path, exc)
        return None, {}, {}
    if previous_fp != fp or table.schema.remove_metadata() != SCHEMA:
        log.info("landmarks: models or params changed since the previous run; processing every image")
        return None, {}, {}
    table = table.replace_schema_metadata(None)
    keys = zip(table.column("path").to_pylist(), table.column("sha256").to_pylist(), strict=True)
    position = {key: i for i, key in enumerate(keys)}
    rejects: dict[tuple[str, str], Reject] = {}
    rejects_path = out_dir / REJECTS
    if rejects_path.is_file():
        with rejects_path.open(newline="") as fh:
            for rec in csv.DictReader(fh):
                # A file that could not be read may be back now; everything else is a property of the bytes.
                if rec.get("sha256") and rec.get("reason") != images.UNREADABLE:
                    key = (rec["path"], rec["sha256"])
                    rejects[key] = Reject(rec["path"], rec["reason"], rec["message"], rec["sha256"])
    return table, position, rejects


def _prune_aligned(out_dir: Path, keep: set[str]) -> None:
    """Delete aligned files no row points to (images that left the manifest or are now rejected)."""
    root = out_dir / ALIGNED_DIR
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), reverse=True):
        rel = path.relative_to(out_dir).as_posix()
        if path.is_file() and rel not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _write_table(path: Path, table: pa.Table, cfg: LandmarksParams, fp: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        FINGERPRINT_KEY: json.dumps(fp, sort_keys=True).encode(),
        PARAMS_KEY: json.dumps(resolved(cfg), sort_keys=True).encode(),
    }
    with replacing(path) as tmp:
        # Row groups of 4096 faces: the writer buffers one group, not the whole table, so memory stays flat.
        pq.write_table(table.replace_schema_metadata(meta), tmp, row_group_size=4096)


def _write_rejects(path: Path, rejects: list[Reject]) -> None:
    with replacing(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(REJECT_COLUMNS)
        writer.writerows((r.path, r.reason, r.message, r.sha256) for r in rejects)


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
        dense = _points(table, "dense").reshape(n, -1, 2)
        kps5 = _points(table, "kps5").reshape(n, 5, 2)
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


def _points(table: pa.Table, column: str) -> np.ndarray:
    """A list<float32> column as one flat float64 array (every row of a run has the same length)."""
    return pa.concat_arrays(table.column(column).chunks).flatten().to_numpy().astype(np.float64)
