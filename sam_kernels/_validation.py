"""Early, descriptive checks of hyperparameters and gradients (host-side only, no sync)."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch

from .backends import backend_names


def check_non_negative(name: str, value, owner: str = "") -> float:
    where = f" in {owner}" if owner else ""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be a finite number >= 0)")
    return float(value)


def check_p(p) -> float:
    if p not in (2, float("inf")):
        raise ValueError(f"Invalid p: {p!r} (ASAM supports p = 2 or p = float('inf'))")
    return float(p)


def check_granularity(granularity) -> str:
    if granularity not in ("element", "filter"):
        raise ValueError(f"Invalid granularity: {granularity!r} (must be 'element' or 'filter')")
    return granularity


def check_backend(backend) -> str:
    names = backend_names()
    if backend not in names:
        raise ValueError(f"Invalid backend: {backend!r} (must be one of {', '.join(names)})")
    return backend


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"Invalid seed: {seed!r} (must be an int in [0, 2**64))")
    return seed


def param_of(item):
    """The tensor of a params entry: a tensor, or a (name, tensor) pair of ``named_parameters()``."""
    return item[1] if isinstance(item, tuple) else item


def check_param_groups(groups: list[dict], owner: str, *, taken: set[int] | None = None) -> None:
    """No parameter listed twice (in one group or across groups) and none complex.

    A parameter listed twice would be perturbed twice and restored once; complex
    weights have no ε defined here (torch.optim treats them as real pairs, these
    optimizers do not). ``taken``: ids of params already in the optimizer.
    """
    seen: dict[int, tuple[int, int]] = {}
    for g, group in enumerate(groups):
        params = group["params"]
        for k, item in enumerate([params] if isinstance(params, torch.Tensor) else params):
            param = param_of(item)
            where = f"param_groups[{g}]['params'][{k}]"
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but {where} is a {type(param).__name__}")
            if id(param) in seen or (taken is not None and id(param) in taken):
                first = seen.get(id(param))
                also = f" (also param_groups[{first[0]}]['params'][{first[1]}])" if first else " (already added)"
                raise ValueError(
                    f"{owner}: {where} appears more than once{also}; each weight is perturbed and restored once "
                    "per step, so list every parameter once"
                )
            seen[id(param)] = (g, k)
            check_real(param, where, owner)


def check_real(param: torch.Tensor, where: str, owner: str) -> None:
    if param.is_complex():
        raise ValueError(
            f"{owner}: {where} is complex ({param.dtype}); complex parameters are unsupported "
            "(view them as real pairs with torch.view_as_real and optimize those)"
        )


def check_gradients(params: list[torch.Tensor], name_of: Callable[[int], str], owner: str) -> None:
    """Sparse gradients, gradients that do not match their weight, and mixed devices.

    torch refuses to assign a .grad of another shape or device, but a weight
    replaced afterwards (``p.data = ...``) keeps its old gradient.
    """
    devices = set()
    for i, param in enumerate(params):
        grad = param.grad
        if param.is_complex() or grad.is_complex():
            check_real(param if param.is_complex() else grad, name_of(i), owner)
        if grad.is_sparse:
            raise RuntimeError(f"{owner} does not support sparse gradients ({name_of(i)})")
        if grad.shape != param.shape or grad.device != param.device:
            raise ValueError(
                f"{owner}: the gradient of {name_of(i)} has shape {tuple(grad.shape)} on {grad.device}, its weight "
                f"{tuple(param.shape)} on {param.device} (was the weight replaced after the backward?)"
            )
        devices.add(param.device)
    check_single_device(devices, owner)


def check_single_device(devices: set, owner: str) -> None:
    if len(devices) > 1:
        raise RuntimeError(
            f"{owner} needs all parameters on one device (global norms span every parameter); "
            f"got {sorted(str(d) for d in devices)}"
        )


def check_memory(tensors: list[torch.Tensor], name_of: Callable[[int], str], owner: str) -> None:
    """No weight with elements sharing memory (an expanded view), none overlapping another weight's memory.

    A step writes every element of every weight and restores it from its saved
    copy; shared memory would make both ill-defined (docs/DESIGN.md §7).
    """
    spans = []
    for i, tensor in enumerate(tensors):
        if tensor.numel() == 0:
            continue
        if torch._debug_has_internal_overlap(tensor) == 1:  # 1: MemOverlap::Yes (0: no, 2: too hard to tell)
            raise ValueError(
                f"{owner}: {name_of(i)} has elements that share memory (strides {tensor.stride()}, e.g. an "
                "expanded view): its weights cannot be perturbed and restored one by one"
            )
        extent = sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
        start = tensor.data_ptr()
        spans.append((tensor.untyped_storage().data_ptr(), start, start + (extent + 1) * tensor.element_size(), i))
    spans.sort()
    for (storage_a, _, end_a, i), (storage_b, start_b, _, j) in zip(spans, spans[1:]):
        if storage_a == storage_b and start_b < end_a:
            raise ValueError(
                f"{owner}: {name_of(i)} and {name_of(j)} overlap in memory (views of one storage): "
                "a step would perturb and restore the shared elements twice"
            )
