"""End-to-end CPU latency per photo (detect + align + embed) and the FRUITS-style budget report.

What a deployed recogniser pays for one raw photo: SCRFD detection, face selection, ArcFace alignment (or, for
dlib, its own 68-point alignment inside a box placed from the SCRFD keypoints) and the embedding, flip TTA
included when evaluated with it. Photos are decoded before timing (decoding is I/O, not the model). Each
candidate runs the same photos one at a time after untimed warm-up photos; p50 / p95 / mean are over the
per-photo wall times.

Threads are pinned while timing (``threads``: torch intra-op, OpenCV, and the ONNX Runtime sessions the caller
builds with the same count; 1 by default, the one-core-per-request serving case), so candidates are compared
on equal hardware and a busy machine disturbs them less.

Budget report (FRUITS: face recognition under 100 / 500 / 1000 ms inference-time constraints): per budget, the
candidates whose ``criterion`` percentile (p95 by default: a budget is a promise about nearly every request,
not about the typical one) fits it, and the best verification accuracy among them (``None`` when none fits).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lafs.eval.embedders import Embedder, PhotoEmbedder
from lafs.eval.photos import FaceFinder


@dataclass(frozen=True)
class LatencyStats:
    """Per-photo wall time in milliseconds over ``images`` timed photos (after ``warmup`` untimed ones)."""

    p50_ms: float
    p95_ms: float
    mean_ms: float
    images: int
    warmup: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """torch and OpenCV limited to ``threads`` inside the block, restored after."""
    import cv2
    import torch

    saved_torch, saved_cv2 = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_torch)
        cv2.setNumThreads(saved_cv2)


def end_to_end(finder: FaceFinder, embedder: Embedder, flip: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """``photo -> embedding (1, D)``: the whole per-request path for one RGB uint8 photo."""

    def run(photo: np.ndarray) -> np.ndarray:
        face = finder.find(photo)
        if isinstance(embedder, PhotoEmbedder):
            return embedder.embed_photos([photo], face.box[None], flip=flip, keypoints=face.kps[None])
        return embedder.embed_aligned(face.aligned[None], flip=flip)

    return run


def measure_latency(fn: Callable[[np.ndarray], Any], photos: Sequence[np.ndarray], warmup: int = 5) -> LatencyStats:
    """Time ``fn(photo)`` per photo; the first ``warmup`` calls (cycling through ``photos``) are not timed."""
    if not photos:
        raise ValueError("latency needs at least one photo")
    for i in range(warmup):
        fn(photos[i % len(photos)])
    times = np.empty(len(photos))
    for i, photo in enumerate(photos):
        start = time.perf_counter()
        fn(photo)
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return LatencyStats(
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        mean_ms=float(ms.mean()),
        images=len(photos),
        warmup=warmup,
    )


def budget_report(
    candidates: Mapping[str, Mapping[str, Any]], budgets_ms: Sequence[float], criterion: str = "p95"
) -> dict[str, dict[str, Any]]:
    """``{"<budget>ms": {"meets": [names], "best": name | None, "best_accuracy": float | None}}``.

    ``candidates[name]`` holds ``"<criterion>_ms"`` and ``"accuracy"`` (verification accuracy; a candidate
    without one can meet a budget but never be "best"). Ties in accuracy go to the faster candidate.
    """
    key = f"{criterion}_ms"
    missing = [name for name, c in candidates.items() if key not in c]
    if missing:
        raise ValueError(f"candidates {missing} have no {key!r} latency (criterion {criterion!r})")
    report: dict[str, dict[str, Any]] = {}
    for budget in sorted(budgets_ms):
        meets = sorted((name for name, c in candidates.items() if c[key] <= budget), key=lambda n: candidates[n][key])
        scored = [n for n in meets if candidates[n].get("accuracy") is not None]
        best = max(scored, key=lambda n: (candidates[n]["accuracy"], -candidates[n][key]), default=None)
        report[f"{budget:g}ms"] = {
            "budget_ms": float(budget),
            "meets": meets,
            "best": best,
            "best_accuracy": None if best is None else float(candidates[best]["accuracy"]),
        }
    return report
