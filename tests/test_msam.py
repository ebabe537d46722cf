"""Momentum-SAM against a float64 reference written from the paper (Becker et al. 2024, Alg. 1)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from helpers import cpu_backends_with
from sam_kernels import MSAM


def _model(dtype=torch.float64):
    return nn.Sequential(nn.Linear(4, 6, dtype=dtype), nn.Tanh(), nn.Linear(6, 2, dtype=dtype))


def _batches(n, dtype=torch.float64):
    return [(torch.randn(10, 4, dtype=dtype), torch.randn(10, 2, dtype=dtype)) for _ in range(n)]


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _reference_trajectory(model, batches, *, base, rhos, lr, momentum=0.9, weight_decay=0.0, betas=(0.9, 0.999),
                          eps=1e-8, groups_of=None):
    """The paper's algorithm, per tensor in float64, from scratch: w is kept apart from ŵ = w − c·v.

    SGD: v ← μ v + (g + λ w); w ← w − lr v.  AdamW: m, s moments with bias correction, w ← w(1 − lr λ) − lr m̂/(√ŝ + ε).
    After each update c_G = ρ_G / (‖v‖ + 1e-12) with v the momentum (AdamW: m) and the model holds ŵ = w − c_G v.
    """
    params = list(model.parameters())
    groups_of = groups_of or [0] * len(params)
    w = [p.detach().clone() for p in params]
    v = [None] * len(params)
    s = [None] * len(params)
    c = None
    for t, (x, y) in enumerate(batches, start=1):
        with torch.no_grad():  # the model at ŵ
            for k, p in enumerate(params):
                p.copy_(w[k] if c is None else w[k] - c[groups_of[k]] * v[k])
        model.zero_grad()
        _loss(model, x, y).backward()
        for k, p in enumerate(params):
            g = p.grad.detach().clone()
            if base is torch.optim.SGD:
                g = g + weight_decay * w[k]
                v[k] = g if v[k] is None else momentum * v[k] + g
                w[k] = w[k] - lr * v[k]
            else:  # AdamW
                b1, b2 = betas
                v[k] = (1 - b1) * g if v[k] is None else b1 * v[k] + (1 - b1) * g
                s[k] = (1 - b2) * g * g if s[k] is None else b2 * s[k] + (1 - b2) * g * g
                w[k] = w[k] * (1 - lr * weight_decay)
                m_hat, s_hat = v[k] / (1 - b1 ** t), s[k] / (1 - b2 ** t)
                w[k] = w[k] - lr * m_hat / (s_hat.sqrt() + eps)
        norm = math.sqrt(sum(float((vk * vk).sum()) for vk in v))
        c = [rho / (norm + 1e-12) for rho in rhos]
    w_hat = [w[k] - c[groups_of[k]] * v[k] for k in range(len(params))]
    return w, w_hat


def _run(opt, model, batches):
    for x, y in batches:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("base,kwargs", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
], ids=["sgd", "sgd-wd", "adamw"])
def test_msam_follows_the_papers_algorithm_in_float64(base, kwargs):
    model = _model()
    twin = copy.deepcopy(model)
    batches = _batches(5)
    # Two groups with different ρ, one global norm.
    params = list(model.parameters())
    opt = MSAM([{"params": params[:2]}, {"params": params[2:], "rho": 0.7}], base, rho=0.3, **kwargs)
    _run(opt, model, batches)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "momentum"}
    w, w_hat = _reference_trajectory(twin, batches, base=base, rhos=[0.3, 0.7], groups_of=[0, 0, 1, 1],
                                     momentum=kwargs.get("momentum", 0.9), **ref_kwargs)
    for p, expected in zip(model.parameters(), w_hat):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-13)
    with opt.unperturbed():
        for p, expected in zip(model.parameters(), w):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-13)


def test_unperturbed_restores_the_perturbed_weights_bit_for_bit():
    model = _model(torch.float32)
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    _run(opt, model, _batches(3, torch.float32))
    before = [p.detach().clone() for p in model.parameters()]
    with opt.unperturbed():
        moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
        with pytest.raises(RuntimeError, match="inside unperturbed"):
            opt.step()
    assert all(moved)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_resume_from_model_and_optimizer_state_dicts_is_bit_identical():
    model = _model(torch.float32)
    opt = MSAM(model.parameters(), torch.optim.AdamW, rho=1.0, lr=0.01)
    _run(opt, model, _batches(3, torch.float32))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = _model(torch.float32)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = MSAM(resumed.parameters(), torch.optim.AdamW, rho=1.0, lr=0.01)
    resumed_opt.load_state_dict(checkpoint["opt"])
    batches = _batches(3, torch.float32)
    _run(opt, model, batches)
    _run(resumed_opt, resumed, batches)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_one_closure_call_and_one_hook_call_per_step():
    model = _model()
    opt = MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(f"global pre {type(o).__name__}")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(f"global post {type(o).__name__}")),
    ]
    try:
        x, y = _batches(1)[0]

        def closure():
            calls.append("closure")
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        loss = opt.step(closure)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.is_tensor(loss)
    assert calls == ["global pre MSAM", "pre", "closure", "post", "global post MSAM"]


def test_a_scheduler_changing_rho_and_lr_is_followed():
    model = _model()
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10)  # cycles SGD's momentum too
    for x, y in _batches(3):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] != 0.1


def test_msam_refuses_what_it_cannot_perturb_along():
    model = _model()
    with pytest.raises(ValueError, match="momentum > 0"):
        MSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="SGD, Adam or AdamW"):
        MSAM(model.parameters(), torch.optim.Adagrad, lr=0.1)
    opt = MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="one forward/backward"):
        opt.first_step()
    with pytest.raises(ValueError, match="schedule"):
        MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, schedule=2)


def test_grad_scaler_step_skips_the_base_step_on_overflow_and_keeps_the_perturbation():
    model = _model(torch.float32)
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    _run(opt, model, _batches(2, torch.float32))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = _batches(1, torch.float32)[0]
    before = [p.detach().clone() for p in model.parameters()]
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(_loss(model, x, y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 8
    for p, b, m in zip(model.parameters(), before, momenta):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)  # no base step
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)  # ŵ again, up to the shift's rounding
    opt.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    scaler.step(opt)  # a finite step is taken with the unscaled gradient
    assert not torch.equal(opt.state[next(model.parameters())]["momentum_buffer"], momenta[0])


# ----------------------------------------------------------------- the fused step (msam_sgd_)
MSAM_FUSED = cpu_backends_with("msam_sgd_")


@pytest.mark.skipif(not MSAM_FUSED, reason="no backend with msam_sgd_ runs on the CPU")
@pytest.mark.parametrize("kwargs", [
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.7, "dampening": 0.3, "maximize": True},
], ids=["momentum", "nesterov-wd", "dampening-maximize"])
def test_the_fused_step_follows_the_unfused_one_in_float64(kwargs):
    model = _model()
    twin = copy.deepcopy(model)
    batches = _batches(5)
    opts = []
    for m, fuse in ((model, True), (twin, False)):
        params = list(m.parameters())
        opt = MSAM([{"params": params[:2]}, {"params": params[2:], "rho": 0.7}], torch.optim.SGD, rho=0.3,
                   backend=MSAM_FUSED[0], fuse_base_step=fuse, **kwargs)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for x, y in batches:
            opt.zero_grad()
            _loss(m, x, y).backward()
            opt.step()
            scheduler.step()
        opts.append(opt)
    assert opts[0].base_step_fused and not opts[1].base_step_fused
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"],
                                   rtol=1e-12, atol=1e-13)
    with opts[0].unperturbed(), opts[1].unperturbed():
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


@pytest.mark.skipif(not MSAM_FUSED, reason="no backend with msam_sgd_ runs on the CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_msam_sgd_matches_the_reference(dtype):
    import sam_kernels.functional as F

    shapes = [(8, 3, 3, 3), (8,), (1,), (), (0, 5), (2, 3000), (7, 1, 5)]
    params = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes] + [torch.randn(12, 6).to(dtype).t()]
    grads = [torch.randn(p.shape, dtype=torch.float64).to(dtype) for p in params]
    grads[-1] = grads[-1].t().contiguous().t()
    momenta = [torch.randn(p.shape, dtype=torch.float64).to(dtype) for p in params]
    momenta[-1] = momenta[-1].t().contiguous().t()
    n = len(params)
    shifts = [torch.tensor(0.01 * (k + 1), dtype=torch.float64) for k in range(n)]
    hypers = dict(lrs=[0.1] * n, weight_decays=[1e-2 * (k % 2) for k in range(n)], momentums=[0.9] * n,
                  dampenings=[0.1 * (k % 3 == 0) for k in range(n)], nesterovs=[float(k % 2) for k in range(n)],
                  maximizes=[float(k % 4 == 1) for k in range(n)], fresh=[float(k % 3 == 2) for k in range(n)])
    skips = [torch.tensor(False)] * n
    results = []
    for backend in (MSAM_FUSED[0], "reference"):
        w, m = [p.clone() for p in params], [x.clone() for x in momenta]
        total = F.msam_sgd_(w, grads, m, shifts, skips, backend=backend, **hypers)
        results.append((w, m, total))
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    (w1, m1, t1), (w2, m2, t2) = results
    for a, b in zip(w1 + m1, w2 + m2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)
    assert torch.isfinite(t1) and t1 > 0
    torch.testing.assert_close(t1.double(), t2.double(), rtol=max(tol, 1e-5), atol=0)


@pytest.mark.skipif(not MSAM_FUSED, reason="no backend with msam_sgd_ runs on the CPU")
def test_a_param_whose_momentum_this_step_does_not_update_takes_the_general_path():
    model = _model()
    twin = copy.deepcopy(model)
    opts = [MSAM(m.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, backend=MSAM_FUSED[0],
                 fuse_base_step=fuse) for m, fuse in ((model, True), (twin, False))]
    for k, (x, y) in enumerate(_batches(4)):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            _loss(m, x, y).backward()
            if k == 2:
                m[0].bias.grad = None  # this step's backward did not reach one param
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
