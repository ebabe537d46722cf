"""accelerate: the README's recipes through sam_kernels.integrations.accelerate.prepare, against hand loops.

Bit-exact: a float64 model with BatchNorm, the same batches, the same starting weights.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import sam_kernels

accelerate = pytest.importorskip("accelerate")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from sam_kernels.integrations.accelerate import SAMAcceleratedOptimizer, prepare, with_explicit_api  # noqa: E402

STEPS, BATCH, K = 3, 8, 2


def _reset_accelerate():
    """accelerate's states are process-wide singletons: each test's Accelerator starts afresh."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    _reset_accelerate()
    yield
    _reset_accelerate()


def _net():
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


def _data():
    return torch.randn(STEPS * BATCH, 5, dtype=torch.float64), torch.randint(0, 3, (STEPS * BATCH,))


def _loader(x, y):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


OPTIMIZERS = {
    "sam": lambda params: sam_kernels.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "asam": lambda params: sam_kernels.ASAM(params, torch.optim.SGD, rho=0.5, granularity="filter", lr=0.1),
    "rsam": lambda params: sam_kernels.RSAM(params, torch.optim.SGD, rho=0.05, gamma=0.1, seed=5, lr=0.1),
}


def _scheduler(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def _assert_same(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_with_closure_returns_the_loss_and_equals_a_hand_loop(name):
    x, y = _data()
    model = _net()
    twin = copy.deepcopy(model)
    accelerator = accelerate.Accelerator(cpu=True)
    opt = OPTIMIZERS[name](model.parameters())
    model, opt, loader, sched = prepare(accelerator, model, opt, _loader(x, y), _scheduler(opt))
    assert isinstance(opt, SAMAcceleratedOptimizer) and accelerator._optimizers == [opt]
    opt.freeze_running_stats_in_second_pass(model)
    losses = []
    for xb, yb in loader:
        def closure():
            loss = _loss(model, xb, yb)
            accelerator.backward(loss)
            return loss
        losses.append(opt.step(closure))
        sched.step()

    hand = OPTIMIZERS[name](twin.parameters())
    hand.freeze_running_stats_in_second_pass(twin)
    hand_sched = _scheduler(hand)
    for xb, yb in _loader(x, y):
        def closure():
            loss = _loss(twin, xb, yb)
            loss.backward()
            return loss
        expected = hand.step(closure)
        assert torch.equal(losses.pop(0), expected)
        hand_sched.step()
    _assert_same(model, twin)


@pytest.mark.parametrize("name", ["sam", "rsam"])
def test_explicit_api_with_accumulation_and_clipping_equals_the_readme_recipe(name):
    x, y = _data()
    model = _net()
    twin = copy.deepcopy(model)
    accelerator = accelerate.Accelerator(cpu=True)
    opt = OPTIMIZERS[name](model.parameters())
    model, opt, loader, sched = prepare(accelerator, model, opt, _loader(x, y), _scheduler(opt))
    for xb, yb in loader:  # the recipe in sam_kernels/integrations/accelerate.py and the README
        micro = list(zip(xb.chunk(K), yb.chunk(K)))

        def backward_over_window():
            for i, (xm, ym) in enumerate(micro):
                with accelerator.no_sync(model) if i < K - 1 else contextlib.nullcontext():
                    accelerator.backward(_loss(model, xm, ym) / K)

        if name == "rsam":
            opt.noise_step()
        opt.zero_grad()
        backward_over_window()
        opt.first_step(zero_grad=True)
        with sam_kernels.frozen_running_stats(model):
            backward_over_window()
        accelerator.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()

    hand = OPTIMIZERS[name](twin.parameters())
    hand_sched = _scheduler(hand)
    for xb, yb in _loader(x, y):  # the README's plain-PyTorch accumulation recipe
        def backward_over_window():
            for xm, ym in zip(xb.chunk(K), yb.chunk(K)):
                (_loss(twin, xm, ym) / K).backward()

        if name == "rsam":
            hand.noise_step()
        hand.zero_grad()
        backward_over_window()
        hand.first_step(zero_grad=True)
        with sam_kernels.frozen_running_stats(twin):
            backward_over_window()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        hand.second_step(zero_grad=True)
        hand_sched.step()
    _assert_same(model, twin)


def test_sam_steps_inside_accelerator_accumulate_are_refused_not_silently_skipped():
    x, y = _data()
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt, loader = prepare(accelerator, model, OPTIMIZERS["sam"](model.parameters()), _loader(x, y))
    calls = []
    xb, yb = next(iter(loader))
    with accelerator.accumulate(model):  # the first micro-batch of a window: accelerate would skip the step
        def closure():
            calls.append(1)
            loss = _loss(model, xb, yb)
            accelerator.backward(loss)
            return loss
        with pytest.raises(RuntimeError, match="accelerator.accumulate.*last micro-batch.*explicit API"):
            opt.step(closure)
        accelerator.backward(_loss(model, xb, yb))
        with pytest.raises(RuntimeError, match="accelerator.accumulate"):
            opt.first_step()
    assert calls == []
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_save_state_and_load_state_continue_bit_identically(tmp_path):
    x, y = _data()
    start = _net().state_dict()

    def setup(seed):
        _reset_accelerate()
        model = _net()
        model.load_state_dict(start)
        accelerator = accelerate.Accelerator(cpu=True)
        opt = sam_kernels.RSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.1, seed=seed, lr=0.1,
                               momentum=0.9)
        model, opt, sched = prepare(accelerator, model, opt, _scheduler(opt))
        return accelerator, model, opt, sched

    def train(model, opt, sched, batches):
        for xb, yb in batches:
            def closure():
                loss = _loss(model, xb, yb)
                loss.backward()
                return loss
            opt.step(closure)
            sched.step()

    batches = list(zip(x.split(BATCH), y.split(BATCH)))
    accelerator, model, opt, sched = setup(seed=1)
    train(model, opt, sched, batches[:2])
    accelerator.save_state(str(tmp_path / "state"))
    train(model, opt, sched, batches[2:])

    # Another seed: load_state restores R-SAM's seed and step with the momentum and the scheduler.
    accelerator, resumed, opt, sched = setup(seed=99)
    accelerator.load_state(str(tmp_path / "state"))
    assert opt.sam.seed == 1
    train(resumed, opt, sched, batches[2:])
    _assert_same(model, resumed)


@pytest.mark.parametrize("overflow", [False, True])
def test_fp16_grad_scaler_of_the_prepared_optimizer_matches_second_step_with_the_scaler(overflow):
    """accelerate's fp16 GradScaler (here on the CPU, given to the wrapper as accelerate does on a GPU)."""
    accelerate.Accelerator(cpu=True)
    model = _net()
    twin = copy.deepcopy(model)
    opt = with_explicit_api(AcceleratedOptimizer(OPTIMIZERS["sam"](model.parameters()), device_placement=False,
                                                 scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)))
    hand = OPTIMIZERS["sam"](twin.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = _data()
    for step, (xb, yb) in enumerate(zip(x.split(BATCH), y.split(BATCH))):
        blow_up = float("inf") if overflow and step == 1 else 1.0
        for m, o, s in ((model, opt, opt.scaler), (twin, hand, scaler)):
            o.zero_grad()
            s.scale(_loss(m, xb, yb)).backward()
            o.first_step(zero_grad=True)
            s.scale(_loss(m, xb, yb) * blow_up).backward()
            if o is opt:
                opt.step()  # through accelerate's GradScaler, and its update()
            else:
                o.second_step(scaler=s)
                s.update()
        assert opt.step_was_skipped == (blow_up != 1.0)
        _assert_same(model, twin)
    assert opt.scaler.get_scale() == scaler.get_scale()

    # step(closure) through the scaler returns the loss, as the plain optimizer does.
    def closure_of(m, s):
        def closure():
            loss = _loss(m, x, y)
            s.scale(loss).backward()
            return loss
        return closure

    opt.zero_grad()
    hand.zero_grad()
    loss = opt.step(closure_of(model, opt.scaler))
    expected = hand.step(closure_of(twin, scaler), scaler=scaler)
    scaler.update()
    assert torch.equal(loss, expected)
    _assert_same(model, twin)


def test_errors_say_what_state_the_optimizer_is_in_and_what_to_do():
    model = _net()
    accelerator = accelerate.Accelerator(cpu=True)
    plain = accelerator.prepare(OPTIMIZERS["sam"](model.parameters()))  # without the helper
    with pytest.raises(RuntimeError, match="no SAM step is pending.*integrations.accelerate.prepare"):
        plain.step()
    opt = with_explicit_api(plain)
    assert opt is plain and isinstance(opt, SAMAcceleratedOptimizer)
    with pytest.raises(RuntimeError, match="second_step.*not perturbed.*first_step"):
        opt.second_step()
