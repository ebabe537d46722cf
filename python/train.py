#!/usr/bin/env python
"""Compare SGD with every optimizer of the library on a task where sharpness-aware training matters.

The default task is scikit-learn's 8×8 digits (shipped with the package, nothing is downloaded) with
noisy training labels: 40 % of the training labels are replaced by a different class drawn uniformly
(symmetric noise, drawn once from --noise-seed), the test labels stay clean. Foret et al. (2021, §3.3)
and the papers after it use label noise as the setting where SAM's flat minima pay off most: SGD fits
the wrong labels, SAM resists memorising them. ``--label-noise 0`` trains on the clean task.

    python python/train.py                                      # digits, 40 % noise, all optimizers, 3 seeds
    python python/train.py --seeds 0 1 2 3 4 --threads 1        # the run of README's table (5 seeds)
    python python/train.py --label-noise 0                      # the clean task
    python python/train.py --optimizers SGD SAM GSAM --seeds 0 1 2 3 4
    python python/train.py --dataset cifar10 --data-dir ~/data --epochs 200 --device cuda
    python python/train.py --frontier --seeds 0 1 2 3 4 --threads 1   # SAM without paying 2×: accuracy vs time

SGD with momentum 0.9, weight decay, a per-step cosine schedule; BatchNorm statistics from the first
(unperturbed) forward pass only. The table gives the clean test accuracy at the end (mean ± std over
seeds), the final training loss (on the noisy labels), the optimizer's own time per step (noise_step +
first_step + second_step, or SGD's step: what the optimizer adds, without the forward/backward passes)
and the wall time of a run. Writes results.json and curves.png into --out. ``--frontier`` compares
SGD, SAM, SAM on schedules (every 2nd / 5th step, Bernoulli 0.5, adaptive), Momentum-SAM and LookSAM
with forward/backward passes per step and the accuracy-vs-wall-time Pareto front (frontier.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import sam_kernels
from common import OPTIMIZERS as _BASE_OPTIMIZERS
from common import SmallResNet, augment, evaluate, load_dataset, pyplot

OPTIMIZERS = {
    **_BASE_OPTIMIZERS,  # SGD, SAM, ASAM, R-SAM
    "GSAM": (sam_kernels.GSAM, {"rho": 0.05, "alpha": 0.4}),
    "R-GSAM": (sam_kernels.RGSAM, {"rho": 0.05, "alpha": 0.4, "gamma": 0.1, "lam": 1.0}),
    "LookSAM": (sam_kernels.LookSAM, {"rho": 0.05, "k": 5, "alpha": 0.7}),
    "WSAM": (sam_kernels.WSAM, {"rho": 0.05, "gamma": 0.9, "decouple": True}),
    "FriendlySAM": (sam_kernels.FriendlySAM, {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9}),
}
# SAM without paying 2× (README): SAM steps on a schedule, and Momentum-SAM's one pass. A callable value is
# called with the run's seed. Not in the default list; `--frontier` runs them with SGD, SAM and LookSAM.
CHEAP_OPTIMIZERS = {
    "SAM every 2nd": (sam_kernels.SAM, {"rho": 0.05, "schedule": 2}),
    "SAM every 5th": (sam_kernels.SAM, {"rho": 0.05, "schedule": 5}),
    "SAM Bernoulli 0.5": (sam_kernels.SAM, {"rho": 0.05,
                                            "schedule": lambda seed: sam_kernels.schedules.Bernoulli(0.5, seed)}),
    "SAM adaptive": (sam_kernels.SAM, {"rho": 0.05, "schedule": lambda seed: sam_kernels.schedules.Adaptive(0.0)}),
    "MSAM": (sam_kernels.MSAM, {"rho": 0.3}),
}
FRONTIER = ["SGD", "SAM", *CHEAP_OPTIMIZERS, "LookSAM"]
OPTIMIZERS.update(CHEAP_OPTIMIZERS)
DEFAULT_OPTIMIZERS = [name for name in OPTIMIZERS if name not in CHEAP_OPTIMIZERS]


def symmetric_label_noise(labels: torch.Tensor, fraction: float, classes: int, seed: int) -> torch.Tensor:
    """A copy of ``labels`` where a ``fraction`` of them, chosen at random, is replaced by a different class
    drawn uniformly (so exactly that fraction is wrong)."""
    gen = torch.Generator().manual_seed(seed)
    noisy = labels.clone().cpu()
    count = round(fraction * len(noisy))
    chosen = torch.randperm(len(noisy), generator=gen)[:count]
    shift = torch.randint(1, classes, (count,), generator=gen)
    noisy[chosen] = (noisy[chosen] + shift) % classes
    return noisy.to(labels.device)


def make_optimizer(name: str, params, *, lr: float, weight_decay: float, backend: str, seed: int):
    base_kwargs = {"lr": lr, "momentum": 0.9, "weight_decay": weight_decay}
    if OPTIMIZERS[name] is None:
        return torch.optim.SGD(params, **base_kwargs)
    cls, kwargs = OPTIMIZERS[name]
    kwargs = {key: value(seed) if callable(value) else value for key, value in kwargs.items()}
    if issubclass(cls, sam_kernels.RSAM):
        kwargs = {**kwargs, "seed": seed}
    return cls(params, torch.optim.SGD, backend=backend, **kwargs, **base_kwargs)


def training_step(model, optimizer, loss_fn, x, y) -> tuple[torch.Tensor, float, int]:
    """One step of any optimizer of OPTIMIZERS: (loss at the first pass, seconds spent in the optimizer,
    forward/backward passes taken)."""
    spent = 0.0
    if isinstance(optimizer, sam_kernels.RSAM):  # R-SAM, R-GSAM
        start = time.perf_counter()
        optimizer.noise_step()
        spent += time.perf_counter() - start
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    start = time.perf_counter()
    if not isinstance(optimizer, sam_kernels.SharpnessAwareOptimizer) or isinstance(optimizer, sam_kernels.MSAM):
        optimizer.step()  # SGD, and Momentum-SAM's one pass
        return loss.detach(), spent + time.perf_counter() - start, 1
    if not optimizer.sam_step_due:  # a step schedule= skips: the plain base step
        optimizer.second_step()
        return loss.detach(), spent + time.perf_counter() - start, 1
    optimizer.first_step(zero_grad=True)
    spent += time.perf_counter() - start
    passes = 1
    if getattr(optimizer, "needs_second_pass", True):  # LookSAM: only every k-th step
        with sam_kernels.frozen_running_stats(model):
            loss_fn(model(x), y).backward()
        passes = 2
    start = time.perf_counter()
    optimizer.second_step()
    return loss.detach(), spent + time.perf_counter() - start, passes


@dataclass
class History:
    optimizer: str
    seed: int
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    optimizer_ms_per_step: float = 0.0
    passes_per_step: float = 0.0


def train(model: nn.Module, name: str, data, *, seed: int, epochs: int, batch_size: int, lr: float,
          weight_decay: float, backend: str, progress=None) -> History:
    torch.manual_seed(seed)
    optimizer = make_optimizer(name, model.parameters(), lr=lr, weight_decay=weight_decay, backend=backend, seed=seed)
    steps_per_epoch = (len(data.train_y) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    history = History(name, seed)
    optimizer_seconds, steps, passes = 0.0, 0, 0
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), device=data.train_y.device)
        epoch_loss = torch.zeros((), device=data.train_y.device)
        for batch in order.split(batch_size):
            x = data.train_x[batch]
            if data.augment:
                x = augment(x)
            loss, spent, taken = training_step(model, optimizer, loss_fn, x, data.train_y[batch])
            epoch_loss += loss * len(batch)
            optimizer_seconds += spent
            steps += 1
            passes += taken
            scheduler.step()
        history.train_loss.append(float(epoch_loss) / len(data.train_y))
        # Momentum-SAM's weights sit at the perturbed point between steps: evaluate at the unperturbed one.
        at_w = optimizer.unperturbed() if isinstance(optimizer, sam_kernels.MSAM) else contextlib.nullcontext()
        with at_w:
            history.test_accuracy.append(evaluate(model, data.test_x, data.test_y)[0])
        if progress is not None:
            progress.set_postfix(loss=f"{history.train_loss[-1]:.3f}", acc=f"{100 * history.test_accuracy[-1]:.1f}%")
            progress.update(1)
    history.seconds = time.perf_counter() - start
    history.optimizer_ms_per_step = 1e3 * optimizer_seconds / max(steps, 1)
    history.passes_per_step = passes / max(steps, 1)
    if isinstance(optimizer, sam_kernels.MSAM):  # leave the model at its unperturbed weights
        with torch.no_grad(), optimizer.unperturbed():
            final = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, value in zip(model.parameters(), final):
                p.copy_(value)
    return history


def summarise(histories: list[History]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(h.optimizer for h in histories):
        runs = [h for h in histories if h.optimizer == name]
        accs = [100 * h.test_accuracy[-1] for h in runs]
        rows.append({
            "optimizer": name,
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "train_loss": statistics.fmean(h.train_loss[-1] for h in runs),
            "optimizer_ms_per_step": statistics.fmean(h.optimizer_ms_per_step for h in runs),
            "seconds": statistics.fmean(h.seconds for h in runs),
            "passes_per_step": statistics.fmean(h.passes_per_step for h in runs),
        })
    return rows


def pareto_front(rows: list[dict]) -> set[str]:
    """The rows no other row beats on both wall time (lower) and mean test accuracy (higher)."""
    return {
        row["optimizer"] for row in rows
        if not any(other["seconds"] <= row["seconds"] and other["test_acc_mean"] >= row["test_acc_mean"]
                   and (other["seconds"], other["test_acc_mean"]) != (row["seconds"], row["test_acc_mean"])
                   for other in rows)
    }


def format_table(rows: list[dict]) -> str:
    front = pareto_front(rows)
    lines = ["| optimizer | test accuracy (%) | final train loss | passes / step | optimizer ms / step "
             "| wall s / run | accuracy-vs-time front |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['optimizer']} | {row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f} "
                     f"| {row['train_loss']:.4f} | {row['passes_per_step']:.2f} | {row['optimizer_ms_per_step']:.2f} "
                     f"| {row['seconds']:.1f} | {'yes' if row['optimizer'] in front else ''} |")
    return "\n".join(lines)


def plot_frontier(rows: list[dict], path: Path, title: str) -> None:
    """Test accuracy (mean ± std) against wall time per run; the Pareto front joined."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        ax.errorbar(row["seconds"], row["test_acc_mean"], yerr=row["test_acc_std"], fmt="o", capsize=3)
        ax.annotate(row["optimizer"], (row["seconds"], row["test_acc_mean"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((r for r in rows if r["optimizer"] in pareto_front(rows)), key=lambda r: r["seconds"])
    ax.plot([r["seconds"] for r in front], [r["test_acc_mean"] for r in front], "k--", lw=1, label="Pareto front")
    ax.set(xlabel="wall time per run (s)", ylabel="clean test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict(rows: list[dict]) -> str:
    """Which SAM-family rows beat SGD by more than the seed spread (SGD's std plus theirs), said plainly."""
    sgd = next((r for r in rows if r["optimizer"] == "SGD"), None)
    if sgd is None:
        return "no SGD row to compare with"
    lines = []
    for row in rows:
        if row is sgd:
            continue
        gain = row["test_acc_mean"] - sgd["test_acc_mean"]
        spread = row["test_acc_std"] + sgd["test_acc_std"]
        word = "beats" if gain > spread else ("does not beat" if gain <= 0 else "is ahead of, within the seed spread,")
        lines.append(f"- {row['optimizer']} {word} SGD: {gain:+.2f} points (spread {spread:.2f})")
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
    ax_acc.set(xlabel="epoch", ylabel="clean test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10", "cifar100"])
    parser.add_argument("--data-dir", help="folder holding the extracted CIFAR python archive")
    parser.add_argument("--label-noise", type=float, default=0.4,
                        help="fraction of training labels replaced by another class (0: the clean task)")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=8, help="ResNet width of the first stage")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=None, choices=list(OPTIMIZERS),
                        help="default: SGD and the SAM family (with --frontier: SGD, SAM, the cheap steps, LookSAM)")
    parser.add_argument("--frontier", action="store_true",
                        help="accuracy against time: SAM on schedules and Momentum-SAM, with frontier.png")
    parser.add_argument("--backend", default="auto", choices=list(sam_kernels.backends.BACKEND_NAMES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="runs/train", help="folder for results.json and curves.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not 0 <= args.label_noise < 1:
        parser.error("--label-noise must be in [0, 1)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.optimizers is None:
        args.optimizers = FRONTIER if args.frontier else DEFAULT_OPTIMIZERS

    device = torch.device(args.device)
    data = load_dataset(args.dataset, args.data_dir)
    if args.label_noise > 0:
        data.train_y = symmetric_label_noise(data.train_y, args.label_noise, data.classes, args.noise_seed)
    data = data.to(device)
    in_channels = data.train_x.shape[1]
    task = f"{args.dataset}, {100 * args.label_noise:.0f} % symmetric label noise" if args.label_noise else args.dataset
    print(f"{task}: {len(data.train_y)} train / {len(data.test_y)} test images (clean test labels), "
          f"{data.classes} classes, device {device}, backend {args.backend}, {torch.get_num_threads()} threads, "
          f"{args.epochs} epochs, seeds {args.seeds}")
    histories = []
    for name in args.optimizers:
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = SmallResNet(in_channels, data.classes, args.width).to(device)
            with tqdm(total=args.epochs, desc=f"{name:17s} seed {seed}", disable=args.no_progress, leave=False) as bar:
                history = train(model, name, data, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                                lr=args.lr, weight_decay=args.weight_decay, backend=args.backend, progress=bar)
            print(f"  {name:17s} seed {seed}: clean test accuracy {100 * history.test_accuracy[-1]:.2f} %, "
                  f"train loss {history.train_loss[-1]:.4f}, optimizer {history.optimizer_ms_per_step:.2f} ms/step, "
                  f"{history.seconds:.1f} s", flush=True)
            histories.append(history)
    rows = summarise(histories)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as handle:
        json.dump({"args": vars(args), "threads": torch.get_num_threads(), "runs": [asdict(h) for h in histories],
                   "summary": rows}, handle, indent=2)
    plot_curves(histories, out / "curves.png", f"{task}: small ResNet, {len(args.seeds)} seed(s)")
    written = [out / "results.json", out / "curves.png"]
    if args.frontier:
        plot_frontier(rows, out / "frontier.png", f"{task}: accuracy against time")
        written.append(out / "frontier.png")
    print()
    print(format_table(rows))
    print()
    print(verdict(rows))
    if args.frontier:
        print("- on the accuracy-vs-time Pareto front: " + ", ".join(sorted(pareto_front(rows))))
    print("\nwrote " + ", ".join(str(path) for path in written))
    return rows


if __name__ == "__main__":
    main()
