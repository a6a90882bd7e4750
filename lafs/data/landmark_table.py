"""The landmarks stage's table (``data/landmarks.parquet``): its schema, the fingerprint that decides whether a
previous table's rows can be reused, a compact row store filled as worker chunks arrive, and the rejects file.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lafs.atomic import replacing
from lafs.config import LandmarksParams, resolved
from lafs.data import images
from lafs.faces.align import ALIGNED_SIZE
from lafs.faces.dense import NUM_POINTS
from lafs.faces.pipeline import Job, Models, Reject

log = logging.getLogger(__name__)


REJECT_COLUMNS = ("path", "reason", "message", "sha256")


# Bump when the meaning of an output changes, so existing tables are recomputed instead of reused.
FORMAT_VERSION = 2  # 2: dlib68 runs on a dlib-style box built from the 5 points (lafs.faces.dense.dlib_box)


FINGERPRINT_KEY = b"lafs.landmarks.fingerprint"


PARAMS_KEY = b"lafs.landmarks.params"


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


class RowStore:
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
            column[indices] = points(rows, name).reshape(len(indices), -1)

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


def read_previous(
    table_path: Path, rejects_path: Path, fp: dict[str, Any]
) -> tuple[pa.Table | None, dict[tuple[str, str], int], dict[tuple[str, str], Reject]]:
    """The previous run's table, its row position per (path, sha256), and its rejects, if it used the same
    fingerprint."""
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
    if rejects_path.is_file():
        with rejects_path.open(newline="") as fh:
            for rec in csv.DictReader(fh):
                # A file that could not be read may be back now; everything else is a property of the bytes.
                if rec.get("sha256") and rec.get("reason") != images.UNREADABLE:
                    key = (rec["path"], rec["sha256"])
                    rejects[key] = Reject(rec["path"], rec["reason"], rec["message"], rec["sha256"])
    return table, position, rejects


def write_table(path: Path, table: pa.Table, cfg: LandmarksParams, fp: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        FINGERPRINT_KEY: json.dumps(fp, sort_keys=True).encode(),
        PARAMS_KEY: json.dumps(resolved(cfg), sort_keys=True).encode(),
    }
    with replacing(path) as tmp:
        # Row groups of 4096 faces: the writer buffers one group, not the whole table, so memory stays flat.
        pq.write_table(table.replace_schema_metadata(meta), tmp, row_group_size=4096)


def write_rejects(path: Path, rejects: list[Reject]) -> None:
    with replacing(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(REJECT_COLUMNS)
        writer.writerows((r.path, r.reason, r.message, r.sha256) for r in rejects)


def points(table: pa.Table, column: str) -> np.ndarray:
    """A list<float32> column as one flat float64 array (every row of a run has the same length)."""
    return pa.concat_arrays(table.column(column).chunks).flatten().to_numpy().astype(np.float64)
