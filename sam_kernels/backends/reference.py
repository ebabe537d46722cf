"""The reference backend: one tensor at a time, written to read like docs/DESIGN.md §2.

This is the oracle that every other backend is tested against. It favours
clarity over speed: every quantity is computed in the accumulation dtype
(float32, or float64 for float64 parameters) and stored back once in the
parameter's dtype. It never synchronises with the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import noise

NAME = "reference"
NORM_GUARD = 1e-12  # ‖·‖ + 1e-12 guards a zero norm (docs/DESIGN.md §2)


def available() -> tuple[bool, str]:
    return True, ""


def supports(device: torch.device) -> bool:
    return True


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(tensor: Tensor) -> Tensor:
    return tensor.to(accumulation_dtype(tensor.dtype))


def filter_norm(w: Tensor) -> Tensor:
    """‖f_i‖₂ for filter i = w[i] flattened (ndim ≥ 2); |w_k| when ndim ≤ 1.

    Computed in float64 and rounded to the accumulation dtype, so that a norm is right over the whole
    range of the dtype (float32 squares under- or overflow for |w| < 1e-19 or > 1.8e19).
    """
    acc = accumulation_dtype(w.dtype)
    if w.dim() <= 1:
        return _acc(w).abs()
    return torch.linalg.vector_norm(_acc(w).double().flatten(1), dim=1).to(acc)


def filter_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [filter_norm(w) for w in tensors]


def _broadcast_per_filter(per_filter: Tensor, like: Tensor) -> Tensor:
    """Expand a per-filter value [size(0)] to the shape of ``like`` (identity for ndim ≤ 1)."""
    if like.dim() <= 1:
        return per_filter
    return per_filter.reshape((-1,) + (1,) * (like.dim() - 1)).expand_as(like)


def asam_scale(w: Tensor, eta: float, granularity: str | None) -> Tensor:
    """ASAM's t: 1 (SAM), |w| + η (element-wise) or ‖f_i‖₂ + η (filter-wise, ndim ≥ 2)."""
    w = _acc(w)
    if granularity is None:
        return torch.ones_like(w)
    if granularity == "element" or w.dim() <= 1:
        return w.abs() + eta
    if granularity == "filter":
        return _broadcast_per_filter(filter_norm(w), w) + eta
    raise ValueError(f"granularity must be None, 'element' or 'filter', got {granularity!r}")


def noise_std(w_saved: Tensor, gamma: float) -> Tensor:
    """σ for every element: γ · ‖w_i‖₂ / √n_i of its filter i (ndim ≤ 1: γ · |w_k|)."""
    w_saved = _acc(w_saved)
    if w_saved.dim() <= 1:
        return gamma * w_saved.abs()
    filter_size = math.prod(w_saved.shape[1:])
    sigma = gamma * filter_norm(w_saved) / math.sqrt(filter_size)
    return _broadcast_per_filter(sigma, w_saved)


def initial_noise(
    w_saved: Tensor, gamma: float, seed: int, tensor_index: int, step: int, element_offset: int = 0
) -> Tensor:
    """δ₀ = σ ⊙ z, z the Philox/Box–Muller stream of tensor ``tensor_index`` at ``step``.

    ``element_offset`` is the global index of the first element when ``w_saved``
    is a dim-0 shard of a bigger tensor (FSDP).
    """
    z = noise.standard_normal(
        w_saved.numel(), seed=seed, tensor_index=tensor_index, step=step, device=w_saved.device, offset=element_offset
    )
    z = z.reshape(w_saved.shape).to(accumulation_dtype(w_saved.dtype))
    return noise_std(w_saved, gamma) * z


def _zero_non_finite(eps: Tensor) -> Tensor:
    # A skipped (non-finite) step has every scale zero, so ε = 0·g ∈ {0, NaN}: make it 0.
    return torch.where(torch.isfinite(eps), eps, torch.zeros_like(eps))


def scaled_grad_sq_sum(
    params: Sequence[Tensor], grads: Sequence[Tensor], *, etas: Sequence[float], granularity: str | None
) -> Tensor:
    """Σ over all tensors of Σ_k (t_k · g_k)²."""
    total = None
    for w, g, eta in zip(params, grads, etas):
        t = asam_scale(w, eta, granularity)
        term = ((t * _acc(g)) ** 2).sum()
        total = term if total is None else _add_promoting(total, term)
    return total if total is not None else torch.zeros((), dtype=torch.float32)


def _add_promoting(a: Tensor, b: Tensor) -> Tensor:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype) + b.to(dtype)


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    scales: Sequence[Tensor],
    *,
    etas: Sequence[float],
    granularity: str | None,
    p: float,
) -> None:
    """saved ← w; w ← w + ε, ε = s·t²⊙g (p = 2) or ε = s·t⊙sign(g) (p = ∞)."""
    for w, g, w_saved, scale, eta in zip(params, grads, saved, scales, etas):
        w_saved.copy_(w)
        t = asam_scale(w, eta, granularity)
        g = _acc(g)
        scale = scale.to(g.dtype)
        if p == 2:
            eps = (scale * t) * (t * g)  # not t·t first: t² overflows where ε does not
        else:
            eps = scale * t * torch.sign(g)
        w.copy_(_acc(w_saved) + _zero_non_finite(eps))


def restore_(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """w ← saved (bit-exact: the copy has the parameter's dtype)."""
    for w, w_saved in zip(params, saved):
        w.copy_(w_saved)


def add_noise_(
    params: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    gammas: Sequence[float],
    stream: noise.NoiseStream,
) -> None:
    """saved ← w; w ← w + δ₀ = ŵ."""
    for w, w_saved, gamma, j, offset in zip(params, saved, gammas, stream.tensor_indices, stream.offsets):
        w_saved.copy_(w)
        w.copy_(_acc(w_saved) + initial_noise(w_saved, gamma, stream.seed, j, stream.step, offset))


def noise_grad_sums(
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    gammas: Sequence[float],
    lams: Sequence[float],
    stream: noise.NoiseStream,
) -> Tensor:
    """(Σ δ₀², Σ g², Σ λ·δ₀·g, Σ λ²·g²) over all tensors."""
    total = None
    per_tensor = zip(grads, saved, gammas, lams, stream.tensor_indices, stream.offsets)
    for g, w_saved, gamma, lam, j, offset in per_tensor:
        delta = initial_noise(w_saved, gamma, stream.seed, j, stream.step, offset)
        g = _acc(g)
        sums = torch.stack(
            [(delta * delta).sum(), (g * g).sum(), lam * (delta * g).sum(), lam * lam * (g * g).sum()]
        )
        total = sums if total is None else _add_promoting(total, sums)
    return total if total is not None else torch.zeros(4, dtype=torch.float32)


def mix_perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    noise_coefs: Sequence[Tensor],
    grad_coefs: Sequence[Tensor],
    *,
    gammas: Sequence[float],
    stream: noise.NoiseStream,
) -> None:
    """w ← saved + ε, ε = a·δ₀ + b·g (a, b from :func:`sam_kernels.functional.rsam_coefficients`)."""
    per_tensor = zip(params, grads, saved, noise_coefs, grad_coefs, gammas, stream.tensor_indices, stream.offsets)
    for w, g, w_saved, a, b, gamma, j, offset in per_tensor:
        delta = initial_noise(w_saved, gamma, stream.seed, j, stream.step, offset)
        g = _acc(g)
        eps = a.to(g.dtype) * delta + b.to(g.dtype) * g
        w.copy_(_acc(w_saved) + _zero_non_finite(eps))


# ------------------------------------------------ the SAM family (docs/DESIGN.md §2.5–§2.8)
def copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """target ← source, bit for bit (GSAM, R-GSAM, LookSAM and WSAM keep the first-pass g)."""
    for x, y in zip(targets, sources):
        x.copy_(y)


def pair_sums(firsts: Sequence[Tensor], seconds: Sequence[Tensor]) -> Tensor:
    """(Σ x·y, Σ x², Σ y²) over all tensors, each product in its accumulation dtype."""
    total = None
    for x, y in zip(firsts, seconds):
        acc = torch.promote_types(accumulation_dtype(x.dtype), accumulation_dtype(y.dtype))
        x, y = x.to(acc), y.to(acc)
        sums = torch.stack([(x * y).sum(), (x * x).sum(), (y * y).sum()])
        total = sums if total is None else _add_promoting(total, sums)
    return total if total is not None else torch.zeros(3, dtype=torch.float32)


def _term(coef: Tensor, x: Tensor) -> Tensor:
    """coef · x, and exactly 0 where coef = 0 (so a skipped term drops a non-finite x instead of 0·Inf = NaN)."""
    product = coef.to(x.dtype) * x
    return torch.where(coef.to(x.dtype) == 0, torch.zeros_like(product), product)


def combine_(
    targets: Sequence[Tensor], others: Sequence[Tensor], target_coefs: Sequence[Tensor], other_coefs: Sequence[Tensor]
) -> None:
    """x ← a·x + b·y in x's accumulation dtype, rounded once into x."""
    for x, y, a, b in zip(targets, others, target_coefs, other_coefs):
        acc = accumulation_dtype(x.dtype)
        x.copy_(_term(a, _acc(x)) + _term(b, y.to(acc)))


def split_difference_(grads: Sequence[Tensor], firsts: Sequence[Tensor], skips: Sequence[Tensor]) -> None:
    """WSAM's decoupled split: s = g_sam − g into the buffer, g back into ``.grad``; when ``skip`` (the first
    pass was not finite) s = 0 and ``.grad`` keeps g_sam."""
    for g_sam, first, skip in zip(grads, firsts, skips):
        acc = accumulation_dtype(g_sam.dtype)
        g = first.clone()
        s = g_sam.to(acc) - g.to(acc)
        first.copy_(torch.where(skip, torch.zeros_like(s), s))
        g_sam.copy_(torch.where(skip, g_sam, g.to(g_sam.dtype)))


def residual_sq_sum(
    params: Sequence[Tensor], grads: Sequence[Tensor], moments: Sequence[Tensor], *, sigmas: Sequence[float]
) -> Tensor:
    """Σ (g − σ·m)² over all tensors (FriendlySAM's direction d = g − σ·m, m the EMA of past gradients), in
    each weight's accumulation dtype."""
    total = None
    for w, g, m, sigma in zip(params, grads, moments, sigmas):
        acc = accumulation_dtype(w.dtype)
        d = g.to(acc) - sigma * m.to(acc)
        term = (d * d).sum()
        total = term if total is None else _add_promoting(total, term)
    return total if total is not None else torch.zeros((), dtype=torch.float32)


def residual_perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moments: Sequence[Tensor],
    saved: Sequence[Tensor],
    scales: Sequence[Tensor],
    *,
    sigmas: Sequence[float],
    lmbdas: Sequence[float],
) -> None:
    """saved ← w; w ← w + s·(g − σ·m); then m ← λ·m + (1 − λ)·g (an element whose new m is not finite keeps
    its old m)."""
    for w, g, m, w_saved, scale, sigma, lmbda in zip(params, grads, moments, saved, scales, sigmas, lmbdas):
        w_saved.copy_(w)
        acc = accumulation_dtype(w.dtype)
        g_acc, m_acc = g.to(acc), m.to(acc)
        eps = scale.to(acc) * (g_acc - sigma * m_acc)
        w.copy_(_acc(w_saved) + _zero_non_finite(eps))
        new_m = lmbda * m_acc + (1.0 - lmbda) * g_acc
        m.copy_(torch.where(torch.isfinite(new_m), new_m, m_acc))


# ------------------------------------------------ the fused second step (docs/DESIGN.md §2.11)
def restore_sgd_(
    params: Sequence[Tensor], saved: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor],
    skips: Sequence[Tensor], *, lrs: Sequence[float], weight_decays: Sequence[float], momentums: Sequence[float],
    dampenings: Sequence[float], nesterovs: Sequence[float], maximizes: Sequence[float], fresh: Sequence[float],
) -> None:
    """torch.optim.SGD's step, taken from the saved weights w (the perturbed ones are discarded):

        d = ±g + λ·w                          (− when maximize; λ the weight decay)
        m = d (fresh buffer)  or  μ·m + (1 − τ)·d      (only when μ ≠ 0; τ the dampening)
        d = d + μ·m (nesterov)  or  m                   (only when μ ≠ 0)
        w ← w − lr·d

    in the accumulation dtype, each written tensor rounded once (m is rounded before the update reads it,
    as torch's stored buffer is). Where ``skip`` is set: w ← saved, m untouched.
    """
    for k, (w, w_saved, g, m, skip) in enumerate(zip(params, saved, grads, momenta, skips)):
        acc = accumulation_dtype(w.dtype)
        w0 = _acc(w_saved)
        d = -g.to(acc) if maximizes[k] else g.to(acc)
        if weight_decays[k] != 0:
            d = d + weight_decays[k] * w0
        mu = momentums[k]
        if mu != 0:
            m_new = d if fresh[k] else mu * _acc(m) + (1 - dampenings[k]) * d
            m_new = m_new.to(m.dtype)
            m.copy_(torch.where(skip, m, m_new))
            d = d + mu * _acc(m_new) if nesterovs[k] else _acc(m_new)
        w.copy_(torch.where(skip, w_saved, (w0 - lrs[k] * d).to(w.dtype)))


def restore_adam_(
    params: Sequence[Tensor], saved: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], skips: Sequence[Tensor], *,
    lrs: Sequence[float], beta1s: Sequence[float], beta2s: Sequence[float], epss: Sequence[float],
    weight_decays: Sequence[float], decoupled: Sequence[float], amsgrads: Sequence[float],
    maximizes: Sequence[float], step_sizes: Sequence[float], bias_correction2_sqrts: Sequence[float],
) -> None:
    """torch.optim.Adam's (decoupled: AdamW's) step t, taken from the saved weights w:

        d = ±g                     (− when maximize)
        w = w·(1 − lr·λ) (decoupled)  or  d = d + λ·w (Adam's L2 decay)
        m ← m + (1 − β₁)·(d − m);  v ← β₂·v + (1 − β₂)·d²;  v̂ ← max(v̂, v) (amsgrad)
        w ← w − step_size·m / (√v (or √v̂) / √(1 − β₂ᵗ) + eps),   step_size = lr / (1 − β₁ᵗ)

    in the accumulation dtype, each written tensor rounded once (the moments before the update reads
    them). Where ``skip`` is set: w ← saved, the moments untouched.
    """
    for k, (w, w_saved, g, m, v, v_max, skip) in enumerate(
            zip(params, saved, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, skips)):
        acc = accumulation_dtype(w.dtype)
        w0 = _acc(w_saved)
        d = -g.to(acc) if maximizes[k] else g.to(acc)
        if weight_decays[k] != 0:
            if decoupled[k]:
                w0 = w0 * (1 - lrs[k] * weight_decays[k])
            else:
                d = d + weight_decays[k] * w0
        m_new = (_acc(m) + (1 - beta1s[k]) * (d - _acc(m))).to(m.dtype)
        v_new = (beta2s[k] * _acc(v) + (1 - beta2s[k]) * d * d).to(v.dtype)
        second = v_new
        if amsgrads[k]:
            second = torch.maximum(v_max, v_new)
            v_max.copy_(torch.where(skip, v_max, second))
        denom = _acc(second).sqrt() / bias_correction2_sqrts[k] + epss[k]
        m.copy_(torch.where(skip, m, m_new))
        v.copy_(torch.where(skip, v, v_new))
        w.copy_(torch.where(skip, w_saved, (w0 - step_sizes[k] * _acc(m_new) / denom).to(w.dtype)))


def msam_sgd_(
    params: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor], shifts: Sequence[Tensor],
    skips: Sequence[Tensor], *, lrs: Sequence[float], weight_decays: Sequence[float], momentums: Sequence[float],
    dampenings: Sequence[float], nesterovs: Sequence[float], maximizes: Sequence[float], fresh: Sequence[float],
) -> Tensor:
    """Momentum-SAM's step with SGD: the weights hold ŵ = w − c·m; with c the tensor's shift (0-d, float64)

        w = ŵ + c·m            (m the momentum before the step; fresh: no momentum yet, c·m counts 0)
        then SGD's update from w, as restore_sgd_ (m updated, rounded once)

    and returns Σ m² over the new momenta (float64 when any tensor is float64, else float32), from which the
    caller forms the next shift. Where ``skip`` is set: w ← ŵ + c·m, m kept (its Σ m² still counted).
    """
    total = None
    for k, (w, g, m, shift, skip) in enumerate(zip(params, grads, momenta, shifts, skips)):
        acc = accumulation_dtype(w.dtype)
        w0 = _acc(w) if fresh[k] else _acc(w) + shift.to(acc) * _acc(m)
        d = -g.to(acc) if maximizes[k] else g.to(acc)
        if weight_decays[k] != 0:
            d = d + weight_decays[k] * w0
        mu = momentums[k]
        m_new = d if fresh[k] else mu * _acc(m) + (1 - dampenings[k]) * d
        m_new = torch.where(skip, m, m_new.to(m.dtype))
        m.copy_(m_new)
        d = d + mu * _acc(m_new) if nesterovs[k] else _acc(m_new)
        w.copy_(torch.where(skip, w0.to(w.dtype), (w0 - lrs[k] * d).to(w.dtype)))
        part = (_acc(m_new) ** 2).sum()
        total = part if total is None else (total.to(torch.float64) + part.to(torch.float64)
                                            if part.dtype == torch.float64 or total.dtype == torch.float64
                                            else total + part)
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total
