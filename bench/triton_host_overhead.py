#!/usr/bin/env python
"""Host time of the Triton backend per call, with its kernels replaced by no-ops (CPU, no GPU needed).

    python bench/triton_host_overhead.py [--workload resnet50] [--runs 300]

What is left when the launches cost nothing: the backend's Python — the call
plan (buckets, tile tables), the pointer and hyperparameter arrays, the launch
argument lists — which a GPU run pays on top of the kernels. Each operation of
the backend is called directly, and SAM / ASAM-filter / R-SAM optimizer steps
(first_step + restore, R-SAM also noise_step) go through the whole generic
path. "same grads": the gradient tensors are the same every call; "new grads":
they cycle through more sets of buffers than the backend keeps pointer tables
for, so every call sees gradient addresses it has no table for — the worst
case of ``zero_grad(set_to_none=True)`` and a fresh backward (the caching
allocators often hand back the same few addresses, which the backend keeps).
Workloads at 1/64 width (tensor count and structure kept), one intra-op thread,
median of ``--runs`` calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # the backend takes CPU tensors; no kernel runs anyway
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import sam_kernels  # noqa: E402
from sam_kernels.backends import triton_backend as T  # noqa: E402
from sam_kernels.backends.triton_backend import kernels as K  # noqa: E402
from sam_kernels.noise import NoiseStream  # noqa: E402
from workloads import WORKLOADS, make_params_and_grads  # noqa: E402


GRAD_SETS = 8  # more than the pointer tables a plan keeps per list (4)


class _NoLaunch:
    """Stands in for a jitted kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def no_launches() -> None:
    for name in dir(K):
        if name.endswith("_kernel"):
            setattr(K, name, _NoLaunch())


def median_ms(fn, runs: int) -> float:
    for _ in range(max(10, runs // 10)):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def operation_calls(params, grads, saved):
    n = len(params)
    scales, a, b = [torch.tensor(0.1)] * n, [torch.tensor(0.1)] * n, [torch.tensor(0.2)] * n
    etas, gammas, lams = [0.01] * n, [0.1] * n, [1.0] * n
    stream = NoiseStream(seed=3, step=0, tensor_indices=range(n))
    return {
        "scaled_grad_sq_sum (SAM)": lambda g: T.scaled_grad_sq_sum(params, g, etas=etas, granularity=None),
        "scaled_grad_sq_sum (filter)": lambda g: T.scaled_grad_sq_sum(params, g, etas=etas, granularity="filter"),
        "perturb_ (SAM)": lambda g: T.perturb_(params, g, saved, scales, etas=etas, granularity=None, p=2.0),
        "perturb_ (filter)": lambda g: T.perturb_(params, g, saved, scales, etas=etas, granularity="filter", p=2.0),
        "restore_": lambda g: T.restore_(params, saved),
        "add_noise_": lambda g: T.add_noise_(params, saved, gammas=gammas, stream=stream),
        "noise_grad_sums": lambda g: T.noise_grad_sums(g, saved, gammas=gammas, lams=lams, stream=stream),
        "mix_perturb_": lambda g: T.mix_perturb_(params, g, saved, a, b, gammas=gammas, stream=stream),
    }


def optimizer_steps(params):
    def sam_like(opt):
        def step():
            opt.first_step()
            opt.restore()
        return step

    def rsam(opt):
        def step():
            opt.noise_step()
            opt.first_step()
            opt.restore()
        return step

    base = dict(base_optimizer=torch.optim.SGD, lr=0.0, backend="triton")
    return {
        "SAM step (first_step + restore)": sam_like(sam_kernels.SAM(params, **base)),
        "ASAM-filter step": sam_like(sam_kernels.ASAM(params, granularity="filter", **base)),
        "R-SAM step (noise + first + restore)": rsam(sam_kernels.RSAM(params, seed=0, **base)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="resnet50", choices=sorted(WORKLOADS))
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    no_launches()
    params = make_params_and_grads(WORKLOADS[args.workload](1 / 64))
    weights = [p.detach() for p in params]
    grad_sets = [[p.grad for p in params]] + [[torch.randn_like(p) for p in params] for _ in range(GRAD_SETS - 1)]
    saved = [torch.empty_like(w) for w in weights]
    print(f"Triton backend host time, kernels no-ops: {args.workload} at 1/64 width, {len(params)} tensors, "
          f"torch.set_num_threads({torch.get_num_threads()}), median of {args.runs} calls, ms per call")
    print(f"| {'call':38s} | same grads | new grads |")
    print(f"|{'-' * 40}|-----------:|----------:|")
    for name, call in operation_calls(weights, grad_sets[0], saved).items():
        turn = [0]

        def alternate(call=call):
            turn[0] = (turn[0] + 1) % GRAD_SETS
            call(grad_sets[turn[0]])

        same = median_ms(lambda call=call: call(grad_sets[0]), args.runs)
        print(f"| {name:38s} | {same:10.3f} | {median_ms(alternate, args.runs):9.3f} |")
    for name, step in optimizer_steps(params).items():
        turn = [0]

        def alternate(step=step):
            turn[0] = (turn[0] + 1) % GRAD_SETS
            for p, g in zip(params, grad_sets[turn[0]]):
                p.grad = g
            step()

        for p, g in zip(params, grad_sets[0]):
            p.grad = g
        same = median_ms(step, args.runs)
        print(f"| {name:38s} | {same:10.3f} | {median_ms(alternate, args.runs):9.3f} |")


if __name__ == "__main__":
    main()
