"""Stage ``pretrain``: self-supervised pretraining (LAFS, DINO-face or ProS) on the SSL split.

Runs as one process or under torchrun (DDP: NCCL on GPUs, gloo on CPUs). Checkpoints go to
``<out>/last.pt`` atomically every ``checkpoint_every`` iterations and at each epoch end; an existing
``last.pt`` is resumed automatically, exactly: data order, augmentations, jitter and drop-path all draw from
streams seeded by (seed, epoch, index) or (seed, rank, iteration), never from state lost in a crash.
SIGTERM (preemption) saves a checkpoint and exits; NaN/inf loss or a collapsed teacher stops the run and
keeps the last good checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from lafs.config import Params, SSLParams, resolved
from lafs.conventions import ALIGNED_SIZE
from lafs.data.datasets import ResumableSampler, SSLFaces, SSLShardDecode, rank_sampler
from lafs.data.images import file_sha256
from lafs.data.sampling import derived_seed
from lafs.data.shards import ShardSet, ShardStream, load_shard_set
from lafs.data.views import DINOFaceViews, LAFSViews
from lafs.engine import remote
from lafs.engine.checkpoint import resume_state, save_checkpoint
from lafs.engine.distributed import (
    DistEnv,
    all_true,
    barrier,
    init_distributed,
    ranks_in_sync,
    same_on_all_ranks,
    shutdown,
)
from lafs.engine.loop import LoopSpec, deterministic_mode, ends_run_on_failure, train_loop
from lafs.engine.ssl import SSLTrainer, backbone_kwargs, build_ssl_task, relative_change
from lafs.layout import CHECKPOINT_FILE, TEACHER_FILE, Layout
from lafs.models.io import load_model, save_model
from lafs.stages import RunOptions, StageError, write_metrics
from lafs.tracking import RunLogger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainPaths:
    """What one pretraining reads (``layout``'s splits and tables) and writes (``out_dir``, ``metrics``)."""

    layout: Layout
    out_dir: Path
    landmark_net: Path
    metrics: Path

    @classmethod
    def of(cls, layout: Layout, out_dir: Path | None = None) -> PretrainPaths:
        return cls(layout, out_dir or layout.pretrain, layout.landmark_net, layout.metrics("pretrain"))

    @property
    def last(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    @property
    def teacher(self) -> Path:
        return self.out_dir / TEACHER_FILE


@dataclass
class PretrainSummary:
    iterations: int
    epochs: int
    final_loss: float
    resumed_from: int
    images_per_s: float
    metrics: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        resumed = f", resumed at iteration {self.resumed_from}" if self.resumed_from else ""
        return (
            f"pretrained {self.iterations} iterations / {self.epochs} epochs{resumed}; "
            f"final loss {self.final_loss:.4f}, {self.images_per_s:.1f} images/s"
        )


def load_landmark_net(path: Path, device: torch.device) -> torch.nn.Module:
    """The frozen landmark CNN written by the landmark_net stage (a :mod:`lafs.models.io` model file)."""
    if not path.exists():
        raise StageError(
            f"landmark network {path} not found: run `dvc repro landmark_net` first, or set "
            "pretrain.landmark_source: extracted to place patches at the extracted landmarks"
        )
    return load_model(path, device)


def _ssl_table(cfg: SSLParams, layout: Layout) -> tuple[list[Path], torch.Tensor | None]:
    split = layout.splits / "ssl.csv"
    if not split.exists():
        raise StageError(f"{split} not found: run the split stage first (`dvc repro split`)")
    table = pd.read_csv(split)
    if table.empty:
        raise StageError(f"{split} holds no images: check the split params")
    paths = [layout.root / p for p in table["aligned_path"]]
    if cfg.method == "dino_face" or cfg.landmark_source == "net":
        return paths, None
    dense = pd.read_parquet(layout.landmarks, columns=["aligned_path", "dense"])
    dense = table[["aligned_path"]].merge(dense, on="aligned_path", how="left")
    if dense["dense"].isna().any():
        raise StageError(f"some SSL images have no dense landmarks in {layout.landmarks}; rerun landmarks")
    landmarks = torch.tensor([list(d) for d in dense["dense"]], dtype=torch.float32).reshape(len(paths), -1, 2)
    if landmarks.shape[1] != cfg.num_landmarks:
        raise StageError(
            f"extracted landmarks have K={landmarks.shape[1]} points but pretrain.num_landmarks is "
            f"{cfg.num_landmarks}; set them equal"
        )
    return paths, landmarks


def _training_set(
    cfg: SSLParams, layout: Layout, env: DistEnv, shards: ShardSet | None
) -> tuple[Dataset, ResumableSampler | None]:
    """The SSL faces and the sampler over them (files), or the rank's stream of ``shards`` samples (no sampler)."""
    if shards is not None:
        extracted = cfg.method != "dino_face" and cfg.landmark_source == "extracted"
        stream = ShardStream(
            shards,
            SSLShardDecode(_views(cfg), cfg.seed, cfg.num_landmarks if extracted else None),
            cfg.batch_size,
            seed=cfg.seed,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=cfg.num_workers,
            shuffle_buffer=cfg.shuffle_buffer,
        )
        return stream, None
    image_paths, landmarks = _ssl_table(cfg, layout)
    dataset = SSLFaces(image_paths, _views(cfg), landmarks, seed=cfg.seed)
    sampler = rank_sampler(
        dataset, env.world_size, env.rank, cfg.seed, cfg.batch_size, "SSL images", "pretrain.batch_size"
    )
    return dataset, sampler


def _input_fingerprint(cfg: SSLParams, paths: PretrainPaths, shards: ShardSet | None) -> dict[str, str]:
    """sha256 of the files a run depends on besides its params: resuming across other inputs is wrong."""
    files = {"ssl_split": paths.layout.splits / "ssl.csv"}
    if cfg.method != "dino_face" and cfg.landmark_source == "net":
        files["landmark_net"] = paths.landmark_net
    inputs = {name: file_sha256(f) for name, f in files.items() if f.exists()}
    if shards is not None:
        inputs["shards_index"] = shards.digest
    return inputs


def _views(cfg: SSLParams):
    if cfg.method == "dino_face":
        return DINOFaceViews(
            cfg.global_crops, cfg.local_crops, ALIGNED_SIZE, cfg.local_size, cfg.global_scale, cfg.local_scale
        )
    return LAFSViews(cfg.global_crops, cfg.local_crops, ALIGNED_SIZE, cfg.global_scale)


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> PretrainSummary:
    """The stage (one process of it under torchrun): pretrain into ``layout.pretrain``."""
    return train(params.pretrain, PretrainPaths.of(layout), options.restart_on_change)


def train(cfg: SSLParams, paths: PretrainPaths, restart_on_change: bool = False) -> PretrainSummary:
    """Train (or resume) to the end; ``restart_on_change`` sets aside a checkpoint of other params."""
    env = init_distributed(cfg.device, param="pretrain.device")
    try:
        with deterministic_mode(cfg.deterministic):
            return _train(cfg, paths, env, restart_on_change)
    finally:
        shutdown()


def _train(cfg: SSLParams, paths: PretrainPaths, env: DistEnv, restart_on_change: bool) -> PretrainSummary:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    shards = load_shard_set(cfg.shards_uri or paths.layout.shards, "ssl") if cfg.data_source == "shards" else None
    dataset, sampler = _training_set(cfg, paths.layout, env, shards)
    iters_per_epoch = len(sampler if sampler is not None else dataset) // cfg.batch_size  # type: ignore[arg-type]

    net = (
        load_landmark_net(paths.landmark_net, env.device)
        if (cfg.method != "dino_face" and cfg.landmark_source == "net")
        else None
    )
    task = build_ssl_task(cfg, net).to(env.device)
    student_ddp = (
        DistributedDataParallel(task.student, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if env.distributed
        else None
    )
    trainer = SSLTrainer(task, iters_per_epoch, cfg.batch_size * env.world_size, student_ddp)
    initial = {k: v.detach().clone() for k, v in task.teacher.backbone.state_dict().items()}  # seeded: same on resume

    start_it, run_id = 0, None
    latest: dict[str, float] = {}  # the last step's metrics, kept in checkpoints: a finished run reports them again
    # One download per node (local rank 0); nodes may or may not share the checkpoint directory. Rank 0 writes
    # last.pt and then mirrors it, so its own copy is the newest; any other node's copy may be stale (an earlier
    # restart's download), so they always take the mirror when there is one.
    fetch = cfg.checkpoint_uri and env.local_rank == 0 and (env.rank != 0 or not paths.last.exists())
    if fetch and remote.download_if_exists(cfg.checkpoint_uri, paths.last.name, paths.last):
        log.info("resuming from %s/%s", cfg.checkpoint_uri, paths.last.name)
    barrier()
    inputs = _input_fingerprint(cfg, paths, shards)
    # every rank reads last.pt and decides alike; rank 0 alone sets a changed one aside, once all have read it
    state = resume_state(
        paths.last,
        resolved(cfg),
        inputs,
        stage="pretrain",
        input_names="SSL split, landmark net",
        restart_on_change=restart_on_change,
        map_location=env.device,
        set_aside=env.is_main,
        before_set_aside=barrier,
    )
    if state is not None:
        trainer.load_state_dict(state)
        start_it, run_id = int(state["iteration"]), state.get("mlflow_run_id") or None
        latest = dict(state.get("metrics") or {})
    if not same_on_all_ranks(start_it, env.device):
        raise StageError(
            f"the ranks found checkpoints of different iterations (this one: {start_it}): the nodes' copies of "
            f"{paths.last.name} and its mirror {cfg.checkpoint_uri} disagree; delete the stale copy and restart"
        )

    logger = RunLogger(
        env.is_main,
        cfg.experiment,
        f"pretrain-{cfg.method}",
        resolved(cfg),
        run_id=run_id,
        uri=cfg.tracking_uri,
        tags={"stage": "pretrain", "method": cfg.method},
    )

    def checkpoint(it: int) -> None:
        if env.is_main:
            save_checkpoint(
                {
                    **trainer.state_dict(),
                    "iteration": it,
                    "config": resolved(cfg),
                    "inputs": inputs,
                    "mlflow_run_id": logger.run_id or "",
                    "metrics": latest,
                },
                paths.last,
            )
            if cfg.checkpoint_uri:
                remote.upload(paths.last, cfg.checkpoint_uri)
        barrier()

    def loader(epoch: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=cfg.num_workers,
            pin_memory=env.device.type == "cuda",
            persistent_workers=False,
        )

    def step(batch: Any, it: int) -> dict[str, float]:
        generator = torch.Generator(env.device).manual_seed(derived_seed(cfg.seed, env.rank, it))
        return trainer.train_step(batch, it, generator)

    low_std = 0

    def after_step(it: int, metrics: Mapping[str, float]) -> None:
        """Keep the step's metrics; stop a collapsing teacher."""
        nonlocal low_std
        latest.update({k: float(v) for k, v in metrics.items()})
        low_std = low_std + 1 if metrics["teacher_std"] < cfg.collapse_std else 0
        if low_std >= cfg.collapse_patience:
            raise StageError(
                f"teacher collapsed at iteration {it}: output std {metrics['teacher_std']:.2e} < "
                f"{cfg.collapse_std} for {low_std} iterations (entropy {metrics['teacher_entropy']:.3f});"
                f" the last good checkpoint {paths.last} is kept. Check centring/temperatures/lr"
            )

    spec = LoopSpec(
        f"pretrain {cfg.method}",
        cfg.epochs,
        iters_per_epoch,
        cfg.batch_size,
        cfg.checkpoint_every,
        paths.last,
        advice="lower the lr or use dtype fp32",
        world_size=env.world_size,
        show_progress=env.is_main,
    )
    with ends_run_on_failure(logger):
        result = train_loop(
            spec,
            start_it,
            samplers=[s for s in (sampler, dataset) if s is not None],
            loader=loader,
            step=step,
            checkpoint=checkpoint,
            logger=logger,
            # drop-path etc.: a function of the iteration, not of history
            seed_iteration=lambda it: torch.manual_seed(derived_seed(cfg.seed, env.rank, it)),
            after_step=after_step,
            stop=lambda raised: not all_true(not raised, env.device),  # any rank's SIGTERM stops all
        )
    it, metrics = result.iteration, result.metrics or latest or {"loss": float("nan")}

    in_sync = ranks_in_sync(task.student, env.device)
    if not in_sync:
        raise StageError("DDP ranks ended with different student weights; this is a bug, please report it")
    summary = PretrainSummary(
        iterations=it,
        epochs=cfg.epochs,
        final_loss=metrics["loss"],
        resumed_from=start_it,
        images_per_s=result.images_per_s,
        metrics={k: float(v) for k, v in metrics.items()},
    )
    if env.is_main:
        backbone = task.teacher.backbone
        save_model(backbone, cfg.model, backbone_kwargs(cfg), paths.teacher, config=resolved(cfg))
        moved = relative_change(initial, backbone.state_dict())
        log.info("pretrain: the teacher moved %.2f%% (relative L2) from its initialisation", 100 * moved)
        write_metrics(
            paths.metrics,
            {
                "iterations": it,
                "final_loss": summary.final_loss,
                "teacher_relative_change": moved,
                "teacher_entropy": metrics.get("teacher_entropy"),
                "images_per_s": summary.images_per_s,
                "world_size": env.world_size,
                "ranks_in_sync": in_sync,
            },
        )
        logger.log_artifact(paths.teacher, "teacher")
        logger.log_metrics({"final_loss": summary.final_loss, "teacher_relative_change": moved}, it)
        logger.end("FINISHED")
    barrier()
    return summary
