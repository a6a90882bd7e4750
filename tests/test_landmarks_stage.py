"""Stage ``landmarks`` end to end on real LFW photos and the staged SCRFD pack: outputs, bad inputs rejected
with reasons, the multi-face record, incremental reuse without repeated work, and the reject threshold."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import section_runner
from PIL import Image

from lafs.config import LandmarksParams, parse_params
from lafs.data.images import load_rgb
from lafs.faces import pipeline as face_pipeline
from lafs.faces import pool as face_pool
from lafs.faces.detect import FaceDetector
from lafs.faces.pipeline import LandmarksError

run = section_runner("landmarks")

N_BASE = 12  # real photos in the first run
N_NEW = 4  # photos added for the incremental run


def _add(project: Path, identity: str, name: str, data: bytes) -> dict[str, object]:
    dest = project / "data" / "raw" / identity / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return {
        "path": f"data/raw/{identity}/{name}",
        "identity": identity,
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": 0,
        "height": 0,
        "format": "PNG" if name.endswith(".png") else "JPEG",
        "source_path": f"test:{identity}/{name}",
    }


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _write_manifest(project: Path, rows: list[dict[str, object]]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), project / "data" / "manifest.parquet")


def _cfg(shared: Path, **kw: object) -> LandmarksParams:
    return LandmarksParams(models_root=str(shared / "models"), max_reject_fraction=0.5, **kw)


@pytest.fixture(scope="module")
def sources(lfw_subset: Path, shared: Path) -> dict[str, list[Path]]:
    """Real photos: ``base`` and ``new`` for the runs, ``single`` (one detected face each) for composites."""
    files = sorted(lfw_subset.glob("*/*.jpg"))[::23]
    det = FaceDetector(shared / "models" / "scrfd_500m" / "det_500m.onnx", det_size=320)
    single = [f for f in files[N_BASE + N_NEW :] if len(det.detect(load_rgb(f))) == 1][:3]
    assert len(single) == 3
    return {"base": files[:N_BASE], "new": files[N_BASE : N_BASE + N_NEW], "single": single}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, list[Path]], shared: Path):
    """12 real photos + a flat grey image + a tiny face + a two-face composite, run with 2 worker processes."""
    project = tmp_path_factory.mktemp("project")
    rows = [_add(project, f.parent.name, f.name, f.read_bytes()) for f in sources["base"]]
    big, small, tiny = (load_rgb(f) for f in sources["single"])
    rows.append(_add(project, "Synthetic", "flat_grey.png", _png(np.full((200, 200, 3), 128, np.uint8))))
    canvas = np.full((300, 300, 3), 120, np.uint8)
    canvas[130:190, 130:190] = cv2.resize(tiny, (60, 60), interpolation=cv2.INTER_AREA)  # a ~20 px face
    rows.append(_add(project, "Synthetic", "tiny_face.png", _png(canvas)))
    two = np.full((240, 560, 3), 128, np.uint8)
    two[20:230, 0:210] = cv2.resize(big, (210, 210))  # bigger face at the left edge
    two[45:195, 205:355] = small  # smaller face at the centre
    rows.append(_add(project, "Synthetic", "two_faces.jpg", _jpeg(two)))
    _write_manifest(project, rows)
    summary = run(_cfg(shared, workers=2), project)
    return project, rows, summary


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def _table(project: Path) -> list[dict[str, object]]:
    return pq.read_table(project / "data" / "landmarks.parquet").to_pylist()


def _rejects(project: Path) -> dict[str, dict[str, str]]:
    with (project / "data" / "rejects.csv").open(newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_outputs_of_a_first_run(first_run, shared: Path) -> None:
    project, rows, summary = first_run
    detector_sha = hashlib.sha256((shared / "models" / "scrfd_500m" / "det_500m.onnx").read_bytes()).hexdigest()
    table = _table(project)
    assert summary.images == len(rows) == N_BASE + 3
    assert summary.accepted == len(table) == N_BASE + 1  # 12 photos + the two-face composite
    assert summary.processed == summary.detector_calls == len(rows) and summary.reused == 0
    assert [r["path"] for r in table] == [r["path"] for r in rows if r["path"] in {t["path"] for t in table}]
    for row in table:
        aligned = project / row["aligned_path"]
        assert row["aligned_path"].startswith("data/aligned/") and aligned.suffix == ".png"
        with Image.open(aligned) as img:
            assert img.size == (112, 112) and img.format == "PNG"
        assert len(row["bbox"]) == 4 and len(row["kps5"]) == len(row["kps5_aligned"]) == 10
        assert len(row["dense"]) == 2 * 68 and row["dense_scheme"] == "dlib68"
        assert row["detector"] == "scrfd_500m/det_500m.onnx" and row["det_size"] == 320
        assert row["detector_sha256"] == detector_sha and len(row["landmarker_sha256"]) == 64
        assert 0.5 <= row["det_score"] <= 1.0 and row["num_faces"] >= 1
    metrics = json.loads((project / "metrics" / "landmarks.json").read_text())
    assert metrics["images"] == N_BASE + 3 and metrics["rejected"] == 2
    assert metrics["rejected_by_reason"]["no_face"] == 1 and metrics["rejected_by_reason"]["face_too_small"] == 1
    assert 15 < metrics["mean_inter_ocular_px"] < 60 and metrics["mean_det_score"] > 0.6
    assert 0.85 < metrics["dense_in_crop_fraction"] <= 1.0


def test_bad_inputs_are_rejected_with_reasons(first_run) -> None:
    project, _, _ = first_run
    rejects = _rejects(project)
    assert set(rejects) == {"data/raw/Synthetic/flat_grey.png", "data/raw/Synthetic/tiny_face.png"}
    assert rejects["data/raw/Synthetic/flat_grey.png"]["reason"] == "no_face"
    tiny = rejects["data/raw/Synthetic/tiny_face.png"]
    assert tiny["reason"] == "face_too_small" and "min_face_px=32" in tiny["message"]
    assert not (project / "data" / "aligned" / "Synthetic" / "tiny_face.png").exists()


def test_two_face_photo_records_the_choice(first_run) -> None:
    project, _, _ = first_run
    row = next(r for r in _table(project) if r["path"].endswith("two_faces.jpg"))
    assert row["num_faces"] == 2
    x1, _, x2, _ = row["bbox"]
    assert 205 < (x1 + x2) / 2 < 355  # default policy "central": the smaller face in the middle
    assert row["aligned_path"] == "data/aligned/Synthetic/two_faces.png"


def test_worker_processes_match_in_process_results(first_run, shared: Path) -> None:
    project, rows, _ = first_run
    pipeline = face_pipeline.FacePipeline(_cfg(shared), face_pipeline.resolve_models(_cfg(shared)))
    by_path = {r["path"]: r for r in _table(project)}
    for i, row in enumerate(rows[:2]):
        job = face_pipeline.Job(i, row["path"], row["identity"], row["sha256"], by_path[row["path"]]["aligned_path"])
        ours = pipeline.process(job, project)
        for key in ("bbox", "kps5", "kps5_aligned", "dense"):
            np.testing.assert_allclose(ours[key], by_path[row["path"]][key], atol=1e-4)


def test_chunk_runs_in_two_passes_within_the_pixel_budget(
    first_run, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk detects every photo before its first dense-landmark call, unless the decoded photos held between
    the passes would exceed HELD_PIXELS; either way its rows are the one-photo-at-a-time ones, and a dense
    failure rejects only its own photo."""
    project, rows, _ = first_run
    by_path = {r["path"]: r for r in _table(project)}
    jobs = [
        face_pipeline.Job(i, r["path"], r["identity"], r["sha256"], by_path[r["path"]]["aligned_path"])
        for i, r in enumerate(rows[:4])
    ]
    pipeline = face_pipeline.FacePipeline(_cfg(shared), face_pipeline.resolve_models(_cfg(shared)))
    expected = {job.index: pipeline.process(job, project) for job in jobs}
    calls: list[str] = []
    detect, dense = pipeline.detector.detect, pipeline.landmarker

    def traced_detect(rgb: np.ndarray):
        calls.append("detect")
        return detect(rgb)

    def traced_dense(rgb: np.ndarray, face):
        calls.append("dense")
        if len(calls) == 6:  # two passes: the second photo's dense call
            raise RuntimeError("simulated dlib failure")
        return dense(rgb, face)

    monkeypatch.setattr(pipeline.detector, "detect", traced_detect)
    pipeline.landmarker = traced_dense
    outcomes, detector_calls = pipeline.process_chunk(jobs, project)
    assert calls == ["detect"] * 4 + ["dense"] * 4 and detector_calls == 4
    _check(outcomes, expected, failed=jobs[1].index)

    calls.clear()
    monkeypatch.setattr(face_pipeline, "HELD_PIXELS", 1)  # every photo is over the budget: one photo at a time
    outcomes, _ = pipeline.process_chunk(jobs, project)
    assert calls == ["detect", "dense"] * 4
    _check(outcomes, expected, failed=jobs[2].index)  # the sixth call is now the third photo's dense call


def _check(outcomes: list, expected: dict[int, dict], failed: int) -> None:
    """Every outcome is its photo's one-at-a-time row, except ``failed``: the simulated dlib failure."""
    assert sorted(index for index, _ in outcomes) == sorted(expected)
    for index, row in outcomes:
        if index == failed:
            assert isinstance(row, face_pipeline.Reject) and row.reason == "processing_error"
            assert "simulated dlib failure" in row.message
            continue
        for key in ("num_faces", "face_index", "det_score", "bbox", "kps5", "kps5_aligned", "dense"):
            np.testing.assert_array_equal(row[key], expected[index][key])


def test_rerun_reuses_work_and_enforces_the_reject_threshold(
    first_run, sources: dict[str, list[Path]], shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, rows, _ = first_run
    before = {r["path"]: r for r in _table(project)}
    mtimes = {p: (project / r["aligned_path"]).stat().st_mtime_ns for p, r in before.items()}
    dropped = rows[0]
    grown = rows[1:] + [_add(project, f.parent.name, f.name, f.read_bytes()) for f in sources["new"]]
    _write_manifest(project, grown)

    calls: list[int] = []
    original = FaceDetector.detect

    def counting(self: FaceDetector, rgb: np.ndarray):
        calls.append(rgb.shape[0])
        return original(self, rgb)

    monkeypatch.setattr(FaceDetector, "detect", counting)
    summary = run(_cfg(shared, workers=1), project)  # in-process, so the patched detector is the one used

    assert len(calls) == summary.detector_calls == summary.processed == N_NEW
    assert summary.reused == len(rows) - 1 and summary.images == len(grown)
    after = {r["path"]: r for r in _table(project)}
    assert dropped["path"] not in after
    assert not (project / before[dropped["path"]]["aligned_path"]).exists()
    for path, row in before.items():
        if path != dropped["path"]:
            assert after[path] == row  # reused rows are identical
            assert (project / row["aligned_path"]).stat().st_mtime_ns == mtimes[path]  # and not rewritten
    assert set(_rejects(project)) == {"data/raw/Synthetic/flat_grey.png", "data/raw/Synthetic/tiny_face.png"}

    # Nothing new: nothing runs, and a stricter reject threshold fails the stage after rewriting its outputs.
    assert run(_cfg(shared, workers=1), project).processed == 0
    (project / "data" / "rejects.csv").unlink()
    strict = _cfg(shared, workers=1).model_copy(update={"max_reject_fraction": 0.05})
    with pytest.raises(LandmarksError, match=rf"2 of {len(grown)} images rejected .*max_reject_fraction=5\.0%"):
        run(strict, project)
    assert {r["reason"] for r in _rejects(project).values()} == {"no_face", "face_too_small"}

    # Another det_size: everything runs again.
    rerun = run(_cfg(shared, workers=1, det_size=256), project)
    assert rerun.processed == len(grown) and rerun.reused == 0
    assert {r["det_size"] for r in _table(project)} == {256}


def test_missing_inputs_and_models_are_explained(tmp_path: Path, shared: Path) -> None:
    with pytest.raises(LandmarksError, match="lafs ingest"):
        run(_cfg(shared), tmp_path)
    (tmp_path / "data").mkdir()
    _write_manifest(tmp_path, [_add(tmp_path, "A", "a.jpg", b"x")])
    with pytest.raises(LandmarksError, match=r"insightface pack 'nope' not found.*models_root"):
        run(_cfg(shared, detector="nope"), tmp_path)


def test_params_section_validates() -> None:
    params = parse_params({"landmarks": {"det_size": 640, "policy": "largest", "models_root": None}})
    assert params.landmarks.det_size == 640 and params.landmarks.policy == "largest"
    assert LandmarksParams().det_size == 320 and LandmarksParams().policy == "central"
    for bad in ({"det_size": 300}, {"policy": "biggest"}, {"dense": "sift"}, {"workers": 0}, {"detector": "a/b"}):
        with pytest.raises(Exception, match="landmarks"):
            parse_params({"landmarks": bad})


@pytest.mark.parametrize(
    ("n", "size", "workers", "count"),
    [(1764, 128, 2, 14), (17640, 128, 2, 138), (257, 128, 2, 4), (256, 128, 2, 2), (10, 128, 2, 2), (5, 1, 2, 5)],
)
def test_chunks_are_even_and_a_multiple_of_the_workers(n: int, size: int, workers: int, count: int) -> None:
    """Every job once, in order; no chunk over ``size``; sizes within one of each other and (where the job count
    allows) a multiple of ``workers`` chunks, so no worker is left idle while another runs a last full chunk."""
    todo = [face_pipeline.Job(i, f"p{i}", "id", "sha", f"a{i}") for i in range(n)]
    chunks = face_pool.split_chunks(todo, size, workers)
    assert [job for chunk in chunks for job in chunk] == todo
    sizes = [len(chunk) for chunk in chunks]
    assert len(chunks) == count and max(sizes) <= size and max(sizes) - min(sizes) <= 1


def test_workers_forked_in_the_frozen_heap_do_not_collect_what_they_inherit() -> None:
    """Objects of the parent are frozen in a child forked inside ``frozen_heap`` (so the child's collector does
    not write to their pages), and collected normally again in the parent afterwards. In a fresh interpreter
    without torch, like the ``lafs landmarks`` CLI: the stage never forks from a process that has imported it."""
    code = """
import gc, multiprocessing, sys
from lafs.faces import pool
assert "torch" not in sys.modules
ctx = multiprocessing.get_context("fork")
queue = ctx.Queue()
with pool.frozen_heap():
    inside = gc.get_freeze_count()
    child = ctx.Process(target=lambda: queue.put(gc.get_freeze_count()))
    child.start()
    inherited = queue.get(timeout=60)
    child.join(timeout=60)
print(inside, inherited, child.exitcode, gc.get_freeze_count())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    inside, inherited, exitcode, after = map(int, done.stdout.split())
    # The child frees a few inherited objects before its target runs, so its count is close to, not equal to, ours.
    assert inside > 0 and inherited > inside // 2 and exitcode == 0 and after == 0
