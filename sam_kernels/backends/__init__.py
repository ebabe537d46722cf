"""Backend registry.

A backend is a module (or any object) that implements the small set of
list operations below on tensors of one device. Every backend must give the
same results as ``reference`` (up to float rounding); the optimizer classes
never know which backend runs.

Operations (all take Python lists of tensors of one device; per-tensor
hyperparameters are Python floats; ``scales``/coefficients are per-tensor
0-d device tensors so that no step ever synchronises with the host):

``filter_norms(tensors) -> list[Tensor]``
    ‖f_i‖₂ for every filter of a tensor with ndim ≥ 2 (shape ``[size(0)]``),
    ``|w|`` for ndim ≤ 1; float32 (float64 for float64 tensors).
``scaled_grad_sq_sum(params, grads, *, etas, adaptive) -> Tensor``
    Σ (t ⊙ g)² over every tensor, t as DESIGN.md §2 (``adaptive`` is None for
    SAM's t ≡ 1, ``"element"`` or ``"filter"``).
``perturb_(params, grads, saved, scales, *, etas, adaptive, p)``
    saved ← w; w ← w + ε with ε = scale · t² ⊙ g (p = 2) or
    ε = scale · t ⊙ sign(g) (p = ∞). Non-finite ε elements become 0.
``restore_(params, saved)``
    w ← saved, bit-exactly.
``add_noise_(params, saved, *, gammas, seed, tensor_indices, step, element_offsets=None)``
    saved ← w; w ← w + δ₀ (R-SAM's kernel-scaled Gaussian, DESIGN.md §2).
``noise_grad_sums(grads, saved, *, gammas, lams, seed, tensor_indices, step, element_offsets=None) -> Tensor[4]``
    (Σ δ₀², Σ g², Σ λ δ₀·g, Σ λ² g²), δ₀ regenerated from the saved weights.
``mix_perturb_(params, grads, saved, noise_coefs, grad_coefs, *, gammas, seed, tensor_indices, step, element_offsets=None)``
    w ← saved + a ⊙ δ₀ + b ⊙ g. Non-finite ε elements become 0.

``element_offsets`` gives the global index of each tensor's first element
when the tensors are dim-0 shards of bigger ones (FSDP): element e of the
shard draws element offset + e of the whole tensor's stream.

``available() -> (bool, str)`` says whether the backend can run here and, if
not, why. ``supports(device) -> bool`` says whether it handles tensors of
that device type.

New backends (``triton``, ``cuda``, ``cpp``) register themselves with
:func:`register_backend` from their own module; :data:`_OPTIONAL_MODULES`
names the modules tried on first use, so adding one touches no optimizer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

__all__ = ["register_backend", "get_backend", "resolve_backend", "available_backends", "BACKEND_NAMES"]


@dataclass
class _Entry:
    name: str
    impl: Any
    # Higher wins in backend="auto", per device type; absent = unsupported.
    priority: dict[str, int]


_REGISTRY: dict[str, _Entry] = {}
# Optional backends: name -> module that registers it when imported.
_OPTIONAL_MODULES: dict[str, str] = {
    "triton": "sam_kernels.backends.triton_backend",
    "cuda": "sam_kernels.backends.native",
    "cpp": "sam_kernels.backends.native",
}
_IMPORT_ERRORS: dict[str, str] = {}
_discovered = False

BACKEND_NAMES = ("auto", "reference", "foreach", "triton", "cuda", "cpp")


def register_backend(name: str, impl: Any, *, priority: dict[str, int]) -> None:
    """Make ``impl`` selectable as ``backend=name``; ``priority`` ranks it for ``auto`` per device type."""
    _REGISTRY[name] = _Entry(name, impl, dict(priority))


def mark_unavailable(name: str, reason: str) -> None:
    """Record why an optional backend is not registered (shown by :func:`available_backends`)."""
    _IMPORT_ERRORS[name] = reason


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for name, module in _OPTIONAL_MODULES.items():
        if name in _REGISTRY:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:  # optional dependency missing or not built
            _IMPORT_ERRORS[name] = f"{module} could not be imported ({exc})"


def available_backends() -> dict[str, str | None]:
    """Every known backend name mapped to None when usable here, else the reason it is not."""
    _discover()
    status: dict[str, str | None] = {}
    for name in BACKEND_NAMES[1:]:
        entry = _REGISTRY.get(name)
        if entry is None:
            status[name] = _IMPORT_ERRORS.get(name, "not registered")
            continue
        ok, reason = entry.impl.available()
        status[name] = None if ok else reason
    return status


def get_backend(name: str) -> Any:
    """The implementation registered as ``name`` (not ``auto``); raises if it cannot run here."""
    _discover()
    if name not in _REGISTRY:
        known = ", ".join(BACKEND_NAMES)
        reason = _IMPORT_ERRORS.get(name)
        detail = f": {reason}" if reason else f" (known backends: {known})"
        raise ValueError(f"backend {name!r} is not available{detail}")
    impl = _REGISTRY[name].impl
    ok, reason = impl.available()
    if not ok:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return impl


def resolve_backend(name: str, device: torch.device) -> Any:
    """The backend to use for tensors on ``device``: ``name`` itself, or the best one for ``auto``."""
    if name != "auto":
        impl = get_backend(name)
        if not impl.supports(device):
            raise RuntimeError(f"backend {name!r} does not support tensors on device {device}")
        return impl
    _discover()
    candidates = [
        entry
        for entry in _REGISTRY.values()
        if device.type in entry.priority and entry.impl.available()[0] and entry.impl.supports(device)
    ]
    if not candidates:
        raise RuntimeError(f"no sam_kernels backend supports tensors on device {device}")
    return max(candidates, key=lambda entry: entry.priority[device.type]).impl


def _register_builtin(module: ModuleType, priority: dict[str, int]) -> None:
    register_backend(module.NAME, module, priority=priority)


from . import foreach as _foreach  # noqa: E402
from . import reference as _reference  # noqa: E402

_register_builtin(_reference, {"cpu": 0, "cuda": 0, "mps": 0, "xpu": 0})
_register_builtin(_foreach, {"cpu": 10, "cuda": 10, "xpu": 10})
