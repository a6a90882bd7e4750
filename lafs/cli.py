"""``lafs <stage>``: the command line that ``dvc.yaml`` stages and people call.

Every stage subcommand takes the same options (``--params``, ``--set key=value``, ``--out``), loads and
validates the params once, and calls the stage's ``run`` function; adding a stage is one small function
decorated with :func:`stage`. Expected failures (bad params, a stage refusing its input) print one
``error:`` line and exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lafs.config import (
    OVERRIDE_FILE,
    PARAMS_FILE,
    ConfigError,
    Params,
    deep_merge,
    load_params,
    parse_params,
    read_yaml_mapping,
)
from lafs.stages import StageError

StageFn = Callable[[Params, argparse.Namespace], str]
OptionsFn = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Stage:
    help: str
    fn: StageFn
    options: OptionsFn | None = None


STAGES: dict[str, Stage] = {}


def stage(name: str, help: str, options: OptionsFn | None = None) -> Callable[[StageFn], StageFn]:
    """Register ``fn(params, args) -> one-line summary`` as ``lafs <name>``; ``options`` adds stage flags.

    Every stage gets ``--params``, ``--set`` and ``--out`` (the project root, unless ``options`` gives
    ``--out`` its own meaning, as ``pretrain`` does for its checkpoint directory).
    """

    def register(fn: StageFn) -> StageFn:
        STAGES[name] = Stage(help, fn, options)
        return fn

    return register


def _root_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("."), help="project root for outputs (default: .)")


def _simple_stage(name: str, help: str) -> None:
    """Register a stage whose ``lafs.stages.<name>.run(params.<name>, out_dir)`` needs nothing else."""

    def call(params: Params, args: argparse.Namespace) -> str:
        module = importlib.import_module(f"lafs.stages.{name}")  # lazily: torch/GX load only when needed
        return module.run(getattr(params, name), args.out).describe()

    stage(name, help)(call)


_simple_stage("ingest", "copy face photos from ingest.source into data/raw and write data/manifest.parquet")
_simple_stage("landmarks", "detect, align to 112x112 and place dense landmarks: data/aligned, data/landmarks.parquet")
_simple_stage("validate", "check data/manifest.parquet and data/landmarks.parquet with great-expectations")
_simple_stage("split", "identity-disjoint ssl/finetune/test sets, few-shot views and verification pairs (data/splits)")


@stage("landmark_net", "train the landmark CNN on the dense landmarks: models/landmark_net.pt")
def _landmark_net(params: Params, args: argparse.Namespace) -> str:
    from lafs.stages import landmark_net

    root = args.out
    paths = landmark_net.LandmarkNetPaths(root, root / "data", root / "models" / "landmark_net.pt",
                                          root / "metrics" / "landmark_net.json")
    return landmark_net.run(params.landmark_net, paths).describe()


def _pretrain_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("models/pretrain"),
                        help="checkpoint directory: DIR/last.pt is the latest state, resumed automatically "
                             "(default: %(default)s)")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root holding data/ (default: .)")
    parser.add_argument("--checkpoint-uri", default=None, help="s3://bucket/prefix mirror of DIR/last.pt")
    parser.add_argument("--restart-on-change", action="store_true",
                        help="if DIR/last.pt was written with other params, set it aside and start over "
                             "(dvc.yaml uses this: a params change means a new run)")


@stage("pretrain", "self-supervised pretraining (LAFS / DINO-face / ProS), torchrun-aware", _pretrain_options)
def _pretrain(params: Params, args: argparse.Namespace) -> str:
    from lafs.engine.distributed import relaunch_with_torchrun, resolve_nproc, under_torchrun
    from lafs.stages import pretrain

    cfg = params.pretrain
    if args.checkpoint_uri:
        cfg = cfg.model_copy(update={"checkpoint_uri": args.checkpoint_uri})
    nproc = resolve_nproc(cfg.nproc_per_node)
    if not under_torchrun() and (nproc > 1 or cfg.nnodes > 1):
        code = relaunch_with_torchrun(sys.argv[1:], nproc, cfg.nnodes, cfg.node_rank, cfg.rdzv_endpoint)
        if code:
            raise StageError(f"torchrun with {nproc} process(es) x {cfg.nnodes} node(s) failed (see above)")
        return f"pretrained with {nproc} process(es) per node on {cfg.nnodes} node(s); checkpoints in {args.out}"
    root = args.root
    paths = pretrain.PretrainPaths(root=root, data_dir=root / "data", out_dir=args.out,
                                   landmark_net=root / "models" / "landmark_net.pt",
                                   metrics=root / "metrics" / "pretrain.json")
    return pretrain.run(cfg, paths, restart_on_change=args.restart_on_change).describe()


def parse_sets(items: Sequence[str], section: str | None = None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "<section>.c": "x"}``; values are YAML (``5``, ``null``, ``[a]``).

    A key whose first part is not a params section is taken relative to ``section`` (the stage's own), so
    ``lafs ingest --set max_identities=5`` works as well as ``--set ingest.max_identities=5``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ingest.max_identities=10")
        if section is not None and key.split(".")[0] not in Params.model_fields:
            key = f"{section}.{key}"
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return out


def write_local_params(
    path: Path,
    sets: dict[str, Any],
    params_file: Path = Path(PARAMS_FILE),
) -> bool:
    """(Re)write the untracked override file so DVC can always read it; return whether it changed.

    ``dvc.yaml`` stages track their section of this file, and DVC 3 fails a stage whose params file is
    missing or lacks the tracked section, so every params section is written (``{}`` when empty). Keys in
    ``sets`` are set (an empty value removes the key, falling back to params.yaml); other keys already in
    the file are kept. The merged result is validated before writing, and the file is left untouched when
    nothing changes.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in read_yaml_mapping(path, missing_ok=True).items()}
    for key, value in sets.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if value in ("", None):
            node.pop(leaf, None)
        else:
            node[leaf] = value
    for section in Params.model_fields:
        if not isinstance(data.get(section), dict):
            data[section] = {}
    parse_params(deep_merge(read_yaml_mapping(params_file, missing_ok=True), data), f"{params_file} + {path}")
    text = yaml.safe_dump(data, sort_keys=True, default_flow_style=False)
    header = "# Written by `make pipeline` / `lafs local-params`; untracked. Deep-merged over params.yaml.\n"
    changed = not path.exists() or path.read_text() != header + text
    if changed:
        path.write_text(header + text)
    return changed


def _build_parser() -> argparse.ArgumentParser:
    from lafs import __version__

    parser = argparse.ArgumentParser(
        prog="lafs",
        description="Run one LAFS pipeline stage (the same call dvc.yaml makes), or manage params.local.yaml.",
    )
    parser.add_argument("--version", action="version", version=f"lafs {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, spec in STAGES.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        p.add_argument("--params", type=Path, default=Path(PARAMS_FILE), help="defaults (default: %(default)s)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"override a param (repeatable); {OVERRIDE_FILE} next to --params is merged first",
        )
        (spec.options or _root_out)(p)
    p = sub.add_parser(
        "local-params",
        help=f"(re)write the untracked {OVERRIDE_FILE} (used by `make pipeline DATA=... MODELS=...`)",
    )
    p.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    p.add_argument("--file", type=Path, default=None, help=f"default: {OVERRIDE_FILE} next to --params")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="empty VALUE removes KEY")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "local-params":
            target = args.file or args.params.parent / OVERRIDE_FILE
            changed = write_local_params(target, parse_sets(args.set), params_file=args.params)
            print(f"{target}: {'written' if changed else 'unchanged'}")
            return 0
        params = load_params(args.params, sets=parse_sets(args.set, section=args.command))
        print(STAGES[args.command].fn(params, args))
        return 0
    except (ConfigError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)  # 143 for a preempted (SIGTERM) run, as a shell reports it


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
