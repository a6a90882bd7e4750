"""WebDataset tar shards of aligned faces, and the stream the training loaders read from them.

Writing (:func:`write_shard_set`): each sample is ``<key>.png`` (the aligned face file's bytes, unchanged) and
``<key>.json`` (its row in the split table, identity, dense landmarks), ``per_shard`` samples to a tar
(webdataset's ``TarWriter`` with mtime 0: the same inputs give the same bytes, so DVC sees no change).
``index.json`` lists every shard with each sample's byte offset and identity number, so a reader fetches any
contiguous run of samples with one ranged read (a local seek or one S3 ranged GET) and knows every count
without opening a tar.

Reading (:class:`ShardStream`): an epoch is the shards in a seeded order, cut into equal contiguous runs, one
per (rank, loader worker); each worker streams its run through a seeded shuffle buffer. Every rank gets the
same number of batches and every worker the same share (what is left over, fewer than world x workers x batch
samples, sits out that epoch, like ``DistributedSampler(drop_last=True)``), so the DataLoader's round robin over
workers is a fixed order and a run resumed at a sample offset (``skip``) replays the same batches: each worker
re-reads its run, drops what it had already produced, and the workers take the roles next in the round robin.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lafs.atomic import write_text
from lafs.data.images import file_sha256
from lafs.data.sampling import derived_seed
from lafs.errors import StageError

INDEX_FILE = "index.json"
INDEX_FORMAT = 1


class ShardError(StageError):
    """A shard set is missing, malformed or too small for the loader asked of it."""


@dataclass(frozen=True)
class Shard:
    """One tar: its file name, each sample's byte offset (then the end of the last sample) and identity number."""

    name: str
    offsets: tuple[int, ...]
    identities: tuple[int, ...]
    sha256: str

    @property
    def samples(self) -> int:
        return len(self.identities)


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split set (``ssl``, ``finetune``) at ``location``: a folder or ``s3://bucket/prefix``."""

    location: str
    shards: tuple[Shard, ...]
    identities: tuple[str, ...]
    digest: str  # sha256 of the index.json it was read from: a training run's input fingerprint

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


# -- writing -------------------------------------------------------------------------------------------------


def write_shard_set(records: Iterable[tuple[dict[str, Any], bytes]], out_dir: Path, name: str, per_shard: int) -> dict:
    """Write ``(meta, png bytes)`` records as ``<name>-NNNNNN.tar`` shards in ``out_dir``; ``meta`` needs an
    ``identity``. Returns the set's index entry (for :func:`write_index`)."""
    from webdataset import TarWriter

    identity_ids: dict[str, int] = {}
    shards: list[dict[str, Any]] = []
    writer: TarWriter | None = None
    offsets: list[int] = []
    ids: list[int] = []

    def close() -> None:
        assert writer is not None
        offsets.append(writer.tarstream.offset)  # the end of the last sample, before tar's end-of-archive blocks
        writer.close()
        path = out_dir / shards[-1]["name"]
        shards[-1] |= {"offsets": list(offsets), "identities": list(ids), "sha256": file_sha256(path)}

    for n, (meta, png) in enumerate(records):
        if n % per_shard == 0:
            if writer is not None:
                close()
            shards.append({"name": f"{name}-{len(shards):06d}.tar"})
            writer, offsets, ids = TarWriter(str(out_dir / shards[-1]["name"]), encoder=False, mtime=0.0), [], []
        offsets.append(writer.tarstream.offset)
        ids.append(identity_ids.setdefault(meta["identity"], len(identity_ids)))
        writer.write({"__key__": f"{n:09d}", "png": png, "json": json.dumps(meta, sort_keys=True).encode()})
    if writer is not None:
        close()
    return {"identities": list(identity_ids), "shards": shards}


def write_index(out_dir: Path, sets: dict[str, dict], per_shard: int) -> Path:
    path = out_dir / INDEX_FILE
    write_text(path, json.dumps({"format": INDEX_FORMAT, "per_shard": per_shard, "sets": sets}) + "\n")
    return path


# -- reading -------------------------------------------------------------------------------------------------


def _s3(location: str) -> tuple[Any, str, str]:
    """(boto3 client, bucket, key prefix); the endpoint comes from the standard AWS environment."""
    import boto3

    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    return boto3.client("s3"), bucket, prefix.strip("/")


def _open_range(location: str, name: str, start: int, stop: int) -> IO[bytes]:
    """Bytes ``[start, stop)`` of ``location/name`` as a stream: one seek, or one S3 ranged GET."""
    if location.startswith("s3://"):
        client, bucket, prefix = _s3(location)
        key = f"{prefix}/{name}" if prefix else name
        return client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")["Body"]
    handle = (Path(location) / name).open("rb")
    handle.seek(start)
    return io.BufferedReader(_Window(handle, stop - start), buffer_size=1 << 20)


class _Window(io.RawIOBase):
    """At most ``length`` bytes of an open file from where it stands."""

    def __init__(self, handle: IO[bytes], length: int) -> None:
        self.handle, self.left = handle, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.handle.readinto(memoryview(buffer)[: min(len(buffer), self.left)])  # type: ignore[attr-defined]
        self.left -= n or 0
        return n or 0

    def close(self) -> None:
        self.handle.close()
        super().close()


def _index_bytes(location: str | Path) -> bytes:
    """The raw ``index.json`` at ``location`` (a folder or ``s3://bucket/prefix``)."""
    location = str(location).rstrip("/")
    try:
        if location.startswith("s3://"):
            client, bucket, prefix = _s3(location)
            key = f"{prefix}/{INDEX_FILE}" if prefix else INDEX_FILE
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return (Path(location) / INDEX_FILE).read_bytes()
    except Exception as exc:  # missing file / bucket / key: one message for all
        raise ShardError(
            f"no shard index at {location}/{INDEX_FILE} ({type(exc).__name__}): run the shards stage with "
            "shards.write: true (dvc repro shards) or point the loader at a folder / s3:// prefix that holds one"
        ) from None


def load_shard_set(location: str | Path, name: str) -> ShardSet:
    """The set ``name`` of the shard index at ``location`` (a folder or ``s3://bucket/prefix``)."""
    location = str(location).rstrip("/")
    raw = _index_bytes(location)
    index = json.loads(raw)
    if index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{location}/{INDEX_FILE} has format {index.get('format')!r}, this reader {INDEX_FORMAT}")
    if name not in index["sets"]:
        raise ShardError(
            f"{location}/{INDEX_FILE} holds the sets {sorted(index['sets'])}, not {name!r}: set shards.write: true "
            "and rerun the shards stage"
        )
    entry = index["sets"][name]
    shards = tuple(Shard(s["name"], tuple(s["offsets"]), tuple(s["identities"]), s["sha256"]) for s in entry["shards"])
    return ShardSet(location, shards, tuple(entry["identities"]), hashlib.sha256(raw).hexdigest())


def read_run(shard_set: ShardSet, shard: Shard, start: int, stop: int) -> Iterator[dict[str, Any]]:
    """Samples ``start .. stop-1`` of ``shard`` as webdataset samples (``__key__``, ``png``, ``json`` bytes)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = _open_range(shard_set.location, shard.name, shard.offsets[start], shard.offsets[stop])
    try:
        files = ({**f, "__url__": shard.name} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)
    finally:
        stream.close()


def shuffled(samples: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer of ``size``: each incoming sample replaces a random one that goes out."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer


Decode = Callable[[dict[str, Any], dict[str, Any], int], Any]  # (webdataset sample, its json, epoch) -> item


class ShardStream(IterableDataset):
    """One rank's samples of a shard set for one epoch, decoded in the DataLoader's workers (see the module).

    ``num_workers`` must equal the DataLoader's; ``keep`` restricts the stream to those identities (decided from
    the index, so every count is known up front); ``skip`` is the samples this rank has already trained on in
    the current epoch (the training loop sets it on resume)."""

    def __init__(
        self,
        shard_set: ShardSet,
        decode: Decode,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        keep: set[str] | None = None,
    ) -> None:
        self.shard_set, self.decode, self.batch_size = shard_set, decode, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        kept = None if keep is None else {i for i, name in enumerate(shard_set.identities) if name in keep}
        self.selected = [
            np.arange(s.samples) if kept is None else np.flatnonzero(np.isin(s.identities, sorted(kept)))
            for s in shard_set.shards
        ]
        total = sum(len(p) for p in self.selected)
        self.worker_batches = total // world_size // (self.workers * batch_size)
        if self.worker_batches == 0:
            raise ShardError(
                f"{total} samples in {shard_set.location} over {world_size} process(es) x {self.workers} loader "
                f"worker(s) is less than one batch of {batch_size} each: lower the batch size or num_workers"
            )
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples this rank trains on per epoch (a multiple of the batch size)."""
        return self.workers * self.worker_batches * self.batch_size

    def run_of(self, role: int, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(shard number, sample positions) of the contiguous run of worker ``role`` of this rank in ``epoch``."""
        order = np.random.default_rng(derived_seed(self.seed, "shards", epoch)).permutation(len(self.selected))
        share = self.worker_batches * self.batch_size
        start = (self.rank * self.workers + role) * share
        run, seen = [], 0
        for s in order:
            positions = self.selected[s]
            lo, hi = max(start - seen, 0), min(start + share - seen, len(positions))
            if lo < hi:
                run.append((int(s), positions[lo:hi]))
            seen += len(positions)
            if seen >= start + share:
                break
        return run

    def raw_samples(self, role: int, epoch: int) -> Iterator[dict[str, Any]]:
        """Worker ``role``'s samples in ``epoch``, undecoded, after its shuffle buffer."""

        def stream() -> Iterator[dict[str, Any]]:
            for number, positions in self.run_of(role, epoch):
                shard = self.shard_set.shards[number]
                wanted = set(positions.tolist())
                samples = read_run(self.shard_set, shard, int(positions[0]), int(positions[-1]) + 1)
                for position, sample in enumerate(samples, start=int(positions[0])):
                    if position in wanted:
                        yield sample

        rng = random.Random(derived_seed(self.seed, "shuffle", epoch, self.rank, role))
        return shuffled(stream(), self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise ShardError(f"the DataLoader has {info.num_workers} workers, the stream was built for {self.workers}")
        done = self.skip // self.batch_size  # batches this rank already took this epoch
        role = (worker + done) % self.workers
        skip = max(0, -(-(done - role) // self.workers)) * self.batch_size  # role's share of those batches
        for n, sample in enumerate(self.raw_samples(role, self.epoch)):
            if n >= skip:
                yield self.decode(sample, json.loads(sample["json"]), self.epoch)


def decode_face(png: bytes) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from an aligned face's PNG bytes (what :func:`lafs.data.datasets.read_face` gives
    for the file)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        face = np.asarray(img.convert("RGB"))
    return torch.from_numpy(face.copy()).permute(2, 0, 1).float().div_(255.0)
