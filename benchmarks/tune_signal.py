"""Does the tune stage's search find better finetune params than the defaults? (issue #14, item 5)

After a pipeline run (``--root``): the Optuna study's trials (validation accuracy of each, the enqueued default
params first), then the test accuracy of the pipeline's finetuned model (the best trial's params, chosen on
validation only) beside a finetune with the default params at the same budget, on the same test pairs, with a
95% bootstrap interval each and McNemar's paired test. The default-params finetune is trained here
(``<root>/models/finetune_default``; resumed if killed).

    python benchmarks/tune_signal.py --root . --out docs/figures/tune_signal.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from lafs.config import load_params
from lafs.eval.significance import paired_test
from lafs.layout import Layout
from lafs.stages.compare import evaluate_on_test_pairs
from lafs.stages.finetune import FinetunePaths, train


def trials(root: Path, study_name: str) -> list[dict[str, Any]]:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{root / 'models' / 'tune' / 'optuna.db'}")
    return [
        {"number": t.number, "state": t.state.name, "val_accuracy": t.value, "params": t.params}
        for t in study.get_trials(deepcopy=False)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--out", type=Path, default=Path("tune_signal.json"))
    args = parser.parse_args(argv)
    root = args.root
    params = load_params(root / "params.yaml")
    tune = json.loads(Layout(root).metrics("tune").read_text())
    study = trials(root, tune["study"])
    default = params.finetune.model_copy(update={"tuned_params": None})
    start = time.perf_counter()
    layout = Layout(root)
    paths = FinetunePaths.of(layout, layout.models / "finetune_default")
    summary = train(default, paths, restart_on_change=True)
    seconds = time.perf_counter() - start
    flip = params.evaluate.flip
    tuned_report, tuned = evaluate_on_test_pairs(layout.model, layout, 64, flip)
    default_report, base = evaluate_on_test_pairs(paths.model, layout, 64, flip)
    result = {
        "cpu": platform.processor() or platform.machine(),
        "trials": study,
        "best_trial": tune["best_trial"],
        "best_params": tune["best_params"],
        "tuned": {
            "params": tune["best_params"],
            "test": tuned_report,
            "best_val_accuracy": json.loads((root / "metrics" / "finetune.json").read_text()).get("best_val_accuracy"),
        },
        "default": {
            "params": {k: getattr(default, k) for k in tune["best_params"]},
            "test": default_report,
            "best_val_accuracy": summary.metrics().get("best_val_accuracy"),
            "train_seconds": seconds,
        },
        "tuned_vs_default": paired_test(tuned, base),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for t in study:
        print(f"trial {t['number']} {t['state']}: val {t['val_accuracy']} {t['params']}")
    d = result["tuned_vs_default"]
    print(
        f"test accuracy tuned {tuned_report['accuracy_mean']:.4f} vs default {default_report['accuracy_mean']:.4f}: "
        f"{d['difference']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], McNemar p {d['mcnemar_p']:.3g}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
