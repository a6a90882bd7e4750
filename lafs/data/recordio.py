"""insightface's packed face datasets (MS1MV3, Glint360K, WebFace: ``train.rec`` + ``train.idx`` + ``property``),
read and written without MXNet.

The format is MXNet's RecordIO: each record is ``magic (uint32 0xced7230a) | lrecord (uint32: continuation flag in
the top 3 bits, length in the low 29) | data``, padded to 4 bytes; ``train.idx`` holds ``key<TAB>byte offset``
lines. A record's data is an ``IRHeader`` (``flag uint32, label float32, id uint64, id2 uint64``; with ``flag > 0``
``flag`` float32 labels follow it) and then the encoded image. insightface's files start with a header record
(key 0, ``flag > 0``, labels ``[first identity record, end]``): the images are keys ``1 .. labels[0] - 1`` and the
records from ``labels[0]`` on describe identities, not images. ``property`` is ``num_classes,height,width``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0xCED7230A
HEADER = struct.Struct("<IfQQ")  # IRHeader: flag, label, id, id2
_PREFIX = struct.Struct("<II")  # magic, lrecord
_LENGTH_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """The file is not RecordIO as insightface writes it (bad magic, truncated record, split records)."""


@dataclass(frozen=True)
class FaceRecord:
    key: int
    label: int  # the identity's class index
    image: bytes  # the encoded photo (JPEG in insightface's files)


def index_offsets(rec: Path) -> dict[int, int]:
    """key -> byte offset from ``<name>.idx``; without one, from a scan of the records."""
    idx = rec.with_suffix(".idx")
    if idx.is_file():
        pairs = (line.split("\t") for line in idx.read_text().splitlines() if line.strip())
        return {int(k): int(v) for k, v in pairs}
    offsets, key = {}, 0
    with rec.open("rb") as fh:
        while True:
            offset = fh.tell()
            prefix = fh.read(_PREFIX.size)
            if not prefix:
                return offsets
            _, lrecord = _check_prefix(prefix, rec, offset)
            fh.seek(_padded(lrecord & _LENGTH_MASK), 1)
            offsets[key], key = offset, key + 1


def _padded(length: int) -> int:
    return (length + 3) // 4 * 4


def _check_prefix(prefix: bytes, rec: Path, offset: int) -> tuple[int, int]:
    if len(prefix) < _PREFIX.size:
        raise RecordIOError(f"{rec}: truncated record header at byte {offset}")
    magic, lrecord = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise RecordIOError(f"{rec}: no RecordIO record at byte {offset} (magic {magic:#x}); is it a .rec file?")
    if lrecord >> 29:
        raise RecordIOError(f"{rec}: record at byte {offset} is split across parts (images over 512 MB?)")
    return magic, lrecord


def _read_record(fh, rec: Path, offset: int) -> bytes:
    fh.seek(offset)
    _, lrecord = _check_prefix(fh.read(_PREFIX.size), rec, offset)
    data = fh.read(lrecord & _LENGTH_MASK)
    if len(data) != lrecord & _LENGTH_MASK:
        raise RecordIOError(f"{rec}: record at byte {offset} is truncated")
    return data


def _unpack(data: bytes) -> tuple[int, tuple[float, ...], bytes]:
    """(flag, labels, image) of a record's data."""
    flag, label, _, _ = HEADER.unpack_from(data)
    body = data[HEADER.size :]
    if flag == 0:
        return flag, (label,), body
    return flag, struct.unpack_from(f"<{flag}f", body), body[4 * flag :]


def image_keys(rec: Path, offsets: dict[int, int]) -> list[int]:
    """The keys of the image records (after insightface's header record, before its identity records)."""
    keys = sorted(offsets)
    if not keys:
        return []
    with rec.open("rb") as fh:
        flag, labels, _ = _unpack(_read_record(fh, rec, offsets[keys[0]]))
    if keys[0] == 0 and flag > 0 and len(labels) >= 2:  # the header record: images are 1 .. labels[0] - 1
        return [k for k in keys if 0 < k < int(labels[0])]
    return keys


def read_records(rec: str | Path, keys: Sequence[int] | None = None) -> Iterator[FaceRecord]:
    """The face records of ``rec`` (all image records, or ``keys``), in key order, one at a time."""
    rec = Path(rec)
    if not rec.is_file():
        raise RecordIOError(f"{rec} not found")
    offsets = index_offsets(rec)
    wanted = image_keys(rec, offsets) if keys is None else list(keys)
    with rec.open("rb") as fh:
        for key in wanted:
            if key not in offsets:
                raise RecordIOError(f"{rec}: key {key} is not in its index")
            _, labels, image = _unpack(_read_record(fh, rec, offsets[key]))
            yield FaceRecord(key, int(labels[0]), image)


def labels_at(rec: Path, offsets: dict[int, int], keys: Sequence[int]) -> dict[int, int]:
    """key -> class label, reading only each record's header (not the image): what listing a source needs."""
    out = {}
    with rec.open("rb") as fh:
        for key in keys:
            fh.seek(offsets[key] + _PREFIX.size)
            head = fh.read(HEADER.size + 4)
            flag, label, _, _ = HEADER.unpack_from(head)
            out[key] = int(label if flag == 0 else struct.unpack_from("<f", head, HEADER.size)[0])
    return out


def read_image(rec: str | Path, offset: int) -> bytes:
    """The encoded image of the record at ``offset`` (what a lazily read source item needs)."""
    rec = Path(rec)
    with rec.open("rb") as fh:
        return _unpack(_read_record(fh, rec, offset))[2]


def _record(data: bytes) -> bytes:
    if len(data) > _LENGTH_MASK:
        raise RecordIOError(f"a record of {len(data)} bytes needs split records, which this writer does not make")
    return _PREFIX.pack(MAGIC, len(data)) + data + b"\0" * (_padded(len(data)) - len(data))


def write_records(rec: str | Path, faces: Sequence[tuple[int, bytes]], size: tuple[int, int] = (112, 112)) -> Path:
    """Write ``(label, encoded image)`` pairs as insightface does: ``rec``, its ``.idx`` and ``property``, with
    the header record (key 0) and one identity record per label (``[first key, end key)`` of its images, which
    must be grouped by label)."""
    rec = Path(rec)
    labels = [label for label, _ in faces]
    if labels != sorted(labels):
        raise RecordIOError("faces must be sorted by label (insightface groups each identity's images)")
    first_identity = len(faces) + 1
    identities = sorted(set(labels))
    records: list[bytes] = [
        HEADER.pack(2, 0.0, 0, 0) + struct.pack("<2f", first_identity, first_identity + len(identities))
    ]
    records += [HEADER.pack(0, float(label), key, 0) + image for key, (label, image) in enumerate(faces, 1)]
    for label in identities:
        keys = [k for k, (lab, _) in enumerate(faces, 1) if lab == label]
        records.append(HEADER.pack(2, 0.0, 0, 0) + struct.pack("<2f", keys[0], keys[-1] + 1))
    offset, lines = 0, []
    with rec.open("wb") as fh:
        for key, data in enumerate(records):
            lines.append(f"{key}\t{offset}")
            chunk = _record(data)
            fh.write(chunk)
            offset += len(chunk)
    rec.with_suffix(".idx").write_text("\n".join(lines) + "\n")
    (rec.parent / "property").write_text(f"{len(identities)},{size[0]},{size[1]}\n")
    return rec
