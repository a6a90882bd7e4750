"""Every ``dvc.yaml`` stage that runs ``lafs <stage>`` declares, as deps, every ``lafs`` module the stage imports
(transitively, function-level imports included), so an edit anywhere a stage's code reaches reruns that stage."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lafs"


def module_file(name: str) -> Path | None:
    """``lafs.a.b`` -> lafs/a/b.py or lafs/a/b/__init__.py (None for what is not a module of the package)."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[Path]:
    """Module files of the package that ``path`` imports anywhere (top level or inside functions), with the
    ``__init__`` of every package on the way (Python runs them on import)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name != "lafs" and not name.startswith("lafs."):
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]))
                if file is not None:
                    found.add(file)
    return found


def closure(start: Path) -> set[Path]:
    """``start`` and every module file it reaches. The root ``lafs/__init__.py`` is not followed: its only import
    is the lazy ``lafs.create_model`` re-export, which no stage uses."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path != PACKAGE / "__init__.py":
            todo.extend(imports_of(path) - seen)
    return seen


def covered(file: Path, deps: list[str]) -> bool:
    rel = file.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_lafs_stage_depends_on_the_code_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        cmd = stage["cmd"].split()
        if cmd[:1] != ["lafs"]:
            continue
        module = module_file(f"lafs.stages.{cmd[1]}")
        assert module is not None, f"stage {name}: no module lafs/stages/{cmd[1]}.py"
        deps = [str(d) for d in stage.get("deps", [])]
        lacking = sorted(
            f.relative_to(REPO).as_posix()
            for f in closure(module)
            if f != PACKAGE / "__init__.py" and not covered(f, deps)
        )
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml deps miss modules the stage imports: {missing}"
