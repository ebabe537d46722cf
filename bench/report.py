#!/usr/bin/env python
"""Run the benchmark suite on the current device and write bench/RESULTS.md.

    python bench/report.py                  # full sizes (GPU), writes bench/RESULTS.md
    python bench/report.py --smoke --out /tmp/RESULTS.md   # tiny sizes, seconds on a CPU

For every workload (real models' parameter lists), dtype, optimizer variant and
available backend: the optimizer-side time of one SAM step (first_step +
second_step, and noise_step for R-SAM) minus the base optimizer's own step, the
whole step, its multiple of the byte floor at the measured copy bandwidth,
the speed-up over pytorch-optimizer's SAM (when installed) and the extra memory.
Then the end-to-end training step of ResNet-50 and ViT-B/16 on synthetic batches.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sam_kernels  # noqa: E402
from harness import (  # noqa: E402
    VARIANTS, copy_bandwidth, floor_bytes, memory_use, peer_sam, peer_step_fn, sam_step_fn, time_ms,
)
from models import ResNet50, ViTB16  # noqa: E402
from sections import kept_sections  # noqa: E402
from workloads import WORKLOADS, make_params_and_grads, numel  # noqa: E402

PEERS = {"sam": False, "asam-element-p2": True}  # pytorch-optimizer SAM(adaptive=...) counterpart


def _backends(device: torch.device) -> list[str]:
    status = sam_kernels.available_backends()
    usable = [name for name, reason in status.items()
              if reason is None and sam_kernels.backends.get_backend(name).supports(device)]
    # The interpreted Triton backend (CPU) is a test vehicle, not something to time.
    return [b for b in usable if not (b == "triton" and device.type != "cuda")]


def optimizer_rows(workload: str, shapes, dtype, device, bandwidth, reps) -> list[dict]:
    rows = []
    n = numel(shapes)
    for variant, (cls, kwargs) in VARIANTS.items():
        floor_ms = floor_bytes(variant, n, dtype) / bandwidth * 1e3
        entries = [(backend, lambda p, b=backend: cls(p, torch.optim.SGD, lr=1e-3, momentum=0.9, backend=b, **kwargs),
                    sam_step_fn) for backend in _backends(device)]
        if variant in PEERS:
            entries.append(("pytorch-optimizer", lambda p: peer_sam(p, PEERS[variant]), peer_step_fn))
        peer_ms = None
        variant_rows = []
        for label, build, step_of in entries:
            params = make_params_and_grads(shapes, dtype, device)
            opt = build(params)
            if opt is None:
                continue
            step = step_of(opt)
            memory = memory_use(step, device)
            whole = time_ms(step, device, reps=reps)
            base = time_ms(opt.base_optimizer.step, device, reps=reps)
            side = whole - base
            row = {"workload": workload, "dtype": str(dtype).replace("torch.", ""), "variant": variant,
                   "backend": label, "optimizer_ms": side, "whole_ms": whole, "x_floor": side / floor_ms,
                   "floor_ms": floor_ms, "memory": memory}
            if label == "pytorch-optimizer":
                peer_ms = side
            variant_rows.append(row)
            del opt, params
        for row in variant_rows:
            row["speedup_vs_peer"] = None if peer_ms is None else peer_ms / row["optimizer_ms"]
        rows += variant_rows
    return rows


def end_to_end_rows(device, scale, batch, image, reps) -> list[dict]:
    rows = []
    loss_fn = torch.nn.CrossEntropyLoss()
    for name, build in (("resnet50", lambda: ResNet50(scale)), ("vit_b16", lambda: ViTB16(scale, image=image))):
        model = build().to(device)
        x = torch.randn(batch, 3, image, image, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def forward_backward():
            loss_fn(model(x), y).backward()

        fb_ms = time_ms(forward_backward, device, warmup=2, reps=reps)
        base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def base_step():
            base.zero_grad()
            forward_backward()
            base.step()

        base_ms = time_ms(base_step, device, warmup=2, reps=reps)
        rows.append({"model": name, "setup": "SGD alone", "step_ms": base_ms, "overhead_ms": 0.0})
        for variant, (cls, kwargs) in VARIANTS.items():
            for backend in _backends(device):
                opt = cls(model.parameters(), torch.optim.SGD, lr=1e-3, momentum=0.9, backend=backend, **kwargs)

                def sam_step(opt=opt):
                    if isinstance(opt, sam_kernels.RSAM):
                        opt.noise_step()
                    opt.zero_grad()
                    forward_backward()
                    opt.first_step(zero_grad=True)
                    with sam_kernels.frozen_running_stats(model):
                        forward_backward()
                    opt.second_step()

                ms = time_ms(sam_step, device, warmup=2, reps=reps)
                # What SAM costs beyond its unavoidable second forward/backward.
                rows.append({"model": name, "setup": f"{variant} / {backend}", "step_ms": ms,
                             "overhead_ms": ms - base_ms - fb_ms})
        del model
    return rows


def _fmt(value, pattern="{:.3f}"):
    return "–" if value is None else pattern.format(value)


def markdown(env: dict, rows: list[dict], e2e: list[dict]) -> str:
    lines = [
        "# Benchmark results", "",
        f"- device: {env['device']}", f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}",
        f"- date: {env['date']}", f"- mode: {env['mode']}",
        f"- measured copy bandwidth: {env['bandwidth'] / 1e9:.1f} GB/s (bytes read + written)", "",
        "Optimizer-side time = (first_step + second_step [+ noise_step]) − the base SGD step alone;",
        "× floor = that time over the byte floor (bytes per element × elements / copy bandwidth):",
        "SAM 7, ASAM element 8, ASAM filter 8, R-SAM 10 element-sizes per parameter (docs/DESIGN.md §6;",
        "28 B/param for SAM in fp32). Speed-up is over pytorch-optimizer's SAM on the same variant.", "",
    ]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows if r["workload"] == workload):
            subset = [r for r in rows if r["workload"] == workload and r["dtype"] == dtype]
            lines += [f"## {workload} ({env['sizes'][workload]}), {dtype}", "",
                      "| variant | backend | optimizer ms | × floor | whole step ms | speed-up vs peer | extra MB (held / peak) |",
                      "|---|---|---|---|---|---|---|"]
            for r in subset:
                memory = r["memory"]
                mem = "–" if memory is None else f"{memory.persistent_mb:.0f} / {memory.peak_mb:.0f}"
                lines.append(f"| {r['variant']} | {r['backend']} | {r['optimizer_ms']:.3f} | {r['x_floor']:.2f} "
                             f"| {r['whole_ms']:.3f} | {_fmt(r['speedup_vs_peer'], '{:.2f}×')} | {mem} |")
            lines.append("")
    if e2e:
        lines += ["## End to end: one training step (synthetic batch)", "",
                  "Overhead = SAM step − SGD step − one forward/backward: what SAM costs beyond its second pass.", "",
                  "| model | setup | step ms | SAM overhead ms |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['setup']} | {r['step_ms']:.2f} | {r['overhead_ms']:.2f} |" for r in e2e]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few repetitions (CPU, CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    parser.add_argument("--no-end-to-end", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    scale = 1 / 32 if args.smoke else 1.0
    reps = 3 if args.smoke else 25
    bandwidth = copy_bandwidth(device, 2**24 if args.smoke else 2**30)
    dtypes = [torch.float32] if args.smoke else [torch.float32, torch.bfloat16]
    rows = []
    sizes = {}
    for workload, shapes_of in WORKLOADS.items():
        shapes = shapes_of(scale)
        sizes[workload] = f"{len(shapes)} tensors, {numel(shapes) / 1e6:.1f} M params"
        for dtype in dtypes:
            rows += optimizer_rows(workload, shapes, dtype, device, bandwidth, reps)
    e2e = [] if args.no_end_to_end else end_to_end_rows(
        device, scale=1 / 16 if args.smoke else 1.0, batch=2 if args.smoke else 64,
        image=32 if args.smoke else 224, reps=2 if args.smoke else 10)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(), "mode": "smoke (tiny sizes)" if args.smoke else "full sizes",
        "bandwidth": bandwidth, "sizes": sizes,
    }
    text = markdown(env, rows, e2e)
    out = Path(args.out)
    # The sections other scripts own (host overhead, one-pass steps) are their own measurements: keep them.
    previous = out.read_text() if out.exists() else ""
    for section in kept_sections(previous):
        text = text.rstrip() + "\n\n" + section + "\n"
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
