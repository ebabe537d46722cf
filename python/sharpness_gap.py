#!/usr/bin/env python
"""ASAM paper, Fig. 2 in small: which sharpness tracks the generalisation gap?

Trains several small CNNs on scikit-learn's digits (a subset, so that the
models overfit by different amounts) with different weight decay and learning
rate, then measures for each model the sharpness of ASAM Eq. 2 and the
adaptive sharpness of Definition 2 (element-wise, p = 2) on training batches,
and plots both against the generalisation gap (test loss − train loss) with
Pearson's r and Kendall's τ.

    python python/sharpness_gap.py --out runs/sharpness_gap
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import sam_kernels
from common import evaluate, kendall_tau, load_digits, pearson, pyplot, small_cnn, train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 1e-4, 1e-3, 5e-3, 2e-2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--rho", type=float, default=0.05, help="radius of the sharpness of Eq. 2")
    parser.add_argument("--adaptive-rho", type=float, default=0.5, help="radius of the adaptive sharpness")
    parser.add_argument("--steps", type=int, default=3, help="projected ascent steps per estimate")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sharpness_gap")
    args = parser.parse_args(argv)

    data = load_digits(args.seed)
    data.train_x, data.train_y = data.train_x[: args.train_size], data.train_y[: args.train_size]
    loss_fn = lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
    batches = list(zip(data.train_x.split(len(data.train_y) // args.batches),
                       data.train_y.split(len(data.train_y) // args.batches)))[: args.batches]
    models = []
    for weight_decay, lr in tqdm(list(itertools.product(args.weight_decays, args.lrs)), desc="training"):
        torch.manual_seed(args.seed)
        model = small_cnn()
        train(model, "SGD", data, seed=args.seed, epochs=args.epochs, batch_size=64, lr=lr,
              weight_decay=weight_decay, backend="auto")
        model.eval()
        _, train_loss = evaluate(model, data.train_x, data.train_y)
        test_acc, test_loss = evaluate(model, data.test_x, data.test_y)
        models.append({
            "weight_decay": weight_decay, "lr": lr, "train_loss": train_loss, "test_loss": test_loss,
            "test_accuracy": test_acc, "gap": test_loss - train_loss,
            "sharpness": sam_kernels.sharpness(model, loss_fn, batches, rho=args.rho, steps=args.steps),
            "adaptive_sharpness": sam_kernels.sharpness(model, loss_fn, batches, rho=args.adaptive_rho,
                                                        adaptive="element", steps=args.steps),
        })

    gaps = [m["gap"] for m in models]
    correlations = {
        key: {"pearson": pearson([m[key] for m in models], gaps), "kendall": kendall_tau([m[key] for m in models], gaps)}
        for key in ("sharpness", "adaptive_sharpness")
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sharpness_gap.json").write_text(json.dumps({"models": models, "correlations": correlations}, indent=2))

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    titles = {"sharpness": f"sharpness (Eq. 2, ρ={args.rho})",
              "adaptive_sharpness": f"adaptive sharpness (Def. 2, ρ={args.adaptive_rho})"}
    for ax, key in zip(axes, titles):
        points = ax.scatter([m[key] for m in models], gaps, c=[m["weight_decay"] for m in models], cmap="plasma")
        c = correlations[key]
        ax.set(xlabel=titles[key], ylabel="generalisation gap (test − train loss)",
               title=f"Pearson r = {c['pearson']:.2f}, Kendall τ = {c['kendall']:.2f}")
        ax.grid(alpha=0.3)
    fig.colorbar(points, ax=axes, label="weight decay")
    fig.suptitle("small CNNs on digits: sharpness vs generalisation gap")
    fig.savefig(out / "sharpness_gap.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    for key, c in correlations.items():
        print(f"{key:18s}: Pearson r = {c['pearson']:+.3f}, Kendall τ = {c['kendall']:+.3f}")
    print(f"wrote {out / 'sharpness_gap.json'} and {out / 'sharpness_gap.png'}")
    return {"models": models, "correlations": correlations}


if __name__ == "__main__":
    main()
