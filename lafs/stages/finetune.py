"""Stage ``finetune``: supervised recognition finetuning of the pretrained part fViT (or a scratch baseline).

The recogniser is rebuilt from the pretrained teacher's registry name and kwargs (``finetune.model`` and K
must agree with them), its landmark net starts from ``models/landmark_net.pt`` and trains with it, anchored
to a frozen copy by the landmark regulariser. Training data: ``data/splits/finetune.csv`` or a few-shot view
(``fewshot_k``), minus a seeded fraction of its identities held out for validation: verification pairs among
those identities give a k-fold accuracy each epoch (the test identities are never looked at), which picks the
best epoch and drives early stopping. ``params/best_finetune.yaml`` (written by ``tune``) overlays the section.

Warm start: when ``tune`` ran truncated trials of this very schedule (``tune.trial_epochs``), its best trial *is*
the first epochs of this run, so ``models/tune_best/`` holds that trial's checkpoint and the run continues it
instead of training those epochs again (only when the params that shape training and the inputs are identical;
anything else trains from the first step).

Outputs in ``out_dir``: ``model.pt`` (the best epoch's recogniser, a :mod:`lafs.models.io` model file that
rebuilds the whole model incl. its landmark net) and ``last.pt``, written atomically every
``checkpoint_every`` iterations and at each epoch end. An existing ``last.pt`` with the same params and inputs
is resumed exactly: data order (``ResumableSampler``), augmentation (per-sample generators seeded by (seed,
epoch, index)) and dropout (a torch seed per iteration) never depend on state lost in a crash.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from lafs.config import FinetuneParams, Params, read_yaml_mapping, resolved, update_section
from lafs.data.datasets import (
    LabelledFaces,
    LabelledShardDecode,
    ResumableSampler,
    rank_sampler,
    recognition_augment,
)
from lafs.data.images import file_sha256
from lafs.data.pairs import PairRow
from lafs.data.sampling import Image, derived_seed, fraction_count, generate_pairs, seeded_order
from lafs.data.shards import ShardSet, ShardStream, load_shard_set
from lafs.engine.checkpoint import load_checkpoint, resume_state, rng_state, save_checkpoint, set_rng_state
from lafs.engine.distributed import (
    DistEnv,
    average_gradients,
    barrier,
    init_distributed,
    ranks_in_sync,
    shutdown,
)
from lafs.engine.finetune import FinetuneTrainer, embed, frozen_copy
from lafs.engine.loop import LoopResult, LoopSpec, deterministic_mode, train_loop
from lafs.engine.preemption import Preempted
from lafs.eval.verification import kfold_accuracy, pair_scores
from lafs.layout import CHECKPOINT_FILE, MODEL_FILE, Layout
from lafs.models import FaceViT, create_model
from lafs.models.io import ModelFileError, read_model_file, save_model
from lafs.stages import RunOptions, StageError, write_metrics
from lafs.tracking import RunLogger

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
MIN_VAL_IDENTITIES = 4  # two identity-disjoint folds of two identities: the least k-fold accuracy needs
# Finetune params that do not change the trained weights: a warm-start checkpoint written under other values
# (an Optuna trial logs to the tune experiment, without the tuned-params overlay) continues the same training.
BOOKKEEPING_PARAMS = ("experiment", "tracking_uri", "tuned_params", "checkpoint_every", "num_workers")


@dataclass(frozen=True)
class FinetunePaths:
    """What one finetune reads (``layout``'s splits, ``teacher``, ``landmark_net``) and writes (``out_dir``,
    ``metrics``); tune trials and ``lafs compare`` cells train into their own folders."""

    layout: Layout
    out_dir: Path
    teacher: Path
    landmark_net: Path
    metrics: Path
    warm_start: Path | None  # WarmStart folder continued when out_dir has no checkpoint; None = never

    @classmethod
    def of(cls, layout: Layout, out_dir: Path | None = None) -> FinetunePaths:
        """The pipeline's files (``out_dir`` defaults to ``layout.finetune``)."""
        return cls(
            layout,
            out_dir or layout.finetune,
            layout.teacher,
            layout.landmark_net,
            layout.metrics("finetune"),
            layout.tune_best,
        )

    @property
    def last(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    @property
    def model(self) -> Path:
        return self.out_dir / MODEL_FILE


@dataclass(frozen=True)
class WarmStart:
    """A finetune's first epochs, trained elsewhere (the tune stage's best truncated trial): its ``last.pt``,
    its best ``model.pt`` so far and ``warm_start.json`` (what it is; ``checkpoint: false`` with a reason when
    the trials cannot be continued)."""

    folder: Path

    @property
    def last(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    @property
    def model(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def info(self) -> Path:
        return self.folder / "warm_start.json"


@dataclass
class FinetuneSummary:
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    iterations: int = 0
    resumed_from: int = 0
    train_images: int = 0
    train_identities: int = 0
    val_identities: int = 0
    val_pairs: int = 0
    images_per_s: float = 0.0
    val_history: list[float] = field(default_factory=list)
    run_id: str | None = None
    tuned: dict[str, Any] = field(default_factory=dict)  # the params/best_finetune.yaml overlay applied by run()
    warm_start: dict[str, Any] = field(default_factory=dict)  # warm_start.json of the trial continued, if any
    world_size: int = 1  # processes under torchrun, each with batch_size faces per step
    ranks_in_sync: bool = True  # every rank ended with the same weights

    def describe(self) -> str:
        resumed = f", resumed at iteration {self.resumed_from}" if self.resumed_from else ""
        if self.warm_start:
            resumed = f", continued from tune trial #{self.warm_start.get('trial')} at iteration {self.resumed_from}"
        stopped = " (stopped early)" if self.stopped_early else ""
        tuned = f"; tuned params {sorted(self.tuned)}" if self.tuned else ""
        return (
            f"finetuned {self.epochs_run} epochs{stopped} on {self.train_images} images of "
            f"{self.train_identities} identities{resumed}; best validation accuracy "
            f"{self.best_val_accuracy:.4f} at epoch {self.best_epoch} ({self.val_pairs} pairs of "
            f"{self.val_identities} held-out identities){tuned}"
        )

    def metrics(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("run_id")
        return out


# -- data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneData:
    """Training images with contiguous labels, and the held-out validation images and pairs."""

    train_paths: list[Path]
    train_labels: list[int]
    labels: dict[str, int]  # training identity -> label
    num_classes: int
    val_paths: list[str]  # aligned paths relative to the root, as in pairs
    val_pairs: list[PairRow]
    val_identities: int
    sources: dict[str, Path]  # split files read (fingerprinted for resume)


def _read_split(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise StageError(f"{path} not found: run the split stage first (`dvc repro split`)")
    table = pd.read_csv(path)
    if table.empty:
        raise StageError(f"{path} holds no images: check the split params")
    return table


def select_data(cfg: FinetuneParams, paths: FinetunePaths) -> FinetuneData:
    """Hold out validation identities (seeded sha256 ranking, like the split stage) and pair their images."""
    splits = paths.layout.splits
    sources = {"finetune": splits / "finetune.csv"}
    if cfg.fewshot_k is not None:
        sources["train"] = splits / f"fewshot_k{cfg.fewshot_k}.csv"
        if not sources["train"].exists():
            raise StageError(
                f"{sources['train']} not found: add {cfg.fewshot_k} to split.fewshot_k and rerun split, "
                "or set finetune.fewshot_k to one of the existing views"
            )
    finetune = _read_split(sources["finetune"])
    train = _read_split(sources["train"]) if "train" in sources else finetune
    counts = finetune.groupby("identity").size()
    eligible = sorted(counts[counts >= 2].index)
    n_val = max(fraction_count(len(eligible), cfg.val_fraction), MIN_VAL_IDENTITIES)
    if len(eligible) < n_val or finetune["identity"].nunique() - n_val < 2:
        raise StageError(
            f"{sources['finetune']}: {finetune['identity'].nunique()} identities ({len(eligible)} with >= 2 images) "
            f"cannot give {n_val} validation identities with >= 2 images and still leave 2 to train on; "
            "ingest more identities or lower split.test_fraction"
        )
    val_ids = set(seeded_order(eligible, cfg.seed, "finetune-validation")[:n_val])
    val_rows = finetune[finetune["identity"].isin(val_ids)]
    by_identity: dict[str, list[Image]] = {}
    for row in val_rows.itertuples():
        by_identity.setdefault(row.identity, []).append(
            Image(row.identity, row.aligned_path, row.sha256, row.aligned_path)
        )
    folds = min(cfg.val_folds, n_val // 2)
    pairs, _ = generate_pairs({k: sorted(v) for k, v in by_identity.items()}, folds, cfg.val_pairs_per_fold, cfg.seed)
    train = train[~train["identity"].isin(val_ids)]
    labels = {identity: n for n, identity in enumerate(sorted(train["identity"].unique()))}
    return FinetuneData(
        train_paths=[paths.layout.root / p for p in train["aligned_path"]],
        train_labels=[labels[i] for i in train["identity"]],
        labels=labels,
        num_classes=len(labels),
        val_paths=sorted({p for r in pairs for p in (r["path1"], r["path2"])}),
        val_pairs=pairs,
        val_identities=n_val,
        sources=sources,
    )


# -- model -----------------------------------------------------------------------------------------------


def uses_landmarks(cfg: FinetuneParams) -> bool:
    """Grid models (``dino_vit_*``, the DINO-face baseline) tokenise a regular grid: no landmark net."""
    return not cfg.model.startswith("dino_")


def recogniser_kwargs(cfg: FinetuneParams) -> dict[str, Any]:
    """What ``create_model(cfg.model, **kwargs)`` needs to rebuild the whole recogniser (saved in model.pt)."""
    kwargs: dict[str, Any] = {
        "drop_path_rate": cfg.drop_path_rate,
        "embedding": cfg.embedding,
        "embedding_dim": cfg.embedding_dim,
        "embedding_dropout": cfg.embedding_dropout,
    }
    if uses_landmarks(cfg):
        kwargs |= {
            "num_landmarks": cfg.num_landmarks,
            "padding_mode": cfg.patch_padding,
            "landmark_net": cfg.landmark_net,
        }
    return kwargs


def _read(path: Path, what: str, stage: str) -> dict[str, Any]:
    try:
        return read_model_file(path)
    except ModelFileError as exc:
        raise StageError(f"{what}: {exc} (`dvc repro {stage}`)") from None


def _check_teacher(cfg: FinetuneParams, teacher: dict[str, Any], path: Path) -> None:
    if teacher["model"] != cfg.model:
        raise StageError(
            f"{path} holds a pretrained {teacher['model']!r} but finetune.model is {cfg.model!r}: set "
            f"finetune.model: {teacher['model']} (the backbone must be the one pretrained), or init: "
            "scratch"
        )
    for key, param in (("num_landmarks", "num_landmarks"), ("padding_mode", "patch_padding")):
        theirs, ours = teacher["kwargs"].get(key), getattr(cfg, param)
        if theirs is not None and theirs != ours:
            raise StageError(
                f"{path} was pretrained with {key}={theirs!r} but finetune.{param} is {ours!r}: set "
                f"finetune.{param}: {theirs}"
            )


def build_recogniser(cfg: FinetuneParams, paths: FinetunePaths) -> FaceViT:
    """The recogniser with the teacher's ViT weights (``init: pretrained``, exactly; the landmark net is not in
    the teacher) or a seeded random ViT (``scratch``), and the landmark_net stage's weights in its landmark net."""
    teacher = _read(paths.teacher, "pretrained backbone", "pretrain") if cfg.init == "pretrained" else None
    if teacher is not None:
        _check_teacher(cfg, teacher, paths.teacher)
    torch.manual_seed(cfg.seed)
    model: FaceViT = create_model(cfg.model, **recogniser_kwargs(cfg))
    if teacher is not None:
        missing, unexpected = model.load_state_dict(teacher["state_dict"], strict=False)
        # The landmark net and the recognition embedding head are not part of what SSL trains.
        missing = [k for k in missing if not k.startswith(("landmark_net.", "embedding_head."))]
        if missing or unexpected:
            raise StageError(
                f"{paths.teacher} does not fit {cfg.model}: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; rerun `dvc repro pretrain`"
            )
    if model.landmark_net is not None:
        net = _read(paths.landmark_net, "landmark network", "landmark_net")
        if net["model"] != cfg.landmark_net or net["kwargs"] != {"num_landmarks": cfg.num_landmarks}:
            raise StageError(
                f"{paths.landmark_net} holds {net['model']!r} with {net['kwargs']} but finetune has "
                f"landmark_net={cfg.landmark_net!r}, num_landmarks={cfg.num_landmarks}: make them agree"
            )
        model.landmark_net.load_state_dict(net["state_dict"])
    return model


# -- validation and early stopping -------------------------------------------------------------------------


@dataclass
class Progress:
    """Early-stopping state (saved in last.pt): best validation accuracy so far and epochs without a gain."""

    best_accuracy: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[float] = field(default_factory=list)

    def update(self, epoch: int, accuracy: float, cfg: FinetuneParams) -> bool:
        """Record an epoch's accuracy; True if it is the new best."""
        self.history.append(accuracy)
        if accuracy > self.best_accuracy + cfg.min_delta or self.best_epoch < 0:
            self.best_accuracy, self.best_epoch, self.bad_epochs = accuracy, epoch, 0
            return True
        self.bad_epochs += 1
        self.stopped_early = cfg.patience is not None and self.bad_epochs >= cfg.patience
        return False


def validate(
    model: torch.nn.Module, loader: DataLoader, val_paths: list[str], pairs: list[PairRow], device: torch.device
) -> dict[str, float]:
    """k-fold verification accuracy (identity-disjoint folds) of cosine scores between L2-normalised embeddings."""
    emb = embed(model, loader, device).numpy()
    index = {p: i for i, p in enumerate(val_paths)}
    scores = pair_scores(emb[[index[r["path1"]] for r in pairs]], emb[[index[r["path2"]] for r in pairs]])
    same = np.array([int(r["same"]) for r in pairs])
    mean, std, threshold = kfold_accuracy(scores, same, folds=np.array([int(r["fold"]) for r in pairs]))
    return {"val_accuracy": mean, "val_accuracy_std": std, "val_threshold": threshold}


# -- training --------------------------------------------------------------------------------------------


def training_set(
    cfg: FinetuneParams, data: FinetuneData, env: DistEnv, shards: ShardSet | None
) -> tuple[Dataset, ResumableSampler | None]:
    """The labelled training faces and this rank's sampler over them (files), or this rank's stream of ``shards``
    samples (no sampler)."""
    augment = recognition_augment(cfg.crop_scale, cfg.flip)
    if shards is not None:
        stream = ShardStream(
            shards,
            LabelledShardDecode(data.labels, augment, cfg.seed),
            cfg.batch_size,
            seed=cfg.seed,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=cfg.num_workers,
            shuffle_buffer=cfg.shuffle_buffer,
            keep=set(data.labels),
        )
        return stream, None
    faces = LabelledFaces(data.train_paths, data.train_labels, augment, seed=cfg.seed, preload=True)
    sampler = rank_sampler(
        faces, env.world_size, env.rank, cfg.seed, cfg.batch_size, "training images", "finetune.batch_size"
    )
    return faces, sampler


def _fingerprint(
    cfg: FinetuneParams, paths: FinetunePaths, data: FinetuneData, shards: ShardSet | None
) -> dict[str, str]:
    """sha256 of the files a run depends on besides its params: resuming across other inputs is wrong."""
    files = {f"split_{k}": v for k, v in data.sources.items()}
    if uses_landmarks(cfg):
        files["landmark_net"] = paths.landmark_net
    if cfg.init == "pretrained":
        files["teacher"] = paths.teacher
    inputs = {name: file_sha256(f) for name, f in sorted(files.items())}
    if shards is not None:
        inputs["shards_index"] = shards.digest
    return inputs


def training_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved finetune section without :data:`BOOKKEEPING_PARAMS`: what must match to continue a run. Where
    the shards are is bookkeeping (their index is an input); a shard stream's order depends on its worker count."""
    ordered_by_workers = {"num_workers"} if config.get("data_source") == "shards" else set()
    ignored = {*BOOKKEEPING_PARAMS, "shards_uri"} - ordered_by_workers
    return {k: v for k, v in config.items() if k not in ignored}


def warm_state(
    folder: Path, cfg: FinetuneParams, inputs: dict[str, str]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The checkpoint of a :class:`WarmStart` folder and its ``warm_start.json``, when it continues this exact
    training (same training params, same input files); else ``(None, {})`` with the reason logged."""
    ws = WarmStart(folder)
    info = json.loads(ws.info.read_text()) if ws.info.exists() else {}
    if not (ws.last.exists() and ws.model.exists()):
        if info:
            log.info("finetune: no warm start (%s)", info.get("reason", f"no checkpoint in {folder}"))
        return None, {}
    state = load_checkpoint(ws.last)
    if state.get("inputs") != inputs:
        log.info("finetune: %s was trained on other inputs; training from the first step", ws.last)
        return None, {}
    theirs, ours = training_params(state.get("config", {})), training_params(resolved(cfg))
    if theirs != ours:
        changed = sorted(k for k in ours.keys() | theirs.keys() if theirs.get(k) != ours.get(k))
        log.info("finetune: %s was trained with other %s; training from the first step", ws.last, changed)
        return None, {}
    return state, {"trial": None, **info}


def train(
    cfg: FinetuneParams,
    paths: FinetunePaths,
    *,
    on_epoch: EpochCallback | None = None,
    parent_run_id: str | None = None,
    restart_on_change: bool = False,
) -> FinetuneSummary:
    """Finetune (or resume) to the last epoch or an early stop; ``model.pt`` holds the best epoch's weights.

    ``on_epoch(epoch, metrics)`` runs after each epoch's validation and checkpoint (metrics hold at least
    ``val_accuracy``); an exception it raises (e.g. ``optuna.TrialPruned``) ends the MLflow run as KILLED and
    propagates, the checkpoint kept. ``parent_run_id`` nests the MLflow run (Optuna trials, comparison cells).
    """
    env = init_distributed(cfg.device, param="finetune.device")
    try:
        with deterministic_mode(cfg.deterministic):
            return _train(
                cfg, paths, env, on_epoch=on_epoch, parent_run_id=parent_run_id, restart_on_change=restart_on_change
            )
    finally:
        shutdown()


def _train(
    cfg: FinetuneParams,
    paths: FinetunePaths,
    env: DistEnv,
    *,
    on_epoch: EpochCallback | None,
    parent_run_id: str | None,
    restart_on_change: bool,
) -> FinetuneSummary:
    device = env.device
    data = select_data(cfg, paths)
    model = build_recogniser(cfg, paths).to(device)
    anchored = model.landmark_net is not None and cfg.train_landmark_net and cfg.reg_weight > 0
    reference = frozen_copy(model.landmark_net) if anchored else None
    shards = None
    if cfg.data_source == "shards":
        if cfg.fewshot_k is not None:  # checked before the index is fetched: the params alone are wrong
            raise StageError("finetune.data_source shards holds the full finetune set: use files with fewshot_k")
        shards = load_shard_set(cfg.shards_uri or paths.layout.shards, "finetune")
    train_set, sampler = training_set(cfg, data, env, shards)
    iters_per_epoch = len(sampler if sampler is not None else train_set) // cfg.batch_size  # type: ignore[arg-type]
    trainer = FinetuneTrainer(model, data.num_classes, cfg, iters_per_epoch, reference)
    if env.distributed:
        trainer.grad_sync = average_gradients
    val_set = LabelledFaces([paths.layout.root / p for p in data.val_paths], [0] * len(data.val_paths))
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers)

    inputs = _fingerprint(cfg, paths, data, shards)
    state = resume_state(
        paths.last,
        resolved(cfg),
        inputs,
        stage="finetune",
        input_names="splits, landmark net, teacher",
        restart_on_change=restart_on_change,
        set_aside=env.is_main,
        before_set_aside=barrier,
    )
    warm: dict[str, Any] = {}
    if state is None and paths.warm_start is not None:
        state, warm = warm_state(paths.warm_start, cfg, inputs)
        if state is not None:
            state["mlflow_run_id"] = ""  # the trial's run stays the trial's; this run is the stage's own
            # The best epoch so far, carrying this run's params (the trial's name its tune experiment).
            best_so_far = read_model_file(WarmStart(paths.warm_start).model)
            if env.is_main:
                save_checkpoint({**best_so_far, "config": resolved(cfg)}, paths.model)
    start_it, run_id, progress = 0, None, Progress()
    if state is None and env.is_main:
        paths.model.unlink(missing_ok=True)  # starting over: a model.pt left over is not this run's best
    if state is not None:
        trainer.load_state_dict(state)
        set_rng_state(state["rng"])
        start_it, run_id, progress = (
            int(state["iteration"]),
            state["mlflow_run_id"] or None,
            Progress(**state["progress"]),
        )
    tags = {"stage": "finetune", "init": cfg.init, "model": cfg.model, "fewshot_k": str(cfg.fewshot_k)}
    if warm:
        tags |= {"warm_start.trial": str(warm.get("trial")), "warm_start.iteration": str(start_it)}
    logger = RunLogger(
        env.is_main,
        cfg.experiment,
        f"finetune-{cfg.init}",
        resolved(cfg),
        run_id=run_id,
        uri=cfg.tracking_uri,
        tags=tags,
        parent_run_id=parent_run_id,
    )
    if warm:  # the epochs trained by the trial, so this run's validation curve starts at epoch 0
        for epoch, accuracy in enumerate(progress.history):
            logger.log_metrics({"val_accuracy": accuracy}, (epoch + 1) * iters_per_epoch)

    def checkpoint(it: int) -> None:
        if env.is_main:
            save_checkpoint(
                {
                    **trainer.state_dict(),
                    "iteration": it,
                    "progress": asdict(progress),
                    "rng": rng_state(),
                    "config": resolved(cfg),
                    "inputs": inputs,
                    "mlflow_run_id": logger.run_id or "",
                },
                paths.last,
            )
        barrier()

    def loader(epoch: int) -> DataLoader:
        return DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
        )

    def end_epoch(epoch: int, it: int) -> bool:
        val = validate(model, val_loader, data.val_paths, data.val_pairs, device)  # alike on every rank
        if progress.update(epoch, val["val_accuracy"], cfg) and env.is_main:
            save_model(
                model,
                cfg.model,
                recogniser_kwargs(cfg),
                paths.model,
                config=resolved(cfg),
                embed_dim=model.embedding_dim,
                epoch=epoch,
                val_accuracy=val["val_accuracy"],
            )
        logger.log_metrics({**val, "best_val_accuracy": progress.best_accuracy}, it)
        checkpoint(it)
        if on_epoch is not None:
            caller_stops.append(True)  # whatever on_epoch raises (pruned, interrupted) is not a failure of the run
            on_epoch(epoch, {**val, "epoch": float(epoch), "best_val_accuracy": progress.best_accuracy})
            caller_stops.pop()
        return progress.stopped_early

    spec = LoopSpec(
        f"finetune {cfg.init}",
        cfg.epochs,
        iters_per_epoch,
        cfg.batch_size,
        cfg.checkpoint_every,
        paths.last,
        advice="lower finetune.lr, raise warmup_epochs or use dtype fp32",
        world_size=env.world_size,
        show_progress=env.is_main,
    )
    result, status, caller_stops = LoopResult(start_it), "FAILED", []
    ranked = (env.rank,) if env.distributed else ()  # one process: the seeds of a run without torchrun
    try:
        if not progress.stopped_early:  # a resumed run that had stopped early is done
            result = train_loop(
                spec,
                start_it,
                samplers=[s for s in (sampler, train_set) if s is not None],
                loader=loader,
                step=lambda batch, it: trainer.train_step(*batch, it),
                checkpoint=checkpoint,
                logger=logger,
                # dropout / drop-path: a function of the iteration
                seed_iteration=lambda it: torch.manual_seed(derived_seed(cfg.seed, "finetune", *ranked, it)),
                end_epoch=end_epoch,
            )
        barrier()  # rank 0 wrote model.pt
        if not paths.model.exists():
            raise StageError(
                f"{paths.last} says training finished but {paths.model} is missing: delete {paths.last} to train again"
            )
        logger.log_metrics(
            {"best_val_accuracy": progress.best_accuracy, "best_epoch": progress.best_epoch}, result.iteration
        )
        logger.log_artifact(paths.model, "model")
        status = "FINISHED"
    except BaseException as exc:
        status = "KILLED" if caller_stops or isinstance(exc, Preempted) else status
        raise
    finally:
        logger.end(status)
    return FinetuneSummary(
        best_val_accuracy=progress.best_accuracy,
        best_epoch=progress.best_epoch,
        epochs_run=len(progress.history),
        stopped_early=progress.stopped_early,
        iterations=result.iteration,
        resumed_from=start_it,
        train_images=len(train_set),
        train_identities=data.num_classes,
        val_identities=data.val_identities,
        val_pairs=len(data.val_pairs),
        images_per_s=result.images_per_s,
        val_history=list(progress.history),
        run_id=logger.run_id,
        warm_start=warm,
        world_size=env.world_size,
        ranks_in_sync=ranks_in_sync(model, device),
    )


def tuned_overlay(cfg: FinetuneParams, layout: Layout) -> tuple[FinetuneParams, dict[str, Any]]:
    """``cfg`` with the tune stage's flat mapping (``cfg.tuned_params``, relative to the root) overlaid when
    the file exists; keys and values are validated like params.yaml (a bad key fails naming it and the file)."""
    if cfg.tuned_params is None:
        return cfg, {}
    path = layout.resolve(cfg.tuned_params)
    overlay = read_yaml_mapping(path, missing_ok=True)
    if "tuned_params" in overlay:
        raise StageError(f"{path}: 'tuned_params' cannot be tuned (it names this file); remove the key")
    return (update_section(cfg, overlay, str(path)) if overlay else cfg), overlay


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> FinetuneSummary:
    """The stage: overlay the tuned params, train (or resume, or continue the best tune trial), write the metrics."""
    paths = FinetunePaths.of(layout)
    cfg, overlay = tuned_overlay(params.finetune, layout)
    if overlay:
        log.info("finetune: tuned params %s overlaid from %s", overlay, cfg.tuned_params)
    summary = train(cfg, paths, restart_on_change=options.restart_on_change)
    summary.tuned = overlay
    write_metrics(paths.metrics, {**summary.metrics(), "init": cfg.init, "fewshot_k": cfg.fewshot_k})
    return summary
