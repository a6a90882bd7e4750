"""The served model: one self-contained MLflow pyfunc holding the detector ONNX, the recogniser ONNX and
``serving.json`` (alignment settings, flip TTA, the calibrated threshold), plus the torch-free slice of this
package that runs them. ``mlflow models serve -m models:/<name>@champion`` answers:

- ``{"dataframe_split": {"columns": ["image"], "data": [[<base64 photo>], ...]}}``: a row per photo with
  ``embedding`` (unit vector), ``box`` (x1, y1, x2, y2), ``keypoints`` (x, y of eyes, nose, mouth corners),
  ``det_score``;
- ``{"dataframe_split": {"columns": ["image_a", "image_b"], "data": [[<a>, <b>], ...]}}``: a row per pair with
  ``score`` (cosine), ``same`` (score above the threshold) and ``threshold``.

The model is stored in MLflow's models-from-code form (:mod:`lafs.serving.served_model`), so loading it unpickles
nothing. A bad row (not base64, not an image, too many bytes or pixels, no usable face, a wrong set of columns) fails
the request with ``INVALID_PARAMETER_VALUE`` (HTTP 400) whose message names the row and the reason code; the
server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array

from lafs.data.images import ImageRejected
from lafs.serving.faces import CONFIG_FILE, EmbeddedFace, FacePipeline, ServingConfig

ARTIFACTS = {"detector": "detector.onnx", "recogniser": "recogniser.onnx", "config": CONFIG_FILE}
IMAGE, IMAGE_A, IMAGE_B = "image", "image_a", "image_b"
# The package files the served model runs (no torch among their imports); copied into the model's code/.
SERVING_MODULES = (
    "__init__.py",
    "conventions.py",
    "serving/__init__.py",
    "serving/faces.py",
    "serving/pyfunc.py",
    "eval/__init__.py",
    "eval/onnx_embedder.py",
    "faces/__init__.py",
    "faces/align.py",
    "faces/detect.py",
    "data/__init__.py",
    "data/images.py",
)
REQUIREMENTS = ("mlflow", "onnxruntime", "insightface", "opencv-python-headless", "numpy", "pandas", "pillow")


def signature() -> ModelSignature:
    """Both request shapes in one schema: ``image`` rows or ``image_a`` + ``image_b`` rows (base64 strings)."""
    inputs = Schema([ColSpec("string", name, required=False) for name in (IMAGE, IMAGE_A, IMAGE_B)])
    floats = Array("double")
    outputs = Schema(
        [
            ColSpec(floats, "embedding", required=False),
            ColSpec(floats, "box", required=False),
            ColSpec(floats, "keypoints", required=False),
            ColSpec("double", "det_score", required=False),
            ColSpec("double", "score", required=False),
            ColSpec("boolean", "same", required=False),
            ColSpec("double", "threshold", required=False),
        ]
    )
    return ModelSignature(inputs, outputs)


def worker_threads() -> int:
    """ONNX Runtime threads per serving process: ``LAFS_SERVE_THREADS`` if set, else the cores split among the
    ``MLFLOW_MODELS_WORKERS`` uvicorn workers (``mlflow models serve --workers`` reads that variable), so that
    workers do not oversubscribe the cores; 0 (ORT's default, every core) for a single worker."""
    if os.environ.get("LAFS_SERVE_THREADS"):
        return max(0, int(os.environ["LAFS_SERVE_THREADS"]))
    workers = int(os.environ.get("MLFLOW_MODELS_WORKERS") or 1)
    return 0 if workers <= 1 else max(1, (os.cpu_count() or 1) // workers)


def bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


class FaceModel(PythonModel):
    """Photos (base64) -> faces and embeddings, or pairs -> same-person decisions (module docstring)."""

    def __init__(self, pipeline: FacePipeline | None = None) -> None:
        self.pipeline = pipeline

    def load_context(self, context: Any) -> None:
        a = context.artifacts
        cfg = ServingConfig.read(Path(a["config"]))
        self.pipeline = FacePipeline.from_files(Path(a["detector"]), Path(a["recogniser"]), cfg, worker_threads())

    def _face(self, value: Any, where: str) -> EmbeddedFace:
        if isinstance(value, bytes | bytearray):
            data = bytes(value)
        elif isinstance(value, str):
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise bad_request(f"{where}: not base64 (send the photo's bytes base64-encoded)") from None
        else:
            raise bad_request(f"{where}: expected a base64 string, got {type(value).__name__}")
        try:
            return self.pipeline.embed(self.pipeline.decode(data, where))
        except ImageRejected as exc:
            raise bad_request(f"{where}: {exc.code}: {exc.message}") from None

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if self.pipeline is None:
            raise RuntimeError("FaceModel has no pipeline: load it with mlflow.pyfunc.load_model")
        if not isinstance(model_input, pd.DataFrame) or model_input.empty:
            raise bad_request("send a non-empty table: columns ['image'] or ['image_a', 'image_b']")
        unknown = sorted(map(str, set(model_input.columns) - {IMAGE, IMAGE_A, IMAGE_B}))
        if unknown:
            raise bad_request(
                f"unknown columns {unknown}: send ['image'] (embed) or ['image_a', 'image_b'] (verify), base64 photos"
            )
        rows = [
            self._row(i, {c: v for c, v in row.items() if not _missing(v)})
            for i, row in enumerate(model_input.to_dict("records"))
        ]
        out = pd.DataFrame(rows)
        return out.astype(object).where(out.notna(), None) if out.isna().any().any() else out

    def _row(self, i: int, row: dict[str, Any]) -> dict[str, Any]:
        """One request row: ``image`` -> its face, or ``image_a`` + ``image_b`` -> the pair's decision."""
        if set(row) == {IMAGE}:
            return self._face(row[IMAGE], f"row {i} image").row()
        if not row.keys() & {IMAGE_A, IMAGE_B} or IMAGE in row:
            raise bad_request(f"row {i}: give either image (embed) or image_a and image_b (verify)")
        if set(row) != {IMAGE_A, IMAGE_B}:
            raise bad_request(f"row {i}: a pair needs both image_a and image_b")
        if self.pipeline.cfg.threshold is None:
            raise bad_request("this model carries no calibrated threshold: it can embed, not verify")
        score = self.pipeline.score(
            self._face(row[IMAGE_A], f"row {i} image_a"), self._face(row[IMAGE_B], f"row {i} image_b")
        )
        return {"score": score, "same": self.pipeline.same(score), "threshold": self.pipeline.cfg.threshold}


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)  # null, NA or NaN


def requirements() -> list[str]:
    """The serving environment, pinned to what this one runs."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def code_dir(dest: Path) -> Path:
    """``dest/lafs``: the modules of :data:`SERVING_MODULES`, the only code the served model carries."""
    src = Path(__file__).resolve().parents[1]
    for rel in SERVING_MODULES:
        target = dest / "lafs" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)
    return dest / "lafs"


def write_artifacts(folder: Path, detector: Path, recogniser: Path, cfg: ServingConfig) -> dict[str, str]:
    """The three artifacts under their fixed names in ``folder``; name -> path for ``artifacts=``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(detector, folder / ARTIFACTS["detector"])
    shutil.copyfile(recogniser, folder / ARTIFACTS["recogniser"])
    cfg.write(folder / ARTIFACTS["config"])
    return {name: str(folder / file) for name, file in ARTIFACTS.items()}


def input_example(photos: tuple[Path, ...], cfg: ServingConfig) -> pd.DataFrame | None:
    """Both request shapes in one table: an ``image`` row (embed) and, for a calibrated model, an ``image_a`` +
    ``image_b`` row (verify); logging runs it through the loaded model."""
    if not photos:
        return None
    data = [base64.b64encode(p.read_bytes()).decode() for p in photos[:2]]
    rows: list[dict[str, str | None]] = [{IMAGE: data[0], IMAGE_A: None, IMAGE_B: None}]
    if len(data) == 2 and cfg.threshold is not None:
        rows.append({IMAGE: None, IMAGE_A: data[0], IMAGE_B: data[1]})
    return pd.DataFrame(rows)


def _model_kwargs(
    tmp: Path, detector: Path, recogniser: Path, cfg: ServingConfig, example_photos: tuple[Path, ...]
) -> dict[str, Any]:
    artifacts = write_artifacts(tmp / "artifacts", detector, recogniser, cfg)
    definition = str(Path(__file__).with_name("served_model.py"))  # models from code: nothing pickled
    return {
        "python_model": definition,
        "artifacts": artifacts,
        "code_paths": [str(code_dir(tmp / "code"))],
        "signature": signature(),
        "pip_requirements": requirements(),
        "input_example": input_example(example_photos, cfg),
    }


def log_model(
    name: str,
    detector: Path,
    recogniser: Path,
    cfg: ServingConfig,
    example_photos: tuple[Path, ...],
    registered_model_name: str | None = None,
) -> Any:
    """Log the pyfunc in the active MLflow run (``mlflow.pyfunc.log_model``, which loads it back and runs the
    input example as serving would); its ModelInfo."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="lafs-serving-") as tmp:
        return mlflow.pyfunc.log_model(
            name=name,
            registered_model_name=registered_model_name,
            **_model_kwargs(Path(tmp), detector, recogniser, cfg, example_photos),
        )


def save_model(
    path: Path, detector: Path, recogniser: Path, cfg: ServingConfig, example_photos: tuple[Path, ...] = ()
) -> Path:
    """The same pyfunc as a local folder (``mlflow.pyfunc.save_model``): servable and usable as ``--model``."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="lafs-serving-") as tmp:
        mlflow.pyfunc.save_model(str(path), **_model_kwargs(Path(tmp), detector, recogniser, cfg, example_photos))
    return path
