"""WebDataset shards (stage ``shards``, :mod:`lafs.data.shards`) on the tiny real project: what is written, that an
epoch over shards is an epoch over the files, rank / worker / resume arithmetic, and streaming from S3 (moto)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from lafs.config import Params, ShardsParams
from lafs.data.datasets import SSLFaces, SSLShardDecode
from lafs.data.shards import ShardError, ShardStream, load_shard_set, read_run, write_index, write_shard_set
from lafs.data.views import LAFSViews
from lafs.layout import Layout
from lafs.stages import shards as shards_stage


@dataclass(frozen=True)
class _Field:
    """A decode that keeps one field of the sample's json: cheap, for order and multiset checks (a class, not a
    lambda, so spawned loader workers can unpickle it)."""

    key: str = "index"

    def __call__(self, sample: dict, meta: dict, epoch: int) -> object:
        return meta[self.key]


@dataclass(frozen=True)
class _Indexed:
    """(the sample's row, what ``decode`` makes of it)."""

    decode: SSLShardDecode

    def __call__(self, sample: dict, meta: dict, epoch: int) -> tuple[int, dict]:
        return meta["index"], self.decode(sample, meta, epoch)


def _loader(stream: ShardStream, batch_size: int | None, workers: int) -> DataLoader:
    """Loader workers are spawned: this process may hold other tests' threads (in-process Prefect flows run
    before), and workers forked from it die on them."""
    context = "spawn" if workers else None
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, multiprocessing_context=context)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Shards of 37 small generated PNGs of 6 identities, 8 to a tar (the unit tier's: no project needed)."""
    from PIL import Image

    out = tmp_path_factory.mktemp("synthetic_shards")
    rng = np.random.default_rng(0)

    def records():
        for i in range(37):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
            yield {"index": i, "identity": f"person_{i % 6}", "aligned_path": f"f{i}.png"}, buffer.getvalue()

    write_index(out, {"ssl": write_shard_set(records(), out, "ssl", 8)}, 8)
    return out


def _all_samples(location: Path, name: str) -> list[dict]:
    shard_set = load_shard_set(location, name)
    return [s for shard in shard_set.shards for s in read_run(shard_set, shard, 0, shard.samples)]


def test_every_face_of_both_sets_is_written_unchanged_and_rewriting_gives_the_same_bytes(
    tiny_project, tiny_shards, tmp_path
):
    for name in ("ssl", "finetune"):
        table = pd.read_csv(tiny_project / "data" / "splits" / f"{name}.csv")
        samples = _all_samples(tiny_shards, name)
        shard_set = load_shard_set(tiny_shards, name)
        assert [s.samples for s in shard_set.shards][:-1] == [8] * (len(shard_set.shards) - 1)
        assert len(samples) == len(table) == shard_set.samples and len(shard_set.shards) >= 2
        for row, sample in zip(table.itertuples(), samples, strict=True):
            meta = json.loads(sample["json"])
            assert (meta["index"], meta["identity"]) == (row.Index, row.identity)
            assert meta["aligned_path"] == row.aligned_path
            assert sample["png"] == (tiny_project / row.aligned_path).read_bytes()
            assert len(meta["dense"]) == 2 * 68
    metrics = json.loads(Layout(tiny_shards.parent.parent).metrics("shards").read_text())
    assert metrics["sets"]["ssl"]["samples"] == len(pd.read_csv(tiny_project / "data" / "splits" / "ssl.csv"))
    # the same inputs give the same tar bytes (DVC sees no change): rewrite in another root and compare
    root = tmp_path / "again"
    (root / "data").mkdir(parents=True)
    for name in ("aligned", "splits", "landmarks.parquet"):
        (root / "data" / name).symlink_to(tiny_project / "data" / name)
    shards_stage.run(Params(shards=ShardsParams(write=True, samples_per_shard=8)), Layout(root))
    for tar in sorted(tiny_shards.glob("*.tar")):
        assert (Layout(root).shards / tar.name).read_bytes() == tar.read_bytes(), tar.name
    assert (Layout(root).shards / "index.json").read_bytes() == (tiny_shards / "index.json").read_bytes()


def test_write_false_leaves_an_empty_index_and_a_loader_says_what_to_do(tiny_project, tmp_path):
    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    for name in ("aligned", "splits", "landmarks.parquet"):
        (root / "data" / name).symlink_to(tiny_project / "data" / name)
    summary = shards_stage.run(Params(), Layout(root))
    assert summary.sets == {} and not list(Layout(root).shards.glob("*.tar"))
    with pytest.raises(ShardError, match=r"shards\.write: true"):
        load_shard_set(Layout(root).shards, "ssl")
    with pytest.raises(ShardError, match="no shard index"):
        load_shard_set(tmp_path / "nowhere", "ssl")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_over_shards_is_an_epoch_over_the_files(tiny_project, tiny_shards, workers):
    """Same faces, same augmented views (each seeded by its row in the split table), whatever the order."""
    table = pd.read_csv(tiny_project / "data" / "splits" / "ssl.csv")
    views = LAFSViews(2, 1, 112, (0.4, 1.0))
    files = SSLFaces([tiny_project / p for p in table["aligned_path"]], views, seed=3)
    decode = SSLShardDecode(views, seed=3)
    stream = ShardStream(
        load_shard_set(tiny_shards, "ssl"),
        _Indexed(decode),
        batch_size=1,
        seed=3,
        num_workers=workers,
        shuffle_buffer=5,
    )
    for epoch in (0, 1):
        files.set_epoch(epoch)
        stream.set_epoch(epoch)
        seen = list(_loader(stream, None, workers))
        indices = [i for i, _ in seen]
        assert len(set(indices)) == len(indices) == len(stream)
        assert len(table) - len(indices) < max(1, workers)  # at most workers - 1 faces sit this epoch out
        for index, item in seen:
            expected = files[index]
            assert item.keys() == expected.keys()
            assert all(torch.equal(item[k], expected[k]) for k in item), index


def test_ranks_and_workers_get_disjoint_equal_runs_and_epochs_differ(synthetic):
    shard_set = load_shard_set(synthetic, "ssl")
    streams = [
        ShardStream(shard_set, _Field(), batch_size=2, rank=r, world_size=2, num_workers=2, shuffle_buffer=4)
        for r in range(2)
    ]
    per_rank = [[x for b in _loader(s, 2, 2) for x in b.tolist()] for s in streams]
    assert len(per_rank[0]) == len(per_rank[1]) == len(streams[0]) > 0
    assert not set(per_rank[0]) & set(per_rank[1])
    assert shard_set.samples - len(per_rank[0]) * 2 < 2 * 2 * 2  # less than world x workers x batch left out
    streams[0].set_epoch(1)
    assert [x for b in _loader(streams[0], 2, 2) for x in b.tolist()] != per_rank[0]


def test_a_resume_at_any_batch_replays_the_rest_of_the_epoch(synthetic):
    stream = ShardStream(load_shard_set(synthetic, "ssl"), _Field(), batch_size=2, num_workers=2, shuffle_buffer=6)
    stream.set_epoch(4)
    full = [b.tolist() for b in _loader(stream, 2, 2)]
    assert len(full) == len(stream) // 2
    # resume points at the start, middle and end of the epoch, each after an even and an odd number of batches
    # (which of the two workers' runs comes next rotates with it); every point costs two spawned workers
    n = len(full)
    assert n >= 6
    for done in sorted({0, 1, 2, 3, n // 2, n // 2 + 1, n - 2, n - 1}):
        stream.skip = done * 2
        assert [b.tolist() for b in _loader(stream, 2, 2)] == full[done:]


def test_identities_left_out_never_reach_the_loader(synthetic):
    shard_set = load_shard_set(synthetic, "ssl")
    keep = set(shard_set.identities[::2])
    stream = ShardStream(shard_set, _Field("identity"), batch_size=1, keep=keep)
    seen = list(DataLoader(stream, batch_size=None))
    kept = sum(shard_set.identities[i] in keep for s in shard_set.shards for i in s.identities)
    assert set(seen) <= keep and len(seen) == kept == len(stream)


def test_too_few_samples_for_one_batch_per_worker_is_a_clear_error(synthetic):
    with pytest.raises(ShardError, match="less than one batch"):
        ShardStream(load_shard_set(synthetic, "ssl"), _Field(), batch_size=64, num_workers=2)


def test_streams_from_s3_as_from_disk(synthetic, s3_endpoint, monkeypatch):
    """A real S3-compatible server (moto) on 127.0.0.1: one ranged GET per run of samples."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    client = boto3.client("s3")
    client.create_bucket(Bucket="faces")
    for path in synthetic.iterdir():
        client.upload_file(str(path), "faces", f"lfw/shards/{path.name}")
    local, remote = (
        ShardStream(load_shard_set(where, "ssl"), _Field("aligned_path"), batch_size=3, seed=1, shuffle_buffer=4)
        for where in (synthetic, "s3://faces/lfw/shards")
    )
    for stream in (local, remote):
        stream.set_epoch(2)
        stream.skip = 3
    assert list(DataLoader(remote, batch_size=None)) == list(DataLoader(local, batch_size=None))
    with pytest.raises(ShardError, match="no shard index"):
        load_shard_set("s3://faces/elsewhere", "ssl")
