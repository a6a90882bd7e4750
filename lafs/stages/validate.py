"""Stage ``validate``: a great-expectations suite over the manifest and the landmark table, before training.

Reads ``data/manifest.parquet`` (ingest) and ``data/landmarks.parquet`` (landmarks) under ``out_dir`` and
writes:

- ``reports/validation.md``: every expectation with pass/fail and its observed value, and for each failure
  (and each passing check with rows tolerated by ``validate.mostly``) up to ``validate.max_example_rows``
  offending rows (row number, path, value).
- ``metrics/validation.json``: ``success``, ``expectations``, ``failed``, ``rows`` (landmark rows),
  ``rows_by_table``, ``results`` (expectation name -> passed) and ``outliers`` (expectation name -> rows
  tolerated by ``validate.mostly``: the per-face quality checks allow a few genuine profile faces).

A failing suite writes both and then raises :class:`ValidationError` naming the failed expectations.

GX validates flat scalar columns, so list columns are flattened first (``kps5_aligned`` into
``kps_<point>_<x|y>``) and per-face quantities are derived in pandas: ``iod`` (eye distance in the aligned
frame), ``dense_inside_fraction`` (dense points within ``dense_margin_px`` of the 112 crop: jaw points
legitimately leave the tight ArcFace crop), ``dense_inner_outside`` (brow/eye/nose/mouth points outside the
crop by more than ``inner_margin_px``), ``<list>_complete`` (the list holds the right number of finite
values) and ``in_manifest`` (the row's path and sha256 are an ingested image). Identities are a third table
(one row per identity, its accepted images, and whether it has enough for verification pairs).

Expectation names are ``<table>.<column>.<check>``; they key the metrics and the report. great-expectations
is imported only inside :func:`run_suite` (its import takes about 5 s).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lafs.atomic import write_text
from lafs.config import Params, ValidateParams, resolved
from lafs.faces.align import ALIGNED_SIZE
from lafs.faces.dense import DLIB68, INSIGHTFACE106, NUM_POINTS
from lafs.layout import Layout
from lafs.stages import RunOptions, StageError, write_metrics

log = logging.getLogger(__name__)


KPS5_POINTS = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")  # kps5 order (SCRFD, ArcFace template)
# Dense points that are not the face contour (brows, eyes, nose, mouth): they must be inside the crop.
# dlib68: iBUG 300-W order, jaw 0-16. insightface 2d106det: contour 0-32.
INNER_POINTS: dict[str, range] = {DLIB68: range(17, 68), INSIGHTFACE106: range(33, 106)}

MANIFEST_COLUMNS = ("path", "identity", "sha256")
LANDMARK_KEY_COLUMNS = ("path", "identity", "sha256", "aligned_path", "det_score", "dense_scheme")
LIST_LENGTHS = {"bbox": 4, "kps5": 10, "kps5_aligned": 10}
ROW = "row"  # 0-based row number in the parquet file, shown with every example


class ValidationError(StageError):
    """The inputs are missing/unreadable, or the suite failed (the report lists the failing rows)."""


@dataclass(frozen=True)
class Check:
    """One expectation: the GX class name and its arguments, on one of the three tables."""

    name: str
    table: str
    kind: str
    kwargs: dict[str, Any]
    description: str

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")


@dataclass(frozen=True)
class CheckResult:
    check: Check
    success: bool
    observed: str
    examples: list[dict[str, Any]] = field(default_factory=list)
    unexpected_count: int = 0


@dataclass(frozen=True)
class Frames:
    """The three GX tables plus what the report needs about how they were built."""

    manifest: pd.DataFrame
    landmarks: pd.DataFrame
    identities: pd.DataFrame
    missing_columns: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self, name: str) -> pd.DataFrame:
        return {"manifest": self.manifest, "landmarks": self.landmarks, "identities": self.identities}[name]


@dataclass(frozen=True)
class ValidateSummary:
    """What ``run`` found; ``metrics()`` is written to ``metrics/validation.json``."""

    success: bool
    results: dict[str, bool]
    rows_by_table: dict[str, int]
    outliers: dict[str, int] = field(default_factory=dict)  # passing checks' tolerated rows (``mostly``)

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.results.items() if not ok]

    def metrics(self) -> dict[str, object]:
        return {
            "success": self.success,
            "expectations": len(self.results),
            "failed": len(self.failed),
            "rows": self.rows_by_table["landmarks"],
            "rows_by_table": dict(self.rows_by_table),
            "results": dict(self.results),
            "outliers": dict(self.outliers),
        }

    def describe(self) -> str:
        verdict = "passed" if self.success else f"FAILED ({', '.join(self.failed)})"
        return (
            f"validate: {len(self.results)} expectations over {self.rows_by_table['manifest']} manifest rows, "
            f"{self.rows_by_table['landmarks']} landmark rows, {self.rows_by_table['identities']} identities: {verdict}"
        )


# ------------------------------------------------------------------------------------------------ tables


def _flat(value: Any, length: int | None = None) -> np.ndarray | None:
    """A list cell as float64, or None when missing, of the wrong length (if given), or not all finite."""
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    if (length is not None and arr.size != length) or not np.isfinite(arr).all():
        return None
    return arr


def _with_columns(df: pd.DataFrame, columns: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Add absent ``columns`` as all-null, so their not-null expectations fail instead of GX raising."""
    missing = [c for c in columns if c not in df.columns]
    for c in missing:
        df[c] = None
    return df, missing


def manifest_frame(manifest: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    df, missing = _with_columns(manifest.copy(), MANIFEST_COLUMNS)
    df = df[list(MANIFEST_COLUMNS)].copy()
    df.insert(0, ROW, np.arange(len(df)))
    return df, missing


def landmark_frame(
    landmarks: pd.DataFrame, manifest: pd.DataFrame, cfg: ValidateParams
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Flatten the landmark table into scalar columns and derive the per-face quantities (module docstring);
    ``manifest`` is :func:`manifest_frame`'s output (its key columns exist, possibly all-null)."""
    df, missing = _with_columns(landmarks.copy(), (*LANDMARK_KEY_COLUMNS, *LIST_LENGTHS, "dense"))
    out = df[list(LANDMARK_KEY_COLUMNS)].copy()
    out.insert(0, ROW, np.arange(len(out)))
    out["det_score"] = pd.to_numeric(out["det_score"], errors="coerce").astype("float64")
    for column, length in LIST_LENGTHS.items():
        out[f"{column}_complete"] = [_flat(v, length) is not None for v in df[column]]
    kps = np.full((len(df), 10), np.nan)
    for i, v in enumerate(df["kps5_aligned"]):
        arr = _flat(v, 10)
        if arr is not None:
            kps[i] = arr
    for p, point in enumerate(KPS5_POINTS):
        out[f"kps_{point}_x"] = kps[:, 2 * p]
        out[f"kps_{point}_y"] = kps[:, 2 * p + 1]
    out["iod"] = np.hypot(kps[:, 0] - kps[:, 2], kps[:, 1] - kps[:, 3])

    notes: list[str] = []
    lo, hi = -cfg.dense_margin_px, ALIGNED_SIZE + cfg.dense_margin_px
    ilo, ihi = -cfg.inner_margin_px, ALIGNED_SIZE + cfg.inner_margin_px
    complete, inside, inner_out = [], [], []
    unknown: dict[str, int] = {}
    for value, scheme in zip(df["dense"], df["dense_scheme"], strict=True):
        arr = _flat(value)
        expected = NUM_POINTS.get(scheme) if isinstance(scheme, str) else None
        ok = arr is not None and arr.size >= 2 and arr.size % 2 == 0 and (expected is None or arr.size == 2 * expected)
        complete.append(ok)
        if not ok:
            inside.append(np.nan)
            inner_out.append(np.nan)
            continue
        pts = arr.reshape(-1, 2)
        inside.append(float(((pts >= lo) & (pts <= hi)).all(axis=1).mean()))
        idx = INNER_POINTS.get(scheme)
        if idx is None:
            unknown[str(scheme)] = unknown.get(str(scheme), 0) + 1
            inner_out.append(0.0)
            continue
        inner = pts[list(idx)]
        inner_out.append(float((~((inner >= ilo) & (inner <= ihi)).all(axis=1)).sum()))
    out["dense_complete"] = complete
    out["dense_inside_fraction"] = inside
    out["dense_inner_outside"] = inner_out
    for scheme, n in sorted(unknown.items()):
        notes.append(
            f"dense scheme {scheme!r} ({n} rows) has no known contour layout: its inner-point check is skipped"
        )

    known = set(zip(manifest["path"], manifest["sha256"], strict=True))
    out["in_manifest"] = [(p, s) in known for p, s in zip(out["path"], out["sha256"], strict=True)]
    return out, missing, notes


def identity_frame(landmarks: pd.DataFrame, cfg: ValidateParams) -> pd.DataFrame:
    counts = landmarks["identity"].dropna().value_counts().sort_index()
    return pd.DataFrame(
        {
            "identity": counts.index.astype(str),
            "images": counts.to_numpy(dtype=np.int64),
            "eval_usable": (counts.to_numpy() >= cfg.min_images_per_eval_identity).astype(np.int64),
        }
    )


def build_frames(manifest: pd.DataFrame, landmarks: pd.DataFrame, cfg: ValidateParams) -> Frames:
    man, man_missing = manifest_frame(manifest)
    lmk, lmk_missing, notes = landmark_frame(landmarks, man, cfg)
    missing = {name: cols for name, cols in (("manifest", man_missing), ("landmarks", lmk_missing)) if cols}
    return Frames(man, lmk, identity_frame(lmk, cfg), missing, notes)


# ---------------------------------------------------------------------------------------------- the suite


def _check(name: str, kind: str, description: str, **kwargs: Any) -> Check:
    """A check on the table named by the first part of ``name``; ``kind`` is a ``gx.expectations`` class."""
    return Check(name, name.split(".")[0], kind, kwargs, description)


def build_checks(cfg: ValidateParams) -> list[Check]:
    """Every expectation, in report order."""
    size, (lo, hi), mostly = ALIGNED_SIZE, cfg.iod_px, cfg.mostly
    rows, not_null = "ExpectTableRowCountToBeBetween", "ExpectColumnValuesToNotBeNull"
    unique, in_set, between = (
        "ExpectColumnValuesToBeUnique",
        "ExpectColumnValuesToBeInSet",
        "ExpectColumnValuesToBeBetween",
    )
    checks = [_check("manifest.rows.not_empty", rows, "the manifest lists at least one image", min_value=1)]
    checks += [_check(f"manifest.{c}.not_null", not_null, f"{c} is set", column=c) for c in MANIFEST_COLUMNS]
    checks.append(
        _check(
            "manifest.sha256.unique",
            unique,
            "no two images have the same bytes (one would leak across splits)",
            column="sha256",
        )
    )
    checks.append(_check("landmarks.rows.not_empty", rows, "at least one accepted face", min_value=1))
    checks += [_check(f"landmarks.{c}.not_null", not_null, f"{c} is set", column=c) for c in LANDMARK_KEY_COLUMNS]
    checks.append(_check("landmarks.path.unique", unique, "one row per accepted image", column="path"))
    checks.append(
        _check(
            "landmarks.in_manifest.true",
            in_set,
            "the row's (path, sha256) is an image of the manifest",
            column="in_manifest",
            value_set=[True],
        )
    )
    for column, length in {**LIST_LENGTHS, "dense": None}.items():
        what = f"{length} finite values" if length else "2K finite values (K = the scheme's point count)"
        checks.append(
            _check(
                f"landmarks.{column}.complete",
                in_set,
                f"{column} holds {what}",
                column=f"{column}_complete",
                value_set=[True],
            )
        )
    for point in KPS5_POINTS:
        for axis in "xy":
            checks.append(
                _check(
                    f"landmarks.kps_{point}_{axis}.in_crop",
                    between,
                    f"aligned {point.replace('_', ' ')} {axis} inside [0, {size})",
                    column=f"kps_{point}_{axis}",
                    min_value=0,
                    max_value=size,
                    strict_max=True,
                )
            )
    margin, inner = cfg.dense_margin_px, cfg.inner_margin_px
    checks += [
        _check(
            "landmarks.iod.in_band",
            between,
            f"inter-ocular distance in the aligned frame within [{lo:g}, {hi:g}] px (template: 35.7)",
            column="iod",
            min_value=lo,
            max_value=hi,
            mostly=mostly,
        ),
        _check(
            "landmarks.det_score.above_threshold",
            between,
            f"detection score >= {cfg.min_det_score:g}",
            column="det_score",
            min_value=cfg.min_det_score,
            max_value=1.0,
            mostly=mostly,
        ),
        _check(
            "landmarks.dense_inside_fraction.high",
            between,
            f">= {cfg.min_dense_inside_fraction:.0%} of a face's dense points inside [-{margin:g}, {size + margin:g}]",
            column="dense_inside_fraction",
            min_value=cfg.min_dense_inside_fraction,
            max_value=1.0,
            mostly=mostly,
        ),
        _check(
            "landmarks.dense_inner_outside.zero",
            between,
            f"brow, eye, nose and mouth points inside [-{inner:g}, {size + inner:g}]",
            column="dense_inner_outside",
            min_value=0,
            max_value=0,
            mostly=mostly,
        ),
        _check(
            "identities.eval_usable.enough",
            "ExpectColumnSumToBeBetween",
            f">= {cfg.min_eval_identities} identities with >= {cfg.min_images_per_eval_identity} accepted images "
            "(usable for verification pairs)",
            column="eval_usable",
            min_value=cfg.min_eval_identities,
        ),
    ]
    return checks


INDEX_COLUMNS = {"manifest": [ROW, "path"], "landmarks": [ROW, "path"], "identities": ["identity"]}


def run_suite(frames: Frames, checks: list[Check], max_examples: int = 5) -> list[CheckResult]:
    """Validate each table against its checks with an ephemeral GX context; results in ``checks`` order."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # In-memory stores without GX's temporary data-docs site (the markdown report replaces it), and no tqdm bars.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    source = context.data_sources.add_pandas("lafs")
    raw: dict[str, Any] = {}
    for table in INDEX_COLUMNS:
        mine = [c for c in checks if c.table == table]
        if not mine:
            continue
        batch_definition = source.add_dataframe_asset(name=table).add_batch_definition_whole_dataframe(table)
        # Expectations go in before the suite is added: added one by one, each would re-serialise the suite.
        expectations = [getattr(gx.expectations, c.kind)(**c.kwargs, meta={"check": c.name}) for c in mine]
        suite = context.suites.add(gx.ExpectationSuite(name=f"lafs_{table}", expectations=expectations))
        batch = batch_definition.get_batch(batch_parameters={"dataframe": frames.table(table)})
        result = batch.validate(
            suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": INDEX_COLUMNS[table]}
        )
        for r in result.results:
            raw[r.expectation_config.meta["check"]] = r
    return [_result(check, raw[check.name], frames, max_examples) for check in checks]


def _plain(value: Any) -> Any:
    """numpy scalars and NaN -> JSON/markdown-friendly Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _result(check: Check, r: Any, frames: Frames, max_examples: int) -> CheckResult:
    info = r.exception_info or {}
    if info.get("raised_exception"):
        return CheckResult(check, False, f"error: {info.get('exception_message')}")
    res = dict(r.result or {})
    index = INDEX_COLUMNS[check.table]
    examples = [  # index columns (row, path) first, then the offending value
        {k: _plain(row[k]) for k in [*(c for c in index if c in row), *(c for c in row if c not in index)]}
        for row in (res.get("unexpected_index_list") or [])
    ]
    if "observed_value" in res:
        observed = str(_plain(res["observed_value"]))
        if check.name == "identities.eval_usable.enough":
            observed = _identity_detail(frames.identities, int(float(observed)))
    else:
        total, bad = res.get("element_count", 0), res.get("unexpected_count", 0)
        observed = f"{bad} of {total} rows unexpected" + (f" ({100 * bad / total:.2f}%)" if total else "")
    return CheckResult(check, bool(r.success), observed, examples[:max_examples], int(res.get("unexpected_count") or 0))


def _identity_detail(identities: pd.DataFrame, usable: int) -> str:
    spread = identities["images"].value_counts().sort_index()
    per = ", ".join(f"{n} img x {c}" for n, c in spread.items())
    return f"{usable} of {len(identities)} identities usable (images per identity: {per or 'none'})"


# --------------------------------------------------------------------------------------------- the stage


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> ValidateSummary:
    """Validate the manifest and landmark table; write the report and metrics, then raise
    :class:`ValidationError` if any expectation failed."""
    cfg = params.validate
    manifest = read_table(layout.manifest, "lafs ingest")
    landmarks = read_table(layout.landmarks, "lafs landmarks")
    frames = build_frames(manifest, landmarks, cfg)
    results = run_suite(frames, build_checks(cfg), cfg.max_example_rows)
    summary = ValidateSummary(
        success=all(r.success for r in results),
        results={r.check.name: r.success for r in results},
        rows_by_table={
            "manifest": len(frames.manifest),
            "landmarks": len(frames.landmarks),
            "identities": len(frames.identities),
        },
        outliers={r.check.name: r.unexpected_count for r in results if r.success and r.unexpected_count},
    )
    report = layout.validation_report
    write_text(report, render_report(results, frames, cfg, summary, layout))
    write_metrics(layout.metrics("validate"), summary.metrics())
    log.info(summary.describe())
    if not summary.success:
        failed = [r for r in results if not r.success]
        listed = "; ".join(f"{r.check.name} ({r.observed}{_first_example(r)})" for r in failed)
        missing = "".join(f"; {t} lacks columns {cols}" for t, cols in frames.missing_columns.items())
        raise ValidationError(
            f"{len(failed)} of {len(results)} data expectations failed: {listed}{missing}. Example rows are in "
            f"{report}. Fix the upstream stage's input, or adjust the validate.* params if a bound is wrong."
        )
    return summary


def read_table(path: Path, producer: str) -> pd.DataFrame:
    if not path.is_file():
        raise ValidationError(f"{path} not found: run `{producer}` (or `dvc repro`) first")
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValidationError(f"{path} is not a readable parquet file ({exc}); rerun `{producer}`") from None


def _first_example(r: CheckResult) -> str:
    if not r.examples:
        return ""
    ex = r.examples[0]
    return f", e.g. {ex.get('path') or ex.get('identity') or ex}"


def _cell(value: Any) -> str:
    value = _plain(value)
    text = f"{value:.4g}" if isinstance(value, float) else "null" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_report(
    results: list[CheckResult], frames: Frames, cfg: ValidateParams, summary: ValidateSummary, layout: Layout
) -> str:
    """Markdown: verdict, inputs, failed expectations and tolerated outliers with example rows, the full table."""
    failed = [r for r in results if not r.success]
    verdict = "PASSED" if not failed else f"FAILED: {len(failed)} of {len(results)} expectations"
    lines = [
        f"# Data validation: {verdict}",
        "",
        f"great-expectations suites over `{layout.relative(layout.manifest)}` ({len(frames.manifest)} rows), "
        f"`{layout.relative(layout.landmarks)}` "
        f"({len(frames.landmarks)} rows) and its {len(frames.identities)} identities. Example rows give `row`, the "
        "0-based row number in the parquet file.",
        "",
        f"Params (`validate`): `{json.dumps(resolved(cfg), sort_keys=True)}`",
        "",
    ]
    for table, cols in frames.missing_columns.items():
        lines += [f"**{table} lacks columns {cols}** (validated as all-null).", ""]
    lines += [f"Note: {note}" for note in frames.notes]
    if frames.notes:
        lines.append("")
    tolerated = [r for r in results if r.success and r.unexpected_count]
    for title, group in (("Failed expectations", failed), (f"Tolerated outliers (mostly={cfg.mostly:g})", tolerated)):
        if group:
            lines += [f"## {title}", ""]
            for r in group:
                lines += _section(r)
    lines += ["## All expectations", "", "| result | expectation | checks | observed |", "|---|---|---|---|"]
    for r in results:
        mark = "**FAIL**" if not r.success else "pass (outliers)" if r.unexpected_count else "pass"
        lines.append(f"| {mark} | `{r.check.name}` | {_cell(r.check.description)} | {_cell(r.observed)} |")
    lines.append("")
    return "\n".join(lines)


def _section(r: CheckResult) -> list[str]:
    """One expectation's heading, what it checks, what GX observed and its example rows."""
    on = f" on `{r.check.column}`" if r.check.column else ""
    lines = [f"### {r.check.name}", "", f"{r.check.description}. `{_snake(r.check.kind)}`{on}: {r.observed}.", ""]
    if r.examples:
        cols = list(r.examples[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(ex.get(c)) for c in cols) + " |" for ex in r.examples]
        if r.unexpected_count > len(r.examples):
            lines.append(f"\n({r.unexpected_count - len(r.examples)} more rows not shown)")
        lines.append("")
    return lines


def _snake(kind: str) -> str:
    """``ExpectColumnValuesToBeBetween`` -> ``expect_column_values_to_be_between`` (GX's own type name)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in kind).lstrip("_")
