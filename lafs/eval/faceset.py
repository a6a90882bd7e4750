"""The faces an evaluation protocol needs, each image once, and its verification pairs as indices into them.

Two sources, one shape (:class:`FaceSet` + :class:`PairIndex`), so every model is scored the same way:

- the pipeline's aligned test faces (``data/splits/pairs.csv`` / ``test.csv`` hold aligned paths), with the raw
  photo and SCRFD box of each from ``data/landmarks.parquet`` for embedders that align by themselves (dlib);
- an LFW pairs file (official or fold-prefixed, :func:`lafs.data.pairs.parse_pairs`) over a folder of raw
  ``<Identity>/<Identity>_NNNN.<ext>`` photos, detected and aligned here (:class:`lafs.eval.photos.FaceFinder`).

A pair whose image file does not exist is an error, not a silent drop: the protocol's accuracy would
otherwise be over a different set of pairs than the one named. Faces the detector misses are kept (with the
fallback face) and flagged in ``FaceSet.detected``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lafs.data.aligned import AlignedFaceError, read_aligned
from lafs.data.images import load_rgb
from lafs.data.pairs import Pair, PairRow, parse_pairs
from lafs.eval.embedders import Embedder, PhotoEmbedder
from lafs.eval.photos import FaceFinder

log = logging.getLogger(__name__)


class FaceSetError(AlignedFaceError):
    """The protocol's images or tables are missing or inconsistent; the message names them and what to do."""


@dataclass
class FaceSet:
    """``keys[i]`` (an aligned path or a photo path) -> ``aligned[i]`` (112, 112, 3) uint8; for photo-aligning
    embedders ``photos[i]`` (photo file), ``boxes[i]`` (x1, y1, x2, y2) and ``kps[i]`` (5, 2), in photo pixels;
    ``detected[i]`` False = the fallback face."""

    keys: list[str]
    aligned: np.ndarray
    detected: np.ndarray
    photos: list[Path] | None = None
    boxes: np.ndarray | None = None
    kps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    @property
    def missed(self) -> int:
        return int((~self.detected).sum())

    def iter_photos(self, batch: int) -> Iterator[tuple[list[np.ndarray], np.ndarray, np.ndarray]]:
        """Decoded photos, boxes and keypoints, ``batch`` at a time (photos are re-read, not held in memory)."""
        if self.photos is None or self.boxes is None or self.kps is None:
            raise FaceSetError(
                "this face set has no original photos / face boxes: an embedder that aligns by "
                "itself (dlib_resnet) needs them (data/landmarks.parquet path, bbox, kps5 columns)"
            )
        for start in range(0, len(self.photos), batch):
            end = start + batch
            yield [load_rgb(p) for p in self.photos[start:end]], self.boxes[start:end], self.kps[start:end]


@dataclass(frozen=True)
class PairIndex:
    """Pairs as indices into a :class:`FaceSet`, with ground truth and 1-based protocol fold."""

    first: np.ndarray
    second: np.ndarray
    same: np.ndarray
    folds: np.ndarray

    def __len__(self) -> int:
        return len(self.same)


def embed(embedder: Embedder, faces: FaceSet, flip: bool, batch: int = 64) -> np.ndarray:
    """Embeddings of every face of ``faces``: photos + boxes for a :class:`PhotoEmbedder`, else aligned crops."""
    if isinstance(embedder, PhotoEmbedder):
        parts = [
            embedder.embed_photos(photos, boxes, flip=flip, keypoints=kps)
            for photos, boxes, kps in faces.iter_photos(batch)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return embedder.embed_aligned(faces.aligned, flip=flip)


def aligned_faceset(root: Path, keys: Sequence[str], landmarks_table: Path | None = None) -> FaceSet:
    """The pipeline's aligned faces ``keys`` (paths relative to ``root``); with ``landmarks_table``, also their
    raw photos and SCRFD boxes (every aligned face was detected: the landmarks stage rejects the rest)."""
    keys = list(dict.fromkeys(keys))
    aligned = read_aligned([root / k for k in keys])
    photos = boxes = kps = None
    if landmarks_table is not None:
        if not landmarks_table.is_file():
            raise FaceSetError(f"{landmarks_table} not found: rerun the landmarks stage (dvc repro landmarks)")
        table = pd.read_parquet(landmarks_table, columns=["aligned_path", "path", "bbox", "kps5"])
        table = table.set_index("aligned_path")
        unknown = [k for k in keys if k not in table.index]
        if unknown:
            raise FaceSetError(
                f"{len(unknown)} aligned faces (e.g. {unknown[:3]}) are not in {landmarks_table}: "
                "the splits are older than the landmark table; rerun the split stage"
            )
        rows = table.loc[keys]
        photos = [root / p for p in rows["path"]]
        boxes = np.array([list(b) for b in rows["bbox"]], dtype=np.float32).reshape(-1, 4)
        kps = np.array([list(k) for k in rows["kps5"]], dtype=np.float32).reshape(-1, 5, 2)
    return FaceSet(keys, aligned, np.ones(len(keys), dtype=bool), photos, boxes, kps)


def restrict_to_pairs(faces: FaceSet, pairs: PairIndex) -> tuple[FaceSet, PairIndex]:
    """Only the faces some pair uses, and the same pairs (same order) indexing them: what a verification-only
    pass (floors, ceiling, candidates) needs, without the few-shot faces the model alone embeds."""
    used = np.unique(np.concatenate([pairs.first, pairs.second]))
    new_index = np.full(len(faces), -1, dtype=np.int64)
    new_index[used] = np.arange(len(used))

    def take(values: Any) -> Any:
        if values is None or isinstance(values, np.ndarray):
            return None if values is None else values[used]
        return [values[i] for i in used]

    subset = FaceSet(
        keys=take(faces.keys),
        aligned=faces.aligned[used],
        detected=faces.detected[used],
        photos=take(faces.photos),
        boxes=take(faces.boxes),
        kps=take(faces.kps),
    )
    return subset, PairIndex(new_index[pairs.first], new_index[pairs.second], pairs.same, pairs.folds)


def test_set_fingerprint(faces: FaceSet, pairs: PairIndex) -> dict[str, Any]:
    """What a verification result was measured on: sha256 of the pairs (both face keys, same, fold, in order)
    and of the pixels of every face they use. Two results are comparable only when both hashes agree (the
    promotion gate checks it): same pair list, and the same crops (same photos, detector and alignment)."""
    subset, index = restrict_to_pairs(faces, pairs)
    lines = "".join(
        f"{subset.keys[a]}\t{subset.keys[b]}\t{int(s)}\t{int(f)}\n"
        for a, b, s, f in zip(index.first, index.second, index.same, index.folds, strict=True)
    )
    pixels = hashlib.sha256()
    for key, face in zip(subset.keys, subset.aligned, strict=True):
        pixels.update(key.encode() + b"\0")
        pixels.update(np.ascontiguousarray(face).tobytes())
    return {
        "pairs": len(index.same),
        "faces": len(subset.keys),
        "pairs_sha256": hashlib.sha256(lines.encode()).hexdigest(),
        "faces_sha256": pixels.hexdigest(),
    }


def pairs_from_rows(rows: Sequence[PairRow], faces: FaceSet) -> PairIndex:
    """``pairs.csv`` rows (aligned paths) as indices into ``faces``."""
    where = faces.index()
    missing = sorted({str(r[k]) for r in rows for k in ("path1", "path2") if str(r[k]) not in where})
    if missing:
        raise FaceSetError(f"{len(missing)} pair images (e.g. {missing[:3]}) are not in the face set")
    return PairIndex(
        first=np.array([where[str(r["path1"])] for r in rows], dtype=np.int64),
        second=np.array([where[str(r["path2"])] for r in rows], dtype=np.int64),
        same=np.array([bool(r["same"]) for r in rows]),
        folds=np.array([int(r["fold"]) for r in rows], dtype=np.int64),
    )


def photo_index(images_root: Path) -> dict[tuple[str, str], Path]:
    """``(identity folder, file stem) -> photo`` for every file one level below ``images_root``."""
    if not images_root.is_dir():
        raise FaceSetError(f"images folder {images_root} does not exist (expected <Identity>/<Identity>_NNNN.jpg)")
    index = {}
    for path in sorted(images_root.glob("*/*")):
        if path.is_file() and not path.name.startswith("."):
            index.setdefault((path.parent.name, path.stem), path)
    return index


def photo_faceset(finder: FaceFinder, images_root: Path, pairs_file: Path) -> tuple[FaceSet, PairIndex]:
    """Detect and align every photo an LFW pairs file names (each once), and the pairs as indices."""
    pairs: list[Pair] = parse_pairs(pairs_file)
    index = photo_index(images_root)
    ends = [((p.name1, p.stem1), (p.name2, p.stem2)) for p in pairs]
    missing = sorted({f"{n}/{s}" for pair in ends for n, s in pair if (n, s) not in index})
    if missing:
        raise FaceSetError(
            f"{len(missing)} images named by {pairs_file} are not in {images_root} (e.g. "
            f"{', '.join(missing[:5])}): point --images / evaluate.images_root at the folder holding "
            f"them, or use a pairs file for this subset; pairs are never dropped silently"
        )
    files = list(dict.fromkeys(index[key] for pair in ends for key in pair))
    aligned, boxes, kps, detected = [], [], [], []
    for n, path in enumerate(files, 1):
        face = finder.find(load_rgb(path))
        aligned.append(face.aligned)
        boxes.append(face.box)
        kps.append(face.kps)
        detected.append(face.detected)
        if n % 200 == 0:
            log.info("faces: %d / %d photos", n, len(files))
    faces = FaceSet(
        [str(p) for p in files],
        np.stack(aligned),
        np.array(detected, dtype=bool),
        files,
        np.stack(boxes).astype(np.float32),
        np.stack(kps).astype(np.float32),
    )
    where = faces.index()
    return faces, PairIndex(
        first=np.array([where[str(index[a])] for a, _ in ends], dtype=np.int64),
        second=np.array([where[str(index[b])] for _, b in ends], dtype=np.int64),
        same=np.array([p.same for p in pairs]),
        folds=np.array([p.fold for p in pairs], dtype=np.int64),
    )
