"""One short check of a CUDA machine (<= 5 min on one H100/H200), the figures issue #17 asks for, as one JSON file.

1. ``pretrain_step``: one full LAFS SSL step at the official size (``lafs_vit_base``, K=196, out_dim 100000) in
   bf16 autocast (``benchmarks/pretrain_step.py --peak``): images/s, achieved TFLOP/s and the ratio to this GPU's
   measured bf16 matmul peak (MFU; goal >= 40%).
2. ``ddp``: the recogniser's training step under DDP on NCCL, one process per visible GPU (``torchrun``): steps/s
   and whether the ranks end with identical weights.
3. ``finetune``: a finetune smoke run (``FinetuneTrainer``: margin head, landmark net inside the model, bf16) on
   random faces: images/s and a finite, falling loss.

``--dry-run`` runs the same three parts at toy sizes on the CPU (gloo, fp32), so the script stays tested where
there is no GPU (``tests/test_benchmarks.py``).

    bash benchmarks/gpu_check.sh --out gpu_check.json          # on the GPU machine
    bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu.json # anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def pretrain_step(dry: bool, tmp: Path) -> dict[str, Any]:
    out = tmp / "pretrain_step.jsonl"
    if dry:
        args = ["--device", "cpu", "--dtype", "fp32", "--model", "lafs_vit_tiny", "--batch", "2", "--steps", "1"]
        args += ["--warmup", "1", "--out-dim", "256", "--num-landmarks", "68", "--threads", "1"]
    else:
        args = ["--device", "cuda", "--dtype", "bf16", "--batch", "64", "--steps", "5", "--warmup", "2", "--peak"]
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pretrain_step.py"), *args, "--out", str(out)], check=True
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ours = next(r for r in rows if r.get("impl") == "ours")
    result = {k: ours.get(k) for k in ("model", "batch", "dtype", "images_per_s", "step_ms", "achieved_gflops")}
    summary = next((r for r in rows if r.get("impl") == "summary"), {})
    result["peak_bf16_gflops"] = summary.get("peak_bf16_gflops")
    result["mfu_vs_measured_bf16_peak"] = summary.get("ours_vs_peak_bf16")
    return result


def ddp(dry: bool, tmp: Path) -> dict[str, Any]:
    import torch

    out = tmp / "ddp.json"
    nproc = 1 if dry else max(1, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(Path(__file__).resolve()), "--ddp-worker", "--out", str(out)] + (["--dry-run"] if dry else [])
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def _recogniser(dry: bool):
    from lafs.models import create_model

    size = "tiny" if dry else "base"
    kwargs = {"num_landmarks": 68 if dry else 196, "landmark_net": "landmark_net_mnv3_small", "embedding": "tokens"}
    return create_model(f"lafs_vit_{size}", **kwargs, embedding_dim=128)


def _batch(n: int, classes: int, device: Any) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 112, 112, generator=g).mul(2).sub(1).to(device)
    return images, torch.randint(0, classes, (n,), generator=g).to(device)


def ddp_worker(dry: bool, out: Path) -> None:
    """One rank: DDP over the recogniser + a cosface head, a few bf16 steps, weights compared across ranks."""
    import torch
    import torch.distributed as dist

    from lafs.engine.distributed import init_distributed, ranks_in_sync, shutdown

    env = init_distributed("cpu" if dry else "cuda", param="gpu_check")
    if not dist.is_initialized():  # one process: init_distributed leaves the group out, a DDP step needs it
        dist.init_process_group("gloo" if dry else "nccl", device_id=None if dry else env.device)
    try:
        torch.manual_seed(0)
        model = _recogniser(dry).to(env.device)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
        head = torch.nn.Linear(model.embedding_dim, 100).to(env.device)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-4)
        images, labels = _batch(4 if dry else 128, 100, env.device)
        dtype = torch.float32 if dry else torch.bfloat16
        steps, warmup = (2, 1) if dry else (10, 3)
        for i in range(warmup + steps):
            if i == warmup:
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast(env.device.type, dtype=dtype, enabled=not dry):
                loss = torch.nn.functional.cross_entropy(head(ddp_model(images)).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        in_sync = ranks_in_sync(model, env.device)
        if env.is_main:
            out.write_text(
                json.dumps(
                    {
                        "backend": dist.get_backend(),
                        "world_size": env.world_size,
                        "steps_per_s": round(steps / seconds, 3),
                        "images_per_s": round(steps * len(images) * env.world_size / seconds, 1),
                        "ranks_in_sync": in_sync,
                        "loss": loss.item(),
                    }
                )
            )
    finally:
        shutdown()


def finetune(dry: bool) -> dict[str, Any]:
    import torch

    from lafs.config import FinetuneParams
    from lafs.engine.finetune import FinetuneTrainer, frozen_copy

    device = torch.device("cpu" if dry else "cuda")
    torch.manual_seed(0)
    model = _recogniser(dry).to(device)
    cfg = FinetuneParams(
        train_landmark_net=True,
        dtype="fp32" if dry else "bf16",
        device=device.type,
        warmup_epochs=0,
    )
    steps = 3 if dry else 20
    trainer = FinetuneTrainer(model, 100, cfg, iters_per_epoch=steps, reference=frozen_copy(model.landmark_net))
    images, labels = _batch(4 if dry else 128, 100, device)
    losses, t0 = [], time.perf_counter()
    for it in range(steps):
        losses.append(trainer.train_step(images, labels, it)["loss"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "steps": steps,
        "images_per_s": round(steps * len(images) / seconds, 1),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "finite": all(math.isfinite(v) for v in losses),
    }


def device_info(dry: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "host": platform.node(), "dry_run": dry}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda}
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (gloo, fp32)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.dry_run, args.out)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry-run")
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.dry_run else "8")
    result = device_info(args.dry_run)
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in (("pretrain_step", pretrain_step), ("ddp", ddp)):
            start = time.perf_counter()
            result[name] = part(args.dry_run, Path(tmp))
            result[name]["seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    result["finetune"] = finetune(args.dry_run)
    result["finetune"]["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
