"""Learning curves of a landmark-patch recogniser trained from scratch: test accuracy vs steps vs wall time.

Reads a project after the ``split`` stage (``data/splits/finetune.csv`` to train on, ``data/splits/pairs.csv``
to score, e.g. LFW View 1's pairsDevTest) and trains ``FaceViT`` variants side by side on identical data,
order and augmentation, so the curves differ only by the variant. Patches sit at the mean dense-landmark
shape of the training faces (no landmark net: this isolates the transformer and its embedding head; the
finetune stage itself places them with the landmark net). Faces are decoded once; augmentation is a batched
mirror + shift. Writes ``OUT/curves.json`` and ``OUT/curves.png`` (accuracy vs steps and vs seconds).

    python benchmarks/learning_curve.py --root PROJECT --variants cls,tokens --steps 600 --eval-every 150

Not a test: it measures (see benchmarks/RESULTS.md, "Recogniser head").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lafs.data.datasets import read_faces
from lafs.eval.verification import kfold_accuracy
from lafs.losses import create_margin_head
from lafs.models.vit import FaceViT

SIZE = {"embed_dim": 128, "depth": 4, "num_heads": 2, "head_dim": 64, "mlp_dim": 512}  # lafs_vit_mini


def _data(root: Path) -> dict:
    train = pd.read_csv(root / "data" / "splits" / "finetune.csv")
    pairs = pd.read_csv(root / "data" / "splits" / "pairs.csv")
    table = pd.read_parquet(root / "data" / "landmarks.parquet", columns=["aligned_path", "dense"])
    dense = table[table["aligned_path"].isin(set(train["aligned_path"]))]["dense"]
    mean_shape = torch.tensor(np.stack(dense.to_numpy()), dtype=torch.float32).reshape(len(dense), -1, 2).mean(0)
    test_paths = sorted(set(pairs["path1"]) | set(pairs["path2"]))
    index = {p: i for i, p in enumerate(test_paths)}
    _, labels = np.unique(train["identity"].to_numpy(), return_inverse=True)
    return {
        "x": read_faces([root / p for p in train["aligned_path"]]),
        "y": torch.as_tensor(labels),
        "test": read_faces([root / p for p in test_paths]),
        "mean_shape": mean_shape,
        "a": torch.as_tensor([index[p] for p in pairs["path1"]]),
        "b": torch.as_tensor([index[p] for p in pairs["path2"]]),
        "same": pairs["same"].to_numpy(),
        "folds": pairs["fold"].to_numpy(),
    }


def _to_input(faces: torch.Tensor) -> torch.Tensor:
    return faces.float().div_(127.5).sub_(1.0)


def _augment(x: torch.Tensor, shift: int, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift:
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=g).tolist()
        x = F.pad(x, (shift,) * 4, mode="replicate")[:, :, dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    return x


@torch.no_grad()
def _score(model: FaceViT, data: dict, landmarks: torch.Tensor, autocast) -> float:
    model.eval()
    out = []
    for i in range(0, len(data["test"]), 256):
        x = _to_input(data["test"][i : i + 256])
        lm = landmarks.expand(len(x), -1, -1)
        with autocast():
            e = F.normalize(model(x, lm).float(), dim=-1) + F.normalize(model(x.flip(-1), lm).float(), dim=-1)
        out.append(F.normalize(e, dim=-1))
    model.train()
    emb = torch.cat(out)
    scores = (emb[data["a"]] * emb[data["b"]]).sum(1).numpy()
    return kfold_accuracy(scores, data["same"], folds=data["folds"])[0]


def curve(data: dict, variant: str, args: argparse.Namespace) -> list[dict[str, float]]:
    torch.manual_seed(args.seed)
    k = data["mean_shape"].shape[0]
    model = FaceViT(num_landmarks=k, embedding=variant, embedding_dim=128 if variant == "tokens" else None, **SIZE)
    head = create_margin_head("cosface", model.embedding_dim, int(data["y"].max()) + 1, args.s, args.m)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n != "pos_embed"]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1 or n == "pos_embed"]
    opt = torch.optim.AdamW(
        [{"params": decay + list(head.parameters()), "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
    )
    bf16 = args.dtype == "bf16"

    def autocast():
        return torch.autocast("cpu", torch.bfloat16, enabled=bf16)

    g = torch.Generator().manual_seed(args.seed)  # same order and augmentation for every variant
    order, pos, rows, train_s = torch.randperm(len(data["x"]), generator=g), 0, [], 0.0
    landmarks = data["mean_shape"][None]
    for it in range(args.steps + 1):
        if it % args.eval_every == 0 and it:
            rows.append(
                {
                    "step": it,
                    "seconds": round(train_s, 1),
                    "images": it * args.batch_size,
                    "accuracy": round(_score(model, data, landmarks, autocast), 4),
                }
            )
            print(json.dumps({"variant": variant, **rows[-1]}), flush=True)
        if it == args.steps:
            break
        start = time.perf_counter()
        frac = it / args.steps
        lr = args.lr * (frac / 0.05 if frac < 0.05 else 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95)))
        for group in opt.param_groups:
            group["lr"] = lr
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(data["x"]), generator=g), 0
        idx = order[pos : pos + args.batch_size]
        pos += args.batch_size
        x = _augment(_to_input(data["x"][idx]), args.shift, g)
        with autocast():
            emb = model(x, landmarks.expand(len(x), -1, -1))
        loss = F.cross_entropy(head(emb.float(), data["y"][idx]), data["y"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - start
    return rows


def plot(curves: dict[str, list[dict[str, float]]], path: Path, floors: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for variant, rows in curves.items():
        axes[0].plot([r["step"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=variant)
        axes[1].plot([r["seconds"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=variant)
    for name, acc in floors.items():
        for ax in axes:
            ax.axhline(acc, linestyle="--", color="grey", linewidth=1)
            ax.text(ax.get_xlim()[0], acc, f" {name} floor", va="bottom", fontsize=8, color="grey")
    axes[0].set(xlabel="optimizer steps", ylabel="test pair accuracy (10-fold)")
    axes[1].set(xlabel="training seconds (this CPU)")
    axes[0].legend(title="embedding")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("reports/learning_curve"))
    ap.add_argument("--variants", default="cls,tokens")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--s", type=float, default=30.0)
    ap.add_argument("--m", type=float, default=0.3)
    ap.add_argument("--shift", type=int, default=4)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--floor", action="append", default=[], metavar="NAME=ACC", help="a horizontal line, e.g. hog=0.73")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = _data(args.root)
    curves = {v: curve(data, v, args) for v in args.variants.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    floors = {k: float(v) for k, v in (f.split("=") for f in args.floor)}
    (args.out / "curves.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves}, indent=1)
    )
    plot(curves, args.out / "curves.png", floors)


if __name__ == "__main__":
    main()
