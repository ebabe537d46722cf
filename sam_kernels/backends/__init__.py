"""Backend registry.

A backend is a module (or any object) with ``available() -> (bool, reason)``,
``supports(device) -> bool`` and any subset of the list operations declared
in :mod:`sam_kernels.backends.operations` (``filter_norms``,
``scaled_grad_sq_sum``, ``perturb_``, ``restore_``, ``add_noise_``,
``noise_grad_sums``, ``mix_perturb_``; their math is in docs/DESIGN.md
§2–§3). An operation it lacks runs on ``foreach``. Optionally it offers
``make_plan(params, group_of, num_groups, skip_flag, skip_count)``: a
whole-step plan object (see sam_kernels/optim/plan.py; ``cpp`` has one).

Every backend must give the same results as ``reference`` (up to float
rounding); the optimizer classes never know which backend runs.
:func:`register_backend` makes any object selectable as ``backend=name`` in
the optimizers and the functional layer; ``priority`` ranks it per device
type for ``backend="auto"``. The optional built-in backends (``triton``,
``cuda``, ``cpp``) register themselves from the modules named in
:data:`_OPTIONAL_MODULES` on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "register_backend", "unregister_backend", "get_backend", "resolve_backend", "available_backends",
    "backend_names", "BACKEND_NAMES",
]


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


def register_backend(name: str, impl: Any, *, priority: dict[str, int] | None = None) -> None:
    """Make ``impl`` selectable as ``backend=name`` everywhere; ``priority`` ranks it for ``auto`` per device type.

    ``impl`` needs ``available()`` and ``supports(device)`` and implements any
    subset of the operations (the rest run on ``foreach``). Without
    ``priority`` it is never picked by ``auto``.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"Invalid backend name: {name!r} (a non-empty string other than 'auto')")
    for method in ("available", "supports"):
        if not callable(getattr(impl, method, None)):
            raise TypeError(f"backend {name!r} must have a callable {method}() (got {impl!r})")
    _REGISTRY[name] = _Entry(name, impl, dict(priority or {}))


def unregister_backend(name: str) -> None:
    """Forget a backend registered with :func:`register_backend` (built-in ones included)."""
    _REGISTRY.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """Every name ``backend=`` accepts: ``auto``, the built-in ones and every registered one."""
    _discover()
    return BACKEND_NAMES + tuple(name for name in _REGISTRY if name not in BACKEND_NAMES)


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
    for name in backend_names()[1:]:
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
        known = ", ".join(backend_names())
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
