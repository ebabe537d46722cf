"""Every backend against the reference, for every optimizer, variant and dtype.

Parameter lists mix conv, linear, bias, 1-element, 0-d, empty, huge-filter,
oddly shaped and non-contiguous tensors, a frozen param and two param groups
with different ρ. Inputs are fresh random values each run.
"""

import pytest
import torch

import sam_kernels
from sam_kernels import functional as F
from helpers import (
    BACKENDS,
    CUDA_BACKENDS,
    FAST_BACKENDS,
    FLOAT_DTYPES,
    VARIANT_IDS,
    VARIANTS,
    all_params,
    clone_groups,
    fill_random_grads,
    first_step_of,
    make_params,
)


# Relative tolerance in units of the dtype's rounding: a fused backend may round
# intermediate results differently, so final weights may differ by a couple of ulps.
_REL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.bfloat16: 2**-7, torch.float16: 2**-9}


def _noise_dtype(dtype):
    """R-SAM's δ₀ comes from a float32 stream whose log/cos/sin round differently per backend
    (docs/DESIGN.md §2): float64 runs compare at float32 precision."""
    return torch.float32 if dtype == torch.float64 else dtype


def assert_weights_close(actual, expected, before, dtype, noise=False):
    """|actual − expected| ≤ rel·(|w| + |ε|) elementwise; NaN or Inf never passes.

    With ``noise``, R-SAM's δ₀ carries the rounding of log/cos/sin, which is
    relative to the noise scale rather than to each element (cos θ near zero):
    the bound also allows rel·max|ε| of the tensor.
    """
    actual, expected, before = actual.double(), expected.double(), before.double()
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    eps = (expected - before).abs()
    bound = _REL[dtype] * (before.abs() + eps) + 1e-30
    if noise and eps.numel():
        bound = bound + _REL[dtype] * eps.max()
    excess = (actual - expected).abs() - bound
    assert (excess <= 0).all(), f"max excess {float(excess.max()):.3g} over the {dtype} tolerance"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_optimizer_steps_match_reference(optimizer_cls, kwargs, _id, dtype, backend):
    groups_ref = make_params(dtype)
    groups_new = clone_groups(groups_ref)
    noisy = issubclass(optimizer_cls, sam_kernels.RSAM)  # RSAM and R-GSAM
    extra = {"seed": 7} if noisy else {}
    tolerance_dtype = _noise_dtype(dtype) if noisy else dtype
    opt_ref = optimizer_cls(groups_ref, torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference", **extra, **kwargs)
    # The base step unfused, as on the reference side: this test is about the perturbation kernels
    # (the fused second step has its own parity tests, tests/test_fused_base_step.py).
    opt_new = optimizer_cls(groups_new, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend,
                            fuse_base_step=False, **extra, **kwargs)

    for _ in range(3):  # several steps: R-SAM's step counter and momentum take part
        _same_random_grads(groups_ref, groups_new)
        before = [p.detach().clone() for p in all_params(groups_ref)]
        # Variants that change the gradient of the base step (GSAM, LookSAM, WSAM) leave the two sides a
        # rounding apart after a step: compare each side's move from its own start.
        shifts = [p.detach().double() - b.double() for p, b in zip(all_params(groups_new), before)]
        first_step_of(opt_ref)
        first_step_of(opt_new)
        moved = sum(not torch.equal(p, b) for p, b in zip(all_params(groups_ref), before))
        # LookSAM's steps between SAM steps move nothing in first_step().
        assert moved > 0 or not getattr(opt_ref, "needs_second_pass", True)
        for p_ref, p_new, b, shift in zip(all_params(groups_ref), all_params(groups_new), before, shifts):
            assert p_new.dtype == p_ref.dtype and p_new.shape == p_ref.shape
            assert_weights_close(p_new.detach().double() - shift, p_ref.detach(), b, tolerance_dtype, noise=noisy)
        # The second pass sees the same gradients on both sides.
        _same_random_grads(groups_ref, groups_new)
        opt_ref.second_step()
        opt_new.second_step()
        for p_ref, p_new in zip(all_params(groups_ref), all_params(groups_new)):
            torch.testing.assert_close(p_new.detach().double(), p_ref.detach().double(),
                                       rtol=4 * _REL[tolerance_dtype], atol=4 * _REL[tolerance_dtype])


def _same_random_grads(groups_ref, groups_new):
    fill_random_grads(groups_ref)
    for p_ref, p_new in zip(all_params(groups_ref), all_params(groups_new)):
        p_new.grad = None if p_ref.grad is None else p_ref.grad.clone(memory_format=torch.preserve_format)


def _random_lists(dtype):
    params = [p for p in all_params(make_params(dtype)) if p.requires_grad]
    grads = [torch.randn(p.shape, dtype=torch.float64).to(dtype) for p in params]
    return [p.detach() for p in params], grads


_SUM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("granularity", [None, "element", "filter"])
def test_scaled_grad_sq_sum_matches_reference(granularity, dtype, backend):
    params, grads = _random_lists(dtype)
    etas = [0.01 * (i + 1) for i in range(len(params))]
    expected = F.scaled_grad_sq_sum(params, grads, granularity=granularity, etas=etas, backend="reference")
    actual = F.scaled_grad_sq_sum(params, grads, granularity=granularity, etas=etas, backend=backend)
    assert float(expected) > 0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=_SUM_RTOL[dtype], atol=0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_noise_grad_sums_match_reference(dtype, backend):
    params, grads = _random_lists(dtype)
    stream = dict(gammas=[0.1 + 0.05 * i for i in range(len(params))],
                  stream=F.NoiseStream(seed=2**63 + 5, step=4, tensor_indices=range(3, 3 + len(params))))
    lams = [0.5 + i for i in range(len(params))]
    expected = F.noise_grad_sums(grads, params, lams=lams, backend="reference", **stream)
    actual = F.noise_grad_sums(grads, params, lams=lams, backend=backend, **stream)
    assert torch.isfinite(expected).all() and float(expected[0]) > 0 and float(expected[1]) > 0
    # Σ λ δ₀·g is a sum of mixed signs: compare it against the scale of its terms.
    scale = (expected[0] * expected[3]).sqrt()
    rtol = _SUM_RTOL[_noise_dtype(dtype)]
    torch.testing.assert_close(actual[[0, 1, 3]].double(), expected[[0, 1, 3]].double(), rtol=rtol, atol=0)
    assert abs(float(actual[2] - expected[2])) <= rtol * float(scale)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_filter_norms_match_reference(backend):
    params, _ = _random_lists(torch.float32)
    for actual, expected in zip(F.filter_norms(params, backend=backend), F.filter_norms(params, backend="reference")):
        torch.testing.assert_close(actual, expected)


def test_auto_backend_is_registered_and_resolves():
    status = sam_kernels.available_backends()
    assert status["reference"] is None and status["foreach"] is None
    for name in ("triton", "cuda", "cpp"):
        assert name in status
    impl = F.resolve("auto", [torch.zeros(1)])
    # cpp > foreach on the CPU; the Triton interpreter is never chosen for CPU tensors.
    assert impl.NAME == ("cpp" if status["cpp"] is None else "foreach")


def _to_device(groups, device):
    moved = clone_groups(groups)
    for group in moved:
        for p in group["params"]:
            p.data = p.data.to(device)
            if p.grad is not None:
                p.grad = p.grad.to(device)
    return moved


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_cuda_first_step_matches_cpu_reference(optimizer_cls, kwargs, _id, dtype, backend):
    groups_cpu = make_params(dtype)
    fill_random_grads(groups_cpu)
    groups_gpu = _to_device(groups_cpu, "cuda")
    extra = {"seed": 11} if issubclass(optimizer_cls, sam_kernels.RSAM) else {}
    opt_cpu = optimizer_cls(groups_cpu, torch.optim.SGD, lr=0.1, backend="reference", **extra, **kwargs)
    opt_gpu = optimizer_cls(groups_gpu, torch.optim.SGD, lr=0.1, backend=backend, **extra, **kwargs)
    before = [p.detach().clone() for p in all_params(groups_cpu)]
    first_step_of(opt_cpu)
    first_step_of(opt_gpu)
    for p_cpu, p_gpu, b in zip(all_params(groups_cpu), all_params(groups_gpu), before):
        # log/cos/sin of the noise stream round differently on the GPU: a few float32 ulps.
        assert_weights_close(p_gpu.detach().cpu(), p_cpu.detach(), b, dtype if dtype != torch.float64 else torch.float32,
                             noise=issubclass(optimizer_cls, sam_kernels.RSAM))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_two_identical_steps_give_identical_bits(optimizer_cls, kwargs, _id, backend):
    groups = make_params(torch.float32)
    fill_random_grads(groups)
    runs = []
    for _ in range(2):
        copy = clone_groups(groups)
        extra = {"seed": 5} if issubclass(optimizer_cls, sam_kernels.RSAM) else {}
        opt = optimizer_cls(copy, torch.optim.SGD, lr=0.1, backend=backend, **extra, **kwargs)
        first_step_of(opt)
        runs.append([p.detach().clone() for p in all_params(copy)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
