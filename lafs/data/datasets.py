"""Datasets over aligned faces. Each sample's augmentation draws from its own generator seeded by
(seed, epoch, index), so a batch is the same whichever worker builds it: resume is exact."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from lafs.conventions import ALIGNED_SIZE
from lafs.data.aligned import read_aligned
from lafs.data.sampling import derived_seed
from lafs.data.shards import ShardError, decode_face
from lafs.data.transforms import LandmarkAugment
from lafs.errors import StageError


def read_face_uint8(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 from an aligned face file written by the landmarks stage."""
    return torch.from_numpy(read_aligned([path])[0]).permute(2, 0, 1)


def read_face(path: Path) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from an aligned face file written by the landmarks stage."""
    return read_face_uint8(path).float().div_(255.0)


class _SeededFaces(Dataset):
    """Aligned face files plus per-image landmarks; ``generator(index)`` is this epoch's stream for it."""

    def __init__(self, paths: Sequence[Path], landmarks: torch.Tensor | None, seed: int) -> None:
        if landmarks is not None and len(landmarks) != len(paths):
            raise ValueError(f"{len(paths)} images but {len(landmarks)} landmark sets")
        self.paths = list(paths)
        self.landmarks = landmarks
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))


class SSLFaces(_SeededFaces):
    """Unlabelled aligned faces -> a dict of views (LAFSViews / DINOFaceViews)."""

    def __init__(
        self,
        paths: Sequence[Path],
        views: Callable[..., dict[str, torch.Tensor]],
        landmarks: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(paths, landmarks, seed)
        self.views = views

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        landmarks = self.landmarks[index] if self.landmarks is not None else None
        return self.views(read_face(self.paths[index]), landmarks, generator=self.generator(index))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (``skip`` samples of this rank), for exact resume."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def rank_sampler(
    dataset: Dataset, world_size: int, rank: int, seed: int, batch_size: int, what: str, knob: str
) -> ResumableSampler:
    """This rank's :class:`ResumableSampler` over ``dataset``; refuses a share smaller than one batch of
    ``batch_size`` (``what``: the samples' name in the message, ``knob``: the param to lower)."""
    sampler = ResumableSampler(dataset, world_size, rank, seed=seed)
    if len(sampler) < batch_size:
        raise StageError(
            f"{len(dataset)} {what} over {world_size} process(es) is less than one batch of {batch_size}: lower {knob}"
        )
    return sampler


class LandmarkFaces(_SeededFaces):
    """Aligned faces with their dense landmarks, geometrically augmented with the exact label transform."""

    def __init__(self, paths: Sequence[Path], landmarks: torch.Tensor, augment: Callable | None, seed: int = 0) -> None:
        super().__init__(paths, landmarks, seed)
        self.augment = augment

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, landmarks = read_face(self.paths[index]), self.landmarks[index]
        if self.augment is not None:
            image, landmarks = self.augment(image, landmarks, self.generator(index))
        return image.sub(0.5).div(0.5), landmarks


# Recognition crops stay close to the aligned face: the ArcFace template already fixes scale and position,
# so only a mild zoom (and near-square aspect) adds variety without cutting off the eyes or the mouth.
RECOGNITION_CROP_RATIO = (0.9, 1.1)


def recognition_augment(
    crop_scale: tuple[float, float] = (0.8, 1.0), flip: bool = True, size: int = ALIGNED_SIZE
) -> LandmarkAugment:
    """Random mirror + mild random resized crop for recognition finetuning (the official FaceDataset's
    flip + RandomResizedCrop; its RandAugment and mixup are not reproduced). It is the landmark-exact
    transform used everywhere else, applied without landmarks: the recogniser places its own."""
    return LandmarkAugment(size=size, scale=crop_scale, ratio=RECOGNITION_CROP_RATIO, flip_p=0.5 if flip else 0.0)


def read_faces(paths: Sequence[Path]) -> torch.Tensor:
    """Every face of ``paths`` decoded once, (N, 3, H, W) uint8 (a channels-last view): 37 KB per 112 px face,
    ~250 MB for LFW's training set; decoding each PNG again every epoch (~1.6 ms here) is a third of a small
    recogniser's training step per face on a 2-core CPU."""
    return torch.from_numpy(read_aligned(paths)).permute(0, 3, 1, 2)


class LabelledFaces(_SeededFaces):
    """Aligned faces with identity labels -> (image in [-1, 1], label), optionally augmented per sample;
    ``preload`` decodes every face once up front (:func:`read_faces`) instead of at every access."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        augment: LandmarkAugment | None = None,
        seed: int = 0,
        preload: bool = False,
    ) -> None:
        super().__init__(paths, None, seed)
        if len(labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} images but {len(labels)} labels")
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.augment = augment
        self.faces = read_faces(self.paths) if preload else None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_face(self.paths[index]) if self.faces is None else self.faces[index].float().div_(255.0)
        if self.augment is not None:
            image, _ = self.augment(image, None, self.generator(index))
        return image.sub(0.5).div(0.5), self.labels[index]


# -- decoders of shard samples (lafs.data.shards.ShardStream): the same items as the file datasets above, each
# augmented by the generator seeded with its row in the split table, as the file datasets seed it by position.


@dataclass(frozen=True)
class SSLShardDecode:
    """A shard sample -> the views :class:`SSLFaces` makes; ``num_landmarks`` set: the sample's dense landmarks
    go to the views (``landmark_source: extracted``), else none (the landmark net places them)."""

    views: Callable[..., dict[str, torch.Tensor]]
    seed: int
    num_landmarks: int | None = None

    def __call__(self, sample: dict[str, Any], meta: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        landmarks = None
        if self.num_landmarks is not None:
            if meta.get("dense") is None or len(meta["dense"]) != 2 * self.num_landmarks:
                raise ShardError(
                    f"shard sample {meta['aligned_path']} has {len(meta.get('dense') or []) // 2} dense landmarks, "
                    f"pretrain.num_landmarks is {self.num_landmarks}: set them equal or rewrite the shards"
                )
            landmarks = torch.tensor(meta["dense"], dtype=torch.float32).reshape(-1, 2)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, meta["index"]))
        return self.views(decode_face(sample["png"]), landmarks, generator=generator)


@dataclass(frozen=True)
class LabelledShardDecode:
    """A shard sample -> (image in [-1, 1], label) as :class:`LabelledFaces` makes; ``labels`` maps identities."""

    labels: dict[str, int]
    augment: LandmarkAugment | None
    seed: int

    def __call__(self, sample: dict[str, Any], meta: dict[str, Any], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_face(sample["png"])
        if self.augment is not None:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, meta["index"]))
            image, _ = self.augment(image, None, generator)
        return image.sub(0.5).div(0.5), torch.tensor(self.labels[meta["identity"]])
