#!/usr/bin/env python
"""R-SAM paper, Fig. 1 and Fig. 2: how far SAM's first-order ascent can be trusted.

For a model and one batch, with BatchNorm in training mode:

* vanilla SAM ascends along d = g(w): we report cos(d, g(w + ρ d/‖d‖)) and
  L(w + ρ d/‖d‖) − L(w) against ρ;
* Gaussian-initialised (R-SAM) ascends along d = g(ŵ), ŵ = w + δ₀ with the
  kernel-scaled noise of docs/DESIGN.md §2 (σ_i = γ‖w_i‖/√n_i), for several γ²,
  averaged over noise draws.

A cosine that collapses as ρ grows means the gradient at the perturbed point
no longer resembles the ascent direction: the linearisation behind SAM breaks.
By default a small ResNet is first trained briefly on scikit-learn's digits;
``--checkpoint`` evaluates a saved state_dict of the same model instead.

    python python/landscape.py --out runs/landscape
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from common import SmallResNet, load_digits, pyplot, train
from sam_kernels.backends.reference import initial_noise


def flat_grad(model: nn.Module, loss_fn, x, y) -> tuple[list[torch.Tensor], float]:
    model.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()], float(loss.detach())


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    dot = sum((x * y).sum() for x, y in zip(a, b))
    return float(dot / (torch.sqrt(sum((x * x).sum() for x in a)) * torch.sqrt(sum((y * y).sum() for y in b))))


@torch.no_grad()
def _set(params, values):
    for p, v in zip(params, values):
        p.copy_(v)


def probe(model, x, y, rhos, gamma_sq: float | None, draws: int, seed: int) -> list[dict]:
    """cos(d, g(w + ρ d̂)) and L(w + ρ d̂) − L(w) per ρ; d from w (gamma_sq None) or from noised ŵ."""
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    _, base_loss = flat_grad(model, loss_fn, x, y)
    rows = {rho: {"cos": 0.0, "loss_increase": 0.0} for rho in rhos}
    for draw in range(draws if gamma_sq is not None else 1):
        if gamma_sq is not None:
            gamma = gamma_sq**0.5
            _set(params, [w + initial_noise(w, gamma, seed, j, draw) for j, w in enumerate(saved)])
        direction, _ = flat_grad(model, loss_fn, x, y)
        _set(params, saved)
        norm = torch.sqrt(sum((d * d).sum() for d in direction)) + 1e-12
        for rho in rhos:
            _set(params, [w + rho * d / norm for w, d in zip(saved, direction)])
            grad_there, loss_there = flat_grad(model, loss_fn, x, y)
            rows[rho]["cos"] += cosine(direction, grad_there)
            rows[rho]["loss_increase"] += loss_there - base_loss
            _set(params, saved)
    count = draws if gamma_sq is not None else 1
    return [{"rho": rho, "cos": v["cos"] / count, "loss_increase": v["loss_increase"] / count}
            for rho, v in rows.items()]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="state_dict of common.SmallResNet(1, 10) to analyse")
    parser.add_argument("--train-epochs", type=int, default=4, help="epochs of SGD before the analysis")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    parser.add_argument("--gamma-sq", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    parser.add_argument("--draws", type=int, default=4, help="noise draws averaged per γ²")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/landscape")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = load_digits()
    model = SmallResNet(1, 10)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint))
    else:
        train(model, "SGD", data, seed=args.seed, epochs=args.train_epochs, batch_size=128, lr=0.1,
              weight_decay=5e-4, backend="auto")
    model.train()  # BatchNorm in training mode, as in the paper's analysis
    x, y = data.train_x[: args.batch_size], data.train_y[: args.batch_size]

    results = []
    settings = [("vanilla", None)] + [(f"γ²={g}", g) for g in args.gamma_sq]
    for label, gamma_sq in tqdm(settings, desc="probing"):
        for row in probe(model, x, y, args.rhos, gamma_sq, args.draws, args.seed):
            results.append({"setting": label, "gamma_sq": gamma_sq or 0.0, **row})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "landscape.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    plt = pyplot()
    fig, (ax_cos, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, _ in settings:
        rows = [r for r in results if r["setting"] == label]
        rhos = [r["rho"] for r in rows]
        ax_cos.plot(rhos, [r["cos"] for r in rows], "o-", label=label)
        ax_loss.plot(rhos, [r["loss_increase"] for r in rows], "o-", label=label)
    ax_cos.set(xscale="log", xlabel="ρ", ylabel="cos(d, g(w + ρ d/‖d‖))", title="gradient agreement")
    ax_loss.set(xscale="log", xlabel="ρ", ylabel="L(w + ρ d/‖d‖) − L(w)",
                title="loss at the perturbed point")
    for ax in (ax_cos, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(title="ascent direction from", fontsize=8)
    fig.suptitle("SAM's ascent step: vanilla vs Gaussian-initialised (kernel-scaled noise)")
    fig.tight_layout()
    fig.savefig(out / "landscape.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'landscape.csv'} and {out / 'landscape.png'}")
    return results


if __name__ == "__main__":
    main()
