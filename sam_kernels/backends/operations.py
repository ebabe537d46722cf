"""The backend operations, declared once.

Each :class:`Operation` names its tensor-list arguments (all of one length,
on one device), its per-tensor hyperparameters (one float for all tensors, or
one per tensor), whether it takes R-SAM's :class:`~sam_kernels.noise.NoiseStream`,
its per-tensor device scalars
(scales and R-SAM coefficients: 0-d tensors, so a step never waits for the
host) and what it returns. :func:`call` is the one way an operation runs: it
checks the arguments against the declaration — a clear ``ValueError`` naming
the argument before any backend sees them — picks the backend for the
tensors' device, and runs the operation there, or on ``foreach`` (``reference``
where foreach does not run) when that backend does not implement it. A
backend therefore implements any subset of :data:`OPERATIONS`.

The math of each operation is in docs/DESIGN.md §2–§3; ``reference.py`` is
its readable form.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Operation:
    name: str
    tensor_lists: tuple[str, ...]
    per_tensor_floats: tuple[str, ...] = ()
    device_scalars: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # whole-call options (ASAM's granularity and p)
    noise: bool = False  # takes a NoiseStream (seed, step, tensor numbers, element offsets) as `stream`
    writes: tuple[str, ...] = ()  # tensor lists written in place
    returns: str = "nothing"  # "nothing" (in place), "sum" (a 0-d tensor), "sums3", "sums4", "per tensor"
    doc: str = ""


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in [
        Operation("filter_norms", ("tensors",), returns="per tensor",
                  doc="‖f_i‖₂ per filter of each tensor with ndim ≥ 2, |w| for ndim ≤ 1"),
        Operation("scaled_grad_sq_sum", ("params", "grads"), ("etas",), options=("granularity",), returns="sum",
                  doc="Σ (t ⊙ g)² over every tensor"),
        Operation("perturb_", ("params", "grads", "saved"), ("etas",), device_scalars=("scales",), options=("granularity", "p"),
                  writes=("params", "saved"),
                  doc="saved ← w; w ← w + s·t²⊙g (p = 2) or s·t⊙sign(g) (p = ∞)"),
        Operation("restore_", ("params", "saved"), writes=("params",), doc="w ← saved, bit-exactly"),
        Operation("add_noise_", ("params", "saved"), ("gammas",), noise=True, writes=("params", "saved"), doc="saved ← w; w ← w + δ₀"),
        Operation("noise_grad_sums", ("grads", "saved"), ("gammas", "lams"), noise=True, returns="sums4", doc="(Σδ₀², Σg², Σλδ₀·g, Σλ²g²)"),
        Operation("mix_perturb_", ("params", "grads", "saved"), ("gammas",),
                  device_scalars=("noise_coefs", "grad_coefs"), noise=True, writes=("params",),
                  doc="w ← saved + a·δ₀ + b·g"),
        # The SAM family (GSAM, R-GSAM, LookSAM, WSAM, FriendlySAM; docs/DESIGN.md §2.5–§2.8).
        Operation("copy_", ("targets", "sources"), writes=("targets",),
                  doc="target ← source (keeps the first-pass gradient g)"),
        Operation("pair_sums", ("firsts", "seconds"), returns="sums3", doc="(Σ x·y, Σ x², Σ y²)"),
        Operation("combine_", ("targets", "others"), device_scalars=("target_coefs", "other_coefs"),
                  writes=("targets",), doc="x ← a·x + b·y, a term with a zero coefficient counting 0"),
        Operation("split_difference_", ("grads", "firsts"), device_scalars=("skips",), writes=("grads", "firsts"),
                  doc="firsts ← grads − firsts; grads ← the old firsts (WSAM's decoupled split); where the "
                      "0-d bool skip is set: firsts ← 0, grads kept"),
        Operation("residual_sq_sum", ("params", "grads", "moments"), ("sigmas",), returns="sum",
                  doc="Σ (g − σ·m)² (FriendlySAM)"),
        Operation("residual_perturb_", ("params", "grads", "moments", "saved"), ("sigmas", "lmbdas"),
                  device_scalars=("scales",), writes=("params", "saved", "moments"),
                  doc="saved ← w; w ← w + s·(g − σ·m); m ← λ·m + (1 − λ)·g (FriendlySAM)"),
        # The fused second step (docs/DESIGN.md §2.11): restore + the base optimizer's update in one pass.
        # Flags (nesterov, maximize, ...) are per-tensor floats 0/1: they are per param group in torch.
        Operation("restore_sgd_", ("params", "saved", "grads", "momenta"),
                  ("lrs", "weight_decays", "momentums", "dampenings", "nesterovs", "maximizes", "fresh"),
                  device_scalars=("skips",), writes=("params", "momenta"),
                  doc="w ← saved − lr·d, torch.optim.SGD's step taken from the saved weights (d its direction, "
                      "momentum buffer m ← d where fresh, else μ·m + (1 − dampening)·d; momenta[i] untouched "
                      "where momentum is 0); where the 0-d bool skip is set: w ← saved, m kept"),
        Operation("restore_adam_", ("params", "saved", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
                  ("lrs", "beta1s", "beta2s", "epss", "weight_decays", "decoupled", "amsgrads", "maximizes",
                   "step_sizes", "bias_correction2_sqrts"),
                  device_scalars=("skips",), writes=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
                  doc="w ← saved − step_size·m/(√v/√(1−β₂ᵗ) + eps), torch.optim.Adam/AdamW's step taken from the "
                      "saved weights (max_exp_avg_sqs[i] untouched without amsgrad); where the 0-d bool skip "
                      "is set: w ← saved, the moments kept"),
        Operation("msam_sgd_", ("params", "grads", "momenta"),
                  ("lrs", "weight_decays", "momentums", "dampenings", "nesterovs", "maximizes", "fresh"),
                  device_scalars=("shifts", "skips"), writes=("params", "momenta"), returns="sum",
                  doc="Momentum-SAM's step with SGD (docs/DESIGN.md §2.10): w ← ŵ + c·m (c the shift, m the "
                      "momentum before the step), then restore_sgd_'s update from that w; returns Σ m² of the "
                      "new momenta (the next perturbation's norm); where skip is set: w ← ŵ + c·m, m kept"),
    ]
}


def device_of(*lists: Sequence[Tensor], what: str = "") -> torch.device:
    """The one device of every tensor of the lists (CPU when there is none); ValueError when several."""
    devices = {device for tensors in lists for device in map(_device, tensors)}
    if len(devices) > 1:
        where = f"{what}: " if what else ""
        raise ValueError(f"{where}all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    return devices.pop() if devices else torch.device("cpu")


def check_arguments(op: Operation, arguments: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The tensor count and the arguments normalised (lists; floats broadcast), or a ValueError naming one."""
    normalised = dict(arguments)
    count = None
    for name in op.tensor_lists:
        normalised[name] = list(arguments[name])
        if count is None:
            count = len(normalised[name])
        elif len(normalised[name]) != count:
            raise ValueError(
                f"{op.name}: {name} has {len(normalised[name])} tensors, {op.tensor_lists[0]} has {count}"
            )
    _check_elementwise(op, normalised)
    for name in op.per_tensor_floats:
        value = arguments[name]
        if isinstance(value, (int, float)):
            normalised[name] = [float(value)] * count
        else:
            normalised[name] = list(map(float, value))
            if len(normalised[name]) != count:
                raise ValueError(f"{op.name}: {name} has {len(normalised[name])} values for {count} tensors")
    for name in op.device_scalars:
        normalised[name] = list(arguments[name])
        if len(normalised[name]) != count:
            raise ValueError(f"{op.name}: {name} has {len(normalised[name])} values for {count} tensors")
    if op.noise:
        _check_stream(op, arguments["stream"], count)
    return count or 0, normalised


def _check_stream(op: Operation, stream: Any, count: int) -> None:
    from ..noise import NoiseStream

    if not isinstance(stream, NoiseStream):
        raise TypeError(f"{op.name}: stream must be a sam_kernels.noise.NoiseStream, got {type(stream).__name__}")
    seed, step = stream.seed, stream.step
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"{op.name}: stream.seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{op.name}: stream.step must be an int >= 0, got {step!r}")
    for name in ("tensor_indices", "element_offsets"):
        values = getattr(stream, name)
        if values is not None and len(values) != count:
            raise ValueError(f"{op.name}: stream.{name} has {len(values)} values for {count} tensors")
    bad = [j for j in stream.tensor_indices if not 0 <= j < 2**32]
    if bad:
        raise ValueError(f"{op.name}: stream.tensor_indices must be in [0, 2**32), got {bad[0]!r}")
    if any(e < 0 for e in stream.offsets):
        raise ValueError(f"{op.name}: stream.element_offsets must be >= 0")


_shape = operator.attrgetter("shape")
_device = operator.attrgetter("device")


def _check_elementwise(op: Operation, lists: dict[str, Any]) -> None:
    """Every tensor at position k of the lists has the shape and device of the first list's (the weights')."""
    first, *others = op.tensor_lists
    shapes, devices = list(map(_shape, lists[first])), list(map(_device, lists[first]))
    others = [name for name in others  # the common case in C-level maps; the loop below names the culprit
              if list(map(_shape, lists[name])) != shapes or list(map(_device, lists[name])) != devices]
    for name in others:
        for k, (weight, other) in enumerate(zip(lists[first], lists[name])):
            if other.shape != weight.shape or other.device != weight.device:
                raise ValueError(
                    f"{op.name}: {name}[{k}] has shape {tuple(other.shape)} on {other.device}, "
                    f"{first}[{k}] has shape {tuple(weight.shape)} on {weight.device}"
                )


def _bump_versions(tensors: list[Tensor]) -> None:
    """Tell autograd the tensors were written in place (kernels writing through pointers do not)."""
    tracked = [t for t in tensors if not t.is_inference()]
    if tracked:
        torch.autograd.graph.increment_version(tracked)


def implementation(impl: Any, op: Operation, device: torch.device):
    """The function running ``op`` for ``impl``: its own, or the fallback backend's."""
    fn = getattr(impl, op.name, None)
    if fn is not None:
        return fn
    from . import foreach, reference

    fallback = foreach if foreach.supports(device) else reference
    return getattr(fallback, op.name)


def call(name: str, backend: str, arguments: dict[str, Any]):
    """Run operation ``name`` on ``backend`` (``auto``: the best for the tensors' device)."""
    from . import resolve_backend

    op = OPERATIONS[name]
    count, args = check_arguments(op, arguments)
    device = device_of(*(args[k] for k in op.tensor_lists), what=op.name)
    impl = resolve_backend(backend, device)
    if count == 0:
        return _empty_result(op, device)
    fn = implementation(impl, op, device)
    positional = [args[k] for k in op.tensor_lists] + [args[k] for k in op.device_scalars]
    keywords = {k: args[k] for k in op.per_tensor_floats}
    if op.noise:
        keywords["stream"] = arguments["stream"]
    keywords.update({k: arguments[k] for k in op.options})
    result = fn(*positional, **keywords)
    for name in op.writes:
        _bump_versions(args[name])
    return result


def _empty_result(op: Operation, device: torch.device):
    if op.returns == "sum":
        return torch.zeros((), dtype=torch.float32, device=device)
    if op.returns in ("sums3", "sums4"):
        return torch.zeros(int(op.returns[-1]), dtype=torch.float32, device=device)
    if op.returns == "per tensor":
        return []
    return None


def missing(impl: Any) -> list[str]:
    """The operations a backend object leaves to the fallback."""
    return [name for name in OPERATIONS if getattr(impl, name, None) is None]


__all__ = ["Operation", "OPERATIONS", "call", "check_arguments", "implementation", "missing", "device_of"]
