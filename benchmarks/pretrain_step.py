"""Benchmark one full SSL pretraining step: ours, and optionally the official LAFS code side by side.

One step = frozen landmark net on every view, landmark jitter, patch sampling, student on all views, teacher on
the global views, DINO loss, backward, per-parameter clipping, AdamW, EMA update (``SSLTrainer.train_step``).
Prints one JSON line per measurement (``images_per_s``, ``step_ms``, ``peak_mem_mb``, ``gflops_per_image``,
``achieved_gflops``, ...) and, with ``--official-repo``, a summary line with ``speedup_vs_official``.

Every measurement runs in its own subprocess, so peak RSS belongs to one implementation and neither inherits the
other's allocator state; the parent imports no torch. The machine is shared and noisy: compare only lines from
one run (``--rounds`` alternates ours / official to spread the noise over both).

    # official size, side by side with a local checkout of the official code (see benchmarks/RESULTS.md)
    python benchmarks/pretrain_step.py --batch 4 --threads 2 --peak --official-repo /tmp/lafs_official
    # quick smoke run
    python benchmarks/pretrain_step.py --model lafs_vit_tiny --batch 2 --steps 1 --warmup 1 --out-dim 256
    # does the real loader (2 workers, augmentations) keep up with the step? (aligned faces of a pipeline run)
    python benchmarks/pretrain_step.py --batch 16 --loader data/aligned --loader-workers 2 --no-flops
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Steps run inside epoch 1: past the official 1-epoch last-layer freeze, so the 25.6M-parameter head layer is
# updated as in 40 of the 41 epochs (in epoch 0 its gradient is computed, then dropped).
EPOCH = 1
ITERS_PER_EPOCH = 1000
# Official model arguments (lafs_train.py train_lafs): dropout / emb_dropout 0.1, CosFace(30000) inside the ViT.
OFFICIAL_NUM_CLASS = 30000
OFFICIAL_LOCAL_LANDMARKS = 36  # hard-coded in train_one_epoch (img_emb2.view(loc, b, 36, 192))


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lafs_vit_base", help="registered backbone (default: official size)")
    p.add_argument("--method", default="lafs", choices=("lafs", "dino_face", "pros"))
    p.add_argument("--batch", type=int, default=4, help="images per step (each gives 2 global + N local views)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast (CPU and CUDA)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, caches)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--out", type=Path, default=None, help="append every JSON line to this file")
    p.add_argument("--peak", action="store_true", help="also measure the fp32 and bf16 matmul peak in this run")
    p.add_argument("--no-flops", action="store_true", help="skip the extra FLOP-counting step")
    p.add_argument(
        "--official-repo",
        type=Path,
        default=None,
        help="checkout of szlbiubiubiu/LAFS_CVPR2024: also run its step at the same settings",
    )
    p.add_argument("--official-only", action="store_true", help="with --official-repo: skip ours")
    p.add_argument("--rounds", type=int, default=1, help="alternate ours / official this many times")
    # Head / view overrides (tests use them to stay fast); the official defaults otherwise.
    p.add_argument("--out-dim", type=int, default=None, help="DINO head output size (official 100000)")
    p.add_argument("--num-landmarks", type=int, default=None, help="landmarks K (official 196)")
    p.add_argument("--local-crops", type=int, default=None, help="local views (official 8)")
    p.add_argument("--local-landmarks", type=int, default=None, help="landmarks per local view (official 36)")
    p.add_argument(
        "--loader",
        type=Path,
        default=None,
        metavar="ALIGNED_DIR",
        help="also time the real data loader (SSLFaces + LAFS/DINO-face views, augmentations included) "
        "on the aligned faces under this folder: alone, and feeding the step",
    )
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader worker processes (default: 2)")
    p.add_argument("--worker", choices=("ours", "official", "peak", "loader"), default=None, help=argparse.SUPPRESS)
    return p


def ssl_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """SSLParams fields set from the command line (everything else stays at the official defaults)."""
    model = args.model
    if args.method == "dino_face" and model.startswith("lafs_"):
        model = "dino_" + model[len("lafs_") :]  # same transformer, regular patch grid
    out: dict[str, Any] = {"method": args.method, "model": model, "dtype": args.dtype, "batch_size": args.batch}
    for key in ("out_dim", "num_landmarks", "local_crops", "local_landmarks"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


# ------------------------------------------------------------------------------------ measurement


def rss_mb() -> float:
    """Current resident set size of this process."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux: the process's high-water mark, which is why each run gets its own process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs torch's FlopCounterMode sees in ``fn`` (matmul/conv/bmm/SDPA, 2 per multiply-add), total and by op."""
    import torch
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    # torch 2.14 has no formula for the CPU flash-attention kernels that SDPA dispatches to on CPU, so attention
    # would count as zero for us (and not for the official einsum/bmm attention): reuse the generic SDPA ones.
    aten = torch.ops.aten
    for op, formula in (
        (aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
        (aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop),
    ):
        flop_counter.flop_registry.setdefault(op, formula)
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def time_steps(
    step: Callable[[int], Any], sync: Callable[[], None], warmup: int, steps: int
) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``steps`` calls after ``warmup`` untimed ones (``step(i)`` gets a running
    index). CPU time is the steadier figure on a shared machine: other processes stretch wall time, not it."""
    for i in range(warmup):
        step(i)
    sync()
    wall, cpu = [], []
    for i in range(warmup, warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(i)
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def measure(
    step: Callable[[int], Any], args: argparse.Namespace, device: Any, rss_start: float, rss_setup: float
) -> dict[str, Any]:
    """Timing, peak memory and counted FLOPs of ``step`` (the FLOP count runs one extra, untimed step)."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = time_steps(step, sync, args.warmup, args.steps)
    if device.type == "cuda":
        peak, increase = torch.cuda.max_memory_allocated() / 2**20, None
    else:
        peak = peak_rss_mb()
        increase = peak - rss_start
    median = statistics.median(times)
    out: dict[str, Any] = {
        "step_ms": round(1000 * median, 1),
        "step_ms_mean": round(1000 * statistics.fmean(times), 1),
        # Fastest step: the least-disturbed estimate when other processes compete for the cores (with 2 OpenMP
        # threads on 2 shared cores, a descheduled thread stalls every parallel region of the step).
        "step_ms_min": round(1000 * min(times), 1),
        "step_ms_all": [round(1000 * t, 1) for t in times],
        "images_per_s": round(args.batch / median, 4),
        "images_per_s_best": round(args.batch / min(times), 4),
        "step_cpu_ms": round(1000 * statistics.median(cpu_times), 1),
        "peak_mem_mb": round(peak, 1),
        # CPU: peak RSS minus RSS before anything was built (models + optimizer state + activations) and minus
        # RSS after setup (what the steps themselves add: activations, gradients, optimizer moments).
        "peak_mem_increase_mb": None if increase is None else round(increase, 1),
        "step_mem_increase_mb": None if increase is None else round(peak - rss_setup, 1),
    }
    if not args.no_flops:
        flops, by_op = count_flops(lambda: step(args.warmup + args.steps))
        out["gflops_per_image"] = round(flops / args.batch / 1e9, 3)
        out["achieved_gflops"] = round(flops / 1e9 / median, 3)
        out["gflops_per_image_by_op"] = {op: round(n / args.batch / 1e9, 3) for op, n in sorted(by_op.items())}
    return out


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    return {
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def _batch_views(cfg: Any, batch: int, device: Any) -> dict[str, Any]:
    """Random inputs in [-1, 1] shaped like LAFSViews / DINOFaceViews batches (values do not change cost)."""
    import torch

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1).to(device)

    if cfg.method == "dino_face":
        return {
            "global": rand(batch, cfg.global_crops, 3, 112, 112),
            "local": rand(batch, cfg.local_crops, 3, cfg.local_size, cfg.local_size),
        }
    views = cfg.global_crops + cfg.local_crops
    return {"clean": rand(batch, views, 3, 112, 112), "augmented": rand(batch, views, 3, 112, 112)}


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Our ``SSLTrainer.train_step`` at the requested size."""
    import torch

    from lafs.config import SSLParams
    from lafs.engine.ssl import SSLTrainer, build_ssl_task
    from lafs.models import create_model
    from lafs.models.vit import num_params

    rss_start = rss_mb()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = SSLParams(**ssl_overrides(args))
    landmark_net = None
    if cfg.method != "dino_face":
        landmark_net = create_model(cfg.landmark_net, num_landmarks=cfg.num_landmarks)
    task = build_ssl_task(cfg, landmark_net=landmark_net).to(device)
    trainer = SSLTrainer(task, iters_per_epoch=ITERS_PER_EPOCH)
    batch = _batch_views(cfg, args.batch, device)
    rss_setup = rss_mb()
    last: dict[str, float] = {}

    def step(i: int) -> None:
        last.update(trainer.train_step(batch, EPOCH * ITERS_PER_EPOCH + i))

    result = measure(step, args, device, rss_start, rss_setup)
    return {
        "impl": "ours",
        "method": cfg.method,
        "model": cfg.model,
        "out_dim": cfg.out_dim,
        "num_landmarks": cfg.num_landmarks,
        "local_crops": cfg.local_crops,
        "local_landmarks": cfg.local_landmarks,
        "student_params_m": round(num_params(task.student) / 1e6, 2),
        "loss": round(last["loss"], 4),
        **result,
        **environment(args),
    }


def _loader(args: argparse.Namespace, cfg: Any) -> Any:
    """The pretrain stage's own loader (SSLFaces + the method's views) over the aligned faces in ``--loader``."""
    from torch.utils.data import DataLoader

    from lafs.data.datasets import SSLFaces
    from lafs.stages.pretrain import _views

    paths = sorted(p for p in args.loader.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(paths) < 2 * args.batch:
        raise SystemExit(f"--loader {args.loader}: {len(paths)} images, need at least {2 * args.batch}")
    dataset = SSLFaces(paths, _views(cfg), None, seed=0)
    return DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.loader_workers,
        persistent_workers=args.loader_workers > 0,
    )


def run_loader(args: argparse.Namespace) -> dict[str, Any]:
    """Loader images/s alone, then training steps fed by that loader (the real pipeline): the loader starves the
    step when fed throughput falls below the step-only throughput of the ``ours`` row of the same run."""
    import torch

    from lafs.config import SSLParams
    from lafs.engine.ssl import SSLTrainer, build_ssl_task
    from lafs.models import create_model

    torch.manual_seed(0)
    cfg = SSLParams(**ssl_overrides(args))
    loader = _loader(args, cfg)
    batches = args.warmup + args.steps

    def batch_stream() -> Iterator[dict[str, Any]]:
        while True:
            yield from loader

    stream = batch_stream()
    next(stream)  # worker start-up is a one-off cost, not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    loader_s = time.perf_counter() - start
    landmark_net = None
    if cfg.method != "dino_face":
        landmark_net = create_model(cfg.landmark_net, num_landmarks=cfg.num_landmarks)
    trainer = SSLTrainer(build_ssl_task(cfg, landmark_net=landmark_net), iters_per_epoch=ITERS_PER_EPOCH)

    def fed_step(i: int) -> None:
        trainer.train_step(next(stream), EPOCH * ITERS_PER_EPOCH + i)

    wall, _ = time_steps(fed_step, lambda: None, args.warmup, args.steps)
    return {
        "impl": "loader",
        "method": cfg.method,
        "model": cfg.model,
        "loader_workers": args.loader_workers,
        "images": len(loader.dataset),
        "loader_images_per_s": round(batches * args.batch / loader_s, 3),
        "fed_step_ms": round(1000 * statistics.median(wall), 1),
        "fed_images_per_s": round(args.batch / statistics.median(wall), 4),
        **environment(args),
    }


# ------------------------------------------------------------------------------ official harness


def _ddp_stand_in(module: Any) -> Any:
    """Stand-in for DistributedDataParallel at world size 1: ``.module`` and ``module.`` parameter names as DDP,
    no gradient all-reduce. Their DDP is built without find_unused_parameters although the CosFace matrix never
    gets a gradient, which recent DDP rejects on the second iteration; dropping DDP (and its overhead) can only
    favour the official figure."""
    from torch import nn

    class DDPStandIn(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

        def forward(self, *a: Any, **k: Any) -> Any:
            return self.module(*a, **k)

    return DDPStandIn(module)


def _official_shims(device: Any, dtype: str) -> None:
    """Make the CUDA-only official step run here without touching its code.

    - ``Tensor.cuda()`` (inputs, landmark noise, random subsets) is the identity on CPU;
    - ``torch.cuda.synchronize()`` (end of every step) is a no-op on CPU;
    - ``torch.cuda.amp.autocast(enabled)`` (their AMP switch, deprecated in torch 2.x) becomes ``torch.autocast``
      on our device: bf16 when ``--dtype bf16``, off otherwise (their CUDA recipe is fp16 + GradScaler);
    - ``MetricLogger.synchronize_between_processes`` (end-of-epoch logging, not the step) builds a CUDA tensor:
      a no-op on CPU, where the world size is 1 and there is nothing to synchronise;
    - ``IPython.embed`` is imported by ViT_face.py but never called: a stub module if IPython is missing.
    """
    import torch

    if device.type == "cpu":
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        torch.cuda.synchronize = lambda *a, **k: None
    amp_dtype = torch.bfloat16 if dtype == "bf16" else None

    def autocast(enabled: bool = True, *a: Any, **k: Any) -> Any:
        return torch.autocast(device.type, dtype=amp_dtype, enabled=bool(enabled) and amp_dtype is not None)

    torch.cuda.amp.autocast = autocast  # type: ignore[assignment]
    try:
        import IPython  # noqa: F401
    except ImportError:
        sys.modules["IPython"] = types.SimpleNamespace(embed=lambda *a, **k: None)  # type: ignore[assignment]


def _import_official(repo: Path) -> types.SimpleNamespace:
    """Import the official modules from ``repo`` (and ``repo/_deps`` for einops, if it was installed there)."""
    repo = repo.resolve()
    missing = [
        f
        for f in (
            "lafs_train.py",
            "utils.py",
            "vision_transformer.py",
            "face_pre_pro/ViT_face.py",
            "face_pre_pro/mobilenet.py",
        )
        if not (repo / f).is_file()
    ]
    if missing:
        raise SystemExit(
            f"--official-repo {repo}: missing {missing}; point it at a checkout of szlbiubiubiu/LAFS_CVPR2024"
        )
    for extra in (repo / "_deps", repo):
        if extra.is_dir():
            sys.path.insert(0, str(extra))
    try:
        import lafs_train
        import utils as official_utils
        from face_pre_pro.ViT_face import ViT_face_landmark_patch8, face_landmark_4simmin_glo_loc
        from vision_transformer import DINOHead
    except ImportError as exc:
        raise SystemExit(
            f"cannot import the official code from {repo}: {exc} (einops is needed: "
            f"`pip install --target {repo}/_deps einops`)"
        ) from exc
    return types.SimpleNamespace(
        train=lafs_train,
        utils=official_utils,
        ViT=ViT_face_landmark_patch8,
        landmark=face_landmark_4simmin_glo_loc,
        DINOHead=DINOHead,
    )


def run_official(args: argparse.Namespace) -> dict[str, Any]:
    """The official step: models built as in lafs_train.py train_lafs (lines ~255-390), the step itself is
    their ``train_one_epoch`` on a one-batch loader (per-landmark grid_sample loop, MultiCropWrapper, DINOLoss,
    clip_gradients, cancel_gradients_last_layer, the EMA loop over all parameters)."""
    import torch
    import torch.distributed as dist

    from lafs.config import SSLParams
    from lafs.models.vit import num_params
    from lafs.models.zoo import SIZES

    rss_start = rss_mb()
    device = torch.device(args.device)
    cfg = SSLParams(**ssl_overrides(args))
    if cfg.method != "lafs" or cfg.num_landmarks != 196 or cfg.local_landmarks != OFFICIAL_LOCAL_LANDMARKS:
        raise SystemExit("the official step exists only for method lafs with 196 landmarks and 36 per local view")
    size = SIZES[cfg.model.split("_")[-1]]
    _official_shims(device, args.dtype)
    off = _import_official(args.official_repo)
    if device.type == "cpu":
        off.utils.MetricLogger.synchronize_between_processes = lambda self: None
    if not dist.is_initialized():  # DINOLoss.update_center all-reduces the centre: a 1-process gloo group
        init = Path(os.environ.get("TMPDIR", "/tmp")) / f"lafs_bench_pg_{os.getpid()}"
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):  # their constructors print; keep stdout for the JSON line
        landmarkcnn = off.landmark(
            loss_type="CosFace",
            GPU_ID=None,
            num_class=300,
            num_patches=196,
            image_size=112,
            patch_size=8,
            dim=512,
            depth=12,
            heads=11,
            mlp_dim=2560,
            dropout=0.1,
            emb_dropout=0.1,
        ).to(device)
        landmarkcnn.eval()  # no stage-1 checkpoint was released: random weights, same cost
        vit_kwargs = dict(
            loss_type="CosFace",
            GPU_ID=None,
            num_class=OFFICIAL_NUM_CLASS,
            image_size=112,
            patch_size=8,
            dim=size["embed_dim"],
            depth=size["depth"],
            heads=size["num_heads"],
            dim_head=size["head_dim"],
            num_patches=196,
            mlp_dim=size["mlp_dim"],
            dropout=0.1,
            emb_dropout=0.1,
            with_land=False,
            use_standcoord=False,
            Random_prob=False,
            shuffle=False,
        )
        teacher = off.ViT(**vit_kwargs)
        student = off.ViT(**vit_kwargs)
        embed_dim = size["embed_dim"]
        student = off.utils.MultiCropWrapper(
            student, off.DINOHead(embed_dim, cfg.out_dim, use_bn=False, norm_last_layer=True)
        )
        teacher = off.utils.MultiCropWrapper(teacher, off.DINOHead(embed_dim, cfg.out_dim, False))
        student, teacher = student.to(device), teacher.to(device)
        teacher_without_ddp = teacher
        student = _ddp_stand_in(student)
        teacher_without_ddp.load_state_dict(student.module.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        for p in landmarkcnn.parameters():
            p.requires_grad = False
        dino_loss = off.train.DINOLoss(
            cfg.out_dim,
            cfg.local_crops + 2,
            cfg.warmup_teacher_temp,
            cfg.teacher_temp,
            cfg.warmup_teacher_temp_epochs,
            cfg.epochs,
        ).to(device)
        optimizer = torch.optim.AdamW(off.utils.get_params_groups(student))
    # bf16 needs no loss scaling; a disabled scaler keeps their `fp16_scaler is not None` (autocast) branch.
    scaler = torch.amp.GradScaler(device.type, enabled=False) if args.dtype == "bf16" else None
    niter = 1  # one-batch loader: global iteration = epoch
    lr_schedule = off.utils.cosine_scheduler(
        cfg.lr * args.batch / 256.0, cfg.min_lr, cfg.epochs, niter, warmup_epochs=cfg.warmup_epochs
    )
    wd_schedule = off.utils.cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter)
    momentum_schedule = off.utils.cosine_scheduler(cfg.momentum_teacher, 1, cfg.epochs, niter)
    train_args = types.SimpleNamespace(
        epochs=cfg.epochs, clip_grad=cfg.clip_grad, freeze_last_layer=cfg.freeze_last_layer
    )
    images = _official_images(args.batch, cfg.local_crops, device)
    rss_setup = rss_mb()
    last: dict[str, float] = {}

    def step(i: int) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            last.update(
                off.train.train_one_epoch(
                    student,
                    teacher,
                    teacher_without_ddp,
                    landmarkcnn,
                    dino_loss,
                    [(images, None)],
                    optimizer,
                    lr_schedule,
                    wd_schedule,
                    momentum_schedule,
                    EPOCH,
                    scaler,
                    train_args,
                )
            )

    result = measure(step, args, device, rss_start, rss_setup)
    return {
        "impl": "official",
        "method": "lafs",
        "model": cfg.model,
        "out_dim": cfg.out_dim,
        "num_landmarks": 196,
        "local_crops": cfg.local_crops,
        "local_landmarks": OFFICIAL_LOCAL_LANDMARKS,
        "student_params_m": round(num_params(student) / 1e6, 2),
        "loss": round(last["loss"], 4),
        **result,
        **environment(args),
    }


def _official_images(batch: int, local_crops: int, device: Any) -> list[Any]:
    """DataAugmentation_LAFS output order: (clean, augmented) per view, globals first -> 2 * (2 + L) tensors."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(batch, 3, 112, 112, generator=gen) * 2 - 1).to(device) for _ in range(2 * (2 + local_crops))]


def run_peak(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from matmul_peak import measure_peaks

    return {"impl": "peak", **measure_peaks(args.device), **environment(args)}


# --------------------------------------------------------------------------------------- parent


def spawn(kind: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and parse the JSON line it prints last."""
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", kind]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{kind} run failed (exit {proc.returncode}); its stderr is above")
    return json.loads(lines[-1])


def summarise(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians per implementation, the ours / official throughput ratio and achieved / peak ratios."""
    ours = [r for r in results if r.get("impl") == "ours"]
    official = [r for r in results if r.get("impl") == "official"]
    peak = next((r for r in results if r.get("impl") == "peak"), None)
    loader = [r for r in results if r.get("impl") == "loader"]
    if not (official or peak or loader):
        return None
    out: dict[str, Any] = {"impl": "summary"}

    def med(rows: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    for name, rows in (("ours", ours), ("official", official)):
        if rows:
            out[f"{name}_images_per_s"] = med(rows, "images_per_s")
            out[f"{name}_images_per_s_best"] = max(r["images_per_s_best"] for r in rows)
            out[f"{name}_achieved_gflops"] = med(rows, "achieved_gflops")
            out[f"{name}_step_cpu_ms"] = med(rows, "step_cpu_ms")
    if ours and official:
        out["speedup_vs_official"] = round(out["ours_images_per_s"] / out["official_images_per_s"], 3)
        out["speedup_vs_official_best"] = round(out["ours_images_per_s_best"] / out["official_images_per_s_best"], 3)
        if out["ours_step_cpu_ms"] and out["official_step_cpu_ms"]:  # same batch: CPU-time ratio per step
            out["speedup_vs_official_cpu_time"] = round(out["official_step_cpu_ms"] / out["ours_step_cpu_ms"], 3)
    if loader and ours:
        # > 1: the workers produce batches faster than the step consumes them; fed / step-only ~ 1: no starvation
        out["loader_images_per_s"] = med(loader, "loader_images_per_s")
        out["fed_images_per_s"] = med(loader, "fed_images_per_s")
        out["loader_vs_step"] = round(out["loader_images_per_s"] / out["ours_images_per_s"], 3)
        out["fed_vs_step_only"] = round(out["fed_images_per_s"] / out["ours_images_per_s"], 3)
    if peak:
        for name in ("ours", "official"):
            achieved = out.get(f"{name}_achieved_gflops")
            for dtype in ("fp32", "bf16"):
                top = peak.get(f"peak_{dtype}_gflops")
                if achieved is not None and top:
                    out[f"{name}_vs_peak_{dtype}"] = round(achieved / top, 4)
        out["peak_fp32_gflops"] = peak.get("peak_fp32_gflops")
        out["peak_bf16_gflops"] = peak.get("peak_bf16_gflops")
    return out


def _emit(row: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:
            fh.write(line + "\n")


def plan(args: argparse.Namespace) -> Iterator[str]:
    if args.peak:
        yield "peak"
    for _ in range(max(1, args.rounds)):
        if not args.official_only:
            yield "ours"
        if args.official_repo is not None:
            yield "official"
        if args.loader is not None:
            yield "loader"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        runner = {"ours": run_ours, "official": run_official, "peak": run_peak, "loader": run_loader}[args.worker]
        row = runner(args)
        bad = [
            k
            for k in ("images_per_s", "step_ms", "gflops_per_image")
            if k in row and not (isinstance(row[k], float | int) and math.isfinite(row[k]))
        ]
        if bad:
            raise SystemExit(f"non-finite measurement {bad}: {row}")
        print(json.dumps(row), flush=True)
        return 0
    if args.official_only and args.official_repo is None:
        raise SystemExit("--official-only needs --official-repo PATH")
    results = []
    for kind in plan(args):
        row = spawn(kind, args, argv)
        results.append(row)
        _emit(row, args.out)
    summary = summarise(results)
    if summary is not None:
        _emit(summary, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
