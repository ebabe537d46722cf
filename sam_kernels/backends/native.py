"""The native extension's backends: ``cpp`` (CPU tensors, at::parallel_for) and ``cuda`` (CUDA multi-tensor kernels).

Both run the sources in csrc/, whose per-element math (csrc/sam_math.h) is
shared by the host and device builds. ``sam_kernels._C.host`` and
``sam_kernels._C.cuda`` expose the same operations with the same signatures;
one :class:`NativeBackend` class drives either. The extension takes lists of
one dtype: tensors are bucketed by dtype here. Tensors it does not take —
non-contiguous weights or gradients, or a gradient whose dtype differs from
its weight's — go to the foreach backend in the same call, with the reason
kept in :data:`ROUTED_TO_FOREACH` (shape → reason).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import foreach as _foreach
from . import mark_unavailable, register_backend

try:
    from .. import _C
except ImportError as exc:  # the package was installed without building csrc/
    raise ImportError(f"the native extension sam_kernels._C is not built ({exc})") from exc

ROUTED_TO_FOREACH: dict[tuple[int, ...], str] = {}
_MODES = {None: 0, "element": 1, "filter": 2}


def _pick(items: Sequence | None, positions: list[int]) -> list | None:
    return None if items is None else [items[i] for i in positions]


def _sum(parts: list[Tensor], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Σ of per-bucket totals in float32 (float64 when any bucket was float64)."""
    if not parts:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    total = parts[0].to(dtype)
    for part in parts[1:]:
        total = total + part.to(dtype)
    return total


class NativeBackend:
    """One backend over one submodule of the extension (``_C.host`` or ``_C.cuda``)."""

    def __init__(self, name: str, ops, device_type: str):
        self.NAME = name
        self._ops = ops
        self._device_type = device_type

    def available(self) -> tuple[bool, str]:
        if self._device_type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""

    def supports(self, device: torch.device) -> bool:
        return device.type == self._device_type

    def __repr__(self) -> str:
        return f"<sam_kernels backend {self.NAME!r} (sam_kernels._C)>"

    # ------------------------------------------------------------ routing
    @staticmethod
    def _split(weights: Sequence[Tensor], others: Sequence[Sequence[Tensor]]) -> tuple[list[list[int]], list[int]]:
        """Positions the extension takes, bucketed by dtype, and positions routed to foreach."""
        buckets: dict[torch.dtype, list[int]] = {}
        fallback = []
        for i, w in enumerate(weights):
            tensors = [w] + [o[i] for o in others]
            if not all(t.is_contiguous() for t in tensors):
                ROUTED_TO_FOREACH[tuple(w.shape)] = "non-contiguous weight or gradient"
                fallback.append(i)
            elif any(t.dtype != w.dtype for t in tensors):
                ROUTED_TO_FOREACH[tuple(w.shape)] = "gradient dtype differs from the weight's"
                fallback.append(i)
            else:
                buckets.setdefault(w.dtype, []).append(i)
        return list(buckets.values()), fallback

    @staticmethod
    def _offsets(element_offsets: Sequence[int] | None, count: int) -> list[int]:
        return list(element_offsets) if element_offsets is not None else [0] * count

    # --------------------------------------------------------- operations
    def filter_norms(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        buckets, fallback = self._split(tensors, [])
        out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        for positions in buckets:
            for i, norm in zip(positions, self._ops.filter_norms(_pick(tensors, positions))):
                out[i] = norm
        for i, norm in zip(fallback, _foreach.filter_norms(_pick(tensors, fallback))):
            out[i] = norm
        return out

    def scaled_grad_sq_sum(self, params, grads, *, etas, adaptive):
        buckets, fallback = self._split(params, [grads])
        parts = [self._ops.scaled_grad_sq_sum(_pick(params, b), _pick(grads, b), _pick(etas, b), _MODES[adaptive])
                 for b in buckets]
        if fallback:
            parts.append(_foreach.scaled_grad_sq_sum(_pick(params, fallback), _pick(grads, fallback),
                                                     etas=_pick(etas, fallback), adaptive=adaptive))
        return _sum(parts, (), params[0].device)

    def perturb_(self, params, grads, saved, scales, *, etas, adaptive, p):
        buckets, fallback = self._split(params, [grads, saved])
        for b in buckets:
            self._ops.perturb_(_pick(params, b), _pick(grads, b), _pick(saved, b), _pick(scales, b), _pick(etas, b),
                               _MODES[adaptive], p != 2)
        if fallback:
            _foreach.perturb_(_pick(params, fallback), _pick(grads, fallback), _pick(saved, fallback),
                              _pick(scales, fallback), etas=_pick(etas, fallback), adaptive=adaptive, p=p)

    def restore_(self, params, saved):
        buckets, fallback = self._split(params, [saved])
        for b in buckets:
            self._ops.restore_(_pick(params, b), _pick(saved, b))
        if fallback:
            _foreach.restore_(_pick(params, fallback), _pick(saved, fallback))

    def add_noise_(self, params, saved, *, gammas, seed, tensor_indices, step, element_offsets=None):
        offsets = self._offsets(element_offsets, len(params))
        buckets, fallback = self._split(params, [saved])
        for b in buckets:
            self._ops.add_noise_(_pick(params, b), _pick(saved, b), _pick(gammas, b), seed, _pick(tensor_indices, b),
                                 step, _pick(offsets, b))
        if fallback:
            _foreach.add_noise_(_pick(params, fallback), _pick(saved, fallback), gammas=_pick(gammas, fallback),
                                seed=seed, tensor_indices=_pick(tensor_indices, fallback), step=step,
                                element_offsets=_pick(offsets, fallback))

    def noise_grad_sums(self, grads, saved, *, gammas, lams, seed, tensor_indices, step, element_offsets=None):
        offsets = self._offsets(element_offsets, len(grads))
        buckets, fallback = self._split(saved, [grads])
        parts = [self._ops.noise_grad_sums(_pick(grads, b), _pick(saved, b), _pick(gammas, b), _pick(lams, b), seed,
                                           _pick(tensor_indices, b), step, _pick(offsets, b)) for b in buckets]
        if fallback:
            parts.append(_foreach.noise_grad_sums(
                _pick(grads, fallback), _pick(saved, fallback), gammas=_pick(gammas, fallback),
                lams=_pick(lams, fallback), seed=seed, tensor_indices=_pick(tensor_indices, fallback), step=step,
                element_offsets=_pick(offsets, fallback)))
        return _sum(parts, (4,), saved[0].device)

    def mix_perturb_(self, params, grads, saved, noise_coefs, grad_coefs, *, gammas, seed, tensor_indices, step,
                     element_offsets=None):
        offsets = self._offsets(element_offsets, len(params))
        buckets, fallback = self._split(params, [grads, saved])
        for b in buckets:
            self._ops.mix_perturb_(_pick(params, b), _pick(grads, b), _pick(saved, b), _pick(noise_coefs, b),
                                   _pick(grad_coefs, b), _pick(gammas, b), seed, _pick(tensor_indices, b), step,
                                   _pick(offsets, b))
        if fallback:
            _foreach.mix_perturb_(
                _pick(params, fallback), _pick(grads, fallback), _pick(saved, fallback),
                _pick(noise_coefs, fallback), _pick(grad_coefs, fallback), gammas=_pick(gammas, fallback),
                seed=seed, tensor_indices=_pick(tensor_indices, fallback), step=step,
                element_offsets=_pick(offsets, fallback))


cpp = NativeBackend("cpp", _C.host, "cpu")
register_backend("cpp", cpp, priority={"cpu": 20})
if _C.HAS_CUDA:
    cuda = NativeBackend("cuda", _C.cuda, "cuda")
    register_backend("cuda", cuda, priority={"cuda": 30})
else:
    mark_unavailable("cuda", "sam_kernels._C was built without its CUDA kernels "
                     "(torch without CUDA, or no CUDA toolkit, when the package was built)")
