"""python/sharpness_gap.py: ReLU rescaling (ASAM Theorem 1), correlation coefficients and the program."""

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn", reason="the program's dataset ships with scikit-learn")
pytest.importorskip("matplotlib", reason="the program draws a PNG")
scipy_stats = pytest.importorskip("scipy.stats")

PROGRAMS = Path(__file__).resolve().parents[1] / "python"
sys.path.insert(0, str(PROGRAMS))
common = importlib.import_module("common")
sharpness_gap = importlib.import_module("sharpness_gap")

import sam_kernels  # noqa: E402


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_rescaling_keeps_function_and_adaptive_sharpness_but_moves_sharpness():
    model = common.small_cnn(width=4).double().eval()
    x, y = torch.rand(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x).detach()
    plain = sam_kernels.sharpness(model, _loss, batches, rho=0.05, steps=2)
    adaptive = sam_kernels.sharpness(model, _loss, batches, rho=0.5, adaptive="element", eta=0.0, steps=2)

    factors = sharpness_gap.relu_rescale(model, 4.0, torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))

    # The weights are T(w) by the formula, written out per layer: W_l ← diag(α_l) W_l diag(α_{l−1})⁻¹.
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    linear = model[-1]
    assert len(factors) == 3 and max(float(a.log().abs().max()) for a in factors) > 0.5  # not a no-op
    w0 = iter(before)
    inputs = torch.ones(1, dtype=torch.float64)
    for conv, alpha in zip(convs, factors):
        weight, bias = next(w0), next(w0)
        expected = weight * alpha[:, None, None, None] / inputs[None, :, None, None]
        torch.testing.assert_close(conv.weight.detach(), expected)
        torch.testing.assert_close(conv.bias.detach(), bias * alpha)
        inputs = alpha
    weight, bias = next(w0), next(w0)
    # the head's input columns 4c … 4c+3 come from channel c of the last convolution
    per_input = torch.stack([inputs[c] for c in range(len(inputs)) for _ in range(4)])
    torch.testing.assert_close(linear.weight.detach(), weight / per_input[None, :])
    torch.testing.assert_close(linear.bias.detach(), bias)

    torch.testing.assert_close(model(x).detach(), logits, rtol=1e-9, atol=1e-9)  # same function
    adaptive_after = sam_kernels.sharpness(model, _loss, batches, rho=0.5, adaptive="element", eta=0.0, steps=2)
    assert adaptive_after == pytest.approx(adaptive, rel=1e-6)

    # Plain sharpness is not invariant. A random rescaling may happen to leave it nearly unchanged (about 1 draw
    # in 13 moved it by < 5 %), so show it with one that must move it: the first convolution ×A, the second's
    # inputs ÷A. Its gradients become g₀/A and A·g₁, so ‖g‖ — SAM's first-order sharpness ρ‖g‖ — grows with A.
    with torch.no_grad():
        convs[0].weight.mul_(100.0)
        convs[0].bias.mul_(100.0)
        convs[1].weight.div_(100.0)
    torch.testing.assert_close(model(x).detach(), logits, rtol=1e-9, atol=1e-9)  # still the same function
    plain_after = sam_kernels.sharpness(model, _loss, batches, rho=0.05, steps=2)
    assert sam_kernels.sharpness(model, _loss, batches, rho=0.5, adaptive="element", eta=0.0,
                                 steps=2) == pytest.approx(adaptive, rel=1e-6)
    assert abs(math.log(plain_after / plain)) > 0.05


def test_a_rescaling_that_changes_the_function_is_detected():
    """The invariance check can fail: scale a convolution without compensating the next layer."""
    model = common.small_cnn(width=4).double().eval()
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    logits = model(x).detach()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
        model[0].bias.mul_(2.0)
    assert not torch.allclose(model(x), logits, rtol=1e-6, atol=1e-9)


def test_coefficients_match_scipy():
    n = int(torch.randint(8, 30, ()))
    x = torch.randint(0, 6, (n,)).double().numpy()  # ties, as bootstrap resamples have
    y = (torch.from_numpy(x) + torch.randn(n)).numpy()
    assert sharpness_gap.pearson_r(x, y) == pytest.approx(scipy_stats.pearsonr(x, y)[0], abs=1e-12)
    assert sharpness_gap.kendall_tau_b(x, y) == pytest.approx(scipy_stats.kendalltau(x, y)[0], abs=1e-12)
    batched = sharpness_gap.kendall_tau_b(np.stack([x, y]), np.stack([y, x]))
    assert batched.shape == (2,) and batched[0] == pytest.approx(batched[1])


def test_bootstrap_says_which_measure_tracks_the_gap():
    n = 30
    gap = torch.rand(n).double()
    good = (gap + 0.01 * torch.randn(n)).tolist()
    bad = torch.rand(n).tolist()
    c = sharpness_gap.correlations({"sharpness": bad, "adaptive_sharpness": good}, gap.tolist(), resamples=500, seed=0)
    for name in ("sharpness", "adaptive_sharpness"):
        for coef in ("pearson", "kendall"):
            low, high = c[name][f"{coef}_ci"]
            assert low <= c[name][coef] <= high
    assert c["adaptive_sharpness − sharpness"]["kendall_ci"][0] > 0
    assert sharpness_gap.answer(c).count("adaptive better") == 2
    swapped = sharpness_gap.correlations({"sharpness": good, "adaptive_sharpness": bad}, gap.tolist(),
                                         resamples=500, seed=0)
    assert sharpness_gap.answer(swapped).count("plain better") == 2


def test_program_writes_study(tmp_path):
    result = sharpness_gap.main(["--models", "3", "--rescaled", "2", "--epochs-scale", "0.1", "--train-size", "120",
                                 "--steps", "1", "--batches", "2", "--resamples", "100", "--out", str(tmp_path)])
    png = tmp_path / "sharpness_gap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    saved = json.loads((tmp_path / "sharpness_gap.json").read_text())
    assert len(saved["models"]) == 3 and len(saved["rescaled"]) == 2
    for copy in result["rescaled"]:
        original = result["models"][copy["model"]]
        assert copy["gap"] == pytest.approx(original["gap"], abs=1e-4)
        assert copy["adaptive_sharpness"] == pytest.approx(original["adaptive_sharpness"], rel=1e-3)
    for name in sharpness_gap.MEASURES:
        assert -1.0 <= result["correlations"][name]["kendall"] <= 1.0
    assert "Pearson r" in result["answer"]
