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

from lafs.config import LandmarksParams
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
        raise ModelSpecError(f"{folder} is not a served LAFS model (artifacts {sorted(artifacts)}, missing "
                             f"{sorted(missing)}): register it with `lafs register`")
    return FacePipeline.from_files(artifacts["detector"], artifacts["recogniser"],
                                   ServingConfig.read(artifacts["config"]), threads)


def from_project(root: Path, landmarks: LandmarksParams, threads: int = 0) -> FacePipeline:
    """The project's exported recogniser with its detector and evaluate's calibration."""
    from lafs.faces.detect import find_detector_file, find_pack

    onnx, metrics = root / "models" / "model.onnx", root / "metrics" / "eval.json"
    if not onnx.is_file():
        raise ModelSpecError(f"{onnx} not found: run the pipeline (`make pipeline` or `dvc repro export`) or give "
                             "--model models:/<name>@champion")
    serving = json.loads(metrics.read_text()).get("serving", {}) if metrics.is_file() else {}
    cfg = ServingConfig(det_size=landmarks.det_size, det_thresh=landmarks.det_thresh, policy=landmarks.policy,
                        min_face_px=landmarks.min_face_px, flip=bool(serving.get("flip", True)),
                        threshold=serving.get("threshold"))
    detector = find_detector_file(find_pack(landmarks.models_root, landmarks.detector), landmarks.detector_file)
    return FacePipeline.from_files(detector, onnx, cfg, threads)


def load_pipeline(spec: str, root: Path, landmarks: LandmarksParams, threads: int = 0) -> FacePipeline:
    """The :class:`FacePipeline` that ``--model spec`` names (module docstring)."""
    if spec == PROJECT:
        return from_project(root, landmarks, threads)
    return from_pyfunc(pyfunc_dir(spec), threads)
