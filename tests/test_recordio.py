"""insightface RecordIO packs (``train.rec`` + ``train.idx`` + ``property``) without MXNet: a pack written from shared
photos reads back byte for byte, and ingest takes it as a source like a folder."""

from __future__ import annotations

import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lafs.config import IngestParams, Params
from lafs.data.recordio import HEADER, MAGIC, RecordIOError, index_offsets, read_records, write_records
from lafs.data.sources import SourceError, iter_source
from lafs.layout import Layout
from lafs.stages import ingest


@pytest.fixture
def faces(lfw_subset: Path) -> list[tuple[int, bytes, str]]:
    """(label, JPEG bytes, source name) of 3 people x up to 3 shared photos, grouped by label."""
    people = sorted(p for p in lfw_subset.iterdir() if len(list(p.glob("*.jpg"))) >= 3)[:3]
    return [(label, f.read_bytes(), f.name) for label, p in enumerate(people) for f in sorted(p.glob("*.jpg"))[:3]]


def test_a_written_pack_reads_back_identically(faces, tmp_path):
    rec = write_records(tmp_path / "train.rec", [(label, image) for label, image, _ in faces])
    got = list(read_records(rec))
    assert [(r.key, r.label, r.image) for r in got] == [(k, lab, img) for k, (lab, img, _) in enumerate(faces, 1)]
    assert (tmp_path / "property").read_text().strip() == "3,112,112"
    # the layout insightface writes: header record 0 -> [first identity record, end], then one record per identity
    offsets = index_offsets(rec)
    assert len(offsets) == 1 + len(faces) + 3
    data = rec.read_bytes()
    magic, _ = struct.unpack_from("<II", data, 0)
    flag, _, _, _ = HEADER.unpack_from(data, 8)
    assert magic == MAGIC and flag == 2 and struct.unpack_from("<2f", data, 8 + HEADER.size) == (10.0, 13.0)
    # without the .idx the records are found by a scan, with the same result
    rec.with_suffix(".idx").unlink()
    assert [(r.key, r.label, r.image) for r in read_records(rec)] == [(r.key, r.label, r.image) for r in got]


def test_bad_packs_fail_with_a_reason(tmp_path):
    bad = tmp_path / "bad.rec"
    bad.write_bytes(b"not a record file at all")
    with pytest.raises(RecordIOError, match="no RecordIO record at byte 0"):
        list(read_records(bad))
    with pytest.raises(SourceError, match=r"cannot list .*bad\.rec"):
        list(iter_source(str(bad)))
    with pytest.raises(SourceError, match="not found"):
        list(iter_source(str(tmp_path / "missing.rec")))
    with pytest.raises(RecordIOError, match="sorted by label"):
        write_records(tmp_path / "x.rec", [(1, b"a"), (0, b"b")])


def test_ingest_takes_a_pack_as_its_source(faces, tmp_path):
    """Every record becomes id<label>/<key>.jpg in data/raw, byte for byte; a broken record is a reject with a
    reason, not a crash, and the accounting still closes."""
    images = [(label, image) for label, image, _ in faces]
    images[4] = (images[4][0], b"\xff\xd8 truncated jpeg")
    (tmp_path / "pack").mkdir()
    rec = write_records(tmp_path / "pack" / "train.rec", images)
    root = tmp_path / "project"
    summary = ingest.run(Params(ingest=IngestParams(source=str(rec), max_reject_fraction=0.5)), Layout(root))
    assert (summary.files_in_source, summary.images, summary.rejected) == (len(faces), len(faces) - 1, 1)
    assert summary.identities == 3
    rows = pq.read_table(Layout(root).manifest).to_pylist()
    by_path = {r["path"]: r for r in rows}
    for key, (label, image) in enumerate(images, 1):
        path = f"data/raw/id{label:07d}/{key:09d}.jpg"
        if key == 5:
            assert path not in by_path
        else:
            assert (root / path).read_bytes() == image and by_path[path]["source_path"] == f"{rec}#{key}"
    rejects = Layout(root).ingest_rejects.read_text()
    assert f"{rec}#5" in rejects
