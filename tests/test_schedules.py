"""SAM steps on a schedule (sam_kernels.schedules): which steps take the second pass, and what the others do."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import sam_kernels
from sam_kernels.schedules import Adaptive, Bernoulli
from helpers import BACKENDS


def _model():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batches(n):
    return [(torch.randn(12, 5), torch.randint(0, 3, (12,))) for _ in range(n)]


def _counting_closure(model, x, y, calls):
    def closure():
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _passes_per_step(opt, model, batches):
    per_step = []
    for x, y in batches:
        calls = []
        opt.step(_counting_closure(model, x, y, calls))
        per_step.append(len(calls))
    return per_step


@pytest.mark.parametrize("cls,kwargs", [(sam_kernels.SAM, {}), (sam_kernels.ASAM, {"granularity": "filter"}),
                                        (sam_kernels.RSAM, {"seed": 3})], ids=["sam", "asam", "rsam"])
def test_an_interval_schedule_takes_the_second_pass_every_kth_step(cls, kwargs):
    model = _model()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, schedule=3, **kwargs)
    assert _passes_per_step(opt, model, _batches(7)) == [2, 1, 1, 2, 1, 1, 2]
    assert opt.state_dict()["sam_kernels"]["schedule_step"] == 7


def test_no_schedule_is_every_step():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert _passes_per_step(opt, model, _batches(3)) == [2, 2, 2]


def test_bernoulli_decisions_come_from_the_seed_alone_on_every_backend():
    patterns = []
    for backend in BACKENDS:
        model = _model()
        opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend,
                              schedule=Bernoulli(0.5, seed=2024))
        patterns.append(_passes_per_step(opt, model, _batches(12)))
    assert all(p == patterns[0] for p in patterns) and set(patterns[0]) == {1, 2}
    other = Bernoulli(0.5, seed=2025)
    assert [other.due(t) for t in range(12)] != [p == 2 for p in patterns[0]]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_bernoulli_frequency_matches_p(p):
    schedule = Bernoulli(p, seed=torch.randint(0, 2 ** 62, ()).item())
    n = 4000
    frequency = sum(schedule.due(t) for t in range(n)) / n
    assert abs(frequency - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 standard deviations


def test_bernoulli_probability_may_follow_the_step():
    schedule = Bernoulli(lambda t: 1.0 if t < 5 else 0.0, seed=1)
    assert [schedule.due(t) for t in range(10)] == [True] * 5 + [False] * 5
    with pytest.raises(ValueError, match="probability"):
        Bernoulli(lambda t: 1.5, seed=1).due(0)


def test_adaptive_decisions_equal_a_float64_reference():
    model = _model()
    c, beta = 0.5, 0.8
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, schedule=Adaptive(c, beta))
    mean = var = None
    decisions, expected = [], []
    for x, y in _batches(25):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        # The reference: AE-SAM's rule on ‖g‖² (float64), against the statistics of the steps before.
        n = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters())
        if mean is None:
            expected.append(True)
            mean, var = n, 0.0
        else:
            expected.append(n >= mean + c * math.sqrt(var))
            mean = beta * mean + (1 - beta) * n
            var = beta * var + (1 - beta) * (n - mean) ** 2
        decisions.append(opt.sam_step_due)
        if opt.sam_step_due:
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step()
    assert decisions == expected and True in decisions[1:] and False in decisions


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_steps_are_the_plain_base_step_bit_for_bit(backend):
    model = _model()
    twin = copy.deepcopy(model)
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3,
                          backend=backend, schedule=Bernoulli(0.0, seed=5))
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for x, y in _batches(4):
        opt.step(_counting_closure(model, x, y, []))
        plain.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_interval_schedule_equals_sam_steps_and_plain_steps_interleaved():
    model = _model()
    twin = copy.deepcopy(model)
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, schedule=2)
    ref = sam_kernels.SAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for t, (x, y) in enumerate(_batches(5)):
        opt.step(_counting_closure(model, x, y, []))
        ref.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        if t % 2 == 0:
            ref.first_step(zero_grad=True)
            nn.functional.cross_entropy(twin(x), y).backward()
            ref.second_step()
        else:
            ref.base_optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kwargs", [(sam_kernels.SAM, {}), (sam_kernels.RSAM, {"seed": 3})], ids=["sam", "rsam"])
def test_first_step_on_a_skipped_step_refuses_and_touches_nothing(cls, kwargs):
    model = _model()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, schedule=Bernoulli(0.0, seed=1), **kwargs)
    x, y = _batches(1)[0]
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()  # a skipped step draws no noise
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    assert not opt.sam_step_due
    with pytest.raises(RuntimeError, match="not a SAM step.*second_step"):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.second_step()  # the plain step
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", [sam_kernels.RSAM, sam_kernels.RGSAM])
def test_rsam_and_rgsam_refuse_the_adaptive_schedule(cls):
    with pytest.raises(ValueError, match="adaptive"):
        cls(_model().parameters(), torch.optim.SGD, lr=0.1, schedule=Adaptive())


@pytest.mark.parametrize("make", [lambda: Bernoulli(0.5, seed=11), lambda: Adaptive(c=0.3, beta=0.7), lambda: 3],
                         ids=["bernoulli", "adaptive", "interval"])
def test_resume_mid_schedule_is_bit_identical(make):
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, schedule=make())
    _passes_per_step(opt, model, _batches(4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(state["model"])
    resumed_opt = sam_kernels.SAM(resumed.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, schedule=make())
    resumed_opt.load_state_dict(state["opt"])
    batches = _batches(6)
    assert _passes_per_step(opt, model, batches) == _passes_per_step(resumed_opt, resumed, batches)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_invalid_schedules_are_refused():
    for bad in (0, -2, 1.5, "every", True):
        with pytest.raises(ValueError, match="schedule"):
            sam_kernels.SAM(_model().parameters(), torch.optim.SGD, lr=0.1, schedule=bad)
    with pytest.raises(ValueError, match="beta"):
        Adaptive(beta=1.0)
