"""``lafs cluster``: group unlabelled aligned faces into identities with a trained model (on demand, not a DVC stage).

Input faces are a CSV with ``aligned_path`` (or ``path``) and optionally ``identity`` (e.g. a
``data/splits/*.csv``; paths relative to ``root``), or a folder of aligned faces; or precomputed embeddings
(``.npy``, one row per face, in the order of the CSV/folder when one is given too). The embedder is
:func:`lafs.eval.embedders.load_embedder` (model file, ``.onnx`` or ``dlib_resnet``). The similarity threshold is
the verification operating point of a metrics JSON or given. Outputs in ``out_dir``:

- ``clusters.csv``: ``path, cluster`` (cluster 0 = largest; -1 = left unclustered by HDBSCAN);
- ``cluster_metrics.json``: cluster statistics, and pairwise P/R/F + NMI when identities are known;
- ``embeddings.npy`` when embeddings were computed, so another threshold costs no second pass of the model;
- ``curated.txt`` with ``curate_min_size``: the images in clusters of at least that many faces, one per line
  (as given in the input), a cleaned image list for self-supervised pretraining.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lafs.data.aligned import AlignedFaceError, read_aligned
from lafs.eval.clustering import (
    ClusteringError,
    Method,
    cluster_embeddings,
    cluster_report,
    curated,
    threshold_from_metrics,
)
from lafs.stages import StageError, write_metrics

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
EMBED_CHUNK = 256  # faces decoded per embedder call: bounds memory whatever the folder size


@dataclass(frozen=True)
class ClusterConfig:
    """What to cluster and how; exactly one threshold source (``threshold`` or ``metrics``)."""

    model: str | None = None  # model file, .onnx or "dlib_resnet"; not needed with ``embeddings``
    images: Path | None = None  # CSV (aligned_path[, identity]) or a folder of aligned faces
    embeddings: Path | None = None  # (N, D) .npy instead of running a model
    threshold: float | None = None
    metrics: Path | None = None  # JSON holding the verification threshold (metrics/eval.json)
    metrics_key: str = "verification.threshold"
    method: Method = "agglomerative"
    min_cluster_size: int = 2  # HDBSCAN only
    curate_min_size: int | None = None
    root: Path = Path(".")  # CSV paths are relative to it (split CSVs hold project-root-relative paths)
    folder_identities: bool = False  # folder input: the parent folder name is the identity (<identity>/<image>)
    flip: bool = False  # flip-sum embeddings (insightface TTA)
    batch_size: int = 64


@dataclass
class ClusterSummary:
    images: int
    clusters: int
    threshold: float
    clusters_csv: Path
    metrics: dict[str, Any]
    curated: int | None = None

    def describe(self) -> str:
        text = (
            f"clustered {self.images} faces into {self.clusters} clusters "
            f"({self.metrics['singletons']} singletons) at similarity {self.threshold:.4f}"
        )
        pairwise = self.metrics.get("pairwise")
        if pairwise and pairwise["f"] is not None:
            text += f"; pairwise F {pairwise['f']:.4f}, NMI {self.metrics['nmi']:.4f}"
        if self.curated is not None:
            text += f"; {self.curated} faces in curated.txt"
        return f"{text}; {self.clusters_csv}"


def read_image_list(cfg: ClusterConfig) -> tuple[list[str], list[Path], list[str] | None]:
    """(paths as written to the outputs, files to read, identities or None) for the configured input."""
    src = cfg.images
    if src is None:
        raise StageError("no faces given: pass --images (a CSV or a folder of aligned faces)")
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise StageError(f"{src} holds no {'/'.join(IMAGE_SUFFIXES)} files: give a folder of aligned faces")
        identities = [p.parent.name for p in files] if cfg.folder_identities else None
        return [str(p) for p in files], files, identities
    if not src.is_file():
        raise StageError(f"--images {src} not found: give a CSV with an aligned_path column or a folder")
    table = pd.read_csv(src)
    column = next((c for c in ("aligned_path", "path") if c in table.columns), None)
    if column is None:
        raise StageError(f"{src} has columns {list(table.columns)}: expected aligned_path (or path)[, identity]")
    if table.empty:
        raise StageError(f"{src} lists no images")
    paths = [str(p) for p in table[column]]
    identities = [str(i) for i in table["identity"]] if "identity" in table.columns else None
    return paths, [cfg.root / p for p in paths], identities


def _read_faces(files: list[Path]) -> np.ndarray:
    try:
        return read_aligned(files)
    except AlignedFaceError as exc:
        raise StageError(f"{exc} (check --images and --root)") from None


def embed_files(model: str, files: list[Path], flip: bool = False, batch_size: int = 64) -> np.ndarray:
    """L2-normalised embeddings of aligned face files, decoded ``EMBED_CHUNK`` at a time."""
    from lafs.eval.embedders import EmbedderError, load_embedder

    try:
        embedder = load_embedder(model, batch_size=batch_size)
        chunks = [
            embedder.embed_aligned(_read_faces(files[i : i + EMBED_CHUNK]), flip=flip)
            for i in range(0, len(files), EMBED_CHUNK)
        ]
    except EmbedderError as exc:
        raise StageError(str(exc)) from None
    return np.concatenate(chunks)


def _threshold(cfg: ClusterConfig) -> tuple[float, str]:
    if (cfg.threshold is None) == (cfg.metrics is None):
        raise StageError("give exactly one threshold source: --threshold T or --metrics metrics/eval.json")
    if cfg.threshold is not None:
        return float(cfg.threshold), "given"
    return threshold_from_metrics(cfg.metrics, cfg.metrics_key), f"{cfg.metrics}:{cfg.metrics_key}"


def _load_embeddings(cfg: ClusterConfig, n_listed: int | None) -> np.ndarray:
    try:
        emb = np.load(cfg.embeddings, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot read embeddings {cfg.embeddings}: {exc} (expected an (N, D) .npy)") from None
    if emb.ndim != 2:
        raise StageError(f"{cfg.embeddings} holds an array of shape {emb.shape}, expected (N, D) embeddings")
    if n_listed is not None and len(emb) != n_listed:
        raise StageError(
            f"{cfg.embeddings} has {len(emb)} rows but {cfg.images} lists {n_listed} faces: they must match row for row"
        )
    return emb


def run(cfg: ClusterConfig, out_dir: Path) -> ClusterSummary:
    """Embed (or load), cluster, score when identities are known, write the outputs; see the module docstring."""
    try:
        threshold, source = _threshold(cfg)
        if cfg.embeddings is not None:
            listed = read_image_list(cfg) if cfg.images is not None else None
            emb = _load_embeddings(cfg, len(listed[0]) if listed else None)
            paths, identities = (listed[0], listed[2]) if listed else ([str(i) for i in range(len(emb))], None)
            computed = False
        else:
            if cfg.model is None:
                raise StageError("give --model (to embed --images) or --embeddings (precomputed, .npy)")
            paths, files, identities = read_image_list(cfg)
            emb = embed_files(cfg.model, files, cfg.flip, cfg.batch_size)
            computed = True
        labels = cluster_embeddings(emb, threshold, cfg.method, cfg.min_cluster_size)
        report = cluster_report(labels, identities)
        kept = curated(paths, labels, cfg.curate_min_size) if cfg.curate_min_size is not None else None
    except ClusteringError as exc:
        raise StageError(str(exc)) from None

    out_dir.mkdir(parents=True, exist_ok=True)
    clusters_csv = out_dir / "clusters.csv"
    with clusters_csv.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "cluster"])
        writer.writerows(zip(paths, labels.tolist(), strict=True))
    if computed:
        np.save(out_dir / "embeddings.npy", emb.astype(np.float32))
    if kept is not None:
        (out_dir / "curated.txt").write_text("".join(f"{p}\n" for p in kept))
    metrics = {
        **report,
        "threshold": threshold,
        "threshold_source": source,
        "method": cfg.method,
        "model": cfg.model if computed else None,
        "curated_images": None if kept is None else len(kept),
    }
    write_metrics(out_dir / "cluster_metrics.json", metrics)
    log.info("clusters: %s", {k: v for k, v in metrics.items() if k != "pairwise"})
    return ClusterSummary(
        len(paths), report["clusters"], threshold, clusters_csv, metrics, None if kept is None else len(kept)
    )
