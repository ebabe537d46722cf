"""Real training loops: AMP with GradScaler, BatchNorm statistics, gradient accumulation, torch.compile."""

import copy

import pytest
import torch
from torch import nn

import sam_kernels
from helpers import BACKENDS, VARIANT_IDS, VARIANTS


def _make(cls, kwargs, params, **extra):
    if issubclass(cls, sam_kernels.RSAM):  # RSAM, RGSAM
        extra.setdefault("seed", 21)
    return cls(params, torch.optim.SGD, lr=0.05, momentum=0.9, **kwargs, **extra)


def _mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(6, 16, dtype=dtype), nn.Tanh(), nn.Linear(16, 3, dtype=dtype))


def _second_pass_needed(opt) -> bool:
    """LookSAM takes the second forward/backward only on its SAM steps; every other optimizer always."""
    return getattr(opt, "needs_second_pass", True)


def _skip_if_no_scaler(opt, scaler) -> None:
    if scaler is not None and isinstance(opt, sam_kernels.WSAM) and opt.decouple:
        pytest.skip("WSAM(decouple=True) refuses a GradScaler (tested in test_sam_family.py)")


def _first_pass(opt, model, x, y, scale=1.0):
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
    (nn.functional.cross_entropy(model(x), y) * scale).backward()


# ---------------------------------------------------------------------- AMP
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_scaled_gradients_give_the_same_perturbation(optimizer_cls, kwargs, _id):
    model = _mlp(torch.float64)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt, opt_scaled = _make(optimizer_cls, kwargs, model.parameters()), _make(optimizer_cls, kwargs, twin.parameters())
    _first_pass(opt, model, x, y)
    _first_pass(opt_scaled, twin, x, y, scale=65536.0)
    opt.first_step()
    opt_scaled.first_step()
    for a, b in zip(model.parameters(), twin.parameters()):
        # equal up to the 1e-12 norm guard and rounding
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def _amp_loop(model, opt, scaler, batches, dtype, clip=None):
    loss_fn = nn.CrossEntropyLoss()
    _skip_if_no_scaler(opt, scaler)
    for x, y in batches:
        if isinstance(opt, sam_kernels.RSAM):
            opt.noise_step()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        opt.first_step(zero_grad=True)
        if _second_pass_needed(opt):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                second = loss_fn(model(x), y)
            (scaler.scale(second) if scaler else second).backward()
        if clip is not None:
            if scaler:
                scaler.unscale_(opt.base_optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True, scaler=scaler)
        if scaler:
            scaler.update()


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("clip", [None, 0.5])
def test_grad_scaler_unscales_exactly_once(optimizer_cls, kwargs, _id, clip):
    """With a constant power-of-two scale, the AMP loop equals the unscaled loop."""
    model = _mlp()
    twin = copy.deepcopy(model)
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(4)]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)
    _amp_loop(model, _make(optimizer_cls, kwargs, model.parameters()), scaler, batches, torch.float32, clip)
    _amp_loop(twin, _make(optimizer_cls, kwargs, twin.parameters()), None, batches, torch.float32, clip)
    assert scaler.get_scale() == 1024.0
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("overflow_pass", [1, 2])
def test_overflow_in_either_pass_skips_the_step_and_lowers_the_scale(optimizer_cls, kwargs, _id, overflow_pass):
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _make(optimizer_cls, kwargs, model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    _skip_if_no_scaler(opt, scaler)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    _first_pass(opt, model, x, y, scale=scaler.get_scale())
    if overflow_pass == 1:
        model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if overflow_pass == 2:
        model[2].bias.grad[1] = float("nan")
    opt.second_step(scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_unscale_on_the_wrapper_is_refused():
    model = _mlp()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(opt.base_optimizer\)"):
        opt.second_step(scaler=scaler)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_autocast_training_learns(optimizer_cls, kwargs, _id, dtype):
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    opt = _make(optimizer_cls, kwargs, model.parameters())
    with torch.no_grad():
        start = float(nn.functional.cross_entropy(model(x), y))
    _amp_loop(model, opt, scaler, [(x, y)] * 30, dtype)
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(model(x), y)) < 0.8 * start
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_running_stats_only_see_the_first_pass(optimizer_cls, kwargs, _id):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    probe = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
    opt = _make(optimizer_cls, kwargs, model.parameters())
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
        with torch.no_grad():  # the probe sees the same first-pass weights (ŵ for R-SAM)
            for p, q in zip(probe.parameters(), model.parameters()):
                p.copy_(q)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with sam_kernels.frozen_running_stats(model):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step()
    probe(x)  # the first pass alone
    bn, expected = model[1], probe[1]
    assert bn.momentum == 0.1
    torch.testing.assert_close(bn.running_mean, expected.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, expected.running_var, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 1


# ------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_accumulating_micro_batches_equals_one_big_batch(optimizer_cls, kwargs, _id, backend):
    model = _mlp(torch.float64)
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    k = 4
    opt_micro = _make(optimizer_cls, kwargs, model.parameters(), backend=backend)
    opt_big = _make(optimizer_cls, kwargs, twin.parameters(), backend=backend)
    for _ in range(2):
        if isinstance(opt_micro, sam_kernels.RSAM):
            opt_micro.noise_step()
            opt_big.noise_step()
        for xm, ym in zip(x.chunk(k), y.chunk(k)):
            (nn.functional.cross_entropy(model(xm), ym) / k).backward()
        nn.functional.cross_entropy(twin(x), y).backward()
        opt_micro.first_step(zero_grad=True)
        opt_big.first_step(zero_grad=True)
        if _second_pass_needed(opt_micro):
            for xm, ym in zip(x.chunk(k), y.chunk(k)):
                (nn.functional.cross_entropy(model(xm), ym) / k).backward()
            nn.functional.cross_entropy(twin(x), y).backward()
        opt_micro.second_step(zero_grad=True)
        opt_big.second_step(zero_grad=True)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------- torch.compile
def _bn_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _sam_step(opt, forward, model, x, y):
    loss_fn = nn.CrossEntropyLoss()
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
    loss = loss_fn(forward(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    if _second_pass_needed(opt):
        with sam_kernels.frozen_running_stats(model):
            loss_fn(forward(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss.detach()


def _train_without_recompiles(step, x, y):
    losses = [float(step(x, y)) for _ in range(3)]  # warm-up: the first compilations
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses += [float(step(x, y)) for _ in range(12)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_compiled_model_trains_without_recompiles(optimizer_cls, kwargs, _id):
    import torch._dynamo

    torch._dynamo.reset()
    model = _bn_net()
    opt = _make(optimizer_cls, kwargs, model.parameters())
    forward = torch.compile(model, backend="aot_eager")
    _train_without_recompiles(lambda x, y: _sam_step(opt, forward, model, x, y),
                              torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,)))


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_compiled_training_step_excludes_the_optimizer_cleanly(optimizer_cls, kwargs, _id):
    import torch._dynamo

    torch._dynamo.reset()
    model = _bn_net()
    opt = _make(optimizer_cls, kwargs, model.parameters())
    step = torch.compile(lambda x, y: _sam_step(opt, model, model, x, y), backend="aot_eager")
    _train_without_recompiles(step, torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,)))
