"""The sharpness measures of ASAM: adaptive sharpness is invariant under a-transformations."""

import copy

import pytest
import torch
from torch import nn

import sam_kernels
from helpers import TwoLayerReLU


def _transformed(model, a):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc1.weight.mul_(a[:, None])
        other.fc2.weight.div_(a[None, :])
    return other


def _loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _batches(n=3):
    return [(torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)) for _ in range(n)]


@pytest.mark.parametrize("p", [2, float("inf")])
@pytest.mark.parametrize("steps", [1, 5])
def test_adaptive_sharpness_is_invariant_and_plain_sharpness_is_not(p, steps):
    model = TwoLayerReLU()
    other = _transformed(model, torch.rand(7, dtype=torch.float64) * 4 + 0.25)
    batches = _batches()
    rho = 0.5 if p == 2 else 0.05
    adaptive = dict(rho=rho, adaptive="element", p=p, eta=0.0, steps=steps)
    a = sam_kernels.sharpness(model, _loss, batches, **adaptive)
    b = sam_kernels.sharpness(other, _loss, batches, **adaptive)
    assert a > 0
    assert a == pytest.approx(b, rel=1e-9)
    plain_a = sam_kernels.sharpness(model, _loss, batches, rho=rho, p=p, steps=steps)
    plain_b = sam_kernels.sharpness(other, _loss, batches, rho=rho, p=p, steps=steps)
    assert abs(plain_a - plain_b) > 1e-3 * abs(plain_a)


def test_more_steps_give_a_tighter_lower_bound_and_weights_are_restored():
    model = TwoLayerReLU()
    before = [p.detach().clone() for p in model.parameters()]
    batches = _batches(2)
    one = sam_kernels.sharpness(model, _loss, batches, rho=0.2, steps=1)
    many = sam_kernels.sharpness(model, _loss, batches, rho=0.2, steps=10)
    assert many >= one - 1e-12 and one > 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_first_order_estimate_matches_the_sam_perturbation():
    model = TwoLayerReLU()
    batch = _batches(1)[0]
    value = sam_kernels.sharpness(model, _loss, [batch], rho=0.1, steps=1)
    twin = copy.deepcopy(model)
    opt = sam_kernels.SAM(twin.parameters(), torch.optim.SGD, lr=0.0, rho=0.1, backend="reference")
    base = _loss(twin, batch)
    base.backward()
    opt.first_step()
    with torch.no_grad():
        assert value == pytest.approx(float(_loss(twin, batch) - base), rel=1e-9)


@pytest.mark.parametrize("kwargs,name", [({"rho": -1}, "rho"), ({"rho": 0.1, "p": 1}, "p"),
                                         ({"rho": 0.1, "steps": 0}, "steps"), ({"rho": 0.1, "adaptive": "x"}, "adaptive")])
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        sam_kernels.sharpness(TwoLayerReLU(), _loss, _batches(1), **kwargs)
