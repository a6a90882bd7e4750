"""Using the model on photos: the serving path (lafs.serving), ``lafs embed`` / ``lafs verify``, and the pyfunc
served over HTTP by ``mlflow models serve`` on 127.0.0.1 (real SCRFD detector, real shared photos, a tiny
exported recogniser)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BIN, free_port
from PIL import Image

from lafs import cli
from lafs.config import LandmarksParams
from lafs.eval.onnx_embedder import OnnxEmbedder
from lafs.eval.photos import FaceFinder
from lafs.serving.faces import FacePipeline, ServingConfig
from lafs.serving.pyfunc import FaceModel, save_model
from lafs.serving.server import mlflow_serve

THRESHOLD = 0.5


@pytest.fixture(scope="module")
def recogniser(tiny_model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lafs.export import export_onnx
    from lafs.models.io import load_model

    return export_onnx(load_model(tiny_model_file), tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def detector(shared: Path) -> Path:
    return shared / "models" / "scrfd_500m" / "det_500m.onnx"


@pytest.fixture(scope="module")
def pipeline(detector: Path, recogniser: Path) -> FacePipeline:
    return FacePipeline.from_files(detector, recogniser, ServingConfig(threshold=THRESHOLD), threads=1)


@pytest.fixture(scope="module")
def served(detector: Path, recogniser: Path, real_faces, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pyfunc saved as a folder, with real photos as its input example (validated by MLflow on save)."""
    return save_model(
        tmp_path_factory.mktemp("served") / "model",
        detector,
        recogniser,
        ServingConfig(threshold=THRESHOLD),
        (real_faces.files[0], real_faces.files[1]),
    )


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def grey_photo(path: Path) -> Path:
    Image.fromarray(np.full((150, 150, 3), 90, dtype=np.uint8)).save(path)
    return path


def test_pipeline_embeds_a_photo_as_evaluate_embeds_its_aligned_face(pipeline, recogniser, real_faces, shared):
    """Same detector settings, selection and alignment as the landmarks stage / evaluate's FaceFinder, then the
    same ONNX recogniser with flip-sum: the served embedding is the evaluated one."""
    finder = FaceFinder.from_params(LandmarksParams(models_root=str(shared / "models")), threads=1)
    evaluated = OnnxEmbedder(recogniser, threads=1).embed_aligned(
        np.stack([finder.find(p).aligned for p in real_faces.photos[:3]]), flip=True
    )
    for i in range(3):
        face = pipeline.embed(pipeline.decode(real_faces.files[i].read_bytes()))
        assert np.allclose(face.box, real_faces.boxes[i]) and face.det_score > 0.5
        assert float(np.dot(face.embedding, evaluated[i])) > 0.99999
        assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)


def test_pyfunc_answers_photos_and_pairs_and_refuses_bad_rows(pipeline, real_faces, tmp_path):
    model = FaceModel(pipeline)
    a, b, c = real_faces.files[0], real_faces.files[1], real_faces.files[2]  # a, b: one person; c: another
    faces = model.predict(None, pd.DataFrame({"image": [b64(a), b64(c)]}))
    assert list(faces.columns) == ["embedding", "box", "keypoints", "det_score"] and len(faces) == 2
    assert len(faces["keypoints"][0]) == 10 and len(faces["box"][0]) == 4
    pairs = model.predict(None, pd.DataFrame({"image_a": [b64(a), b64(a)], "image_b": [b64(b), b64(c)]}))
    e = np.array(faces["embedding"].tolist())
    assert pairs["score"][1] == pytest.approx(float(e[0] @ e[1]), abs=1e-6)
    assert list(pairs["same"]) == [s > THRESHOLD for s in pairs["score"]]
    mixed = model.predict(
        None, pd.DataFrame({"image": [b64(c), None], "image_a": [None, b64(a)], "image_b": [None, b64(b)]})
    )
    assert np.allclose(mixed["embedding"][0], e[1]) and mixed["score"][0] is None
    assert mixed["score"][1] == pytest.approx(pairs["score"][0], abs=1e-6) and mixed["embedding"][1] is None

    from mlflow.exceptions import MlflowException

    bad = {
        "not base64": pd.DataFrame({"image": ["@@@"]}),
        "not_image": pd.DataFrame({"image": [base64.b64encode(b"<html>").decode()]}),
        "no_face": pd.DataFrame({"image": [b64(grey_photo(tmp_path / "grey.png"))]}),
        "unknown columns": pd.DataFrame({"photo": [b64(a)]}),
        "give either": pd.DataFrame({"image": [b64(a)], "image_a": [b64(a)], "image_b": [b64(b)]}),
        "needs both": pd.DataFrame({"image_a": [b64(a), b64(a)], "image_b": [b64(b), None]}),
    }
    for reason, frame in bad.items():
        with pytest.raises(MlflowException, match=reason) as info:
            model.predict(None, frame)
        assert info.value.get_http_status_code() == 400


def test_embed_cli_writes_a_row_per_face_and_lists_every_reject(served, real_faces, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for f in real_faces.files[:3]:
        (photos / "sub" / f.name).write_bytes(f.read_bytes())
    grey_photo(photos / "grey.png")
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "emb.parquet"
    code = cli.main(
        [
            "embed",
            str(photos),
            str(tmp_path / "missing.jpg"),
            "--model",
            str(served),
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert code == 3  # three photos gave no face, each listed with its reason
    table = pd.read_parquet(out)
    assert sorted(Path(p).name for p in table["photo"]) == sorted(f.name for f in real_faces.files[:3])
    assert np.allclose(np.linalg.norm(np.array(table["embedding"].tolist()), axis=1), 1.0, atol=1e-5)
    rejects = pd.read_csv(tmp_path / "emb.rejects.csv")
    assert dict(zip(rejects["photo"].map(lambda p: Path(p).name), rejects["reason"], strict=True)) == {
        "grey.png": "no_face",
        "notes.txt": "not_image",
        "missing.jpg": "unreadable",
    }
    assert "3 faces" in capsys.readouterr().out


def test_verify_cli_exit_codes_follow_the_threshold(served, real_faces, capsys):
    a, b = str(real_faces.files[0]), str(real_faces.files[1])
    code = cli.main(["verify", a, b, "--model", str(served), "--json", "--threads", "1"])
    result = json.loads(capsys.readouterr().out)
    assert code == (0 if result["same"] else 1) and result["threshold"] == THRESHOLD
    assert result["same"] == (result["score"] > THRESHOLD)
    # a threshold just above / below the score flips the decision and the exit code
    assert cli.main(["verify", a, b, "--model", str(served), "--threshold", str(result["score"] + 1e-3)]) == 1
    assert cli.main(["verify", a, b, "--model", str(served), "--threshold", str(result["score"] - 1e-3)]) == 0
    assert cli.main(["verify", a, "/nonexistent.jpg", "--model", str(served)]) == 2
    assert "unreadable" in capsys.readouterr().err


def _post(url: str, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_photos_and_pairs_over_http(served, pipeline, real_faces, tmp_path):
    with mlflow_serve(str(served), free_port(), tmp_path / "serve.log") as url:
        a, b, c = real_faces.files[0], real_faces.files[1], real_faces.files[2]
        status, body = _post(
            f"{url}/invocations",
            {"dataframe_split": {"columns": ["image_a", "image_b"], "data": [[b64(a), b64(b)], [b64(a), b64(c)]]}},
        )
        assert status == 200
        local = FaceModel(pipeline).predict(
            None, pd.DataFrame({"image_a": [b64(a), b64(a)], "image_b": [b64(b), b64(c)]})
        )
        served_scores = [p["score"] for p in body["predictions"]]
        assert np.allclose(served_scores, local["score"], atol=1e-5)
        assert [p["same"] for p in body["predictions"]] == list(local["same"])
        status, body = _post(
            f"{url}/invocations",
            {
                "dataframe_split": {  # both shapes in one request
                    "columns": ["image", "image_a", "image_b"],
                    "data": [[b64(c), None, None], [None, b64(a), b64(b)]],
                }
            },
        )
        assert status == 200, body
        assert len(body["predictions"][0]["embedding"]) == 192 and body["predictions"][0]["score"] is None
        assert body["predictions"][1]["score"] == pytest.approx(served_scores[0], abs=1e-5)

        bad = [
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"GIF89a").decode()]]}},
            {"dataframe_split": {"columns": ["image"], "data": [[b64(grey_photo(tmp_path / "g.png"))]]}},
            {"dataframe_split": {"columns": ["image"], "data": [["A" * 14_000_000]]}},
            {"dataframe_split": {"columns": ["wrong"], "data": [[1]]}},
            {"not": "a dataframe"},
        ]
        for payload in bad:
            status, body = _post(f"{url}/invocations", payload)
            assert 400 <= status < 500, body
            assert body.get("message")
        status, body = _post(f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[b64(c)]]}})
        assert status == 200 and len(body["predictions"][0]["embedding"]) == 192  # still serving


@pytest.mark.slow
def test_serve_benchmark_measures_the_served_model(served, real_faces, tmp_path):
    """benchmarks/serve.py end to end on a few shared photos (its face_recognition side is measured in RESULTS)."""
    data = real_faces.files[0].parent.parent
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py"),
            "--model",
            str(served),
            "--data",
            str(data),
            "--photos",
            "8",
            "--pairs",
            "4",
            "--port",
            str(free_port()),
            "--out",
            str(out),
            "--skip-baseline",
            "--workers",
            "2",
            "--concurrency",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["served"]
    assert result["photos"] == 8 and result["workers"] == 2 and result["photos_per_s"] > 0
    assert result["no_face_400"] == 0 and result["verify_pairs"] >= 3
    assert 0 < result["verify_p50_ms"] <= result["verify_p95_ms"]
