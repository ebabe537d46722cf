"""The perturbation ε of every optimizer obeys its defining constraint (docs/DESIGN.md §1–2).

The scale t is computed here independently of the library, from its definition.
"""

import copy
import math

import pytest
import torch
from torch import nn

import sam_kernels
from helpers import BACKENDS, TwoLayerReLU, all_params, fill_random_grads, make_params



def _trainable(groups):
    return [p for p in all_params(groups) if p.requires_grad and p.numel() > 0]


def _perturbation(optimizer_cls, groups, **kwargs):
    """ε per trainable tensor (float64) after first_step on random grads, and the grads used."""
    fill_random_grads(groups)
    before = [p.detach().double().clone() for p in _trainable(groups)]
    grads = [p.grad.double().clone() for p in _trainable(groups)]
    opt = optimizer_cls(groups, torch.optim.SGD, lr=0.1, **kwargs)
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
    opt.first_step()
    eps = [p.detach().double() - w for p, w in zip(_trainable(groups), before)]
    return eps, grads, before, opt


def _t(w, eta, granularity):
    if granularity == "filter" and w.dim() >= 2:
        norms = w.reshape(w.shape[0], -1).norm(dim=1)
        return (norms + eta).reshape((-1,) + (1,) * (w.dim() - 1)).expand_as(w)
    return w.abs() + eta


def _single_group(dtype=torch.float64):
    groups = make_params(dtype)
    return [{"params": [p for g in groups for p in g["params"]]}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_perturbation_has_norm_rho(backend):
    eps, grads, _, _ = _perturbation(sam_kernels.SAM, _single_group(), rho=0.07, backend=backend)
    norm = math.sqrt(sum(float((e**2).sum()) for e in eps))
    assert norm == pytest.approx(0.07, rel=1e-9)
    # and it points along g
    flat_eps, flat_g = torch.cat([e.flatten() for e in eps]), torch.cat([g.flatten() for g in grads])
    assert float(torch.nn.functional.cosine_similarity(flat_eps, flat_g, dim=0)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["element", "filter"])
def test_asam_p2_scaled_perturbation_has_norm_rho(backend, granularity):
    eta = 0.01
    eps, _, before, _ = _perturbation(
        sam_kernels.ASAM, _single_group(), rho=0.5, eta=eta, p=2, granularity=granularity, backend=backend
    )
    scaled = [e / _t(w, eta, granularity) for e, w in zip(eps, before)]
    assert math.sqrt(sum(float((s**2).sum()) for s in scaled)) == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["element", "filter"])
def test_asam_pinf_scaled_perturbation_has_max_rho(backend, granularity):
    eta = 0.01
    eps, grads, before, _ = _perturbation(
        sam_kernels.ASAM, _single_group(), rho=0.05, eta=eta, p=math.inf, granularity=granularity, backend=backend
    )
    for e, g, w in zip(eps, grads, before):
        scaled = e / _t(w, eta, granularity)
        assert torch.allclose(scaled, 0.05 * torch.sign(g), atol=1e-12)
    assert max(float((e / _t(w, eta, granularity)).abs().max()) for e, w in zip(eps, before)) == pytest.approx(0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rsam_perturbation_has_norm_rho(backend):
    groups = _single_group()
    saved = [p.detach().double().clone() for p in _trainable(groups)]
    fill_random_grads(groups)
    opt = sam_kernels.RSAM(groups, torch.optim.SGD, lr=0.1, rho=0.05, gamma=0.1, seed=3, backend=backend)
    opt.noise_step()
    noised = [p.detach().double().clone() for p in _trainable(groups)]
    assert any(not torch.equal(a, b) for a, b in zip(noised, saved))
    opt.first_step()
    eps = [p.detach().double() - w for p, w in zip(_trainable(groups), saved)]
    assert math.sqrt(sum(float((e**2).sum()) for e in eps)) == pytest.approx(0.05, rel=1e-9)


def _model_and_batch():
    model = nn.Sequential(nn.Linear(6, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 2, dtype=torch.float64))
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    return model, x, y


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rsam_with_gamma_zero_is_sam(backend):
    model, x, y = _model_and_batch()
    twin = copy.deepcopy(model)
    sam = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, backend=backend)
    rsam = sam_kernels.RSAM(twin.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, gamma=0.0, backend=backend)
    original = [p.detach().clone() for p in twin.parameters()]
    _loss(model, x, y).backward()
    sam.first_step()
    rsam.noise_step()
    assert all(torch.equal(a, b) for a, b in zip(original, twin.parameters()))  # γ = 0: no noise
    _loss(twin, x, y).backward()
    rsam.first_step()
    for a, b, w in zip(model.parameters(), twin.parameters(), original):
        # The perturbations differ only through the 1e-12 norm guards (relative ~1e-12/‖g‖)
        # and the rounding of w + ε (atol): compare ε, not w + ε.
        torch.testing.assert_close(b.detach() - w, a.detach() - w, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rsam_large_lambda_is_sam_direction_at_noised_point(backend):
    model, x, y = _model_and_batch()
    saved = [p.detach().clone() for p in model.parameters()]
    rsam = sam_kernels.RSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, gamma=0.3, lam=1e7, backend=backend)
    rsam.noise_step()
    _loss(model, x, y).backward()
    g_hat = torch.cat([p.grad.flatten() for p in model.parameters()])
    rsam.first_step()
    eps = torch.cat([(p.detach() - w).flatten() for p, w in zip(model.parameters(), saved)])
    torch.testing.assert_close(eps, 0.05 * g_hat / g_hat.norm(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rsam_lambda_zero_is_the_noise_direction(backend):
    model, x, y = _model_and_batch()
    saved = [p.detach().clone() for p in model.parameters()]
    rsam = sam_kernels.RSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, gamma=0.1, lam=0.0, backend=backend)
    rsam.noise_step()
    delta = torch.cat([(p.detach() - w).flatten() for p, w in zip(model.parameters(), saved)])
    _loss(model, x, y).backward()
    rsam.first_step()
    eps = torch.cat([(p.detach() - w).flatten() for p, w in zip(model.parameters(), saved)])
    torch.testing.assert_close(eps, 0.05 * delta / delta.norm(), rtol=0, atol=1e-10)


def _a_transform(model: TwoLayerReLU, a: torch.Tensor) -> TwoLayerReLU:
    """Row i of W1 times a_i, column i of W2 divided by a_i: the same function."""
    other = TwoLayerReLU(model.fc1.in_features, model.fc1.out_features, model.fc2.out_features)
    with torch.no_grad():
        other.fc1.weight.copy_(model.fc1.weight * a[:, None])
        other.fc2.weight.copy_(model.fc2.weight / a[None, :])
    return other


def _loss_at_perturbed_point(model, optimizer_cls, x, y, **kwargs):
    opt = optimizer_cls(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference", **kwargs)
    nn.functional.mse_loss(model(x), y).backward()
    opt.first_step()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def test_asam_is_invariant_under_a_transformation_and_sam_is_not():
    """ASAM Theorem 1 (η = 0): L(w + ε_ASAM(w)) = L(w' + ε_ASAM(w')) for w' = T_a w."""
    model = TwoLayerReLU()
    a = torch.rand(7, dtype=torch.float64) * 4 + 0.25
    transformed = _a_transform(model, a)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), transformed(x))  # T_a keeps the function

    asam = dict(rho=0.5, eta=0.0, p=2, granularity="element")
    asam_w = _loss_at_perturbed_point(copy.deepcopy(model), sam_kernels.ASAM, x, y, **asam)
    asam_w_prime = _loss_at_perturbed_point(copy.deepcopy(transformed), sam_kernels.ASAM, x, y, **asam)
    assert asam_w == pytest.approx(asam_w_prime, rel=1e-10)

    sam_w = _loss_at_perturbed_point(copy.deepcopy(model), sam_kernels.SAM, x, y, rho=0.5)
    sam_w_prime = _loss_at_perturbed_point(copy.deepcopy(transformed), sam_kernels.SAM, x, y, rho=0.5)
    assert abs(sam_w - sam_w_prime) > 1e-3 * abs(sam_w)

