"""MLflow Model Registry: register an evaluated model, gate its promotion to ``champion``, roll back.

Two aliases name the versions that matter: ``challenger`` (the latest registered one) and ``champion``
(the one to serve, ``models:/<name>@champion``). The gate (:func:`compare`) is a pure function of the two
versions' eval metrics: the challenger must beat the champion's primary metric by ``min_gain`` and may not
regress any secondary metric by more than its tolerance; with no champion yet, the challenger is the first one.

MLflow keeps no alias history, so every decision is written down as tags before anything moves: on the
challenger version (``promotion.*``) and, for a change of champion, on the registered model
(``champion.history``, a JSON list, and ``champion.previous``). The ``champion`` alias is moved LAST: a failure
at any earlier step (a dead server, a report that cannot be written) leaves the champion as it was. A history
entry whose alias move then failed is harmless: rollback starts from the entry of the *current* champion.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lafs.config import RegisterParams
from lafs.conventions import ALIGNED_SIZE
from lafs.errors import StageError
from lafs.tracking import flatten, metric_leaves

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from torch import nn

    from lafs.serving.faces import ServingConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion.history"
PREVIOUS_TAG = "champion.previous"
METRIC_TAG_PREFIX = "metric."
# Registered-model tag values are VARCHAR(5000) in MLflow's SQL schema: the oldest history entries are dropped
# to stay below this (rollback only ever walks back a few champions).
HISTORY_MAX_CHARS = 4500
# What MLflow accepts in metric and tag keys; eval metrics with other characters are not logged.
_KEY_OK = re.compile(r"^[\w\-. /]+$")
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


class RegistryError(StageError):
    """The registry cannot do what was asked (unknown version, nothing to roll back to); the message says why."""


# --------------------------------------------------------------------------------------------------- metrics


def flatten_metrics(nested: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Eval metrics as the gate compares them: :func:`lafs.tracking.metric_leaves`."""
    return metric_leaves(nested, prefix)


def loggable(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics MLflow can store as metrics and tags (key characters; finite values)."""
    return {k: v for k, v in metrics.items() if _KEY_OK.match(k) and math.isfinite(v)}


def redact_uri(value: Any) -> Any:
    """``scheme://user:password@host`` -> ``scheme://***@host`` in strings; other values unchanged."""
    return _URI_USERINFO.sub("***@", value) if isinstance(value, str) else value


def safe_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattened params for MLflow without credentials: secret-looking keys dropped, URI passwords masked."""
    return {f"{prefix}{k}": redact_uri(v) for k, v in flatten(data).items()}


# ------------------------------------------------------------------------------------------------------ gate


@dataclass(frozen=True)
class MetricCheck:
    """One row of the gate: a metric of challenger vs champion and whether it passed its rule."""

    key: str
    rule: str  # human-readable, e.g. "primary: higher is better, gain >= 0.002"
    challenger: float | None
    champion: float | None
    passed: bool
    note: str = ""

    @property
    def change(self) -> float | None:
        if self.challenger is None or self.champion is None:
            return None
        return self.challenger - self.champion


@dataclass(frozen=True)
class Decision:
    """What the gate decided for one version, and why; ``champion`` is the version it was compared to."""

    model_name: str
    version: str
    champion: str | None
    action: str  # "first" | "promote" | "reject" | "noop" (already champion) | "rollback"
    reasons: tuple[str, ...]
    checks: tuple[MetricCheck, ...] = ()
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def promoted(self) -> bool:
        """The champion alias moves to ``version`` (first model, passed gate, or rollback target)."""
        return self.action in ("first", "promote", "rollback")

    @property
    def champion_after(self) -> str | None:
        return self.version if self.promoted or self.action == "noop" else self.champion

    @property
    def label(self) -> str:
        return {
            "first": "promoted (first model)",
            "promote": "promoted",
            "reject": "rejected",
            "noop": "already champion",
            "rollback": "rolled back",
        }[self.action]

    def describe(self) -> str:
        against = f"champion v{self.champion}" if self.champion else "no champion"
        return (
            f"{self.model_name} v{self.version} vs {against}: {self.label}; "
            f"champion is v{self.champion_after}. {'; '.join(self.reasons)}"
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _value(metrics: Mapping[str, float] | None, key: str) -> float | None:
    if metrics is None:
        return None
    value = metrics.get(key)
    return None if value is None or math.isnan(value) else value


def compare(
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, cfg: RegisterParams
) -> tuple[bool, tuple[MetricCheck, ...], tuple[str, ...]]:
    """The promotion gate: ``(passes, checks, reasons)`` for flat (dotted-key) metrics of both versions.

    Primary: ``gain = challenger - champion`` (negated when lower is better) must be > 0 and >= ``min_gain``, so
    a tie never replaces the champion. Secondary: the regression (the gain's opposite) may be at most the
    metric's tolerance; a metric the champion lacks is not held against the challenger, one the challenger
    lacks fails (it cannot show it did not regress). ``champion=None`` (no champion yet) always passes.
    """
    sign = 1.0 if cfg.primary_higher_is_better else -1.0
    direction = "higher" if cfg.primary_higher_is_better else "lower"
    rule = f"primary: {direction} is better, gain > 0 and >= {cfg.min_gain:g}"
    key = cfg.primary_metric
    new, old = _value(challenger, key), _value(champion, key)
    checks: list[MetricCheck] = []
    reasons: list[str] = []
    if new is None:
        checks.append(MetricCheck(key, rule, None, old, False, "challenger has no value"))
        reasons.append(f"challenger has no value for the primary metric {key}")
    elif champion is None:
        checks.append(MetricCheck(key, rule, new, None, True, "no champion yet"))
        reasons.append(f"no champion yet: the first registered model becomes champion ({key} {_fmt(new)})")
    elif old is None:
        checks.append(MetricCheck(key, rule, new, None, False, "champion has no value"))
        reasons.append(
            f"the champion has no value for the primary metric {key}: they cannot be compared "
            "(promote by hand after checking, or change register.primary_metric)"
        )
    else:
        gain = sign * (new - old)
        ok = gain > 0 and gain >= cfg.min_gain
        checks.append(MetricCheck(key, rule, new, old, ok, f"gain {gain:+.6g}"))
        verdict = "improves on" if ok else "does not improve enough on"
        reasons.append(
            f"{key} {_fmt(new)} {verdict} the champion's {_fmt(old)} "
            f"(gain {gain:+.6g}; needs > 0 and >= {cfg.min_gain:g})"
        )
    for skey, spec in cfg.secondary_metrics.items():
        ssign = 1.0 if spec.higher_is_better else -1.0
        srule = (
            f"secondary: {'higher' if spec.higher_is_better else 'lower'} is better, regression <= {spec.tolerance:g}"
        )
        snew, sold = _value(challenger, skey), _value(champion, skey)
        if champion is None:
            checks.append(MetricCheck(skey, srule, snew, None, True, "no champion yet"))
        elif snew is None:
            checks.append(MetricCheck(skey, srule, None, sold, False, "challenger has no value"))
            reasons.append(f"challenger has no value for the secondary metric {skey}")
        elif sold is None:
            checks.append(MetricCheck(skey, srule, snew, None, True, "champion has no value: not compared"))
        else:
            regression = -ssign * (snew - sold)
            ok = regression <= spec.tolerance + 1e-12  # float noise must not block an equal metric
            checks.append(MetricCheck(skey, srule, snew, sold, ok, f"regression {regression:+.6g}"))
            if not ok:
                reasons.append(
                    f"{skey} regresses by {regression:.6g} ({_fmt(sold)} -> {_fmt(snew)}), more than "
                    f"its tolerance {spec.tolerance:g}"
                )
    return all(c.passed for c in checks), tuple(checks), tuple(reasons)


# Version tags that must be equal for two versions' metrics to be comparable (what they were measured on).
TEST_SET_TAGS = ("protocol.name", "test_set.pairs_sha256", "test_set.faces_sha256")
PROVENANCE_LOCKED = "dvc.lock"


def eligibility(
    challenger_tags: Mapping[str, str],
    challenger: Mapping[str, float],
    champion_tags: Mapping[str, str] | None,
    cfg: RegisterParams,
) -> tuple[tuple[MetricCheck, ...], tuple[str, ...]]:
    """What must hold before metrics are compared at all: ``(checks, refusals)``; any refusal rejects.

    - the absolute floor (``min_margin_over_floor``): the primary metric above the best non-learned floor of the
      same evaluation, first model included;
    - provenance: no uncommitted tracked changes (``allow_dirty``), model and eval files that ``dvc.lock``
      records (``allow_unlocked``);
    - like with like (``require_same_test_set``): the champion scored on the same protocol, pairs and photos.
    """
    checks: list[MetricCheck] = []
    refusals: list[str] = []
    if cfg.min_margin_over_floor is not None:
        margin = _value(challenger, "margin_over_floor")
        ok = margin is not None and margin > cfg.min_margin_over_floor
        note = "no floor was scored" if margin is None else f"margin {margin:+.6g}"
        checks.append(
            MetricCheck(
                "margin_over_floor",
                f"absolute: > {cfg.min_margin_over_floor:g} over the best non-learned floor",
                margin,
                None,
                ok,
                note,
            )
        )
        if not ok:
            refusals.append(
                f"below the absolute floor: {cfg.primary_metric} must beat the best non-learned floor of "
                f"the same evaluation by > {cfg.min_margin_over_floor:g} ({note}); never promoted"
            )
    if challenger_tags.get("git.dirty") == "true" and not cfg.allow_dirty:
        refusals.append(
            "registered from a git tree with uncommitted changes to tracked files: commit them and "
            "rerun, or set register.allow_dirty: true"
        )
    provenance = challenger_tags.get("provenance")
    if provenance != PROVENANCE_LOCKED and not cfg.allow_unlocked:
        refusals.append(
            f"not a dvc.lock run (provenance: {provenance or 'unknown'}): the model / eval files are not "
            "the ones dvc.lock records; run `dvc repro` (or `make pipeline`), or set "
            "register.allow_unlocked: true"
        )
    if champion_tags is not None and cfg.require_same_test_set:
        for key in TEST_SET_TAGS:
            new, old = challenger_tags.get(key), champion_tags.get(key)
            if new is None or new != old:
                refusals.append(
                    f"{key} differs (challenger {new or 'missing'}, champion {old or 'missing'}): they "
                    "were scored on different test pairs, photos or protocol, so their metrics cannot "
                    "be compared; re-evaluate one on the other's test set, or promote by hand"
                )
    return tuple(checks), tuple(refusals)


# ----------------------------------------------------------------------------------------------- MLflow I/O


def client_for(cfg: RegisterParams) -> MlflowClient:
    """A client on the tracking (and registry) URI: $MLFLOW_TRACKING_URI, else the param, else local sqlite."""
    from mlflow import MlflowClient

    from lafs.tracking import tracking_uri

    uri = tracking_uri(cfg.tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"registered model {name!r} has no version {version}: list them with "
                f"MlflowClient().search_model_versions(\"name='{name}'\")"
            ) from None
        raise


def version_metrics(client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """Eval metrics of a version: its ``metric.*`` tags, overridden by its registration run's metrics."""
    metrics = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key.removeprefix(METRIC_TAG_PREFIX)] = float(value)
            except ValueError:
                continue
    if mv.run_id:
        metrics.update(client.get_run(mv.run_id).data.metrics)
    return metrics


def find_version(client: MlflowClient, name: str, tags: Mapping[str, str]) -> ModelVersion | None:
    """The newest version of ``name`` carrying all ``tags`` (the same model and eval files registered before)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    matches = [mv for mv in versions if all((mv.tags or {}).get(k) == v for k, v in tags.items())]
    return max(matches, key=lambda mv: int(mv.version), default=None)


@dataclass(frozen=True)
class Registration:
    """What :func:`register_version` needs besides the model: files to attach and what to record."""

    model_file: Path
    eval_file: Path
    onnx_file: Path | None
    metrics: dict[str, float]  # flat eval metrics
    params: dict[str, Any]  # already credential-free (safe_params)
    tags: dict[str, str]  # model-version tags: lineage (git, dvc.lock), file hashes
    served: ServedModel | None = None  # the pyfunc that is registered; None: the PyTorch flavour is


@dataclass(frozen=True)
class ServedModel:
    """What the served pyfunc bundles besides the ONNX recogniser (:mod:`lafs.serving.pyfunc`)."""

    detector: Path
    config: ServingConfig
    example_photos: tuple[Path, ...]  # real photos for the input example (validated by loading the model back)


def register_version(cfg: RegisterParams, model: nn.Module, reg: Registration, example_batch: int = 2) -> ModelVersion:
    """Log the model in a new run and register it as a new version of ``cfg.model_name``; tag the version.

    One run holds three logged models: ``model``, the self-contained pyfunc that serves photos (detector +
    ONNX recogniser + threshold, :mod:`lafs.serving.pyfunc`), which is what the version points at when
    ``reg.served`` is given; ``pytorch`` (PyTorch flavour, pt2 export; registered instead without
    ``reg.served``); and ``recogniser_onnx`` (``mlflow.onnx`` flavour). The ONNX, source model and eval files are run
    artifacts too.

    The PyTorch signature is (-1, 3, 112, 112) float32 in [-1, 1] -> (-1, D); the input example has
    ``example_batch`` > 1 rows so torch.export keeps the batch dimension dynamic. ``pip_requirements`` are given
    explicitly: MLflow's requirement inference would cost 10-20 s per model here. ``validate_serving_input`` is
    read by ``mlflow.models.Model.log`` (the pt2 save path ignores other keyword arguments).
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from lafs.tracking import ensure_experiment, tracking_uri

    uri = tracking_uri(cfg.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    example = (
        torch.rand(example_batch, 3, ALIGNED_SIZE, ALIGNED_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    with torch.no_grad():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy().astype(np.float32))
    # A pt2 program needs only torch to load (not this package, not timm): the flavour's defaults plus mlflow.
    requirements = [*mlflow.pytorch.get_default_pip_requirements(), f"mlflow=={mlflow.__version__}"]
    experiment_id = ensure_experiment(cfg.experiment, uri)
    served = reg.served is not None and reg.onnx_file is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{cfg.model_name}") as run:
        mlflow.log_params(reg.params)
        mlflow.log_metrics(loggable(reg.metrics))
        mlflow.set_tags({k: v for k, v in reg.tags.items() if len(v) <= 5000})
        info = mlflow.pytorch.log_model(
            model,
            name="pytorch",
            registered_model_name=None if served else cfg.model_name,
            signature=signature,
            input_example=example.numpy(),
            pip_requirements=requirements,
            serialization_format="pt2",
            validate_serving_input=cfg.validate_serving_input,
        )
        if reg.onnx_file is not None:
            _log_onnx(reg.onnx_file, signature)
            mlflow.log_artifact(str(reg.onnx_file), "onnx")
        if served:
            from lafs.serving.pyfunc import log_model

            info = log_model(
                "model",
                reg.served.detector,
                reg.onnx_file,
                reg.served.config,
                reg.served.example_photos,
                registered_model_name=cfg.model_name,
            )
        mlflow.log_artifact(str(reg.model_file), "source")
        mlflow.log_artifact(str(reg.eval_file), "eval")
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        tags = {
            **reg.tags,
            **{f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in loggable(reg.metrics).items()},
            "registration.run_id": run.info.run_id,
            "served.flavor": "pyfunc" if served else "pytorch",
        }
        if served:
            cfg_served = reg.served.config
            tags |= {
                "serving.threshold": repr(cfg_served.threshold),
                "serving.flip": str(cfg_served.flip),
                "serving.detector": reg.served.detector.name,
            }
        for key, value in tags.items():
            client.set_model_version_tag(cfg.model_name, version, key, value)
    return client.get_model_version(cfg.model_name, version)


def _log_onnx(path: Path, signature: Any) -> None:
    """The recogniser in the ``mlflow.onnx`` flavour (input ``images``, output ``embedding``)."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    inputs = Schema([TensorSpec(signature.inputs.numpy_types()[0], (-1, 3, ALIGNED_SIZE, ALIGNED_SIZE), "images")])
    outputs = Schema([TensorSpec(signature.outputs.numpy_types()[0], signature.outputs.inputs[0].shape, "embedding")])
    mlflow.onnx.log_model(
        onnx.load(str(path)),
        name="recogniser_onnx",
        signature=ModelSignature(inputs, outputs),
        pip_requirements=["onnxruntime", "onnx", "mlflow"],
    )


# ------------------------------------------------------------------------------------------ history, promote


def read_history(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Past champion changes, oldest first: ``{"version", "previous", "replaced", "action", "at"}``.

    ``previous`` is where a rollback from that version goes: the champion it replaced for a promotion, and
    the restored version's own ``previous`` for a rollback, so repeated rollbacks walk further back.
    """
    raw = (client.get_registered_model(name).tags or {}).get(HISTORY_TAG)
    if not raw:
        return []
    try:
        history = json.loads(raw)
    except json.JSONDecodeError:
        raise RegistryError(
            f"registered model {name!r}: tag {HISTORY_TAG} is not JSON; fix or delete it (rollback needs it)"
        ) from None
    return history if isinstance(history, list) else []


def _history_json(history: list[dict[str, Any]]) -> str:
    text = json.dumps(history, separators=(",", ":"))
    while len(text) > HISTORY_MAX_CHARS and len(history) > 1:
        history = history[1:]
        text = json.dumps(history, separators=(",", ":"))
    return text


def _latest_entry(history: list[dict[str, Any]], version: str) -> dict[str, Any] | None:
    return next((e for e in reversed(history) if str(e.get("version")) == version), None)


def _record_champion_change(client: MlflowClient, decision: Decision, previous: str | None) -> None:
    history = read_history(client, decision.model_name)
    history.append(
        {
            "version": decision.version,
            "previous": previous,
            "replaced": decision.champion,
            "action": decision.action,
            "at": decision.at,
        }
    )
    client.set_registered_model_tag(decision.model_name, HISTORY_TAG, _history_json(history))
    client.set_registered_model_tag(decision.model_name, PREVIOUS_TAG, decision.champion or "none")


BeforeMove = Callable[[Decision], None]


def promote(
    client: MlflowClient,
    cfg: RegisterParams,
    version: str,
    name: str | None = None,
    before_move: BeforeMove | None = None,
) -> Decision:
    """Run the gate for ``version`` against the current champion, record the decision, and move ``champion``
    if it passes.

    Order: decision tags on the version -> history tags on the registered model (only for a change of champion)
    -> ``before_move(decision)`` (the stage writes its report there) -> the alias. Anything raising before the
    last step leaves the champion untouched.
    """
    name = name or cfg.model_name
    version = str(version)
    challenger = get_version(client, name, version)
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and champion.version == version:
        decision = Decision(name, version, version, "noop", (f"v{version} is already the champion",))
    else:
        champion_metrics = version_metrics(client, champion) if champion is not None else None
        challenger_metrics = version_metrics(client, challenger)
        passed, checks, reasons = compare(challenger_metrics, champion_metrics, cfg)
        floor_checks, refusals = eligibility(
            challenger.tags or {}, challenger_metrics, None if champion is None else champion.tags or {}, cfg
        )
        if refusals:
            passed, reasons = False, (*refusals, *reasons)
        checks = (*checks, *floor_checks)
        action = ("first" if champion is None else "promote") if passed else "reject"
        decision = Decision(name, version, champion.version if champion else None, action, reasons, checks)
        for key, value in {
            "promotion.decision": decision.label,
            "promotion.refused": str(bool(refusals)).lower(),
            "promotion.reason": "; ".join(decision.reasons)[:5000],
            "promotion.compared_to": decision.champion or "none",
            "promotion.primary_metric": cfg.primary_metric,
            "promotion.time": decision.at,
        }.items():
            client.set_model_version_tag(name, version, key, value)
        if decision.promoted:
            _record_champion_change(client, decision, previous=decision.champion)
    if before_move is not None:
        before_move(decision)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return decision


def rollback(client: MlflowClient, name: str, before_move: BeforeMove | None = None) -> Decision:
    """Make the champion before the current one champion again (from ``champion.history``) and record it."""
    current = alias_version(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"registered model {name!r} has no champion: nothing to roll back")
    history = read_history(client, name)
    entry = _latest_entry(history, current.version)
    target = entry.get("previous") if entry else None
    if target is None:
        raise RegistryError(
            f"champion v{current.version} of {name!r} has no recorded predecessor in the "
            f"{HISTORY_TAG} tag: nothing to roll back to (promote a version with `lafs promote "
            "--version V` instead)"
        )
    target = str(target)
    get_version(client, name, target)  # still exists
    restored = _latest_entry(history, target)
    decision = Decision(
        name,
        target,
        current.version,
        "rollback",
        (f"rolled back from v{current.version} to the previous champion v{target}",),
    )
    client.set_model_version_tag(name, current.version, "champion.rolled_back_at", decision.at)
    client.set_model_version_tag(name, target, "champion.restored_at", decision.at)
    _record_champion_change(client, decision, previous=restored.get("previous") if restored else None)
    if before_move is not None:
        before_move(decision)
    client.set_registered_model_alias(name, CHAMPION, target)
    return decision


@contextmanager
def mlflow_errors(cfg: RegisterParams) -> Iterator[None]:
    """Turn MLflow failures (server down, bad URI) into a :class:`RegistryError` naming the (password-free) URI."""
    from mlflow.exceptions import MlflowException

    from lafs.tracking import tracking_uri

    try:
        yield
    except MlflowException as exc:
        where = redact_uri(tracking_uri(cfg.tracking_uri))
        raise RegistryError(
            f"MLflow at {where} failed: {redact_uri(str(exc))}. The champion alias is moved only "
            "as the last step; check the server and rerun (`lafs promote` reruns the gate)"
        ) from exc


def promote_on_demand(
    cfg: RegisterParams,
    name: str | None = None,
    version: str | None = None,
    alias: str = CHALLENGER,
    roll_back: bool = False,
    before_move: BeforeMove | None = None,
    client: MlflowClient | None = None,
) -> Decision:
    """``lafs promote``: the gate for ``version`` (or the version ``alias`` names), or a rollback."""
    name = name or cfg.model_name
    with mlflow_errors(cfg):
        client = client or client_for(cfg)
        if roll_back:
            return rollback(client, name, before_move=before_move)
        if version is None:
            mv = alias_version(client, name, alias)
            if mv is None:
                raise RegistryError(f"registered model {name!r} has no alias {alias!r}: give --version")
            version = mv.version
        return promote(client, cfg, version, name=name, before_move=before_move)


# ----------------------------------------------------------------------------------------------- the report


def report_markdown(decision: Decision) -> str:
    """``reports/promotion.md``: the decision, its reasons and a challenger-vs-champion metrics table."""
    champ = f"v{decision.champion}" if decision.champion else "none"
    lines = [
        f"# Promotion gate: {decision.model_name} v{decision.version}",
        "",
        f"- decision: **{decision.label}**",
        f"- compared to: champion {champ}",
        f"- champion after this decision: v{decision.champion_after}",
        f"- time (UTC): {decision.at}",
        "",
        "## Reasons",
        "",
        *[f"- {r}" for r in decision.reasons],
    ]
    if decision.checks:
        lines += [
            "",
            "## Metrics",
            "",
            f"| metric | rule | challenger v{decision.version} | champion {champ} | change | passed | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in decision.checks:
            change = "n/a" if c.change is None else f"{c.change:+.6g}"
            lines.append(
                f"| {c.key} | {c.rule} | {_fmt(c.challenger)} | {_fmt(c.champion)} | {change} | "
                f"{'yes' if c.passed else '**no**'} | {c.note} |"
            )
    return "\n".join(lines) + "\n"


def promotion_metrics(decision: Decision) -> dict[str, Any]:
    """``metrics/promotion.json``: what ``dvc metrics show`` lists for the register stage."""
    primary = decision.checks[0] if decision.checks else None
    return {
        "promoted": decision.promoted,
        "decision": decision.label,
        "challenger_version": int(decision.version),
        "champion_version": int(decision.champion_after) if decision.champion_after else None,
        "compared_to": int(decision.champion) if decision.champion else None,
        "primary_metric": {
            "challenger": primary.challenger if primary else None,
            "champion": primary.champion if primary else None,
        },
    }
