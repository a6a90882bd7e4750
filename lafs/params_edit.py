"""Dotted overrides written into ``params.yaml`` itself, comments and layout kept: what ``dvc exp run
--set-param`` does to the workspace, so ``make pipeline DATA=...`` and the Prefect flows leave the same trace
(``dvc params diff``, ``dvc exp show``) and a plain ``dvc repro`` sees the same values."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml

from lafs.atomic import write_text
from lafs.config import ConfigError, parse_params


def _round_trip() -> Any:
    from ruamel.yaml import YAML

    rt = YAML(typ="rt")
    rt.width = 4096  # never re-wrap long commented lines
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout: "    - item" under a key
    # ruamel writes None as an empty value; params.yaml spells it null (as PyYAML and DVC read it)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def set_params(path: Path, sets: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set each dotted ``key: value`` of ``sets`` in the params file ``path`` (an empty string or None sets
    null); the result is validated before anything is written. Returns ``{key: (old, new)}`` of the values
    that changed; the file is untouched when none did."""
    path = Path(path)
    rt = _round_trip()
    try:
        doc = rt.load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found (run from the project root)") from None
    changed: dict[str, tuple[Any, Any]] = {}
    for key, value in sets.items():
        value = None if value == "" else value
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            if part not in node:
                raise ConfigError(f"cannot set {key!r}: {path} has no section {part!r}")
            node = node[part]
            if not hasattr(node, "keys"):
                raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        old = node.get(leaf)
        if leaf not in node or _plain(old) != value:
            changed[key] = (_plain(old), value)
            node[leaf] = _flow(value)
    if not changed:
        return changed
    buf = io.StringIO()
    rt.dump(doc, buf)
    text = buf.getvalue()
    parse_params(yaml.safe_load(text) or {}, f"{path} with {', '.join(changed)} set")  # refuse a bad value
    write_text(path, text)
    return changed


def _flow(value: Any) -> Any:
    """Lists as ``[a, b]`` on the key's line (params.yaml's style), so the key's comment stays beside it."""
    if not isinstance(value, list):
        return value
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(value)
    seq.fa.set_flow_style()
    return seq


def _plain(value: Any) -> Any:
    """A ruamel node as plain data (CommentedSeq -> list, CommentedMap -> dict) for comparison."""
    if hasattr(value, "keys"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def dotted(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"ingest": {"max_identities": 16}}`` -> ``{"ingest.max_identities": 16}``: a nested run spec as sets."""
    return {f"{section}.{key}": value for section, keys in sections.items() for key, value in keys.items()}
