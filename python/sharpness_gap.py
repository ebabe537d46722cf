#!/usr/bin/env python
"""ASAM paper (Kwon et al., ICML 2021), Fig. 2 in small: which sharpness tracks the generalisation gap?

Trains ``--models`` small ReLU CNNs (common.small_cnn) on a subset of
scikit-learn's digits, each with hyperparameters drawn at random from grids of
weight decay, learning rate, batch size, width and training length (and its
own initialisation seed), so that the models overfit by different amounts and
fill the range of gaps. For every model, on the training set split into
``--batches`` batches (eval mode), it estimates

    S(w)       = max_{‖ε‖₂ ≤ ρ}        L(w + ε) − L(w)         (sharpness, ASAM Eq. 2)
    S_adapt(w) = max_{‖ε / |w|‖₂ ≤ ρ'} L(w + ε) − L(w)         (adaptive sharpness, Def. 2, element-wise)

with ``sam_kernels.sharpness`` (projected gradient ascent) and the gap
L_test − L_train (mean cross-entropy). η = 0 by default, the setting of ASAM's
Theorem 1: then S_adapt is exactly invariant under the rescalings T below, while
S is not (with η > 0 the invariance is only approximate).

Rescaled copies (``--rescaled``): for some trained models, every output channel
c of every convolution is multiplied by α_c > 0 (its filter and bias) and the
matching input channel of the next layer by 1/α_c, with log α_c uniform in
[−log A, log A]. ReLU and max pooling are positively homogeneous, so the copy
computes the same function (same losses, same gap); the program checks this
and reports how S and S_adapt move.

Both Pearson's r and Kendall's τ_b between each sharpness and the gap are
reported with 95 % percentile bootstrap intervals over models (paired
resamples, so the interval of the difference adaptive − plain answers whether
adaptive sharpness correlates better), on the trained models alone (the main
answer) and on trained models plus rescaled copies.

    python python/sharpness_gap.py --out runs/sharpness_gap
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import sam_kernels
from common import evaluate, load_digits, pyplot, small_cnn, train

GRID = {
    "weight_decay": [0.0, 1e-4, 1e-3, 5e-3, 2e-2],
    "lr": [0.01, 0.03, 0.1],
    "batch_size": [16, 32, 64, 128],
    "width": [8, 16, 32],
    "epochs": [5, 10, 20, 40],
}
MEASURES = ("sharpness", "adaptive_sharpness")


# ---------------------------------------------------------------- rescaling
def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def relu_rescale(model: nn.Module, max_factor: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Apply T in place to a common.small_cnn, for every output channel c of every convolution l:

        W_l[c] ← α_c W_l[c],  b_l[c] ← α_c b_l[c],  W_{l+1}[:, c] ← W_{l+1}[:, c] / α_c.

    α_c = exp(u), u ~ U[−log A, log A] per output channel of every convolution (A = ``max_factor``).
    The linear head's inputs are the last convolution's channels, each spread over the pooled positions
    (Flatten of a (C, h, w) map: input column c·h·w + k). Returns the factors per convolution.
    """
    layers = _layers(model)
    factors = []
    for layer, following in zip(layers[:-1], layers[1:]):
        out = layer.weight.shape[0]
        log_a = math.log(max_factor)
        alpha = torch.exp((torch.rand(out, generator=generator, dtype=torch.float64) * 2 - 1) * log_a)
        alpha = alpha.to(layer.weight.dtype)
        layer.weight.mul_(alpha.view(-1, *[1] * (layer.weight.dim() - 1)))
        if layer.bias is not None:
            layer.bias.mul_(alpha)
        if isinstance(following, nn.Linear):  # inputs c·k … c·k + k − 1 come from channel c
            spread = following.weight.shape[1] // out
            following.weight.div_(alpha.repeat_interleave(spread).view(1, -1))
        else:
            following.weight.div_(alpha.view(1, -1, *[1] * (following.weight.dim() - 2)))
        factors.append(alpha)
    return factors


# ------------------------------------------------------------- correlations
def pearson_r(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """r = Σ (x−x̄)(y−ȳ) / √(Σ (x−x̄)² Σ (y−ȳ)²), over the last axis (batched)."""
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1) + 1e-300)


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's τ_b = Σ_{i<j} s_ij t_ij / √(Σ_{i<j} s_ij² · Σ_{i<j} t_ij²),

    s_ij = sign(x_i − x_j), t_ij = sign(y_i − y_j).

    τ_b (not τ_a) because bootstrap resamples repeat models, which creates ties. Batched over leading axes.
    """
    s = np.sign(x[..., :, None] - x[..., None, :])
    t = np.sign(y[..., :, None] - y[..., None, :])
    return (s * t).sum((-1, -2)) / np.sqrt((s * s).sum((-1, -2)) * (t * t).sum((-1, -2)) + 1e-300)


def correlations(measures: dict[str, list[float]], gaps: list[float], *, resamples: int, seed: int) -> dict:
    """Point estimates and 95 % percentile bootstrap intervals of r and τ_b for each measure and their difference."""
    y = np.asarray(gaps, dtype=np.float64)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(y), size=(resamples, len(y)))
    result = {}
    boots = {}
    for name, values in measures.items():
        x = np.asarray(values, dtype=np.float64)
        entry = {}
        for coef, fn in (("pearson", pearson_r), ("kendall", kendall_tau_b)):
            boot = fn(x[index], y[index])
            boots[(name, coef)] = boot
            entry[coef] = float(fn(x, y))
            entry[f"{coef}_ci"] = [float(v) for v in np.nanpercentile(boot, [2.5, 97.5])]
        result[name] = entry
    first, second = list(measures)[:2]
    diff = {}
    for coef in ("pearson", "kendall"):
        d = boots[(second, coef)] - boots[(first, coef)]
        diff[coef] = result[second][coef] - result[first][coef]
        diff[f"{coef}_ci"] = [float(v) for v in np.nanpercentile(d, [2.5, 97.5])]
    result[f"{second} − {first}"] = diff
    return result


def answer(c: dict) -> str:
    """One sentence: does adaptive sharpness correlate better? Decided by the intervals of the differences."""
    d = c["adaptive_sharpness − sharpness"]
    words = []
    for coef, label in (("pearson", "Pearson r"), ("kendall", "Kendall τ_b")):
        low, high = d[f"{coef}_ci"]
        verdict = ("adaptive better" if low > 0 else "plain better" if high < 0 else "no clear difference")
        words.append(f"{label}: {c['adaptive_sharpness'][coef]:+.2f} vs {c['sharpness'][coef]:+.2f}, "
                     f"difference {d[coef]:+.2f} [{low:+.2f}, {high:+.2f}] → {verdict}")
    return "; ".join(words)


# --------------------------------------------------------------------- main
def measure(model: nn.Module, data, batches, args) -> dict:
    """Train/test loss, gap and both sharpness estimates of a model (eval mode)."""
    model.eval()
    train_acc, train_loss = evaluate(model, data.train_x, data.train_y)
    test_acc, test_loss = evaluate(model, data.test_x, data.test_y)
    loss_fn = lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1])  # noqa: E731
    return {
        "train_loss": train_loss, "test_loss": test_loss, "train_accuracy": train_acc, "test_accuracy": test_acc,
        "gap": test_loss - train_loss,
        "sharpness": sam_kernels.sharpness(model, loss_fn, batches, rho=args.rho, steps=args.steps),
        "adaptive_sharpness": sam_kernels.sharpness(model, loss_fn, batches, rho=args.adaptive_rho,
                                                    adaptive="element", eta=args.eta, steps=args.steps),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=40, help="trained models (random hyperparameters)")
    parser.add_argument("--rescaled", type=int, default=10, help="rescaled copies (of the first models)")
    parser.add_argument("--max-factor", type=float, default=4.0, help="rescaling factors α in [1/A, A]")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiplies the grid's training lengths")
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--rho", type=float, default=0.05, help="radius of the sharpness of Eq. 2")
    parser.add_argument("--adaptive-rho", type=float, default=0.5, help="radius of the adaptive sharpness")
    parser.add_argument("--eta", type=float, default=0.0, help="η of the adaptive sharpness (0: Theorem 1)")
    parser.add_argument("--steps", type=int, default=3, help="projected ascent steps per estimate")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (small models: 1 is fastest)")
    parser.add_argument("--out", default="runs/sharpness_gap")
    args = parser.parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args) -> dict:
    started = time.perf_counter()

    data = load_digits(args.seed)
    data.train_x, data.train_y = data.train_x[: args.train_size], data.train_y[: args.train_size]
    size = len(data.train_y) // args.batches
    batches = list(zip(data.train_x.split(size), data.train_y.split(size)))[: args.batches]
    sampler = random.Random(args.seed)
    configs = [{key: sampler.choice(values) for key, values in GRID.items()} for _ in range(args.models)]
    models, rescaled = [], []
    generator = torch.Generator().manual_seed(args.seed)
    for i, config in enumerate(tqdm(configs, desc="training")):
        torch.manual_seed(args.seed + i)
        model = small_cnn(width=config["width"])
        epochs = max(1, round(config["epochs"] * args.epochs_scale))
        train(model, "SGD", data, seed=args.seed + i, epochs=epochs, batch_size=config["batch_size"],
              lr=config["lr"], weight_decay=config["weight_decay"], backend="auto")
        models.append({"model": i, **config, "epochs": epochs, **measure(model, data, batches, args)})
        if i < args.rescaled:
            relu_rescale(model, args.max_factor, generator)
            rescaled.append({"model": i, **config, "epochs": epochs, "rescaled": True,
                             **measure(model, data, batches, args)})

    gaps = [m["gap"] for m in models]
    trained = correlations({k: [m[k] for m in models] for k in MEASURES}, gaps,
                           resamples=args.resamples, seed=args.seed)
    both = models + rescaled
    with_copies = correlations({k: [m[k] for m in both] for k in MEASURES}, [m["gap"] for m in both],
                               resamples=args.resamples, seed=args.seed) if rescaled else None
    invariance = {}
    if rescaled:
        pairs = [(models[r["model"]], r) for r in rescaled]
        invariance = {
            "max_abs_gap_change": max(abs(r["gap"] - m["gap"]) for m, r in pairs),
            "sharpness_ratio_range": [min(r["sharpness"] / m["sharpness"] for m, r in pairs),
                                      max(r["sharpness"] / m["sharpness"] for m, r in pairs)],
            "adaptive_sharpness_ratio_range": [
                min(r["adaptive_sharpness"] / m["adaptive_sharpness"] for m, r in pairs),
                max(r["adaptive_sharpness"] / m["adaptive_sharpness"] for m, r in pairs)],
        }
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "grid": GRID,
              "models": models, "rescaled": rescaled, "correlations": trained,
              "correlations_with_rescaled": with_copies, "invariance": invariance,
              "answer": answer(trained), "answer_with_rescaled": answer(with_copies) if with_copies else None}
    seconds = time.perf_counter() - started
    result["seconds"] = seconds

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sharpness_gap.json").write_text(json.dumps(result, indent=2))
    _plot(result, args, out / "sharpness_gap.png")
    _print(result)
    print(f"{seconds:.0f} s with {torch.get_num_threads()} thread(s); "
          f"wrote {out / 'sharpness_gap.json'} and {out / 'sharpness_gap.png'}")
    return result


def _fmt(c: dict) -> str:
    return (f"Pearson r = {c['pearson']:+.2f} [{c['pearson_ci'][0]:+.2f}, {c['pearson_ci'][1]:+.2f}], "
            f"Kendall τ_b = {c['kendall']:+.2f} [{c['kendall_ci'][0]:+.2f}, {c['kendall_ci'][1]:+.2f}]")


def _print(result: dict) -> None:
    gaps = [m["gap"] for m in result["models"]]
    print(f"{len(gaps)} trained models, gap (test − train loss) from {min(gaps):.3f} to {max(gaps):.3f}")
    for label, key in (("trained models", "correlations"), ("with rescaled copies", "correlations_with_rescaled")):
        c = result[key]
        if c is None:
            continue
        print(f"{label}:")
        for name in MEASURES:
            print(f"  {name:18s}: {_fmt(c[name])}")
    if result["invariance"]:
        inv = result["invariance"]
        print(f"rescaled copies ({len(result['rescaled'])}): |Δgap| ≤ {inv['max_abs_gap_change']:.1e}; "
              f"sharpness × [{inv['sharpness_ratio_range'][0]:.2f}, {inv['sharpness_ratio_range'][1]:.2f}], "
              f"adaptive sharpness × [{inv['adaptive_sharpness_ratio_range'][0]:.4f}, "
              f"{inv['adaptive_sharpness_ratio_range'][1]:.4f}]")
    print("does adaptive sharpness correlate better with the gap (95 % bootstrap interval of the difference)?")
    print(f"  trained models: {result['answer']}")
    if result["answer_with_rescaled"]:
        print(f"  with rescaled copies: {result['answer_with_rescaled']}")


def _plot(result: dict, args, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    titles = {"sharpness": f"sharpness (Eq. 2, ρ={args.rho})",
              "adaptive_sharpness": f"adaptive sharpness (Def. 2, element-wise, "
                                    f"ρ={args.adaptive_rho}, η={args.eta:g})"}
    models = result["models"]
    colour = [math.log10(m["weight_decay"] + 1e-5) for m in models]
    for ax, key in zip(axes, titles):
        points = ax.scatter([m[key] for m in models], [m["gap"] for m in models], c=colour, cmap="plasma",
                            s=18 + 4 * np.log2([m["width"] for m in models]) ** 2, label="trained")
        for r in result["rescaled"]:
            m = models[r["model"]]
            ax.plot([m[key], r[key]], [m["gap"], r["gap"]], color="0.6", lw=0.8)
            ax.scatter([r[key]], [r["gap"]], facecolors="none", edgecolors="k", s=30)
        ax.scatter([], [], facecolors="none", edgecolors="k", s=30, label="rescaled copy (same function)")
        c, cw = result["correlations"][key], result["correlations_with_rescaled"]
        title = f"trained: {_fmt(c)}"
        if cw is not None:
            title += f"\nwith copies: {_fmt(cw[key])}"
        ax.set(xscale="log", xlabel=titles[key], ylabel="generalisation gap (test − train loss)")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.colorbar(points, ax=axes, label="log10(weight decay + 1e-5)")
    fig.suptitle(f"{len(models)} small CNNs on digits (random wd, lr, batch, width, epochs; marker size ∝ width)\n"
                 f"adaptive − plain: {result['answer']}", fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
