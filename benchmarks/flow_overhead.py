"""Benchmark: what the Prefect flow costs over a bare ``dvc repro`` when nothing needs to rerun (a quiet night).

    .venv/bin/python benchmarks/flow_overhead.py [--repeats 3] [--shared ../shared]

Builds a git + DVC copy of the project (the test suite's ``copy_project``), runs the data stages once on 16
real identities (not timed), then times no-op runs side by side, alternating, ``--repeats`` times each:

- ``dvc``: ``dvc repro split`` (split and its upstream: ingest, landmarks, validate), one DVC process;
- ``flow_ephemeral``: ``python -m flows.pipeline --stage ingest ... --stage split`` with no server, as
  ``make pipeline`` runs it: Prefect starts (and stops) a temporary server inside the run;
- ``flow_server``: the same against a running Prefect server (``infra/local/services.py start prefect``),
  as a deployment's run on a worker pays it: one ``dvc repro --single-item`` + status per stage.

Prints one JSON line per variant (median / min wall seconds) and the ratios to ``dvc``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import TINY_RUN, copy_project, set_run  # noqa: E402 - the suite's project copy, not a second one

STAGES = ["ingest", "landmarks", "validate", "split"]


def run(cmd: list[str], cwd: Path | None, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    out = run(cmd, cwd, env)
    seconds = time.perf_counter() - start
    if "Running stage" in out:
        raise SystemExit(f"{' '.join(cmd)} reran a stage: the project was not up to date")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("LAFS_SHARED") or REPO.parent / "shared"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flow-overhead-") as tmp:
        root, env = copy_project(Path(tmp))
        env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        set_run(root, TINY_RUN)
        flow = [sys.executable, "-m", "flows.pipeline", *(f"--stage={s}" for s in STAGES)]
        run([*flow, f"--data={args.shared / 'data' / 'lfw_subset'}", f"--models={args.shared / 'models'}"], root, env)
        services = [sys.executable, str(REPO / "infra" / "local" / "services.py"), "--state-dir", f"{tmp}/services"]
        run([*services, "start", "prefect"], None, env)
        try:
            api = json.loads(run([*services, "env", "--json"], None, env))["PREFECT_API_URL"]
            variants = {
                "dvc": ([sys.executable, "-m", "dvc", "repro", "split"], env),
                "flow_ephemeral": (flow, env),
                "flow_server": (flow, {**env, "PREFECT_API_URL": api}),
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, (cmd, variant_env) in variants.items():
                    times[name].append(timed(cmd, root, variant_env))
        finally:
            subprocess.run([*services, "stop"], capture_output=True, env=env)
    base = statistics.median(times["dvc"])
    for name, values in times.items():
        print(
            json.dumps(
                {
                    "variant": name,
                    "stages": len(STAGES),
                    "median_s": round(statistics.median(values), 2),
                    "min_s": round(min(values), 2),
                    "runs": [round(v, 2) for v in values],
                    "ratio_to_dvc": round(statistics.median(values) / base, 2),
                    "load_1min": round(os.getloadavg()[0], 1),
                }
            )
        )


if __name__ == "__main__":
    main()
