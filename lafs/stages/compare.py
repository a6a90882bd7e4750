"""``lafs compare``: does pretraining help, and does it help more with fewer labels? (issue #6, item 4)

A table of cells {scratch, DINO-face pretraining, LAFS pretraining} x {full finetune set, few-shot k}, every
cell at the same budget: one model size, the same pretraining epochs / batch for both SSL methods, the same
finetuning epochs / batch / seed for every cell of a data column (so the same number of steps), no early
stopping (the best epoch is still chosen on the held-out validation identities) and no tuned params. Each
cell is pretrain (shared by the cells of an init, :func:`lafs.stages.pretrain.run`), finetune
(:func:`lafs.stages.finetune.train`) and verification on the test pairs (``data/splits/pairs.csv``).

Outputs: ``<out>/<cell>/result.json`` per cell (a cell whose result exists is skipped: rerun to resume),
``<out>/pretrain-<method>/`` and the table ``<out>.md`` (``reports/comparison.md`` for the default out).
MLflow: one parent run; every cell's finetune run (with its test metrics) and both pretraining runs are its
children. Not a DVC stage: it must not lengthen the default ``dvc repro`` (``make compare`` runs it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lafs.atomic import write_text
from lafs.config import CompareParams, FinetuneParams, Params, SSLParams, resolved, update_section
from lafs.data.pairs import read_pairs_csv
from lafs.engine.checkpoint import load_checkpoint
from lafs.layout import Layout
from lafs.stages import RunOptions, StageError, pretrain
from lafs.stages.finetune import FinetunePaths, train
from lafs.tracking import ensure_experiment, flatten, metric_leaves, tracking_uri

log = logging.getLogger(__name__)

INIT_LABELS = {"scratch": "scratch (no pretraining)", "dino_face": "DINO-face pretraining", "lafs": "LAFS pretraining"}


@dataclass(frozen=True)
class ComparePaths:
    layout: Layout  # the project whose data, splits and landmark net every cell uses
    out_dir: Path  # one folder per cell and per pretraining; the table is <out_dir>.md

    @property
    def report(self) -> Path:
        return self.out_dir.with_name(f"{self.out_dir.name}.md")

    @property
    def parent_run(self) -> Path:
        return self.out_dir / "mlflow_parent_run.json"


@dataclass(frozen=True)
class Cell:
    init: str  # scratch | dino_face | lafs
    fewshot_k: int | None  # None = the full finetune set

    @property
    def data(self) -> str:
        return "full" if self.fewshot_k is None else f"k{self.fewshot_k}"

    @property
    def name(self) -> str:
        return f"{self.init}-{self.data}"


@dataclass
class CompareSummary:
    results: dict[str, dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None
    parent_run_id: str | None = None

    def describe(self) -> str:
        best = max(self.results.items(), key=lambda kv: kv[1]["verification"]["accuracy_mean"])
        return (
            f"compare: {len(self.results)} cells ({len(self.ran)} run, {len(self.skipped)} already done); best "
            f"{best[0]} at {best[1]['verification']['accuracy_mean']:.4f} test accuracy; table in {self.report}"
        )


def cells(cfg: CompareParams) -> list[Cell]:
    return [Cell(init, k) for init in cfg.inits for k in (None, *cfg.fewshot_k)]


def pretrain_config(cfg: CompareParams, base: SSLParams, method: str) -> SSLParams:
    """The pretrain section at the comparison's budget for ``method`` (one process, the comparison's seed)."""
    update = {
        "method": method,
        "model": f"{'dino' if method == 'dino_face' else 'lafs'}_vit_{cfg.size}",
        "epochs": cfg.pretrain_epochs,
        "batch_size": cfg.pretrain_batch_size,
        "seed": cfg.seed,
        "warmup_epochs": min(base.warmup_epochs, cfg.pretrain_epochs - 1),
        "nproc_per_node": 1,
        "nnodes": 1,
        "checkpoint_uri": None,
        "experiment": cfg.experiment,
        "tracking_uri": cfg.tracking_uri,
    }
    return update_section(base, update, f"compare ({method} pretraining)")


def finetune_config(cfg: CompareParams, base: FinetuneParams, cell: Cell) -> FinetuneParams:
    """The finetune section at the comparison's budget for ``cell``: equal epochs, batch and seed, no early
    stopping, no tuned params."""
    update = {
        "init": "scratch" if cell.init == "scratch" else "pretrained",
        "model": f"{'dino' if cell.init == 'dino_face' else 'lafs'}_vit_{cfg.size}",
        "epochs": cfg.finetune_epochs,
        "batch_size": cfg.finetune_batch_size,
        "seed": cfg.seed,
        "warmup_epochs": min(base.warmup_epochs, cfg.finetune_epochs - 1),
        "fewshot_k": cell.fewshot_k,
        "patience": None,
        "tuned_params": None,
        "experiment": cfg.experiment,
        "tracking_uri": cfg.tracking_uri,
    }
    return update_section(base, update, f"compare (cell {cell.name})")


def evaluate_on_test_pairs(
    model_file: Path, layout: Layout, batch_size: int, flip: bool = False
) -> tuple[dict[str, Any], np.ndarray]:
    """Verification report of ``model_file`` on the test pairs (the evaluate stage's embedders and metrics), with
    its 95% bootstrap interval, and the per-pair 10-fold decisions (True = decided correctly) for paired tests."""
    from lafs.eval.embedders import load_embedder
    from lafs.eval.faceset import aligned_faceset, embed, pairs_from_rows
    from lafs.eval.significance import accuracy_ci
    from lafs.eval.verification import kfold_correct, pair_scores, verification_report

    pairs_file = layout.splits / "pairs.csv"
    if not pairs_file.exists():
        raise StageError(f"{pairs_file} not found: run the split stage first (`dvc repro split`)")
    rows = read_pairs_csv(pairs_file)
    faces = aligned_faceset(layout.root, [str(r[k]) for r in rows for k in ("path1", "path2")])
    pairs = pairs_from_rows(rows, faces)
    emb = embed(load_embedder(model_file, batch_size=batch_size), faces, flip=flip)
    scores = pair_scores(emb[pairs.first], emb[pairs.second])
    report = verification_report(scores, pairs.same, folds=pairs.folds)
    correct, _, _ = kfold_correct(scores, pairs.same, folds=pairs.folds)
    report["accuracy_ci95"] = list(accuracy_ci(correct))
    return report, correct


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a result file exists only when its cell is complete (that is what resume looks at)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def _done(result_file: Path) -> bool:
    """A cell is done when its result exists with the per-pair decisions the paired tests need (older result
    files without them are rerun)."""
    return result_file.exists() and "pair_correct" in json.loads(result_file.read_text())


class _Parent:
    """The comparison's MLflow parent run, created once and reopened by a resumed comparison."""

    def __init__(self, cfg: CompareParams, paths: ComparePaths) -> None:
        import mlflow

        uri = tracking_uri(cfg.tracking_uri)
        self.client = mlflow.MlflowClient(uri)
        run_id = json.loads(paths.parent_run.read_text())["run_id"] if paths.parent_run.exists() else None
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                run = None
            if run is None or run.info.lifecycle_stage != "active":
                run_id = None
        if run_id is None:
            run = self.client.create_run(
                ensure_experiment(cfg.experiment, uri), run_name="compare", tags={"stage": "compare"}
            )
            run_id = run.info.run_id
            for key, value in flatten(resolved(cfg)).items():
                self.client.log_param(run_id, key, value)
            _write_json(paths.parent_run, {"run_id": run_id})
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def adopt(self, run_id: str | None, tags: dict[str, str]) -> None:
        """Make ``run_id`` (a run opened elsewhere, e.g. by pretraining) a child of this run."""
        if run_id:
            self.client.set_tag(run_id, "mlflow.parentRunId", self.run_id)
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)


def _log_cell(parent: _Parent, cell: Cell, run_id: str | None, verification: dict[str, Any]) -> None:
    for key, value in metric_leaves(verification).items():
        if run_id:
            parent.client.log_metric(run_id, f"test.{key}", float(value))
    for key in ("accuracy_mean", "eer"):
        parent.client.log_metric(parent.run_id, f"{cell.name}.{key}", float(verification[key]))
    if run_id:
        parent.client.set_tag(run_id, "compare.cell", cell.name)


def _pretrained(cfg: CompareParams, base: SSLParams, paths: ComparePaths, method: str, parent: _Parent) -> Path:
    """Pretrain (or resume / reuse) ``method`` at the comparison's budget; its teacher backbone file."""
    ssl = pretrain_config(cfg, base, method)
    out = paths.out_dir / f"pretrain-{method}"
    pt_paths = pretrain.PretrainPaths(paths.layout, out, paths.layout.landmark_net, out / "metrics.json")
    log.info("compare: %s pretraining (%d epochs, batch %d) -> %s", method, ssl.epochs, ssl.batch_size, out)
    pretrain.train(ssl, pt_paths, restart_on_change=True)
    parent.adopt(load_checkpoint(pt_paths.last).get("mlflow_run_id"), {"compare.role": f"pretrain-{method}"})
    return pt_paths.teacher


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> CompareSummary:
    """``lafs compare`` on the project at ``layout`` into ``layout.comparison``."""
    return compare(params.compare, params.pretrain, params.finetune, ComparePaths(layout, layout.comparison))


def compare(
    cfg: CompareParams, pretrain_cfg: SSLParams, finetune_cfg: FinetuneParams, paths: ComparePaths
) -> CompareSummary:
    """Run every cell not yet done, then (re)write the table from all result files."""
    todo = [c for c in cells(cfg) if not _done(paths.out_dir / c.name / "result.json")]
    parent = _Parent(cfg, paths)
    summary = CompareSummary({}, parent_run_id=parent.run_id, report=paths.report)
    status = "FAILED"
    try:
        teachers: dict[str, Path] = {}
        for cell in cells(cfg):
            result_file = paths.out_dir / cell.name / "result.json"
            if cell not in todo:
                summary.results[cell.name] = json.loads(result_file.read_text())
                summary.skipped.append(cell.name)
                continue
            if cell.init != "scratch" and cell.init not in teachers:
                teachers[cell.init] = _pretrained(cfg, pretrain_cfg, paths, cell.init, parent)
            ft = finetune_config(cfg, finetune_cfg, cell)
            out = paths.out_dir / cell.name
            ft_paths = replace(FinetunePaths.of(paths.layout, out), metrics=out / "metrics.json", warm_start=None)
            if cell.init in teachers:
                ft_paths = replace(ft_paths, teacher=teachers[cell.init])
            log.info("compare: cell %s (finetune %d epochs, batch %d)", cell.name, ft.epochs, ft.batch_size)
            ft_summary = train(ft, ft_paths, parent_run_id=parent.run_id, restart_on_change=True)
            verification, correct = evaluate_on_test_pairs(ft_paths.model, paths.layout, ft.batch_size)
            _log_cell(parent, cell, ft_summary.run_id, verification)
            result = {
                "cell": cell.name,
                "init": cell.init,
                "data": cell.data,
                "model": ft.model,
                "verification": verification,
                "finetune": ft_summary.metrics(),
                "pair_correct": "".join("1" if c else "0" for c in correct),
                "budget": {
                    "pretrain_epochs": cfg.pretrain_epochs,
                    "pretrain_batch_size": cfg.pretrain_batch_size,
                    "finetune_epochs": ft.epochs,
                    "finetune_batch_size": ft.batch_size,
                    "finetune_iterations": ft_summary.iterations,
                },
            }
            _write_json(result_file, result)
            summary.results[cell.name] = result
            summary.ran.append(cell.name)
        paths.report.parent.mkdir(parents=True, exist_ok=True)
        paths.report.write_text(markdown_table(cfg, summary.results))
        parent.client.log_artifact(parent.run_id, str(paths.report))
        status = "FINISHED"
    finally:
        parent.client.set_terminated(parent.run_id, status)
    return summary


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


PAIRINGS = (("lafs", "dino_face"), ("dino_face", "scratch"), ("lafs", "scratch"))


def _decisions(result: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(result["pair_correct"].encode(), dtype=np.uint8) == ord("1")


def paired_tests(cfg: CompareParams, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """LAFS vs DINO-face, DINO-face vs scratch and LAFS vs scratch within each data column, on the same test
    pairs (:func:`lafs.eval.significance.paired_test`); pairings with a missing cell are left out."""
    from lafs.eval.significance import paired_test

    out = []
    for k in (None, *cfg.fewshot_k):
        for a, b in PAIRINGS:
            ra, rb = results.get(Cell(a, k).name), results.get(Cell(b, k).name)
            if ra is None or rb is None:
                continue
            out.append({"a": a, "b": b, "data": Cell(a, k).data, **paired_test(_decisions(ra), _decisions(rb))})
    return out


def markdown_table(cfg: CompareParams, results: dict[str, dict[str, Any]]) -> str:
    """One row per cell: test verification accuracy (mean ± std over folds, 95% bootstrap interval over pairs),
    TAR@FAR=1e-2, EER and what it cost; then the paired tests between inits within each data column."""
    any_result = next(iter(results.values()))
    pairs = any_result["verification"]["pairs"]
    lines = [
        f"# Pretraining comparison ({cfg.size} models, equal budgets)",
        "",
        f"Test verification on {pairs} pairs of `data/splits/pairs.csv` (identity-disjoint from everything learnt; "
        f"accuracy is the mean ± std over the 10 folds, each thresholded on the other nine, and its 95% percentile "
        f"bootstrap interval over pairs). Budget per cell: SSL {cfg.pretrain_epochs} epochs x batch "
        f"{cfg.pretrain_batch_size} (dino_face and lafs alike), finetuning {cfg.finetune_epochs} epochs x batch "
        f"{cfg.finetune_batch_size}, seed {cfg.seed}, best epoch chosen on held-out finetune identities. "
        "TAR@FAR is n/a when there are fewer than 100 different-person pairs.",
        "",
        "| init | finetune data | model | test accuracy | 95% CI | TAR@FAR=1e-2 | EER | best val acc | train images "
        "| steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells(cfg):
        r = results.get(cell.name)
        if r is None:
            continue
        v, f = r["verification"], r["finetune"]
        data = "full" if cell.fewshot_k is None else f"few-shot k={cell.fewshot_k}"
        low, high = v["accuracy_ci95"]
        lines.append(
            f"| {INIT_LABELS[cell.init]} | {data} | {r['model']} | {_number(v['accuracy_mean'])} ± "
            f"{_number(v['accuracy_std'])} | {_number(low)}–{_number(high)} | "
            f"{_number(v['tar_at_far'].get('1e-02'))} | {_number(v['eer'])} | "
            f"{_number(f['best_val_accuracy'])} | {f['train_images']} | {f['iterations']} |"
        )
    tests = paired_tests(cfg, results)
    if tests:
        lines += [
            "",
            "## Paired tests (same test pairs)",
            "",
            "A − B: accuracy difference over pairs with its 95% paired bootstrap interval; McNemar's exact test on "
            "the pairs exactly one of the two decided correctly (A only / B only).",
            "",
            "| finetune data | A | B | A − B | 95% CI | A only | B only | McNemar p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in tests:
            lines.append(
                f"| {t['data']} | {t['a']} | {t['b']} | {t['difference']:+.3f} | {t['ci_low']:+.3f}–"
                f"{t['ci_high']:+.3f} | {t['a_only']} | {t['b_only']} | {t['mcnemar_p']:.3g} |"
            )
    return "\n".join(lines) + "\n"
