"""The Triton backend: fused multi-tensor kernels, a few launches per (dtype) bucket.

Per step and bucket: SAM/ASAM run one reduction launch (plus a filter-norm
launch for filter-wise ASAM) and one perturb launch; restore is one launch.
R-SAM's δ₀ is regenerated inside the kernels from the Philox stream and never
stored. Tensors the kernels do not take — non-contiguous weights or
gradients — go to the foreach backend in the same call; the reason is kept in
:data:`ROUTED_TO_FOREACH` (shape → reason) for inspection.

CUDA tensors use the compiled kernels. With ``TRITON_INTERPRET=1`` set before
import, CPU tensors run through Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence

import torch
import triton  # noqa: F401  (an ImportError here makes the backend unavailable)
from torch import Tensor

from .. import foreach as _foreach
from .. import register_backend
from .._lists import pick as _pick
from .._lists import sum_parts as _sum
from ...noise import NoiseStream
from ..reference import accumulation_dtype
from . import kernels as K
from . import layout as L

NAME = "triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Elements per program. The interpreter runs each program as numpy calls: big
# blocks keep CPU test runs short.
BLOCK = 8192 if INTERPRETED else 2048
FILTER_ROWS, FILTER_COLS = (8, 1024) if INTERPRETED else (4, 256)
NUM_WARPS = 8

ROUTED_TO_FOREACH: dict[tuple[int, ...], str] = {}

_TL_DTYPES = {
    torch.float32: K.tl.float32,
    torch.float64: K.tl.float64,
    torch.bfloat16: K.tl.bfloat16,
    torch.float16: K.tl.float16,
}
_MODES = {None: K.MODE_SAM, "element": K.MODE_ELEMENT, "filter": K.MODE_FILTER}


def available() -> tuple[bool, str]:
    if INTERPRETED or torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 before import to run the kernels on the CPU)"


def supports(device: torch.device) -> bool:
    return device.type == "cuda" or (INTERPRETED and device.type == "cpu")


# ------------------------------------------------------------------ buckets
class _Bucket:
    """Positions of the tensors one launch covers, with their shared layout."""

    def __init__(self, positions: list[int], weights: list[Tensor], grad_dtype: torch.dtype | None):
        self.positions = positions
        self.weights = [weights[i] for i in positions]
        self.device = self.weights[0].device
        self.w_dtype = self.weights[0].dtype
        self.g_dtype = grad_dtype or self.w_dtype
        self.acc = accumulation_dtype(self.w_dtype)
        self.layout = L.static_layout(tuple(tuple(w.shape) for w in self.weights), self.device, BLOCK, FILTER_ROWS)

    def take(self, items: Sequence) -> list:
        return [items[i] for i in self.positions]

    def floats(self, values: Sequence[float]) -> Tensor:
        """Per-tensor hyperparameters in the accumulation dtype (float64 keeps η exact for float64 params)."""
        return L.floats(self.take(values), self.device, self.acc)

    def ints(self, values: Sequence[int]) -> Tensor:
        return L.ints(self.take(values), self.device)

    def dtypes(self) -> dict:
        return {"W_DTYPE": _TL_DTYPES[self.w_dtype], "ACC": _TL_DTYPES[self.acc]}

    def filter_norms(self, weights: list[Tensor]) -> Tensor:
        """‖f_i‖ of every filter of the bucket's ndim ≥ 2 tensors, one launch."""
        out = torch.empty(max(self.layout.total_filters, 1), dtype=self.acc, device=self.device)
        if self.layout.has_filters:
            K.filter_norm_kernel[(self.layout.num_ftiles,)](
                self.layout.ftile_tensor, self.layout.ftile_row, L.pointers(weights), self.layout.fsizes,
                self.layout.n_filters, self.layout.fnorm_offs, out,
                ROWS=FILTER_ROWS, COLS=FILTER_COLS, num_warps=4, **self.dtypes(),
            )
        return out


def _split(
    weights: Sequence[Tensor], others: Sequence[Sequence[Tensor]], element_offsets: Sequence[int] | None = None
) -> tuple[list[_Bucket], list[int]]:
    """Buckets of kernel-ready tensors and the positions that go to foreach (with the reason kept)."""
    by_key: dict[tuple, list[int]] = {}
    fallback = []
    grads = others[0] if others else None
    for i, w in enumerate(weights):
        tensors = [w] + [o[i] for o in others]
        if w.numel() == 0:
            continue  # nothing to do, on any backend
        if not all(t.is_contiguous() for t in tensors):
            ROUTED_TO_FOREACH[tuple(w.shape)] = "non-contiguous weight or gradient"
            fallback.append(i)
            continue
        if element_offsets and element_offsets[i]:
            ROUTED_TO_FOREACH[tuple(w.shape)] = "shard of a bigger tensor (noise stream offset)"
            fallback.append(i)
            continue
        key = (w.dtype, grads[i].dtype if grads is not None else None)
        by_key.setdefault(key, []).append(i)
    buckets = [_Bucket(positions, list(weights), key[1]) for key, positions in by_key.items()]
    return buckets, fallback


def _on_tensors_device(op):
    """Run ``op`` with the tensors' CUDA device current: Triton launches on the current device."""

    @functools.wraps(op)
    def wrapper(first, *args, **kwargs):
        device = first[0].device if first else None
        if device is None or device.type != "cuda":
            return op(first, *args, **kwargs)
        with torch.cuda.device(device):
            return op(first, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------- operations
def filter_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    return _foreach.filter_norms(tensors)


@_on_tensors_device
def scaled_grad_sq_sum(
    params: Sequence[Tensor], grads: Sequence[Tensor], *, etas: Sequence[float], granularity: str | None
) -> Tensor:
    buckets, fallback = _split(params, [grads])
    parts = []
    for b in buckets:
        weights, bucket_grads = b.take(params), b.take(grads)
        fnorms = b.filter_norms(weights) if granularity == "filter" else weights[0]
        partials = torch.empty(b.layout.num_tiles, dtype=b.acc, device=b.device)
        K.scaled_grad_sq_sum_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, L.pointers(weights), L.pointers(bucket_grads),
            b.layout.numels, b.floats(etas), b.layout.fsizes, b.layout.fnorm_offs, fnorms, partials,
            G_DTYPE=_TL_DTYPES[b.g_dtype], MODE=_MODES[granularity], BLOCK=BLOCK, num_warps=NUM_WARPS, **b.dtypes(),
        )
        parts.append(partials.sum())
    if fallback:
        parts.append(_foreach.scaled_grad_sq_sum(
            _pick(params, fallback), _pick(grads, fallback), etas=_pick(etas, fallback), granularity=granularity))
    return _sum(parts, (), params[0].device)


@_on_tensors_device
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
    buckets, fallback = _split(params, [grads, saved])
    for b in buckets:
        weights = b.take(params)
        fnorms = b.filter_norms(weights) if granularity == "filter" else weights[0]
        (unique,), slots = L.shared_slots(b.take(scales))
        K.perturb_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, L.pointers(weights), L.pointers(b.take(grads)),
            L.pointers(b.take(saved)), b.layout.numels, b.floats(etas), b.layout.fsizes, b.layout.fnorm_offs,
            fnorms, L.ints(slots, b.device, torch.int32), torch.stack(unique).to(b.acc),
            G_DTYPE=_TL_DTYPES[b.g_dtype], MODE=_MODES[granularity], P_INF=p != 2, BLOCK=BLOCK,
            num_warps=NUM_WARPS, **b.dtypes(),
        )
    if fallback:
        _foreach.perturb_(_pick(params, fallback), _pick(grads, fallback), _pick(saved, fallback),
                          _pick(scales, fallback), etas=_pick(etas, fallback), granularity=granularity, p=p)


@_on_tensors_device
def restore_(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    buckets, fallback = _split(params, [saved])
    for b in buckets:
        K.restore_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, L.pointers(b.take(params)), L.pointers(b.take(saved)),
            b.layout.numels, W_DTYPE=_TL_DTYPES[b.w_dtype], BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    if fallback:
        _foreach.restore_(_pick(params, fallback), _pick(saved, fallback))


def _noise_args(b: _Bucket, gammas, stream: NoiseStream) -> tuple:
    seed = stream.seed
    return (b.floats(gammas), b.ints(stream.tensor_indices), seed & 0xFFFFFFFF, seed >> 32, stream.step & 0xFFFFFFFF)


@_on_tensors_device
def add_noise_(
    params: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    gammas: Sequence[float],
    stream: NoiseStream,
) -> None:
    buckets, fallback = _split(params, [saved], stream.element_offsets)
    for b in buckets:
        weights = b.take(params)
        fnorms = b.filter_norms(weights)
        K.add_noise_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, L.pointers(weights), L.pointers(b.take(saved)),
            b.layout.numels, b.layout.fsizes, b.layout.fnorm_offs, fnorms,
            *_noise_args(b, gammas, stream),
            BLOCK=BLOCK, num_warps=NUM_WARPS, **b.dtypes(),
        )
    if fallback:
        _foreach.add_noise_(_pick(params, fallback), _pick(saved, fallback), gammas=_pick(gammas, fallback),
                            stream=stream.pick(fallback))


@_on_tensors_device
def noise_grad_sums(
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    gammas: Sequence[float],
    lams: Sequence[float],
    stream: NoiseStream,
) -> Tensor:
    buckets, fallback = _split(saved, [grads], stream.element_offsets)
    parts = []
    for b in buckets:
        weights = b.take(saved)
        fnorms = b.filter_norms(weights)
        partials = torch.empty((b.layout.num_tiles, 4), dtype=b.acc, device=b.device)
        gamma_arr, index_arr, key0, key1, step32 = _noise_args(b, gammas, stream)
        K.noise_grad_sums_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, L.pointers(b.take(grads)), L.pointers(weights),
            b.layout.numels, b.layout.fsizes, b.layout.fnorm_offs, fnorms, gamma_arr, b.floats(lams), index_arr,
            key0, key1, step32, partials,
            G_DTYPE=_TL_DTYPES[b.g_dtype], BLOCK=BLOCK, num_warps=NUM_WARPS, **b.dtypes(),
        )
        parts.append(partials.sum(0))
    if fallback:
        parts.append(_foreach.noise_grad_sums(
            _pick(grads, fallback), _pick(saved, fallback), gammas=_pick(gammas, fallback),
            lams=_pick(lams, fallback), stream=stream.pick(fallback)))
    return _sum(parts, (4,), saved[0].device)


@_on_tensors_device
def mix_perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    noise_coefs: Sequence[Tensor],
    grad_coefs: Sequence[Tensor],
    *,
    gammas: Sequence[float],
    stream: NoiseStream,
) -> None:
    buckets, fallback = _split(params, [grads, saved], stream.element_offsets)
    for b in buckets:
        bucket_saved = b.take(saved)
        fnorms = b.filter_norms(bucket_saved)
        (unique_a, unique_b), slots = L.shared_slots(b.take(noise_coefs), b.take(grad_coefs))
        K.mix_perturb_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, L.pointers(b.take(params)), L.pointers(b.take(grads)),
            L.pointers(bucket_saved), b.layout.numels, b.layout.fsizes, b.layout.fnorm_offs, fnorms,
            *_noise_args(b, gammas, stream),
            L.ints(slots, b.device, torch.int32), torch.stack(unique_a).to(b.acc), torch.stack(unique_b).to(b.acc),
            G_DTYPE=_TL_DTYPES[b.g_dtype], BLOCK=BLOCK, num_warps=NUM_WARPS, **b.dtypes(),
        )
    if fallback:
        _foreach.mix_perturb_(
            _pick(params, fallback), _pick(grads, fallback), _pick(saved, fallback),
            _pick(noise_coefs, fallback), _pick(grad_coefs, fallback), gammas=_pick(gammas, fallback),
            stream=stream.pick(fallback))


register_backend(NAME, sys.modules[__name__], priority={"cuda": 20})
