"""Stage ``ingest``: copy face photos from a source into the DVC-tracked workspace, checking every file.

Outputs (the :class:`~lafs.layout.Layout` paths, relative to the project root):

- ``data/raw/<identity>/<file>``: accepted files, byte-for-byte copies (later stages decode them with
  :func:`lafs.data.images.load_rgb`, which applies the same EXIF rotation and mode normalisation).
- ``data/manifest.parquet``: one row per accepted image (path relative to the project root, identity, sha256,
  upright width/height, format, source_path); the resolved ``ingest`` params sit in the schema metadata.
- ``data/ingest_rejects.csv``: one row per rejected file (path, reason code, message).
- ``data/ingest_skipped.csv``: one row per file left unread because a cap was reached (path, identity, cap
  name ``max_identities`` or ``max_images_per_identity``, cap value).
- ``metrics/ingest.json``: counts, for ``dvc metrics show``, incl. files in the source and skipped files per cap.

Selection is deterministic. Identities are taken in sorted order, but those with at least
``min_images_per_identity`` files come first, so a face-recognition set is not filled with one-photo
people; if there are fewer such identities than ``max_identities`` the rest are added in sorted order.
Within an identity, files are examined in sorted order until ``max_images_per_identity`` are accepted
(an identity whose files are all rejected simply drops out; no other identity replaces it). A cap of
``null`` means no cap.

Every file the source lists ends up in exactly one table: the manifest (accepted), the rejects (with a
reason) or the skipped list (with the cap that left it out; skipped files are never downloaded or decoded).
This is checked before anything is written, so a file can never silently vanish between source and data.
Rejects never stop the run; only a rejected fraction above ``max_reject_fraction`` fails it (after the
outputs, including the rejects table, are written so the reasons can be read).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lafs.atomic import replacing
from lafs.config import IngestParams, Params, resolved
from lafs.data import images
from lafs.data.images import ImageRejected
from lafs.data.sources import SourceError, SourceFile, iter_source
from lafs.layout import Layout
from lafs.stages import RunOptions, StageError, write_metrics

log = logging.getLogger(__name__)


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
SKIPPED_COLUMNS = ("path", "identity", "cap", "cap_value")
# The caps a file can be skipped by, named as their params keys so a reader knows what to raise.
MAX_IDENTITIES = "max_identities"
MAX_IMAGES_PER_IDENTITY = "max_images_per_identity"
CAPS = (MAX_IDENTITIES, MAX_IMAGES_PER_IDENTITY)


class IngestError(StageError):
    """The source cannot be read, too much of it was rejected, or a source file was not accounted for."""


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    message: str


@dataclass(frozen=True)
class Skip:
    """A file left unread because ``cap`` (a params key) was reached; listed so no source file goes unseen."""

    path: str
    identity: str
    cap: str
    cap_value: int


@dataclass(frozen=True)
class IngestSummary:
    """What ``run`` did; also written to ``metrics/ingest.json``."""

    files_in_source: int
    files_examined: int
    images: int
    identities: int
    rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    identities_below_min_images: int = 0
    identities_in_source: int = 0
    skipped_by_cap: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_cap.values())

    @property
    def reject_fraction(self) -> float:
        return self.rejected / self.files_examined if self.files_examined else 0.0

    def metrics(self) -> dict[str, object]:
        return {
            "files_in_source": self.files_in_source,
            "files_examined": self.files_examined,
            "images": self.images,
            "identities": self.identities,
            "identities_in_source": self.identities_in_source,
            "identities_below_min_images": self.identities_below_min_images,
            "rejected": self.rejected,
            "reject_fraction": round(self.reject_fraction, 6),
            "rejected_by_reason": dict(self.rejected_by_reason),
            "skipped": self.skipped,
            "skipped_by_cap": dict(self.skipped_by_cap),
        }

    def describe(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.rejected_by_reason.items() if v) or "none"
        caps = ", ".join(f"{k} {v}" for k, v in self.skipped_by_cap.items() if v) or "none"
        return (
            f"ingest: {self.images} images of {self.identities} identities from {self.files_examined} files; "
            f"{self.rejected} rejected ({self.reject_fraction:.1%}: {reasons}); "
            f"{self.skipped} of {self.files_in_source} source files skipped by caps ({caps})"
        )


def select_identities(counts: dict[str, int], max_identities: int | None, min_images: int) -> list[str]:
    """Sorted identities, those with ``>= min_images`` files first, cut at ``max_identities`` (``None``: all);
    returned sorted."""
    names = sorted(counts)
    preferred = [n for n in names if counts[n] >= min_images]
    others = [n for n in names if counts[n] < min_images]
    return sorted((preferred + others)[:max_identities])


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> IngestSummary:
    """Ingest ``ingest.source`` into ``layout.raw`` (see the module docstring); raise :class:`IngestError` when
    the source is unusable, a source file is in no table (or in two), or the rejected fraction exceeds
    ``ingest.max_reject_fraction``."""
    cfg = params.ingest
    files = _list_source(cfg)
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
    skipped = _skipped_identities(by_identity, chosen, cfg.max_identities)

    # Copy into a staging folder and swap it in at the end, so an interrupted run never leaves a
    # half-written data/raw that looks complete.
    staging = layout.raw.with_name(f".{layout.raw.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rows: list[dict[str, object]] = []
    first_seen: dict[str, str] = {}  # sha256 -> location of the accepted file with those bytes
    below_min = 0
    try:
        for identity in chosen:
            accepted, rejected, left = _copy_identity(
                by_identity[identity], cfg, staging, layout.relative(layout.raw), first_seen
            )
            rows += accepted
            rejects += rejected
            skipped += left
            below_min += 0 < len(accepted) < cfg.min_images_per_identity
        check_accounting(
            files, [str(r["source_path"]) for r in rows], [r.path for r in rejects], [s.path for s in skipped]
        )
        shutil.rmtree(layout.raw, ignore_errors=True)
        staging.rename(layout.raw)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    by_reason = Counter(r.reason for r in rejects)
    by_cap = Counter(s.cap for s in skipped)
    summary = IngestSummary(
        files_in_source=len(files),
        files_examined=len(rows) + len(rejects),
        images=len(rows),
        identities=len({r["identity"] for r in rows}),
        rejected=len(rejects),
        rejected_by_reason={code: by_reason.get(code, 0) for code in images.REASON_CODES},
        identities_below_min_images=below_min,
        identities_in_source=len(by_identity),
        skipped_by_cap={cap: by_cap.get(cap, 0) for cap in CAPS},
    )
    _write_manifest(layout.manifest, rows, cfg)
    _write_csv(layout.ingest_rejects, REJECT_COLUMNS, ((r.path, r.reason, r.message) for r in rejects))
    _write_csv(layout.ingest_skipped, SKIPPED_COLUMNS, ((s.path, s.identity, s.cap, s.cap_value) for s in skipped))
    write_metrics(layout.metrics("ingest"), summary.metrics())
    log.info(summary.describe())

    if summary.reject_fraction > cfg.max_reject_fraction:
        raise IngestError(
            f"{summary.rejected} of {summary.files_examined} files rejected ({summary.reject_fraction:.1%}), "
            f"more than ingest.max_reject_fraction={cfg.max_reject_fraction:.1%}. Each file's reason is in "
            f"{layout.ingest_rejects}; fix the source or raise ingest.max_reject_fraction."
        )
    if not rows:
        raise IngestError(f"no usable image in source {cfg.source!r}; see {layout.ingest_rejects}")
    return summary


def _list_source(cfg: IngestParams) -> list[SourceFile]:
    """Every file of the source, listed up front: the accounting check needs the full list to compare with."""
    try:
        files = list(iter_source(cfg.source, s3_endpoint_url=cfg.s3_endpoint_url))
    except SourceError as exc:
        raise IngestError(str(exc)) from None
    if not files:
        raise IngestError(f"source {cfg.source!r} holds no files (expected <identity>/<image> subfolders or keys)")
    return files


def _skipped_identities(
    by_identity: dict[str, list[SourceFile]], chosen: Sequence[str], max_identities: int | None
) -> list[Skip]:
    """Every file of the identities ``select_identities`` left out; only a set cap can leave one out."""
    if max_identities is None:
        return []  # every identity is chosen; check_accounting would catch one that was not
    left_out = sorted(set(by_identity) - set(chosen))
    return [Skip(f.location, name, MAX_IDENTITIES, max_identities) for name in left_out for f in by_identity[name]]


def _copy_identity(
    items: list[SourceFile], cfg: IngestParams, staging: Path, raw_rel: Path, first_seen: dict[str, str]
) -> tuple[list[dict[str, object]], list[Reject], list[Skip]]:
    """Examine one identity's files in order until ``max_images_per_identity`` are accepted, copying each
    accepted file into ``staging`` (``raw_rel`` once swapped in): (manifest rows, rejects, skips).

    The cap counts accepted images, not files read, so a broken file does not cost an identity a photo;
    the files after the cap is reached are listed as skipped without being read (no S3 download).
    """
    rows: list[dict[str, object]] = []
    rejects: list[Reject] = []
    cap = cfg.max_images_per_identity
    for n, item in enumerate(items):
        if cap is not None and len(rows) == cap:
            left = [Skip(i.location, str(i.identity), MAX_IMAGES_PER_IDENTITY, cap) for i in items[n:]]
            return rows, rejects, left
        try:
            data, row = _check(item, cfg, first_seen)
        except ImageRejected as exc:
            rejects.append(Reject(item.location, exc.code, exc.message))
            continue
        dest = staging / str(item.identity) / item.filename
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(data)
        rows.append({"path": (raw_rel / str(item.identity) / item.filename).as_posix(), **row})
    return rows, rejects, []


def check_accounting(
    files: Sequence[SourceFile], accepted: Iterable[str], rejected: Iterable[str], skipped: Iterable[str]
) -> None:
    """Raise :class:`IngestError` unless each source file is accepted, rejected or skipped exactly once.

    Counts alone could balance a file counted twice against one lost, so locations are compared.
    """
    outcomes = {"accepted": list(accepted), "rejected": list(rejected), "skipped": list(skipped)}
    source = Counter(f.location for f in files)
    seen = Counter(loc for locs in outcomes.values() for loc in locs)
    missing = sorted((source - seen).elements())
    extra = sorted((seen - source).elements())
    if not missing and not extra:
        return
    tally = " + ".join(f"{len(v)} {k}" for k, v in outcomes.items())
    raise IngestError(
        f"ingest lost track of source files: {len(files)} files in the source but {tally} = "
        f"{sum(seen.values())}; in no table: {missing[:5]} ({len(missing)} in all); counted twice or not "
        f"in the source: {extra[:5]} ({len(extra)} in all). Nothing was written. This is a bug in "
        "lafs/stages/ingest.py: please report it with this message."
    )


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
    columns = {name: [r[name] for r in rows] for name in MANIFEST_SCHEMA.names}
    meta = {b"lafs.ingest.params": json.dumps(resolved(cfg), sort_keys=True).encode()}
    table = pa.table(columns, schema=MANIFEST_SCHEMA.with_metadata(meta))
    _replace_atomically(path, lambda tmp: pq.write_table(table, tmp))


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(rows)

    _replace_atomically(path, write)


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temp file beside ``path``, then rename it over ``path``: a killed run leaves the previous
    table whole instead of a truncated one that DVC or the next stage would read as complete."""
    with replacing(path) as tmp:
        write(tmp)
