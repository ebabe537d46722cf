"""Functional layer: the sharpness-aware operations on lists of tensors.

Each operation takes lists of tensors on one device and a ``backend`` name
(``"auto"``, ``"reference"``, ``"foreach"``, ``"triton"``, ``"cuda"``,
``"cpp"`` or any registered one). Per-tensor hyperparameters accept one float
for all tensors or a sequence with one value per tensor. The arguments are
declared once, in :data:`sam_kernels.backends.operations.OPERATIONS`, which
checks them (lengths, seed range) and falls back to ``foreach`` for an
operation a backend does not implement.

A SAM/ASAM first step is::

    sq = scaled_grad_sq_sum(params, grads, granularity=..., etas=...)    # Σ (t⊙g)²
    scales, skipped = sam_scales(sq, rhos, p=...)                     # ρ/(‖t⊙g‖+1e-12)
    perturb_(params, grads, saved, scales, granularity=..., etas=..., p=...)

and the second step ``restore_(params, saved)``. R-SAM's first step is
``add_noise_`` before the first forward, then ``noise_grad_sums`` →
``rsam_coefficients`` → ``mix_perturb_`` after the first backward.

The scale math lives here, shared by every backend, as a few tiny device ops:
no function in this module reads a tensor value on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backends import resolve_backend
from .backends.operations import call, device_of
from .noise import NoiseStream

NORM_GUARD = 1e-12

__all__ = [
    "filter_norms",
    "scaled_grad_sq_sum",
    "sam_scales",
    "perturb_",
    "restore_",
    "add_noise_",
    "noise_grad_sums",
    "rsam_coefficients",
    "mix_perturb_",
    "copy_",
    "pair_sums",
    "combine_",
    "split_difference_",
    "residual_sq_sum",
    "residual_perturb_",
    "gsam_coefficients",
    "looksam_orthogonal_coefficients",
    "looksam_reuse_coefficients",
    "restore_sgd_",
    "restore_adam_",
    "msam_sgd_",
    "NoiseStream",
    "resolve",
]

FloatOrSeq = float | Sequence[float]


def resolve(backend: str, *lists: Sequence[Tensor]):
    """The backend implementation for these tensors (``auto`` picks the fastest available)."""
    return resolve_backend(backend, device_of(*lists))


def filter_norms(tensors: Sequence[Tensor], *, backend: str = "auto") -> list[Tensor]:
    """‖f_i‖₂ per filter (dim-0 slice) of each tensor with ndim ≥ 2; |w| for ndim ≤ 1."""
    return call("filter_norms", backend, {"tensors": tensors})


def scaled_grad_sq_sum(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    granularity: str | None = None,
    etas: FloatOrSeq = 0.01,
    backend: str = "auto",
) -> Tensor:
    """Σ over all tensors of (t ⊙ g)², t = 1 (SAM), |w| + η or ‖f_i‖ + η (ASAM)."""
    return call("scaled_grad_sq_sum", backend, {"params": params, "grads": grads, "etas": etas, "granularity": granularity})


def _finite_inverse_norm(sq_sum: Tensor) -> tuple[Tensor, Tensor]:
    """(1/(√sq + 1e-12) or 0 when sq is non-finite, the non-finite flag)."""
    finite = torch.isfinite(sq_sum)
    inverse = 1.0 / (torch.sqrt(sq_sum) + NORM_GUARD)
    return torch.where(finite, inverse, torch.zeros_like(inverse)), ~finite


def sam_scales(sq_sum: Tensor, rhos: Sequence[float], *, p: float = 2) -> tuple[list[Tensor], Tensor]:
    """Per-tensor device scales s and the skip flag.

    p = 2: s = ρ / (‖t⊙g‖₂ + 1e-12); p = ∞: s = ρ. Every s is 0 when the norm is
    non-finite (the step is skipped). Tensors with the same ρ share one scale
    tensor, which lets backends batch them.
    """
    inverse, skipped = _finite_inverse_norm(sq_sum)
    unit = inverse if p == 2 else (~skipped).to(sq_sum.dtype)
    shared = {rho: unit * rho for rho in dict.fromkeys(rhos)}
    return [shared[rho] for rho in rhos], skipped


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    scales: Sequence[Tensor],
    *,
    granularity: str | None = None,
    etas: FloatOrSeq = 0.01,
    p: float = 2,
    backend: str = "auto",
) -> None:
    """saved ← w; w ← w + ε, ε = s · t² ⊙ g (p = 2) or s · t ⊙ sign(g) (p = ∞)."""
    call("perturb_", backend, {"params": params, "grads": grads, "saved": saved, "scales": scales, "etas": etas,
                               "granularity": granularity, "p": p})


def restore_(params: Sequence[Tensor], saved: Sequence[Tensor], *, backend: str = "auto") -> None:
    """w ← saved, bit-exactly."""
    call("restore_", backend, {"params": params, "saved": saved})


def add_noise_(
    params: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    gammas: FloatOrSeq,
    stream: NoiseStream,
    backend: str = "auto",
) -> None:
    """saved ← w; w ← ŵ = w + δ₀, δ₀ ~ N(0, σ_i²), σ_i = γ‖w_i‖/√n_i, z from ``stream``.

    ``stream.element_offsets`` (default all 0): global index of each tensor's
    first element when the tensors are dim-0 shards (FSDP), so shards draw
    their part of the whole tensor's noise.
    """
    call("add_noise_", backend, {"params": params, "saved": saved, "gammas": gammas, "stream": stream})


def noise_grad_sums(
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    gammas: FloatOrSeq,
    lams: FloatOrSeq,
    stream: NoiseStream,
    backend: str = "auto",
) -> Tensor:
    """(Σ δ₀², Σ g², Σ λ δ₀·g, Σ λ² g²), δ₀ regenerated from the saved (pre-noise) weights."""
    return call("noise_grad_sums", backend,
                {"grads": grads, "saved": saved, "gammas": gammas, "lams": lams, "stream": stream})


def rsam_coefficients(
    sums: Tensor, rhos: Sequence[float], lams: Sequence[float]
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Per-tensor (a, b) with ε = a·δ₀ + b·g = ρ · d / (‖d‖ + 1e-12), and the skip flag.

    d = δ₀/(‖δ₀‖ + 1e-12) + λ · g/(‖g‖ + 1e-12), so with A = 1/(‖δ₀‖+1e-12) and
    B = 1/(‖g‖+1e-12): ‖d‖² = A²Σδ₀² + 2AB·Σλδ₀g + B²·Σλ²g², a = ρA/(‖d‖+1e-12),
    b = ρλB/(‖d‖+1e-12). All zero when any sum is non-finite.
    """
    noise_sq, grad_sq, lam_dot, lam_sq_grad_sq = sums.unbind()
    inv_noise, _ = _finite_inverse_norm(noise_sq)
    inv_grad, _ = _finite_inverse_norm(grad_sq)
    d_sq = inv_noise**2 * noise_sq + 2 * inv_noise * inv_grad * lam_dot + inv_grad**2 * lam_sq_grad_sq
    inv_d = 1.0 / (torch.sqrt(torch.clamp(d_sq, min=0)) + NORM_GUARD)
    skipped = ~torch.isfinite(sums).all()
    zero = torch.zeros_like(inv_d)
    noise_unit = torch.where(skipped, zero, inv_noise * inv_d)
    grad_unit = torch.where(skipped, zero, inv_grad * inv_d)
    shared = {(rho, lam): (noise_unit * rho, grad_unit * (rho * lam)) for rho, lam in dict.fromkeys(zip(rhos, lams))}
    noise_coefs = [shared[key][0] for key in zip(rhos, lams)]
    grad_coefs = [shared[key][1] for key in zip(rhos, lams)]
    return noise_coefs, grad_coefs, skipped


def mix_perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    noise_coefs: Sequence[Tensor],
    grad_coefs: Sequence[Tensor],
    *,
    gammas: FloatOrSeq,
    stream: NoiseStream,
    backend: str = "auto",
) -> None:
    """w ← saved + a·δ₀ + b·g (R-SAM's projected, λ-mixed perturbation from the saved weights)."""
    call("mix_perturb_", backend, {"params": params, "grads": grads, "saved": saved, "noise_coefs": noise_coefs,
                                   "grad_coefs": grad_coefs, "gammas": gammas, "stream": stream})


# ------------------------------------------------ the SAM family (docs/DESIGN.md §2.5–§2.8)
def copy_(targets: Sequence[Tensor], sources: Sequence[Tensor], *, backend: str = "auto") -> None:
    """target ← source, bit for bit (keeps the first-pass gradient g)."""
    call("copy_", backend, {"targets": targets, "sources": sources})


def pair_sums(firsts: Sequence[Tensor], seconds: Sequence[Tensor], *, backend: str = "auto") -> Tensor:
    """(Σ x·y, Σ x², Σ y²) over every tensor of the two lists: one pass for a dot product and both norms."""
    return call("pair_sums", backend, {"firsts": firsts, "seconds": seconds})


def combine_(
    targets: Sequence[Tensor],
    others: Sequence[Tensor],
    target_coefs: Sequence[Tensor],
    other_coefs: Sequence[Tensor],
    *,
    backend: str = "auto",
) -> None:
    """x ← a·x + b·y with per-tensor device scalars a, b; a term whose coefficient is 0 counts 0 (even for a
    non-finite x or y), so a skipped update leaves the other term untouched."""
    call("combine_", backend, {"targets": targets, "others": others, "target_coefs": target_coefs,
                               "other_coefs": other_coefs})


def split_difference_(
    grads: Sequence[Tensor], firsts: Sequence[Tensor], skips: Sequence[Tensor], *, backend: str = "auto"
) -> None:
    """firsts ← grads − firsts (WSAM's sharpness gradient g_sam − g); grads ← the old firsts (g), bit for bit.
    Where a tensor's 0-d bool ``skip`` is set (a non-finite first pass): firsts ← 0 and grads stay."""
    call("split_difference_", backend, {"grads": grads, "firsts": firsts, "skips": skips})


def residual_sq_sum(
    params: Sequence[Tensor], grads: Sequence[Tensor], moments: Sequence[Tensor], *, sigmas: FloatOrSeq,
    backend: str = "auto",
) -> Tensor:
    """Σ (g − σ·m)² (FriendlySAM: the squared norm of the gradient minus σ times its EMA), in each weight's
    accumulation dtype."""
    return call("residual_sq_sum", backend, {"params": params, "grads": grads, "moments": moments, "sigmas": sigmas})


def residual_perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moments: Sequence[Tensor],
    saved: Sequence[Tensor],
    scales: Sequence[Tensor],
    *,
    sigmas: FloatOrSeq,
    lmbdas: FloatOrSeq,
    backend: str = "auto",
) -> None:
    """saved ← w; w ← w + s·(g − σ·m); m ← λ·m + (1 − λ)·g (an element whose new m is not finite keeps its m)."""
    call("residual_perturb_", backend, {"params": params, "grads": grads, "moments": moments, "saved": saved,
                                        "scales": scales, "sigmas": sigmas, "lmbdas": lmbdas})


# ------------------------------------------------ the fused second step (docs/DESIGN.md §2.11)
def restore_sgd_(
    params: Sequence[Tensor], saved: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor],
    skips: Sequence[Tensor], *, lrs: FloatOrSeq, weight_decays: FloatOrSeq, momentums: FloatOrSeq,
    dampenings: FloatOrSeq, nesterovs: FloatOrSeq, maximizes: FloatOrSeq, fresh: FloatOrSeq,
    backend: str = "auto",
) -> None:
    """Restore + torch.optim.SGD's step in one pass: w ← saved − lr·d (d: SGD's direction from g, the saved
    weights and the momentum buffer m, which is updated; ``fresh``: m ← d, a buffer torch would create now).
    Flags are 0/1 floats. ``momenta[i]`` is neither read nor written where ``momentums[i]`` is 0 (pass any
    tensor of the weight's shape). Where the 0-d bool ``skips[i]`` is set: w ← saved and m is kept."""
    call("restore_sgd_", backend, {
        "params": params, "saved": saved, "grads": grads, "momenta": momenta, "skips": skips, "lrs": lrs,
        "weight_decays": weight_decays, "momentums": momentums, "dampenings": dampenings, "nesterovs": nesterovs,
        "maximizes": maximizes, "fresh": fresh})


def restore_adam_(
    params: Sequence[Tensor], saved: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], skips: Sequence[Tensor], *,
    lrs: FloatOrSeq, beta1s: FloatOrSeq, beta2s: FloatOrSeq, epss: FloatOrSeq, weight_decays: FloatOrSeq,
    decoupled: FloatOrSeq, amsgrads: FloatOrSeq, maximizes: FloatOrSeq, step_sizes: FloatOrSeq,
    bias_correction2_sqrts: FloatOrSeq, backend: str = "auto",
) -> None:
    """Restore + torch.optim.Adam's (``decoupled``: AdamW's) step t in one pass, with the host's
    ``step_sizes`` = lr/(1 − β₁ᵗ) and ``bias_correction2_sqrts`` = √(1 − β₂ᵗ). ``max_exp_avg_sqs[i]`` is
    neither read nor written without amsgrad. Where ``skips[i]`` is set: w ← saved, the moments kept."""
    call("restore_adam_", backend, {
        "params": params, "saved": saved, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
        "max_exp_avg_sqs": max_exp_avg_sqs, "skips": skips, "lrs": lrs, "beta1s": beta1s, "beta2s": beta2s,
        "epss": epss, "weight_decays": weight_decays, "decoupled": decoupled, "amsgrads": amsgrads,
        "maximizes": maximizes, "step_sizes": step_sizes, "bias_correction2_sqrts": bias_correction2_sqrts})


def msam_sgd_(
    params: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor], shifts: Sequence[Tensor],
    skips: Sequence[Tensor], *, lrs: FloatOrSeq, weight_decays: FloatOrSeq, momentums: FloatOrSeq,
    dampenings: FloatOrSeq, nesterovs: FloatOrSeq, maximizes: FloatOrSeq, fresh: FloatOrSeq,
    backend: str = "auto",
) -> Tensor:
    """Momentum-SAM's step with SGD in one pass: w ← ŵ + c·m, then torch.optim.SGD's update (momentum > 0;
    ``fresh``: the buffer is new, m ← d); returns Σ m² of the new momenta for the next shift."""
    return call("msam_sgd_", backend, {
        "params": params, "grads": grads, "momenta": momenta, "shifts": shifts, "skips": skips, "lrs": lrs,
        "weight_decays": weight_decays, "momentums": momentums, "dampenings": dampenings, "nesterovs": nesterovs,
        "maximizes": maximizes, "fresh": fresh})


def _shared(values: Sequence[float], make) -> list[Tensor]:
    """One device scalar per distinct value (tensors of one group share it, so backends can batch them)."""
    made = {value: make(value) for value in dict.fromkeys(values)}
    return [made[value] for value in values]


def gsam_coefficients(sums: Tensor, alphas: Sequence[float]) -> tuple[list[Tensor], list[Tensor]]:
    """GSAM's g_sam − α·g_⊥ as a·g_sam + b·g, from ``sums`` = (Σ g·g_sam, Σ g², Σ g_sam²).

    g_⊥ = g − c·g_sam with c = (g·g_sam) / (‖g_sam‖ + 1e-12)², so a = 1 + α·c and b = −α. When a sum is
    not finite the decomposition is skipped: a = 1, b = 0 (.grad keeps g_sam).
    """
    dot, _, sam_sq = sums.unbind()
    c = dot / (torch.sqrt(sam_sq) + NORM_GUARD) ** 2
    finite = torch.isfinite(sums).all()
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    a = _shared(alphas, lambda alpha: torch.where(finite, 1 + alpha * c, one))
    b = _shared(alphas, lambda alpha: torch.where(finite, zero - alpha, zero))
    return a, b


def looksam_orthogonal_coefficients(sums: Tensor, count: int) -> tuple[list[Tensor], list[Tensor]]:
    """LookSAM's g_v = g_sam − c·g as a·g + b·g_sam, from ``sums`` = (Σ g·g_sam, Σ g², Σ g_sam²).

    c = (g·g_sam) / (‖g‖ + 1e-12)², so a = −c, b = 1. Not finite: a = b = 0 (g_v = 0, so the next steps
    reuse nothing).
    """
    dot, grad_sq, _ = sums.unbind()
    c = dot / (torch.sqrt(grad_sq) + NORM_GUARD) ** 2
    finite = torch.isfinite(sums).all()
    zero = torch.zeros_like(c)
    a = torch.where(finite, -c, zero)
    b = torch.where(finite, torch.ones_like(c), zero)
    return [a] * count, [b] * count


def looksam_reuse_coefficients(sums: Tensor, alphas: Sequence[float]) -> tuple[list[Tensor], list[Tensor]]:
    """LookSAM's g + α·(‖g‖/‖g_v‖)·g_v as a·g + b·g_v, from ``sums`` = (Σ g_v·g, Σ g_v², Σ g²).

    a = 1, b = α·‖g‖/(‖g_v‖ + 1e-12); not finite: b = 0 (.grad keeps g).
    """
    _, gv_sq, grad_sq = sums.unbind()
    ratio = torch.sqrt(grad_sq) / (torch.sqrt(gv_sq) + NORM_GUARD)
    finite = torch.isfinite(sums).all()
    zero = torch.zeros_like(ratio)
    one = torch.ones_like(ratio)
    a = _shared(alphas, lambda alpha: one)
    b = _shared(alphas, lambda alpha: torch.where(finite, alpha * ratio, zero))
    return a, b
