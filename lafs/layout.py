"""Where every pipeline artifact lives below a project root.

The one place artifact paths are spelled out besides ``dvc.yaml``: stages, the CLI and the flows ask a
:class:`Layout` for them, and ``tests/test_layout.py`` checks that each ``dvc.yaml`` stage's outs, metrics, plots
and data deps are exactly the :data:`STAGE_IO` entries named here, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Files inside a training stage's folder (also in the other folders ``lafs compare`` and tune trials train in).
CHECKPOINT_FILE = "last.pt"  # the latest state, resumed from
MODEL_FILE = "model.pt"  # the model a training stage hands on (finetune: the best epoch's)
TEACHER_FILE = "teacher_backbone.pt"  # the pretrained teacher backbone

# metrics/<file> of each stage (DVC metrics: `dvc metrics show` reads them).
METRICS_FILES = {
    "ingest": "ingest.json",
    "landmarks": "landmarks.json",
    "validate": "validation.json",
    "split": "split.json",
    "shards": "shards.json",
    "landmark_net": "landmark_net.json",
    "pretrain": "pretrain.json",
    "tune": "tune.json",
    "finetune": "finetune.json",
    "export": "export.json",
    "evaluate": "eval.json",
    "register": "promotion.json",
}


@dataclass(frozen=True)
class Layout:
    """The pipeline's files below ``root`` (relative roots stay relative: DVC runs stages in the project)."""

    root: Path = Path(".")

    # -- data/: photos, tables and splits
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def raw(self) -> Path:
        """Ingested photos, ``<identity>/<file>`` (stage ingest)."""
        return self.data / "raw"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.parquet"

    @property
    def ingest_rejects(self) -> Path:
        return self.data / "ingest_rejects.csv"

    @property
    def ingest_skipped(self) -> Path:
        return self.data / "ingest_skipped.csv"

    @property
    def aligned(self) -> Path:
        """112x112 aligned faces (stage landmarks)."""
        return self.data / "aligned"

    @property
    def landmarks(self) -> Path:
        return self.data / "landmarks.parquet"

    @property
    def landmark_rejects(self) -> Path:
        return self.data / "rejects.csv"

    @property
    def splits(self) -> Path:
        """ssl / finetune / test tables, few-shot views and verification pairs (stage split)."""
        return self.data / "splits"

    @property
    def shards(self) -> Path:
        """WebDataset tar shards of the ssl and finetune sets and their ``index.json`` (stage shards)."""
        return self.data / "shards"

    # -- models/
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def landmark_net(self) -> Path:
        return self.models / "landmark_net.pt"

    @property
    def landmark_net_checkpoint(self) -> Path:
        """The landmark net's training state, resumed after a kill; git-ignored, not a DVC out (DVC would
        delete it before the rerun that needs it)."""
        return self.models / "landmark_net.last.pt"

    @property
    def pretrain(self) -> Path:
        """Pretraining checkpoints (``last.pt``) and the teacher backbone."""
        return self.models / "pretrain"

    @property
    def teacher(self) -> Path:
        return self.pretrain / TEACHER_FILE

    @property
    def tune_studies(self) -> Path:
        """Optuna storage and trial folders: deliberately not a DVC out (DVC would delete what resumes)."""
        return self.models / "tune"

    @property
    def tune_best(self) -> Path:
        """The best trial's checkpoint, continued by finetune (a ``WarmStart`` folder)."""
        return self.models / "tune_best"

    @property
    def finetune(self) -> Path:
        """Finetune checkpoints (``last.pt``) and the best epoch's ``model.pt``."""
        return self.models / "finetune"

    @property
    def model(self) -> Path:
        """The recogniser every later stage reads."""
        return self.finetune / MODEL_FILE

    @property
    def onnx(self) -> Path:
        return self.models / "model.onnx"

    # -- metrics/, reports/, plots/
    @property
    def dvc_lock(self) -> Path:
        """DVC's record of what each stage last ran on (register tags versions with it)."""
        return self.root / "dvc.lock"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / METRICS_FILES[stage]

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validation_report(self) -> Path:
        return self.reports / "validation.md"

    @property
    def evaluation_report(self) -> Path:
        return self.reports / "evaluation.md"

    @property
    def promotion_report(self) -> Path:
        return self.reports / "promotion.md"

    @property
    def comparison(self) -> Path:
        """``lafs compare``'s cells (not a DVC stage); its table is ``comparison.md`` beside it."""
        return self.reports / "comparison"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def plot_files(self) -> tuple[Path, ...]:
        return (self.plots / "roc.png", self.plots / "scores.png", self.plots / "roc.csv")

    def relative(self, path: Path) -> Path:
        """``path`` relative to the root: how tables store file paths, so a project can move."""
        return path.relative_to(self.root)

    def resolve(self, path: str | Path) -> Path:
        """A project-relative path from a params value (e.g. ``tune.out``) below this root."""
        path = Path(path)
        return path if path.is_absolute() else self.root / path


@dataclass(frozen=True)
class StageIO:
    """A ``dvc.yaml`` stage's files by :class:`Layout` attribute (``metrics`` is implied by the stage's name)."""

    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    plots: bool = False


# What each stage reads and writes besides code and params; dvc.yaml must say the same (tests/test_layout.py).
# params/best_finetune.yaml (tune.out / finetune.tuned_params) is a params value, not a Layout path.
STAGE_IO: dict[str, StageIO] = {
    "ingest": StageIO(outs=("raw", "manifest", "ingest_rejects", "ingest_skipped")),
    "landmarks": StageIO(deps=("raw", "manifest"), outs=("aligned", "landmarks", "landmark_rejects")),
    "validate": StageIO(deps=("manifest", "landmarks"), outs=("validation_report",)),
    "split": StageIO(deps=("landmarks", "manifest", "metrics:validate"), outs=("splits",)),
    "shards": StageIO(deps=("aligned", "landmarks", "splits"), outs=("shards",)),
    "landmark_net": StageIO(deps=("aligned", "landmarks", "splits"), outs=("landmark_net",)),
    "pretrain": StageIO(deps=("aligned", "splits", "shards", "landmark_net"), outs=("pretrain",)),
    "tune": StageIO(deps=("aligned", "splits", "shards", "landmark_net", "teacher"), outs=("tune_best",)),
    "finetune": StageIO(
        deps=("aligned", "splits", "shards", "landmark_net", "teacher", "tune_best"), outs=("finetune",)
    ),
    "export": StageIO(deps=("model", "splits", "aligned"), outs=("onnx",)),
    "evaluate": StageIO(
        deps=("model", "onnx", "splits", "aligned", "raw", "manifest", "landmarks"),
        outs=("evaluation_report",),
        plots=True,
    ),
    "register": StageIO(deps=("model", "onnx", "metrics:evaluate"), outs=("promotion_report",)),
}


def stage_paths(layout: Layout, stage: str) -> tuple[set[Path], set[Path]]:
    """(deps, outs incl. metrics and plots) of ``stage`` as paths below ``layout.root``."""
    io = STAGE_IO[stage]

    def path(name: str) -> Path:
        if name.startswith("metrics:"):
            return layout.metrics(name.split(":", 1)[1])
        return getattr(layout, name)

    outs = {path(n) for n in io.outs} | {layout.metrics(stage)} | (set(layout.plot_files) if io.plots else set())
    return {path(n) for n in io.deps}, outs
