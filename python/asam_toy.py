#!/usr/bin/env python
"""ASAM paper, Fig. 3: SAM and ASAM on L(w) = |w1·relu(w2) − 0.04|.

Plain SGD (lr 0.01) wrapped by SAM (ρ = 0.05) and ASAM (ρ = 0.5, η = 0.01,
element-wise, p = 2) for 1000 steps from (0.2, 0.05) and (0.3, 0.033). SAM's
fixed-radius ball crosses into the dead-ReLU half-plane from the second start
and stalls; ASAM's ball scales with |w| and reaches the valley w1·w2 = 0.04.

    python python/asam_toy.py --out runs/asam_toy.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sam_kernels
from common import pyplot

STARTS = [(0.2, 0.05), (0.3, 0.033)]
TARGET = 0.04


def loss_of(w1, w2):
    return (w1 * torch.relu(w2) - TARGET).abs()


def trajectory(optimizer_cls, start, steps: int, **kwargs) -> torch.Tensor:
    w = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = optimizer_cls([w], torch.optim.SGD, lr=0.01, backend="reference", **kwargs)
    points = [w.detach().clone()]
    for _ in range(steps):
        opt.step(lambda: loss_of(w[0], w[1]).backward())
        points.append(w.detach().clone())
    return torch.stack(points)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="runs/asam_toy.png")
    args = parser.parse_args(argv)

    runs = {}
    for start in STARTS:
        runs[("SAM", start)] = trajectory(sam_kernels.SAM, start, args.steps, rho=0.05)
        runs[("ASAM", start)] = trajectory(sam_kernels.ASAM, start, args.steps, rho=0.5, eta=0.01)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    w1, w2 = torch.meshgrid(torch.linspace(0.0, 0.45, 300), torch.linspace(-0.05, 0.3, 300), indexing="ij")
    levels = ax.contourf(w1, w2, loss_of(w1, w2), levels=30, cmap="viridis")
    fig.colorbar(levels, ax=ax, label="L(w)")
    valley = torch.linspace(0.13, 0.45, 200)
    ax.plot(valley, TARGET / valley, "w--", lw=1.5, label="valley w1·w2 = 0.04")
    colors = {"SAM": "tab:red", "ASAM": "tab:orange"}
    end_markers = {"SAM": "X", "ASAM": "*"}
    # ASAM first so that SAM's stalled run (start = end) stays visible on top.
    for (name, start), points in sorted(runs.items(), key=lambda item: item[0][0] == "SAM"):
        style = "-" if start == STARTS[0] else "--"
        ax.plot(points[:, 0], points[:, 1], style, color=colors[name], lw=2, label=f"{name} from {start}")
        ax.plot(*points[0], "o", color=colors[name], ms=6, mec="k")
        ax.plot(*points[-1], end_markers[name], color=colors[name], ms=13, mec="k", zorder=5)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="w1", ylabel="w2", xlim=(0, 0.45), ylim=(-0.05, 0.3),
           title="SAM (ρ=0.05) vs ASAM (ρ=0.5) on |w1·relu(w2) − 0.04|")
    ax.legend(loc="upper right", fontsize=8, title="● start, ★/✖ end", title_fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)

    summary = {f"{name} from {start}": {"end": points[-1].tolist(), "final_loss": float(loss_of(*points[-1]))}
               for (name, start), points in runs.items()}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    for key, value in summary.items():
        print(f"{key:22s} ends at ({value['end'][0]:.4f}, {value['end'][1]:.4f}), loss {value['final_loss']:.5f}")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
