#!/usr/bin/env python
"""R-SAM paper (Liu et al., NeurIPS 2022), Fig. 1 and Fig. 2, computed as the paper defines them.

Notation: w the trained weights, g(u) = ∇L(u) on one fixed training batch with
BatchNorm in training mode (batch statistics; running statistics are left
untouched), ĝ(u) = g(u)/‖g(u)‖ with global norms over every tensor, and
ŵ = w + δ₀ a Gaussian-initialised point. For each ρ the program reports

* vanilla SAM (Fig. 1 and 2, the reference curve):
      cos(g(w), g(w + ρ ĝ(w)))          and   L(w + ρ ĝ(w));
* the paper's Gaussian-initialised quantities (Fig. 1 and 2):
      cos(g(ŵ), g(ŵ + ρ ĝ(ŵ)))          and   L(ŵ + ρ ĝ(ŵ));
* an extra, clearly labelled: the ascent that R-SAM's update actually takes as
  λ → ∞ (docs/DESIGN.md §2.4: the direction is found at ŵ but applied at w):
      cos(g(ŵ), g(w + ρ ĝ(ŵ)))          and   L(w + ρ ĝ(ŵ)).

δ₀ is drawn from the library's Philox/Box–Muller stream (draw k uses step k,
the same z for every γ², so the curves differ only by the scale) with two
scalings of its standard deviation:

* ``absolute``: σ = γ for every element, δ₀ ~ N(0, γ² I), as in the paper's figures;
* ``kernel``: σ_i = γ ‖w_i‖/√n_i per filter i (γ|w_k| for tensors with ndim ≤ 1),
  the noise R-SAM's optimizer uses (docs/DESIGN.md §2.4).

γ² defaults to the paper's 0.0075, 0.01 and 0.0125. A small ResNet is trained
with SGD on scikit-learn's digits and analysed at an early checkpoint (after
``--early-epoch``) and at the end of training (``--train-epochs``, the late
checkpoint); the spread over ``--draws`` noise draws is reported as mean, std,
min and max. The paper claims that with random smoothing the cosine stays
higher than vanilla SAM's as ρ grows; the program states, per curve and
overall, whether that holds here (rule in ``verdict``).

    python python/landscape.py --out runs/landscape
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import sam_kernels
from common import SmallResNet, load_digits, pyplot, train
from sam_kernels.backends.reference import noise_std
from sam_kernels.noise import standard_normal

SCALINGS = ("absolute", "kernel")


# ------------------------------------------------------------------ quantities
def grad_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """(g(u), L(u)) at the model's current weights u: cross-entropy of the batch, one tensor per parameter."""
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return [g.detach() for g in grads], float(loss.detach())


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖v‖ = √(Σ_j ‖v_j‖²) over every tensor j of the list."""
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """cos(a, b) = ⟨a, b⟩ / (‖a‖ ‖b‖) with global (all-tensor) inner product and norms."""
    dot = sum((u.double() * v.double()).sum() for u, v in zip(a, b))
    return float(dot / (global_norm(a) * global_norm(b) + 1e-300))


def draw_noise(weights: list[torch.Tensor], gamma_sq: float, scaling: str, seed: int, draw: int) -> list[torch.Tensor]:
    """δ₀ for every tensor: σ ⊙ z, z = the library's normal stream of tensor j at step ``draw``.

    ``absolute``: σ = γ = √γ²; ``kernel``: σ_i = γ ‖w_i‖/√n_i (docs/DESIGN.md §2.4).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    gamma = gamma_sq**0.5
    noise = []
    for j, w in enumerate(weights):
        z = standard_normal(w.numel(), seed=seed, tensor_index=j, step=draw).reshape(w.shape).to(w.dtype)
        sigma = gamma if scaling == "absolute" else noise_std(w, gamma).to(w.dtype)
        noise.append(sigma * z)
    return noise


@torch.no_grad()
def _set(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def ascent_quantities(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rhos: list[float],
                      noise: list[torch.Tensor] | None) -> list[dict]:
    """Per ρ, for the start u = w + δ₀ (u = w when ``noise`` is None):

    cos = cos(g(u), g(u + ρ ĝ(u))),  loss = L(u + ρ ĝ(u))                     (paper / vanilla)
    cos_at_w = cos(g(u), g(w + ρ ĝ(u))),  loss_at_w = L(w + ρ ĝ(u))           (R-SAM's update, λ → ∞)

    plus loss_w = L(w) and loss_start = L(u). The weights and BatchNorm buffers are restored exactly.
    """
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    rows = []
    try:
        with sam_kernels.frozen_running_stats(model):
            _, loss_w = grad_and_loss(model, x, y)
            start = saved if noise is None else [w + d for w, d in zip(saved, noise)]
            _set(params, start)
            g_start, loss_start = grad_and_loss(model, x, y)
            norm = global_norm(g_start) + 1e-12
            unit = [(g.double() / norm).to(g.dtype) for g in g_start]
            for rho in rhos:
                _set(params, [u + rho * d for u, d in zip(start, unit)])
                g_there, loss_there = grad_and_loss(model, x, y)
                row = {"rho": rho, "loss_w": loss_w, "loss_start": loss_start,
                       "cos": cosine(g_start, g_there), "loss": loss_there}
                if noise is None:
                    row.update(cos_at_w=row["cos"], loss_at_w=row["loss"])
                else:
                    _set(params, [w + rho * d for w, d in zip(saved, unit)])
                    g_w, loss_at_w = grad_and_loss(model, x, y)
                    row.update(cos_at_w=cosine(g_start, g_w), loss_at_w=loss_at_w)
                rows.append(row)
    finally:
        _set(params, saved)
    return rows


# -------------------------------------------------------------------- summary
def summarise(rows: list[dict]) -> list[dict]:
    """Mean, std, min and max over draws of cos, loss, cos_at_w, loss_at_w per (checkpoint, scaling, γ², ρ)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["checkpoint"], r["scaling"], r["gamma_sq"], r["rho"]), []).append(r)
    out = []
    for (checkpoint, scaling, gamma_sq, rho), rs in groups.items():
        s = {"checkpoint": checkpoint, "scaling": scaling, "gamma_sq": gamma_sq, "rho": rho, "draws": len(rs)}
        for key in ("cos", "loss", "cos_at_w", "loss_at_w", "loss_start", "noise_to_weight"):
            values = [r[key] for r in rs]
            s[f"{key}_mean"] = statistics.fmean(values)
            s[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            s[f"{key}_min"], s[f"{key}_max"] = min(values), max(values)
        out.append(s)
    return out


def verdict(summary: list[dict]) -> list[dict]:
    """Does the noised cosine stay above vanilla? One line per (checkpoint, scaling, γ²) curve.

    At each ρ the curve is *above* when every draw's cos(g(ŵ), g(ŵ + ρ ĝ(ŵ))) exceeds the vanilla
    cos(g(w), g(w + ρ ĝ(w))), *below* when every draw is under it, *overlapping* otherwise. The
    paper's claim holds for the curve when it is above at ≥ half the ρ values (and at the largest ρ) and
    below at none; it fails when below at ≥ half and above at none; otherwise the result is mixed.
    """
    vanilla = {(s["checkpoint"], s["rho"]): s["cos_mean"] for s in summary if s["scaling"] == "vanilla"}
    curves: dict[tuple, list[dict]] = {}
    for s in summary:
        if s["scaling"] != "vanilla":
            curves.setdefault((s["checkpoint"], s["scaling"], s["gamma_sq"]), []).append(s)
    lines = []
    for (checkpoint, scaling, gamma_sq), ss in curves.items():
        ss = sorted(ss, key=lambda s: s["rho"])
        signs = []
        for s in ss:
            v = vanilla[(checkpoint, s["rho"])]
            signs.append("above" if s["cos_min"] > v else "below" if s["cos_max"] < v else "overlap")
        above, below = signs.count("above"), signs.count("below")
        if above * 2 >= len(signs) and below == 0 and signs[-1] == "above":
            holds = "holds"
        elif below * 2 >= len(signs) and above == 0:
            holds = "fails"
        else:
            holds = "mixed"
        loss_w = next(s["loss_start_mean"] for s in summary
                      if (s["checkpoint"], s["scaling"]) == (checkpoint, "vanilla"))
        lines.append({"checkpoint": checkpoint, "scaling": scaling, "gamma_sq": gamma_sq,
                      "noise_to_weight": ss[0]["noise_to_weight_mean"],
                      "loss_ratio": ss[0]["loss_start_mean"] / loss_w, "above": above,
                      "below": below, "overlap": signs.count("overlap"), "claim": holds, "per_rho": signs})
    return lines


def overall_statement(verdicts: list[dict]) -> str:
    """The verdicts in words: curves per outcome, then per scaling the (checkpoint, γ², ρ) points above/below."""
    claims = [v["claim"] for v in verdicts]
    parts = [f"paper's claim (noised cosine above vanilla as ρ grows) holds for {claims.count('holds')} of "
             f"{len(claims)} curves, fails for {claims.count('fails')}, mixed for {claims.count('mixed')}"]
    for scaling in dict.fromkeys(v["scaling"] for v in verdicts):
        vs = [v for v in verdicts if v["scaling"] == scaling]
        points = sum(len(v["per_rho"]) for v in vs)
        parts.append(f"{scaling} noise (‖δ₀‖/‖w‖ {min(v['noise_to_weight'] for v in vs):.2f}–"
                     f"{max(v['noise_to_weight'] for v in vs):.2f}, "
                     f"L(ŵ)/L(w) {min(v['loss_ratio'] for v in vs):.1f}–"
                     f"{max(v['loss_ratio'] for v in vs):.0f}): above vanilla at {sum(v['above'] for v in vs)} of "
                     f"{points} points, below at {sum(v['below'] for v in vs)}")
    return "; ".join(parts[:1]) + ("\n" + "\n".join(parts[1:]) if len(parts) > 1 else "")


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="state_dict of common.SmallResNet(1, 10) to analyse instead of training")
    parser.add_argument("--train-epochs", type=int, default=20, help="epochs of SGD; the end is the late checkpoint")
    parser.add_argument("--early-epoch", type=int, default=1, help="epoch of the early checkpoint (0: none)")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    parser.add_argument("--gamma-sq", type=float, nargs="+", default=[0.0075, 0.01, 0.0125])
    parser.add_argument("--scalings", nargs="+", choices=SCALINGS, default=list(SCALINGS))
    parser.add_argument("--draws", type=int, default=8, help="noise draws per γ² and scaling")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (small models: 1 is fastest)")
    parser.add_argument("--out", default="runs/landscape")
    args = parser.parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args) -> dict:
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    data = load_digits()
    model = SmallResNet(1, 10)
    checkpoints: dict[str, dict] = {}
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint))
        checkpoints["given"] = copy.deepcopy(model.state_dict())
    else:
        def keep(epoch, m):
            if epoch == args.early_epoch and epoch < args.train_epochs:
                checkpoints[f"early (epoch {epoch})"] = copy.deepcopy(m.state_dict())

        history = train(model, "SGD", data, seed=args.seed, epochs=args.train_epochs, batch_size=128, lr=0.1,
                        weight_decay=5e-4, backend="auto", on_epoch=keep)
        checkpoints[f"late (epoch {args.train_epochs})"] = copy.deepcopy(model.state_dict())
        print(f"trained {args.train_epochs} epochs: train loss {history.train_loss[-1]:.4f}, "
              f"test accuracy {100 * history.test_accuracy[-1]:.1f}%")
    model.train()  # BatchNorm in training mode, as in the paper's analysis
    x, y = data.train_x[: args.batch_size], data.train_y[: args.batch_size]

    jobs = [(name, "vanilla", 0.0, 0) for name in checkpoints]
    jobs += [(name, scaling, g, k) for name in checkpoints for scaling in args.scalings
             for g in args.gamma_sq for k in range(args.draws)]
    rows = []
    for name, scaling, gamma_sq, draw in tqdm(jobs, desc="probing"):
        model.load_state_dict(checkpoints[name])
        noise = None if scaling == "vanilla" else draw_noise(
            [p.detach() for p in model.parameters()], gamma_sq, scaling, args.seed, draw)
        weights = [p.detach() for p in model.parameters()]
        ratio = 0.0 if noise is None else float(global_norm(noise) / global_norm(weights))
        for row in ascent_quantities(model, x, y, args.rhos, noise):
            rows.append({"checkpoint": name, "scaling": scaling, "gamma_sq": gamma_sq, "draw": draw,
                         "noise_to_weight": ratio, **row})
    summary = summarise(rows)
    verdicts = verdict(summary)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, table in ((out / "landscape.csv", rows), (out / "landscape_summary.csv", summary)):
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    overall = overall_statement(verdicts)
    _plot(summary, verdicts, list(checkpoints), args, out / "landscape.png", overall)
    _print(summary, verdicts, overall)
    print(f"{time.perf_counter() - started:.0f} s with {torch.get_num_threads()} thread(s); "
          f"wrote {out / 'landscape.csv'}, {out / 'landscape_summary.csv'} and {out / 'landscape.png'}")
    return {"rows": rows, "summary": summary, "verdicts": verdicts, "overall": overall}


def _print(summary: list[dict], verdicts: list[dict], overall: str) -> None:
    for checkpoint in dict.fromkeys(s["checkpoint"] for s in summary):
        print(f"\n{checkpoint}: cos(g(start), g(start + ρ ĝ(start))), mean ± std [min, max] over draws")
        vanilla = [s for s in summary if s["checkpoint"] == checkpoint and s["scaling"] == "vanilla"]
        rhos = [s["rho"] for s in vanilla]
        print(f"  {'ρ':>24s} " + " ".join(f"{r:>22g}" for r in rhos))
        print(f"  {'vanilla':>24s} " + " ".join(f"{s['cos_mean']:22.3f}" for s in vanilla))
        for s0 in summary:
            if s0["checkpoint"] != checkpoint or s0["scaling"] == "vanilla" or s0["rho"] != rhos[0]:
                continue
            curve = [s for s in summary if (s["checkpoint"], s["scaling"], s["gamma_sq"])
                     == (checkpoint, s0["scaling"], s0["gamma_sq"])]
            label = f"{s0['scaling']} γ²={s0['gamma_sq']:g}"
            print(f"  {label:>24s} " + " ".join(
                f"{s['cos_mean']:.3f}±{s['cos_std']:.3f}[{s['cos_min']:.2f},{s['cos_max']:.2f}]".rjust(22)
                for s in curve))
            print(f"  {'  extra cos at w':>24s} " + " ".join(f"{s['cos_at_w_mean']:22.3f}" for s in curve))
        print(f"  loss L(start + ρ ĝ(start)), mean over draws; L(w) = {vanilla[0]['loss_start_mean']:.4f}")
        for s0 in summary:
            if s0["checkpoint"] != checkpoint or s0["rho"] != rhos[0]:
                continue
            curve = [s for s in summary if (s["checkpoint"], s["scaling"], s["gamma_sq"])
                     == (checkpoint, s0["scaling"], s0["gamma_sq"])]
            label = "vanilla" if s0["scaling"] == "vanilla" else f"{s0['scaling']} γ²={s0['gamma_sq']:g}"
            print(f"  {label:>24s} L(start)={s0['loss_start_mean']:8.4f} " + " ".join(
                f"{s['loss_mean']:9.4f}" for s in curve) + "   (extra L(w + ρ ĝ(ŵ)): " + " ".join(
                f"{s['loss_at_w_mean']:.4f}" for s in curve) + ")")
    print("\nverdict per curve (ρ where every draw is above (a) / below (b) vanilla, or overlaps (o)):")
    for v in verdicts:
        print(f"  {v['checkpoint']:>18s} {v['scaling']:>8s} γ²={v['gamma_sq']:<7g} ‖δ₀‖/‖w‖ = "
              f"{v['noise_to_weight']:.2f}, L(ŵ)/L(w) = {v['loss_ratio']:7.1f}: above {v['above']}, below "
              f"{v['below']}, overlap {v['overlap']} ({' '.join(s[0] for s in v['per_rho'])}) → {v['claim']}")
    print(overall)


def _plot(summary, verdicts, checkpoint_names, args, path: Path, overall: str) -> None:
    plt = pyplot()
    scalings = args.scalings
    fig, axes = plt.subplots(2, len(checkpoint_names) * len(scalings), squeeze=False,
                             figsize=(4.2 * len(checkpoint_names) * len(scalings), 7.2))
    colors = plt.get_cmap("viridis")([0.15, 0.5, 0.85, 0.3, 0.7][: len(args.gamma_sq)] if len(args.gamma_sq) <= 5
                                     else torch.linspace(0.1, 0.9, len(args.gamma_sq)).tolist())
    for col, (checkpoint, scaling) in enumerate((c, s) for c in checkpoint_names for s in scalings):
        ax_cos, ax_loss = axes[0, col], axes[1, col]
        vanilla = sorted((s for s in summary if s["checkpoint"] == checkpoint and s["scaling"] == "vanilla"),
                         key=lambda s: s["rho"])
        rhos = [s["rho"] for s in vanilla]
        ax_cos.plot(rhos, [s["cos_mean"] for s in vanilla], "k-o", ms=3, label="vanilla SAM")
        ax_loss.plot(rhos, [s["loss_mean"] for s in vanilla], "k-o", ms=3, label="vanilla SAM")
        for color, gamma_sq in zip(colors, args.gamma_sq):
            curve = sorted((s for s in summary if (s["checkpoint"], s["scaling"], s["gamma_sq"])
                            == (checkpoint, scaling, gamma_sq)), key=lambda s: s["rho"])
            for ax, key in ((ax_cos, "cos"), (ax_loss, "loss")):
                ax.plot(rhos, [s[f"{key}_mean"] for s in curve], "-o", ms=3, color=color, label=f"γ²={gamma_sq:g}")
                ax.fill_between(rhos, [s[f"{key}_min"] for s in curve], [s[f"{key}_max"] for s in curve],
                                color=color, alpha=0.2)
                ax.plot(rhos, [s[f"{key}_at_w_mean"] for s in curve], ":", color=color,
                        label=f"γ²={gamma_sq:g}, extra: at w")
        claims = ", ".join(v["claim"] for v in verdicts if (v["checkpoint"], v["scaling"]) == (checkpoint, scaling))
        ax_cos.set(xscale="log", title=f"{checkpoint}, {scaling} noise\nclaim: {claims}", xlabel="ρ",
                   ylabel="cos(g(ŵ), g(ŵ + ρĝ(ŵ)))")
        ax_loss.set(xscale="log", yscale="log", xlabel="ρ", ylabel="L(ŵ + ρĝ(ŵ))")
        for ax in (ax_cos, ax_loss):
            ax.grid(alpha=0.3)
        if col == 0:
            ax_cos.legend(fontsize=7)
    fig.suptitle("R-SAM Fig. 1–2 on digits (SmallResNet, train-mode BN): solid = paper's quantity "
                 "(band: min–max over draws), dotted = extra (ascent from ŵ applied at w)\n" + overall, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
