"""Sharpness measures of ASAM (Kwon et al. 2021): Eq. 2 and the adaptive sharpness of Definition 2.

    S(w)       = max_{‖ε‖_p ≤ ρ}        L(w + ε) − L(w)          (sharpness, t ≡ 1)
    S_adapt(w) = max_{‖t⁻¹ ⊙ ε‖_p ≤ ρ}  L(w + ε) − L(w)          (adaptive sharpness)

with t = |w| + η (element-wise) or ‖f_i‖₂ + η (filter-wise), as docs/DESIGN.md §2.
Writing ε = t ⊙ δ turns the constraint into ‖δ‖_p ≤ ρ, and the maximum is
estimated by projected gradient ascent on δ: δ ← Π(δ + α · dir(t ⊙ ∇L(w + t ⊙ δ))),
dir the normalised (p = 2) or sign (p = ∞) direction, Π the projection onto
the ball. One step of size ρ from δ = 0 is the first-order estimate that
SAM/ASAM use; more steps give a tighter lower bound (the best iterate is kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .backends.reference import asam_scale
from ._validation import check_non_negative, check_p

__all__ = ["sharpness"]


def _direction(grads: list[Tensor], p: float) -> list[Tensor]:
    if p == 2:
        norm = torch.sqrt(sum((g * g).sum() for g in grads)) + 1e-12
        return [g / norm for g in grads]
    return [torch.sign(g) for g in grads]


def _project_(deltas: list[Tensor], rho: float, p: float) -> None:
    if p == 2:
        norm = torch.sqrt(sum((d * d).sum() for d in deltas))
        factor = torch.clamp(rho / (norm + 1e-12), max=1.0)
        for d in deltas:
            d.mul_(factor)
    else:
        for d in deltas:
            d.clamp_(-rho, rho)


@torch.no_grad()
def _batch_sharpness(params, loss_at: Callable[[], Tensor], rho, adaptive, p, eta, steps) -> float:
    saved = [w.detach().clone() for w in params]
    scales = [asam_scale(w, eta, adaptive).to(w.dtype) for w in saved]
    deltas = [torch.zeros_like(w) for w in saved]
    step_size = rho if steps == 1 else 2.0 * rho / steps
    base_loss = float(loss_at())
    best = 0.0
    try:
        for _ in range(steps):
            for w, w0, t, d in zip(params, saved, scales, deltas):
                w.copy_(w0 + t * d)
            with torch.enable_grad():
                loss = loss_at()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g * t for g, w, t in zip(grads, params, scales)]
            for d, step in zip(deltas, _direction(grads, p)):
                d.add_(step, alpha=step_size)
            _project_(deltas, rho, p)
            for w, w0, t, d in zip(params, saved, scales, deltas):
                w.copy_(w0 + t * d)
            best = max(best, float(loss_at()) - base_loss)
    finally:
        for w, w0 in zip(params, saved):
            w.copy_(w0)
    return best


def sharpness(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], Tensor],
    batches: Iterable,
    *,
    rho: float,
    adaptive: str | None = None,
    p: float = 2,
    eta: float = 0.01,
    steps: int = 1,
) -> float:
    """Mean over ``batches`` of max L(w + ε) − L(w) in the (adaptive) ρ-ball.

    ``loss_fn(model, batch)`` returns the scalar loss of one batch. ``adaptive``
    is None (Eq. 2), ``"element"`` or ``"filter"`` (Definition 2). The model's
    mode is left as it is (use ``model.eval()`` for a deterministic measure)
    and its weights are restored exactly.
    """
    rho = check_non_negative("rho", rho)
    eta = check_non_negative("eta", eta)
    p = check_p(p)
    if adaptive not in (None, "element", "filter"):
        raise ValueError(f"Invalid adaptive: {adaptive!r} (must be None, 'element' or 'filter')")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r} (must be an int >= 1)")
    params = [w for w in model.parameters() if w.requires_grad]
    values = [
        _batch_sharpness(params, lambda b=batch: loss_fn(model, b), rho, adaptive, p, eta, steps)
        for batch in batches
    ]
    if not values:
        raise ValueError("batches is empty")
    return math.fsum(values) / len(values)
