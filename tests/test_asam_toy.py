"""ASAM paper Fig. 3: L(w) = |w1·relu(w2) − 0.04|, plain SGD lr 0.01, 1000 steps."""

import pytest
import torch

import sam_kernels


def _train(optimizer_cls, start, backend, **kwargs):
    w = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = optimizer_cls([w], torch.optim.SGD, lr=0.01, backend=backend, **kwargs)

    def loss():
        return (w[0] * torch.relu(w[1]) - 0.04).abs()

    def closure():
        value = loss()
        value.backward()
        return value

    losses = []
    for _ in range(1000):
        opt.step(closure)
        with torch.no_grad():
            losses.append(float(loss()))
    return w.detach(), losses


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_sam_from_first_start_reaches_the_valley_near_0p2_0p2(backend):
    w, losses = _train(sam_kernels.SAM, (0.2, 0.05), backend, rho=0.05)
    assert torch.linalg.vector_norm(w - torch.tensor([0.2, 0.2], dtype=torch.float64)) < 0.02
    assert losses[-1] < 0.002


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_sam_from_second_start_never_reaches_the_valley(backend):
    # Its perturbation lands where relu(w2) = 0: the gradient there moves nothing.
    _, losses = _train(sam_kernels.SAM, (0.3, 0.033), backend, rho=0.05)
    assert min(losses) > 0.02


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("start", [(0.2, 0.05), (0.3, 0.033)])
def test_asam_reaches_the_valley_from_both_starts(backend, start):
    _, losses = _train(sam_kernels.ASAM, start, backend, rho=0.5, eta=0.01, p=2, granularity="element")
    assert losses[-1] < 0.002
