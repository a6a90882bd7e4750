"""Stage ``register``: put the evaluated model in the MLflow Model Registry, then run the promotion gate.

Registers the served model as a new version of ``register.model_name``: a self-contained pyfunc
(:mod:`lafs.serving.pyfunc`: the ``landmarks`` section's SCRFD detector, ``models/model.onnx`` and evaluate's
threshold for that path; ``mlflow models serve -m models:/<name>@champion`` answers photos and pairs). Its run also
holds ``models/finetune/model.pt`` in the PyTorch flavour (torch.export: loading it needs neither pickle nor this
package), the ONNX recogniser in the ``onnx`` flavour, the source model file and ``metrics/eval.json``. Tags the
version with its lineage (git commit, the ``dvc.lock`` hashes of the stages that produced it, the file hashes, the
eval metrics); points ``challenger`` at it; then :func:`lafs.registry.promote` decides whether ``champion`` moves.
The same model and eval files registered again reuse their version instead of adding a copy. A rejected challenger
is a normal outcome, not a failure: ``metrics/promotion.json`` says ``promoted: false`` and ``reports/promotion.md``
says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lafs import registry
from lafs.atomic import write_text
from lafs.config import LandmarksParams, Params, RegisterParams, resolved
from lafs.layout import Layout
from lafs.stages import RunOptions, StageError, write_metrics

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterPaths:
    """The stage's files (the evaluated model, its ONNX and eval metrics in; the gate's decision out)."""

    layout: Layout

    @property
    def model(self) -> Path:
        return self.layout.model

    @property
    def onnx(self) -> Path:
        return self.layout.onnx

    @property
    def eval_metrics(self) -> Path:
        return self.layout.metrics("evaluate")

    @property
    def promotion(self) -> Path:
        return self.layout.metrics("register")

    @property
    def report(self) -> Path:
        return self.layout.promotion_report


@dataclass(frozen=True)
class RegisterSummary:
    model_name: str
    version: str
    reused: bool
    decision: registry.Decision

    def describe(self) -> str:
        how = "already registered as" if self.reused else "registered as"
        return f"{how} {self.model_name} v{self.version} (alias {registry.CHALLENGER}); {self.decision.describe()}"


def md5(path: Path) -> str:
    """The file hash DVC records in dvc.lock (md5 of the bytes), so tags and lock can be matched."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Run settings, not code: overrides are values set in params.yaml (dvc exp run -S) and every run rewrites
# dvc.lock; both are pinned by the dvc.lock hashes tagged on the version, so they do not make a tree dirty.
RUN_STATE_FILES = ("params.yaml", "dvc.lock")


def git_tags(root: Path) -> dict[str, str]:
    """``git.commit`` (``unknown`` outside a git checkout), ``git.dirty`` (tracked files other than
    :data:`RUN_STATE_FILES` changed) and ``git.params_changed`` (params.yaml differs from the commit)."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "unknown"}
    status = git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){f}" for f in RUN_STATE_FILES)
    )
    params = git("status", "--porcelain", "--untracked-files=no", "--", RUN_STATE_FILES[0])
    return {"git.commit": commit, "git.dirty": _flag(status), "git.params_changed": _flag(params)}


def _flag(git_output: str | None) -> str:
    return "unknown" if git_output is None else str(bool(git_output)).lower()


def dvc_lineage(lock: Path, stages: tuple[str, ...]) -> dict[str, str]:
    """Tags from ``dvc.lock``: for each of ``stages``, the md5 of every dep and out, and of its params.

    DVC stores params by value, so their hash is the md5 of their canonical JSON. ``dvc.lock`` is read, never
    declared as a dep (a stage cannot depend on the lock DVC rewrites for it). Stages absent from the lock
    are tagged ``absent`` rather than failing: ``lafs register`` also runs outside DVC.
    """
    if not lock.exists():
        return {"dvc.lock": "absent"}
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StageError(f"{lock}: not valid YAML ({exc}); rerun `dvc repro` to rewrite it") from None
    tags = {"dvc.lock.md5": md5(lock)}
    locked = data.get("stages") or {}
    for stage in stages:
        entry = locked.get(stage)
        if not isinstance(entry, dict):
            tags[f"dvc.{stage}"] = "absent"
            continue
        for kind in ("deps", "outs"):
            for item in entry.get(kind) or []:
                digest = item.get("md5") or item.get("hash") or "unknown"
                tags[f"dvc.{stage}.{kind}.{item.get('path')}"] = str(digest)
        for file, values in (entry.get("params") or {}).items():
            canonical = json.dumps(values, sort_keys=True, default=str).encode()
            tags[f"dvc.{stage}.params.{file}"] = hashlib.md5(canonical).hexdigest()
    return {k: v for k, v in tags.items() if len(k) <= 250}


def served_model(landmarks: LandmarksParams, report: dict[str, Any], layout: Layout) -> registry.ServedModel:
    """The served pyfunc's parts: the detector and settings of :func:`lafs.serving.load.serving_config` and two real
    photos of the project for the input example."""
    from lafs.faces import FaceModelError
    from lafs.serving.load import detector_file, serving_config

    try:
        detector = detector_file(landmarks)
    except FaceModelError as exc:
        raise StageError(f"{exc} (register bundles the detector into the served model)") from None
    cfg = serving_config(landmarks, report)
    examples, table = (), layout.landmarks
    if table.is_file():
        import pandas as pd

        examples = tuple(layout.root / p for p in pd.read_parquet(table, columns=["path"])["path"].head(2))
    return registry.ServedModel(detector, cfg, examples)


def measured_on(report: dict[str, Any]) -> dict[str, str]:
    """Tags naming what the eval metrics were measured on (eval.json ``protocol`` and ``test_set``): the gate
    compares a challenger with a champion only when these agree."""
    test_set = report.get("test_set") or {}
    tags = {f"test_set.{k}": str(v) for k, v in test_set.items()}
    name = (report.get("protocol") or {}).get("name")
    if name:
        tags["protocol.name"] = str(name)
    return tags


def _check_inputs(cfg: RegisterParams, paths: RegisterPaths) -> tuple[dict[str, Any], dict[str, float]]:
    """``metrics/eval.json`` (as written, and its flat metrics) once the stage's inputs are all there."""
    needed = {paths.model: "finetune", paths.eval_metrics: "evaluate"}
    if cfg.register_onnx:
        needed[paths.onnx] = "export (or set register.register_onnx: false)"
    for path, stage in needed.items():
        if not path.exists():
            raise StageError(f"{path} not found: run the {stage} stage first (`dvc repro register` runs them)")
    try:
        report = json.loads(paths.eval_metrics.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{paths.eval_metrics} is not JSON ({exc}): rerun the evaluate stage") from None
    metrics = registry.flatten_metrics(report)
    wanted = [cfg.primary_metric, *cfg.secondary_metrics]
    missing = [k for k in wanted if k not in metrics]
    if missing:
        raise StageError(
            f"{paths.eval_metrics} has no metric {missing} (it has {sorted(metrics)[:20]}...): "
            "fix register.primary_metric / register.secondary_metrics"
        )
    return report, metrics


def _registration(
    cfg: RegisterParams,
    paths: RegisterPaths,
    report: dict[str, Any],
    metrics: dict[str, float],
    model_file: dict[str, Any],
) -> registry.Registration:
    onnx = paths.onnx if cfg.register_onnx else None
    tags = {
        **git_tags(paths.layout.root),
        **dvc_lineage(paths.layout.dvc_lock, cfg.lineage_stages),
        "model_file.md5": md5(paths.model),
        "eval.md5": md5(paths.eval_metrics),
        "model.name": str(model_file["model"]),
        "model.embed_dim": str(model_file.get("embed_dim", "unknown")),
    }
    if onnx is not None:
        tags["onnx.md5"] = md5(onnx)
    tags |= measured_on(report)
    # dvc.lock's evaluate entry names both files: the model it read (a dep) and the metrics it wrote (an out)
    evaluate = dvc_lineage(paths.layout.dvc_lock, ("evaluate",))
    rel = paths.layout.relative
    locked = (
        evaluate.get(f"dvc.evaluate.deps.{rel(paths.model)}") == tags["model_file.md5"]
        and evaluate.get(f"dvc.evaluate.outs.{rel(paths.eval_metrics)}") == tags["eval.md5"]
    )
    tags["provenance"] = registry.PROVENANCE_LOCKED if locked else "outside dvc.lock"
    params = {
        **registry.safe_params(resolved(cfg), "register."),
        **registry.safe_params({"name": model_file["model"], "kwargs": model_file["kwargs"]}, "model."),
        **registry.safe_params(model_file.get("config") or {}, "finetune."),
    }
    return registry.Registration(paths.model, paths.eval_metrics, onnx, metrics, params, tags)


def _write_outputs(paths: RegisterPaths, decision: registry.Decision) -> None:
    write_metrics(paths.promotion, registry.promotion_metrics(decision))
    write_text(paths.report, registry.report_markdown(decision))


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> RegisterSummary:
    """The stage: register ``layout``'s evaluated model and gate it (``landmarks``: the bundled detector)."""
    return register(params.register, layout, landmarks=params.landmarks)


def register(
    cfg: RegisterParams,
    layout: Layout,
    client: MlflowClient | None = None,
    landmarks: LandmarksParams | None = None,
) -> RegisterSummary:
    """Register the evaluated model, point ``challenger`` at it and run the promotion gate (module docstring).

    ``client`` defaults to one on the configured tracking URI (tests pass one to inject faults); ``landmarks``
    (default: its defaults) names the detector the served model bundles.
    """
    from lafs.models.io import load_model, read_model_file

    paths = RegisterPaths(layout)
    report, metrics = _check_inputs(cfg, paths)
    reg = _registration(cfg, paths, report, metrics, read_model_file(paths.model))
    with registry.mlflow_errors(cfg):
        client = client or registry.client_for(cfg)
        same = {k: reg.tags[k] for k in ("model_file.md5", "eval.md5")}
        existing = registry.find_version(client, cfg.model_name, same)
        if existing is not None:
            version, reused = existing.version, True
            log.info("%s v%s already holds these model and eval files: reusing it", cfg.model_name, version)
        else:
            if cfg.register_onnx:  # the served pyfunc runs the ONNX recogniser
                reg = replace(reg, served=served_model(landmarks or LandmarksParams(), report, layout))
            version, reused = registry.register_version(cfg, load_model(paths.model), reg).version, False
        client.set_registered_model_alias(cfg.model_name, registry.CHALLENGER, version)
        decision = registry.promote(client, cfg, version, before_move=lambda d: _write_outputs(paths, d))
    return RegisterSummary(cfg.model_name, str(version), reused, decision)
