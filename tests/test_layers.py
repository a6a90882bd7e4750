"""Layers point down only: a lower layer of the package never imports a higher one (function-level imports
included), so the core can be reused and tested without the stages, the CLI or the orchestration above it."""

from __future__ import annotations

from test_dvc_deps import PACKAGE, REPO, imports_of

# Each layer may import its own and the ones listed before it.
LAYERS = [
    {"errors", "atomic", "config", "conventions", "layout", "params_edit", "tensor_files"},
    {"data", "faces", "models", "losses"},
    {"engine", "eval", "tracking", "export", "tuning"},
    {"serving", "registry"},
    {"stages"},
    {"cli", "__main__"},
]


def layer_of(path) -> int | None:
    rel = path.relative_to(PACKAGE)
    name = rel.parts[0].removesuffix(".py")
    return next((i for i, names in enumerate(LAYERS) if name in names), None)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer_of(path)
        if own is None:
            continue
        for target in imports_of(path):
            if target == PACKAGE / "__init__.py":
                continue
            other = layer_of(target)
            if other is not None and other > own:
                upward.append(f"{path.relative_to(REPO)} -> {target.relative_to(REPO)}")
    assert not upward, "lower layers import higher ones:\n" + "\n".join(upward)


def test_every_module_has_a_layer():
    unplaced = sorted(
        {
            p.relative_to(PACKAGE).parts[0]
            for p in PACKAGE.rglob("*.py")
            if p != PACKAGE / "__init__.py" and layer_of(p) is None
        }
    )
    assert not unplaced, f"give these a layer in LAYERS: {unplaced}"
