"""Stage ``landmark_net``: train the landmark CNN that places LAFS patches.

Replaces the official, never-released stage-1 checkpoint. The network (integral regression, see
``lafs.models.landmark_net``) regresses the dense landmarks of the landmarks stage on random resized crops (scale
0.4-1, flips with the scheme's left/right permutation), i.e. on exactly the kind of views it will see, frozen,
during LAFS pretraining; labels follow the crop exactly. A fraction of the views (``full_view_fraction``) is the
whole aligned face instead: it is what finetuning and deployment feed the net, and a 0.4-1 crop almost never is.
Held out: the test identities of the split (never trained on). The reported NME is the mean point error
divided by the distance between the eye centres (from the 5-point detection), on uncropped aligned faces
(``heldout_nme``, the gate) and on one seeded 0.4-1 crop of each (``heldout_crop_nme``, the pretraining views).
Training runs in the shared loop (:mod:`lafs.engine.loop`): a killed run resumes exactly from
``models/landmark_net.last.pt``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from lafs.config import LandmarkNetParams, Params, resolved
from lafs.conventions import ALIGNED_SIZE
from lafs.data.datasets import LandmarkFaces, ResumableSampler
from lafs.data.images import file_sha256
from lafs.data.sampling import derived_seed
from lafs.data.transforms import CropFlip, LandmarkAugment, flip_permutation, flip_permutation_from_mean_shape
from lafs.engine.checkpoint import resume_state, save_checkpoint
from lafs.engine.loop import LoopSpec, NonFiniteLossError, deterministic_mode, ends_run_on_failure, train_loop
from lafs.engine.optim import param_groups, set_lr_wd
from lafs.engine.schedules import cosine_schedule
from lafs.layout import Layout
from lafs.models import create_model
from lafs.models.io import save_model
from lafs.stages import RunOptions, StageError, write_metrics
from lafs.tracking import RunLogger

log = logging.getLogger(__name__)

TRAIN_SPLITS = ("ssl.csv", "finetune.csv")  # every training identity's faces (their labels are not used)
HELDOUT_SPLITS = ("test.csv",)  # never trained on: the NME gate
SPLIT_FILES = TRAIN_SPLITS + HELDOUT_SPLITS


@dataclass(frozen=True)
class LandmarkNetPaths:
    """What one training run reads (``layout``'s tables) and writes (``model``, ``metrics``)."""

    layout: Layout
    model: Path
    metrics: Path
    last: Path  # training checkpoint

    @classmethod
    def of(cls, layout: Layout) -> LandmarkNetPaths:
        return cls(layout, layout.landmark_net, layout.metrics("landmark_net"), layout.landmark_net_checkpoint)


@dataclass
class LandmarkNetSummary:
    train_images: int
    heldout_images: int
    nme: float
    mean_shape_nme: float
    crop_nme: float
    seconds: float

    def describe(self) -> str:
        return (
            f"landmark net: held-out NME {self.nme:.2%} of eye distance (mean shape alone "
            f"{self.mean_shape_nme:.2%}; {self.crop_nme:.2%} on 0.4-1 crops) on {self.heldout_images} faces, "
            f"trained on {self.train_images} in {self.seconds:.0f} s"
        )


@dataclass(frozen=True)
class MixedViews:
    """``augment``'s random crop + flip, except that a ``full_fraction`` of the views is the whole face (still
    flipped at random): the net must work on uncropped faces too. Same call signature as ``LandmarkAugment``."""

    augment: LandmarkAugment
    full_fraction: float

    def __call__(
        self, image: torch.Tensor, landmarks: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        geometry = self.augment.sample(h, w, generator)
        if torch.rand((), generator=generator) < self.full_fraction:
            geometry = CropFlip((0, 0, h, w), geometry.flip)
        return self.augment.apply(image, landmarks, geometry)


def _input_files(paths: LandmarkNetPaths) -> dict[str, Path]:
    """The files a run learns from besides its params: resuming across other ones would splice two runs."""
    return {"landmarks": paths.layout.landmarks, **{name: paths.layout.splits / name for name in SPLIT_FILES}}


def _table(
    paths: LandmarkNetPaths, landmarks: pd.DataFrame, split_files: Sequence[str]
) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """Image paths, dense landmarks (N, K, 2) and eye centres (N, 2, 2) of the images in ``split_files``."""
    frames = []
    for name in split_files:
        f = paths.layout.splits / name
        if not f.exists():
            raise StageError(f"{f} not found: run the split stage first (`dvc repro split`)")
        frames.append(pd.read_csv(f, usecols=["aligned_path"]))
    wanted = pd.concat(frames).drop_duplicates()
    table = wanted.merge(landmarks, on="aligned_path", how="inner")
    if table.empty:
        raise StageError(f"no landmarks for the images of {split_files}: rerun the landmarks and split stages")
    dense = torch.tensor([list(d) for d in table["dense"]], dtype=torch.float32).reshape(len(table), -1, 2)
    kps = torch.tensor([list(k) for k in table["kps5_aligned"]], dtype=torch.float32).reshape(len(table), 5, 2)
    return [paths.layout.root / p for p in table["aligned_path"]], dense, kps[:, :2]


def normalised_mean_error(pred: torch.Tensor, target: torch.Tensor, eyes: torch.Tensor) -> torch.Tensor:
    """Per-face mean point-to-point error divided by the eye-centre distance."""
    iod = (eyes[:, 0] - eyes[:, 1]).norm(dim=-1)
    return (pred - target).norm(dim=-1).mean(dim=-1) / iod


@torch.no_grad()
def evaluate_nme(net: torch.nn.Module, loader: DataLoader, eyes: torch.Tensor) -> float:
    net.eval()
    errors = []
    offset = 0
    for images, target in loader:
        n = images.shape[0]
        errors.append(normalised_mean_error(net(images), target, eyes[offset : offset + n]))
        offset += n
    return float(torch.cat(errors).mean())


def heldout_crops(
    paths: list[Path], dense: torch.Tensor, eyes: torch.Tensor, augment: LandmarkAugment, seed: int
) -> LandmarkFaces:
    """One seeded random crop (+ flip) of each held-out face, with the two eye centres carried through the crop
    as extra points (so the NME is normalised by the eye distance *in the view*). Targets: (K + 2, 2)."""
    k = dense.shape[1]
    perm = torch.cat([augment.flip_perm, torch.tensor([k + 1, k])])  # the mirrored left eye is the right eye
    with_eyes = LandmarkAugment(augment.size, augment.scale, augment.ratio, augment.flip_p, perm)
    return LandmarkFaces(paths, torch.cat([dense, eyes], dim=1), with_eyes, seed=seed)


@torch.no_grad()
def evaluate_crop_nme(net: torch.nn.Module, loader: DataLoader) -> float:
    net.eval()
    errors = [normalised_mean_error(net(images), target[:, :-2], target[:, -2:]) for images, target in loader]
    return float(torch.cat(errors).mean())


def _loss(net: torch.nn.Module, stages: list[torch.Tensor], target: torch.Tensor, coarse_weight: float) -> torch.Tensor:
    """L1 in the normalised frame (robust to the few badly placed jaw points) on the refined points, plus
    ``coarse_weight`` times it on each earlier step's: every step must land near the target by itself."""
    target = net.to_normalised(target)
    errors = [torch.nn.functional.l1_loss(net.to_normalised(points), target) for points in stages]
    return errors[-1] + coarse_weight * sum(errors[:-1], torch.zeros(()))


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> LandmarkNetSummary:
    return train(params.landmark_net, LandmarkNetPaths.of(layout), options.restart_on_change)


def train(cfg: LandmarkNetParams, paths: LandmarkNetPaths, restart_on_change: bool = False) -> LandmarkNetSummary:
    """Train, gate on the held-out NME and write the model and its metrics (``paths`` may differ from the
    pipeline's: tests write elsewhere)."""
    saved_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with deterministic_mode(cfg.deterministic):
            return _train(cfg, paths, restart_on_change)
    finally:
        torch.set_num_threads(saved_threads)


def _train(cfg: LandmarkNetParams, paths: LandmarkNetPaths, restart_on_change: bool) -> LandmarkNetSummary:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    landmarks = pd.read_parquet(paths.layout.landmarks, columns=["aligned_path", "dense", "kps5_aligned"])
    train_paths, train_lm, _ = _table(paths, landmarks, TRAIN_SPLITS)
    test_paths, test_lm, test_eyes = _table(paths, landmarks, HELDOUT_SPLITS)
    k = train_lm.shape[1]
    mean_shape = train_lm.mean(0)
    try:
        perm = flip_permutation(k)
    except ValueError:
        perm = flip_permutation_from_mean_shape(mean_shape, ALIGNED_SIZE)
    augment = LandmarkAugment(size=ALIGNED_SIZE, scale=cfg.crop_scale, flip_p=0.5 if cfg.flip else 0.0, flip_perm=perm)
    train_set = LandmarkFaces(train_paths, train_lm, MixedViews(augment, cfg.full_view_fraction), seed=cfg.seed)
    test_set = LandmarkFaces(test_paths, test_lm, None)
    crop_loader = DataLoader(
        heldout_crops(test_paths, test_lm, test_eyes, augment, cfg.seed + 1),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
    )
    if len(train_set) < cfg.batch_size:
        raise StageError(
            f"{len(train_set)} training faces is less than one batch of {cfg.batch_size}: lower landmark_net.batch_size"
        )
    test_loader = DataLoader(test_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers)

    net = create_model(cfg.model, num_landmarks=k)
    net.init_mean_shape(mean_shape)
    mean_nme = float(normalised_mean_error(mean_shape.expand_as(test_lm), test_lm, test_eyes).mean())
    sampler = ResumableSampler(train_set, seed=cfg.seed)
    iters = len(sampler) // cfg.batch_size
    lr = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, iters, cfg.warmup_epochs)
    optimizer = torch.optim.AdamW(param_groups(net), lr=cfg.lr)
    inputs = {name: file_sha256(f) for name, f in sorted(_input_files(paths).items())}
    state = resume_state(
        paths.last,
        resolved(cfg),
        inputs,
        stage="landmark_net",
        input_names="landmark table, splits",
        restart_on_change=restart_on_change,
    )
    start, run_id = 0, None
    if state is not None:
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        start, run_id = int(state["iteration"]), state["mlflow_run_id"] or None
    logger = RunLogger(
        True, "lafs-landmark-net", "landmark_net", resolved(cfg), run_id=run_id, tags={"stage": "landmark_net"}
    )

    def step(batch: tuple[torch.Tensor, torch.Tensor], it: int) -> dict[str, float]:
        images, target = batch
        net.train()
        set_lr_wd(optimizer, float(lr[it]), cfg.weight_decay)
        loss = _loss(net, net.stages(images), target, cfg.coarse_loss_weight)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at iteration {it}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "lr": float(lr[it])}

    def checkpoint(it: int) -> None:
        state = {"net": net.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it}
        meta = {"config": resolved(cfg), "inputs": inputs, "mlflow_run_id": logger.run_id or ""}
        save_checkpoint({**state, **meta}, paths.last)

    spec = LoopSpec(
        "landmark_net", cfg.epochs, iters, cfg.batch_size, cfg.checkpoint_every, paths.last, "lower landmark_net.lr"
    )
    with ends_run_on_failure(logger):
        train_loop(
            spec,
            start,
            samplers=(sampler, train_set),
            loader=lambda epoch: DataLoader(
                train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.num_workers
            ),
            step=step,
            checkpoint=checkpoint,
            logger=logger,
            seed_iteration=lambda it: torch.manual_seed(derived_seed(cfg.seed, "landmark_net", it)),
        )
    nme = evaluate_nme(net, test_loader, test_eyes)
    crop_nme = evaluate_crop_nme(net, crop_loader)
    seconds = time.perf_counter() - t0
    logger.log_metrics(
        {"heldout_nme": nme, "heldout_crop_nme": crop_nme, "mean_shape_nme": mean_nme, "train_seconds": seconds},
        cfg.epochs * iters,
    )

    save_model(
        net,
        cfg.model,
        {"num_landmarks": k},
        paths.model,
        mean_shape=mean_shape,
        flip_perm=perm,
        nme=nme,
        config=resolved(cfg),
    )
    summary = LandmarkNetSummary(len(train_set), len(test_set), nme, mean_nme, crop_nme, seconds)
    write_metrics(
        paths.metrics,
        {
            "heldout_nme": nme,
            "heldout_crop_nme": crop_nme,
            "mean_shape_nme": mean_nme,
            "num_landmarks": k,
            "train_images": len(train_set),
            "heldout_images": len(test_set),
        },
    )
    logger.log_artifact(paths.model, "landmark_net")
    logger.end()
    if nme > cfg.max_nme:
        raise StageError(
            f"landmark net held-out NME {nme:.2%} is above landmark_net.max_nme {cfg.max_nme:.2%}; "
            "train longer (epochs) or check the landmarks stage output"
        )
    return summary
