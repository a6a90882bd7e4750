"""Stage ``ingest``: copy face photos from a source into the DVC-tracked workspace, checking every file.

Outputs (paths relative to ``out_dir``, the project root under DVC):

- ``data/raw/<identity>/<file>``: accepted files, byte-for-byte copies (later stages decode them with
  :func:`lafs.data.images.load_rgb`, which applies the same EXIF rotation and mode normalisation).
- ``data/manifest.parquet``: one row per accepted image (path relative to ``out_dir``, identity, sha256,
  upright width/height, format, source_path); the resolved ``ingest`` params sit in the schema metadata.
- ``data/ingest_rejects.csv``: one row per rejected file (path, reason code, message).
- ``metrics/ingest.json``: counts, for ``dvc metrics show``.

Selection is deterministic. Identities are taken in sorted order, but those with at least
``min_images_per_identity`` files come first, so a face-recognition set is not filled with one-photo
people; if there are fewer such identities than ``max_identities`` the rest are added in sorted order.
Within an identity, files are examined in sorted order until ``max_images_per_identity`` are accepted
(an identity whose files are all rejected simply drops out; no other identity replaces it).
Rejects never stop the run; only a rejected fraction above ``max_reject_fraction`` fails it (after the
outputs, including the rejects table, are written so the reasons can be read).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lafs.config import IngestParams, resolved
from lafs.data import images
from lafs.data.images import ImageRejected
from lafs.data.sources import SourceError, SourceFile, iter_source
from lafs.stages import StageError, write_metrics

log = logging.getLogger(__name__)

RAW_DIR = Path("data/raw")
MANIFEST = Path("data/manifest.parquet")
REJECTS = Path("data/ingest_rejects.csv")
METRICS = Path("metrics/ingest.json")

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("identity", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("source_path", pa.string()),
    ]
)
REJECT_COLUMNS = ("path", "reason", "message")


class IngestError(StageError):
    """The source cannot be read, or too much of it was rejected."""


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    message: str


@dataclass(frozen=True)
class IngestSummary:
    """What ``run`` did; also written to ``metrics/ingest.json``."""

    files_examined: int
    images: int
    identities: int
    rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    identities_below_min_images: int = 0

    @property
    def reject_fraction(self) -> float:
        return self.rejected / self.files_examined if self.files_examined else 0.0

    def metrics(self) -> dict[str, object]:
        return {
            "files_examined": self.files_examined,
            "images": self.images,
            "identities": self.identities,
            "identities_below_min_images": self.identities_below_min_images,
            "rejected": self.rejected,
            "reject_fraction": round(self.reject_fraction, 6),
            "rejected_by_reason": dict(self.rejected_by_reason),
        }

    def describe(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.rejected_by_reason.items() if v) or "none"
        return (
            f"ingest: {self.images} images of {self.identities} identities from {self.files_examined} files; "
            f"{self.rejected} rejected ({self.reject_fraction:.1%}: {reasons})"
        )


def select_identities(counts: dict[str, int], max_identities: int, min_images: int) -> list[str]:
    """Sorted identities, those with ``>= min_images`` files first, cut at ``max_identities``; returned sorted."""
    names = sorted(counts)
    preferred = [n for n in names if counts[n] >= min_images]
    others = [n for n in names if counts[n] < min_images]
    return sorted((preferred + others)[:max_identities])


def run(cfg: IngestParams, out_dir: Path) -> IngestSummary:
    """Ingest ``cfg.source`` into ``out_dir`` (see the module docstring); raise :class:`IngestError` when the
    source is unusable or the rejected fraction exceeds ``cfg.max_reject_fraction``."""
    out_dir = Path(out_dir)
    try:
        files = list(iter_source(cfg.source, s3_endpoint_url=cfg.s3_endpoint_url))
    except SourceError as exc:
        raise IngestError(str(exc)) from None
    if not files:
        raise IngestError(f"source {cfg.source!r} holds no files (expected <identity>/<image> subfolders or keys)")

    rejects: list[Reject] = [
        Reject(f.location, images.BAD_LAYOUT, f"{f.location} is not in the <identity>/<image> layout")
        for f in files
        if f.identity is None
    ]
    by_identity: dict[str, list[SourceFile]] = {}
    for f in files:
        if f.identity is not None:
            by_identity.setdefault(f.identity, []).append(f)
    chosen = select_identities(
        {k: len(v) for k, v in by_identity.items()}, cfg.max_identities, cfg.min_images_per_identity
    )

    # Copy into a staging folder and swap it in at the end, so an interrupted run never leaves a
    # half-written data/raw that looks complete.
    staging = out_dir / RAW_DIR.parent / f".{RAW_DIR.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rows: list[dict[str, object]] = []
    first_seen: dict[str, str] = {}  # sha256 -> location of the accepted file with those bytes
    examined = len(rejects)
    below_min = 0
    try:
        for identity in chosen:
            accepted = 0
            for item in by_identity[identity]:
                if accepted == cfg.max_images_per_identity:
                    break
                examined += 1
                try:
                    data, row = _check(item, cfg, first_seen)
                except ImageRejected as exc:
                    rejects.append(Reject(item.location, exc.code, exc.message))
                    continue
                dest = staging / identity / item.filename
                dest.parent.mkdir(exist_ok=True)
                dest.write_bytes(data)
                rows.append({"path": (RAW_DIR / identity / item.filename).as_posix(), **row})
                accepted += 1
            below_min += 0 < accepted < cfg.min_images_per_identity
        raw = out_dir / RAW_DIR
        shutil.rmtree(raw, ignore_errors=True)
        staging.rename(raw)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    by_reason = Counter(r.reason for r in rejects)
    summary = IngestSummary(
        files_examined=examined,
        images=len(rows),
        identities=len({r["identity"] for r in rows}),
        rejected=len(rejects),
        rejected_by_reason={code: by_reason.get(code, 0) for code in images.REASON_CODES},
        identities_below_min_images=below_min,
    )
    _write_manifest(out_dir / MANIFEST, rows, cfg)
    _write_rejects(out_dir / REJECTS, rejects)
    write_metrics(out_dir / METRICS, summary.metrics())
    log.info(summary.describe())

    if summary.reject_fraction > cfg.max_reject_fraction:
        raise IngestError(
            f"{summary.rejected} of {summary.files_examined} files rejected ({summary.reject_fraction:.1%}), "
            f"more than ingest.max_reject_fraction={cfg.max_reject_fraction:.1%}. Each file's reason is in "
            f"{out_dir / REJECTS}; fix the source or raise ingest.max_reject_fraction."
        )
    if not rows:
        raise IngestError(f"no usable image in source {cfg.source!r}; see {out_dir / REJECTS}")
    return summary


def _check(item: SourceFile, cfg: IngestParams, first_seen: dict[str, str]) -> tuple[bytes, dict[str, object]]:
    """Read and fully decode one file: its bytes and manifest row, or :class:`ImageRejected`."""
    data = item.read()
    if not data:
        raise ImageRejected(images.EMPTY, f"{item.location} is empty (0 bytes)")
    digest = images.sha256_bytes(data)
    if digest in first_seen:
        raise ImageRejected(
            images.DUPLICATE, f"{item.location} has the same bytes as {first_seen[digest]} (sha256 {digest[:12]})"
        )
    decoded = images.decode_image(data, max_pixels=cfg.max_image_pixels, formats=tuple(cfg.formats), name=item.location)
    first_seen[digest] = item.location
    return data, {
        "identity": item.identity,
        "sha256": digest,
        "width": decoded.width,
        "height": decoded.height,
        "format": decoded.format,
        "source_path": item.location,
    }


def _write_manifest(path: Path, rows: list[dict[str, object]], cfg: IngestParams) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [r[name] for r in rows] for name in MANIFEST_SCHEMA.names}
    meta = {b"lafs.ingest.params": json.dumps(resolved(cfg), sort_keys=True).encode()}
    table = pa.table(columns, schema=MANIFEST_SCHEMA.with_metadata(meta))
    pq.write_table(table, path)


def _write_rejects(path: Path, rejects: list[Reject]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(REJECT_COLUMNS)
        writer.writerows((r.path, r.reason, r.message) for r in rejects)
