#!/usr/bin/env python
"""What the one-pass steps cost the optimizer, against torch's SGD-momentum step on the same list.

    python bench/cheap_steps.py                   # prints the table
    python bench/cheap_steps.py --write           # and puts it into bench/RESULTS.md

On the CPU, one intra-op thread, ResNet-50's full parameter list (161 tensors,
25.6 M parameters), medians of many runs, in one run:

* a step the ``schedule=`` skips: SAM's ``second_step()`` on a skipped step
  (the plain base step plus the bookkeeping), against the base optimizer's own
  ``step()``. Target ≤ 1.02× (a skipped step costs nothing).
* MSAM's whole ``step()`` (undo the perturbation, the base step, the momentum norm,
  the new perturbation), against ``torch.optim.SGD(foreach=True, momentum=0.9).step()``.
  Target ≤ 1.5× (issue "SAM without paying 2×"). Byte model: docs/DESIGN.md §6.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sections  # noqa: E402
from harness import time_ms  # noqa: E402
from workloads import WORKLOADS, make_params_and_grads  # noqa: E402

import sam_kernels  # noqa: E402
from sam_kernels.optim.msam import MSAM  # noqa: E402
from sam_kernels.schedules import Bernoulli  # noqa: E402

MARKER = sections.CHEAP_STEPS
TARGETS = {"skipped": 1.02, "msam": 1.5}


def _median_ms(fn, runs: int) -> float:
    return time_ms(fn, torch.device("cpu"), warmup=max(2, runs // 10), reps=runs)


def _skipped_step(opt):
    def step():
        assert not opt.sam_step_due
        opt.second_step()

    return step


def measure(workload: str = "resnet50", scale: float = 1.0, runs: int = 30, backend: str = "auto") -> dict:
    params = make_params_and_grads(WORKLOADS[workload](scale))
    # lr = 0 keeps the weights (and so every run's work) the same.
    sgd = torch.optim.SGD(params, lr=0.0, momentum=0.9, foreach=True)
    skipping = sam_kernels.SAM(params, torch.optim.SGD, lr=0.0, momentum=0.9, foreach=True, backend=backend,
                               schedule=Bernoulli(0.0, seed=0))
    msam = MSAM(params, torch.optim.SGD, rho=0.3, lr=0.0, momentum=0.9, foreach=True, backend=backend)
    # Interleave the measurements so drift of the machine affects both sides alike.
    sgd_ms, skipped_ms, msam_ms = [], [], []
    for _ in range(3):
        sgd_ms.append(_median_ms(sgd.step, runs))
        skipped_ms.append(_median_ms(_skipped_step(skipping), runs))
        msam_ms.append(_median_ms(msam.step, runs))
    sgd_t, skipped_t, msam_t = min(sgd_ms), min(skipped_ms), min(msam_ms)
    return {"workload": workload, "elements": sum(p.numel() for p in params), "sgd_ms": sgd_t,
            "skipped_ms": skipped_t, "msam_ms": msam_t}


def table(row: dict) -> str:
    return "\n".join([
        f"One-pass steps (`python bench/cheap_steps.py`): CPU ({platform.processor() or 'x86_64'}), "
        f"torch.set_num_threads({torch.get_num_threads()}), {row['workload']}'s full list ({row['elements']:,} "
        "parameters); ms per step (best of 3 medians) and ratio to torch's SGD-momentum foreach step, same run.",
        "",
        "| step | ms | ratio | target |",
        "|---|---:|---:|---:|",
        f"| torch SGD(momentum=0.9, foreach) | {row['sgd_ms']:.2f} | 1.000× | |",
        f"| SAM step skipped by `schedule=` (`second_step()`) | {row['skipped_ms']:.2f} | "
        f"{row['skipped_ms'] / row['sgd_ms']:.3f}× | ≤ {TARGETS['skipped']}× |",
        f"| MSAM `step()` (SGD momentum) | {row['msam_ms']:.2f} | {row['msam_ms'] / row['sgd_ms']:.3f}× | "
        f"≤ {TARGETS['msam']}× |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = table(measure(scale=args.scale, runs=args.runs))
    print(text)
    if args.write:
        sections.write_section(Path(__file__).resolve().parent / "RESULTS.md", MARKER, "One-pass steps (CPU)", text)


if __name__ == "__main__":
    main()
