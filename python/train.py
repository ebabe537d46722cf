#!/usr/bin/env python
"""Compare SGD, SAM, ASAM and R-SAM training a small ResNet.

The default dataset, scikit-learn's 8×8 digits, ships inside scikit-learn:
nothing is downloaded and the default run takes a couple of minutes on a
laptop CPU. CIFAR-10/100 are read from the python archives you already have:

    python python/train.py                                   # digits, 3 seeds
    python python/train.py --dataset cifar10 --data-dir ~/data --epochs 200 --device cuda

The recipe follows the papers' shape: SGD with momentum 0.9, weight decay,
a cosine schedule; BatchNorm statistics come from the first (unperturbed)
forward pass only. Writes results.json and curves.png (train loss and test
accuracy per epoch, mean ± std over seeds) into --out, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import sam_kernels
from common import OPTIMIZERS, SmallResNet, load_dataset, pyplot, train


def summarise(histories) -> list[dict]:
    rows = []
    for name in dict.fromkeys(h.optimizer for h in histories):
        runs = [h for h in histories if h.optimizer == name]
        accs = [100 * h.test_accuracy[-1] for h in runs]
        rows.append({
            "optimizer": name,
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "train_loss": statistics.fmean(h.train_loss[-1] for h in runs),
            "seconds": statistics.fmean(h.seconds for h in runs),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| optimizer | test accuracy (%) | final train loss | time / run (s) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['optimizer']} | {row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f} "
                     f"| {row['train_loss']:.4f} | {row['seconds']:.1f} |")
    return "\n".join(lines)


def plot_curves(histories, path: Path, title: str) -> None:
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(h.optimizer for h in histories):
        runs = [h for h in histories if h.optimizer == name]
        epochs = range(1, len(runs[0].train_loss) + 1)
        for ax, key, scale in ((ax_loss, "train_loss", 1.0), (ax_acc, "test_accuracy", 100.0)):
            values = torch.tensor([getattr(h, key) for h in runs], dtype=torch.float64) * scale
            mean = values.mean(0)
            std = values.std(0) if len(runs) > 1 else torch.zeros_like(mean)
            line, = ax.plot(epochs, mean, label=name)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax_loss.set(xlabel="epoch", ylabel="train loss (cross-entropy)", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10", "cifar100"])
    parser.add_argument("--data-dir", help="folder holding the extracted CIFAR python archive")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=16, help="ResNet width of the first stage")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--backend", default="auto", choices=list(sam_kernels.backends.BACKEND_NAMES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/train", help="folder for results.json and curves.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    data = load_dataset(args.dataset, args.data_dir).to(device)
    in_channels = data.train_x.shape[1]
    print(f"{args.dataset}: {len(data.train_y)} train / {len(data.test_y)} test images, {data.classes} classes, "
          f"device {device}, backend {args.backend}")
    histories = []
    for name in args.optimizers:
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = SmallResNet(in_channels, data.classes, args.width).to(device)
            with tqdm(total=args.epochs, desc=f"{name:6s} seed {seed}", disable=args.no_progress, leave=False) as bar:
                history = train(model, name, data, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                                lr=args.lr, weight_decay=args.weight_decay, backend=args.backend, progress=bar)
            print(f"  {name:6s} seed {seed}: test accuracy {100 * history.test_accuracy[-1]:.2f} %, "
                  f"train loss {history.train_loss[-1]:.4f}, {history.seconds:.1f} s", flush=True)
            histories.append(history)
    rows = summarise(histories)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as handle:
        json.dump({"args": vars(args), "runs": [asdict(h) for h in histories], "summary": rows}, handle, indent=2)
    plot_curves(histories, out / "curves.png", f"{args.dataset}: small ResNet, {len(args.seeds)} seed(s)")
    print()
    print(format_table(rows))
    print(f"\nwrote {out / 'results.json'} and {out / 'curves.png'}")
    return rows


if __name__ == "__main__":
    main()
