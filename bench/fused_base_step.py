#!/usr/bin/env python
"""What fusing the restore into the base step saves (issue "Fused second step").

    python bench/fused_base_step.py               # prints the table
    python bench/fused_base_step.py --write       # and puts it into bench/RESULTS.md

On the CPU, one intra-op thread, ResNet-50's full parameter list (161 tensors,
25.6 M parameters), backend ``cpp``, in one run, interleaved: SAM's
``second_step()`` with ``fuse_base_step=True`` against ``False`` (restore, then
torch's step), for SGD with momentum and for AdamW; and the whole optimizer
side of a SAM step (``first_step()`` + ``second_step()``) against torch's own
foreach step alone. Target (issue): fused ``second_step()`` ≤ 0.75× unfused
with SGD momentum. Medians of single calls (each ``second_step()`` timed
after an untimed ``first_step()``). Byte model: docs/DESIGN.md §2.11, §4.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sections  # noqa: E402
from workloads import WORKLOADS, make_params_and_grads  # noqa: E402

import sam_kernels  # noqa: E402

MARKER = sections.FUSED_BASE_STEP
TARGET = 0.75
# Bytes per fp32 parameter moved by the second step (docs/DESIGN.md §2.11): fused reads saved, g and the
# state and writes w and the state once; unfused restores (8) and torch's single-tensor CPU step makes
# several passes (SGD momentum: mul_ 8, add_ 12, param add_ 12; AdamW: decay 8, lerp 12, mul_ 8,
# addcmul_ 12, sqrt/div/add 16, addcdiv_ 16).
BYTES = {"sgd": {"fused": 20, "unfused": 8 + 32}, "adamw": {"fused": 28, "unfused": 8 + 72}}
BASES = {"sgd": (torch.optim.SGD, {"lr": 0.0, "momentum": 0.9}),
         "adamw": (torch.optim.AdamW, {"lr": 0.0, "weight_decay": 0.0})}


def _second_step_ms(opt, runs: int) -> float:
    samples = []
    for k in range(runs + 2):
        opt.first_step()
        start = time.perf_counter()
        opt.second_step()
        if k >= 2:  # warm-up
            samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def _whole_ms(opt, runs: int) -> float:
    samples = []
    for k in range(runs + 2):
        start = time.perf_counter()
        opt.first_step()
        opt.second_step()
        if k >= 2:
            samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def _step_ms(opt, runs: int) -> float:
    samples = []
    for k in range(runs + 2):
        start = time.perf_counter()
        opt.step()
        if k >= 2:
            samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def measure(workload: str = "resnet50", scale: float = 1.0, runs: int = 15, backend: str = "cpp") -> list[dict]:
    params = make_params_and_grads(WORKLOADS[workload](scale))
    elements = sum(p.numel() for p in params)
    rows = []
    for name, (base, kwargs) in BASES.items():
        fused = sam_kernels.SAM(params, base, backend=backend, **kwargs)
        plain = sam_kernels.SAM(params, base, backend=backend, fuse_base_step=False, **kwargs)
        torch_alone = base(params, foreach=True, **kwargs)
        assert fused.base_step_fused and not plain.base_step_fused, fused._why_not_fused()
        second = {"fused": [], "unfused": []}
        whole = {"fused": [], "unfused": [], "torch": []}
        for _ in range(3):  # interleaved, so that drift of the machine reaches every side alike
            second["fused"].append(_second_step_ms(fused, runs))
            second["unfused"].append(_second_step_ms(plain, runs))
            whole["fused"].append(_whole_ms(fused, runs))
            whole["unfused"].append(_whole_ms(plain, runs))
            whole["torch"].append(_step_ms(torch_alone, runs))
        rows.append({"base": name, "workload": workload, "elements": elements,
                     **{f"second_{k}": min(v) for k, v in second.items()},
                     **{f"whole_{k}": min(v) for k, v in whole.items()}})
    return rows


def table(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        f"Fused second step (`python bench/fused_base_step.py`): CPU ({platform.processor() or 'x86_64'}), "
        f"torch.set_num_threads({torch.get_num_threads()}), backend cpp, {first['workload']}'s full list "
        f"({first['elements']:,} parameters); ms (best of 3 medians), same run. Bytes/param by the byte model "
        "(fp32).",
        "",
        "| base | second_step() fused | unfused | ratio (target ≤ 0.75×) | B/param fused : unfused | "
        "SAM first+second fused | unfused | torch foreach step alone | fused SAM / torch step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = BYTES[r["base"]]
        lines.append(
            f"| {r['base']} | {r['second_fused']:.2f} | {r['second_unfused']:.2f} | "
            f"{r['second_fused'] / r['second_unfused']:.3f}× | {b['fused']} : {b['unfused']} | "
            f"{r['whole_fused']:.2f} | {r['whole_unfused']:.2f} | {r['whole_torch']:.2f} | "
            f"{r['whole_fused'] / r['whole_torch']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = table(measure(scale=args.scale, runs=args.runs))
    print(text)
    if args.write:
        sections.write_section(Path(__file__).resolve().parent / "RESULTS.md", MARKER, "Fused second step (CPU)",
                               text)


if __name__ == "__main__":
    main()
