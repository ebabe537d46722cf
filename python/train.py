#!/usr/bin/env python
"""Train a small CNN on scikit-learn's digits with SGD, SAM, ASAM and R-SAM and compare.

The dataset ships inside scikit-learn (no download). Every optimizer uses the
papers' recipe shape: SGD with momentum, weight decay and a cosine schedule.

    python python/train.py                 # ~1 minute on a laptop CPU
    python python/train.py --epochs 40 --seeds 0 1 2 --backend foreach
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import sam_kernels

OPTIMIZERS = {
    "SGD": None,
    "SAM": (sam_kernels.SAM, {"rho": 0.05}),
    "ASAM": (sam_kernels.ASAM, {"rho": 0.5, "eta": 0.01}),
    "R-SAM": (sam_kernels.RSAM, {"rho": 0.05, "gamma": 0.1, "lam": 1.0}),
}


def load_digits(device: torch.device, seed: int = 0):
    """8×8 digit images scaled to [0, 1], split 80/20 (stratified, fixed split)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=0.2, random_state=seed, stratify=labels.numpy()
    )
    pick = lambda idx: (images[idx].to(device), labels[idx].to(device))  # noqa: E731
    return pick(train_idx), pick(test_idx)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )


@dataclass
class RunResult:
    optimizer: str
    seed: int
    test_accuracy: float
    train_loss: float
    seconds: float


def make_optimizer(name: str, params, *, lr: float, backend: str):
    base_kwargs = {"lr": lr, "momentum": 0.9, "weight_decay": 5e-4}
    if OPTIMIZERS[name] is None:
        return torch.optim.SGD(params, **base_kwargs)
    cls, kwargs = OPTIMIZERS[name]
    return cls(params, torch.optim.SGD, backend=backend, **kwargs, **base_kwargs)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = (model(images).argmax(1) == labels).sum()
    model.train()
    return float(correct) / len(labels)


def train(name: str, *, seed: int, epochs: int, batch_size: int, lr: float, backend: str,
          device: torch.device, data=None) -> RunResult:
    (train_x, train_y), (test_x, test_y) = data if data is not None else load_digits(device)
    torch.manual_seed(seed)
    model = small_cnn().to(device)
    optimizer = make_optimizer(name, model.parameters(), lr=lr, backend=backend)
    steps_per_epoch = (len(train_y) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), device=device)
        epoch_loss = torch.zeros((), device=device)
        for batch in order.split(batch_size):
            x, y = train_x[batch], train_y[batch]

            def closure():
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            if isinstance(optimizer, sam_kernels.SharpnessAwareOptimizer):
                loss = optimizer.step(closure)
            else:
                optimizer.zero_grad()
                loss = closure()
                optimizer.step()
            scheduler.step()
            epoch_loss += loss.detach() * len(batch)
    seconds = time.perf_counter() - start
    return RunResult(name, seed, accuracy(model, test_x, test_y), float(epoch_loss) / len(train_y), seconds)


def summarise(results: list[RunResult]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r.optimizer for r in results):
        runs = [r for r in results if r.optimizer == name]
        accs = [100 * r.test_accuracy for r in runs]
        rows.append({
            "optimizer": name,
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "train_loss": statistics.fmean(r.train_loss for r in runs),
            "seconds": statistics.fmean(r.seconds for r in runs),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| optimizer | test accuracy (%) | final train loss | time / run (s) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['optimizer']} | {row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f} "
            f"| {row['train_loss']:.4f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--backend", default="auto", choices=list(sam_kernels.backends.BACKEND_NAMES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the per-run results and the summary to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_digits(device)
    print(f"digits: {len(data[0][1])} train / {len(data[1][1])} test images, device {device}, backend {args.backend}")
    results = []
    for name in args.optimizers:
        for seed in args.seeds:
            result = train(name, seed=seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           backend=args.backend, device=device, data=data)
            print(f"  {name:6s} seed {seed}: test accuracy {100 * result.test_accuracy:.2f} %, "
                  f"train loss {result.train_loss:.4f}, {result.seconds:.1f} s", flush=True)
            results.append(result)
    rows = summarise(results)
    print()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "runs": [asdict(r) for r in results], "summary": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
