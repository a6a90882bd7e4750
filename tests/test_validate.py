"""Stage ``validate``: a clean table passes; each kind of defect fails, names its expectation and shows the row.

Synthetic tables use the real schemas (ingest's manifest columns, ``lafs.data.landmark_table.SCHEMA``) with faces
at the ArcFace template; one run goes through the real landmarks stage on LFW photos from ../shared.
great-expectations takes ~5 s to import, paid once by the first suite run of this module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import section_runner

from lafs.config import ConfigError, ValidateParams, parse_params
from lafs.data.landmark_table import SCHEMA
from lafs.layout import Layout
from lafs.stages.validate import ValidationError, build_checks

run = section_runner("validate")
_REL = Layout()  # the stage's files, relative to a project root
LANDMARKS, MANIFEST, METRICS, REPORT = _REL.landmarks, _REL.manifest, _REL.metrics("validate"), _REL.validation_report

# ArcFace 112x112 template: left eye, right eye, nose, left mouth, right mouth.
TEMPLATE = np.array([38.2946, 51.6963, 73.5318, 51.5014, 56.0252, 71.7366, 41.5493, 92.3655, 70.7299, 92.2041])
N_IDS, PER_ID = 24, 3
CFG = ValidateParams(min_eval_identities=20, mostly=1.0)  # one bad face in 72 must fail
Frames = tuple[pd.DataFrame, pd.DataFrame]  # (manifest, landmarks)
Mutation = Callable[[pd.DataFrame, pd.DataFrame], Frames]


def dense68(rng: np.random.Generator) -> list[float]:
    """68 points shaped like a dlib face in the aligned frame: a jaw U (some points just outside), inner points."""
    t = np.linspace(-1.0, 1.0, 17)
    jaw = np.stack([56 + 52 * t, 60 + 58 * (1 - t**2) ** 0.5 * 0.9 + 8], axis=1)  # chin at y ~ 120 (outside)
    inner = rng.uniform(25, 100, size=(51, 2))
    return np.concatenate([jaw, inner]).ravel().tolist()


def good_tables(n_ids: int = N_IDS, per_id: int = PER_ID, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    man, lmk = [], []
    for i in range(n_ids):
        name = f"Person_{i:03d}"
        for j in range(1, per_id + 1):
            path = f"data/raw/{name}/{name}_{j:04d}.jpg"
            sha = hashlib.sha256(path.encode()).hexdigest()
            man.append(
                {"path": path, "identity": name, "sha256": sha, "width": 150, "height": 150, "format": "JPEG",
                 "source_path": f"/src/{name}/{name}_{j:04d}.jpg"}
            )  # fmt: skip
            kps = TEMPLATE + rng.normal(0, 1.0, 10)
            lmk.append(
                {
                    "path": path, "identity": name, "sha256": sha,
                    "aligned_path": f"data/aligned/{name}/{name}_{j:04d}.png",
                    "num_faces": 1, "face_index": 0, "det_score": float(rng.uniform(0.7, 0.95)),
                    "bbox": [40.0, 40.0, 110.0, 120.0], "kps5": (kps * 0.6 + 40).tolist(),
                    "kps5_aligned": kps.tolist(), "dense": dense68(rng), "dense_scheme": "dlib68",
                    "detector": "scrfd_500m/det_500m.onnx", "detector_sha256": "d" * 64,
                    "landmarker_sha256": "l" * 64, "det_size": 320,
                }
            )  # fmt: skip
    return pd.DataFrame(man), pd.DataFrame(lmk)


def write_project(root: Path, manifest: pd.DataFrame, landmarks: pd.DataFrame) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), root / MANIFEST)
    fields = [SCHEMA.field(c) for c in landmarks.columns]  # the landmarks stage's own column types
    records = [{k: None if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()}
               for r in landmarks.to_dict("records")]  # fmt: skip
    table = pa.Table.from_pylist(records, schema=pa.schema(fields))
    pq.write_table(table, root / LANDMARKS)
    return root


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory):
    root = write_project(tmp_path_factory.mktemp("good"), *good_tables())
    return root, run(CFG, root)


def test_clean_tables_pass(good_run) -> None:
    root, summary = good_run
    assert pq.read_schema(root / LANDMARKS).remove_metadata() == SCHEMA  # the synthetic table is schema-true
    assert summary.success and not summary.failed
    metrics = json.loads((root / METRICS).read_text())
    n = len(build_checks(CFG))
    assert metrics["success"] is True and metrics["expectations"] == n and metrics["failed"] == 0
    assert metrics["rows"] == N_IDS * PER_ID
    assert metrics["rows_by_table"] == {"manifest": N_IDS * PER_ID, "landmarks": N_IDS * PER_ID, "identities": N_IDS}
    assert set(metrics["results"]) == {c.name for c in build_checks(CFG)} and all(metrics["results"].values())
    report = (root / REPORT).read_text()
    assert report.startswith("# Data validation: PASSED")
    assert report.count("| pass |") == n and "FAIL" not in report
    # The synthetic chin is outside the crop, as real jaw points are: the dense check tolerates it.
    assert "landmarks.dense_inside_fraction.high" in report


def _set(table: str, row: int, column: str, value: object) -> Mutation:
    def mutate(man: pd.DataFrame, lmk: pd.DataFrame) -> Frames:
        df = man if table == "manifest" else lmk
        df.at[row, column] = value
        return man, lmk

    return mutate


def _kps(row: int, fn: Callable[[np.ndarray], np.ndarray]) -> Mutation:
    def mutate(man: pd.DataFrame, lmk: pd.DataFrame) -> Frames:
        lmk.at[row, "kps5_aligned"] = fn(np.array(lmk.at[row, "kps5_aligned"])).tolist()
        return man, lmk

    return mutate


def _dense(row: int, idx: slice, value: float) -> Mutation:
    def mutate(man: pd.DataFrame, lmk: pd.DataFrame) -> Frames:
        pts = np.array(lmk.at[row, "dense"]).reshape(-1, 2)
        pts[idx] = value
        lmk.at[row, "dense"] = pts.ravel().tolist()
        return man, lmk

    return mutate


def _duplicate_sha(man: pd.DataFrame, lmk: pd.DataFrame) -> Frames:
    man.at[7, "sha256"] = man.at[6, "sha256"]
    lmk.at[7, "sha256"] = lmk.at[6, "sha256"]
    return man, lmk


def _iod(kps: np.ndarray) -> np.ndarray:
    kps[0], kps[2] = 50.0, 60.0  # eyes 10 px apart, still inside the crop
    return kps


def _nose_out(kps: np.ndarray) -> np.ndarray:
    kps[4] = 118.0
    return kps


def _few_eval_identities(man: pd.DataFrame, lmk: pd.DataFrame) -> Frames:
    keep = lmk["identity"].isin([f"Person_{i:03d}" for i in range(5)]) | lmk["path"].str.endswith("_0001.jpg")
    return man, lmk[keep]


def _not_in_manifest(man: pd.DataFrame, lmk: pd.DataFrame) -> Frames:
    return man.drop(index=[9]), lmk


DEFECTS = {
    "null identity": (_set("landmarks", 4, "identity", None), "landmarks.identity.not_null", 4),
    "null manifest identity": (_set("manifest", 5, "identity", None), "manifest.identity.not_null", 5),
    "keypoint outside the crop": (_kps(10, _nose_out), "landmarks.kps_nose_x.in_crop", 10),
    "inter-ocular out of band": (_kps(11, _iod), "landmarks.iod.in_band", 11),
    "low detection score": (_set("landmarks", 12, "det_score", 0.2), "landmarks.det_score.above_threshold", 12),
    "duplicate sha256": (_duplicate_sha, "manifest.sha256.unique", 7),
    "jaw far outside": (_dense(13, slice(0, 17), -60.0), "landmarks.dense_inside_fraction.high", 13),
    "eye point outside": (_dense(14, slice(36, 37), 130.0), "landmarks.dense_inner_outside.zero", 14),
    "truncated dense": (_set("landmarks", 15, "dense", [50.0] * 40), "landmarks.dense.complete", 15),
    "landmark row not ingested": (_not_in_manifest, "landmarks.in_manifest.true", 9),
    "too few eval identities": (_few_eval_identities, "identities.eval_usable.enough", None),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_fails_and_is_reported(defect: str, tmp_path: Path) -> None:
    mutate, check, row = DEFECTS[defect]
    man, lmk = mutate(*good_tables())
    root = write_project(tmp_path, man, lmk)
    with pytest.raises(ValidationError) as err:
        run(CFG, root)
    message = str(err.value)
    assert check in message and str(root / REPORT) in message
    metrics = json.loads((root / METRICS).read_text())
    assert metrics["success"] is False and metrics["results"][check] is False
    assert [k for k, ok in metrics["results"].items() if not ok] == [check], "one defect, one failed expectation"
    report = (root / REPORT).read_text()
    section = report.split(f"### {check}\n", 1)[1].split("\n## ", 1)[0]
    if row is None:
        assert "5 of 24 identities usable" in section and "1 img x 19" in section
    else:
        path = (man if check.startswith("manifest") else lmk).loc[row, "path"]
        assert f"| {row} | {path} |" in section, section


def test_mostly_tolerates_a_few_bad_faces(tmp_path: Path) -> None:
    man, lmk = _kps(11, _iod)(*good_tables())
    root = write_project(tmp_path, man, lmk)
    with pytest.raises(ValidationError, match=r"landmarks\.iod\.in_band"):
        run(ValidateParams(min_eval_identities=20), root)  # default mostly=0.99: 1 in 72 is too many
    summary = run(CFG.model_copy(update={"mostly": 0.95}), root)
    assert summary.success and summary.outliers == {"landmarks.iod.in_band": 1}
    assert json.loads((root / METRICS).read_text())["outliers"] == {"landmarks.iod.in_band": 1}
    report = (root / REPORT).read_text()
    tolerated = report.split("## Tolerated outliers (mostly=0.95)\n", 1)[1].split("\n## ", 1)[0]
    assert "### landmarks.iod.in_band" in tolerated and f"| 11 | {lmk.loc[11, 'path']} |" in tolerated
    assert "| pass (outliers) | `landmarks.iod.in_band` |" in report


def test_missing_column_fails_by_name(tmp_path: Path) -> None:
    man, lmk = good_tables()
    root = write_project(tmp_path, man, lmk.drop(columns=["det_score"]))
    with pytest.raises(
        ValidationError, match=r"landmarks\.det_score\.not_null.*landmarks lacks columns \['det_score'\]"
    ):
        run(CFG, root)
    assert "**landmarks lacks columns ['det_score']**" in (root / REPORT).read_text()
    root = write_project(tmp_path / "manifest", man.drop(columns=["sha256"]), lmk)
    with pytest.raises(ValidationError, match=r"manifest\.sha256\.not_null.*landmarks\.in_manifest\.true"):
        run(CFG, root)


def test_missing_input_names_the_stage_to_run(tmp_path: Path) -> None:
    man, lmk = good_tables(n_ids=2)
    root = write_project(tmp_path, man, lmk)
    (root / LANDMARKS).unlink()
    with pytest.raises(ValidationError, match=r"landmarks\.parquet not found: run `lafs landmarks`"):
        run(CFG, root)
    (root / LANDMARKS).write_bytes(b"not parquet")
    with pytest.raises(ValidationError, match="not a readable parquet file"):
        run(CFG, root)


def test_params_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"validate\.iod_px"):
        parse_params({"validate": {"iod_px": [50, 25]}})
    with pytest.raises(ConfigError, match=r"validate\.min_images_per_eval_identity"):
        parse_params({"validate": {"min_images_per_eval_identity": 1}})


def test_real_landmark_table_passes(tmp_path: Path, lfw_subset: Path, shared: Path) -> None:
    """ingest -> landmarks -> validate on 24 real LFW photos (6 identities x 4) with the staged SCRFD pack."""
    from lafs.config import IngestParams, LandmarksParams, Params
    from lafs.stages import ingest, landmarks

    people = [p for p in sorted(lfw_subset.iterdir()) if len(list(p.glob("*.jpg"))) >= 4][:6]
    source = tmp_path / "source"
    for person in people:
        (source / person.name).mkdir(parents=True)
        for photo in sorted(person.glob("*.jpg"))[:4]:
            shutil.copyfile(photo, source / person.name / photo.name)
    root = tmp_path / "project"
    ingest.run(
        Params(ingest=IngestParams(source=str(source), max_identities=6, max_images_per_identity=4)), Layout(root)
    )
    landmarks.run(Params(landmarks=LandmarksParams(models_root=str(shared / "models"), workers=1)), Layout(root))
    summary = run(ValidateParams(min_eval_identities=5), root)
    assert summary.success, (root / REPORT).read_text()
    assert summary.rows_by_table["landmarks"] >= 20
    with pytest.raises(ValidationError, match=r"identities\.eval_usable\.enough \(6 of 6 identities usable"):
        run(ValidateParams(min_eval_identities=7), root)
