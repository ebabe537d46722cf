"""The fused second step: restore + the base optimizer's update in one pass (docs/DESIGN.md §2.11).

Unfused, ``second_step()`` copies the saved weights back (read saved, write
w) and the base optimizer then reads w again. When the base optimizer is
exactly ``torch.optim.SGD``, ``Adam`` or ``AdamW`` and the backend has the
fused operations, one pass reads the saved weights, the gradient and the
optimizer state and writes w and the state: torch's update, taken from the
saved weights. The state lives where torch keeps it (``momentum_buffer``,
``step``/``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` in the base
optimizer's ``state``, created as torch creates it), hyperparameters are read
from ``param_groups`` at every step, so schedulers, checkpoints and a later
unfused step all see the same thing.

:func:`why_not_fused` says why a configuration does not fuse (None when it
does); :func:`fused_second_step` runs the pass.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from .. import functional as F
from ..backends import resolve_backend

if TYPE_CHECKING:  # pragma: no cover
    from .base import ParamSelection, SharpnessAwareOptimizer

_grad = operator.attrgetter("grad")
# The base optimizers the fused pass implements: exactly these classes (a subclass may change the math).
FUSED_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}
_OPERATION = {"sgd": "restore_sgd_", "adam": "restore_adam_"}


def _has_own_step_hooks(base: torch.optim.Optimizer) -> bool:
    return bool(getattr(base, "_optimizer_step_pre_hooks", None) or getattr(base, "_optimizer_step_post_hooks", None))


def _group_reason(kind: str, group: dict) -> str | None:
    if group.get("differentiable"):
        return "differentiable=True"
    if isinstance(group.get("lr"), Tensor):
        return "a Tensor learning rate"
    if kind == "adam":
        if group.get("capturable") or group.get("fused"):
            return "capturable=True or fused=True (the step count lives on the device)"
        if any(isinstance(beta, Tensor) for beta in group.get("betas", ())):
            return "Tensor betas"
    return None


def why_not_fused(opt: "SharpnessAwareOptimizer", device: torch.device | None,
                  operation: str | None = None) -> str | None:
    """None when ``opt``'s second step fuses on ``device``; else the reason it restores and calls the base step.
    ``operation``: the fused operation the caller needs (default: the base optimizer's restore_*_)."""
    if not opt._fuse_base_step:
        return "fuse_base_step=False"
    if not type(opt)._fusable_base_step:
        return f"{type(opt).__name__} changes the base step"
    base = opt.base_optimizer
    kind = FUSED_KINDS.get(type(base))
    if kind is None:
        return f"the base optimizer is {type(base).__name__}, not exactly torch.optim.SGD, Adam or AdamW"
    if _has_own_step_hooks(base):
        return "the base optimizer has step hooks of its own"
    for group in opt.param_groups:
        reason = _group_reason(kind, group)
        if reason is not None:
            return reason
    if device is None:
        return "the params are on several devices, or are DTensors, or there are none"
    try:
        impl = resolve_backend(opt._backend, device)
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    operation = operation or _OPERATION[kind]
    if not getattr(impl, "FUSES_BASE_STEP", False) or getattr(impl, operation, None) is None:
        return f"backend {getattr(impl, 'NAME', impl)!r} has no fused {kind.upper()} step ({operation})"
    return None


def fused_kind(opt: "SharpnessAwareOptimizer") -> str:
    return FUSED_KINDS[type(opt.base_optimizer)]


def fused_second_step(opt: "SharpnessAwareOptimizer", selection: "ParamSelection", saved: list[Tensor],
                      skip: Tensor | None) -> None:
    """w ← saved, then the base step, in one pass over ``selection`` (the params that were perturbed).

    ``skip``: a 0-d bool device tensor (an overflow found by GradScaler, or in the first pass under one),
    or None. Params with a gradient that were not perturbed (none, unless a param gained a gradient after
    first_step()) take the same update from their current weights.
    """
    base = opt.base_optimizer
    params, groups, tensors, saved_now = selection.params, selection.groups, selection.tensors, list(saved)
    grads = list(map(_grad, params))
    no_grad_tensors, no_grad_saved = [], []
    if any(g is None for g in grads):  # lost its gradient since first_step(): only restored, as the base step skips it
        keep = [g is not None for g in grads]
        no_grad_tensors = [t for t, k in zip(tensors, keep) if not k]
        no_grad_saved = [s for s, k in zip(saved_now, keep) if not k]
        params, groups, tensors, saved_now, grads = (
            [x for x, k in zip(items, keep) if k] for items in (params, groups, tensors, saved_now, grads))
    else:
        params, groups, tensors = list(params), list(groups), list(tensors)
    with_grad = [(p, group) for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if len(with_grad) != len(params):  # a param that gained its gradient after first_step(): stepped from w
        perturbed = set(map(id, params))
        for param, group in with_grad:
            if id(param) not in perturbed:
                params.append(param)
                groups.append(group)
                tensors.append(param)
                saved_now.append(param)
                grads.append(param.grad)
    if no_grad_tensors:
        F.restore_(no_grad_tensors, no_grad_saved, backend=opt._backend)
    if not tensors:
        return
    skips = [skip if skip is not None else opt._no_skip(tensors[0].device)] * len(tensors)
    if fused_kind(opt) == "sgd":
        _sgd(opt, base, params, groups, tensors, saved_now, grads, skips, skip)
    else:
        _adam(opt, base, params, groups, tensors, saved_now, grads, skips, skip)


def _sgd(opt, base, params, groups, tensors, saved, grads, skips, skip) -> None:
    momenta, fresh, created = [], [], []
    for param, group, grad in zip(params, groups, grads):
        if group["momentum"] == 0:
            momenta.append(grad)  # not read: a placeholder of the right shape
            fresh.append(0.0)
            continue
        state = base.state.get(param)  # (base.state is a defaultdict: no entry is made for a lookup)
        buffer = None if state is None else state.get("momentum_buffer")
        if buffer is None or buffer.shape != grad.shape:
            buffer = base.state[param]["momentum_buffer"] = torch.empty_like(grad, memory_format=torch.preserve_format)
            fresh.append(1.0)
            created.append(param)
        else:
            fresh.append(0.0)
        momenta.append(buffer)
    F.restore_sgd_(
        tensors, saved, grads, momenta, skips,
        lrs=[g["lr"] for g in groups], weight_decays=[g["weight_decay"] for g in groups],
        momentums=[g["momentum"] for g in groups], dampenings=[g["dampening"] for g in groups],
        nesterovs=[float(g["nesterov"]) for g in groups], maximizes=[float(g["maximize"]) for g in groups],
        fresh=fresh, backend=opt._backend,
    )
    # torch creates a momentum buffer only in a step that runs: after a skipped first step (an overflow
    # under GradScaler) there is none. Only then is the flag read (the first steps, once per buffer).
    if created and skip is not None and bool(skip):
        for param in created:
            del base.state[param]["momentum_buffer"]
            if not base.state[param]:
                del base.state[param]


def _adam(opt, base, params, groups, tensors, saved, grads, skips, skip) -> None:
    # The step count lives on the host, as torch keeps it (capturable=False): a step skipped for an
    # overflow does not count, so its flag is read here (GradScaler.step reads it for torch's Adam too).
    skipped = skip is not None and bool(skip)
    if skipped:  # torch's step would not run: no state is created, no count moves; the weights go back
        F.restore_(tensors, saved, backend=opt._backend)
        return
    exp_avgs, exp_avg_sqs, maxes, step_sizes, bc2_sqrts = [], [], [], [], []
    for param, group in zip(params, groups):
        state = base.state[param]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        step = float(state["step"]) + 1  # a CPU tensor: no device to wait for; counted once the pass ran
        beta1, beta2 = group["betas"]
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        maxes.append(state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"])
        step_sizes.append(group["lr"] / (1 - beta1**step))
        bc2_sqrts.append((1 - beta2**step) ** 0.5)
    F.restore_adam_(
        tensors, saved, grads, exp_avgs, exp_avg_sqs, maxes, skips,
        lrs=[g["lr"] for g in groups], beta1s=[g["betas"][0] for g in groups],
        beta2s=[g["betas"][1] for g in groups], epss=[g["eps"] for g in groups],
        weight_decays=[g["weight_decay"] for g in groups],
        decoupled=[float(g.get("decoupled_weight_decay", False)) for g in groups],
        amsgrads=[float(g["amsgrad"]) for g in groups], maximizes=[float(g["maximize"]) for g in groups],
        step_sizes=step_sizes, bias_correction2_sqrts=bc2_sqrts, backend=opt._backend,
    )
    for param in params:
        base.state[param]["step"] += 1

