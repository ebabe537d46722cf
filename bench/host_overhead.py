#!/usr/bin/env python
"""Host overhead of a SAM step on the CPU, against torch's own SGD step on the same parameter list.

    python bench/host_overhead.py                 # prints the table
    python bench/host_overhead.py --write         # and puts it into bench/RESULTS.md

The three real workloads at 1/64 width (the tensor count and structure kept, the
device work made negligible), one intra-op thread. Optimizer-side time of one
step: SAM and ASAM-filter ``first_step() + restore()``, R-SAM ``noise_step() +
first_step() + restore()`` (second_step() is restore() plus the base step, which
both sides share), next to ``torch.optim.SGD(foreach=True, momentum=0.9).step()``
measured in the same run; medians of many runs; ratios are what to compare.
Targets (issue "Backend layer v2"): SAM ≤ 0.08×, ASAM-filter ≤ 0.12×, R-SAM ≤ 0.4×.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sam_kernels  # noqa: E402
import sections  # noqa: E402
from harness import time_ms  # noqa: E402
from workloads import WORKLOADS, make_params_and_grads  # noqa: E402

SCALE = 1 / 64
VARIANTS = {
    "SAM": (sam_kernels.SAM, {}),
    "ASAM-filter": (sam_kernels.ASAM, {"granularity": "filter"}),
    "R-SAM": (sam_kernels.RSAM, {"seed": 0}),
}
TARGETS = {"SAM": 0.08, "ASAM-filter": 0.12, "R-SAM": 0.4}
MARKER = sections.HOST_OVERHEAD


def _median_us(fn, runs: int) -> float:
    return 1e3 * time_ms(fn, torch.device("cpu"), warmup=max(3, runs // 10), reps=runs)


def step_of(opt):
    if isinstance(opt, sam_kernels.RSAM):
        def step():
            opt.noise_step()
            opt.first_step()
            opt.restore()
    else:
        def step():
            opt.first_step()
            opt.restore()
    return step


def measure(backend: str = "cpp", runs: int = 200) -> list[dict]:
    rows = []
    for workload, shapes_of in WORKLOADS.items():
        shapes = shapes_of(SCALE)
        params = make_params_and_grads(shapes)
        sgd = torch.optim.SGD(params, lr=0.0, momentum=0.9, foreach=True)
        base_us = _median_us(sgd.step, runs)
        row = {"workload": workload, "tensors": len(shapes), "elements": sum(p.numel() for p in params),
               "sgd_us": base_us}
        for name, (cls, kwargs) in VARIANTS.items():
            opt = cls(params, torch.optim.SGD, lr=0.0, backend=backend, **kwargs)
            row[name] = _median_us(step_of(opt), runs)
        rows.append(row)
    return rows


def table(rows: list[dict], backend: str) -> str:
    lines = [
        f"Host overhead (`python bench/host_overhead.py`): backend `{backend}`, CPU ({platform.processor() or 'x86_64'}), "
        f"torch.set_num_threads({torch.get_num_threads()}), workloads at 1/64 width; µs per step (median) and "
        "ratio to torch's SGD-momentum foreach step on the same list, same run.",
        "",
        "| workload | tensors | elements | SGD step µs | " + " | ".join(f"{v} µs (ratio; target ≤ {TARGETS[v]}×)" for v in VARIANTS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(VARIANTS),
    ]
    for row in rows:
        cells = [f"{row[v]:.0f} ({row[v] / row['sgd_us']:.3f}×)" for v in VARIANTS]
        lines.append(f"| {row['workload']} | {row['tensors']} | {row['elements']:,} | {row['sgd_us']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = table(measure(args.backend, args.runs), args.backend)
    print(text)
    if args.write:
        sections.write_section(Path(__file__).resolve().parent / "RESULTS.md", MARKER, "Host overhead (CPU)", text)


if __name__ == "__main__":
    main()
