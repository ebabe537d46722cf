"""The foreach backend: torch._foreach_* ops over whole tensor lists.

Tensors are bucketed by dtype (and, for scaled updates, by the scale tensor
they share, i.e. by param group) so that each elementwise stage is one
multi-tensor launch per bucket. Three things have no foreach form and run per
tensor: per-filter norms (a reduction over dim ≥ 1), broadcasting a
per-filter value over its filter, and zeroing non-finite ε elements. The R-SAM
noise stream is generated for all tensors of a call in one batched pass.

Arithmetic runs in float32 (float64 for float64 tensors), as docs/DESIGN.md §2
asks: bfloat16/float16 inputs are upcast once per call (a per-tensor cast,
the price of having no foreach cast), and the result is rounded once when it
is added to the parameter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from .. import noise
from .reference import accumulation_dtype, asam_scale, filter_norm, noise_std

NAME = "foreach"


def available() -> tuple[bool, str]:
    return True, ""


def supports(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda", "xpu")


def _buckets(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Positions of the items grouped by key, in first-seen order."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for position, key in enumerate(keys):
        groups[key].append(position)
    return groups


def _take(items: Sequence, positions: list[int]) -> list:
    return [items[i] for i in positions]


def _sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Σ‖x‖² over a list, each norm accumulated in float32 (float64 for float64)."""
    partials = []
    for positions in _buckets([x.dtype for x in tensors]).values():
        bucket = _take(tensors, positions)
        acc = accumulation_dtype(bucket[0].dtype)
        norms = torch._foreach_norm(bucket, 2, dtype=acc)
        partials.append(torch.stack(norms).square().sum())
    return _total(partials)


def _total(partials: list[Tensor]) -> Tensor:
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in partials) else torch.float32
    return torch.stack([x.to(dtype) for x in partials]).sum(0)


def _zero_non_finite_(tensors: Sequence[Tensor]) -> None:
    # A skipped step has every scale zero, so ε = 0·g ∈ {0, NaN}; no foreach op maps NaN to 0.
    for x in tensors:
        torch.nan_to_num_(x, nan=0.0, posinf=0.0, neginf=0.0)


def _in_accumulation_dtype(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors themselves when float32/float64, float32 copies of half-precision ones."""
    return [x if x.dtype == accumulation_dtype(x.dtype) else x.float() for x in tensors]


def _grads_in_weight_precision(params: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
    """Each gradient in its *weight's* accumulation dtype (a bfloat16 gradient of a float64 weight is
    summed in float64, as the reference does: 1e30² is finite there)."""
    out = []
    for w, g in zip(params, grads):
        acc = accumulation_dtype(w.dtype)
        out.append(g if g.dtype == acc else g.to(acc))
    return out


def _asam_scales(params: Sequence[Tensor], etas: Sequence[float], granularity: str | None) -> list[Tensor]:
    """ASAM's t per tensor in the accumulation dtype (filter-wise: broadcast per tensor)."""
    if granularity == "element":
        t = torch._foreach_abs(_in_accumulation_dtype(params))
        torch._foreach_add_(t, list(etas))
        return t
    return [asam_scale(w, eta, granularity) for w, eta in zip(params, etas)]


def filter_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [filter_norm(w) for w in tensors]


def scaled_grad_sq_sum(
    params: Sequence[Tensor], grads: Sequence[Tensor], *, etas: Sequence[float], granularity: str | None
) -> Tensor:
    grads = _grads_in_weight_precision(params, grads)
    if granularity is None:
        return _sum_of_squares(grads)
    t = _asam_scales(params, etas, granularity)
    return _sum_of_squares(torch._foreach_mul(t, grads))


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
    params, grads, saved = list(params), list(grads), list(saved)
    torch._foreach_copy_(saved, params)
    t = None if granularity is None else _asam_scales(params, etas, granularity)
    grads = _grads_in_weight_precision(params, grads)
    direction = torch._foreach_sign(grads) if p != 2 else grads
    eps: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for (dtype, _), positions in _buckets([(g.dtype, id(s)) for g, s in zip(grads, scales)]).items():
        scale = scales[positions[0]].to(dtype)
        bucket = torch._foreach_mul(_take(direction, positions), scale)
        for position, value in zip(positions, bucket):
            eps[position] = value
    if t is not None:
        torch._foreach_mul_(eps, t)
        if p == 2:
            torch._foreach_mul_(eps, t)
    _zero_non_finite_(eps)
    _foreach_add_by_dtype_(params, eps)


def _foreach_add_by_dtype_(targets: list[Tensor], values: list[Tensor]) -> None:
    for positions in _buckets([(x.dtype, v.dtype) for x, v in zip(targets, values)]).values():
        torch._foreach_add_(_take(targets, positions), _take(values, positions))


def restore_(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    if params:
        torch._foreach_copy_(list(params), list(saved))


def _initial_noise(saved: Sequence[Tensor], gammas: Sequence[float], stream: noise.NoiseStream) -> list[Tensor]:
    """δ₀ per tensor in its accumulation dtype; the Philox stream of all tensors in one pass."""
    if not saved:
        return []
    z = noise.standard_normal_multi(
        [w.numel() for w in saved],
        seed=stream.seed,
        tensor_indices=list(stream.tensor_indices),
        step=stream.step,
        device=saved[0].device,
        offsets=None if stream.element_offsets is None else list(stream.element_offsets),
    )
    return [
        noise_std(w, gamma) * zi.reshape(w.shape).to(accumulation_dtype(w.dtype))
        for w, gamma, zi in zip(saved, gammas, z)
    ]


def add_noise_(
    params: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    gammas: Sequence[float],
    stream: noise.NoiseStream,
) -> None:
    params, saved = list(params), list(saved)
    if not params:
        return
    torch._foreach_copy_(saved, params)
    _foreach_add_by_dtype_(params, _initial_noise(saved, gammas, stream))


def noise_grad_sums(
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    gammas: Sequence[float],
    lams: Sequence[float],
    stream: noise.NoiseStream,
) -> Tensor:
    grads = list(grads)
    deltas = _initial_noise(saved, gammas, stream)
    grads_acc = [g.to(d.dtype) for g, d in zip(grads, deltas)]
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    dots = [x.sum() for x in torch._foreach_mul(deltas, grads_acc)]
    grad_sq = torch._foreach_pow(torch._foreach_norm(grads_acc, 2), 2)
    weighted_dots = torch._foreach_mul(dots, list(lams))
    weighted_grad_sq = torch._foreach_mul(grad_sq, [lam * lam for lam in lams])
    return torch.stack(
        [
            _sum_of_squares(deltas).to(dtype),
            _total(grad_sq).to(dtype),
            _total(weighted_dots).to(dtype),
            _total(weighted_grad_sq).to(dtype),
        ]
    )


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
    params, grads, saved = list(params), list(grads), list(saved)
    if not params:
        return
    eps = _initial_noise(saved, gammas, stream)
    grads_acc = [g.to(d.dtype) for g, d in zip(grads, eps)]
    keys = [(d.dtype, id(a), id(b)) for d, a, b in zip(eps, noise_coefs, grad_coefs)]
    for (dtype, _, _), positions in _buckets(keys).items():
        bucket = _take(eps, positions)
        torch._foreach_mul_(bucket, noise_coefs[positions[0]].to(dtype))
        torch._foreach_add_(bucket, torch._foreach_mul(_take(grads_acc, positions), grad_coefs[positions[0]].to(dtype)))
    _zero_non_finite_(eps)
    torch._foreach_copy_(params, saved)
    _foreach_add_by_dtype_(params, eps)


# ------------------------------------------------ the SAM family (docs/DESIGN.md §2.5–§2.8)
def copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    if targets:
        torch._foreach_copy_(list(targets), list(sources))


def _pairwise_acc(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Both lists in the accumulation dtype of each pair (float64 if either is float64)."""
    out_x, out_y = [], []
    for x, y in zip(xs, ys):
        acc = torch.promote_types(accumulation_dtype(x.dtype), accumulation_dtype(y.dtype))
        out_x.append(x if x.dtype == acc else x.to(acc))
        out_y.append(y if y.dtype == acc else y.to(acc))
    return out_x, out_y


def pair_sums(firsts: Sequence[Tensor], seconds: Sequence[Tensor]) -> Tensor:
    xs, ys = _pairwise_acc(firsts, seconds)
    if not xs:
        return torch.zeros(3, dtype=torch.float32)
    dots = [p.sum() for p in torch._foreach_mul(xs, ys)]
    return torch.stack([_total(dots), _sum_of_squares(xs), _sum_of_squares(ys)])


def _scaled_terms(values: list[Tensor], coefs: Sequence[Tensor]) -> list[Tensor]:
    """coef · value per tensor (one launch per bucket sharing a coefficient), exactly 0 where coef = 0."""
    out: list[Tensor] = [None] * len(values)  # type: ignore[list-item]
    for (dtype, _), positions in _buckets([(v.dtype, id(c)) for v, c in zip(values, coefs)]).items():
        coef = coefs[positions[0]].to(dtype)
        products = torch._foreach_mul(_take(values, positions), coef)
        zero = coef == 0
        for position, product in zip(positions, products):
            out[position] = torch.where(zero, 0.0, product)
    return out


def combine_(
    targets: Sequence[Tensor], others: Sequence[Tensor], target_coefs: Sequence[Tensor], other_coefs: Sequence[Tensor]
) -> None:
    targets = list(targets)
    if not targets:
        return
    xs = _in_accumulation_dtype(targets)
    ys = [y.to(x.dtype) for x, y in zip(xs, others)]
    result = _scaled_terms(xs, target_coefs)
    torch._foreach_add_(result, _scaled_terms(ys, other_coefs))
    torch._foreach_copy_(targets, result)


def split_difference_(grads: Sequence[Tensor], firsts: Sequence[Tensor], skips: Sequence[Tensor]) -> None:
    grads, firsts = list(grads), list(firsts)
    if not grads:
        return
    kept = [first.clone() for first in firsts]  # g
    gs = _in_accumulation_dtype(grads)
    sharpness = torch._foreach_sub(gs, [k.to(g.dtype) for k, g in zip(kept, gs)])
    # A skipped first pass (0-d bool per tensor): no sharpness, .grad keeps g_sam.
    torch._foreach_copy_(firsts, [torch.where(skip, 0.0, s) for s, skip in zip(sharpness, skips)])
    torch._foreach_copy_(grads, [torch.where(skip, g_sam, k.to(g_sam.dtype)) for g_sam, k, skip in
                                 zip(grads, kept, skips)])


def residual_sq_sum(
    params: Sequence[Tensor], grads: Sequence[Tensor], moments: Sequence[Tensor], *, sigmas: Sequence[float]
) -> Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    gs = _grads_in_weight_precision(params, grads)  # d = g − σ·m in each weight's accumulation dtype
    ms = [m.to(g.dtype) for g, m in zip(gs, moments)]
    return _sum_of_squares(torch._foreach_sub(gs, torch._foreach_mul(ms, list(sigmas))))


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
    params, grads, moments, saved = list(params), list(grads), list(moments), list(saved)
    if not params:
        return
    torch._foreach_copy_(saved, params)
    gs = _grads_in_weight_precision(params, grads)
    ms = [m.to(g.dtype) for g, m in zip(gs, moments)]
    d = torch._foreach_sub(gs, torch._foreach_mul(ms, list(sigmas)))
    eps: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for (dtype, _), positions in _buckets([(x.dtype, id(s)) for x, s in zip(d, scales)]).items():
        for position, value in zip(positions, torch._foreach_mul(_take(d, positions), scales[positions[0]].to(dtype))):
            eps[position] = value
    _zero_non_finite_(eps)
    _foreach_add_by_dtype_(params, eps)
    new_m = torch._foreach_add(torch._foreach_mul(ms, list(lmbdas)), torch._foreach_mul(gs, [1.0 - l for l in lmbdas]))
    for m, value, old in zip(moments, new_m, ms):
        m.copy_(torch.where(torch.isfinite(value), value, old))


# The fused second step's operations run per tensor here, in their reference form: foreach only
# meets them for tensors a fused backend leaves to it (non-contiguous ones, a gradient of another
# dtype); when no fused backend runs, the optimizers restore and call the base optimizer's own
# (foreach) step instead (docs/DESIGN.md §2.11).
from .reference import msam_sgd_, restore_adam_, restore_sgd_  # noqa: E402,F401
