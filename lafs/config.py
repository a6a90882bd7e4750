"""params.yaml -> one frozen, validated model per stage.

``params.yaml`` is the single source of defaults. An optional, untracked ``params.local.yaml`` is
deep-merged on top (``make pipeline DATA=... MODELS=...`` writes it), so a run can be pointed at other
data without editing tracked files; DVC tracks both files as params. Unknown keys and bad values raise
:class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"
OVERRIDE_FILE = "params.local.yaml"


class ConfigError(ValueError):
    """A params file is missing, malformed, or holds an unknown key / bad value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Range = tuple[float, float]


class IngestParams(Section):
    """Where the raw photographs come from and how many to take (the default run must be small)."""

    # "lfw" (scikit-learn's download), "s3://bucket/prefix", or a folder of <identity>/<image> subfolders.
    source: str = Field("lfw", min_length=1)
    s3_endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/]+")
    max_identities: int = Field(200, ge=1)
    max_images_per_identity: int = Field(8, ge=1)
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
            raise ValueError(
                f"ingest.source {source!r}: only s3:// URLs, 'lfw' or a local folder path are supported"
            )
        from PIL import Image

        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(
                f"ingest.formats: {unknown} are not PIL format names (use upper case, e.g. JPEG, PNG)"
            )
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
    chunk_size: int = Field(32, ge=1)  # images per task sent to a worker
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
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # of identities with >= 2 images (ignored with pairs_file)
    finetune_fraction: float = Field(1.0, gt=0.0, le=1.0)  # of the other identities with >= min_finetune_images
    min_finetune_images: int = Field(2, ge=1)
    # SSL on the finetune identities' images too (labels dropped), as LAFS pretrains on the set it finetunes on.
    ssl_include_finetune: bool = True
    fewshot_k: tuple[int, ...] = (1, 2, 5)  # labelled images per finetune identity, one fewshot_k<k>.csv each
    folds: int = Field(10, ge=2)  # identity-disjoint verification folds (LFW: 10)
    pairs_per_fold: int = Field(100, ge=2)  # half same, half different (LFW: 600)
    pairs_file: str | None = None  # LFW pairs.txt (or the fold-prefixed subset file): use it as the test protocol
    max_dropped_pair_fraction: float = Field(0.2, ge=0.0, le=1.0)  # official pairs whose images are missing

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
        return self


class LandmarkNetParams(Section):
    """Landmark network training: regress the extracted dense landmarks on crops like the SSL views."""

    model: str = "landmark_net_mnv3_small"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    min_lr: float = Field(1e-5, ge=0.0)
    warmup_epochs: int = Field(1, ge=0)
    weight_decay: float = Field(1e-4, ge=0.0)
    crop_scale: Range = (0.4, 1.0)  # the RandomResizedCrop range of the SSL views it will see
    flip: bool = True
    num_workers: int = Field(2, ge=0)
    seed: int = 0
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


# The `validate` section is named after its stage; as a field it shadows pydantic's deprecated v1 classmethod
# BaseModel.validate (unused here), which pydantic reports with a UserWarning at import. Only that warning is silenced.
warnings.filterwarnings("ignore", message='Field name "validate" in "Params" shadows', category=UserWarning)


class Params(BaseModel):
    """The whole params.yaml: one section per stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ingest: IngestParams = IngestParams()
    landmarks: LandmarksParams = LandmarksParams()
    validate: ValidateParams = ValidateParams()
    split: SplitParams = SplitParams()
    landmark_net: LandmarkNetParams = LandmarkNetParams()
    pretrain: SSLParams = SSLParams()


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (override wins on leaves)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


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


def load_params(
    path: str | Path = PARAMS_FILE,
    overrides: str | Path | None = OVERRIDE_FILE,
    sets: dict[str, Any] | None = None,
) -> Params:
    """Load ``path``, merge the override file (if present) and ``a.b=value`` sets, validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    data = read_yaml_mapping(path)
    sources = [str(path)]
    if overrides is not None:
        opath = path.parent / overrides if not Path(overrides).is_absolute() else Path(overrides)
        if opath.exists():
            data = deep_merge(data, read_yaml_mapping(opath))
            sources.append(str(opath))
    for key, value in (sets or {}).items():
        set_dotted(data, key, value)
    return parse_params(data, " + ".join(sources))


def resolved(params: BaseModel) -> dict[str, Any]:
    """Plain-data view of a (section of the) config, saved next to outputs and logged to MLflow."""
    return params.model_dump(mode="json")
