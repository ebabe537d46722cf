"""python/landscape.py: the R-SAM Fig. 1–2 quantities against an independent per-tensor computation."""

import csv
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn", reason="the program's dataset ships with scikit-learn")
pytest.importorskip("matplotlib", reason="the program draws a PNG")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
landscape = importlib.import_module("landscape")

from sam_kernels.noise import standard_normal  # noqa: E402


def _tiny_model():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def _reference(model, x, y, rhos, noise):
    """Independent: float64 copy, torch.func.functional_call on a dict of tensors, per-tensor sums by hand."""
    m64 = _tiny_model().double()
    m64.load_state_dict(model.state_dict())
    m64.train()
    names = [n for n, _ in m64.named_parameters()]
    w = {n: p.detach().clone() for n, p in m64.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in m64.named_buffers()}
    x64 = x.double()

    def loss_grad(point):
        point = {n: t.detach().clone().requires_grad_(True) for n, t in point.items()}
        loss = nn.functional.cross_entropy(
            torch.func.functional_call(m64, ({**point}, {n: b.clone() for n, b in buffers.items()}), (x64,)), y)
        grads = torch.autograd.grad(loss, [point[n] for n in names])
        return dict(zip(names, grads)), float(loss.detach())

    def dot(a, b):
        return math.fsum(float((a[n] * b[n]).sum()) for n in names)

    def cos(a, b):
        return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))

    start = {n: w[n] + (0 if noise is None else noise[i].double()) for i, n in enumerate(names)}
    g_start, loss_start = loss_grad(start)
    norm = math.sqrt(dot(g_start, g_start))
    out = []
    for rho in rhos:
        g1, l1 = loss_grad({n: start[n] + rho * g_start[n] / norm for n in names})
        g2, l2 = loss_grad({n: w[n] + rho * g_start[n] / norm for n in names})
        out.append({"cos": cos(g_start, g1), "loss": l1, "cos_at_w": cos(g_start, g2), "loss_at_w": l2,
                    "loss_start": loss_start, "loss_w": loss_grad(w)[1]})
    return out


@pytest.mark.parametrize("noised", [False, True])
def test_quantities_match_independent_per_tensor_computation(noised):
    model = _tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # BatchNorm affine parameters away from (1, 0) too
    model.train()
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))
    noise = [0.2 * torch.randn_like(p) for p in model.parameters()] if noised else None
    rhos = sorted(torch.empty(3).uniform_(0.01, 1.0).tolist())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    rows = landscape.ascent_quantities(model, x, y, rhos, noise)

    for key, value in model.state_dict().items():  # weights and BatchNorm buffers are put back exactly
        assert torch.equal(value, before[key]), key
    expected = _reference(model, x, y, rhos, noise)
    assert [r["rho"] for r in rows] == rhos
    for row, ref in zip(rows, expected):
        for key in ("cos", "loss", "cos_at_w", "loss_at_w", "loss_start", "loss_w"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    if noised:  # the paper's quantity and the extra one are different points
        assert rows[-1]["loss"] != pytest.approx(rows[-1]["loss_at_w"], rel=1e-3)
    else:
        assert all(r["cos"] == r["cos_at_w"] and r["loss_start"] == r["loss_w"] for r in rows)


def test_noise_scalings_per_tensor():
    model = _tiny_model()
    weights = [p.detach() for p in model.parameters()]
    gamma_sq = float(torch.empty(()).uniform_(0.001, 0.02))
    seed, draw = int(torch.randint(0, 2**31, ())), int(torch.randint(0, 100, ()))
    absolute = landscape.draw_noise(weights, gamma_sq, "absolute", seed, draw)
    kernel = landscape.draw_noise(weights, gamma_sq, "kernel", seed, draw)
    gamma = math.sqrt(gamma_sq)
    for j, w in enumerate(weights):
        z = standard_normal(w.numel(), seed=seed, tensor_index=j, step=draw).reshape(w.shape)
        torch.testing.assert_close(absolute[j], gamma * z)
        if w.dim() <= 1:
            sigma = gamma * w.abs()
        else:
            sigma = torch.stack([gamma * w[i].norm() / math.sqrt(w[i].numel()) * torch.ones_like(w[i])
                                 for i in range(w.shape[0])])
        torch.testing.assert_close(kernel[j], sigma * z)
    with pytest.raises(ValueError):
        landscape.draw_noise(weights, gamma_sq, "relative", seed, draw)


def test_verdict_rule():
    def summary(curve):
        rows = [{"checkpoint": "c", "scaling": "vanilla", "gamma_sq": 0.0, "rho": r, "cos_mean": 0.5,
                 "loss_start_mean": 1.0, "noise_to_weight_mean": 0.0} for r in (1, 2, 3, 4)]
        for rho, (low, high) in zip((1, 2, 3, 4), curve):
            rows.append({"checkpoint": "c", "scaling": "kernel", "gamma_sq": 0.01, "rho": rho, "cos_min": low,
                         "cos_max": high, "cos_mean": (low + high) / 2, "loss_start_mean": 2.0,
                         "noise_to_weight_mean": 0.1})
        (line,) = landscape.verdict(rows)
        return line["claim"], line["per_rho"]

    assert summary([(0.4, 0.6), (0.4, 0.6), (0.6, 0.7), (0.6, 0.7)]) == (
        "holds", ["overlap", "overlap", "above", "above"])
    assert summary([(0.6, 0.7), (0.6, 0.7), (0.6, 0.7), (0.4, 0.6)])[0] == "mixed"  # not above at the largest ρ
    assert summary([(0.1, 0.2), (0.1, 0.2), (0.4, 0.6), (0.4, 0.6)])[0] == "fails"
    assert summary([(0.6, 0.7), (0.6, 0.7), (0.1, 0.2), (0.6, 0.7)])[0] == "mixed"


def test_program_writes_tables_and_png(tmp_path):
    result = landscape.main(["--train-epochs", "2", "--early-epoch", "1", "--rhos", "0.01", "0.5",
                             "--gamma-sq", "0.01", "--draws", "2", "--batch-size", "32", "--out", str(tmp_path)])
    png = tmp_path / "landscape.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with open(tmp_path / "landscape.csv") as handle:
        rows = list(csv.DictReader(handle))
    # 2 checkpoints × (vanilla + 2 scalings × 1 γ² × 2 draws) × 2 ρ
    assert len(rows) == 2 * (1 + 2 * 2) * 2
    assert {r["checkpoint"] for r in rows} == {"early (epoch 1)", "late (epoch 2)"}
    assert {r["scaling"] for r in rows} == {"vanilla", "absolute", "kernel"}
    for r in rows:
        assert -1.0 <= float(r["cos"]) <= 1.0 and -1.0 <= float(r["cos_at_w"]) <= 1.0
    assert len(result["verdicts"]) == 2 * 2 and "holds for" in result["overall"]
