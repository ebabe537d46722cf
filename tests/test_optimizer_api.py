"""The optimizers behave like torch.optim optimizers: groups, schedulers, closures, checkpoints."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import sam_kernels
from helpers import BACKENDS, VARIANT_IDS, VARIANTS


def _model():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _batch():
    return torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _make(optimizer_cls, kwargs, params, **extra):
    if issubclass(optimizer_cls, sam_kernels.RSAM):
        extra.setdefault("seed", 1234)
    return optimizer_cls(params, torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4, **kwargs, **extra)


def _explicit_step(opt, model, x, y):
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    if getattr(opt, "needs_second_pass", True):  # LookSAM: only on its SAM steps
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_closure_step_equals_explicit_steps(optimizer_cls, kwargs, _id):
    model = _model()
    twin = copy.deepcopy(model)
    opt_closure = _make(optimizer_cls, kwargs, model.parameters())
    opt_explicit = _make(optimizer_cls, kwargs, twin.parameters())
    for _ in range(3):
        x, y = _batch()
        loss_a = opt_closure.step(_closure(model, x, y))
        loss_b = _explicit_step(opt_explicit, twin, x, y)
        assert torch.equal(loss_a, loss_b)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_checkpoint_resume_is_bit_identical(optimizer_cls, kwargs, _id):
    model = _model()
    opt = _make(optimizer_cls, kwargs, model.parameters())
    batches = [_batch() for _ in range(6)]
    for x, y in batches[:3]:
        opt.step(_closure(model, x, y))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for x, y in batches[3:]:
        opt.step(_closure(model, x, y))

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = _model()
    resumed.load_state_dict(checkpoint["model"])
    # A different seed and rho at construction: the checkpoint's must win.
    resumed_opt = _make(optimizer_cls, kwargs, resumed.parameters(), **({"seed": 99} if optimizer_cls is sam_kernels.RSAM else {}))
    for group in resumed_opt.param_groups:
        group["rho"] = 0.9
    resumed_opt.load_state_dict(checkpoint["opt"])
    assert resumed_opt.param_groups is resumed_opt.base_optimizer.param_groups
    for x, y in batches[3:]:
        resumed_opt.step(_closure(resumed, x, y))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_state_dict_carries_rsam_seed_step_and_asam_options():
    model = _model()
    rsam = sam_kernels.RSAM(model.parameters(), torch.optim.SGD, lr=0.1, seed=2**64 - 1)
    x, y = _batch()
    rsam.step(_closure(model, x, y))
    state = rsam.state_dict()
    assert state["sam_kernels"]["seed"] == 2**64 - 1 and state["sam_kernels"]["step"] == 1
    assert state["param_groups"][0]["gamma"] == 0.1 and state["param_groups"][0]["lam"] == 1.0

    asam = sam_kernels.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, p=float("inf"), granularity="filter")
    other = sam_kernels.ASAM(model.parameters(), torch.optim.SGD, lr=0.1)
    other.load_state_dict(asam.state_dict())
    assert other.p == float("inf") and other.granularity == "filter"


def test_param_groups_are_shared_with_the_base_optimizer_and_schedulers_work():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=1.0, rho=0.05)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        _explicit_step(opt, model, x, y)
        scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    opt.step(_closure(model, x, y))
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.25


def test_add_param_group_reaches_the_base_optimizer_with_defaults():
    first, second = nn.Linear(3, 3), nn.Linear(3, 1)
    opt = sam_kernels.ASAM(first.parameters(), torch.optim.SGD, lr=0.1, rho=0.3, eta=0.02)
    opt.add_param_group({"params": second.parameters(), "rho": 0.7, "lr": 0.01})
    assert len(opt.base_optimizer.param_groups) == 2
    group = opt.base_optimizer.param_groups[1]
    assert group["rho"] == 0.7 and group["eta"] == 0.02 and group["lr"] == 0.01 and group["momentum"] == 0
    before = second.weight.detach().clone()
    x = torch.randn(4, 3)
    opt.step(lambda: second(first(x)).sum().backward())
    assert not torch.equal(second.weight, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_group_rho_scales_each_group_of_one_global_norm(backend):
    a, b = nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), nn.Parameter(torch.randn(5, dtype=torch.float64))
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = [a.detach().clone(), b.detach().clone()]
    opt = sam_kernels.SAM([{"params": [a]}, {"params": [b], "rho": 0.2}], torch.optim.SGD, lr=0.1, rho=0.05, backend=backend)
    opt.first_step()
    norm = torch.sqrt((a.grad**2).sum() + (b.grad**2).sum())
    torch.testing.assert_close(a.detach() - before[0], 0.05 * a.grad / norm)
    torch.testing.assert_close(b.detach() - before[1], 0.2 * b.grad / norm)


def test_base_optimizer_instance_with_per_group_rho():
    a, b = nn.Parameter(torch.randn(3, dtype=torch.float64)), nn.Parameter(torch.randn(3, dtype=torch.float64))
    base = torch.optim.SGD([{"params": [a], "rho": 0.3}, {"params": [b]}], lr=0.1)
    opt = sam_kernels.SAM([{"params": [b], "rho": 0.01}, {"params": [a]}], base, rho=0.05)
    assert opt.base_optimizer is base
    assert [g["rho"] for g in opt.param_groups] == [0.3, 0.01]
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = a.detach().clone()
    opt.first_step()
    norm = torch.sqrt((a.grad**2).sum() + (b.grad**2).sum())
    torch.testing.assert_close(a.detach() - before, 0.3 * a.grad / norm)


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_frozen_and_unused_params_are_never_moved(optimizer_cls, kwargs, _id):
    used, unused = nn.Linear(3, 2), nn.Linear(3, 2)
    frozen = nn.Parameter(torch.randn(3), requires_grad=False)
    params = [*used.parameters(), *unused.parameters(), frozen]
    opt = _make(optimizer_cls, kwargs, params)
    fixed = [p.detach().clone() for p in [*unused.parameters(), frozen]]
    x = torch.randn(5, 3)
    for _ in range(2):
        opt.step(lambda: used(x).pow(2).sum().backward())
    assert all(torch.equal(p, f) for p, f in zip([*unused.parameters(), frozen], fixed))


def test_rsam_seed_makes_training_reproducible_and_distinct():
    def train(seed):
        torch.manual_seed(0)
        model = _model()
        opt = sam_kernels.RSAM(model.parameters(), torch.optim.SGD, lr=0.1, seed=seed, gamma=0.2)
        torch.manual_seed(1)
        for _ in range(2):
            x, y = _batch()
            opt.step(_closure(model, x, y))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train(5), train(5))
    assert not torch.equal(train(5), train(6))


def test_rsam_default_seed_comes_from_torch_default_generator():
    params = [nn.Parameter(torch.randn(3))]
    torch.manual_seed(42)
    first = sam_kernels.RSAM(params, torch.optim.SGD, lr=0.1).seed
    torch.manual_seed(42)
    assert sam_kernels.RSAM(params, torch.optim.SGD, lr=0.1).seed == first


def test_found_nonfinite_is_a_device_flag_set_by_first_step():
    p = nn.Parameter(torch.randn(3))
    opt = sam_kernels.SAM([p], torch.optim.SGD, lr=0.1)
    assert opt.found_nonfinite is None
    p.grad = torch.randn(3)
    opt.first_step()
    assert opt.found_nonfinite.dtype == torch.bool and opt.found_nonfinite.device == p.device
    assert not bool(opt.found_nonfinite)


def test_works_with_adamw_base_and_repr():
    model = _model()
    opt = sam_kernels.ASAM(model.parameters(), torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    x, y = _batch()
    losses = [float(opt.step(_closure(model, x, y)).detach()) for _ in range(20)]
    assert losses[-1] < losses[0]
    assert "AdamW" in repr(opt) and "ASAM" in repr(opt)
