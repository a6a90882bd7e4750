"""Served model vs the ``face_recognition`` library on the same photos: embed throughput and verify latency.

Starts ``mlflow models serve`` for ``--model`` (a registered ``models:/<name>@champion``, a run URI or a saved
pyfunc folder) on 127.0.0.1 and, in one run on the same ``--photos`` shared LFW photos:

- embed: one HTTP request per photo (detection, alignment, ONNX recogniser with flip TTA), photos/s end to end,
  with ``--concurrency`` requests in flight against ``--workers`` server processes;
- verify: one HTTP request per pair (two photos), latency p50 / p95 over ``--pairs`` pairs;
- ``face_recognition`` (dlib; ``face_locations`` with its default HOG detector, then ``face_encodings`` with its
  default single jitter), photos/s on the same photos, in ``--baseline-procs`` worker processes (default 1: dlib
  runs single-threaded, as the library is used; 2 gives it the cores a 2-worker server has).

``face_recognition`` is not a project dependency: ``pip install --no-deps face-recognition`` (its dlib
requirement is met by ``dlib-bin``, which installs the same module). Its model package imports
``pkg_resources``, which setuptools >= 81 no longer ships; :func:`_import_face_recognition` gives it a stand-in
that answers the one call it makes.

    python benchmarks/serve.py --model models:/lafs-face@champion --data ../shared/data/lfw --out serve.json
"""

from __future__ import annotations

import argparse
import base64
import functools
import importlib.util
import json
import os
import platform
import sys
import time
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lafs.serving.server import mlflow_serve


def pick_photos(data: Path, n: int) -> list[Path]:
    """``n`` photos spread evenly over the sorted file list (every person is as likely as in the set)."""
    files = sorted(p for p in data.rglob("*.jpg"))
    if len(files) < n:
        raise SystemExit(f"{data} holds {len(files)} .jpg photos, fewer than --photos {n}")
    return [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]


def consecutive_pairs(photos: list[Path], n: int) -> list[tuple[Path, Path]]:
    """``n`` pairs of consecutive picked photos (alternately same and different people in LFW's sorted order)."""
    return [(photos[i], photos[i + 1]) for i in range(min(n, len(photos) - 1))]


def post(url: str, columns: list[str], row: list[str]) -> dict[str, Any]:
    body = json.dumps({"dataframe_split": {"columns": columns, "data": [row]}}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def served(
    model: str, photos: list[Path], pairs: list[tuple[Path, Path]], port: int, log: Path, workers: int, concurrency: int
) -> dict[str, Any]:
    """Embed: one request per photo, ``concurrency`` in flight; verify: one pair request at a time (latency)."""
    with mlflow_serve(model, port, log, workers=workers) as url:
        url = f"{url}/invocations"

        def embed(photo: Path) -> bool:
            try:
                post(url, ["image"], [b64(photo)])
                return True
            except urllib.error.HTTPError:
                return False  # no face: a 400, counted (it still cost a request)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(embed, photos[: 5 * concurrency]))  # warm-up: every worker's sessions and allocator
            start = time.perf_counter()
            answered = list(pool.map(embed, photos))
            embed_s = time.perf_counter() - start
        latencies = []
        for a, b in pairs:
            t = time.perf_counter()
            try:
                post(url, ["image_a", "image_b"], [b64(a), b64(b)])
            except urllib.error.HTTPError:
                continue
            latencies.append((time.perf_counter() - t) * 1000)
    return {
        "photos": len(photos),
        "workers": workers,
        "concurrency": concurrency,
        "photos_per_s": len(photos) / embed_s,
        "ms_per_photo": embed_s * 1000 / len(photos),
        "no_face_400": answered.count(False),
        "verify_pairs": len(latencies),
        "verify_p50_ms": float(np.percentile(latencies, 50)),
        "verify_p95_ms": float(np.percentile(latencies, 95)),
    }


@functools.cache  # once per process: _fr_photo calls it for every photo
def _import_face_recognition() -> Any:
    if importlib.util.find_spec("face_recognition") is None:
        raise SystemExit("face_recognition is not installed: pip install --no-deps face-recognition")
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        models_dir = Path(importlib.util.find_spec("face_recognition_models").origin).parent

        def resource_filename(package: str, name: str) -> str:
            return str(models_dir / name)

        sys.modules["pkg_resources"] = types.SimpleNamespace(resource_filename=resource_filename)
    import face_recognition

    return face_recognition


def _fr_photo(path: Path) -> bool:
    """One photo through face_recognition with its defaults; whether a face was found."""
    fr = _import_face_recognition()
    image = fr.load_image_file(path)
    boxes = fr.face_locations(image)  # defaults: HOG detector, upsample once
    fr.face_encodings(image, known_face_locations=boxes)  # defaults: 1 jitter, the 5-point ("small") model
    return bool(boxes)


def face_recognition_lib(photos: list[Path], procs: int = 1) -> dict[str, Any]:
    """face_recognition's photos/s in ``procs`` processes (1: the library as it is used, dlib single-threaded)."""
    from multiprocessing import get_context

    with get_context("spawn").Pool(procs) as pool:
        pool.map(_fr_photo, photos[: 5 * procs])  # warm-up: imports and model loading in every process
        start = time.perf_counter()
        found = pool.map(_fr_photo, photos, chunksize=4)
        seconds = time.perf_counter() - start
    return {
        "photos": len(photos),
        "processes": procs,
        "photos_per_s": len(photos) / seconds,
        "ms_per_photo": seconds * 1000 / len(photos),
        "no_face": found.count(False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="models:/<name>@champion, runs:/<id>/model or a pyfunc folder")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/lfw"))
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--port", type=int, default=5089)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the model server")
    parser.add_argument("--concurrency", type=int, default=1, help="embed requests in flight at once")
    parser.add_argument("--out", type=Path, default=Path("serve.json"))
    parser.add_argument("--skip-baseline", action="store_true", help="do not run face_recognition")
    parser.add_argument("--baseline-procs", type=int, default=1, help="face_recognition processes (1: as used)")
    args = parser.parse_args(argv)

    photos = pick_photos(args.data, args.photos)
    result: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "model": args.model,
    }
    result["served"] = served(
        args.model,
        photos,
        consecutive_pairs(photos, args.pairs),
        args.port,
        args.out.with_suffix(".server.log"),
        args.workers,
        args.concurrency,
    )
    if not args.skip_baseline:
        result["face_recognition"] = face_recognition_lib(photos, args.baseline_procs)
        result["throughput_ratio"] = result["served"]["photos_per_s"] / result["face_recognition"]["photos_per_s"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
