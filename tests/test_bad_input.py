"""Bad input gets a clear, early error or the documented safe behaviour, never corrupted weights."""

import math

import pytest
import torch
from torch import nn

import sam_kernels
from helpers import BACKENDS, VARIANT_IDS, VARIANTS, all_params, fill_random_grads, first_step_of, make_params



def _params():
    return [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5))]


# ----------------------------------------------------------------- non-finite
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_non_finite_gradient_skips_the_perturbation(optimizer_cls, kwargs, _id, bad, backend):
    groups = make_params(torch.float32)
    fill_random_grads(groups)
    before = [p.detach().clone() for p in all_params(groups)]
    all_params(groups)[2].grad[1, 3] = bad
    opt = optimizer_cls(groups, torch.optim.SGD, lr=0.0, backend=backend, **kwargs)
    first_step_of(opt)
    assert bool(opt.found_nonfinite) is True
    for p, b in zip(all_params(groups), before):
        assert torch.equal(p.detach(), b), "a skipped perturbation must leave the weights where they were"
    fill_random_grads(groups)  # the second backward
    opt.second_step()
    for p, b in zip(all_params(groups), before):
        assert torch.equal(p.detach(), b)
    assert int(opt.nonfinite_steps) == 1
    # A later finite step perturbs again and clears the flag.
    fill_random_grads(groups)
    first_step_of(opt)
    assert bool(opt.found_nonfinite) is False
    if getattr(opt, "needs_second_pass", True):  # LookSAM's step 1 (k = 2) reuses g_v and perturbs nothing
        assert any(not torch.equal(p.detach(), b) for p, b in zip(all_params(groups), before) if p.numel())
    opt.second_step()
    assert int(opt.nonfinite_steps) == 1


# ----------------------------------------------------------------- step order
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_second_step_before_first_step_raises(optimizer_cls, kwargs, _id):
    params = _params()
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.1, **kwargs)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"second_step\(\).*first_step\(\)"):
        opt.second_step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_first_step_twice_raises_and_leaves_one_clean_perturbation(optimizer_cls, kwargs, _id):
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.0, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    first_step_of(opt)
    perturbed = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"first_step\(\) called while the weights are perturbed"):
        opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(params, perturbed))
    opt.second_step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_rsam_first_step_without_noise_step_raises():
    params = _params()
    opt = sam_kernels.RSAM(params, torch.optim.SGD, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match=r"noise_step\(\)"):
        opt.first_step()
    opt.noise_step()
    with pytest.raises(RuntimeError, match=r"noise_step\(\) called while the weights are at w \+ δ₀"):
        opt.noise_step()


def test_step_without_closure_raises():
    opt = sam_kernels.SAM(_params(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_closure_failure_in_the_second_pass_restores_the_weights(optimizer_cls, kwargs, _id):
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.1, **kwargs)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted in the second pass")
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    opt.step(lambda: sum((p**2).sum() for p in params).backward())  # usable again


def test_state_dict_while_perturbed_raises():
    params = _params()
    opt = sam_kernels.SAM(params, torch.optim.SGD, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()
    with pytest.raises(RuntimeError, match="state_dict.*perturbed"):
        opt.state_dict()
    opt.second_step()
    opt.state_dict()


# ------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize(
    "optimizer_cls,kwargs,name",
    [
        (sam_kernels.SAM, {"rho": -0.1}, "rho"),
        (sam_kernels.SAM, {"rho": math.nan}, "rho"),
        (sam_kernels.SAM, {"rho": math.inf}, "rho"),
        (sam_kernels.SAM, {"rho": "0.05"}, "rho"),
        (sam_kernels.SAM, {"backend": "cudaa"}, "backend"),
        (sam_kernels.ASAM, {"eta": -0.01}, "eta"),
        (sam_kernels.ASAM, {"p": 3}, "p"),
        (sam_kernels.ASAM, {"granularity": "row"}, "granularity"),
        (sam_kernels.RSAM, {"gamma": -1.0}, "gamma"),
        (sam_kernels.RSAM, {"lam": math.nan}, "lam"),
        (sam_kernels.RSAM, {"seed": -1}, "seed"),
        (sam_kernels.RSAM, {"seed": 2**64}, "seed"),
        (sam_kernels.RSAM, {"seed": 1.5}, "seed"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_them(optimizer_cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}\b"):
        optimizer_cls(_params(), torch.optim.SGD, lr=0.1, **kwargs)


def test_invalid_per_group_hyperparameter_raises():
    p1, p2 = _params()
    with pytest.raises(ValueError, match=r"Invalid rho in a param group: -1"):
        sam_kernels.SAM([{"params": [p1]}, {"params": [p2], "rho": -1}], torch.optim.SGD, lr=0.1)
    opt = sam_kernels.SAM([p1], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid rho"):
        opt.add_param_group({"params": [p2], "rho": math.nan})
    opt.param_groups[0]["rho"] = -3.0  # changed behind the optimizer's back: caught before any work
    p1.grad = torch.randn_like(p1)
    with pytest.raises(ValueError, match=r"Invalid rho"):
        opt.first_step()


def test_base_optimizer_must_be_an_optimizer():
    with pytest.raises(TypeError, match="base_optimizer"):
        sam_kernels.SAM(_params(), "sgd", lr=0.1)


def test_base_kwargs_with_an_instance_raise():
    params = _params()
    with pytest.raises(ValueError, match="lr"):
        sam_kernels.SAM(params, torch.optim.SGD(params, lr=0.1), lr=0.2)


def test_instance_over_other_params_raises():
    params, other = _params(), _params()
    with pytest.raises(ValueError, match="exactly the parameters"):
        sam_kernels.SAM(params, torch.optim.SGD(other, lr=0.1))


def test_base_optimizer_using_the_same_group_key_raises():
    with pytest.raises(ValueError, match=r"Adadelta already uses the param-group key\(s\) \['rho'\]"):
        sam_kernels.SAM(_params(), torch.optim.Adadelta, lr=1.0)


# -------------------------------------------------------------- gradients
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_sparse_gradients_raise_before_touching_weights(optimizer_cls, kwargs, _id):
    embedding = nn.Embedding(10, 4, sparse=True)
    linear = nn.Linear(4, 1)
    params = [embedding.weight, *linear.parameters()]
    before = [p.detach().clone() for p in params]
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.1, **kwargs)
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
    linear(embedding(torch.tensor([1, 2, 3]))).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(param_groups\[0\]\['params'\]\[0\]\)"):
        opt.first_step()
    opt.restore()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_params_on_different_devices_raise(optimizer_cls, kwargs, _id):
    cpu = nn.Parameter(torch.randn(3))
    other = nn.Parameter(torch.randn(3, device="meta"))
    opt = optimizer_cls([cpu, other], torch.optim.SGD, lr=0.1, **kwargs)
    cpu.grad, other.grad = torch.randn(3), torch.randn(3, device="meta")
    before = cpu.detach().clone()
    with pytest.raises(RuntimeError, match="one device"):
        first_step_of(opt)
    assert torch.equal(cpu.detach(), before)

