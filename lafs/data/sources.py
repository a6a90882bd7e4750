"""Where raw face photos come from: a local folder, an S3 prefix, an insightface ``.rec`` pack, or the public LFW set.

Every source yields :class:`SourceFile` items laid out as ``<identity>/<image>``, in sorted order, and reads
bytes lazily so that ingest limits (identities, images per identity) decide what is downloaded. Anything
outside that layout is still yielded (with ``identity=None``) so ingest can list it as a reject instead of
silently dropping it. Hidden files (``.DS_Store``, ``._foo.jpg``) are skipped.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lafs.data.images import UNREADABLE, ImageRejected, read_bytes

LFW_SOURCE = "lfw"
# The protocol files scikit-learn's LFW fetcher downloads (checksummed) next to the photos, in lfw_home/. It
# fetches no people lists: the split stage derives them from these (View 1 / View 2 test pairs).
LFW_PAIRS_FILES = ("pairsDevTrain.txt", "pairsDevTest.txt", "pairs.txt")


class SourceError(RuntimeError):
    """A source cannot be listed at all (missing folder, bad bucket, no credentials, no network)."""


@dataclass(frozen=True)
class SourceFile:
    """One candidate image: ``identity``/``filename`` as found, ``location`` as a human-readable path/URL."""

    identity: str | None
    filename: str
    location: str
    _read: Callable[[], bytes]

    def read(self) -> bytes:
        """The file's bytes; any failure is an :class:`ImageRejected` with code ``unreadable``."""
        return self._read()


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _split_identity(relative: str) -> tuple[str | None, str]:
    """``"Name/img.jpg"`` -> ``("Name", "img.jpg")``; anything not exactly two levels -> ``(None, relative)``."""
    parts = relative.split("/")
    if len(parts) == 2 and all(p not in ("", ".", "..") for p in parts):
        return parts[0], parts[1]
    return None, relative


def iter_folder(root: Path) -> Iterator[SourceFile]:
    """Yield ``root/<identity>/<file>`` in sorted order.

    Every non-hidden entry of an identity folder is yielded, even a sub-directory or a dangling symlink:
    reading it then fails and ingest records it as ``unreadable`` rather than skipping it unseen.
    """
    if not root.is_dir():
        raise SourceError(
            f"source folder {root} does not exist or is not a directory "
            "(expected <identity>/<image> subfolders; set ingest.source or make pipeline DATA=...)"
        )
    for top in sorted(root.iterdir(), key=lambda p: p.name):
        if _hidden(top.name):
            continue
        if not top.is_dir():
            yield SourceFile(None, top.name, str(top), _path_reader(top))
            continue
        for entry in sorted(top.iterdir(), key=lambda p: p.name):
            if not _hidden(entry.name):
                yield SourceFile(top.name, entry.name, str(entry), _path_reader(entry))


def _path_reader(path: Path) -> Callable[[], bytes]:
    return lambda: read_bytes(path)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    if not url.startswith("s3://"):
        raise SourceError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise SourceError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client from the standard AWS environment (keys, profile, region); ``endpoint_url`` points
    it at an S3-compatible server (MinIO, moto, Ceph)."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint_url)


def iter_s3(
    url: str, endpoint_url: str | None = None, client: Any | None = None, page_size: int = 1000
) -> Iterator[SourceFile]:
    """Yield ``s3://bucket/prefix/<identity>/<file>`` objects, listed with a paginator (no 1000-key cap).

    Listing happens up front (so order is sorted and errors surface before any copy); bodies are fetched
    only when an item is read.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_url(url)
    client = client or s3_client(endpoint_url)
    list_prefix = f"{prefix}/" if prefix else ""
    keys: list[str] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=list_prefix, PaginationConfig={"PageSize": page_size}
        )
        for page in pages:
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
    except (BotoCoreError, ClientError) as exc:
        where = f" at {endpoint_url}" if endpoint_url else ""
        raise SourceError(
            f"cannot list {url}{where}: {exc} (check the bucket name, AWS credentials/AWS_PROFILE, "
            "and ingest.s3_endpoint_url for S3-compatible servers)"
        ) from None
    for key in sorted(keys):
        relative = key[len(list_prefix) :]
        if not relative or relative.endswith("/") or any(_hidden(p) for p in relative.split("/")):
            continue  # folder markers and hidden files
        identity, filename = _split_identity(relative)
        yield SourceFile(identity, filename, f"s3://{bucket}/{key}", _s3_reader(client, bucket, key))


def _s3_reader(client: Any, bucket: str, key: str) -> Callable[[], bytes]:
    def read() -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise ImageRejected(UNREADABLE, f"s3://{bucket}/{key}: cannot download ({exc})") from None

    return read


def lfw_folder(data_home: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Return the folder of original LFW photos (``lfw_home/lfw_funneled/<Name>/<Name>_NNNN.jpg``).

    scikit-learn's LFW fetcher does the download (with checksums) into ``SCIKIT_LEARN_DATA`` (default
    ``~/scikit_learn_data``) and does nothing when the data is already there: it only checks that
    ``lfw_home/{pairsDevTrain,pairsDevTest,pairs}.txt`` and ``lfw_home/lfw_funneled/`` exist. The pairs files
    stay there for the split stage's LFW protocols (:func:`lfw_protocol_dir`). We call its
    download helper rather than ``fetch_lfw_people`` because the public function then decodes all 13,233
    photos into a float array we do not use; we read the original JPEGs instead.
    """
    import tarfile

    from sklearn.datasets import get_data_home

    home = get_data_home(data_home)
    try:
        # Private, but it is exactly the download step of fetch_lfw_people (unchanged from 0.2x to 1.9).
        from sklearn.datasets._lfw import _check_fetch_lfw
    except ImportError as exc:
        raise SourceError(
            f"this scikit-learn has no sklearn.datasets._lfw._check_fetch_lfw ({exc}); install the version "
            "pinned in constraints.txt, or use a local folder source (make pipeline DATA=<folder>)"
        ) from None
    try:
        _, folder = _check_fetch_lfw(data_home=home, funneled=True, download_if_missing=download)
    except (OSError, ValueError, tarfile.TarError) as exc:  # URLError is an OSError; so is a bad checksum
        raise SourceError(
            f"cannot fetch LFW into {home}/lfw_home with scikit-learn ({type(exc).__name__}: {exc}); "
            "on a machine without internet set SCIKIT_LEARN_DATA to a folder holding lfw_home/, "
            "or use a local folder source (make pipeline DATA=<folder of identity subfolders>)"
        ) from exc
    return Path(folder)


def lfw_home(data_home: str | os.PathLike[str] | None = None) -> Path:
    """``<SCIKIT_LEARN_DATA>/lfw_home``: where the ``lfw`` source's photos and pairs files land (nothing fetched)."""
    from sklearn.datasets import get_data_home

    return Path(get_data_home(data_home)) / "lfw_home"


def lfw_protocol_dir(data_home: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the official pairs files (:data:`LFW_PAIRS_FILES`) the ``lfw`` source fetched.

    :func:`lfw_folder` downloads them with the photos, so after an ``lfw`` ingest they are here. Nothing is
    downloaded: the split stage reads this, and a stage that silently went online would make a DVC run
    depend on the network.
    """
    folder = lfw_home(data_home)
    missing = [name for name in LFW_PAIRS_FILES if not (folder / name).is_file()]
    if missing:
        raise SourceError(
            f"the lfw source's protocol files {missing} are not in {folder}: ingest with ingest.source: lfw (it "
            "downloads them with the photos; SCIKIT_LEARN_DATA must be the same), or point split.protocol_dir at "
            "a folder holding the LFW view files (e.g. ../shared/data/lfw_views)"
        )
    return folder


def iter_recordio(rec: Path) -> Iterator[SourceFile]:
    """The images of an insightface pack (``train.rec`` + ``train.idx``, :mod:`lafs.data.recordio`) as
    ``id<label>/<key>.jpg``; only record headers are read here, each image when ingest reads it."""
    from lafs.data.recordio import RecordIOError, image_keys, index_offsets, labels_at, read_image

    if not rec.is_file():
        raise SourceError(f"RecordIO source {rec} not found (expected train.rec beside train.idx)")
    try:
        offsets = index_offsets(rec)
        labels = labels_at(rec, offsets, image_keys(rec, offsets))
    except (RecordIOError, OSError, struct.error) as exc:
        raise SourceError(f"cannot list {rec}: {exc}") from None
    width = max(7, len(str(max(labels.values(), default=0))))
    for key, label in sorted(labels.items(), key=lambda kv: (kv[1], kv[0])):

        def read(offset: int = offsets[key]) -> bytes:
            try:
                return read_image(rec, offset)
            except (RecordIOError, OSError) as exc:
                raise ImageRejected(UNREADABLE, f"{rec}#{offset}: {exc}") from None

        yield SourceFile(f"id{label:0{width}d}", f"{key:09d}.jpg", f"{rec}#{key}", read)


def iter_source(source: str, *, s3_endpoint_url: str | None = None) -> Iterator[SourceFile]:
    """Dispatch on ``ingest.source``: ``lfw``, ``s3://bucket/prefix``, a ``.rec`` file, or a local folder path."""
    if source == LFW_SOURCE:
        return iter_folder(lfw_folder())
    if source.endswith(".rec") and "://" not in source:
        return iter_recordio(Path(source).expanduser())
    if source.startswith("s3://"):
        return iter_s3(source, endpoint_url=s3_endpoint_url)
    if "://" in source:
        raise SourceError(f"unsupported source {source!r}: use a folder path, s3://bucket/prefix, or 'lfw'")
    return iter_folder(Path(source).expanduser())
