"""Operations declared once: argument checks on every backend, per-operation fallback, third-party backends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sam_kernels
from sam_kernels import functional as F
from sam_kernels.backends import operations, reference
from helpers import BACKENDS, VARIANT_IDS, VARIANTS, first_step_of


class PartialBackend:
    """A third-party backend implementing two operations (through the reference) and counting calls."""

    def __init__(self):
        self.calls = []

    def available(self):
        return True, ""

    def supports(self, device):
        return device.type == "cpu"

    def restore_(self, params, saved):
        self.calls.append("restore_")
        reference.restore_(params, saved)

    def scaled_grad_sq_sum(self, params, grads, *, etas, granularity):
        self.calls.append("scaled_grad_sq_sum")
        return reference.scaled_grad_sq_sum(params, grads, etas=etas, granularity=granularity)


@pytest.fixture
def partial_backend():
    impl = PartialBackend()
    sam_kernels.register_backend("partial", impl, priority={"cpu": 1000})
    yield impl
    sam_kernels.backends.unregister_backend("partial")


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_a_third_party_backend_with_some_operations_trains_like_the_reference(partial_backend, optimizer_cls, kwargs, _id):
    assert sam_kernels.available_backends()["partial"] is None
    assert set(operations.missing(partial_backend)) == set(operations.OPERATIONS) - {"restore_", "scaled_grad_sq_sum"}
    params = [nn.Parameter(torch.randn(4, 3, 2)), nn.Parameter(torch.randn(5))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    seed = {"seed": 7} if issubclass(optimizer_cls, sam_kernels.RSAM) else {}
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.1, backend="partial", **kwargs, **seed)
    ref = optimizer_cls(twins, torch.optim.SGD, lr=0.1, backend="reference", **kwargs, **seed)
    for _ in range(2):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        first_step_of(opt), first_step_of(ref)
        for p, q in zip(params, twins):  # the second pass's gradient (g_sam ≠ g, as after a real backward: with
            p.grad = torch.randn_like(p)  # g_sam = g, LookSAM's g_v is rounding noise that it then amplifies)
            q.grad = p.grad.clone()
        opt.second_step(), ref.second_step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert "restore_" in partial_backend.calls
    if not issubclass(optimizer_cls, (sam_kernels.RSAM, sam_kernels.FriendlySAM)):  # they sum other things
        assert "scaled_grad_sq_sum" in partial_backend.calls


def test_auto_picks_a_registered_backend_by_priority(partial_backend):
    x = [torch.randn(3)]
    F.restore_(x, [torch.randn(3)])  # backend="auto"
    assert partial_backend.calls == ["restore_"]


def test_registering_needs_available_and_supports():
    with pytest.raises(TypeError, match="available"):
        sam_kernels.register_backend("broken", object(), priority={"cpu": 1})
    with pytest.raises(ValueError, match="Invalid backend name"):
        sam_kernels.register_backend("auto", PartialBackend())
    with pytest.raises(ValueError, match="Invalid backend: 'nowhere'"):
        sam_kernels.SAM([nn.Parameter(torch.randn(2))], torch.optim.SGD, lr=0.1, backend="nowhere")


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_per_tensor_lists_are_refused_on_every_backend(backend):
    params = [torch.randn(4, 3), torch.randn(5)]
    before = [p.clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    saved = [torch.empty_like(p) for p in params]
    scale = [torch.tensor(0.1)]

    def stream(seed, indices, offsets=None):
        return F.NoiseStream(seed=seed, step=0, tensor_indices=indices, element_offsets=offsets)

    cases = [
        (lambda: F.perturb_(params, grads, saved, scale, backend=backend), r"scales has 1 values for 2 tensors"),
        (lambda: F.perturb_(params, grads[:1], saved, scale * 2, backend=backend), r"grads has 1 tensors, params has 2"),
        (lambda: F.restore_(params, saved[:1], backend=backend), r"saved has 1 tensors"),
        (lambda: F.add_noise_(params, saved, gammas=[0.1], stream=stream(1, [0, 1]), backend=backend),
         r"gammas has 1 values"),
        (lambda: F.add_noise_(params, saved, gammas=0.1, stream=stream(1, [0]), backend=backend),
         r"stream.tensor_indices has 1 values"),
        (lambda: F.add_noise_(params, saved, gammas=0.1, stream=stream(1, [0, 1], [0]), backend=backend),
         r"stream.element_offsets has 1 values"),
        (lambda: F.add_noise_(params, saved, gammas=0.1, stream=stream(-1, [0, 1]), backend=backend),
         r"seed must be an int in \[0, 2\*\*64\)"),
        (lambda: F.add_noise_(params, saved, gammas=0.1, stream=stream(2**64, [0, 1]), backend=backend),
         r"seed must be"),
        (lambda: F.add_noise_(params, saved, gammas=0.1, stream=stream(1, [0, 2**32]), backend=backend),
         r"tensor_indices must be in \[0, 2\*\*32\)"),
        (lambda: F.mix_perturb_(params, grads, saved, scale * 2, scale, gammas=0.1, stream=stream(1, [0, 1]),
                                backend=backend), r"grad_coefs has 1 values"),
    ]
    for run, message in cases:
        with pytest.raises(ValueError, match=message):
            run()
        assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffers_not_matching_their_weight_are_refused_before_any_write(backend):
    params = [torch.randn(4, 3), torch.randn(10)]
    before = [p.clone() for p in params]
    grads = [torch.randn(4, 3), torch.randn(5)]  # fewer elements than the weight
    saved = [torch.empty(4, 3), torch.empty(10)]
    scales = [torch.tensor(0.1)] * 2
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(5,\).*params\[1\] has shape \(10,\)"):
        F.perturb_(params, grads, saved, scales, backend=backend)
    with pytest.raises(ValueError, match=r"saved\[0\] has shape \(5,\)"):
        F.restore_(params, [torch.randn(5), torch.randn(10)], backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(5,\)"):
        F.scaled_grad_sq_sum(params, grads, backend=backend)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_writes_bump_the_version_counters(backend):
    params = [torch.randn(4, 3), torch.randn(10)]
    grads = [torch.randn_like(p) for p in params]
    saved = [torch.empty_like(p) for p in params]
    versions = [p._version for p in params]
    F.perturb_(params, grads, saved, [torch.tensor(0.1)] * 2, backend=backend)
    assert all(p._version > v for p, v in zip(params, versions))
    versions = [p._version for p in params]
    F.restore_(params, saved, backend=backend)
    assert all(p._version > v for p, v in zip(params, versions))
    versions = [p._version for p in params]
    F.add_noise_(params, saved, gammas=0.1, stream=F.NoiseStream(3, 0, [0, 1]), backend=backend)
    assert all(p._version > v for p, v in zip(params, versions))
