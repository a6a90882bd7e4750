"""Loader throughput from WebDataset shards vs one file per face, at 100k faces (issue #17).

The faces are made from a folder of aligned faces (e.g. a project's ``data/aligned``): face ``i`` is aligned face
``i mod n`` rolled sideways by ``i div n`` pixels, so every one of the ``--faces`` files differs. They are written
once as files and once as shards (:func:`lafs.data.shards.write_shard_set`, ``--per-shard`` to a tar), then one
epoch of each is read through a DataLoader the way training reads it (files: a seeded random order over the
paths; shards: :class:`lafs.data.shards.ShardStream` with its shuffle buffer), decoding every PNG to a float
tensor. Reported: images/s, and the resident memory of the loader's processes sampled through the epoch
(flat = the stream holds only its buffers). Both sets are read from the page cache after writing them, and with
``--cold`` once more each after dropping the page cache (root only: ``/proc/sys/vm/drop_caches``), as a first
epoch on a fresh node reads them.

    python benchmarks/shard_loader.py --aligned data/aligned --work /tmp/loader --faces 100000 \
        --out benchmarks/figures/shard_loader.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lafs.data.datasets import read_face
from lafs.data.shards import ShardStream, decode_face, load_shard_set, write_index, write_shard_set


def make_faces(aligned: Path, work: Path, faces: int) -> list[Path]:
    """``faces`` distinct PNG files under ``work/files`` (kept between runs)."""
    sources = sorted(aligned.rglob("*.png"))
    if not sources:
        raise SystemExit(f"no aligned faces (*.png) under {aligned}")
    base = [np.asarray(Image.open(p).convert("RGB")) for p in sources]
    paths = []
    for i in range(faces):
        path = work / "files" / f"{i // 1000:04d}" / f"{i:07d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.roll(base[i % len(base)], i // len(base), axis=1)).save(path)
        paths.append(path)
    return paths


def make_shards(paths: list[Path], out: Path, per_shard: int) -> Path:
    if not (out / "index.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        records = (({"index": i, "identity": str(i % 1000)}, p.read_bytes()) for i, p in enumerate(paths))
        write_index(out, {"ssl": write_shard_set(records, out, "ssl", per_shard)}, per_shard)
    return out


class Files(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return read_face(self.paths[index])


def decode(sample: dict[str, Any], meta: dict[str, Any], epoch: int) -> torch.Tensor:
    return decode_face(sample["png"])


def rss_mb() -> float:
    """Resident memory of this process and its children (the loader workers), MB."""
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 1e6


def epoch(loader: DataLoader, total: int) -> dict[str, Any]:
    samples: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(1.0):
            samples.append(rss_mb())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch)
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    tenth = max(1, len(samples) // 10)
    return {
        "images": seen,
        "of": total,
        "seconds": round(seconds, 1),
        "images_per_s": round(seen / seconds, 1),
        "rss_mb_first_tenth": round(float(np.mean(samples[:tenth])), 1) if samples else None,
        "rss_mb_last_tenth": round(float(np.mean(samples[-tenth:])), 1) if samples else None,
        "rss_mb_max": round(max(samples), 1) if samples else None,
    }


def drop_page_cache() -> None:
    """Empty the kernel's page cache so the next epoch reads from the disk (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root to write /proc/sys/vm/drop_caches: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aligned", type=Path, required=True, help="folder of aligned face PNGs to tile")
    parser.add_argument("--work", type=Path, required=True, help="where the files and shards are written")
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--per-shard", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--cold", action="store_true", help="also an epoch of each after dropping the page cache")
    parser.add_argument("--out", type=Path, default=Path("shard_loader.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    start = time.perf_counter()
    paths = make_faces(args.aligned, args.work, args.faces)
    made = time.perf_counter()
    shards = make_shards(paths, args.work / "shards", args.per_shard)
    sharded = time.perf_counter()
    files_loader = DataLoader(
        Files(paths),
        batch_size=args.batch,
        sampler=RandomSampler(paths, generator=torch.Generator().manual_seed(0)),
        num_workers=args.workers,
        drop_last=True,
    )
    stream = ShardStream(
        load_shard_set(shards, "ssl"),
        decode,
        args.batch,
        num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
    )
    shard_loader = DataLoader(stream, batch_size=args.batch, num_workers=args.workers, drop_last=True)
    result = {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "faces": args.faces,
        "workers": args.workers,
        "batch": args.batch,
        "per_shard": args.per_shard,
        "shuffle_buffer": args.shuffle_buffer,
        "seconds_to_make_files": round(made - start, 1),
        "seconds_to_write_shards": round(sharded - made, 1),
        "bytes_files": sum(p.stat().st_size for p in paths),
        "bytes_shards": sum(p.stat().st_size for p in shards.glob("*.tar")),
        "files": epoch(files_loader, len(paths)),
        "shards": epoch(shard_loader, len(paths)),
    }
    result["shards_vs_files"] = round(result["shards"]["images_per_s"] / result["files"]["images_per_s"], 2)
    if args.cold:
        for name, loader in (("files", files_loader), ("shards", shard_loader)):
            drop_page_cache()
            result[f"{name}_cold"] = epoch(loader, len(paths))
        cold = result["shards_cold"]["images_per_s"] / result["files_cold"]["images_per_s"]
        result["shards_vs_files_cold"] = round(cold, 2)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
