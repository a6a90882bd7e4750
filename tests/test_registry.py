"""Registry: the promotion gate (pure), and register / promote / rollback against a real MLflow server.

The server tests share the session ``mlflow_server`` (sqlite backend, artifacts proxied to moto S3) and give
every test its own registered-model name. Models are real ``lafs_vit_tiny`` part fViTs with their landmark net,
and DINO-face grid ViTs saved with ``lafs.models.io``; the ONNX file is ``lafs.export.export_onnx`` of the first one,
shared by all test models since the registry only attaches it and records its hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_RECOGNISER, shared_dir, tiny_recogniser

from lafs import cli, registry
from lafs.config import ConfigError, GateMetric, RegisterParams, load_params
from lafs.layout import Layout
from lafs.stages import register as register_stage

# ------------------------------------------------------------------------------------------- gate, no server


def gate_cfg(**kw: Any) -> RegisterParams:
    return RegisterParams(**kw)


def flat(acc: float | None = None, eer: float | None = None) -> dict[str, float]:
    out = {}
    if acc is not None:
        out["verification.accuracy_mean"] = acc
    if eer is not None:
        out["verification.eer"] = eer
    return out


def test_gate_first_model_becomes_champion() -> None:
    passed, checks, reasons = registry.compare(flat(0.5, 0.4), None, gate_cfg())
    assert passed and all(c.passed for c in checks)
    assert "no champion yet" in reasons[0]


@pytest.mark.parametrize(
    ("new", "old", "min_gain", "expected"),
    [
        (0.90, 0.80, 0.0, True),
        (0.80, 0.80, 0.0, False),  # a tie never replaces the champion
        (0.70, 0.80, 0.0, False),
        (0.801, 0.80, 0.002, False),  # a gain below min_gain
        (0.803, 0.80, 0.002, True),
    ],
)
def test_gate_primary_needs_a_gain_of_min_gain(new: float, old: float, min_gain: float, expected: bool) -> None:
    passed, checks, reasons = registry.compare(flat(new, 0.1), flat(old, 0.1), gate_cfg(min_gain=min_gain))
    assert passed is expected
    assert checks[0].key == "verification.accuracy_mean" and checks[0].passed is expected
    assert checks[0].change == pytest.approx(new - old)
    assert "verification.accuracy_mean" in reasons[0]


def test_gate_primary_lower_is_better() -> None:
    cfg = gate_cfg(primary_metric="verification.eer", primary_higher_is_better=False, secondary_metrics={})
    assert registry.compare(flat(eer=0.10), flat(eer=0.20), cfg)[0]
    assert not registry.compare(flat(eer=0.30), flat(eer=0.20), cfg)[0]


@pytest.mark.parametrize(("eer_new", "expected"), [(0.205, True), (0.2099, True), (0.2101, False), (0.10, True)])
def test_gate_secondary_regression_beyond_tolerance_blocks_a_primary_gain(eer_new: float, expected: bool) -> None:
    cfg = gate_cfg(secondary_metrics={"verification.eer": GateMetric(tolerance=0.01, higher_is_better=False)})
    passed, checks, reasons = registry.compare(flat(0.95, eer_new), flat(0.80, 0.20), cfg)
    assert checks[0].passed  # the primary metric improved either way
    assert passed is expected
    if not expected:
        assert any("verification.eer regresses" in r for r in reasons)


def test_gate_missing_metrics() -> None:
    cfg = gate_cfg()
    passed, _, reasons = registry.compare(flat(eer=0.1), flat(0.8, 0.1), cfg)
    assert not passed and "no value for the primary metric" in reasons[0]
    passed, _, reasons = registry.compare(flat(0.9), flat(0.8, 0.1), cfg)  # challenger lacks the secondary
    assert not passed and any("secondary metric verification.eer" in r for r in reasons)
    passed, checks, _ = registry.compare(flat(0.9, 0.1), flat(0.8), cfg)  # champion lacks it: not held against
    assert passed and "not compared" in checks[1].note
    passed, _, reasons = registry.compare(flat(0.9, 0.1), flat(eer=0.1), cfg)  # champion lacks the primary
    assert not passed and "cannot be compared" in reasons[0]
    assert not registry.compare(flat(float("nan"), 0.1), flat(0.8, 0.1), cfg)[0]


def test_flatten_metrics_keeps_numeric_leaves_under_dotted_keys() -> None:
    nested = {
        "verification": {"accuracy_mean": 0.9, "tar_at_far": {"1e-03": 0.5}, "pairs": 600},
        "note": "text",
        "flag": True,
        "curve": [1, 2],
        "latency": {"ms": 2},
    }
    assert registry.flatten_metrics(nested) == {
        "verification.accuracy_mean": 0.9,
        "verification.tar_at_far.1e-03": 0.5,
        "verification.pairs": 600.0,
        "latency.ms": 2.0,
    }
    assert registry.loggable({"ok.key": 1.0, "bad@key": 1.0, "inf": float("inf")}) == {"ok.key": 1.0}
    # the one flattener every report goes through (tracking.metric_leaves): no booleans, no NaN as metrics
    assert registry.flatten_metrics({"a": {"nan": float("nan"), "ok": True, "n": 3}}) == {"a.n": 3.0}


def test_safe_params_drop_secrets_and_mask_uri_passwords() -> None:
    params = registry.safe_params(
        {
            "tracking_uri": "http://alice:hunter2@mlflow:5000",
            "aws_secret": "x",
            "nested": {"api_token": "y", "lr": 0.1},
        },
        "register.",
    )
    assert params == {"register.tracking_uri": "http://***@mlflow:5000", "register.nested.lr": 0.1}


def test_mlflow_errors_name_the_uri_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RegisterParams(tracking_uri="http://alice:hunter2@mlflow:5000")
    with pytest.raises(registry.RegistryError) as err, registry.mlflow_errors(cfg):
        raise MlflowException("API request to http://alice:hunter2@mlflow:5000/api/2.0/x failed")
    assert "hunter2" not in str(err.value) and "MLflow at http://***@mlflow:5000" in str(err.value)


def test_register_params_validation() -> None:
    with pytest.raises(ValueError, match="repeats the primary metric"):
        RegisterParams(secondary_metrics={"verification.accuracy_mean": GateMetric()})
    with pytest.raises(ValueError):
        RegisterParams(model_name="bad/name")
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    assert isinstance(load_params(params).register, RegisterParams)  # the shipped section
    bad = {"register.secondary_metrics": {"verification.eer": {"tolerance": -1}}}
    with pytest.raises(ConfigError, match=r"register\.secondary_metrics\.verification\.eer\.tolerance"):
        load_params(params, sets=bad)


def test_dvc_lineage_reads_stage_hashes(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump(dvc_lock_for("f" * 32, "e" * 32)))
    tags = register_stage.dvc_lineage(lock, ("finetune", "evaluate", "export"))
    assert tags["dvc.finetune.deps.data/splits"] == "a" * 32 + ".dir"
    assert tags["dvc.finetune.outs.models/finetune/model.pt"] == "f" * 32
    assert tags["dvc.evaluate.outs.metrics/eval.json"] == "e" * 32
    expected = hashlib.md5(json.dumps({"finetune": {"epochs": 4, "lr": 0.001}}, sort_keys=True).encode()).hexdigest()
    assert tags["dvc.finetune.params.params.yaml"] == expected
    assert tags["dvc.export"] == "absent"
    assert register_stage.dvc_lineage(tmp_path / "missing.lock", ("finetune",)) == {"dvc.lock": "absent"}


def test_history_tag_keeps_the_newest_entries_within_mlflows_tag_limit() -> None:
    history = [
        {
            "version": str(i),
            "previous": str(i - 1),
            "replaced": str(i - 1),
            "action": "promote",
            "at": "2026-12-01T00:00:00+00:00",
        }
        for i in range(1, 500)
    ]
    kept = json.loads(registry._history_json(history))
    assert len(json.dumps(kept, separators=(",", ":"))) <= registry.HISTORY_MAX_CHARS
    assert kept[-1]["version"] == "499" and 10 < len(kept) < 499


# ------------------------------------------------------------------------------------------------ fixtures


def dvc_lock_for(model_md5: str, eval_md5: str) -> dict[str, Any]:
    """A dvc.lock (schema 2.0) as DVC writes it for the stages that produce a registered model."""
    return {
        "schema": "2.0",
        "stages": {
            "finetune": {
                "cmd": "lafs finetune",
                "deps": [
                    {"path": "data/splits", "hash": "md5", "md5": "a" * 32 + ".dir", "size": 1, "nfiles": 7},
                    {"path": "models/pretrain/teacher_backbone.pt", "hash": "md5", "md5": "b" * 32},
                ],
                "params": {"params.yaml": {"finetune": {"epochs": 4, "lr": 0.001}}},
                "outs": [{"path": "models/finetune/model.pt", "hash": "md5", "md5": model_md5}],
            },
            "evaluate": {
                "cmd": "lafs evaluate",
                "deps": [{"path": "models/finetune/model.pt", "hash": "md5", "md5": model_md5}],
                "params": {"params.yaml": {"evaluate": {"flip": True}}},
                "outs": [{"path": "metrics/eval.json", "hash": "md5", "md5": eval_md5}],
            },
        },
    }


def eval_metrics(acc: float, eer: float) -> dict[str, Any]:
    """metrics/eval.json in the evaluate stage's nested layout."""
    return {
        "verification": {
            "accuracy_mean": acc,
            "accuracy_std": 0.02,
            "threshold": 0.31,
            "tar_at_far": {"1e-02": acc - 0.1, "1e-03": acc - 0.2, "1e-04": acc - 0.3},
            "eer": eer,
            "auc": acc + 0.05,
            "pairs": 600,
        },
        "fewshot": {"k1": {"top1": acc - 0.3}, "k5": {"top1": acc - 0.1}},
        "latency": {"ms_per_image": 3.5},
        "floors": {"hog": {"accuracy_mean": 0.6}},
        "margin_over_floor": acc - 0.6,
        "protocol": {"name": "lfw_view1"},
        "test_set": dict(TEST_SET),
    }


TEST_SET = {"pairs": 600, "faces": 1100, "pairs_sha256": "p" * 64, "faces_sha256": "f" * 64}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny finetuned part-fViT model files (different weights), a tiny DINO-face (grid ViT) recogniser, the
    baseline that loses (half the torch.export time at registration: no landmark net), and the export stage's
    ONNX of the first."""
    from lafs.export import export_onnx
    from lafs.models import create_model
    from lafs.models.io import save_model

    out = tmp_path_factory.mktemp("models")
    files: dict[str, Path] = {}
    for seed in (0, 1):
        model = tiny_recogniser(seed)
        files[f"m{seed}"] = save_model(
            model,
            "lafs_vit_tiny",
            TINY_RECOGNISER,
            out / f"m{seed}.pt",
            config={"epochs": 4, "lr": 0.001, "seed": seed},
            embed_dim=192,
        )
        if seed == 0:
            files["onnx"] = export_onnx(model, out / "model.onnx")
    torch.manual_seed(2)
    files["dino"] = save_model(
        create_model("dino_vit_tiny").eval(), "dino_vit_tiny", {}, out / "dino.pt", config={"epochs": 4}, embed_dim=192
    )
    return files


def make_project(
    root: Path,
    model: Path,
    onnx: Path,
    metrics: dict[str, Any],
    model_name: str,
    experiment: str,
    git: bool = False,
    **register: Any,
) -> Path:
    """A project root holding what the register stage reads, its params.yaml section and a dvc.lock."""
    (root / "models" / "finetune").mkdir(parents=True, exist_ok=True)
    (root / "metrics").mkdir(exist_ok=True)
    shutil.copy(model, root / "models" / "finetune" / "model.pt")
    shutil.copy(onnx, root / "models" / "model.onnx")
    (root / "metrics" / "eval.json").write_text(json.dumps(metrics))
    lock = dvc_lock_for(
        register_stage.md5(root / "models/finetune/model.pt"), register_stage.md5(root / "metrics/eval.json")
    )
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    section = {"model_name": model_name, "experiment": experiment, **register}
    landmarks = {"models_root": str(shared_dir("models"))}  # the detector the served pyfunc bundles
    (root / "params.yaml").write_text(yaml.safe_dump({"register": section, "landmarks": landmarks}))
    if git and not (root / ".git").exists():
        run = ["git", "-C", str(root), "-c", "user.name=lafs-test", "-c", "user.email=test@lafs.invalid"]
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        subprocess.run([*run, "commit", "-q", "--allow-empty", "-m", "test"], check=True)
    return root


@pytest.fixture(scope="module")
def tracking(mlflow_server) -> Iterator[str]:
    """MLFLOW_TRACKING_URI -> the session server for this module's tests (and its module fixtures)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        yield mlflow_server.uri


def client():
    import os

    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_TRACKING_URI"])


def champion(name: str) -> str | None:
    mv = registry.alias_version(client(), name, registry.CHAMPION)
    return None if mv is None else mv.version


def register(root: Path) -> int:
    return cli.main(["register", "--params", str(root / "params.yaml"), "--out", str(root)])


def promotion(root: Path) -> dict[str, Any]:
    return json.loads((root / "metrics" / "promotion.json").read_text())


def embeddings(model: torch.nn.Module, seed: int = 7) -> torch.Tensor:
    images = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        return model(images)


# --------------------------------------------------------------------------------------- against the server


@pytest.fixture(scope="module")
def first(tracking: str, model_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """v1 of a fresh registered model, registered through ``lafs register`` from a git checkout with a dvc.lock,
    an AWS secret in the environment and a password in the tracking_uri param (the test server, with basic-auth
    credentials it ignores: the param wins over MLFLOW_TRACKING_URI); what it saw then."""
    tag = uuid.uuid4().hex[:8]
    names = {"model_name": f"lafs-face-{tag}", "experiment": f"lafs-register-{tag}"}
    base = tmp_path_factory.mktemp("registry")
    secret, password = f"aws-{uuid.uuid4().hex}", f"pw-{uuid.uuid4().hex}"
    root = make_project(
        base / "v1",
        model_files["m0"],
        model_files["onnx"],
        eval_metrics(0.80, 0.20),
        git=True,
        tracking_uri=tracking.replace("http://", f"http://lafs:{password}@", 1),
        **names,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", secret)  # the client never needs it: the server proxies artifacts
        code = register(root)
    name = names["model_name"]
    return {
        **names,
        "base": base,
        "root": root,
        "code": code,
        "secrets": (secret, password),
        "uri": tracking,
        "champion": champion(name),
        "challenger": registry.alias_version(client(), name, "challenger").version,
        "promotion": promotion(root),
        "report": (root / "reports" / "promotion.md").read_text(),
    }


def test_first_registration_becomes_champion_with_lineage_and_no_secrets(first: dict[str, Any]) -> None:
    name, root = first["model_name"], first["root"]
    assert first["code"] == 0
    assert first["champion"] == "1" and first["challenger"] == "1"
    assert first["promotion"]["promoted"] is True and first["promotion"]["champion_version"] == 1
    assert "promoted (first model)" in first["report"]

    mv = client().get_model_version(name, "1")
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert mv.tags["git.commit"] == commit and mv.tags["git.dirty"] == "false"
    assert mv.tags["provenance"] == "dvc.lock" and mv.tags["protocol.name"] == "lfw_view1"
    assert mv.tags["test_set.pairs_sha256"] == TEST_SET["pairs_sha256"]
    assert mv.tags["model_file.md5"] == register_stage.md5(root / "models/finetune/model.pt")
    assert mv.tags["dvc.finetune.outs.models/finetune/model.pt"] == mv.tags["model_file.md5"]
    assert mv.tags["dvc.finetune.deps.data/splits"] == "a" * 32 + ".dir"
    assert mv.tags["dvc.evaluate.outs.metrics/eval.json"] == mv.tags["eval.md5"]
    assert len(mv.tags["dvc.evaluate.params.params.yaml"]) == 32
    assert mv.tags["dvc.export"] == "absent"
    assert float(mv.tags["metric.verification.accuracy_mean"]) == 0.8
    assert mv.tags["promotion.decision"] == "promoted (first model)"
    run = client().get_run(mv.run_id)
    assert run.data.metrics["verification.tar_at_far.1e-03"] == pytest.approx(0.6)
    assert run.data.params["register.tracking_uri"] == first["uri"].replace("http://", "http://***@", 1)
    assert run.data.params["finetune.lr"] == "0.001"
    artifacts = {a.path for folder in ("onnx", "source", "eval") for a in client().list_artifacts(mv.run_id, folder)}
    assert artifacts == {"onnx/model.onnx", "source/model.pt", "eval/eval.json"}

    text = json.dumps([run.data.params, run.data.tags, mv.tags, client().get_registered_model(name).tags])
    for secret in first["secrets"]:
        assert secret not in text

    # The same model and eval files again (DVC reran it for a code change only): no second copy.
    summary = register_stage.register(RegisterParams(model_name=name, experiment=first["experiment"]), Layout(root))
    assert summary.reused and summary.version == "1"
    assert [v.version for v in client().search_model_versions(f"name='{name}'")] == ["1"]


class FailingClient:
    """A real MlflowClient whose ``method`` raises (when called with ``arg``, if given), as a server dying right
    at that call would."""

    def __init__(self, real: Any, method: str, arg: str | None = None) -> None:
        self._real, self._method, self._arg = real, method, arg

    def __getattr__(self, attr: str) -> Any:
        real = getattr(self._real, attr)
        if attr != self._method:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._arg is None or self._arg in args:
                from mlflow.exceptions import MlflowException

                raise MlflowException(f"simulated: the server went away during {attr}{args}")
            return real(*args, **kwargs)

        return call


def assert_failed_promotions_leave_champion(name: str, version: str, root: Path, experiment: str) -> None:
    """Promoting ``version`` (which passes the gate) fails at each step in turn: the champion never moves."""
    cfg = RegisterParams(model_name=name, experiment=experiment)
    before = champion(name)
    real = client()

    def broken_report(decision: registry.Decision) -> None:
        raise OSError("disk full while writing reports/promotion.md")

    for failing in ("set_model_version_tag", "set_registered_model_tag", "before_move", "set_registered_model_alias"):
        history = real.get_registered_model(name).tags[registry.HISTORY_TAG]
        faulty = real if failing == "before_move" else FailingClient(real, failing)
        with pytest.raises((registry.RegistryError, OSError)), registry.mlflow_errors(cfg):
            registry.promote(faulty, cfg, version, before_move=broken_report if failing == "before_move" else None)
        assert champion(name) == before, failing
        if failing == "set_model_version_tag":  # failed at the first write: nothing recorded
            assert real.get_registered_model(name).tags[registry.HISTORY_TAG] == history
        else:  # the decision was recorded before the step that failed
            assert real.get_model_version(name, version).tags["promotion.decision"] == "promoted", failing
    # The whole stage (files already registered: it reuses the version) through a client failing at the move:
    # its report was written (before the move), the stage fails, so DVC does not record it.
    (root / "metrics" / "promotion.json").unlink()
    with pytest.raises(register_stage.StageError, match="went away during set_registered_model_alias"):
        register_stage.register(
            cfg, Layout(root), client=FailingClient(real, "set_registered_model_alias", registry.CHAMPION)
        )
    assert champion(name) == before
    assert registry.alias_version(real, name, registry.CHALLENGER).version == version
    assert (root / "metrics" / "promotion.json").exists()


def test_gate_promotes_better_rejects_worse_and_secondary_regression_then_rolls_back(
    first: dict[str, Any], model_files: dict[str, Path]
) -> None:
    import mlflow.onnx
    import mlflow.pytorch

    from lafs.models.io import load_model

    name, base = first["model_name"], first["base"]
    names = {"model_name": name, "experiment": first["experiment"]}
    assert first["champion"] == "1"
    registry.promote(client(), RegisterParams(model_name=name), "1")  # v1 champion again, whatever ran before

    def step(tag: str, model: str, acc: float, eer: float) -> dict[str, Any]:
        # MLflow's serving check (reload + predict) ran for v1; the embeddings check below is the stronger one.
        root = make_project(
            base / tag,
            model_files[model],
            model_files["onnx"],
            eval_metrics(acc, eer),
            validate_serving_input=False,
            **names,
        )
        assert register(root) == 0
        return promotion(root)

    better = step("v2", "m1", 0.85, 0.19)
    assert better["promoted"] is True and better["champion_version"] == 2 and better["compared_to"] == 1
    v2 = client().get_model_version(name, "2")
    assert v2.tags["served.flavor"] == "pyfunc" and float(v2.tags["serving.threshold"]) == 0.31
    served = mlflow.pytorch.load_model(f"runs:/{v2.run_id}/pytorch")  # the PyTorch flavour beside the pyfunc
    assert torch.allclose(embeddings(served), embeddings(load_model(model_files["m1"])), atol=1e-5)
    assert not torch.allclose(embeddings(served), embeddings(load_model(model_files["m0"])), atol=1e-3)
    from lafs.serving.load import from_pyfunc, pyfunc_dir

    pipeline = from_pyfunc(pyfunc_dir(f"models:/{name}@champion"))  # what `mlflow models serve` would run
    assert pipeline.cfg.threshold == 0.31 and pipeline.cfg.flip is True
    onnx = mlflow.onnx.load_model(f"runs:/{v2.run_id}/recogniser_onnx")
    assert [i.name for i in onnx.graph.input] == ["images"]
    # every command that takes a model (evaluate, cluster, compare, embed, verify) accepts the registry URI
    from lafs.eval.embedders import OnnxEmbedder, load_embedder

    faces = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    assert np.allclose(
        load_embedder(f"models:/{name}@champion").embed_aligned(faces),
        OnnxEmbedder(model_files["onnx"]).embed_aligned(faces),
        atol=1e-6,
    )

    worse = step("v3", "dino", 0.70, 0.25)
    assert worse["promoted"] is False and worse["champion_version"] == 2 and champion(name) == "2"
    v3 = client().get_model_version(name, "3")
    assert v3.tags["promotion.decision"] == "rejected" and v3.tags["promotion.compared_to"] == "2"
    assert "verification.accuracy_mean 0.7 does not improve enough" in v3.tags["promotion.reason"]
    report = (base / "v3" / "reports" / "promotion.md").read_text()
    assert "**rejected**" in report and "| verification.accuracy_mean |" in report and "| 0.7 | 0.85 |" in report

    eer_up = step("v4", "dino", 0.95, 0.25)  # primary +0.10 but EER +0.06 > tolerance 0.01
    assert eer_up["promoted"] is False and champion(name) == "2"
    assert "verification.eer regresses" in client().get_model_version(name, "4").tags["promotion.reason"]

    params = str(first["root"] / "params.yaml")
    assert cli.main(["promote", "--params", params, "--rollback", "--report", str(base / "rb.md")]) == 0
    assert champion(name) == "1"
    tags = client().get_registered_model(name).tags
    history = json.loads(tags[registry.HISTORY_TAG])
    assert [(e["version"], e["action"]) for e in history] == [("1", "first"), ("2", "promote"), ("1", "rollback")]
    assert tags[registry.PREVIOUS_TAG] == "2"
    assert "rolled back" in (base / "rb.md").read_text()
    assert cli.main(["promote", "--params", params, "--rollback"]) == 1  # v1 has no predecessor
    assert champion(name) == "1"

    # On demand: v3 (0.70) still loses to v1 (0.80); v2 would pass, but every failure on the way to moving the
    # alias leaves v1 champion; then it passes for real.
    assert cli.main(["promote", "--params", params, "--version", "3"]) == 0 and champion(name) == "1"
    assert cli.main(["promote", "--params", params, "--version", "2", "--set", "min_gain=0.5"]) == 0
    assert (
        champion(name) == "1"
        and "needs > 0 and >= 0.5" in client().get_model_version(name, "2").tags["promotion.reason"]
    )
    assert_failed_promotions_leave_champion(name, "2", base / "v2", first["experiment"])
    assert cli.main(["promote", "--params", params, "--version", "2"]) == 0 and champion(name) == "2"


ELIGIBLE = {
    "provenance": "dvc.lock",
    "git.dirty": "false",
    "protocol.name": "lfw_view1",
    **{f"test_set.{k}": str(v) for k, v in TEST_SET.items()},
}


def add_versions(mlflow: Any, name: str, accuracies: list[float], **tags: str) -> None:
    """Cheap versions (no model logged) carrying eval metrics as ``metric.*`` tags and the provenance / test-set
    tags, as register_version writes them; ``tags`` override those of every version added."""
    if not mlflow.search_registered_models(f"name='{name}'"):
        mlflow.create_registered_model(name)
    for acc in accuracies:
        mlflow.create_model_version(
            name,
            "s3://models/none",
            tags={
                "metric.verification.accuracy_mean": repr(acc),
                "metric.verification.eer": "0.2",
                "metric.margin_over_floor": repr(acc - 0.6),
                **ELIGIBLE,
                **tags,
            },
        )


def test_gate_refuses_what_it_cannot_compare_and_the_champion_never_moves(tracking: str) -> None:
    name = f"lafs-refuse-{uuid.uuid4().hex[:8]}"
    cfg, mlflow = RegisterParams(model_name=name), client()

    def refused(acc: float, match: str, **tags: str) -> None:
        before = champion(name)
        add_versions(mlflow, name, [acc], **tags)
        version = str(len(mlflow.search_model_versions(f"name='{name}'")))  # the one just added
        decision = registry.promote(mlflow, cfg, version)
        assert decision.action == "reject" and champion(name) == before
        mv = mlflow.get_model_version(name, version)
        assert mv.tags["promotion.refused"] == "true" and match in mv.tags["promotion.reason"]
        assert match in registry.report_markdown(decision)

    # below the floor: never promoted, not even as the first model (0.55 < the 0.60 floor)
    refused(0.55, "below the absolute floor")
    refused(0.95, "uncommitted changes", **{"git.dirty": "true"})
    refused(0.95, "not a dvc.lock run", provenance="outside dvc.lock")
    add_versions(mlflow, name, [0.70])
    assert registry.promote(mlflow, cfg, "4").action == "first" and champion(name) == "4"
    # better numbers on other pairs, other photos, another protocol: refused, however good
    refused(0.99, "test_set.pairs_sha256 differs", **{"test_set.pairs_sha256": "q" * 64})
    refused(0.99, "test_set.faces_sha256 differs", **{"test_set.faces_sha256": "g" * 64})
    refused(0.99, "protocol.name differs", **{"protocol.name": "lfw_view2"})
    # each refusal has its switch, and the gate then compares as before
    relaxed = cfg.model_copy(update={"require_same_test_set": False, "allow_dirty": True, "allow_unlocked": True})
    assert registry.promote(mlflow, relaxed, "6").action == "promote" and champion(name) == "6"


def test_rollback_walks_back_the_chain_of_champions(tracking: str) -> None:
    name = f"lafs-chain-{uuid.uuid4().hex[:8]}"
    cfg, mlflow = RegisterParams(model_name=name), client()
    add_versions(mlflow, name, [0.70, 0.80, 0.90])
    assert [registry.promote(mlflow, cfg, v).action for v in ("1", "2", "3")] == ["first", "promote", "promote"]
    assert registry.rollback(mlflow, name).version == "2"
    assert registry.rollback(mlflow, name).version == "1"  # further back, not back and forth
    with pytest.raises(registry.RegistryError, match="no recorded predecessor"):
        registry.rollback(mlflow, name)
    assert champion(name) == "1"
    assert registry.promote(mlflow, cfg, "3").promoted and registry.rollback(mlflow, name).version == "1"
    assert mlflow.get_registered_model(name).tags[registry.PREVIOUS_TAG] == "3"


@pytest.mark.slow
def test_the_server_dying_before_the_alias_move_leaves_the_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real failure: the tracking server process is stopped after the decision was recorded and before the
    alias moves. After a restart on the same database the champion is the old one and the record explains."""
    from conftest import start_mlflow_server
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast instead of retrying for minutes
    server = start_mlflow_server(tmp_path / "srv")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        mlflow = MlflowClient(server.uri, server.uri)
        name, cfg = "lafs-face", RegisterParams()
        add_versions(mlflow, name, [0.80, 0.90])
        assert registry.promote(mlflow, cfg, "1").action == "first"
        with pytest.raises(registry.RegistryError, match=r"MLflow at http://127\.0\.0\.1"), registry.mlflow_errors(cfg):
            registry.promote(mlflow, cfg, "2", before_move=lambda decision: server.stop())
    finally:
        server.stop()
    server = start_mlflow_server(tmp_path / "srv", db=server.db)
    try:
        mlflow = MlflowClient(server.uri, server.uri)
        assert registry.alias_version(mlflow, name, registry.CHAMPION).version == "1"
        assert mlflow.get_model_version(name, "2").tags["promotion.decision"] == "promoted"
        assert registry.promote(mlflow, cfg, "2").promoted
        assert registry.alias_version(mlflow, name, registry.CHAMPION).version == "2"
        # The history holds v2 twice (the failed move and the real one); rollback still finds v1.
        assert registry.rollback(mlflow, name).version == "1"
    finally:
        server.stop()


def test_git_dirty_ignores_run_settings_but_not_code(tmp_path: Path) -> None:
    """params.yaml (overrides, as dvc exp run -S writes them) and dvc.lock are pinned by dvc.lock hashes on the
    version's tags; any other tracked change makes the tree dirty."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    for name in ("params.yaml", "dvc.lock", "code.py"):
        (tmp_path / name).write_text("a: 1\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    assert register_stage.git_tags(tmp_path)["git.dirty"] == "false"
    (tmp_path / "params.yaml").write_text("a: 2\n")
    (tmp_path / "dvc.lock").write_text("a: 2\n")
    tags = register_stage.git_tags(tmp_path)
    assert tags["git.dirty"] == "false" and tags["git.params_changed"] == "true"
    (tmp_path / "code.py").write_text("a: 2\n")
    assert register_stage.git_tags(tmp_path)["git.dirty"] == "true"
