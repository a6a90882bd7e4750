"""torch.distributed plumbing: read torchrun's environment, pick NCCL (GPU) or gloo (CPU), relaunch.

``lafs pretrain`` outside torchrun with more than one process configured re-executes itself through
``torch.distributed.run`` (the engine torchrun is), so ``dvc repro pretrain`` on a multi-GPU box uses every
GPU with no wrapper script; inside torchrun it just joins the process group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lafs.errors import StageError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def resolve_device(device: str = "auto", local_rank: int = 0, param: str = "device") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` (a params ``device`` value) -> this process's device: ``auto`` takes the
    GPU when there is one; an explicit ``cuda`` without one fails, naming ``param``, rather than silently
    training on the CPU for hours."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise StageError(f"{param} is cuda but CUDA is not available; use device: auto or cpu")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def init_distributed(device: str = "auto", param: str = "device") -> DistEnv:
    """Join the process group torchrun set up (if any); one process per GPU, or CPU processes on gloo."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank, param)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """True on every rank only if ``flag`` is true on every rank (so all ranks stop together)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients over the ranks in one all-reduce: what DDP does, for a model trained through more
    than its ``forward`` (the recogniser's ``forward_with_landmarks``). Every rank must hold the same set of
    gradients."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def same_on_all_ranks(value: int, device: torch.device) -> bool:
    """Does every rank hold the same ``value``? (E.g. the iteration each one resumed at.)"""
    if not dist.is_initialized():
        return True
    low = torch.tensor([value], dtype=torch.float64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(low.item() == high.item())


def resolve_nproc(nproc_per_node: int | str) -> int:
    if nproc_per_node == "auto":
        return max(torch.cuda.device_count(), 1)
    return int(nproc_per_node)


def relaunch_with_torchrun(
    argv: Sequence[str], nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str, rdzv_id: str = "lafs"
) -> int:
    """Run ``python -m lafs <argv>`` under torch.distributed.run (torchrun) and return its exit code."""
    from torch.distributed.run import get_args_parser, run

    args = [f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        args += [
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rdzv_endpoint}",
            f"--rdzv_id={rdzv_id}",
            f"--node_rank={node_rank}",
        ]
    else:
        args += ["--standalone"]
    args += ["--module", "lafs", *argv]
    try:
        run(get_args_parser().parse_args(args))
    except Exception as exc:  # ChildFailedError: a rank failed; its own message was already printed
        print(f"error: distributed run failed: {exc}", file=sys.stderr)
        return 1
    return 0


def ranks_in_sync(module: torch.nn.Module, device: torch.device) -> bool:
    """Do all ranks hold bit-identical parameters? (A DDP invariant worth checking at the end of a run.)"""
    if not dist.is_initialized():
        return True
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
        probe = torch.stack(
            [flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)).sum()]
        ).to(device)
    gathered = [torch.zeros_like(probe) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, probe)
    return all(torch.equal(g, gathered[0]) for g in gathered)
