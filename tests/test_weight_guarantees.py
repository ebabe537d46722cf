"""docs/DESIGN.md §7 on inputs that used to slip through: shared memory, empty filters, state loaded
into the base optimizer. Every backend refuses or behaves exactly, and no weight is left moved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sam_kernels
from sam_kernels import functional as F
from helpers import BACKENDS, VARIANT_IDS, VARIANTS, first_step_of


def _grads(params):
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn(p.shape, dtype=p.dtype)


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_expanded_view_among_the_params_is_refused_before_any_write(optimizer_cls, kwargs, _id, backend):
    first = nn.Parameter(torch.randn(4, 3))
    expanded = nn.Parameter(torch.randn(1, 3).expand(4, 3))  # stride 0: four rows share memory
    last = nn.Parameter(torch.randn(5))
    params = [first, expanded, last]
    before = [p.detach().clone() for p in params]
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.1, backend=backend, **kwargs)
    _grads(params)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] has elements that share memory"):
        first_step_of(opt)
    opt.restore()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_params_viewing_one_storage_are_refused_before_any_write(optimizer_cls, kwargs, _id, backend):
    storage = torch.randn(20)
    a = nn.Parameter(storage[:12])
    b = nn.Parameter(storage[8:])  # shares elements 8..11 with a
    params = [a, b]
    before = storage.clone()
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.1, backend=backend, **kwargs)
    _grads(params)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] and param_groups\[0\]\['params'\]\[1\] overlap"):
        first_step_of(opt)
    opt.restore()
    assert torch.equal(storage, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_storage_are_fine(backend):
    storage = torch.randn(20)
    params = [nn.Parameter(storage[:10]), nn.Parameter(storage[10:])]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt = sam_kernels.SAM(params, torch.optim.SGD, lr=0.1, backend=backend)
    ref = sam_kernels.SAM(twins, torch.optim.SGD, lr=0.1, backend="reference")
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.first_step(), ref.first_step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)
    opt.second_step(), ref.second_step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_filter_norms_of_empty_filters_are_zero(backend):
    tensors = [torch.randn(4, 0), torch.randn(3, 0, 2), torch.randn(2, 5)]
    norms = F.filter_norms(tensors, backend=backend)
    assert torch.equal(norms[0], torch.zeros(4)) and torch.equal(norms[1], torch.zeros(3))
    torch.testing.assert_close(norms[2], tensors[2].norm(dim=1))


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_loading_state_into_the_base_optimizer_keeps_one_set_of_groups(optimizer_cls, kwargs, _id):
    model = nn.Linear(3, 2)
    opt = optimizer_cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
    state = opt.base_optimizer.state_dict()
    opt.base_optimizer.load_state_dict(state)  # what torch.distributed.checkpoint's set_state_dict does
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.state is opt.base_optimizer.state
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(4, 3)
    opt.step(lambda: model(x).pow(2).sum().backward())
    scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.param_groups[0]["rho"] = 0.2
    assert opt.base_optimizer.param_groups[0]["rho"] == 0.2
    opt.step(lambda: model(x).pow(2).sum().backward())  # the new groups still carry every SAM key


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", [v for v in VARIANTS if not issubclass(v[0], sam_kernels.RSAM)],
                         ids=[v[2] for v in VARIANTS if not issubclass(v[0], sam_kernels.RSAM)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_low_precision_gradient_is_summed_in_its_weights_precision(optimizer_cls, kwargs, _id, backend):
    """A float64 weight with a bfloat16 gradient of 1e30: (1e30)² is finite in float64, so no backend skips."""
    def make():
        w = nn.Parameter(torch.linspace(0.5, 2.0, 6, dtype=torch.float64).reshape(2, 3))
        w.grad_dtype = None  # allow a gradient of another dtype (torch >= 2.10)
        w.grad = torch.tensor([[1e30, 1.0, -2.0], [3.0, -1e29, 0.5]], dtype=torch.bfloat16)
        return w

    w, twin = make(), make()
    opt = optimizer_cls([w], torch.optim.SGD, lr=0.0, backend=backend, **kwargs)
    ref = optimizer_cls([twin], torch.optim.SGD, lr=0.0, backend="reference", **kwargs)
    before = w.detach().clone()
    opt.first_step(), ref.first_step()
    assert bool(opt.found_nonfinite) is False and bool(ref.found_nonfinite) is False
    assert not torch.equal(w.detach(), before)
    torch.testing.assert_close(w.detach(), twin.detach(), rtol=1e-5, atol=1e-9)
    opt.restore()
    assert torch.equal(w.detach(), before)
