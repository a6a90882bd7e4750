"""MLflow adapter: one run per training, opened on rank 0 only, resumable by run id.

Tracking URI: a stage's ``tracking_uri`` param when set (a value in params.yaml is tracked by DVC and wins over the
environment, so ``dvc exp run -S finetune.tracking_uri=...`` does what it says), else ``MLFLOW_TRACKING_URI``
from the environment (``make pipeline`` defaults it to the project's sqlite store), else a local sqlite store
``mlflow.db`` (MLflow 3 refuses new file stores) with artifacts in ``mlartifacts/`` beside it.
Params are the resolved, credential-free stage config (keys that look like secrets are dropped defensively).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_SECRET_WORDS = ("password", "secret", "token", "access_key", "credential")
LOG_EVERY = 20  # training steps per MLflow request
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested mapping under a dotted key (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); keys that look
    like secrets are dropped. The one flattener: params, tags and (:func:`metric_leaves`) metrics."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if any(word in name.lower() for word in _SECRET_WORDS):
            continue
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def metric_leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested report under dotted keys, as floats: what MLflow can store as metrics and
    the promotion gate compares. Booleans, strings, lists, None and non-finite numbers are not metrics."""
    return {
        k: float(v)
        for k, v in flatten(data, prefix).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def tracking_uri(param: str | None = None) -> str:
    """The param, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db`` (module docstring)."""
    return param or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database, not in the current directory."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides (e.g. --artifacts-destination s3://...)


def ensure_experiment(name: str, uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_root(uri))


class RunLogger:
    """No-op unless ``enabled`` (rank 0), so training code logs unconditionally."""

    def __init__(
        self,
        enabled: bool,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        run_id: str | None = None,
        uri: str | None = None,
        tags: Mapping[str, str] | None = None,
        system_metrics: bool = True,
        parent_run_id: str | None = None,
    ) -> None:
        """``parent_run_id`` nests a new run under that run (tag ``mlflow.parentRunId``: Optuna trials,
        comparison cells); the parent may be the active run of this process or one opened elsewhere."""
        self.enabled = enabled
        self.run_id: str | None = None
        self._pending: list[Any] = []
        self._steps: set[int] = set()
        if not enabled:
            return
        import mlflow

        self._mlflow = mlflow
        uri = tracking_uri(uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=ensure_experiment(experiment, uri))
        nest = parent_run_id is not None and run_id is None  # a resumed run already carries its parent tag
        run = mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else run_name,
            log_system_metrics=system_metrics,
            tags=dict(tags or {}),
            nested=parent_run_id is not None,
            parent_run_id=parent_run_id if nest else None,
        )
        self.run_id = run.info.run_id
        if run_id is None:  # a resumed run already holds its params (MLflow refuses changed values)
            mlflow.log_params(flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffered: sent as one ``log_batch`` call every :data:`LOG_EVERY` steps (and by :meth:`flush` /
        :meth:`end`), instead of one request per training step (10^5-10^6 at official size)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._steps.add(step)
        if len(self._steps) >= LOG_EVERY or len(self._pending) >= MAX_BATCH_METRICS:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics now (in chunks MLflow accepts)."""
        if not self.enabled or not self._pending:
            return
        client = self._mlflow.MlflowClient()
        for start in range(0, len(self._pending), MAX_BATCH_METRICS):
            client.log_batch(self.run_id, metrics=self._pending[start : start + MAX_BATCH_METRICS])
        self._pending, self._steps = [], set()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifact(str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)


# ------------------------------------------------------------------ served models named by URI or folder
class ModelSpecError(ValueError):
    """``--model`` names nothing usable; the message says what was looked for."""


def _is_uri(spec: str) -> bool:
    return "://" in spec or spec.startswith(("models:/", "runs:/"))


def pyfunc_dir(spec: str) -> Path:
    """Local folder of the pyfunc model ``spec`` (downloaded when it is a URI)."""
    if not _is_uri(spec):
        folder = Path(spec)
        if not (folder / "MLmodel").is_file():
            raise ModelSpecError(
                f"--model {spec}: no MLmodel file there; give models:/<name>@champion, runs:/<id>/"
                "model, a saved pyfunc folder, or 'project' (this project's files)"
            )
        return folder
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=spec))
    except (MlflowException, OSError) as exc:
        raise ModelSpecError(
            f"--model {spec}: cannot download it ({exc}); check MLFLOW_TRACKING_URI and the name/alias/version"
        ) from None


def is_model_reference(spec: str) -> bool:
    """A registry / run / artifact URI or a saved pyfunc folder (not a model file, not a built-in embedder)."""
    return _is_uri(spec) or (Path(spec) / "MLmodel").is_file()


def recogniser_file(spec: str) -> Path:
    """The ONNX recogniser inside the served model ``spec``: what ``evaluate`` / ``cluster`` / ``compare`` embed
    aligned faces with when given a registry URI."""
    from mlflow.models import Model

    folder = pyfunc_dir(spec)
    artifacts = Model.load(str(folder)).flavors.get("python_function", {}).get("artifacts") or {}
    if "recogniser" not in artifacts:
        raise ModelSpecError(
            f"{spec} is not a served LAFS model (no recogniser artifact): register it with `lafs register`"
        )
    return folder / artifacts["recogniser"]["path"]
