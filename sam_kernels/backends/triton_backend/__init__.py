"""The Triton backend: fused multi-tensor kernels, a few launches per (dtype) bucket.

Per step and bucket: SAM/ASAM run one reduction launch (plus a filter-norm
launch for filter-wise ASAM) and one perturb launch; restore is one launch.
R-SAM's δ₀ is regenerated inside the kernels from the Philox stream and never
stored. The fused second step (``restore_sgd_``, ``restore_adam_``; see
:data:`FUSES_BASE_STEP`) is one launch per bucket: saved weights, gradient and
optimizer state in, weights and state out. The SAM family's operations (GSAM, LookSAM, WSAM,
FriendlySAM, Momentum-SAM's ``msam_sgd_``; §2.5–§2.10) are one launch per bucket each, reductions
two-stage (one partial per tile, summed in a fixed order); ``copy_`` is restore's bit copy; their second
and third lists (and MSAM's momenta) must have the first list's dtype. Tensors the kernels do not take —
non-contiguous weights or gradients, saved copies of another dtype, optimizer
state that is non-contiguous or of another dtype than its weight, filters of
more than :data:`MAX_FILTER` elements, shards at a noise offset — go to the
foreach backend in the same call; the reason is kept in
:data:`ROUTED_TO_FOREACH` (shape → reason) for inspection.

Host metadata is cached (issue 19): each operation keeps a plan per signature
of its lists (shapes, dtypes, contiguity, device; see :func:`_plan`) holding
the buckets and tile tables, and within a plan the pointer tables of each list
(keyed by the addresses) and the hyperparameter and scale-slot arrays (keyed by
their values). A step with unchanged lists builds nothing; reallocated
gradients rebuild one pointer table. :data:`STATS` counts the builds.

CUDA tensors use the compiled kernels. With ``TRITON_INTERPRET=1`` set before
import, CPU tensors run through Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import functools
import operator
import os
import sys
from collections import OrderedDict
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
# Element-wise kernels find an element's filter with a 32-bit division (kernels._filter_value): filters
# of more elements go to foreach (a tensor itself may have any number of elements).
MAX_FILTER = 2**31 - 2**16

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
    """Positions of the tensors one launch covers, with their shared layout (no tensor is kept)."""

    def __init__(self, positions: list[int], shapes: list[torch.Size], device: torch.device,
                 w_dtype: torch.dtype, g_dtype: torch.dtype | None):
        self.positions = positions
        self.device = device
        self.w_dtype = w_dtype
        self.g_dtype = g_dtype or w_dtype
        self.acc = accumulation_dtype(w_dtype)
        self.layout = L.static_layout(tuple(tuple(shapes[i]) for i in positions), device, BLOCK, FILTER_ROWS)
        self.no_filter_norms = torch.zeros(1, dtype=self.acc, device=device)  # the argument when no mode reads it

    def take(self, items: Sequence) -> list:
        return [items[i] for i in self.positions]

    def dtypes(self) -> dict:
        return {"W_DTYPE": _TL_DTYPES[self.w_dtype], "ACC": _TL_DTYPES[self.acc]}

    def filter_norms(self, w_ptrs: Tensor) -> Tensor:
        """‖f_i‖ of every filter of the bucket's ndim ≥ 2 tensors, one launch."""
        out = torch.empty(max(self.layout.total_filters, 1), dtype=self.acc, device=self.device)
        if self.layout.has_filters:
            K.filter_norm_kernel[(self.layout.num_ftiles,)](
                self.layout.ftile_tensor, self.layout.ftile_row, w_ptrs, self.layout.fsizes,
                self.layout.n_filters, self.layout.fnorm_offs, out,
                ROWS=FILTER_ROWS, COLS=FILTER_COLS, num_warps=4, **self.dtypes(),
            )
        return out


_size = Tensor.size
_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
_dtype_of = operator.attrgetter("dtype")


class _Plan:
    """The buckets of one call signature and the device arrays derived from them.

    Built once per signature (see :func:`_plan`) and reused while it holds. The
    per-tensor arrays that can change while the layout does not — addresses,
    hyperparameters, scale slots — are rebuilt when their values change, per
    list: a gradient list reallocated every step (``zero_grad(set_to_none=True)``)
    costs one small pointer table, not a new plan.
    """

    def __init__(self, weights: Sequence[Tensor], grads: Sequence[Tensor] | None, saved: Sequence[Tensor] | None,
                 element_offsets: Sequence[int] | None, states: Sequence[Sequence[Tensor]] = (),
                 used: Sequence[Sequence[bool] | None] = ()):
        STATS["plans"] += 1
        by_key: dict[tuple, list[int]] = {}
        self.fallback: list[int] = []
        shapes = list(map(_size, weights))
        for i, w in enumerate(weights):
            tensors = [w] + [lst[i] for lst in (grads, saved) if lst is not None]
            if w.numel() == 0:
                continue  # nothing to do, on any backend
            if not all(t.is_contiguous() for t in tensors):
                ROUTED_TO_FOREACH[tuple(w.shape)] = "non-contiguous weight or gradient"
                self.fallback.append(i)
                continue
            # Optimizer state the kernel reads and writes (a placeholder where the tensor does not use it).
            state = [lst[i] for lst, on in zip(states, used) if on is None or on[i]]
            if not all(t.is_contiguous() and t.dtype == w.dtype for t in state):
                ROUTED_TO_FOREACH[tuple(w.shape)] = "optimizer state non-contiguous or of another dtype than the weight"
                self.fallback.append(i)
                continue
            if w.dim() >= 2 and w.numel() // w.shape[0] > MAX_FILTER:
                ROUTED_TO_FOREACH[tuple(w.shape)] = f"filter of more than {MAX_FILTER} elements"
                self.fallback.append(i)
                continue
            if saved is not None and saved[i].dtype != w.dtype:
                ROUTED_TO_FOREACH[tuple(w.shape)] = "saved copy's dtype differs from the weight's"
                self.fallback.append(i)
                continue
            if element_offsets and element_offsets[i]:
                ROUTED_TO_FOREACH[tuple(w.shape)] = "shard of a bigger tensor (noise stream offset)"
                self.fallback.append(i)
                continue
            key = (w.dtype, grads[i].dtype if grads is not None else None)
            by_key.setdefault(key, []).append(i)
        device = weights[0].device
        self.buckets = [_Bucket(positions, shapes, device, *key) for key, positions in by_key.items()]
        self._pointers: dict[int, OrderedDict[tuple[int, ...], list[Tensor]]] = {}
        self._arrays: dict[str, tuple[tuple, list[Tensor]]] = {}
        self._slots: dict[str, tuple[tuple, list[int], list[Tensor]]] = {}

    def pointers(self, *lists: Sequence[Tensor] | None) -> list[tuple[list[Tensor], bool]]:
        """Per bucket, the int64 device arrays of the addresses of each list (weights, gradients,
        saved, then any state lists; None where the call has no such list) and whether every address is
        16-byte aligned.

        The last few address sets of each list are kept: gradients freed and
        reallocated every step often come back at the same few addresses.
        """
        per_list = []
        for which, tensors in enumerate(lists):
            if tensors is None:
                continue
            addresses = tuple(map(_data_ptr, tensors))
            tables = self._pointers.setdefault(which, OrderedDict())
            made = tables.get(addresses)
            if made is None:
                STATS["pointer_tables"] += 1
                made = tables[addresses] = [
                    (L.device_array(take, torch.int64, b.device), all(a % 16 == 0 for a in take))
                    for b in self.buckets for take in [b.take(addresses)]
                ]
                if len(tables) > _POINTER_SETS:
                    tables.popitem(last=False)
            else:
                tables.move_to_end(addresses)
            per_list.append(made)
        return [([table for table, _ in made], all(aligned for _, aligned in made)) for made in zip(*per_list)]

    def array(self, name: str, values: Sequence, kind: str = "acc") -> list[Tensor]:
        """Per bucket, a device array of per-tensor values: floats in the accumulation dtype, or int64.

        A value may be a tuple (one row per tensor): the array is then a row-major [tensors, columns] table.
        """
        key = tuple(values)
        cached = self._arrays.get(name)
        if cached is None or cached[0] != key:
            STATS["arrays"] += 1
            convert = float if kind == "acc" else int
            dtype = None if kind == "acc" else torch.int64

            def rows(taken):
                return [tuple(map(convert, v)) if isinstance(v, tuple) else convert(v) for v in taken]

            made = [L.device_array(rows(b.take(key)), dtype or b.acc, b.device) for b in self.buckets]
            cached = (key, made)
            self._arrays[name] = cached
        return cached[1]

    def slots(self, name: str, *per_tensor: Sequence[Tensor]) -> tuple[list[list[Tensor]], list[Tensor]]:
        """The distinct tensor tuples (by identity) of parallel per-tensor lists and, per bucket, each
        tensor's slot among them (an int32 device array).

        The scales of one param group are one tensor object shared by its
        tensors, so the slots index a short per-group vector; new scale objects
        every step with the same sharing reuse the slot arrays.
        """
        ids = tuple(zip(*(map(id, items) for items in per_tensor))) if len(per_tensor) > 1 else \
            tuple(map(id, per_tensor[0]))
        cached = self._slots.get(name)
        if cached is None or cached[0] != ids:
            index: dict = {}
            slots, firsts = [], []
            for key in ids:
                slot = index.get(key)
                if slot is None:
                    slot = index[key] = len(firsts)
                    firsts.append(len(slots))
                slots.append(slot)
            if cached is None or cached[1] != slots:
                STATS["arrays"] += 1
                arrays = [L.device_array(b.take(slots), torch.int32, b.device) for b in self.buckets]
            else:
                arrays = cached[2]
            cached = (ids, slots, arrays, firsts)
            self._slots[name] = cached
        firsts = cached[3]
        return [[items[i] for i in firsts] for items in per_tensor], cached[2]


STATS = {"plans": 0, "pointer_tables": 0, "arrays": 0}  # builds, for tests and benchmarks
_PLANS: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 64
_POINTER_SETS = 4  # address sets kept per list of a plan


def _plan(op: str, weights: Sequence[Tensor], grads: Sequence[Tensor] | None = None,
          saved: Sequence[Tensor] | None = None, element_offsets: Sequence[int] | None = None,
          states: Sequence[Sequence[Tensor]] = (), used: Sequence[Sequence[bool] | None] = ()) -> _Plan:
    """The cached plan of the lists' signature: shapes, dtypes, contiguity, device and shard offsets.

    ``states``: optimizer-state lists the kernel reads and writes (they must be contiguous and of the
    weight's dtype, else the position goes to foreach); ``used``, one per state list: which positions use
    it (None: all), the others hold a placeholder that is never addressed, whatever its layout.
    Addresses are not part of it (a new storage or a reallocated gradient only
    rebuilds that list's pointer table, see :meth:`_Plan.pointers`).
    """
    used = tuple(None if on is None else tuple(map(bool, on)) for on in used) or (None,) * len(states)
    lists = [lst for lst in (weights, grads, saved, *states) if lst is not None]
    key = (
        op,
        weights[0].device,
        tuple(map(_size, weights)),
        tuple(tuple(map(_dtype_of, lst)) for lst in lists),
        tuple(tuple(map(_is_contiguous, lst)) for lst in lists),
        tuple(map(bool, element_offsets)) if element_offsets is not None and any(element_offsets) else None,
        used,
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(weights, grads, saved, element_offsets, states, used)
        if len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


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
    plan = _plan("scaled_grad_sq_sum", params, grads)
    parts = []
    if plan.buckets:
        tables = plan.pointers(params, grads)
        eta_arrays = plan.array("etas", etas)
    for k, b in enumerate(plan.buckets):
        (w_ptrs, g_ptrs), aligned = tables[k]
        fnorms = b.filter_norms(w_ptrs) if granularity == "filter" else b.no_filter_norms
        partials = torch.empty(b.layout.num_tiles, dtype=b.acc, device=b.device)
        K.scaled_grad_sq_sum_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, w_ptrs, g_ptrs,
            b.layout.numels, eta_arrays[k], b.layout.fsizes, b.layout.fnorm_offs, fnorms, partials,
            G_DTYPE=_TL_DTYPES[b.g_dtype], MODE=_MODES[granularity], BLOCK=BLOCK, ALIGNED=aligned,
            num_warps=NUM_WARPS, **b.dtypes(),
        )
        parts.append(partials.sum())
    if plan.fallback:
        fallback = plan.fallback
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
    plan = _plan("perturb_", params, grads, saved)
    if plan.buckets:
        tables = plan.pointers(params, grads, saved)
        eta_arrays = plan.array("etas", etas)
        (unique,), slot_arrays = plan.slots("scales", scales)
        stacked = torch.stack(unique)
    for k, b in enumerate(plan.buckets):
        (w_ptrs, g_ptrs, s_ptrs), aligned = tables[k]
        fnorms = b.filter_norms(w_ptrs) if granularity == "filter" else b.no_filter_norms
        K.perturb_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, w_ptrs, g_ptrs, s_ptrs, b.layout.numels,
            eta_arrays[k], b.layout.fsizes, b.layout.fnorm_offs, fnorms, slot_arrays[k], stacked.to(b.acc),
            G_DTYPE=_TL_DTYPES[b.g_dtype], MODE=_MODES[granularity], P_INF=p != 2, BLOCK=BLOCK, ALIGNED=aligned,
            num_warps=NUM_WARPS, **b.dtypes(),
        )
    if plan.fallback:
        fallback = plan.fallback
        _foreach.perturb_(_pick(params, fallback), _pick(grads, fallback), _pick(saved, fallback),
                          _pick(scales, fallback), etas=_pick(etas, fallback), granularity=granularity, p=p)


@_on_tensors_device
def restore_(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    plan = _plan("restore_", params, saved=saved)
    if plan.buckets:
        tables = plan.pointers(params, None, saved)
    for k, b in enumerate(plan.buckets):
        (w_ptrs, s_ptrs), aligned = tables[k]
        K.restore_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, w_ptrs, s_ptrs,
            b.layout.numels, W_DTYPE=_TL_DTYPES[b.w_dtype], BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS,
        )
    if plan.fallback:
        _foreach.restore_(_pick(params, plan.fallback), _pick(saved, plan.fallback))


def _noise_args(plan: _Plan, k: int, gammas, stream: NoiseStream) -> tuple:
    seed = stream.seed
    return (plan.array("gammas", gammas)[k], plan.array("tensor_indices", stream.tensor_indices, "int")[k],
            seed & 0xFFFFFFFF, seed >> 32, stream.step & 0xFFFFFFFF)


@_on_tensors_device
def add_noise_(
    params: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    gammas: Sequence[float],
    stream: NoiseStream,
) -> None:
    plan = _plan("add_noise_", params, saved=saved, element_offsets=stream.element_offsets)
    if plan.buckets:
        tables = plan.pointers(params, None, saved)
    for k, b in enumerate(plan.buckets):
        (w_ptrs, s_ptrs), aligned = tables[k]
        fnorms = b.filter_norms(w_ptrs)
        K.add_noise_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, w_ptrs, s_ptrs,
            b.layout.numels, b.layout.fsizes, b.layout.fnorm_offs, fnorms,
            *_noise_args(plan, k, gammas, stream),
            BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
    if plan.fallback:
        fallback = plan.fallback
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
    # The saved weights take the weights' place: they give the layout and the noise scale.
    plan = _plan("noise_grad_sums", saved, grads, element_offsets=stream.element_offsets)
    parts = []
    if plan.buckets:
        tables = plan.pointers(saved, grads)
        lam_arrays = plan.array("lams", lams)
    for k, b in enumerate(plan.buckets):
        (s_ptrs, g_ptrs), aligned = tables[k]
        fnorms = b.filter_norms(s_ptrs)
        partials = torch.empty((b.layout.num_tiles, 4), dtype=b.acc, device=b.device)
        gamma_arr, index_arr, key0, key1, step32 = _noise_args(plan, k, gammas, stream)
        K.noise_grad_sums_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, g_ptrs, s_ptrs,
            b.layout.numels, b.layout.fsizes, b.layout.fnorm_offs, fnorms, gamma_arr, lam_arrays[k], index_arr,
            key0, key1, step32, partials,
            G_DTYPE=_TL_DTYPES[b.g_dtype], BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
        parts.append(partials.sum(0))
    if plan.fallback:
        fallback = plan.fallback
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
    plan = _plan("mix_perturb_", params, grads, saved, stream.element_offsets)
    if plan.buckets:
        tables = plan.pointers(params, grads, saved)
        (unique_a, unique_b), slot_arrays = plan.slots("coefs", noise_coefs, grad_coefs)
        stacked_a, stacked_b = torch.stack(unique_a), torch.stack(unique_b)
    for k, b in enumerate(plan.buckets):
        (w_ptrs, g_ptrs, s_ptrs), aligned = tables[k]
        fnorms = b.filter_norms(s_ptrs)
        K.mix_perturb_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, w_ptrs, g_ptrs,
            s_ptrs, b.layout.numels, b.layout.fsizes, b.layout.fnorm_offs, fnorms,
            *_noise_args(plan, k, gammas, stream),
            slot_arrays[k], stacked_a.to(b.acc), stacked_b.to(b.acc),
            G_DTYPE=_TL_DTYPES[b.g_dtype], BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
    if plan.fallback:
        fallback = plan.fallback
        _foreach.mix_perturb_(
            _pick(params, fallback), _pick(grads, fallback), _pick(saved, fallback),
            _pick(noise_coefs, fallback), _pick(grad_coefs, fallback), gammas=_pick(gammas, fallback),
            stream=stream.pick(fallback))


# ------------------------------------------------------ the fused second step (docs/DESIGN.md §2.11)
FUSES_BASE_STEP = True  # restore + torch.optim.SGD's / Adam(W)'s update in one pass (optim/fused_base.py)


def _skip_slots(plan: _Plan, skips: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The distinct skip flags stacked (usually one shared 0-d bool) and, per bucket, each tensor's slot."""
    (unique,), slot_arrays = plan.slots("skips", skips)
    return torch.stack(unique), slot_arrays


def _fallback_step(fn, plan: _Plan, lists: Sequence[Sequence], hypers: dict) -> None:
    fallback = plan.fallback
    fn(*(_pick(lst, fallback) for lst in lists), **{k: _pick(v, fallback) for k, v in hypers.items()})


@_on_tensors_device
def restore_sgd_(
    params: Sequence[Tensor], saved: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor],
    skips: Sequence[Tensor], *, lrs: Sequence[float], weight_decays: Sequence[float], momentums: Sequence[float],
    dampenings: Sequence[float], nesterovs: Sequence[float], maximizes: Sequence[float], fresh: Sequence[float],
) -> None:
    momentum_on = [mu != 0 for mu in momentums]
    plan = _plan("restore_sgd_", params, grads, saved, states=(momenta,), used=(momentum_on,))
    if plan.buckets:
        tables = plan.pointers(params, grads, saved, momenta)
        hyper_arrays = _sgd_hypers(plan, lrs, weight_decays, momentums, dampenings, nesterovs, maximizes, fresh,
                                   momentum_on)
        stacked, slot_arrays = _skip_slots(plan, skips)
    for k, b in enumerate(plan.buckets):
        (w_ptrs, g_ptrs, s_ptrs, m_ptrs), aligned = tables[k]
        K.restore_sgd_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, w_ptrs, s_ptrs, g_ptrs, m_ptrs, b.layout.numels,
            hyper_arrays[k], slot_arrays[k], stacked,
            G_DTYPE=_TL_DTYPES[b.g_dtype], BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
    if plan.fallback:
        _fallback_step(_foreach.restore_sgd_, plan, (params, saved, grads, momenta, skips), dict(
            lrs=lrs, weight_decays=weight_decays, momentums=momentums, dampenings=dampenings, nesterovs=nesterovs,
            maximizes=maximizes, fresh=fresh))


@_on_tensors_device
def restore_adam_(
    params: Sequence[Tensor], saved: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], skips: Sequence[Tensor], *,
    lrs: Sequence[float], beta1s: Sequence[float], beta2s: Sequence[float], epss: Sequence[float],
    weight_decays: Sequence[float], decoupled: Sequence[float], amsgrads: Sequence[float],
    maximizes: Sequence[float], step_sizes: Sequence[float], bias_correction2_sqrts: Sequence[float],
) -> None:
    amsgrad_on = [bool(a) for a in amsgrads]
    plan = _plan("restore_adam_", params, grads, saved, states=(exp_avgs, exp_avg_sqs, max_exp_avg_sqs),
                 used=(None, None, amsgrad_on))
    if plan.buckets:
        tables = plan.pointers(params, grads, saved, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
        # Columns in kernels.ADAM_* order; 1 − lr·λ, 1 − β₁, 1 − β₂ formed in float64 (csrc/sam_math.h).
        hyper_arrays = plan.array("hypers", [
            (1.0 - lr * wd, wd, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size, bc2, -1.0 if maximize else 1.0,
             float(wd != 0 and bool(dec)), float(wd != 0 and not dec), float(ams))
            for lr, beta1, beta2, eps, wd, dec, ams, maximize, step_size, bc2 in zip(
                lrs, beta1s, beta2s, epss, weight_decays, decoupled, amsgrad_on, maximizes, step_sizes,
                bias_correction2_sqrts)
        ])
        stacked, slot_arrays = _skip_slots(plan, skips)
    for k, b in enumerate(plan.buckets):
        (w_ptrs, g_ptrs, s_ptrs, m_ptrs, v_ptrs, vmax_ptrs), aligned = tables[k]
        K.restore_adam_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, w_ptrs, s_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs,
            b.layout.numels, hyper_arrays[k], slot_arrays[k], stacked,
            G_DTYPE=_TL_DTYPES[b.g_dtype], BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
    if plan.fallback:
        _fallback_step(_foreach.restore_adam_, plan,
                       (params, saved, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, skips), dict(
                           lrs=lrs, beta1s=beta1s, beta2s=beta2s, epss=epss, weight_decays=weight_decays,
                           decoupled=decoupled, amsgrads=amsgrads, maximizes=maximizes, step_sizes=step_sizes,
                           bias_correction2_sqrts=bias_correction2_sqrts))


# ------------------------------------------------ the SAM family (docs/DESIGN.md §2.5–§2.8, §2.10)
# The second (third) lists must have the first list's dtype and be contiguous, else the position goes to
# foreach (passed as state lists of the plan); FriendlySAM's and MSAM's gradients may have another dtype
# (a bucket of their own, read as G_DTYPE).
def _coef_slots(plan: _Plan, name: str, *per_tensor: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The distinct device scalars of each list stacked (one entry per distinct tuple) and, per bucket, each
    tensor's slot among them."""
    uniques, slot_arrays = plan.slots(name, *per_tensor)
    return [torch.stack(unique) for unique in uniques], slot_arrays


def _widened(total: Tensor, *lists: Sequence[Tensor]) -> Tensor:
    """The sum in float64 when any tensor of the lists is float64 (also an empty one, as the reference)."""
    if total.dtype != torch.float64 and any(t.dtype == torch.float64 for lst in lists for t in lst):
        return total.to(torch.float64)
    return total


@_on_tensors_device
def copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    plan = _plan("copy_", targets, states=(sources,))
    if plan.buckets:
        tables = plan.pointers(targets, None, None, sources)
    for k, b in enumerate(plan.buckets):
        (x_ptrs, y_ptrs), aligned = tables[k]
        K.restore_kernel[(b.layout.num_tiles,)](  # a bit copy: restore's kernel
            b.layout.tile_tensor, b.layout.tile_start, x_ptrs, y_ptrs,
            b.layout.numels, W_DTYPE=_TL_DTYPES[b.w_dtype], BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS,
        )
    if plan.fallback:
        _foreach.copy_(_pick(targets, plan.fallback), _pick(sources, plan.fallback))


@_on_tensors_device
def pair_sums(firsts: Sequence[Tensor], seconds: Sequence[Tensor]) -> Tensor:
    plan = _plan("pair_sums", firsts, states=(seconds,))
    parts = []
    if plan.buckets:
        tables = plan.pointers(firsts, None, None, seconds)
    for k, b in enumerate(plan.buckets):
        (x_ptrs, y_ptrs), aligned = tables[k]
        partials = torch.empty((b.layout.num_tiles, 3), dtype=b.acc, device=b.device)
        K.pair_sums_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, x_ptrs, y_ptrs, b.layout.numels, partials,
            BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
        parts.append(partials.sum(0))
    if plan.fallback:
        parts.append(_foreach.pair_sums(_pick(firsts, plan.fallback), _pick(seconds, plan.fallback)))
    return _widened(_sum(parts, (3,), firsts[0].device), firsts, seconds)


@_on_tensors_device
def combine_(
    targets: Sequence[Tensor], others: Sequence[Tensor], target_coefs: Sequence[Tensor], other_coefs: Sequence[Tensor]
) -> None:
    plan = _plan("combine_", targets, states=(others,))
    if plan.buckets:
        tables = plan.pointers(targets, None, None, others)
        (stacked_a, stacked_b), slot_arrays = _coef_slots(plan, "coefs", target_coefs, other_coefs)
    for k, b in enumerate(plan.buckets):
        (x_ptrs, y_ptrs), aligned = tables[k]
        K.combine_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, x_ptrs, y_ptrs, b.layout.numels,
            slot_arrays[k], stacked_a.to(b.acc), stacked_b.to(b.acc),
            BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
    if plan.fallback:
        fallback = plan.fallback
        _foreach.combine_(_pick(targets, fallback), _pick(others, fallback), _pick(target_coefs, fallback),
                          _pick(other_coefs, fallback))


@_on_tensors_device
def split_difference_(grads: Sequence[Tensor], firsts: Sequence[Tensor], skips: Sequence[Tensor]) -> None:
    plan = _plan("split_difference_", grads, states=(firsts,))
    if plan.buckets:
        tables = plan.pointers(grads, None, None, firsts)
        stacked, slot_arrays = _skip_slots(plan, skips)
    for k, b in enumerate(plan.buckets):
        (g_ptrs, f_ptrs), aligned = tables[k]
        K.split_difference_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, g_ptrs, f_ptrs, b.layout.numels, slot_arrays[k], stacked,
            BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
    if plan.fallback:
        fallback = plan.fallback
        _foreach.split_difference_(_pick(grads, fallback), _pick(firsts, fallback), _pick(skips, fallback))


def _residual_hypers(plan: _Plan, sigmas: Sequence[float], lmbdas: Sequence[float]) -> list[Tensor]:
    # Columns in kernels.RES_* order; 1 − λ formed in float64 before the rounding to ACC.
    return plan.array("residual", [(sigma, lmbda, 1.0 - lmbda) for sigma, lmbda in zip(sigmas, lmbdas)])


@_on_tensors_device
def residual_sq_sum(
    params: Sequence[Tensor], grads: Sequence[Tensor], moments: Sequence[Tensor], *, sigmas: Sequence[float]
) -> Tensor:
    plan = _plan("residual_sq_sum", params, grads, states=(moments,))
    parts = []
    if plan.buckets:
        tables = plan.pointers(None, grads, None, moments)  # the weights give only the dtype
        hyper_arrays = _residual_hypers(plan, sigmas, [0.0] * len(sigmas))
    for k, b in enumerate(plan.buckets):
        (g_ptrs, m_ptrs), aligned = tables[k]
        partials = torch.empty(b.layout.num_tiles, dtype=b.acc, device=b.device)
        K.residual_sq_sum_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, g_ptrs, m_ptrs, b.layout.numels, hyper_arrays[k], partials,
            G_DTYPE=_TL_DTYPES[b.g_dtype], BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
        parts.append(partials.sum())
    if plan.fallback:
        fallback = plan.fallback
        parts.append(_foreach.residual_sq_sum(_pick(params, fallback), _pick(grads, fallback),
                                              _pick(moments, fallback), sigmas=_pick(sigmas, fallback)))
    return _widened(_sum(parts, (), params[0].device), params)


@_on_tensors_device
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
    plan = _plan("residual_perturb_", params, grads, saved, states=(moments,))
    if plan.buckets:
        tables = plan.pointers(params, grads, saved, moments)
        hyper_arrays = _residual_hypers(plan, sigmas, lmbdas)
        (stacked,), slot_arrays = _coef_slots(plan, "scales", scales)
    for k, b in enumerate(plan.buckets):
        (w_ptrs, g_ptrs, s_ptrs, m_ptrs), aligned = tables[k]
        K.residual_perturb_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, w_ptrs, g_ptrs, m_ptrs, s_ptrs, b.layout.numels,
            hyper_arrays[k], slot_arrays[k], stacked.to(b.acc),
            G_DTYPE=_TL_DTYPES[b.g_dtype], BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
    if plan.fallback:
        fallback = plan.fallback
        _foreach.residual_perturb_(
            _pick(params, fallback), _pick(grads, fallback), _pick(moments, fallback), _pick(saved, fallback),
            _pick(scales, fallback), sigmas=_pick(sigmas, fallback), lmbdas=_pick(lmbdas, fallback))


def _sgd_hypers(plan: _Plan, lrs, weight_decays, momentums, dampenings, nesterovs, maximizes, fresh,
                momentum_on) -> list[Tensor]:
    # Columns in kernels.SGD_* order; 1 − τ formed in float64 before the rounding to ACC (csrc/sam_math.h).
    return plan.array("hypers", [
        (lr, wd, mu, 1.0 - tau, -1.0 if maximize else 1.0, float(wd != 0), float(on), float(bool(nesterov)),
         float(bool(new)))
        for lr, wd, mu, tau, maximize, on, nesterov, new in zip(
            lrs, weight_decays, momentums, dampenings, maximizes, momentum_on, nesterovs, fresh)
    ])


@_on_tensors_device
def msam_sgd_(
    params: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor], shifts: Sequence[Tensor],
    skips: Sequence[Tensor], *, lrs: Sequence[float], weight_decays: Sequence[float], momentums: Sequence[float],
    dampenings: Sequence[float], nesterovs: Sequence[float], maximizes: Sequence[float], fresh: Sequence[float],
) -> Tensor:
    hypers = dict(lrs=lrs, weight_decays=weight_decays, momentums=momentums, dampenings=dampenings,
                  nesterovs=nesterovs, maximizes=maximizes, fresh=fresh)
    if any(mu == 0 for mu in momentums):  # not a Momentum-SAM step (MSAM needs momentum > 0): the reference form
        return _foreach.msam_sgd_(params, grads, momenta, shifts, skips, **hypers)
    plan = _plan("msam_sgd_", params, grads, states=(momenta,))
    parts = []
    if plan.buckets:
        tables = plan.pointers(params, grads, None, momenta)
        hyper_arrays = _sgd_hypers(plan, momentum_on=[True] * len(params), **hypers)
        (stacked_shifts, stacked_skips), slot_arrays = _coef_slots(plan, "flags", shifts, skips)
    for k, b in enumerate(plan.buckets):
        (w_ptrs, g_ptrs, m_ptrs), aligned = tables[k]
        partials = torch.empty(b.layout.num_tiles, dtype=b.acc, device=b.device)
        K.msam_sgd_kernel[(b.layout.num_tiles,)](
            b.layout.tile_tensor, b.layout.tile_start, w_ptrs, g_ptrs, m_ptrs, b.layout.numels, hyper_arrays[k],
            slot_arrays[k], stacked_shifts.to(b.acc), stacked_skips, partials,
            G_DTYPE=_TL_DTYPES[b.g_dtype], BLOCK=BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS, **b.dtypes(),
        )
        parts.append(partials.sum())
    if plan.fallback:
        fallback = plan.fallback
        parts.append(_foreach.msam_sgd_(*(_pick(lst, fallback) for lst in (params, grads, momenta, shifts, skips)),
                                        **{k: _pick(v, fallback) for k, v in hypers.items()}))
    return _widened(_sum(parts, (), params[0].device), params, momenta)


register_backend(NAME, sys.modules[__name__], priority={"cuda": 20})
