"""One stage contract: every dvc.yaml stage is `lafs <stage>` = `lafs.stages.<stage>.run(params, layout, options)`,
its files are the Layout's, and no artifact path is spelled anywhere else in the package."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import yaml

from lafs import cli
from lafs.layout import STAGE_IO, Layout, stage_paths

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# A params value, not a Layout path (tune.out / finetune.tuned_params name it).
PARAMS_FILES = {"params/best_finetune.yaml"}


def _names(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_dvc_yaml_stages_are_the_layouts_and_the_clis():
    assert set(DVC) == set(cli.PIPELINE)
    assert set(STAGE_IO) == set(DVC)


def test_every_stage_reads_and_writes_exactly_its_layout_paths():
    layout = Layout()
    for name, spec in DVC.items():
        deps, outs = stage_paths(layout, name)
        declared_deps = {d for d in _names(spec.get("deps", [])) if not d.startswith("lafs/")} - PARAMS_FILES
        declared_outs = _names(spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", [])) - PARAMS_FILES
        assert declared_deps == {p.as_posix() for p in deps}, name
        assert declared_outs == {p.as_posix() for p in outs}, name


def test_every_stage_command_is_the_generic_cli_call():
    for name, spec in DVC.items():
        assert re.fullmatch(rf"lafs {name}( --restart-on-change)?", spec["cmd"]), spec["cmd"]


def test_every_stage_module_has_the_one_run_signature():
    for name in DVC:
        run = importlib.import_module(f"lafs.stages.{name}").run
        params = list(inspect.signature(run).parameters)
        assert params == ["params", "layout", "options"], f"lafs.stages.{name}.run{tuple(params)}"


def test_layout_paths_follow_the_root():
    here, there = Layout(), Layout(Path("/srv/project"))
    assert here.manifest == Path("data/manifest.parquet")
    assert there.manifest == Path("/srv/project/data/manifest.parquet")
    assert there.relative(there.aligned / "a" / "b.png") == Path("data/aligned/a/b.png")
    assert there.resolve("params/x.yaml") == Path("/srv/project/params/x.yaml")
    assert there.resolve("/abs/x.yaml") == Path("/abs/x.yaml")


# Artifact names that only lafs/layout.py may spell (docstrings and messages may mention them in prose).
ARTIFACTS = re.compile(
    r"""["'](data|models|metrics|reports|plots)/|/\s*["'](data|models|metrics|reports|plots|splits|aligned)["']|"""
    r"""["'](manifest|landmarks)\.parquet["']|["']model\.onnx["']|"""
    r"""["'](teacher_backbone|landmark_net|last|model)\.pt["']|["'](eval|promotion|validation)\.(json|md)["']"""
)


# Other packages' folder layouts, not pipeline artifacts.
EXTERNAL = {
    "lafs/faces/dense.py",  # face_recognition_models' models/ folder
    "lafs/faces/detect.py",  # insightface's <root>/models/<pack> layout
}


def test_no_artifact_path_literal_outside_the_layout():
    offenders = []
    for path in sorted((REPO / "lafs").rglob("*.py")):
        if path.name == "layout.py" or path.relative_to(REPO).as_posix() in EXTERNAL:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if ARTIFACTS.search(code) and "help=" not in code and not code.strip().startswith(('f"', '"', "'")):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "paths belong in lafs/layout.py:\n" + "\n".join(offenders)
