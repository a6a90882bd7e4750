"""Benchmark: evaluation throughput, one part per stage of the protocol.

    .venv/bin/python benchmarks/eval.py --part pairs [--pairs 6000,60000,600000] [--repeats 3]

Prints one JSON line per measurement (``part`` says which), as soon as it is measured. Parts are generator
functions registered in ``PARTS`` (``name -> fn(args)`` yielding rows); ``--part all`` runs every registered
part. To add one, write ``bench_<name>(args)``, register it, and add its flags in ``_add_<name>_args``.

``pairs``: :func:`lafs.eval.verification.verification_report` (exact 10-fold accuracy, TAR@FAR at 1e-2/1e-3/
1e-4, EER, AUC) on N random scored pairs (half same, two overlapping Gaussians of cosine scores, contiguous
folds), against a baseline run side by side in the same process on the same scores: insightface's protocol
as arcface_torch ``eval/verification.py`` computes it (``calculate_roc`` + ``calculate_val``: squared
distances of unit embeddings, a grid of 400 thresholds in [0, 4), every threshold evaluated on the training
folds by a full pass, VAL@FAR 1e-3 by interpolation), reimplemented here with numpy because insightface's file
needs mxnet. Reported: best-of-``repeats`` wall time, pairs/s for both, the ratio, and the accuracy of both
(grid search can miss the best split; ours is exact). Compare rows of one run only: the machine is shared.

    .venv/bin/python benchmarks/eval.py --part embeddings [--model lafs_vit_tiny] [--batches 1,32] [--threads 1,2]

``embeddings``: embeddings/s of one recogniser (registry ``--model`` with its ``landmark_net_mnv3_small``, the
finetuned model's layout; random weights, speed does not depend on them) through
:class:`lafs.eval.embedders.TorchEmbedder` and, side by side in the same process, its ONNX export (written by
:func:`lafs.export.export_onnx`) through :class:`lafs.eval.embedders.OnnxEmbedder` on ONNX Runtime CPU: same
``--images`` aligned-size uint8 faces (preprocessing and normalisation included, no TTA), for every batch size
x thread count (torch ``set_num_threads`` / ORT intra-op threads). Per case the two runtimes alternate for
``--repeats`` rounds after one untimed warm-up pass each; the best round of each is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lafs.eval.verification import FARS, contiguous_folds, far_key, verification_report  # noqa: E402


def _best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def random_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half same pairs ~ N(0.45, 0.2), half different ~ N(0.05, 0.15), clipped to [-1, 1], shuffled."""
    rng = np.random.default_rng(seed)
    same = np.zeros(n, dtype=bool)
    same[: n // 2] = True
    rng.shuffle(same)
    scores = np.where(same, rng.normal(0.45, 0.2, n), rng.normal(0.05, 0.15, n))
    return np.clip(scores, -1.0, 1.0), same


def insightface_protocol(scores: np.ndarray, same: np.ndarray, far_target: float = 1e-3) -> tuple[float, float]:
    """arcface_torch's ``calculate_roc`` accuracy and ``calculate_val`` VAL@FAR, on distances 2 - 2 cos."""
    dist = 2.0 - 2.0 * scores
    thresholds = np.arange(0, 4, 0.01)
    folds = contiguous_folds(len(dist), 10)
    accuracies, vals = [], []
    for fold in range(1, 11):
        test, train = folds == fold, folds != fold
        train_acc = [np.mean((dist[train] < t) == same[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accuracies.append(np.mean((dist[test] < best) == same[test]))
        far_train = np.array([np.mean(dist[train & ~same] < t) for t in thresholds])
        if far_train.max() >= far_target:
            # insightface: interp1d(far_train, thresholds) at the target (monotone FAR -> threshold)
            uniq, idx = np.unique(far_train, return_index=True)
            threshold = float(np.interp(far_target, uniq, thresholds[idx]))
        else:
            threshold = 0.0
        vals.append(np.mean(dist[test & same] < threshold))
    return float(np.mean(accuracies)), float(np.mean(vals))


def bench_pairs(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    for n in (int(x) for x in args.pairs.split(",")):
        scores, same = random_pairs(n, args.seed)
        ours_s, report = _best_of(lambda s=scores, y=same: verification_report(s, y), args.repeats)
        base_s, (base_acc, base_val) = _best_of(lambda s=scores, y=same: insightface_protocol(s, y), args.repeats)
        yield {
            "part": "pairs",
            "pairs": n,
            "ours_s": round(ours_s, 4),
            "pairs_per_s": round(n / ours_s, 1),
            "baseline_s": round(base_s, 4),
            "baseline_pairs_per_s": round(n / base_s, 1),
            "speedup": round(base_s / ours_s, 2),
            "accuracy_mean": report["accuracy_mean"],
            "baseline_accuracy_mean": base_acc,
            "tar_at_far_1e-03": report["tar_at_far"][far_key(1e-3)],
            "baseline_val_at_far_1e-03": base_val,
            "far_keys": [far_key(f) for f in FARS],
            "repeats": args.repeats,
            "load_avg_1min": round(os.getloadavg()[0], 2),
        }


def _add_pairs_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", default="6000,60000,600000", help="comma-separated pair counts (pairs part)")


def bench_embeddings(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    import tempfile

    import torch

    from lafs.eval.embedders import OnnxEmbedder, TorchEmbedder
    from lafs.export import export_onnx
    from lafs.models import create_model

    torch.manual_seed(args.seed)
    model = create_model(args.model, num_landmarks=68, landmark_net="landmark_net_mnv3_small").eval()
    faces = np.random.default_rng(args.seed).integers(0, 256, (args.images, 112, 112, 3), dtype=np.uint8)
    saved_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(model, Path(tmp) / "model.onnx")
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for batch in (int(b) for b in args.batches.split(",")):
                runtimes = {
                    "torch": TorchEmbedder(model, batch_size=batch),
                    "onnx": OnnxEmbedder(onnx, batch_size=batch, threads=threads),
                }
                best = {name: float("inf") for name in runtimes}
                for embedder in runtimes.values():
                    embedder.embed_aligned(faces[:batch])  # warm-up: allocations, ORT graph optimisation
                for _ in range(args.repeats):  # alternate, so a load spike hits both runtimes alike
                    for name, embedder in runtimes.items():
                        start = time.perf_counter()
                        embedder.embed_aligned(faces)
                        best[name] = min(best[name], time.perf_counter() - start)
                yield {
                    "part": "embeddings",
                    "model": args.model,
                    "batch": batch,
                    "threads": threads,
                    "images": args.images,
                    "torch_img_per_s": round(args.images / best["torch"], 1),
                    "onnx_img_per_s": round(args.images / best["onnx"], 1),
                    "onnx_speedup": round(best["torch"] / best["onnx"], 2),
                    "repeats": args.repeats,
                    "torch": torch.__version__,
                    "load_avg_1min": round(os.getloadavg()[0], 2),
                }
    torch.set_num_threads(saved_threads)


def _add_embeddings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lafs_vit_tiny", help="registry name of the recogniser (embeddings part)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (embeddings part)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (embeddings part)")
    parser.add_argument("--images", type=int, default=64, help="faces embedded per timed round (embeddings part)")


PARTS: dict[str, Callable[[argparse.Namespace], Iterator[dict[str, Any]]]] = {
    "pairs": bench_pairs,
    "embeddings": bench_embeddings,
}
ARG_ADDERS = (_add_pairs_args, _add_embeddings_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3, help="time each case this many times, keep the best")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    for add in ARG_ADDERS:
        add(parser)
    args = parser.parse_args(argv)
    if args.part != "all" and args.part not in PARTS:
        parser.error(f"--part {args.part} is not implemented yet (registered parts: {', '.join(PARTS)})")
    for name in PARTS if args.part == "all" else [args.part]:
        for row in PARTS[name](args):
            line = json.dumps(row)
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as fh:
                    fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
