"""The Triton backend's cached call plans (issue 19): a call whose lists did not change reuses its
buckets, tile tables, pointer tables and hyperparameter arrays; every change that matters rebuilds
what it must, and the results stay those of the reference backend.

The kernels run through Triton's interpreter on the CPU (tests/conftest.py turns it on): small lists,
but one tensor bigger than a tile, so full (vectorised on a GPU) and partial tiles both run.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import sam_kernels
from helpers import BACKENDS
from sam_kernels import functional as F

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend does not run here")

SHAPES = [(8, 3, 3, 3), (8,), (10, 12), (1,), (), (2, 5000)]  # (2, 5000): a full and a partial tile


@pytest.fixture
def triton_backend():
    backend = importlib.import_module("sam_kernels.backends.triton_backend")
    assert backend.BLOCK < 10000, "the (2, 5000) tensor should span a full and a partial tile"
    return backend


def _lists(dtype=torch.float32, shapes=SHAPES):
    weights = [(torch.randn(s, dtype=torch.float64) * 0.3 + 0.05).to(dtype) for s in shapes]
    grads = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    saved = [torch.empty_like(w) for w in weights]
    return weights, grads, saved


def _builds(backend) -> dict:
    return dict(backend.STATS)


def _close(actual, expected, rtol=4e-6, atol=0.0):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def sam_step_matches_reference(weights, grads, saved, *, granularity="filter", etas=None, rhos=None):
    """Norm, perturb and restore on triton with these very tensors, the same on the reference backend with
    copies; results compared, and the weights put back bit for bit."""
    n = len(weights)
    etas = etas or [0.01 * (i + 1) for i in range(n)]
    rhos = rhos or [0.05] * (n // 2) + [0.11] * (n - n // 2)
    before = [w.clone() for w in weights]
    ref_weights, ref_grads = [w.clone() for w in weights], [g.clone() for g in grads]
    ref_saved = [torch.empty_like(w) for w in weights]

    sq = F.scaled_grad_sq_sum(weights, grads, granularity=granularity, etas=etas, backend="triton")
    ref_sq = F.scaled_grad_sq_sum(ref_weights, ref_grads, granularity=granularity, etas=etas, backend="reference")
    _close(sq, ref_sq, rtol=1e-5)
    scales, _ = F.sam_scales(ref_sq, rhos)  # the same scales on both sides: compare the perturb pass alone
    F.perturb_(weights, grads, saved, scales, granularity=granularity, etas=etas, backend="triton")
    F.perturb_(ref_weights, ref_grads, ref_saved, scales, granularity=granularity, etas=etas, backend="reference")
    for w, ref_w, s, b in zip(weights, ref_weights, saved, before):
        assert torch.equal(s, b)
        _close(w, ref_w, rtol=1e-5 if w.dtype == torch.float32 else 1e-12, atol=1e-7)
    F.restore_(weights, saved, backend="triton")
    for w, b in zip(weights, before):
        assert torch.equal(w, b)


def rsam_passes_match_reference(weights, grads, saved, *, step=0):
    """noise, sums, mix and restore on triton with these tensors and on the reference with copies."""
    n = len(weights)
    gammas, lams, rhos = [0.1 + 0.01 * i for i in range(n)], [1.0 + 0.1 * i for i in range(n)], [0.05] * n
    stream = F.NoiseStream(seed=2**40 + 3, step=step, tensor_indices=range(2, 2 + n))
    before = [w.clone() for w in weights]
    ref_weights, ref_grads = [w.clone() for w in weights], [g.clone() for g in grads]
    ref_saved = [torch.empty_like(w) for w in weights]

    F.add_noise_(weights, saved, gammas=gammas, stream=stream, backend="triton")
    F.add_noise_(ref_weights, ref_saved, gammas=gammas, stream=stream, backend="reference")
    for w, ref_w, b in zip(weights, ref_weights, before):
        noise = (ref_w.double() - b.double()).abs()
        _close(w, ref_w, rtol=1e-5, atol=1e-5 * float(noise.max()) if noise.numel() else 0.0)
    sums = F.noise_grad_sums(grads, saved, gammas=gammas, lams=lams, stream=stream, backend="triton")
    ref_sums = F.noise_grad_sums(ref_grads, ref_saved, gammas=gammas, lams=lams, stream=stream, backend="reference")
    _close(sums[[0, 1, 3]], ref_sums[[0, 1, 3]], rtol=1e-5)
    assert abs(float(sums[2] - ref_sums[2])) <= 1e-5 * float((ref_sums[0] * ref_sums[3]).sqrt())
    a, b, _ = F.rsam_coefficients(ref_sums, rhos, lams)
    F.mix_perturb_(weights, grads, saved, a, b, gammas=gammas, stream=stream, backend="triton")
    F.mix_perturb_(ref_weights, ref_grads, ref_saved, a, b, gammas=gammas, stream=stream, backend="reference")
    for w, ref_w, s in zip(weights, ref_weights, ref_saved):
        eps = (ref_w.double() - s.double()).abs()
        _close(w, ref_w, rtol=1e-5, atol=1e-5 * float(eps.max()) if eps.numel() else 0.0)
    F.restore_(weights, saved, backend="triton")
    for w, b in zip(weights, before):
        assert torch.equal(w, b)


def test_a_repeated_call_reuses_plans_pointer_tables_and_arrays(triton_backend):
    weights, grads, saved = _lists()
    sam_step_matches_reference(weights, grads, saved)
    rsam_passes_match_reference(weights, grads, saved)
    built = _builds(triton_backend)
    sam_step_matches_reference(weights, grads, saved)  # new scale tensors, same sharing: slots reused
    rsam_passes_match_reference(weights, grads, saved, step=1)  # another step: only a launch scalar
    assert _builds(triton_backend) == built


def test_reallocated_gradients_rebuild_their_pointer_tables_only(triton_backend):
    weights, grads, saved = _lists()
    sam_step_matches_reference(weights, grads, saved)
    built = _builds(triton_backend)
    old = grads
    grads = [g.clone() for g in grads]  # zero_grad(set_to_none=True), then backward: new storages
    sam_step_matches_reference(weights, grads, saved)
    after = _builds(triton_backend)
    assert after["plans"] == built["plans"] and after["arrays"] == built["arrays"]
    assert after["pointer_tables"] == built["pointer_tables"] + 2  # the gradients of the norm and perturb calls
    del old


def test_new_weight_storage_rebuilds_pointer_tables_not_the_plan(triton_backend):
    weights, grads, saved = _lists()
    sam_step_matches_reference(weights, grads, saved)
    built = _builds(triton_backend)
    weights[0] = weights[0].clone()  # as p.data = p.data.to(...) / .clone() does
    sam_step_matches_reference(weights, grads, saved)
    after = _builds(triton_backend)
    assert after["plans"] == built["plans"]
    assert after["pointer_tables"] > built["pointer_tables"]


def test_a_dtype_change_rebuilds_the_plan(triton_backend):
    weights, grads, saved = _lists()
    sam_step_matches_reference(weights, grads, saved)
    built = _builds(triton_backend)
    weights[2], grads[2], saved[2] = weights[2].double(), grads[2].double(), torch.empty_like(saved[2], dtype=torch.float64)
    sam_step_matches_reference(weights, grads, saved)
    assert _builds(triton_backend)["plans"] > built["plans"]
    grads[5] = grads[5].to(torch.bfloat16)  # a gradient dtype of its own: another bucket
    sam_step_matches_reference(weights, grads, saved)


def test_a_param_losing_its_gradient_changes_the_list_and_the_plan(triton_backend):
    weights, grads, saved = _lists()
    sam_step_matches_reference(weights, grads, saved)
    built = _builds(triton_backend)
    keep = [0, 1, 3, 4, 5]
    sam_step_matches_reference([weights[i] for i in keep], [grads[i] for i in keep], [saved[i] for i in keep])
    assert _builds(triton_backend)["plans"] > built["plans"]
    sam_step_matches_reference(weights, grads, saved)  # and back: the first plan is still cached
    rsam_passes_match_reference([weights[i] for i in keep], [grads[i] for i in keep], [saved[i] for i in keep])


def test_a_shape_change_at_the_same_address_rebuilds_the_plan(triton_backend):
    weights, grads, saved = _lists()
    sam_step_matches_reference(weights, grads, saved)
    built = _builds(triton_backend)
    address = weights[0].data_ptr()
    weights[0], grads[0], saved[0] = weights[0].view(24, 9), grads[0].view(24, 9), saved[0].view(24, 9)
    assert weights[0].data_ptr() == address
    sam_step_matches_reference(weights, grads, saved)  # filter-wise: 24 filters now, not 8
    assert _builds(triton_backend)["plans"] > built["plans"]
    rsam_passes_match_reference(weights, grads, saved)


def test_a_gradient_turning_non_contiguous_goes_to_foreach(triton_backend):
    weights, grads, saved = _lists()
    sam_step_matches_reference(weights, grads, saved)
    grads[2] = grads[2].t().contiguous().t()
    assert not grads[2].is_contiguous()
    sam_step_matches_reference(weights, grads, saved)
    assert "non-contiguous" in triton_backend.ROUTED_TO_FOREACH[(10, 12)]


def test_hyperparameter_changes_rebuild_their_arrays(triton_backend):
    weights, grads, saved = _lists()
    etas = [0.01] * len(weights)
    sam_step_matches_reference(weights, grads, saved, etas=etas)
    built = _builds(triton_backend)
    sam_step_matches_reference(weights, grads, saved, etas=[0.02] + etas[1:])
    assert _builds(triton_backend)["arrays"] > built["arrays"]
    built = _builds(triton_backend)
    sam_step_matches_reference(weights, grads, saved, etas=etas, rhos=[0.05] * len(weights))  # scale sharing changes
    assert _builds(triton_backend)["arrays"] > built["arrays"]


def test_unaligned_addresses_take_the_unaligned_kernels(triton_backend):
    weights, grads, saved = _lists()
    storage = torch.randn(1 + 2 * 5000)
    weights[5] = storage[1:].view(2, 5000)  # contiguous, 4 bytes past a 16-byte boundary
    assert weights[5].data_ptr() % 16 != 0
    plan = triton_backend._plan("perturb_", weights, grads, saved)
    assert [aligned for _, aligned in plan.pointers(weights, grads, saved)] == [False]
    sam_step_matches_reference(weights, grads, saved)
    rsam_passes_match_reference(weights, grads, saved)


def test_filters_too_long_for_32_bit_indexing_go_to_foreach(triton_backend, monkeypatch):
    monkeypatch.setattr(triton_backend, "MAX_FILTER", 100)
    monkeypatch.setattr(triton_backend, "_PLANS", type(triton_backend._PLANS)())
    weights, grads, saved = _lists()
    sam_step_matches_reference(weights, grads, saved)
    assert "filter of more than 100" in triton_backend.ROUTED_TO_FOREACH[(2, 5000)]
    rsam_passes_match_reference(weights, grads, saved)


@pytest.mark.parametrize("optimizer_cls,kwargs", [(sam_kernels.ASAM, {"granularity": "filter"}),
                                                  (sam_kernels.RSAM, {"seed": 3})], ids=["asam-filter", "rsam"])
def test_optimizer_steps_through_every_change_match_the_reference(optimizer_cls, kwargs):
    """zero_grad(set_to_none=True) every step, a param without a gradient for a step, a new storage and a
    dtype change between steps: the triton optimizer follows the reference one."""
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        models.append([nn.Parameter(torch.randn(s) * 0.3 + 0.05) for s in SHAPES])
    for ref_p, p in zip(*models):
        p.data.copy_(ref_p.data)
    opts = [optimizer_cls(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, **kwargs)
            for params, backend in zip(models, ["reference", "triton"])]

    def set_grads(skip=()):
        for i, (ref_p, p) in enumerate(zip(*models)):
            if i in skip:
                ref_p.grad = p.grad = None
            else:
                g = torch.randn(ref_p.shape, dtype=torch.float64).to(ref_p.dtype)
                ref_p.grad, p.grad = g, g.clone()

    changes = [lambda: None, lambda: None, "skip", "storage", "dtype", lambda: None]
    for change in changes:
        skip = (1, 3) if change == "skip" else ()
        if change == "storage":
            for params in models:
                params[0].data = params[0].data.clone()
        if change == "dtype":
            for params in models:
                params[2].data = params[2].data.double()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if optimizer_cls is sam_kernels.RSAM:
            for opt in opts:
                opt.noise_step()
        set_grads(skip)
        for opt in opts:
            opt.first_step()
        for ref_p, p in zip(*models):
            eps = (ref_p.detach().double() - p.detach().double()).abs()
            scale = float(ref_p.detach().abs().max()) + 1e-30
            assert float(eps.max()) <= 1e-5 * scale, "first_step differs from the reference"
        set_grads(skip)
        for opt in opts:
            opt.second_step()
        for ref_p, p in zip(*models):
            assert p.dtype == ref_p.dtype
            torch.testing.assert_close(p.detach().double(), ref_p.detach().double(), rtol=1e-5, atol=1e-6)
