"""params.yaml -> one frozen, validated model per stage.

``params.yaml`` is the one params file: DVC tracks its sections, and a run is pointed at other data or budgets
by setting values in it (``dvc exp run --set-param``, or ``make pipeline DATA=...`` / the Prefect flows through
:func:`lafs.params_edit.set_params`, which do the same). ``lafs <stage> --set`` overrides a value for one call
only. Unknown keys and bad values raise :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import types
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"
# Earlier versions deep-merged this untracked file over params.yaml; a leftover one is refused, never ignored.
RETIRED_OVERRIDE_FILE = "params.local.yaml"


class ConfigError(ValueError):
    """A params file is missing, malformed, or holds an unknown key / bad value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Range = tuple[float, float]
SectionT = TypeVar("SectionT", bound="Section")


class IngestParams(Section):
    """Where the raw photographs come from and how many to take (the default run must be small)."""

    # "lfw" (scikit-learn's download), "s3://bucket/prefix", or a folder of <identity>/<image> subfolders.
    source: str = Field("lfw", min_length=1)
    s3_endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/]+")
    # null = no cap (the full source); files beyond a cap are listed in data/ingest_skipped.csv, never dropped.
    max_identities: int | None = Field(200, ge=1)
    max_images_per_identity: int | None = Field(8, ge=1)  # counts accepted images, not files read
    # A preference, not a filter: identities with fewer images are used only to fill up max_identities.
    min_images_per_identity: int = Field(2, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_reject_fraction: float = Field(0.2, ge=0.0, le=1.0)
    # PIL format names accepted at ingest; anything else PIL can open (ICO, PSD, GIF, ...) is rejected.
    formats: tuple[str, ...] = Field(("JPEG", "PNG", "WEBP", "BMP", "TIFF"), min_length=1)

    @model_validator(mode="after")
    def _check_ingest(self) -> IngestParams:
        source = self.source.strip()
        if source != self.source or not source:
            raise ValueError(f"ingest.source has leading/trailing spaces or is blank: {self.source!r}")
        if source.startswith("s3://"):
            if not source[len("s3://") :].split("/")[0]:
                raise ValueError(f"ingest.source {source!r} names no bucket (expected s3://bucket/prefix)")
        elif "://" in source:
            raise ValueError(f"ingest.source {source!r}: only s3:// URLs, 'lfw' or a local folder path are supported")
        from PIL import Image

        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"ingest.formats: {unknown} are not PIL format names (use upper case, e.g. JPEG, PNG)")
        return self


class LandmarksParams(Section):
    """Face detection, 112x112 ArcFace alignment and dense landmarks (stage ``landmarks``)."""

    # insightface root holding models/<pack>/ (a folder holding <pack>/ directly also works); null = ~/.insightface
    models_root: str | None = None
    # Pack name under the root; only its detector file is loaded (scrfd_500m = the buffalo_s/sc detector).
    detector: str = Field("scrfd_500m", min_length=1, pattern=r"^[^/\\]+$")
    detector_file: str = Field("det_*.onnx", min_length=1)  # glob inside the pack; must match exactly one file
    # Detector input side: 320 finds every face of the 150 px LFW photos at ~3x the speed of 640.
    det_size: int = Field(320, ge=64, le=2048, multiple_of=32)
    det_thresh: float = Field(0.5, gt=0.0, lt=1.0)
    # Faces whose box is narrower/shorter than this (original pixels) are not upsampled into the 112 template.
    min_face_px: int = Field(32, ge=1)
    policy: Literal["central", "largest"] = "central"  # which face of a multi-face photo is kept
    dense: Literal["auto", "dlib68", "insightface106"] = "auto"  # auto: 2d106det.onnx if the pack has it
    workers: int = Field(2, ge=1)
    # Images per task sent to a worker; a task detects all of them, then runs every dense-landmark call.
    chunk_size: int = Field(128, ge=1)
    max_reject_fraction: float = Field(0.1, ge=0.0, le=1.0)


class ValidateParams(Section):
    """Data-quality gate over the manifest and the landmark table (stage ``validate``).

    Geometry is checked in the 112x112 aligned frame. Defaults come from the shared LFW photos (SCRFD 500m at
    320 px + dlib68): scores 0.65-0.98, inter-ocular 27-39 px for all but 0.5% near-profile faces (template
    35.7), chin points up to 22 px below the crop, open mouths' lower lips just past it.
    """

    min_det_score: float = Field(0.5, ge=0.0, le=1.0)  # raise above landmarks.det_thresh to be stricter
    iod_px: Range = (25.0, 50.0)  # inter-ocular distance band (aligned px); outside = a bad 5-point fit
    # A dense point counts as inside when within this margin of the crop (jaw points leave the tight crop) ...
    dense_margin_px: float = Field(16.0, ge=0.0)
    min_dense_inside_fraction: float = Field(0.9, ge=0.0, le=1.0)  # ... and this fraction of each face's must be
    inner_margin_px: float = Field(4.0, ge=0.0)  # brows/eyes/nose/mouth points: all inside up to this margin
    # Identities usable for verification (>= min_images_per_eval_identity accepted images): at least this many.
    # 20 = two per fold for split's 10 identity-disjoint folds.
    min_eval_identities: int = Field(20, ge=1)
    min_images_per_eval_identity: int = Field(2, ge=2)
    # Fraction of faces that must pass each per-face quality check (IOD, score, dense): the full shared subset has
    # 0.5% near-profile faces with IOD < 25 and an open mouth past the crop; the report lists them either way.
    mostly: float = Field(0.99, gt=0.0, le=1.0)
    max_example_rows: int = Field(5, ge=1)  # failing rows listed per expectation in reports/validation.md

    @model_validator(mode="after")
    def _check_validate(self) -> ValidateParams:
        lo, hi = self.iod_px
        if not 0.0 < lo < hi:
            raise ValueError(f"validate.iod_px must satisfy 0 < low < high (pixels), got {(lo, hi)}")
        return self


class SplitParams(Section):
    """Identity-disjoint ssl / finetune / test sets, few-shot views and verification pairs (stage ``split``)."""

    seed: int = 0
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # of identities with >= 2 images (generated pairs only)
    finetune_fraction: float = Field(1.0, gt=0.0, le=1.0)  # of the other identities with >= min_finetune_images
    min_finetune_images: int = Field(2, ge=1)
    # SSL on the finetune identities' images too (labels dropped), as LAFS pretrains on the set it finetunes on.
    ssl_include_finetune: bool = True
    fewshot_k: tuple[int, ...] = (1, 2, 5)  # labelled images per finetune identity, one fewshot_k<k>.csv each
    folds: int = Field(10, ge=2)  # verification folds (generated: identity-disjoint; lfw_view*: seeded, stratified)
    pairs_per_fold: int = Field(100, ge=2)  # half same, half different (LFW: 600)
    # generated: test identities and pairs drawn here (or pairs_file's, when set); lfw_view1: pairsDevTest.txt,
    # training on peopleDevTrain only; lfw_view2: fold view2_fold of pairs.txt, training on the other 9 folds' people.
    protocol: Literal["generated", "lfw_view1", "lfw_view2"] = "generated"
    protocol_dir: str | None = None  # folder of the LFW view files; null = where the lfw ingest source put them
    view2_fold: int = Field(1, ge=1, le=10)  # lfw_view2: the official fold (of pairs.txt / people.txt) to test on
    pairs_file: str | None = None  # protocol generated: an LFW pairs.txt (or the fold-prefixed subset file) instead
    max_dropped_pair_fraction: float = Field(0.2, ge=0.0, le=1.0)  # protocol pairs whose images are missing

    @model_validator(mode="after")
    def _check_split(self) -> SplitParams:
        bad = [k for k in self.fewshot_k if k < 1]
        if bad or len(set(self.fewshot_k)) != len(self.fewshot_k):
            raise ValueError(f"split.fewshot_k must be distinct integers >= 1, got {list(self.fewshot_k)}")
        if self.pairs_per_fold % 2:
            raise ValueError(
                f"split.pairs_per_fold must be even (half same, half different pairs), got {self.pairs_per_fold}"
            )
        if self.pairs_file is not None and not self.pairs_file.strip():
            raise ValueError("split.pairs_file is blank: give a pairs.txt path or null to generate pairs")
        if self.pairs_file is not None and self.protocol != "generated":
            raise ValueError(
                f"split.pairs_file and split.protocol={self.protocol} both name the test pairs: the LFW views read "
                "their own files from split.protocol_dir; set pairs_file: null (or protocol: generated)"
            )
        if self.protocol_dir is not None and not self.protocol_dir.strip():
            raise ValueError("split.protocol_dir is blank: give the folder of the LFW view files, or null")
        return self


class ShardsParams(Section):
    """WebDataset tar shards of the ssl and finetune sets (stage ``shards``), for loaders that stream them."""

    write: bool = False  # false: an empty index (the stage costs nothing); true: write data/shards
    samples_per_shard: int = Field(4096, ge=1)


DataSource = Literal["files", "shards"]


class LandmarkNetParams(Section):
    """Landmark network training: regress the extracted dense landmarks on crops like the SSL views."""

    model: str = "landmark_net_mnv3_small"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    min_lr: float = Field(1e-5, ge=0.0)
    warmup_epochs: int = Field(1, ge=0)
    weight_decay: float = Field(1e-4, ge=0.0)
    crop_scale: Range = (0.4, 1.0)  # the RandomResizedCrop range of the SSL views it will see
    full_view_fraction: float = Field(0.25, ge=0.0, le=1.0)  # views that are the whole face, not a crop
    flip: bool = True
    coarse_loss_weight: float = Field(0.5, ge=0.0)  # loss on the heatmap step's points, before refinement
    num_workers: int = Field(0, ge=0)
    threads: int = Field(0, ge=0)  # torch intra-op threads while training; 0 = torch's default (all cores)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)  # iterations between checkpoints (plus one at each epoch end)
    deterministic: bool = False  # deterministic kernels, pinned threads (lafs.engine.loop.deterministic_mode)
    max_nme: float = Field(0.2, gt=0.0)  # sanity gate on held-out NME (fraction of eye distance); goal: 0.05


class SSLParams(Section):
    """Self-supervised pretraining (defaults are the official LAFS recipe)."""

    method: Literal["lafs", "dino_face", "pros"] = "lafs"
    model: str = "lafs_vit_base"
    landmark_net: str = "landmark_net_mnv3_large"
    num_landmarks: int = Field(196, ge=1)
    patch_padding: Literal["zeros", "border"] = "zeros"
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    # views
    global_crops: int = Field(2, ge=2)
    local_crops: int = Field(8, ge=0)
    local_landmarks: int = Field(36, ge=1)
    landmark_jitter_px: float = Field(5.0, ge=0.0)
    global_scale: Range = (0.4, 1.0)
    local_scale: Range = (0.05, 0.4)
    local_size: int = Field(48, ge=8)
    # head and loss
    out_dim: int = Field(100_000, ge=2)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    norm_last_layer: bool = True
    student_temp: float = Field(0.1, gt=0.0)
    teacher_temp: float = Field(0.04, gt=0.0)
    warmup_teacher_temp: float = Field(0.07, gt=0.0)
    warmup_teacher_temp_epochs: int = Field(30, ge=0)
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    num_prototypes: int = Field(4096, ge=2)
    # optimisation
    epochs: int = Field(41, ge=1)
    batch_size: int = Field(82, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_epochs: int = Field(10, ge=0)
    weight_decay: float = Field(0.04, ge=0.0)
    weight_decay_end: float = Field(0.4, ge=0.0)
    momentum_teacher: float = Field(0.996, ge=0.0, le=1.0)
    clip_grad: float = Field(3.0, ge=0.0)
    freeze_last_layer: int = Field(1, ge=0)
    # auto: bf16 autocast where the hardware has bf16 matmul (CUDA, AVX512-BF16/AMX CPUs), else fp32.
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    # run: data, devices, checkpoints, tracking
    landmark_source: Literal["net", "extracted"] = "net"  # net: frozen landmark CNN (official); extracted: dense
    num_workers: int = Field(2, ge=0)
    # files: data/aligned through a sampler; shards: a ShardStream over shards_uri (null: data/shards)
    data_source: DataSource = "files"
    shards_uri: str | None = None  # a folder or s3://bucket/prefix holding index.json and the tars
    shuffle_buffer: int = Field(1000, ge=1)  # samples in each loader worker's shuffle buffer (data_source: shards)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc_per_node: int | Literal["auto"] = "auto"  # auto: one process per GPU, 1 on CPU
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str = "127.0.0.1:29500"
    deterministic: bool = False
    checkpoint_every: int = Field(50, ge=1)  # iterations between checkpoints (plus one at every epoch end)
    checkpoint_uri: str | None = None  # s3://bucket/prefix to mirror last.pt to (and resume from)
    collapse_std: float = Field(1e-5, ge=0.0)  # teacher outputs with a smaller std across the batch ...
    collapse_patience: int = Field(20, ge=1)  # ... for this many iterations in a row stop the run
    experiment: str = "lafs-pretrain"
    tracking_uri: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SSLParams:
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(self, key)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{key} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        if self.method == "lafs" and not self.model.startswith("lafs_"):
            raise ValueError(f"method 'lafs' needs a landmark model (lafs_vit_*), got model={self.model!r}")
        if self.method == "dino_face" and not self.model.startswith("dino_"):
            raise ValueError(f"method 'dino_face' needs a grid model (dino_vit_*), got model={self.model!r}")
        return self


class FinetuneParams(Section):
    """Supervised recognition finetuning of the pretrained backbone (defaults: the official recipe,
    lafs_method.md section 4, with its layer-decay quirk fixed and the landmark regulariser on, section 8)."""

    # pretrained: ViT weights from the SSL teacher (models/pretrain/teacher_backbone.pt); scratch: random ViT
    # (the no-pretraining baseline). Both start their landmark net from models/landmark_net.pt.
    init: Literal["pretrained", "scratch"] = "pretrained"
    model: str = "lafs_vit_base"  # must equal the teacher's registry name (checked); dino_vit_* has no landmark net
    landmark_net: str = "landmark_net_mnv3_large"  # must equal models/landmark_net.pt's model (checked)
    num_landmarks: int = Field(196, ge=1)  # must equal the teacher's and the landmark net's K (checked)
    patch_padding: Literal["zeros", "border"] = "zeros"  # must equal the teacher's (checked)
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)  # official: 0.1 (hard-coded Residual_droppath)
    # recognition embedding: cls = the cls token (official); tokens = every output token flattened in landmark
    # order -> Dropout -> Linear -> BatchNorm (lafs.models.vit.FaceViT), embedding_dim wide (null = ViT width)
    embedding: Literal["cls", "tokens"] = "cls"
    embedding_dim: int | None = Field(None, ge=1)
    embedding_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # margin head; official: CosFace s=64 m=0.4 (ArcFace: m=0.5 is insightface's usual value)
    head: Literal["cosface", "arcface"] = "cosface"
    s: float = Field(64.0, gt=0.0)
    m: float = Field(0.4, ge=0.0, lt=1.5)
    # Multiplier on the official regulariser schedule (1000/100/1/0.11/0 over 34 epochs, stretched to `epochs`);
    # 0 = off and no frozen landmark net. official: off (pre_land/keep_land hard-coded False); ours: on (section 8)
    reg_weight: float = Field(1.0, ge=0.0)
    # Train the landmark net with the recogniser (official) or keep it frozen as it came out of the landmark_net
    # stage (no regulariser then): on a 2-core CPU that halves a small recogniser's training step (RESULTS.md).
    train_landmark_net: bool = True
    # optimisation
    epochs: int = Field(34, ge=1)
    batch_size: int = Field(200, ge=1)  # official: 200 per GPU x 2 GPUs x 3 accumulation steps
    lr: float = Field(2.29e-3, gt=0.0)  # peak; official: --lr 1e-3 rescaled to ~2.29e-3 (train_largescale.py:472)
    min_lr: float = Field(1e-6, ge=0.0)  # cosine floor; official: 1e-6
    warmup_epochs: int = Field(5, ge=0)  # linear warmup; official: 5
    weight_decay: float = Field(0.1, ge=0.0)  # AdamW, not on biases / norms / embeddings; official: 0.1 (hard-coded)
    landmark_weight_decay: float = Field(0.05, ge=0.0)  # the landmark net's weights; official: 0.05 ('stn*')
    layer_decay: float = Field(0.58, gt=0.0, le=1.0)  # lr x layer_decay^(depth+1-layer); official: 0.58, never applied
    clip_grad: float = Field(0.0, ge=0.0)  # per-parameter gradient-norm clip, 0 = off
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast only where bf16 matmul is native
    # augmentation: random mirror + mild random resized crop; official: also RandAugment m1 and mixup 0.1 (not here)
    flip: bool = True
    crop_scale: Range = (0.8, 1.0)
    # data: train on finetune.csv, or on fewshot_k<k>.csv (k labelled images per identity)
    fewshot_k: int | None = Field(None, ge=1)
    # validation: finetune identities held out from training (never the test identities), verification pairs
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    val_folds: int = Field(10, ge=2)  # identity-disjoint folds for k-fold accuracy (fewer if too few identities)
    val_pairs_per_fold: int = Field(100, ge=2)
    # early stopping on validation accuracy: stop after `patience` epochs without a gain > min_delta; null = off
    # (official: none, 34 epochs)
    patience: int | None = Field(None, ge=1)
    min_delta: float = Field(0.0, ge=0.0)
    # run
    seed: int = 0
    num_workers: int = Field(2, ge=0)
    # files: data/aligned through a sampler; shards: a ShardStream over shards_uri (null: data/shards)
    data_source: DataSource = "files"
    shards_uri: str | None = None  # a folder or s3://bucket/prefix holding index.json and the tars
    shuffle_buffer: int = Field(1000, ge=1)  # samples in each loader worker's shuffle buffer (data_source: shards)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(50, ge=1)  # iterations between checkpoints (plus one at every epoch end)
    deterministic: bool = False  # deterministic kernels, pinned threads (lafs.engine.loop.deterministic_mode)
    experiment: str = "lafs-finetune"
    tracking_uri: str | None = None
    # Written by the tune stage (flat mapping of these keys, relative to the project root); overlays this section
    tuned_params: str | None = "params/best_finetune.yaml"

    @model_validator(mode="after")
    def _check_finetune(self) -> FinetuneParams:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"finetune.crop_scale must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"finetune.warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        if self.val_pairs_per_fold % 2:
            raise ValueError(
                f"finetune.val_pairs_per_fold must be even (half same pairs), got {self.val_pairs_per_fold}"
            )
        return self


class GateMetric(Section):
    """A secondary metric the promotion gate guards: how far the challenger may fall behind the champion."""

    tolerance: float = Field(0.0, ge=0.0)  # largest allowed regression, in the metric's own units
    higher_is_better: bool = True  # false for error rates (EER, FAR) and latencies


class RegisterParams(Section):
    """MLflow Model Registry: register the evaluated model, then gate its promotion to ``champion``."""

    # Registered model name (MLflow: letters, digits, '_', '-', '.').
    model_name: str = Field("lafs-face", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # Dotted key into metrics/eval.json that decides promotion.
    primary_metric: str = Field("verification.accuracy_mean", min_length=1)
    primary_higher_is_better: bool = True
    # The challenger must beat the champion's primary metric by at least this much (ties never promote).
    min_gain: float = Field(0.0, ge=0.0)
    # Dotted keys that may not regress by more than their tolerance, even when the primary metric improves.
    secondary_metrics: dict[str, GateMetric] = {"verification.eer": GateMetric(tolerance=0.01, higher_is_better=False)}
    experiment: str = Field("lafs-register", min_length=1)  # MLflow experiment of the registration runs
    tracking_uri: str | None = None  # null = $MLFLOW_TRACKING_URI or a local sqlite store (lafs.tracking)
    register_onnx: bool = True  # log models/model.onnx as an artifact of the registration run
    # MLflow loads the logged model back and runs its input example (a model that cannot be served fails here,
    # not in production); costs one model load per registration.
    validate_serving_input: bool = True
    # dvc.lock stages whose dependency / params hashes are tagged on the model version (its lineage).
    lineage_stages: tuple[str, ...] = ("tune", "finetune", "export", "evaluate")
    # Never promote (not even a first model) unless the primary accuracy beats the best non-learned floor scored
    # in the same evaluation (eval.json margin_over_floor) by more than this; null = no absolute floor.
    min_margin_over_floor: float | None = 0.0
    # Refuse to compare with a champion scored on other test pairs / photos / protocol (eval.json test_set and
    # protocol hashes, tagged on every version); false compares metrics whatever they were measured on.
    require_same_test_set: bool = True
    # Versions registered from a git tree with uncommitted tracked changes, or whose model / eval files are not
    # the ones dvc.lock records, are tagged and, unless these are true, never promoted.
    allow_dirty: bool = False
    allow_unlocked: bool = False

    @model_validator(mode="after")
    def _check_register(self) -> RegisterParams:
        if self.primary_metric in self.secondary_metrics:
            raise ValueError(
                f"register.secondary_metrics repeats the primary metric {self.primary_metric!r}; "
                "remove it there (min_gain already governs it)"
            )
        return self


Choice = bool | int | float | str | None  # what Optuna's suggest_categorical can store


class SearchDim(Section):
    """One tuned finetune param: a numeric range (``low``..``high``, optionally ``log`` or ``step``) or ``choices``.

    Integer or float sampling follows the finetune param's own type (``epochs`` is sampled as an int).
    """

    low: float | None = None
    high: float | None = None
    log: bool = False  # sample uniformly in log space (learning rates, weight decay)
    step: float | None = Field(None, gt=0.0)  # discretise the range (not with log)
    choices: tuple[Choice, ...] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check_dim(self) -> SearchDim:
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError("give either choices or low/high (with log/step), not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices (a list)")
        if not self.low < self.high:
            raise ValueError(
                f"low must be < high, got {self.low} .. {self.high} (a fixed value belongs in the "
                "finetune section, not the search space)"
            )
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna samples one or the other)")
        return self


class TPESamplerParams(Section):
    """Optuna's TPE sampler. Each trial's draws are seeded by (seed, trial number), so parallel workers differ
    and a resumed study proposes what an uninterrupted one would have, given the same history."""

    seed: int = 0
    n_startup_trials: int = Field(5, ge=0)  # random trials before TPE starts modelling the history
    constant_liar: bool = True  # parallel workers: count running trials as bad so workers explore apart


class PrunerParams(Section):
    """Stops a trial whose validation accuracy after an epoch trails the other trials' (median, hyperband) or a
    floor (threshold): Optuna pruners."""

    name: Literal["median", "hyperband", "threshold", "none"] = "median"
    n_startup_trials: int = Field(3, ge=0)  # median: trials that must finish before any is pruned
    n_warmup_steps: int = Field(1, ge=0)  # median, threshold: epochs every trial runs before it may be pruned
    lower: float = 0.5  # threshold: prune below this validation accuracy (0.5 = chance on balanced pairs)
    min_resource: int = Field(1, ge=1)  # hyperband: epochs of the most aggressive bracket
    max_resource: int | Literal["auto"] = "auto"  # hyperband: epochs of a full trial (auto: the first trial's)
    reduction_factor: int = Field(3, ge=2)  # hyperband: 1 in reduction_factor trials survives each rung


def _default_search_space() -> dict[str, SearchDim]:
    return {
        "lr": SearchDim(low=1e-4, high=1e-2, log=True),
        "layer_decay": SearchDim(low=0.4, high=1.0),
        "weight_decay": SearchDim(low=0.01, high=0.3, log=True),
        "m": SearchDim(low=0.2, high=0.5),
    }


class TuneParams(Section):
    """Optuna search over the finetune params (stage ``tune``): every trial is one finetune run, logged as an
    MLflow child run of one parent run per study."""

    # Trials the study ends with (completed + pruned + failed), counted across resumes and parallel workers.
    n_trials: int = Field(20, ge=1)
    timeout_s: float | None = Field(None, gt=0.0)  # per `lafs tune` process: no trial starts after it; null = none
    direction: Literal["maximize"] = "maximize"  # the objective is finetune's best validation accuracy
    sampler: TPESamplerParams = TPESamplerParams()
    pruner: PrunerParams = PrunerParams()
    # finetune param name -> {low, high, log, step} or {choices}; the values overlay the finetune section per trial.
    search_space: dict[str, SearchDim] = Field(default_factory=_default_search_space, min_length=1)
    # Optuna RDB URL (sqlite:///..., postgresql+psycopg://user:${OPTUNA_DB_PASSWORD}@host/db: $VARS are expanded);
    # null = sqlite under the study dir (models/tune/optuna.db). Relative sqlite paths are taken from the project
    # root. Passwords are never logged.
    storage: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9+]*://")
    # null = "finetune-<hash of the search/finetune params and inputs>": a params change starts a new study.
    study_name: str | None = Field(None, min_length=1)
    heartbeat_s: int = Field(30, ge=1)  # a worker killed mid-trial is noticed ~2x this later; its trial reruns
    max_retry: int = Field(1, ge=0)  # reruns of a trial whose worker died (0 = none)
    experiment: str = Field("lafs-tune", min_length=1)  # MLflow experiment of the parent run and the trial runs
    tracking_uri: str | None = None  # MLflow tracking URI; null = $MLFLOW_TRACKING_URI or a local sqlite store
    out: str = Field("params/best_finetune.yaml", min_length=1)  # the best trial's params (finetune.tuned_params)
    # Trials the new study runs first, before any sampling: a baseline or known-good settings ({lr: 0.001, ...});
    # keys from search_space, values inside its ranges / choices; keys left out are sampled.
    enqueue: tuple[dict[str, Choice], ...] = ()
    # Finetune params every trial runs with, over the finetune section (e.g. {epochs: 2}): a cheaper, lower-
    # fidelity trial than the final finetune; searched params cannot be fixed here.
    trial_overrides: dict[str, Choice] = Field(default_factory=dict)
    # Stop each trial after this many epochs of its own schedule (truncated, not compressed: the LR schedule is
    # the final finetune's, so early epochs rank settings as the full run will); null = run every epoch.
    trial_epochs: int | None = Field(None, ge=1)

    @field_validator("search_space")
    @classmethod
    def _check_search_space(cls, space: dict[str, SearchDim]) -> dict[str, SearchDim]:
        for name, dim in space.items():
            _check_search_dim(name, dim)
        return space

    @model_validator(mode="after")
    def _check_enqueue(self) -> TuneParams:
        for name in self.trial_overrides:
            if name not in FinetuneParams.model_fields:
                raise ValueError(f"trial_overrides.{name}: not a finetune param")
            if name in self.search_space:
                raise ValueError(f"trial_overrides.{name}: searched in search_space, cannot also be fixed")
        for n, trial in enumerate(self.enqueue):
            for name, value in trial.items():
                dim = self.search_space.get(name)
                if dim is None:
                    raise ValueError(
                        f"enqueue[{n}].{name}: not in search_space (only searched params "
                        "can be enqueued; set fixed values in the finetune section)"
                    )
                inside = (
                    value in dim.choices
                    if dim.choices is not None
                    else isinstance(value, int | float) and not isinstance(value, bool) and dim.low <= value <= dim.high
                )
                if not inside:
                    allowed = list(dim.choices) if dim.choices is not None else f"{dim.low} .. {dim.high}"
                    raise ValueError(f"enqueue[{n}].{name}: {value!r} is outside the search space ({allowed})")
        return self


def search_kind(name: str) -> type | None:
    """``int`` or ``float`` for a numeric finetune param (how a range is sampled), else None (choices only)."""
    annotation = FinetuneParams.model_fields[name].annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = {a for a in (typing.get_args(annotation) if union else (annotation,)) if a is not type(None)}
    if kinds == {int}:
        return int
    return float if kinds and kinds <= {int, float} else None


def _check_search_dim(name: str, dim: SearchDim) -> None:
    """A tuned key must be a finetune param, and its bounds / choices values that param accepts on its own
    (cross-field rules, e.g. warmup_epochs < epochs, can only be checked per trial)."""
    fields = FinetuneParams.model_fields
    if name not in fields:
        raise ValueError(f"{name!r} is not a finetune param (known: {', '.join(sorted(fields))})")
    field, kind = fields[name], search_kind(name)
    if dim.choices is not None:
        values: tuple[Any, ...] = dim.choices
    elif kind is None:
        raise ValueError(f"{name}: finetune.{name} is not numeric ({field.annotation}); use choices")
    else:
        bounds = (dim.low, dim.high, dim.step or 1)
        if kind is int and not all(float(v).is_integer() for v in bounds):
            raise ValueError(f"{name}: finetune.{name} is an integer; low/high/step must be integers")
        values = tuple(int(v) if kind is int else v for v in (dim.low, dim.high))
    accepts = TypeAdapter(typing.Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)
    for value in values:
        try:
            accepts.validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"{name}: {value!r} is not a valid finetune.{name} ({exc.errors()[0]['msg']})") from None


class ExportParams(Section):
    """ONNX export of the finetuned model and its parity check against PyTorch (stage ``export``)."""

    opset: int = Field(17, ge=14)  # ONNX opset; >= 14 for scaled_dot_product_attention, >= 16 for GridSample
    min_cosine: float = Field(0.9999, gt=0.0, le=1.0)  # fail when any parity face's PyTorch/ONNX cosine is lower
    parity_images: int = Field(32, ge=1)  # real aligned faces (first rows of data/splits/test.csv) compared


class EvaluateParams(Section):
    """Verification, few-shot identification and end-to-end latency (stage ``evaluate`` and ``lafs evaluate``)."""

    flip: bool = True  # flip-sum TTA (embedding + embedding of the mirror image), insightface's LFW protocol
    batch_size: int = Field(64, ge=1)  # faces per forward pass (accuracy passes; latency runs one photo at a time)
    # "split": data/splits/pairs.csv on the aligned test faces; or an LFW pairs file (official or fold-prefixed)
    # whose photos are read from images_root and detected + aligned here.
    pairs: str = Field("split", min_length=1)
    images_root: str | None = None  # folder of <Identity>/<Identity>_NNNN.<ext> photos for a pairs file
    # A photo where the detector finds no usable face: "centre_crop" = the mean LFW face position (counted),
    # "wrong" = every pair holding it is scored as an error.
    missed_faces: Literal["centre_crop", "wrong"] = "centre_crop"
    fewshot_k: tuple[int, ...] = (1, 2, 5)  # gallery images per test identity (the rest are queries)
    fewshot_seed: int = 0  # seeds which images form each gallery
    threads: int = Field(0, ge=0)  # cores of the accuracy passes: ONNX Runtime threads, dlib processes (0 = all)
    # Latency: detect + align + embed per photo on the CPU, one photo at a time, threads pinned.
    # Models timed and scored: the exported and PyTorch model, the dlib reference, the non-learned floors.
    candidates: tuple[Literal["onnx", "torch", "dlib_resnet", "pixels", "hog"], ...] = ("onnx", "torch")
    # Beside the model, on the same faces, pairs and folds: the non-learned floors it must beat and the
    # reference ceiling (dlib's ResNet, ~99% on LFW; null skips it: dlib is by far the slowest embedder here).
    floors: tuple[Literal["pixels", "hog"], ...] = ("pixels", "hog")
    ceiling: Literal["dlib_resnet"] | None = "dlib_resnet"
    # flip-sum TTA for the ceiling too: dlib's published protocol has none, and it doubles dlib's ~85 ms per face
    ceiling_flip: bool = False
    latency_images: int = Field(50, ge=1)  # timed photos (data/manifest.parquet order) per candidate ...
    latency_warmup: int = Field(5, ge=0)  # ... after this many untimed ones
    latency_threads: int = Field(1, ge=1)  # torch / ONNX Runtime / OpenCV threads while timing
    latency_budgets_ms: tuple[float, ...] = (100.0, 500.0, 1000.0)  # FRUITS-style per-image budgets
    latency_criterion: Literal["p50", "p95"] = "p95"  # which percentile must fit the budget
    experiment: str = Field("lafs-evaluate", min_length=1)  # MLflow experiment
    tracking_uri: str | None = None  # MLflow tracking URI; null = $MLFLOW_TRACKING_URI or a local sqlite store

    @model_validator(mode="after")
    def _check_evaluate(self) -> EvaluateParams:
        if self.pairs != "split" and not self.images_root:
            raise ValueError(
                f"evaluate.pairs is a pairs file ({self.pairs!r}): set evaluate.images_root to the "
                "folder of its <Identity>/<Identity>_NNNN photos"
            )
        if any(k < 1 for k in self.fewshot_k) or len(set(self.fewshot_k)) != len(self.fewshot_k):
            raise ValueError(f"evaluate.fewshot_k must be distinct integers >= 1, got {list(self.fewshot_k)}")
        budgets = self.latency_budgets_ms
        if any(b <= 0 for b in budgets) or len(set(budgets)) != len(budgets):
            raise ValueError(f"evaluate.latency_budgets_ms must be distinct positive numbers, got {list(budgets)}")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"evaluate.candidates lists a model twice: {list(self.candidates)}")
        if len(set(self.floors)) != len(self.floors):
            raise ValueError(f"evaluate.floors lists a floor twice: {list(self.floors)}")
        return self


class CompareParams(Section):
    """``lafs compare`` (not a DVC stage): scratch vs DINO-face vs LAFS pretraining, each finetuned on the full
    finetune set and on few-shot views, at EQUAL budgets (same model size, epochs, batch, hence steps per data
    column; no early stopping, no tuned params). The rest comes from the pretrain and finetune sections."""

    inits: tuple[Literal["scratch", "dino_face", "lafs"], ...] = Field(("scratch", "dino_face", "lafs"), min_length=1)
    fewshot_k: tuple[int, ...] = (1, 2, 5)  # few-shot columns besides the full data; each must be in split.fewshot_k
    size: Literal["tiny", "mini", "small", "base"] = "mini"  # every cell: lafs_vit_<size> / dino_vit_<size>
    pretrain_epochs: int = Field(2, ge=1)
    pretrain_batch_size: int = Field(64, ge=1)
    finetune_epochs: int = Field(6, ge=1)
    finetune_batch_size: int = Field(64, ge=1)
    seed: int = 0  # one seed for every cell's init, data order and augmentation
    experiment: str = "lafs-compare"  # the MLflow parent run and its children (pretraining and cells)
    tracking_uri: str | None = None

    @model_validator(mode="after")
    def _check_compare(self) -> CompareParams:
        if len(set(self.inits)) != len(self.inits) or len(set(self.fewshot_k)) != len(self.fewshot_k):
            raise ValueError(
                f"compare.inits / fewshot_k must not repeat, got {list(self.inits)} / {list(self.fewshot_k)}"
            )
        if any(k < 1 for k in self.fewshot_k):
            raise ValueError(f"compare.fewshot_k must be >= 1, got {list(self.fewshot_k)}")
        return self


# The `validate` section is named after its stage; as a field it shadows pydantic's deprecated v1 classmethod
# BaseModel.validate (unused here), which pydantic reports with a UserWarning at import. Only that warning is silenced.
warnings.filterwarnings("ignore", message='Field name "validate" in "Params" shadows', category=UserWarning)
# Likewise `register` shadows ABCMeta.register (pydantic's metaclass); instances still see the field.
warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows', category=UserWarning)


class Params(BaseModel):
    """The whole params.yaml: one section per stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ingest: IngestParams = IngestParams()
    landmarks: LandmarksParams = LandmarksParams()
    validate: ValidateParams = ValidateParams()
    split: SplitParams = SplitParams()
    shards: ShardsParams = ShardsParams()
    landmark_net: LandmarkNetParams = LandmarkNetParams()
    pretrain: SSLParams = SSLParams()
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    tune: TuneParams = TuneParams()
    register: RegisterParams = RegisterParams()
    finetune: FinetuneParams = FinetuneParams()
    compare: CompareParams = CompareParams()


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c=value`` in a nested dict (CLI / Prefect overrides)."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def read_yaml_mapping(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """A params-style YAML mapping; ``{}`` for an empty file (or a missing one when ``missing_ok``)."""
    if missing_ok and not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix it (an override file may be deleted)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key (check the spelling or remove it)" if err["type"] == "extra_forbidden" else err["msg"]
        shown = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any], source: str = "<dict>") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def update_section(section: SectionT, updates: Mapping[str, Any], source: str) -> SectionT:
    """``section`` with a flat mapping of its keys overlaid (e.g. tuned params), validated like params.yaml:
    an unknown key or a bad value raises :class:`ConfigError` naming the key and ``source``."""
    try:
        return type(section).model_validate({**section.model_dump(), **updates})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_params(path: str | Path = PARAMS_FILE, sets: dict[str, Any] | None = None) -> Params:
    """Load ``path`` with ``a.b=value`` sets applied (this call only), validated."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    retired = path.parent / RETIRED_OVERRIDE_FILE
    if retired.exists():
        raise ConfigError(
            f"{retired} is no longer read: set its values in {path.name} (`lafs set-params --set "
            "key=value` or `dvc exp run --set-param key=value`) and delete it"
        )
    data = read_yaml_mapping(path)
    for key, value in (sets or {}).items():
        set_dotted(data, key, value)
    return parse_params(data, str(path))


def resolved(params: BaseModel) -> dict[str, Any]:
    """Plain-data view of a (section of the) config, saved next to outputs and logged to MLflow."""
    return params.model_dump(mode="json")
