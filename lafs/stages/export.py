"""Stage ``export``: the finetuned model as ONNX (``models/model.onnx``), verified against PyTorch.

Reads ``models/finetune/model.pt`` (a :mod:`lafs.models.io` file: the recogniser with its landmark net) and the
first ``export.parity_images`` aligned faces of ``data/splits/test.csv`` (real faces: landmark nets behave
differently on noise), exports with :func:`lafs.export.export_onnx` and compares both runtimes face by face.
``metrics/export.json`` records the parity either way; when the worst cosine is below ``export.min_cosine``
the ONNX file is deleted (so no later stage can pick it up) and the stage fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lafs.config import Params
from lafs.data.aligned import AlignedFaceError, read_aligned
from lafs.export import ExportError, export_onnx, parity, require_parity
from lafs.layout import Layout
from lafs.models.io import ModelFileError, load_model, read_model_file
from lafs.stages import RunOptions, StageError, write_metrics


@dataclass
class ExportSummary:
    onnx: Path
    model: str
    min_cosine: float
    images: int
    seconds: float

    def describe(self) -> str:
        return (
            f"exported {self.model} to {self.onnx} ({self.onnx.stat().st_size / 1e6:.1f} MB); parity with "
            f"PyTorch on {self.images} real faces: min cosine {self.min_cosine:.6f} ({self.seconds:.1f} s)"
        )


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> ExportSummary:
    start = time.perf_counter()
    cfg, test_split, metrics = params.export, layout.splits / "test.csv", layout.metrics("export")
    if not test_split.is_file():
        raise StageError(f"{test_split} not found: run the split stage first (dvc repro split)")
    try:
        name = read_model_file(layout.model)["model"]
        module = load_model(layout.model)
    except ModelFileError as exc:
        raise StageError(f"{exc} (the export stage reads the finetune stage's model; dvc repro finetune)") from None
    keys = pd.read_csv(test_split)["aligned_path"].head(cfg.parity_images)
    try:
        faces = read_aligned([layout.root / k for k in keys])
    except AlignedFaceError as exc:
        raise StageError(str(exc)) from None
    if not len(faces):
        raise StageError(f"{test_split} holds no faces: the parity check needs real aligned faces")
    try:
        export_onnx(module, layout.onnx, opset=cfg.opset)
        check = parity(module, layout.onnx, faces)
    except ExportError as exc:
        raise StageError(str(exc)) from None
    passed = check.min_cosine >= cfg.min_cosine
    write_metrics(
        metrics,
        {
            **check.as_dict(),
            "opset": cfg.opset,
            "min_cosine_required": cfg.min_cosine,
            "passed": passed,
            "onnx_bytes": layout.onnx.stat().st_size,
        },
    )
    try:
        require_parity(check, cfg.min_cosine)
    except ExportError as exc:
        layout.onnx.unlink()  # so no later stage picks up a graph that computes something else
        raise StageError(f"{exc}; {layout.onnx} was deleted, the numbers are in {metrics}") from None
    return ExportSummary(layout.onnx, name, check.min_cosine, check.images, time.perf_counter() - start)
