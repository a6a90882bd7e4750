"""``--model`` for the commands that use a recogniser on photos: a registry or run URI, a saved pyfunc folder,
or the project's own files.

- ``models:/<name>@<alias>`` / ``models:/<name>/<version>``, ``runs:/<id>/model``, any MLflow artifact URI, or a
  local folder holding an ``MLmodel``: the served pyfunc (:mod:`lafs.serving.pyfunc`), downloaded with MLflow
  (``MLFLOW_TRACKING_URI`` names the server) and run from its artifacts by this package;
- ``project`` (the default): ``models/model.onnx`` of the project at ``root``, the ``landmarks`` section's
  detector and settings, and the threshold ``metrics/eval.json`` calibrated for that path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lafs.config import LandmarksParams
from lafs.layout import Layout
from lafs.serving.faces import FacePipeline, ServingConfig
from lafs.tracking import ModelSpecError, pyfunc_dir

PROJECT = "project"

__all__ = ["PROJECT", "ModelSpecError", "from_project", "from_pyfunc", "load_pipeline", "pyfunc_dir"]


def from_pyfunc(folder: Path, threads: int = 0) -> FacePipeline:
    """The pipeline inside a saved :mod:`lafs.serving.pyfunc` model folder."""
    from mlflow.models import Model

    flavor = Model.load(str(folder)).flavors.get("python_function", {})
    artifacts = {name: folder / entry["path"] for name, entry in (flavor.get("artifacts") or {}).items()}
    missing = {"detector", "recogniser", "config"} - set(artifacts)
    if missing:
        raise ModelSpecError(
            f"{folder} is not a served LAFS model (artifacts {sorted(artifacts)}, missing "
            f"{sorted(missing)}): register it with `lafs register`"
        )
    return FacePipeline.from_files(
        artifacts["detector"], artifacts["recogniser"], ServingConfig.read(artifacts["config"]), threads
    )


def serving_config(landmarks: LandmarksParams, report: dict[str, Any]) -> ServingConfig:
    """The served path's settings: the ``landmarks`` section's detector settings (the faces the model was trained
    and evaluated on) and evaluate's calibration of the ONNX path (``eval.json`` ``serving``; the model's own
    verification threshold and flip for an eval.json written before that section existed)."""
    serving = report.get("serving") or {}
    return ServingConfig(
        det_size=landmarks.det_size,
        det_thresh=landmarks.det_thresh,
        policy=landmarks.policy,
        min_face_px=landmarks.min_face_px,
        flip=bool(serving.get("flip", (report.get("model") or {}).get("flip", True))),
        threshold=serving.get("threshold", (report.get("verification") or {}).get("threshold")),
    )


def detector_file(landmarks: LandmarksParams) -> Path:
    """The SCRFD file the ``landmarks`` section names."""
    from lafs.faces.detect import find_detector_file, find_pack

    return find_detector_file(find_pack(landmarks.models_root, landmarks.detector), landmarks.detector_file)


def from_project(root: Path, landmarks: LandmarksParams, threads: int = 0) -> FacePipeline:
    """The project's exported recogniser with its detector and evaluate's calibration."""
    layout = Layout(root)
    onnx, metrics = layout.onnx, layout.metrics("evaluate")
    if not onnx.is_file():
        raise ModelSpecError(
            f"{onnx} not found: run the pipeline (`make pipeline` or `dvc repro export`) or give "
            "--model models:/<name>@champion"
        )
    report = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return FacePipeline.from_files(detector_file(landmarks), onnx, serving_config(landmarks, report), threads)


def load_pipeline(spec: str, root: Path, landmarks: LandmarksParams, threads: int = 0) -> FacePipeline:
    """The :class:`FacePipeline` that ``--model spec`` names (module docstring)."""
    if spec == PROJECT:
        return from_project(root, landmarks, threads)
    return from_pyfunc(pyfunc_dir(spec), threads)
