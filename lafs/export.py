"""ONNX export of a recogniser, and the parity check that makes the exported file trustworthy.

The graph holds the whole model a caller needs (for a part fViT: the landmark net, patch sampling at its
landmarks, the transformer), so a deployment feeds aligned faces and gets embeddings:
input ``images`` (B, 3, 112, 112) float32 in [-1, 1] (see :func:`lafs.eval.embedders.to_model_input`), output
``embedding`` (B, D), dynamic batch axis. The TorchScript-based exporter (``dynamo=False``) is used: the dynamo
exporter needs onnxscript, which the project does not install.

Parity is measured on real aligned faces: per face the cosine between the PyTorch and the ONNX Runtime
embedding, over a batch size other than the one traced, so a batch dimension frozen into the graph shows up.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lafs.eval.embedders import OnnxEmbedder, TorchEmbedder, check_faces
from lafs.faces.align import ALIGNED_SIZE

INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
TRACE_BATCH = 2  # traced with 2 images; parity runs other batch sizes through the dynamic axis


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graph does not reproduce PyTorch's embeddings."""


class _ImagesOnly(nn.Module):
    """``forward(images)`` only: recognisers also accept landmarks / indices, which the graph must not expose."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


def export_onnx(module: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Write ``module`` as ONNX to ``path`` (atomically: a temp file renamed into place) and check the graph."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # The wrapper must be in eval mode too: export restores the training flag of what it was given, and
    # restoring a fresh (training) wrapper would switch the wrapped model's BatchNorm / dropout to training.
    wrapper = _ImagesOnly(module.eval()).eval()
    dummy = torch.rand(TRACE_BATCH, 3, ALIGNED_SIZE, ALIGNED_SIZE, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings():
            # The tracer warns about every Python-side shape check it turns into a constant; the parity check
            # at other batch sizes is what proves the graph general.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript exporter is deprecated in favour of dynamo's, which needs onnxscript (not installed).
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper,
                (dummy * 2 - 1,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        onnx.checker.check_model(str(tmp))
        tmp.replace(path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export of {type(module).__name__} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        module.eval()
    return path


@dataclass(frozen=True)
class Parity:
    """PyTorch vs ONNX Runtime on the same faces: per-face cosine (min / mean) and the largest absolute
    difference of the L2-normalised embeddings."""

    images: int
    batch_size: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def parity(
    module: nn.Module, onnx_path: str | Path, faces: np.ndarray, batch_size: int = 5, threads: int = 0
) -> Parity:
    """Embed ``faces`` (N, 112, 112, 3) uint8 with both runtimes (no TTA) and compare them face by face.

    ``batch_size`` should differ from the traced batch (2) and leave a remainder, exercising the dynamic axis.
    """
    faces = check_faces(faces)
    if not len(faces):
        raise ExportError("parity needs at least one aligned face")
    ref = TorchEmbedder(module, batch_size=batch_size).embed_aligned(faces)
    out = OnnxEmbedder(onnx_path, batch_size=batch_size, threads=threads).embed_aligned(faces)
    if ref.shape != out.shape:
        raise ExportError(f"ONNX embeddings have shape {out.shape}, PyTorch {ref.shape}")
    cos = np.einsum("ij,ij->i", ref.astype(np.float64), out.astype(np.float64))
    return Parity(
        images=len(faces),
        batch_size=batch_size,
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        max_abs_diff=float(np.abs(ref - out).max()),
    )


def require_parity(check: Parity, min_cosine: float) -> None:
    """Raise :class:`ExportError` when the worst face's cosine is below ``min_cosine``."""
    if check.min_cosine < min_cosine:
        raise ExportError(
            f"ONNX parity failed: the worst of {check.images} faces has cosine {check.min_cosine:.6f} "
            f"between PyTorch and ONNX Runtime, below the required {min_cosine} (max abs diff "
            f"{check.max_abs_diff:.2e}): an operator exports differently from eager PyTorch"
        )
