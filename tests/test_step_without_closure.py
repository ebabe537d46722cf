"""``step()`` without a closure finishes a pending step (issue 20): under every optimizer and variant it does
what ``second_step()`` does, and it leaves ``step(closure)`` as it was. This is what frameworks that call
``optimizer.step()`` themselves rely on (transformers' Trainer through SAMTrainer, accelerate, Lightning)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sam_kernels
from helpers import VARIANT_IDS, VARIANTS


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _make(cls, kwargs, model):
    extra = {"seed": 11} if hasattr(cls, "noise_step") else {}
    return cls(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, **kwargs, **extra)


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _explicit(opt, model, x, y, finish):
    if hasattr(opt, "noise_step"):
        opt.noise_step()
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    if getattr(opt, "needs_second_pass", True):  # LookSAM: a second pass on its SAM steps only
        _loss(model, x, y).backward()
    finish(opt)


@pytest.mark.parametrize("cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_step_without_closure_after_first_step_is_second_step_and_step_closure_is_unchanged(cls, kwargs, _id):
    model = _model()
    twins = [copy.deepcopy(model) for _ in range(2)]
    by_second_step, by_step, by_closure = (_make(cls, kwargs, m) for m in (model, *twins))
    for _ in range(3):  # (LookSAM's k = 2: SAM steps and a step that reuses g_v)
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        _explicit(by_second_step, model, x, y, lambda opt: opt.second_step())
        _explicit(by_step, twins[0], x, y, lambda opt: opt.step())

        def closure():
            loss = _loss(twins[1], x, y)
            loss.backward()
            return loss

        by_closure.zero_grad()
        by_closure.step(closure)
    for other in twins:
        for a, b in zip(model.parameters(), other.parameters()):
            assert torch.equal(a, b)
    for a, b in zip(by_second_step.state.values(), by_step.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.mark.parametrize("cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_step_without_closure_and_nothing_pending_names_the_state_and_the_recipes(cls, kwargs, _id):
    model = _model()
    opt = _make(cls, kwargs, model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no SAM step is pending.*not perturbed.*SAMTrainer.*accelerate"):
        opt.step()
    if hasattr(opt, "noise_step"):  # after noise_step() the weights are at ŵ: step() says first_step() is due
        opt.noise_step()
        with pytest.raises(RuntimeError, match="noise_step.*first_step"):
            opt.step()
        opt.restore()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", [sam_kernels.SAM, sam_kernels.RSAM])
def test_step_without_closure_on_a_step_the_schedule_skips_is_the_plain_base_step(cls):
    """schedule=2: steps 1, 3, ... take one pass; a framework's step() after it is second_step(), the base step."""
    model = _model()
    twin = copy.deepcopy(model)
    extra = {"seed": 3} if cls is sam_kernels.RSAM else {}
    opts = [cls(m.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, schedule=2, **extra) for m in (model, twin)]
    for step in range(4):
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        for opt, m, finish in ((opts[0], model, "step"), (opts[1], twin, "second_step")):
            assert opt.sam_step_due == (step % 2 == 0)
            if hasattr(opt, "noise_step"):
                opt.noise_step()  # (nothing on a skipped step)
            opt.zero_grad()
            _loss(m, x, y).backward()
            if opt.sam_step_due:
                opt.first_step(zero_grad=True)
                _loss(m, x, y).backward()
            getattr(opt, finish)()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
