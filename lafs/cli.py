"""``lafs <stage>``: the command line that ``dvc.yaml`` stages and people call.

Every pipeline stage is one row of :data:`PIPELINE` and one call, the stage contract of :mod:`lafs.stages`:
``lafs.stages.<name>.run(params, Layout(--root), RunOptions(...))``, with the same options everywhere
(``--params``, ``--set key=value``, ``--root``, ``--restart-on-change``). A few commands add their own options
(pretrain: ``--checkpoint-uri`` and the torchrun relaunch; evaluate: scoring any ``--model``; compare: its
report folder). Expected failures (bad params, a stage refusing its input) print one ``error:`` line and
exit 1; anything else is a bug and keeps its traceback.
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

from lafs.config import PARAMS_FILE, ConfigError, Params, load_params
from lafs.faces import FaceModelError
from lafs.layout import Layout
from lafs.stages import RunOptions, StageError
from lafs.tracking import ModelSpecError

StageFn = Callable[[Params, argparse.Namespace], str]
OptionsFn = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Stage:
    help: str
    fn: StageFn
    options: OptionsFn | None = None


STAGES: dict[str, Stage] = {}

# The dvc.yaml stages, in pipeline order: name -> help. Each is `lafs.stages.<name>.run` (lafs.stages).
PIPELINE = {
    "ingest": "copy face photos from ingest.source into data/raw and write data/manifest.parquet",
    "landmarks": "detect, align to 112x112 and place dense landmarks: data/aligned, data/landmarks.parquet",
    "validate": "check data/manifest.parquet and data/landmarks.parquet with great-expectations",
    "split": "identity-disjoint ssl/finetune/test sets, few-shot views and verification pairs (data/splits)",
    "shards": "the ssl and finetune sets as WebDataset tar shards for streaming loaders (data/shards; shards.write)",
    "landmark_net": "train the landmark CNN on the dense landmarks: models/landmark_net.pt",
    "pretrain": "self-supervised pretraining (LAFS / DINO-face / ProS) into models/pretrain, torchrun-aware",
    "tune": "Optuna search over the finetune params, one finetune run (an MLflow child run) per trial: "
    "params/best_finetune.yaml, models/tune_best; rerun to resume, start several to share the study",
    "finetune": "supervised finetuning (margin head, landmark regulariser) of the pretrained backbone: "
    "models/finetune/model.pt",
    "export": "export models/finetune/model.pt to models/model.onnx and check parity with PyTorch",
    "evaluate": "verification, few-shot and latency of the finetuned model (metrics/eval.json, plots/), or of "
    "any --model on --images + --pairs",
    "register": "log the evaluated model to the MLflow Model Registry (alias challenger) as a served pyfunc "
    "(detector + ONNX recogniser + threshold), run the promotion gate: metrics/promotion.json",
}


def stage(name: str, help: str, options: OptionsFn | None = None) -> Callable[[StageFn], StageFn]:
    """Register ``fn(params, args) -> one-line summary`` as ``lafs <name>``; ``options`` adds its flags."""

    def register(fn: StageFn) -> StageFn:
        STAGES[name] = Stage(help, fn, options)
        return fn

    return register


def _stage_options(parser: argparse.ArgumentParser, out_alias: bool = True) -> None:
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="project root: every file is below it (lafs.layout; default: .)"
    )
    if out_alias:  # --root's name before lafs.layout
        parser.add_argument("--out", dest="root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--restart-on-change",
        action="store_true",
        help="stages that resume (landmark_net, pretrain, finetune): if the checkpoint was written with other "
        "params or inputs, set it aside (*.previous.pt) and start over instead of refusing (dvc.yaml uses this)",
    )


def run_stage(name: str, params: Params, args: argparse.Namespace) -> str:
    """The stage contract: ``lafs.stages.<name>.run(params, layout, options)`` (imported lazily: torch / GX
    load only for the stages that need them)."""
    module = importlib.import_module(f"lafs.stages.{name}")
    options = RunOptions(restart_on_change=args.restart_on_change)
    summary = module.run(params, Layout(args.root), options)
    return str(summary.describe())


def _pipeline_stage(name: str, fn: StageFn | None = None, extra: OptionsFn | None = None) -> None:
    """Register ``lafs <name>``: :func:`run_stage`, or ``fn`` for a stage with ``extra`` flags of its own."""

    def options(parser: argparse.ArgumentParser) -> None:
        _stage_options(parser, out_alias=name != "evaluate")  # evaluate --model has its own --out
        if extra is not None:
            extra(parser)

    stage(name, PIPELINE[name], options)(fn or (lambda params, args: run_stage(name, params, args)))


def _pretrain_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-uri", default=None, help="s3://bucket/prefix mirror of models/pretrain/last.pt")


def _pretrain(params: Params, args: argparse.Namespace) -> str:
    """Under torchrun already (or one process): the stage; else relaunch this command under torchrun."""
    from lafs.engine.distributed import relaunch_with_torchrun, resolve_nproc, under_torchrun

    cfg = params.pretrain
    if args.checkpoint_uri:
        params = params.model_copy(update={"pretrain": cfg.model_copy(update={"checkpoint_uri": args.checkpoint_uri})})
    nproc = resolve_nproc(cfg.nproc_per_node)
    if not under_torchrun() and (nproc > 1 or cfg.nnodes > 1):
        code = relaunch_with_torchrun(sys.argv[1:], nproc, cfg.nnodes, cfg.node_rank, cfg.rdzv_endpoint)
        if code:
            raise StageError(f"torchrun with {nproc} process(es) x {cfg.nnodes} node(s) failed (see above)")
        return f"pretrained with {nproc} process(es) per node on {cfg.nnodes} node(s) into {Layout(args.root).pretrain}"
    return run_stage("pretrain", params, args)


def _evaluate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="score this model instead: an .onnx / .pt file, a models:/ or runs:/ URI (or a served "
        "pyfunc folder), dlib_resnet, pixels or hog on "
        "--images/--pairs instead of the pipeline's finetuned model",
    )
    parser.add_argument(
        "--images", type=Path, default=None, help="with --model: folder of <Identity>/<Identity>_NNNN photos"
    )
    parser.add_argument(
        "--pairs", type=Path, default=None, help="with --model: LFW pairs file (official or fold-prefixed)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="with --model: output folder (metrics.json, evaluation.md, roc.png, scores.png, roc.csv); "
        "without: the project root, like --root",
    )
    parser.add_argument(
        "--no-floors",
        action="store_true",
        help="with --model: score only that model, without the pixel / HOG floors and the dlib ceiling "
        "scored beside it (the pipeline form: set evaluate.floors / evaluate.ceiling)",
    )


def _evaluate(params: Params, args: argparse.Namespace) -> str:
    from lafs.stages import evaluate

    out = args.out
    if args.model is None:
        if args.images is not None or args.pairs is not None:
            raise ConfigError(
                "--images/--pairs go with --model; the pipeline form reads evaluate.pairs / evaluate.images_root"
            )
        if args.no_floors:
            raise ConfigError(
                "--no-floors goes with --model; the pipeline form reads evaluate.floors / "
                "evaluate.ceiling (e.g. --set floors=[] --set ceiling=null)"
            )
        if out is not None:
            args.root = out
        return run_stage("evaluate", params, args)
    flags = (("--images", args.images), ("--pairs", args.pairs), ("--out", out))
    missing = [flag for flag, value in flags if value is None]
    if missing:
        raise ConfigError(
            f"--model needs {', '.join(missing)} (e.g. lafs evaluate --model dlib_resnet --images "
            "../shared/data/lfw_subset --pairs ../shared/data/lfw_subset_pairs.txt --out /tmp/eval)"
        )
    assert out is not None
    return evaluate.run_model(
        params.evaluate, params.landmarks, args.model, args.images, args.pairs, out, baselines=not args.no_floors
    ).describe()


_CUSTOM: dict[str, tuple[StageFn, OptionsFn]] = {
    "pretrain": (_pretrain, _pretrain_options),
    "evaluate": (_evaluate, _evaluate_options),
}
for _name in PIPELINE:
    _pipeline_stage(_name, *_CUSTOM.get(_name, (None, None)))


def _compare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=Path("."), help="project root (default: .)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the cells' results and pretrainings; the table is written to OUT.md "
        "(default: reports/comparison)",
    )


@stage(
    "compare",
    "scratch vs DINO-face vs LAFS pretraining x full / few-shot finetuning at equal budgets: "
    "reports/comparison.md (not a DVC stage; `make compare`)",
    _compare_options,
)
def _compare(params: Params, args: argparse.Namespace) -> str:
    from lafs.stages import compare

    layout = Layout(args.root)
    paths = compare.ComparePaths(layout, args.out or layout.comparison)
    return compare.compare(params.compare, params.pretrain, params.finetune, paths).describe()


def _promote_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-name", default=None, help="registered model (default: register.model_name)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", default=None, help="version to run the gate for")
    which.add_argument("--alias", default="challenger", help="alias of the version to gate (default: %(default)s)")
    which.add_argument(
        "--rollback", action="store_true", help="make the previous champion (from the recorded history) champion again"
    )
    parser.add_argument("--report", type=Path, default=None, help="also write the decision as markdown here")


@stage(
    "promote",
    "run the promotion gate on demand (or --rollback) for a registered model; gate params come "
    "from the register section (--set min_gain=0.01)",
    _promote_options,
)
def _promote(params: Params, args: argparse.Namespace) -> str:
    from lafs import registry

    def write_report(decision: registry.Decision) -> None:
        if args.report is not None:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(registry.report_markdown(decision))

    return registry.promote_on_demand(
        params.register, args.model_name, args.version, args.alias, roll_back=args.rollback, before_move=write_report
    ).describe()


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    """``lafs cluster``: on demand, not a DVC stage, so no params section (see lafs.stages.cluster)."""
    parser.add_argument(
        "--model",
        default=None,
        help="model file (.pt), exported .onnx, models:/<name>@<alias>, runs:/<id>/model, or dlib_resnet",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="CSV with aligned_path[,identity] (paths relative to --root) or a folder of aligned faces",
    )
    parser.add_argument(
        "--embeddings",
        type=Path,
        default=None,
        help="precomputed (N, D) .npy instead of --model (rows in --images order, if given)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder: clusters.csv, cluster_metrics.json")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--threshold", type=float, default=None, help="cosine similarity threshold")
    which.add_argument("--metrics", type=Path, default=None, help="metrics JSON with the verification threshold")
    parser.add_argument("--metrics-key", default="verification.threshold", help="dotted key (default: %(default)s)")
    parser.add_argument("--method", choices=["agglomerative", "hdbscan"], default="agglomerative")
    parser.add_argument("--min-cluster-size", type=int, default=2, help="HDBSCAN's (default: %(default)s)")
    parser.add_argument(
        "--curate-min-size",
        type=int,
        default=None,
        help="also write curated.txt: images in clusters of at least N faces, one per line",
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="base of CSV paths (default: .)")
    parser.add_argument(
        "--folder-identities",
        action="store_true",
        help="folder input: parent folder name is the identity (scores the clustering)",
    )
    parser.add_argument("--flip", action="store_true", help="flip-sum embeddings")
    parser.add_argument("--batch-size", type=int, default=64)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="project",
        help="models:/<name>@champion, models:/<name>/<version>, runs:/<id>/model, a saved pyfunc "
        "folder, or 'project': models/model.onnx + metrics/eval.json of --root (default)",
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="project root for --model project (default: .)")
    parser.add_argument(
        "--params",
        type=Path,
        default=Path(PARAMS_FILE),
        help="landmarks section (detector) for --model project (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")


def _embed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", nargs="+", help="photo files, folders (searched recursively) or s3://bucket/prefix")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="Parquet file: a row per face (photo, box, keypoints, det_score, embedding)",
    )
    parser.add_argument("--s3-endpoint-url", default=None, help="S3-compatible server for s3:// inputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_options(parser)


def _verify_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photo_a", type=Path)
    parser.add_argument("photo_b", type=Path)
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="cosine above which the faces are the same person (default: the model's calibrated one)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    _model_options(parser)


def _pipeline(args: argparse.Namespace) -> Any:
    from lafs.serving.load import PROJECT, load_pipeline

    landmarks = load_params(args.params).landmarks if args.model == PROJECT else None
    return load_pipeline(args.model, args.root, landmarks, args.threads)


def _embed(args: argparse.Namespace) -> int:
    """Exit status: 0 when every photo gave a face, else the number of rejected photos (at most 125)."""
    from lafs.serving.embed import embed_photos, list_photos

    summary = embed_photos(
        _pipeline(args), list_photos(args.photos, args.s3_endpoint_url), args.out, progress=not args.no_progress
    )
    print(summary.describe())
    return min(sum(summary.rejected.values()), 125)


def _verify(args: argparse.Namespace) -> int:
    """Exit status 0: the same person, 1: different people; errors exit 2."""
    import json

    from lafs.data.images import ImageRejected, read_bytes
    from lafs.serving.faces import replace_threshold

    pipeline = _pipeline(args)
    if args.threshold is not None:
        pipeline = replace_threshold(pipeline, args.threshold)
    faces = []
    for photo in (args.photo_a, args.photo_b):
        try:
            faces.append(pipeline.embed(pipeline.decode(read_bytes(photo), str(photo))))
        except ImageRejected as exc:
            raise StageError(f"{photo}: {exc.code}: {exc.message}") from None
    score = pipeline.score(*faces)
    try:
        same = pipeline.same(score)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    result = {
        "photo_a": str(args.photo_a),
        "photo_b": str(args.photo_b),
        "score": round(score, 6),
        "threshold": pipeline.cfg.threshold,
        "same": same,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{'same person' if same else 'different people'}: score {score:.4f} "
            f"{'>' if same else '<='} threshold {pipeline.cfg.threshold:.4f}"
        )
    return 0 if same else 1


def _cluster(args: argparse.Namespace) -> str:
    from lafs.stages import cluster

    cfg = cluster.ClusterConfig(
        model=args.model,
        images=args.images,
        embeddings=args.embeddings,
        threshold=args.threshold,
        metrics=args.metrics,
        metrics_key=args.metrics_key,
        method=args.method,
        min_cluster_size=args.min_cluster_size,
        curate_min_size=args.curate_min_size,
        root=args.root,
        folder_identities=args.folder_identities,
        flip=args.flip,
        batch_size=args.batch_size,
    )
    return cluster.run(cfg, args.out).describe()


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


def _build_parser() -> argparse.ArgumentParser:
    from lafs import __version__

    parser = argparse.ArgumentParser(
        prog="lafs",
        description="Run one LAFS pipeline stage (the same call dvc.yaml makes), or set values in params.yaml.",
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
            help="override a param for this call only (repeatable); `lafs set-params` changes params.yaml",
        )
        if spec.options is not None:
            spec.options(p)
    p = sub.add_parser(
        "set-params",
        help="set values in params.yaml, comments kept (what `dvc exp run "
        "--set-param` does; make pipeline DATA=... MODELS=... calls it)",
    )
    p.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="empty VALUE sets null")
    _cluster_options(
        sub.add_parser(
            "cluster",
            help="group aligned faces into identities with a model: clusters.csv, cluster_metrics.json[, curated.txt]",
        )
    )
    _embed_options(
        sub.add_parser(
            "embed",
            help="detect, align and embed photos with a model: a Parquet row per face, rejects listed with a reason",
        )
    )
    _verify_options(sub.add_parser("verify", help="are two photos the same person? exit 0 same, 1 different"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "set-params":
            from lafs.params_edit import set_params

            changed = set_params(args.params, parse_sets(args.set))
            for key, (old, new) in changed.items():
                print(f"{args.params}: {key}: {old!r} -> {new!r}")
            print(f"{args.params}: {len(changed)} value(s) changed")
            return 0
        if args.command == "cluster":
            print(_cluster(args))
            return 0
        if args.command in ("embed", "verify"):
            return (_embed if args.command == "embed" else _verify)(args)
        section = {"promote": "register"}.get(args.command, args.command)  # commands reading another's section
        params = load_params(args.params, sets=parse_sets(args.set, section=section))
        print(STAGES[args.command].fn(params, args))
        return 0
    except (ConfigError, StageError, ModelSpecError, FaceModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        # 143 for a preempted (SIGTERM) run, as a shell reports it; verify's 1 means "different people"
        return getattr(exc, "exit_code", 2 if args.command == "verify" else 1)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
