"""Stage ``shards``: the ssl and finetune sets as WebDataset tar shards (``data/shards``), for loaders that stream
(``pretrain.data_source`` / ``finetune.data_source: shards``; copy the folder to S3 and set ``shards_uri`` to
stream from there).

Each sample carries the aligned PNG as written by the landmarks stage (no re-encoding: the pixels are the
files'), its row number in the split table (the seed of its augmentation, so a face is augmented alike from
files or shards), identity and dense landmarks. With ``shards.write: false`` the stage writes an index with no
sets and costs nothing; a loader asked to read shards then says so.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from lafs.config import Params
from lafs.data.shards import write_index, write_shard_set
from lafs.layout import Layout
from lafs.stages import RunOptions, StageError, write_metrics

SETS = ("ssl", "finetune")


@dataclass(frozen=True)
class ShardsSummary:
    sets: dict[str, dict[str, int]]  # set -> samples, shards, bytes
    seconds: float

    def describe(self) -> str:
        if not self.sets:
            return "shards: none written (shards.write: false)"
        parts = [
            f"{name} {s['samples']} faces in {s['shards']} shards ({s['bytes'] / 1e6:.0f} MB)"
            for name, s in self.sets.items()
        ]
        return f"shards: {'; '.join(parts)} in {self.seconds:.1f} s"

    def metrics(self) -> dict[str, Any]:
        return {"sets": self.sets, "seconds": round(self.seconds, 2)}


def records(layout: Layout, name: str) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(meta, PNG bytes) of every face of split set ``name``, in the split table's order."""
    split = layout.splits / f"{name}.csv"
    if not split.exists():
        raise StageError(f"{split} not found: run the split stage first (`dvc repro split`)")
    table = pd.read_csv(split)
    dense = pd.read_parquet(layout.landmarks, columns=["aligned_path", "dense"])
    table = table.merge(dense, on="aligned_path", how="left", validate="one_to_one")
    for index, row in enumerate(table.itertuples(index=False)):
        path = layout.root / row.aligned_path
        if not path.is_file():
            raise StageError(f"{path} (row {index} of {split}) not found: rerun the landmarks stage")
        points = row.dense  # NaN when the table has no row for the face
        meta = {
            "index": index,
            "identity": row.identity,
            "label": int(row.label),
            "aligned_path": row.aligned_path,
            "dense": None if points is None or isinstance(points, float) else [float(v) for v in points],
        }
        yield meta, path.read_bytes()


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> ShardsSummary:
    cfg = params.shards
    start = time.perf_counter()
    out = layout.shards
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    index: dict[str, dict] = {}
    sets: dict[str, dict[str, int]] = {}
    if cfg.write:
        for name in SETS:
            index[name] = write_shard_set(records(layout, name), out, name, cfg.samples_per_shard)
            shards = index[name]["shards"]
            sets[name] = {
                "samples": sum(len(s["identities"]) for s in shards),
                "shards": len(shards),
                "bytes": sum((out / s["name"]).stat().st_size for s in shards),
            }
    write_index(out, index, cfg.samples_per_shard)
    summary = ShardsSummary(sets, time.perf_counter() - start)
    write_metrics(layout.metrics("shards"), summary.metrics())
    return summary
