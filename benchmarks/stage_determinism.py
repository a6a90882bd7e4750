"""Are two runs of ``lafs pretrain`` bit-identical, and is a SIGKILLed + resumed run identical to both? (issue #16)

On a project that holds pretrain's inputs (``--root``; e.g. the shared LFW subset after ingest -> landmarks ->
split -> landmark_net), each mode runs the real stage command (``python -m lafs pretrain``) in its own root whose
``data/`` and landmark net link to the project's: two uninterrupted runs, and with ``--kill-at`` a third one that
is SIGKILLed once its checkpoint reaches that iteration and then rerun to the end. Every tensor of the final
``last.pt`` (student, teacher, optimizer moments, DINO centre, ...) is compared across the runs: the largest
absolute difference and whether all are equal to the bit.

    python benchmarks/stage_determinism.py --root /path/to/project --out stage_determinism.json \
        --set pretrain.checkpoint_every=5 --kill-at 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lafs.engine.checkpoint import load_checkpoint
from lafs.layout import Layout

MODES = {"deterministic": "true", "default": "false"}


def tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint state, keyed by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list | tuple) else ()
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}"))
    return out


def difference(a: Path, b: Path) -> dict[str, Any]:
    """Largest absolute difference over the tensors two checkpoints share, and whether every one is bit-equal."""
    ta, tb = tensors(load_checkpoint(a)), tensors(load_checkpoint(b))
    if ta.keys() != tb.keys():
        return {"same_keys": False, "only_in_first": sorted(ta.keys() - tb.keys())[:5]}
    worst, where, unequal = 0.0, "", 0
    for key, x in ta.items():
        y = tb[key]
        if x.shape != y.shape or not torch.equal(x, y):
            unequal += 1
            d = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else float("inf")
            if d > worst:
                worst, where = d, key
    return {
        "tensors": len(ta),
        "unequal": unequal,
        "max_abs_diff": worst,
        "worst_tensor": where,
        "identical": not unequal,
    }


def run_root(project: Path, runs: Path, name: str) -> Path:
    """A fresh project root for one run: its own models/ and metrics/, the project's data and landmark net."""
    root = runs / name
    (root / "models").mkdir(parents=True)
    (root / "data").symlink_to((project / "data").resolve())
    (root / "models" / "landmark_net.pt").symlink_to((project / "models" / "landmark_net.pt").resolve())
    return root


def command(root: Path, params: Path, sets: list[str]) -> list[str]:
    flags = [x for s in sets for x in ("--set", s)]
    return [sys.executable, "-m", "lafs", "pretrain", "--root", str(root), "--params", str(params), *flags]


def killed_and_resumed(cmd: list[str], last: Path, kill_at: int, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``, SIGKILL it once ``last`` holds iteration >= ``kill_at``, rerun it to the end."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (last.exists() and load_checkpoint(last)["iteration"] >= kill_at):
        time.sleep(0.5)
    if proc.poll() is not None:
        raise SystemExit(f"the run ended (exit {proc.returncode}) before iteration {kill_at}: lower --kill-at")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["iteration"]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return {"killed_at_iteration": killed_at, "final_iteration": load_checkpoint(last)["iteration"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="project with pretrain's inputs")
    parser.add_argument("--runs", type=Path, default=None, help="where the run roots go (default: <root>/determinism)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--modes", default="deterministic,default", help=f"comma-separated of {sorted(MODES)}")
    parser.add_argument("--kill-at", type=int, default=0, help="also a SIGKILLed + resumed run (0: no)")
    parser.add_argument("--out", type=Path, default=Path("stage_determinism.json"))
    args = parser.parse_args(argv)
    runs = args.runs or args.root / "determinism"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{runs / 'mlflow.db'}"}
    runs.mkdir(parents=True, exist_ok=False)
    result: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "sets": args.sets, "modes": {}}
    for mode in args.modes.split(","):
        sets = [*args.sets, f"pretrain.deterministic={MODES[mode]}"]
        lasts, seconds = [], []
        for name in ("a", "b"):
            root = run_root(args.root, runs, f"{mode}-{name}")
            start = time.perf_counter()
            subprocess.run(command(root, args.params, sets), env=env, check=True, stdout=subprocess.DEVNULL)
            seconds.append(round(time.perf_counter() - start, 1))
            lasts.append(Layout(root).pretrain / "last.pt")
        entry: dict[str, Any] = {"seconds": seconds, "a_vs_b": difference(*lasts)}
        if args.kill_at:
            root = run_root(args.root, runs, f"{mode}-killed")
            last = Layout(root).pretrain / "last.pt"
            entry["killed"] = killed_and_resumed(command(root, args.params, sets), last, args.kill_at, env)
            entry["a_vs_killed"] = difference(lasts[0], last)
        result["modes"][mode] = entry
        print(mode, json.dumps(entry), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
