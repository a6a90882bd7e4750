"""This machine's dense matrix-multiply peak, per dtype: the yardstick for "achieved / peak" FLOP ratios.

Large square ``torch.mm`` calls, best of several, 2 FLOPs per multiply-add. The size grows until one call takes
long enough to time well, so dtypes that are emulated on this CPU (bf16 on AVX2-only x86 has no native kernel:
~1 GFLOP/s against ~70 for fp32) are still measured in seconds, not hours.

    python benchmarks/matmul_peak.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

DTYPES = ("fp32", "bf16")


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(dtype: str, n: int, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-``repeats`` GFLOP/s of one (n x n) @ (n x n) product (after one untimed warm-up call)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(_torch_dtype(dtype))
    b = torch.randn(n, n, generator=gen, device=device).to(_torch_dtype(dtype))
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def measure_peak(
    dtype: str, device: str = "cpu", max_n: int = 4096, min_seconds: float = 0.5, repeats: int = 5
) -> dict[str, Any]:
    """Grow n (256, 512, ...) until one product takes ``min_seconds`` or n reaches ``max_n``; report the best
    GFLOP/s over the sizes tried (small sizes under-use the cores, so the largest usually wins)."""
    import torch

    n, best, best_n, tried = 256, 0.0, 256, []
    while True:
        gflops = matmul_gflops(dtype, n, repeats=repeats, device=device)
        tried.append({"n": n, "gflops": round(gflops, 3)})
        if gflops > best:
            best, best_n = gflops, n
        seconds = 2.0 * n**3 / (gflops * 1e9)
        if n >= max_n or seconds >= min_seconds:
            break
        n *= 2
    return {
        "dtype": dtype,
        "device": device,
        "peak_gflops": round(best, 3),
        "n": best_n,
        "tried": tried,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }


def measure_peaks(device: str = "cpu", dtypes: tuple[str, ...] = DTYPES) -> dict[str, Any]:
    """{"peak_fp32_gflops": ..., "peak_bf16_gflops": ..., "peak_detail": [...]} for ``dtypes``."""
    out: dict[str, Any] = {"peak_detail": []}
    for dtype in dtypes:
        res = measure_peak(dtype, device=device)
        out[f"peak_{dtype}_gflops"] = res["peak_gflops"]
        out["peak_detail"].append(res)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=("fp32", "bf16", "fp16"))
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"kind": "peak", **measure_peaks(args.device, tuple(args.dtypes))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
