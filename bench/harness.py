"""Timing, memory and bandwidth measurements shared by the benchmark suite and the report.

GPU times use CUDA events around each call, median of many runs after a
warm-up; CPU times use perf_counter. The byte floor follows docs/DESIGN.md §6.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import sam_kernels
import sam_kernels.variants

# Bytes moved per parameter element, in units of the parameter's element size
# (docs/DESIGN.md §6): reads + writes that no implementation can avoid.
#   SAM          norm: g (1) · perturb: w, g → saved, w (4) · restore: saved → w (2)       = 7
#   ASAM element norm: w, g (2) · perturb 4 · restore 2                                      = 8
#   ASAM filter  norm: w, g, filter norms kept (2) · perturb 4 · restore 2                  = 8
#   R-SAM        noise: w → saved, w, filter norms kept (3) · sums: saved, g (2) ·
#                mix: saved, g → w (3) · restore 2                                           = 10
#   GSAM         SAM 7 · keep g in the norm pass (1) · sums: g, g_sam (2) · g_sam, g → .grad (3)  = 13
#   R-GSAM       R-SAM 10 + 1 + 2 + 3                                                        = 16
#   LookSAM      SAM step as GSAM (13); other steps: sums g, g_v (2) · g, g_v → .grad (3) = 5;
#                k = 2 (the variants table) alternates them                                  = 9 per step
#   WSAM         decoupled: SAM 7 · keep g (1) · split g_sam, g → .grad, buffer (4) ·
#                after the base step w, buffer → w (3)                                       = 15
#                coupled: SAM 7 · keep g (1) · mix g_sam, g → .grad (3)                      = 11
#   FriendlySAM  sums: g, m (2) · perturb: w, g, m → w, saved, m (6) · restore 2             = 10
ELEMENT_TRAFFIC = {"sam": 7, "asam-element-p2": 8, "asam-filter-p2": 8, "rsam": 10, "gsam": 13, "rgsam": 16,
                   "looksam": 9, "wsam": 15, "wsam-coupled": 11, "friendlysam": 10}
# The benchmarked variants of the library's one table (R-SAM with a fixed seed).
VARIANTS = {
    name: (cls, {**kwargs, **({"seed": 0} if issubclass(cls, sam_kernels.RSAM) else {})})
    for name, (cls, kwargs) in sam_kernels.variants.VARIANTS.items() if name in sam_kernels.variants.BENCHMARKED
}


def floor_bytes(variant: str, numel: int, dtype: torch.dtype) -> int:
    return ELEMENT_TRAFFIC[variant] * numel * torch.empty((), dtype=dtype).element_size()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of one call in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in bytes/s (bytes read + written) of one large device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=20)
    return 2 * nbytes / (ms / 1e3)


@dataclass
class MemoryUse:
    persistent_mb: float  # held between steps (saved copy, base optimizer state)
    peak_mb: float  # transient peak during a step, above what is held before it


def memory_use(step: Callable[[], object], device: torch.device) -> MemoryUse | None:
    """Memory a step adds on a CUDA device (None elsewhere). Call after the params and grads exist."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return MemoryUse((held - before) / 2**20, (peak - held) / 2**20)


def sam_step_fn(opt) -> Callable[[], None]:
    """first_step + second_step (and R-SAM's noise_step) on the gradients already in .grad."""
    if isinstance(opt, sam_kernels.RSAM):
        def step():
            opt.noise_step()
            opt.first_step()
            opt.second_step()
    else:
        def step():
            opt.first_step()
            opt.second_step()
    return step


def peer_step_fn(opt) -> Callable[[], None]:
    """pytorch-optimizer's SAM: first_step, then second_step (which runs its base step)."""
    def step():
        opt.first_step()
        opt.second_step()
    return step


def peer_sam(params, adaptive: bool):
    """pytorch-optimizer's SAM when that optional package is installed, else None."""
    try:
        from pytorch_optimizer import SAM as PeerSAM
    except ImportError:
        return None
    return PeerSAM(params, torch.optim.SGD, rho=0.5 if adaptive else 0.05, adaptive=adaptive, lr=1e-3, momentum=0.9)
