"""``lafs embed``: photos (files, folders, ``s3://`` prefixes) -> one Parquet row per face, streamed.

Each photo is read, decoded, detected, aligned and embedded by the model's :class:`FacePipeline`; rows are written
``CHUNK`` photos at a time, so memory stays flat in the number of photos. A photo that cannot become a face
(unreadable, not an image, too large, no face, face too small) is listed in ``<out>.rejects.csv`` with its reason
code and message, never given a made-up face; the summary counts both.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lafs.data.images import UNREADABLE, ImageRejected, read_bytes
from lafs.data.sources import iter_s3
from lafs.serving.faces import FacePipeline

CHUNK = 256
SCHEMA = pa.schema(
    [
        ("photo", pa.string()),
        ("box", pa.list_(pa.float32(), 4)),
        ("keypoints", pa.list_(pa.float32(), 10)),
        ("det_score", pa.float32()),
        ("embedding", pa.list_(pa.float32())),
    ]
)
REJECT_COLUMNS = ("photo", "reason", "message")


@dataclass
class EmbedSummary:
    out: Path
    rejects: Path
    embedded: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items())) or "none"
        return (
            f"embed: {self.embedded} faces -> {self.out}; {sum(self.rejected.values())} photos rejected "
            f"({why}) -> {self.rejects}"
        )


def _missing(location: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise ImageRejected(UNREADABLE, f"{location} does not exist (not a file, folder or s3:// prefix)")

    return read


def list_photos(inputs: Sequence[str], s3_endpoint_url: str | None = None) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(location, reader) of every file named or below a named folder / S3 prefix, sorted, hidden files skipped."""
    for item in inputs:
        if item.startswith("s3://"):
            for f in iter_s3(item, endpoint_url=s3_endpoint_url):
                yield f.location, f.read
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
                    yield str(p), (lambda p=p: read_bytes(p))
        elif path.is_file():
            yield str(path), (lambda p=path: read_bytes(p))
        else:
            yield item, _missing(item)


def embed_photos(
    pipeline: FacePipeline, photos: Iterator[tuple[str, Callable[[], bytes]]], out: Path, progress: bool = True
) -> EmbedSummary:
    """Embed every photo into ``out`` (Parquet, :data:`SCHEMA`) and list the rejects next to it."""
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    summary = EmbedSummary(out, out.with_name(f"{out.stem}.rejects.csv"))
    rows: list[dict] = []
    with pq.ParquetWriter(out, SCHEMA) as writer, summary.rejects.open("w", newline="") as fh:
        rejects = csv.writer(fh)
        rejects.writerow(REJECT_COLUMNS)
        for location, read in tqdm(photos, desc="embed", unit="photo", disable=not progress):
            try:
                face = pipeline.embed(pipeline.decode(read(), location))
            except ImageRejected as exc:
                rejects.writerow((location, exc.code, exc.message))
                summary.rejected[exc.code] += 1
                continue
            rows.append({"photo": location, **face.row()})
            summary.embedded += 1
            if len(rows) >= CHUNK:
                writer.write_table(pa.Table.from_pylist(rows, SCHEMA))
                rows.clear()
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, SCHEMA))
    return summary
