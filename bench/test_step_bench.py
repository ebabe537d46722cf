"""Optimizer-side time of first_step + second_step per optimizer and backend.

CPU default: a small ResNet-like list. ``SAM_BENCH_FULL=1`` uses ResNet-50's
exact 161 shapes. Run: ``python -m pytest bench --benchmark-only``; CI smoke-runs
it with ``--benchmark-disable``.
"""

import math
import os

import pytest
import torch

import sam_kernels
from workloads import make_params_and_grads, resnet_like_shapes

FULL = os.environ.get("SAM_BENCH_FULL") == "1"
SHAPES = resnet_like_shapes(64, (3, 4, 6, 3), 1000) if FULL else resnet_like_shapes(8, (1, 1, 1, 1), 10)

VARIANTS = {
    "sam": (sam_kernels.SAM, {}),
    "asam-element": (sam_kernels.ASAM, {"granularity": "element"}),
    "asam-filter": (sam_kernels.ASAM, {"granularity": "filter"}),
    "asam-pinf": (sam_kernels.ASAM, {"p": math.inf}),
    "rsam": (sam_kernels.RSAM, {"seed": 0}),
}


def test_resnet50_shapes_are_exact():
    shapes = resnet_like_shapes(64, (3, 4, 6, 3), 1000)
    assert len(shapes) == 161
    assert sum(math.prod(s) for s in shapes) == 25_557_032


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_optimizer_side_step(benchmark, variant, backend):
    cls, kwargs = VARIANTS[variant]
    params = make_params_and_grads(SHAPES)
    # lr = 0 keeps the weights fixed across rounds; SGD without momentum is one cheap foreach op.
    opt = cls(params, torch.optim.SGD, lr=0.0, backend=backend, **kwargs)

    def one_step():
        if isinstance(opt, sam_kernels.RSAM):
            opt.noise_step()
        opt.first_step()
        opt.second_step()

    benchmark(one_step)
    assert all(torch.isfinite(p).all() for p in params)
