"""The fused second step (docs/DESIGN.md §2.11): restore + torch's SGD/Adam/AdamW update in one pass.

The reference operations are checked against torch's own optimizers; every fused backend against the
reference; and whole trajectories with fusion on against fusion off (every variant, every base option,
an LR scheduler, checkpoints crossing between the two, GradScaler's skip).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sam_kernels
from sam_kernels import functional as F

from helpers import FLOAT_DTYPES, VARIANT_IDS, VARIANTS, all_params, cpu_backends_with, make_params

SGD_CONFIGS = {
    "plain": {"lr": 0.1},
    "momentum": {"lr": 0.1, "momentum": 0.9},
    "nesterov-wd": {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-2},
    "dampening-maximize": {"lr": 0.05, "momentum": 0.7, "dampening": 0.3, "maximize": True},
    "wd-only": {"lr": 0.1, "weight_decay": 5e-3},
}
ADAM_CONFIGS = {
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adam-wd-amsgrad": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "betas": (0.8, 0.99)}),
    "adamw-maximize-amsgrad": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "maximize": True,
                                                   "amsgrad": True}),
}
BASES = {**{f"sgd-{k}": (torch.optim.SGD, v) for k, v in SGD_CONFIGS.items()}, **ADAM_CONFIGS}
_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


FUSED_BACKENDS = cpu_backends_with("restore_sgd_")
needs_fused = pytest.mark.skipif(not FUSED_BACKENDS, reason="no backend with the fused second step runs on the CPU")


def _assert_close(actual, expected, dtype):
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    tol = _TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------- the reference is torch's update
def _random_state(shape, dtype, positive=False):
    x = torch.randn(shape, dtype=torch.float64)
    return (x.abs() + 0.1 if positive else x).to(dtype)


@pytest.mark.parametrize("config", SGD_CONFIGS.values(), ids=SGD_CONFIGS.keys())
def test_reference_sgd_is_torchs_sgd_from_the_saved_weights(config):
    w0 = torch.randn(6, 5, dtype=torch.float64)
    g = torch.randn(6, 5, dtype=torch.float64)
    for fresh in (True, False):
        m0 = _random_state((6, 5), torch.float64)
        theirs = nn.Parameter(w0.clone())
        opt = torch.optim.SGD([theirs], **config)
        if not fresh and config.get("momentum", 0):
            opt.state[theirs]["momentum_buffer"] = m0.clone()
        theirs.grad = g.clone()
        opt.step()
        ours, saved, m = torch.randn(6, 5, dtype=torch.float64), w0.clone(), m0.clone()  # ours: perturbed junk
        full = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False, **config}
        sam_kernels.backends.reference.restore_sgd_(
            [ours], [saved], [g], [m], [torch.tensor(False)], lrs=[full["lr"]], weight_decays=[full["weight_decay"]],
            momentums=[full["momentum"]], dampenings=[full["dampening"]], nesterovs=[float(full["nesterov"])],
            maximizes=[float(full["maximize"])], fresh=[float(fresh)])
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-14)
        if full["momentum"]:
            torch.testing.assert_close(m, opt.state[theirs]["momentum_buffer"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ADAM_CONFIGS.keys())
def test_reference_adam_is_torchs_adam_from_the_saved_weights(name):
    cls, config = ADAM_CONFIGS[name]
    w0, g = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    theirs = nn.Parameter(w0.clone())
    opt = cls([theirs], **config)
    state = {"exp_avg": _random_state((7, 3), torch.float64), "exp_avg_sq": _random_state((7, 3), torch.float64, True),
             "max_exp_avg_sq": _random_state((7, 3), torch.float64, True), "step": torch.tensor(4.0)}
    opt.state[theirs].update({k: v.clone() for k, v in state.items() if k != "max_exp_avg_sq" or opt.defaults["amsgrad"]})
    theirs.grad = g.clone()
    opt.step()
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    t = 5.0
    ours, m, v, v_max = torch.zeros_like(w0), state["exp_avg"].clone(), state["exp_avg_sq"].clone(), \
        state["max_exp_avg_sq"].clone()
    sam_kernels.backends.reference.restore_adam_(
        [ours], [w0.clone()], [g], [m], [v], [v_max], [torch.tensor(False)], lrs=[group["lr"]], beta1s=[beta1],
        beta2s=[beta2], epss=[group["eps"]], weight_decays=[group["weight_decay"]],
        decoupled=[float(group["decoupled_weight_decay"])], amsgrads=[float(group["amsgrad"])],
        maximizes=[float(group["maximize"])], step_sizes=[group["lr"] / (1 - beta1**t)],
        bias_correction2_sqrts=[(1 - beta2**t) ** 0.5])
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m, opt.state[theirs]["exp_avg"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v, opt.state[theirs]["exp_avg_sq"], rtol=1e-12, atol=1e-14)
    if group["amsgrad"]:
        torch.testing.assert_close(v_max, opt.state[theirs]["max_exp_avg_sq"], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------- each fused backend against the reference
def _op_lists(dtype, backend_device="cpu"):
    """The awkward tensors (empty, 0-d, 1-element, huge filter, non-contiguous) as weights, with saved
    weights, gradients and states of the same shapes and strides."""
    params = [p.detach() for p in all_params(make_params(dtype)) if p.requires_grad]
    def like(p, positive=False):
        x = _random_state(p.shape, dtype, positive)
        return x.t().contiguous().t() if p.dim() == 2 and not p.is_contiguous() else x
    return params, [like(p) for p in params], [like(p) for p in params]


@needs_fused
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("skip", [False, True])
def test_restore_sgd_matches_reference(backend, dtype, skip):
    params, saved, grads = _op_lists(dtype)
    n = len(params)
    momenta = [_random_state(p.shape, dtype).as_strided(p.shape, s.stride()) if p.is_contiguous()
               else s.clone().copy_(_random_state(p.shape, dtype)) for p, s in zip(params, saved)]
    # Mixed per-tensor options in one call; the placeholder where momentum is 0 is the gradient itself.
    momentums = [0.0 if k % 3 == 0 else 0.9 for k in range(n)]
    momenta = [grads[k] if momentums[k] == 0 else momenta[k] for k in range(n)]
    hypers = dict(lrs=[0.1 + 0.01 * k for k in range(n)], weight_decays=[0.0 if k % 2 else 1e-2 for k in range(n)],
                  momentums=momentums, dampenings=[0.1 * (k % 2) for k in range(n)],
                  nesterovs=[float(k % 4 == 1) for k in range(n)], maximizes=[float(k % 5 == 2) for k in range(n)],
                  fresh=[float(k % 4 == 2) for k in range(n)])
    skips = [torch.tensor(skip)] * n
    ours = [p.clone() for p in params]
    ours_m = [m if momentums[k] == 0 else m.clone() for k, m in enumerate(momenta)]
    ref, ref_m = [p.clone() for p in params], [m if momentums[k] == 0 else m.clone() for k, m in enumerate(momenta)]
    grads_before = [g.clone() for g in grads]
    F.restore_sgd_(ours, saved, grads, ours_m, skips, backend=backend, **hypers)
    F.restore_sgd_(ref, saved, grads, ref_m, skips, backend="reference", **hypers)
    for a, b in zip(ours, ref):
        _assert_close(a, b, dtype)
    for k, (a, b) in enumerate(zip(ours_m, ref_m)):
        if momentums[k]:
            _assert_close(a, b, dtype)
    for g, before in zip(grads, grads_before):  # placeholders are never written
        assert torch.equal(g, before)
    if skip:
        for a, s in zip(ours, saved):
            assert torch.equal(a, s)  # w ← saved exactly
        for k, m in enumerate(ours_m):
            if momentums[k]:
                assert torch.equal(m, momenta[k])


@needs_fused
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("skip", [False, True])
def test_restore_adam_matches_reference(backend, dtype, skip):
    params, saved, grads = _op_lists(dtype)
    n = len(params)
    def state(positive):
        return [s.clone().copy_(_random_state(s.shape, dtype, positive)) for s in saved]
    exp_avgs, exp_avg_sqs, maxes = state(False), state(True), state(True)
    amsgrads = [float(k % 2) for k in range(n)]
    maxes = [exp_avg_sqs[k] if not amsgrads[k] else maxes[k] for k in range(n)]  # aliasing placeholders
    steps = [1 + k for k in range(n)]
    beta1s, beta2s = [0.9 - 0.01 * k for k in range(n)], [0.999 - 0.001 * k for k in range(n)]
    hypers = dict(lrs=[1e-2] * n, beta1s=beta1s, beta2s=beta2s, epss=[1e-8] * n,
                  weight_decays=[0.0 if k % 3 == 0 else 1e-2 for k in range(n)],
                  decoupled=[float(k % 2 == 0) for k in range(n)], amsgrads=amsgrads,
                  maximizes=[float(k % 4 == 3) for k in range(n)],
                  step_sizes=[1e-2 / (1 - b**t) for b, t in zip(beta1s, steps)],
                  bias_correction2_sqrts=[(1 - b**t) ** 0.5 for b, t in zip(beta2s, steps)])
    skips = [torch.tensor(skip)] * n

    def run(backend_name):
        w = [p.clone() for p in params]
        m, v = [x.clone() for x in exp_avgs], [x.clone() for x in exp_avg_sqs]
        x = [v[k] if not amsgrads[k] else maxes[k].clone() for k in range(n)]
        F.restore_adam_(w, saved, grads, m, v, x, skips, backend=backend_name, **hypers)
        return w, m, v, x

    ours, ref = run(backend), run("reference")
    for a_list, b_list in zip(ours, ref):
        for a, b in zip(a_list, b_list):
            _assert_close(a, b, dtype)
    if skip:
        for a, s in zip(ours[0], saved):
            assert torch.equal(a, s)
        for a, s in zip(ours[1], exp_avgs):
            assert torch.equal(a, s)


# ----------------------------------------------------------------- whole trajectories: fused == unfused
def _train(opt, params, data, steps, scheduler=None):
    x, y = data
    for _ in range(steps):
        def closure():
            w1, b1, w2, b2 = params
            loss = ((torch.tanh(x @ w1.t() + b1) @ w2.t() + b2 - y) ** 2).mean()
            loss.backward()
            return loss
        opt.zero_grad()
        opt.step(closure)
        if scheduler is not None:
            scheduler.step()


def _twin_params(dtype):
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    base = [torch.randn(8, 6, dtype=dtype) * 0.5, torch.randn(8, dtype=dtype) * 0.1,
            torch.randn(3, 8, dtype=dtype) * 0.5, torch.randn(3, dtype=dtype) * 0.1]
    return [nn.Parameter(t.clone()) for t in base], [nn.Parameter(t.clone()) for t in base]


def _data(dtype):
    return torch.randn(16, 6, dtype=dtype), torch.randn(16, 3, dtype=dtype)


def _make(cls, kwargs, params, base, base_kwargs, backend, fuse):
    extra = {"seed": 11} if issubclass(cls, sam_kernels.RSAM) else {}
    return cls([{"params": params[:2]}, {"params": params[2:], "lr": base_kwargs["lr"] * 0.5}], base,
               backend=backend, fuse_base_step=fuse, **extra, **kwargs, **base_kwargs)


@needs_fused
@pytest.mark.parametrize("base_id", BASES.keys())
@pytest.mark.parametrize("cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_fused_trajectory_equals_unfused(cls, kwargs, _id, base_id, monkeypatch):
    base, base_kwargs = BASES[base_id]
    calls = []
    original = sam_kernels.optim.fused_base.fused_second_step
    monkeypatch.setattr(sam_kernels.optim.fused_base, "fused_second_step",
                        lambda opt, *a: (calls.append(opt), original(opt, *a)))
    backend = FUSED_BACKENDS[0]
    fused_params, plain_params = _twin_params(torch.float64)
    fused = _make(cls, kwargs, fused_params, base, base_kwargs, backend, True)
    plain = _make(cls, kwargs, plain_params, base, base_kwargs, backend, False)
    assert fused.base_step_fused and not plain.base_step_fused
    data = _data(torch.float64)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (fused, plain)]
    _train(fused, fused_params, data, 4, schedulers[0])
    _train(plain, plain_params, data, 4, schedulers[1])
    assert [opt is fused for opt in calls] == [True] * 4  # every step fused; none of the unfused one's
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    _assert_same_state(fused, plain)


def _assert_same_state(a, b, rtol=1e-12, atol=1e-13):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), (sa[k].keys(), sb[k].keys())
        for name in sa[k]:
            x, y = sa[k][name], sb[k][name]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and x.device == y.device and x.shape == y.shape, name
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
            else:
                assert x == y, name


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("base_id", ["sgd-nesterov-wd", "adamw"])
def test_fused_low_precision_stays_within_rounding_of_unfused(dtype, base_id):
    base, base_kwargs = BASES[base_id]
    fused_params, plain_params = _twin_params(dtype)
    fused = _make(sam_kernels.SAM, {"rho": 0.05}, fused_params, base, base_kwargs, FUSED_BACKENDS[0], True)
    plain = _make(sam_kernels.SAM, {"rho": 0.05}, plain_params, base, base_kwargs, FUSED_BACKENDS[0], False)
    data = _data(dtype)
    for _ in range(3):
        before = [p.detach().double().clone() for p in fused_params]
        _train(fused, fused_params, data, 1)
        _train(plain, plain_params, data, 1)
        # One step from the same weights: the two differ by the rounding of the update, not of w.
        for a, b, w in zip(fused_params, plain_params, before):
            move = (b.detach().double() - w).abs()
            bound = 4 * _TOL[dtype] * (w.abs() + move) + 1e-30
            assert torch.isfinite(a).all()
            assert ((a.detach().double() - b.detach().double()).abs() <= bound).all()
        for a, b in zip(fused_params, plain_params):  # continue from identical weights
            with torch.no_grad():
                a.copy_(b)


@needs_fused
@pytest.mark.parametrize("base_id", ["sgd-momentum", "adam-wd-amsgrad"])
@pytest.mark.parametrize("save_fused", [True, False])
def test_checkpoint_crosses_between_fused_and_unfused(base_id, save_fused):
    base, base_kwargs = BASES[base_id]
    first, twin = _twin_params(torch.float64)
    data = _data(torch.float64)
    opt = _make(sam_kernels.SAM, {"rho": 0.05}, first, base, base_kwargs, FUSED_BACKENDS[0], save_fused)
    _train(opt, first, data, 2)
    checkpoint = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in first]
    _train(opt, first, data, 2)  # the original continues
    with torch.no_grad():
        for p, w in zip(twin, weights):
            p.copy_(w)
    resumed = _make(sam_kernels.SAM, {"rho": 0.05}, twin, base, base_kwargs, FUSED_BACKENDS[0], not save_fused)
    resumed.load_state_dict(checkpoint)
    _train(resumed, twin, data, 2)
    for a, b in zip(first, twin):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    _assert_same_state(opt, resumed)


# ----------------------------------------------------------------- when it fuses
def _sam(base=torch.optim.SGD, backend=None, **kwargs):
    params = [nn.Parameter(torch.randn(3, 2))]
    return sam_kernels.SAM(params, base, backend=backend or (FUSED_BACKENDS or ["foreach"])[0], **kwargs)


class _MySGD(torch.optim.SGD):
    pass


@needs_fused
@pytest.mark.parametrize("make,reason,trains", [
    (lambda: _sam(lr=0.1, fuse_base_step=False), "fuse_base_step=False", True),
    (lambda: _sam(_MySGD, lr=0.1), "not exactly", True),
    (lambda: _sam(lr=0.1, differentiable=True), "differentiable", False),  # torch's step needs a graph then
    (lambda: _sam(torch.optim.Adam, lr=0.1, capturable=True), "capturable", False),  # torch: CUDA only
    (lambda: _sam(lr=torch.tensor(0.1)), "Tensor learning rate", True),
    (lambda: _sam(torch.optim.RMSprop, lr=0.1), "RMSprop", True),
    (lambda: _sam(lr=0.1, backend="reference"), "no fused", True),
    (lambda: _sam(lr=0.1, backend="foreach"), "no fused", True),
])
def test_configurations_that_do_not_fuse_say_why_and_train_unfused(make, reason, trains):
    opt = make()
    assert not opt.base_step_fused
    assert reason in opt._why_not_fused()
    if not trains:
        return
    p = opt.param_groups[0]["params"][0]
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.first_step()
    p.grad = torch.randn_like(p)
    opt.second_step()
    assert not torch.equal(p, before) and torch.isfinite(p).all()


@needs_fused
def test_a_base_optimizer_step_hook_turns_fusion_off_and_fires():
    opt = _sam(lr=0.1, momentum=0.9)
    assert opt.base_step_fused
    calls = []
    opt.base_optimizer.register_step_post_hook(lambda *_: calls.append(1))
    assert not opt.base_step_fused
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    opt.first_step()
    opt.second_step()
    assert calls == [1]


def test_fuse_base_step_must_be_a_bool():
    with pytest.raises(TypeError, match="fuse_base_step"):
        sam_kernels.SAM([nn.Parameter(torch.randn(2))], torch.optim.SGD, lr=0.1, fuse_base_step="yes")


@needs_fused
def test_a_param_that_loses_its_gradient_is_restored_and_not_stepped():
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    opt = sam_kernels.SAM([a, b], torch.optim.SGD, lr=0.1, momentum=0.9, backend=FUSED_BACKENDS[0])
    before_a = a.detach().clone()
    a.grad, b.grad = torch.randn(4), torch.randn(3)
    opt.first_step()
    assert not torch.equal(a, before_a)
    a.grad = None  # the second pass did not reach a
    b_saved = opt._step_plan.saved(1).clone()
    opt.second_step()
    assert torch.equal(a, before_a)
    assert "momentum_buffer" not in opt.base_optimizer.state.get(a, {})
    assert torch.allclose(b, b_saved - 0.1 * b.grad)


# ----------------------------------------------------------------- GradScaler
@needs_fused
@pytest.mark.parametrize("base_id", ["sgd-momentum", "adamw"])
def test_grad_scaler_overflow_restores_and_skips_the_base_step(base_id):
    base, base_kwargs = BASES[base_id]
    params = [nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(4))]
    opt = sam_kernels.SAM(params, base, backend=FUSED_BACKENDS[0], **base_kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))  # the scale tensor exists once a loss was scaled
    assert opt.base_step_fused
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1024
    opt.first_step()
    for p in params:
        p.grad = torch.randn_like(p) * 1024
    params[1].grad[0] = float("inf")  # the second pass overflowed
    opt.second_step(scaler=scaler)
    scaler.update()
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # restored, not stepped
    assert not opt.base_optimizer.state  # torch creates no state in a skipped step
    assert scaler.get_scale() == 2.0**9
    # The next step runs: fused and unfused agree with the same scaler history.
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    other = sam_kernels.SAM(twin, base, backend=FUSED_BACKENDS[0], fuse_base_step=False, **base_kwargs)
    other_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**9)
    other_scaler.scale(torch.ones(()))
    for o, s, ps in ((opt, scaler, params), (other, other_scaler, twin)):
        torch.manual_seed(5)
        for p in ps:
            p.grad = torch.randn_like(p) * 512
        o.first_step()
        for p in ps:
            p.grad = torch.randn_like(p) * 512
        o.second_step(scaler=s)
        s.update()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    _assert_same_state(opt, other, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------- failures and old pickles
@needs_fused
def test_an_error_in_a_fused_second_step_puts_the_weights_back():
    params = [nn.Parameter(torch.randn(4, 3))]
    opt = sam_kernels.SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=FUSED_BACKENDS[0])
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    before = params[0].detach().clone()
    params[0].grad = torch.randn(4, 3)
    opt.first_step()
    scaler.unscale_(opt)  # the wrong object: second_step refuses it, before any weight is written
    with pytest.raises(RuntimeError, match="unscale_"):
        opt.second_step(scaler=scaler)
    assert torch.equal(params[0], before)  # as the unfused path: restored, not left at w + ε
    params[0].grad = torch.randn(4, 3)
    opt.first_step()  # the optimizer is usable again
    opt.second_step()
    assert not torch.equal(params[0], before)


@needs_fused
def test_an_optimizer_pickled_before_fusion_existed_loads_and_fuses():
    params = [nn.Parameter(torch.randn(5))]
    opt = sam_kernels.SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=FUSED_BACKENDS[0])
    state = opt.__getstate__()
    del state["_fuse_base_step"]  # what an earlier version pickled
    state.pop("_no_skips", None)
    old = sam_kernels.SAM.__new__(sam_kernels.SAM)
    old.__setstate__(state)
    assert old.base_step_fused
    params[0].grad = torch.randn(5)
    old.first_step()
    old.second_step()
    assert torch.isfinite(params[0]).all()
