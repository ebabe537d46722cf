"""GSAM, R-GSAM, LookSAM, WSAM and FriendlySAM against the papers' equations and pytorch-optimizer 4.1.

The paper checks re-derive every update from flattened whole-model vectors in float64 (an independent
computation: torch.cat of the gradients, no library code), on every backend, with two param groups
of different hyperparameters. The pytorch-optimizer checks run its classes through their own public
APIs on a twin model; where its math departs from the paper (LookSAM's per-tensor norms) the model
has a single tensor, on which both agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sam_kernels
from sam_kernels import functional as F
from helpers import BACKENDS, FAST_BACKENDS, FLOAT_DTYPES, all_params, make_params

GUARD = 1e-12


def _data(seed=0, n=24, d_in=5, classes=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _groups(model, **second):
    """Two param groups: the first layer with the defaults, the second with ``second``'s values."""
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), **second}]


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _closure(model, x, y):
    def closure():
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    return closure


def _flat_grad(model, x, y, weights=None):
    """∇L at ``weights`` (flat, float64; the model's own weights when None), as one flat vector."""
    twin = copy.deepcopy(model)
    if weights is not None:
        torch.nn.utils.vector_to_parameters(weights, twin.parameters())
    twin.zero_grad()
    _loss(twin, x, y).backward()
    return torch.cat([p.grad.flatten() for p in twin.parameters()])


def _per_element(model, group_values):
    """A flat vector with, for each element, its group's value (first layer: group 0, second: group 1)."""
    sizes = [sum(p.numel() for p in model[0].parameters()), sum(p.numel() for p in model[2].parameters())]
    return torch.cat([torch.full((n,), float(v), dtype=torch.float64) for n, v in zip(sizes, group_values)])


def _sgd_step(w, grad, buf, lr, momentum):
    buf = grad.clone() if buf is None else momentum * buf + grad
    return w - lr * buf, buf


def _weights(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


LR, MOMENTUM, STEPS = 0.1, 0.9, 4


# ------------------------------------------------------------------ against the papers
@pytest.mark.parametrize("backend", BACKENDS)
def test_gsam_follows_the_paper(backend):
    model, (x, y) = _model(), _data()
    opt = sam_kernels.GSAM(_groups(model, rho=0.11, alpha=0.9), torch.optim.SGD, rho=0.05, alpha=0.3, lr=LR,
                           momentum=MOMENTUM, backend=backend)
    w, buf = _weights(model), None
    rho, alpha = _per_element(model, [0.05, 0.11]), _per_element(model, [0.3, 0.9])
    for _ in range(STEPS):
        opt.step(_closure(model, x, y))
        g = _flat_grad_at(model, w, x, y)
        g_sam = _flat_grad_at(model, w + rho * g / (g.norm() + GUARD), x, y)
        g_perp = g - (g @ g_sam) / (g_sam.norm() + GUARD) ** 2 * g_sam
        w, buf = _sgd_step(w, g_sam - alpha * g_perp, buf, LR, MOMENTUM)
        torch.testing.assert_close(_weights(model), w, rtol=1e-10, atol=1e-12)


def _flat_grad_at(model, weights, x, y):
    return _flat_grad(model, x, y, weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rgsam_is_rsam_perturbation_then_gsam_decomposition(backend):
    """R-GSAM's update from R-SAM's ε (taken from an RSAM twin) and GSAM's decomposition, both recomputed."""
    model, (x, y) = _model(), _data()
    twin = copy.deepcopy(model)
    kwargs = dict(rho=0.05, gamma=0.2, lam=0.7, seed=123, lr=LR, backend=backend)
    opt = sam_kernels.RGSAM(model.parameters(), torch.optim.SGD, alpha=0.5, **kwargs)
    probe = sam_kernels.RSAM(twin.parameters(), torch.optim.SGD, **kwargs)
    w = _weights(model)
    for _ in range(3):
        opt.step(_closure(model, x, y))
        # ŵ and w + ε of this step, read off the RSAM twin (same seed, same step counter, same weights).
        probe.noise_step()
        w_hat = _weights(twin)
        probe.zero_grad()
        _loss(twin, x, y).backward()
        probe.first_step(zero_grad=True)
        w_eps = _weights(twin)
        probe.restore()
        probe._step += 1  # the twin's counter follows the steps R-GSAM completed
        g, g_sam = _flat_grad_at(model, w_hat, x, y), _flat_grad_at(model, w_eps, x, y)
        g_perp = g - (g @ g_sam) / (g_sam.norm() + GUARD) ** 2 * g_sam
        w = w - LR * (g_sam - 0.5 * g_perp)
        torch.nn.utils.vector_to_parameters(w.clone(), twin.parameters())
        torch.testing.assert_close(_weights(model), w, rtol=1e-10, atol=1e-12)


def test_rgsam_with_gamma_zero_is_gsam():
    model, (x, y) = _model(), _data()
    twin = copy.deepcopy(model)
    rgsam = sam_kernels.RGSAM(model.parameters(), torch.optim.SGD, rho=0.07, alpha=0.4, gamma=0.0, seed=9, lr=LR,
                              momentum=MOMENTUM)
    gsam = sam_kernels.GSAM(twin.parameters(), torch.optim.SGD, rho=0.07, alpha=0.4, lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        loss_a = rgsam.step(_closure(model, x, y))
        loss_b = gsam.step(_closure(twin, x, y))
        if step == 0:
            assert torch.equal(loss_a, loss_b)  # γ = 0: ŵ = w bit for bit
        # Equal up to the rounding of R-SAM's 1e-12 guards (docs/DESIGN.md §2.4).
        torch.testing.assert_close(_weights(model), _weights(twin), rtol=1e-10, atol=1e-13)
    assert not torch.equal(_weights(model), _weights(copy.deepcopy(_model())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_looksam_follows_the_paper(backend):
    model, (x, y) = _model(), _data()
    k = 3
    opt = sam_kernels.LookSAM(_groups(model, rho=0.02, alpha=0.2), torch.optim.SGD, rho=0.08, k=k, alpha=0.6,
                              lr=LR, backend=backend)
    rho, alpha = _per_element(model, [0.08, 0.02]), _per_element(model, [0.6, 0.2])
    w, g_v = _weights(model), None
    for step in range(2 * k + 1):
        assert opt.needs_second_pass == (step % k == 0)
        opt.step(_closure(model, x, y))
        g = _flat_grad_at(model, w, x, y)
        if step % k == 0:
            g_sam = _flat_grad_at(model, w + rho * g / (g.norm() + GUARD), x, y)
            g_v = g_sam - (g @ g_sam) / (g.norm() + GUARD) ** 2 * g  # the part of g_sam orthogonal to g
            update = g_sam
        else:
            update = g + alpha * g.norm() / (g_v.norm() + GUARD) * g_v
        w = w - LR * update
        torch.testing.assert_close(_weights(model), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_wsam_follows_the_paper(backend, decouple):
    model, (x, y) = _model(), _data()
    opt = sam_kernels.WSAM(_groups(model, rho=0.1, gamma=0.6), torch.optim.SGD, rho=0.05, gamma=0.9,
                           decouple=decouple, lr=LR, momentum=MOMENTUM, backend=backend)
    rho = _per_element(model, [0.05, 0.1])
    beta = _per_element(model, [0.9 / 0.1, 0.6 / 0.4])  # γ/(1 − γ)
    w, buf = _weights(model), None
    for _ in range(STEPS):
        opt.step(_closure(model, x, y))
        g = _flat_grad_at(model, w, x, y)
        g_sam = _flat_grad_at(model, w + rho * g / (g.norm() + GUARD), x, y)
        if decouple:
            w, buf = _sgd_step(w, g, buf, LR, MOMENTUM)
            w = w - LR * beta * (g_sam - g)
        else:
            w, buf = _sgd_step(w, beta * g_sam + (1 - beta) * g, buf, LR, MOMENTUM)
        torch.testing.assert_close(_weights(model), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_friendlysam_follows_the_paper(backend):
    model, (x, y) = _model(), _data()
    opt = sam_kernels.FriendlySAM(_groups(model, rho=0.1, sigma=0.5, lmbda=0.6), torch.optim.SGD, rho=0.05,
                                  sigma=1.0, lmbda=0.9, lr=LR, backend=backend)
    rho, sigma, lmbda = (_per_element(model, v) for v in ([0.05, 0.1], [1.0, 0.5], [0.9, 0.6]))
    w, m = _weights(model), None
    for _ in range(STEPS):
        opt.step(_closure(model, x, y))
        g = _flat_grad_at(model, w, x, y)
        d = g if m is None else g - sigma * m  # d uses the EMA before g is added; m starts as g
        m = g.clone() if m is None else lmbda * m + (1 - lmbda) * g
        g_sam = _flat_grad_at(model, w + rho * d / (d.norm() + GUARD), x, y)
        w = w - LR * g_sam
        torch.testing.assert_close(_weights(model), w, rtol=1e-10, atol=1e-12)


def test_proportional_rho_follows_the_learning_rate():
    model = _model()
    opt = sam_kernels.GSAM(model.parameters(), torch.optim.SGD, lr=0.4)
    schedule = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.25, total_iters=3)
    rho = sam_kernels.ProportionalRho(opt, rho_max=0.08, rho_min=0.02, lr_max=0.4, lr_min=0.1)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.08)
    x, y = _data()
    for _ in range(3):
        opt.step(_closure(model, x, y))
        schedule.step()
        rho.step()
        lr = opt.param_groups[0]["lr"]
        assert opt.param_groups[0]["rho"] == pytest.approx(0.02 + 0.06 * (lr - 0.1) / 0.3)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.02)


# ------------------------------------------------------------------ the step protocols
def test_looksam_closure_is_called_twice_on_sam_steps_only():
    model, (x, y) = _model(), _data()
    opt = sam_kernels.LookSAM(model.parameters(), torch.optim.SGD, k=3, lr=LR)
    calls = []

    def closure():
        calls[-1] += 1
        return _closure(model, x, y)()

    for _ in range(7):
        calls.append(0)
        opt.step(closure)
    assert calls == [2, 1, 1, 2, 1, 1, 2]


def test_looksam_explicit_api_equals_closure_api():
    model, (x, y) = _model(), _data()
    twin = copy.deepcopy(model)
    a = sam_kernels.LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=LR, momentum=MOMENTUM)
    b = sam_kernels.LookSAM(twin.parameters(), torch.optim.SGD, k=2, lr=LR, momentum=MOMENTUM)
    for _ in range(5):
        a.step(_closure(model, x, y))
        b.zero_grad()
        _loss(twin, x, y).backward()
        b.first_step(zero_grad=True)
        if b.needs_second_pass:
            _loss(twin, x, y).backward()
        b.second_step(zero_grad=True)
    assert torch.equal(_weights(model), _weights(twin))


@pytest.mark.parametrize("name", ["gsam", "rgsam", "looksam", "wsam", "wsam-coupled", "friendlysam"])
def test_hyperparameters_live_in_param_groups_and_checkpoints_carry_the_buffers(name):
    cls, kwargs = sam_kernels.variants.VARIANTS[name]
    model, (x, y) = _model(), _data()
    opt = cls(model.parameters(), torch.optim.Adam, lr=1e-2, **kwargs)  # Adam: its state must stay its own
    for _ in range(3):
        opt.step(_closure(model, x, y))
    state = opt.state_dict()
    for key in {"rho", "alpha", "gamma", "lam", "sigma", "lmbda"} & set(kwargs):
        assert state["param_groups"][0][key] == kwargs[key]
    for param_state in opt.state.values():
        assert set(param_state) == {"step", "exp_avg", "exp_avg_sq"}
    extra = state["sam_kernels"]
    if cls is sam_kernels.LookSAM:
        assert extra["step"] == 3 and all(isinstance(t, torch.Tensor) for t in extra["g_v"])
    if cls is sam_kernels.FriendlySAM:
        assert all(isinstance(t, torch.Tensor) for t in extra["momentum"])


def test_bad_hyperparameters_are_refused():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="gamma"):
        sam_kernels.WSAM(params, torch.optim.SGD, gamma=1.0, lr=0.1)
    with pytest.raises(ValueError, match="lmbda"):
        sam_kernels.FriendlySAM(params, torch.optim.SGD, lmbda=1.5, lr=0.1)
    with pytest.raises(ValueError, match="k must be"):
        sam_kernels.LookSAM(params, torch.optim.SGD, k=0, lr=0.1)
    with pytest.raises(ValueError, match="alpha"):
        sam_kernels.GSAM(params, torch.optim.SGD, alpha=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho_min"):
        sam_kernels.ProportionalRho(sam_kernels.GSAM(params, torch.optim.SGD, lr=0.1), rho_max=0.01, rho_min=0.1,
                                    lr_max=1.0)


def test_wsam_decoupled_refuses_a_grad_scaler_before_touching_weights():
    model, (x, y) = _model(), _data()
    opt = sam_kernels.WSAM(model.parameters(), torch.optim.SGD, lr=LR)
    _loss(model, x, y).backward()
    before = _weights(model)
    opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    with pytest.raises(ValueError, match="GradScaler"):
        opt.second_step(scaler=torch.amp.GradScaler("cpu"))
    opt.restore()
    assert torch.equal(_weights(model), before)


def test_gsam_skips_the_decomposition_when_the_first_gradient_is_not_finite():
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = sam_kernels.GSAM([p], torch.optim.SGD, lr=1.0)
    before = p.detach().clone()
    p.grad = torch.full_like(p, float("nan"))
    opt.first_step(zero_grad=True)
    assert bool(opt.found_nonfinite) and torch.equal(p.detach(), before)
    g_sam = torch.randn_like(p)
    p.grad = g_sam.clone()
    opt.second_step()
    torch.testing.assert_close(p.detach(), before - g_sam)  # the base step took g_sam as it was


# ------------------------------------------------------------------ against pytorch-optimizer 4.1
pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


# pytorch-optimizer sums the global gradient norm in float32 (utils/gradient.py, get_global_gradient_norm)
# also for float64 gradients, so ε is a float32 rounding (~1e-8 relative) apart; a wrong term of the
# update would be ~1e-2 apart.
_THEIR_TOLERANCE = dict(rtol=1e-6, atol=1e-8)


class _ConstantRho:
    def __init__(self, rho):
        self.rho = rho

    def step(self):
        return self.rho


def test_gsam_matches_pytorch_optimizer():
    model, (x, y) = _model(), _data()
    twin = copy.deepcopy(model)
    ours = sam_kernels.GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, lr=LR, momentum=MOMENTUM)
    base = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    theirs = pytorch_optimizer.GSAM(twin.parameters(), base, twin, _ConstantRho(0.05), alpha=0.4)
    for _ in range(STEPS):
        ours.step(_closure(model, x, y))
        theirs.set_closure(nn.functional.cross_entropy, x, y)
        theirs.step()
        torch.testing.assert_close(_weights(model), _weights(twin), **_THEIR_TOLERANCE)


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_pytorch_optimizer(decouple):
    model, (x, y) = _model(), _data()
    twin = copy.deepcopy(model)
    ours = sam_kernels.WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.8, decouple=decouple, lr=LR,
                            momentum=MOMENTUM)
    theirs = pytorch_optimizer.WSAM(twin, twin.parameters(), torch.optim.SGD, rho=0.05, gamma=0.8,
                                    decouple=decouple, lr=LR, momentum=MOMENTUM)
    for _ in range(STEPS):
        ours.step(_closure(model, x, y))
        theirs.zero_grad()  # their step() leaves .grad to the caller
        theirs.step(_closure(twin, x, y))
        torch.testing.assert_close(_weights(model), _weights(twin), **_THEIR_TOLERANCE)


def test_looksam_matches_pytorch_optimizer_on_one_tensor():
    """pytorch-optimizer takes LookSAM's norms and cosines per tensor (the paper: whole-model vectors); on a
    model of one tensor the two are the same math."""
    model, (x, y) = nn.Linear(5, 3, bias=False).double(), _data()
    twin = copy.deepcopy(model)
    ours = sam_kernels.LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, lr=LR)
    theirs = pytorch_optimizer.LookSAM(twin.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, lr=LR)
    for _ in range(7):
        ours.step(_closure(model, x, y))
        theirs.zero_grad()
        _loss(twin, x, y).backward()  # theirs wants the gradient at w before step()

        def closure():
            theirs.zero_grad()
            return _closure(twin, x, y)()

        theirs.step(closure)
        # Their ‖g_v‖ guard is 1e-8 (ours 1e-12): a relative 1e-8/‖g_v‖ apart on the reuse steps.
        torch.testing.assert_close(model.weight.detach(), twin.weight.detach(), rtol=1e-5, atol=1e-7)


def test_friendlysam_matches_pytorch_optimizer():
    model, (x, y) = _model(), _data()
    twin = copy.deepcopy(model)
    ours = sam_kernels.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, lr=LR,
                                   momentum=MOMENTUM)
    theirs = pytorch_optimizer.FriendlySAM(twin.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9,
                                           lr=LR, momentum=MOMENTUM)
    for _ in range(STEPS):
        ours.step(_closure(model, x, y))
        theirs.zero_grad()
        _loss(twin, x, y).backward()

        def closure():
            theirs.zero_grad()
            return _closure(twin, x, y)()

        theirs.step(closure)
        torch.testing.assert_close(_weights(model), _weights(twin), **_THEIR_TOLERANCE)


# ------------------------------------------------------------------ the new operations, every backend
def _lists(dtype, seed_shift=0):
    params = [p.detach() for p in all_params(make_params(dtype)) if p.requires_grad]
    xs = [torch.randn(p.shape, dtype=torch.float64).to(dtype) for p in params]
    ys = [torch.randn(p.shape, dtype=torch.float64).to(dtype) for p in params]
    return params, xs, ys


_SUM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
_ELEM_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-9}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_pair_sums_are_a_dot_product_and_two_squared_norms(dtype, backend):
    _, xs, ys = _lists(dtype)
    x = torch.cat([t.double().flatten() for t in xs])
    y = torch.cat([t.double().flatten() for t in ys])
    sums = F.pair_sums(xs, ys, backend=backend).double()
    rtol = _SUM_RTOL[dtype]
    assert abs(float(sums[0] - x @ y)) <= rtol * float(x.norm() * y.norm())
    torch.testing.assert_close(sums[1:], torch.stack([x @ x, y @ y]), rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_combine_and_split_difference(dtype, backend):
    _, xs, ys = _lists(dtype)
    n = len(xs)
    a = [torch.tensor(v, dtype=torch.float64) for v in torch.linspace(-1.5, 2.0, n).tolist()]
    b = [torch.tensor(0.0 if i % 3 == 0 else 0.7 - 0.1 * i, dtype=torch.float64) for i in range(n)]
    ys[0].fill_(float("nan"))  # b = 0 there: the term counts 0
    targets = [t.clone() for t in xs]
    F.combine_(targets, ys, a, b, backend=backend)
    rtol = 2 * _ELEM_RTOL[dtype]
    for t, x, y, ai, bi in zip(targets, xs, ys, a, b):
        y_term = bi * y.double() if float(bi) != 0 else torch.zeros_like(y, dtype=torch.float64)
        _assert_within(t, ai * x.double() + y_term, (ai * x.double()).abs() + y_term.abs(), rtol)
    grads, firsts = [t.clone() for t in xs[1:]], [t.clone() for t in ys[1:]]
    skips = [torch.tensor(i % 4 == 1) for i in range(len(grads))]
    F.split_difference_(grads, firsts, skips, backend=backend)
    for g, diff, x, y, skip in zip(grads, firsts, xs[1:], ys[1:], skips):
        if skip:  # a skipped first pass: .grad keeps g_sam, no sharpness
            assert torch.equal(g, x) and not diff.any()
            continue
        assert torch.equal(g, y)  # .grad ← g, bit for bit
        _assert_within(diff, x.double() - y.double(), x.double().abs() + y.double().abs(), rtol)


def _assert_within(actual, expected, scale, rtol):
    """|actual − expected| ≤ rtol · scale elementwise (scale: the size of the terms summed), plus the spacing of
    the subnormals of actual's dtype (float16 results under 6e-5 round absolutely)."""
    info = torch.finfo(actual.dtype)
    actual = actual.double()
    assert torch.isfinite(actual).all()
    excess = (actual - expected).abs() - rtol * scale - info.eps * info.tiny
    assert (excess <= 0).all(), f"max excess {float(excess.max()):.3g}"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_residual_operations_match_reference(dtype, backend):
    params, grads, moments = _lists(dtype)
    n = len(params)
    sigmas = [0.5 + 0.1 * i for i in range(n)]
    lmbdas = [0.9 - 0.05 * i for i in range(n)]
    expected_sum = F.residual_sq_sum(params, grads, moments, sigmas=sigmas, backend="reference")
    d = torch.cat([(g.double() - s * m.double()).flatten() for g, m, s in zip(grads, moments, sigmas)])
    torch.testing.assert_close(expected_sum.double(), d @ d, rtol=_SUM_RTOL[dtype], atol=0)
    torch.testing.assert_close(F.residual_sq_sum(params, grads, moments, sigmas=sigmas, backend=backend).double(),
                               expected_sum.double(), rtol=_SUM_RTOL[dtype], atol=0)
    scales = [torch.tensor(0.25, dtype=torch.float32)] * n  # exact in every dtype
    runs = []
    for name in ("reference", backend):
        w = [p.clone() for p in params]
        m = [t.clone() for t in moments]
        saved = [torch.empty_like(p) for p in params]
        F.residual_perturb_(w, grads, m, saved, scales, sigmas=sigmas, lmbdas=lmbdas, backend=name)
        assert all(torch.equal(s, p) for s, p in zip(saved, params))
        runs.append((w, m))
    for (w_ref, m_ref), (w_new, m_new), p, g, m0, s, lam in zip(zip(*runs[0]), zip(*runs[1]), params, grads, moments,
                                                                 sigmas, lmbdas):
        rtol = _ELEM_RTOL[dtype]
        torch.testing.assert_close(w_new.double(), w_ref.double(), rtol=2 * rtol, atol=2 * rtol)
        torch.testing.assert_close(m_new.double(), m_ref.double(), rtol=2 * rtol, atol=2 * rtol)
        _assert_within(w_ref, p.double() + 0.25 * (g.double() - s * m0.double()),
                       p.double().abs() + 0.25 * (g.double().abs() + s * m0.double().abs()), 2 * rtol)
        _assert_within(m_ref, lam * m0.double() + (1 - lam) * g.double(),
                       lam * m0.double().abs() + (1 - lam) * g.double().abs(), 2 * rtol)
