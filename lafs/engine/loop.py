"""The one training loop of the stages that train (landmark_net, pretrain, finetune).

What every stage needs and must not solve again: epochs over a :class:`~lafs.data.datasets.ResumableSampler`
that starts mid-epoch on resume (``skip``), a seed per iteration (dropout / drop-path / augmentation randomness
is a function of the iteration, not of history, so a resumed run is the uninterrupted one), a non-finite loss
turned into an actionable :class:`StageError` with the last good checkpoint kept, SIGTERM turned into a
checkpoint and :class:`Preempted` (exit 143), checkpoints every ``checkpoint_every`` iterations and at each
epoch end, MLflow metrics (batched by :class:`~lafs.tracking.RunLogger`), a progress bar and the run's final
status. A stage supplies only what differs: its step, its checkpoint and what happens at an epoch's end
(validation, early stopping).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from lafs.engine.preemption import Preempted, SigtermFlag
from lafs.errors import StageError


class NonFiniteLossError(FloatingPointError):
    """A step's loss was NaN / inf (raised by a trainer's step; the loop adds what to do about it)."""


class RunLog(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...


@dataclass
class LoopSpec:
    """The schedule of one training run."""

    name: str  # progress bar and messages, e.g. "finetune pretrained"
    epochs: int
    iters_per_epoch: int
    batch_size: int  # per process
    checkpoint_every: int  # iterations between checkpoints (plus one at each epoch end)
    last: Path  # the checkpoint file, named in messages
    advice: str = "lower the lr or use dtype fp32"  # what to do about a non-finite loss
    world_size: int = 1
    show_progress: bool = True


@dataclass
class LoopResult:
    iteration: int
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's
    images: int = 0  # seen by all processes in this run (not before a resume)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


Step = Callable[[Any, int], Mapping[str, float]]  # (batch, iteration) -> metrics; raises NonFiniteLossError


def _default_stop(raised: bool) -> bool:
    return raised


def train_loop(
    spec: LoopSpec,
    start: int,
    *,
    samplers: Iterable[Any],
    loader: Callable[[int], Iterable[Any]],
    step: Step,
    checkpoint: Callable[[int], None],
    logger: RunLog,
    seed_iteration: Callable[[int], None],
    after_step: Callable[[int, Mapping[str, float]], None] | None = None,
    end_epoch: Callable[[int, int], bool] | None = None,
    stop: Callable[[bool], bool] = _default_stop,
) -> LoopResult:
    """Train from iteration ``start`` to the end of ``spec.epochs`` (or until ``end_epoch`` returns True).

    ``samplers``: every object with ``set_epoch`` (dataset, sampler) and the one with ``skip`` (the sampler);
    ``loader(epoch)``: the epoch's batches from there; ``seed_iteration(it)`` seeds the iteration's randomness;
    ``after_step(it, metrics)``: a stage's own check (e.g. a collapsing teacher: raise StageError);
    ``end_epoch(epoch, it)``: the stage's epoch end (validation, its checkpoint); True stops early. Without it
    the loop checkpoints at each epoch end. ``stop(sigterm_raised)``: whether to stop now (DDP: any rank).
    """
    it, seen, metrics, t0 = start, 0, {}, time.perf_counter()
    per_epoch = spec.iters_per_epoch
    bar = tqdm(total=spec.epochs * per_epoch, initial=start, desc=spec.name, unit="it", disable=not spec.show_progress)
    try:
        with SigtermFlag() as sigterm:
            for epoch in range(start // per_epoch, spec.epochs):
                for s in samplers:
                    s.set_epoch(epoch)
                    if hasattr(s, "skip"):
                        s.skip = (it - epoch * per_epoch) * spec.batch_size
                for batch in loader(epoch):
                    seed_iteration(it)
                    try:
                        metrics = dict(step(batch, it))
                    except NonFiniteLossError as exc:
                        raise StageError(
                            f"{exc}; the last good checkpoint {spec.last} is kept. To fix: {spec.advice}"
                        ) from None
                    it += 1
                    seen += spec.batch_size * spec.world_size
                    rate = seen / (time.perf_counter() - t0)
                    if after_step is not None:
                        after_step(it, metrics)
                    logger.log_metrics({**metrics, "images_per_s": rate, "epoch": epoch}, it)
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("loss", "train_acc")})
                    stopping = stop(sigterm.raised)
                    # a periodic checkpoint that falls on an epoch end waits for the epoch's own (after validation)
                    if stopping or (it % spec.checkpoint_every == 0 and it % per_epoch):
                        checkpoint(it)
                    if stopping:
                        raise Preempted(
                            f"SIGTERM at iteration {it}: checkpoint saved to {spec.last}; rerun the same command "
                            "to resume"
                        )
                if end_epoch is None:
                    checkpoint(it)
                elif end_epoch(epoch, it):
                    break
    finally:
        bar.close()
    return LoopResult(it, metrics, seen, time.perf_counter() - t0)


@contextmanager
def ends_run_on_failure(logger: RunLog) -> Iterator[None]:
    """Around a stage's :func:`train_loop`: a preempted run ends KILLED, a failed one FAILED; one that trained to
    the end stays open for the stage's last metrics and artifacts (the stage ends it)."""
    try:
        yield
    except Preempted:
        logger.end("KILLED")
        raise
    except BaseException:
        logger.end("FAILED")
        raise


@contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """While a run trains with ``deterministic: true``: deterministic kernels only (torch's switch, oneDNN's and
    cuDNN's, cuBLAS with a fixed workspace) and the intra-op thread count pinned, so two runs of a stage, or a
    killed and resumed one, can end bit-identical; everything is put back afterwards."""
    if not enabled:
        yield
        return
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.mkldnn.deterministic,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.get_num_threads(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.mkldnn.deterministic = True  # type: ignore[assignment]
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.set_num_threads(saved[5])
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.mkldnn.deterministic = saved[2]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3], saved[4]
        torch.set_num_threads(saved[5])
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]
