"""Mixed precision: the base step through a ``torch.amp.GradScaler``.

SAM, ASAM and R-SAM perturbations are invariant to the gradient scale (each
direction is normalised), so ``first_step()`` works on the scaled gradients as
they are and never unscales them. The base step goes through the scaler,
which unscales once and skips the step on overflow; an overflow in the *first*
pass (the optimizer's device flag ``found_nonfinite``) is added to the
scaler's own overflow record, so that step is skipped as well and the scale is
lowered, without a host synchronisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .base import SharpnessAwareOptimizer


def _stage_name(scaler, optimizer) -> str | None:
    # GradScaler keeps one record per optimizer object; its stage says whether
    # unscale_() already ran since the last update().
    states = getattr(scaler, "_per_optimizer_states", {})
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    return getattr(state.get("stage"), "name", None) if state else None


def _unscale_through(optimizer: "SharpnessAwareOptimizer", scaler: "torch.amp.GradScaler") -> list[torch.Tensor]:
    """Unscale the base optimizer's gradients once and add a first-pass overflow to the scaler's record;
    the scaler's per-device overflow flags."""
    base = optimizer.base_optimizer
    if _stage_name(scaler, optimizer) == "UNSCALED":
        raise RuntimeError(
            "scaler.unscale_() was applied to the SAM wrapper: its gradients would be unscaled twice. "
            "Apply it to the base optimizer instead: scaler.unscale_(opt.base_optimizer)"
        )
    if _stage_name(scaler, base) != "UNSCALED":
        scaler.unscale_(base)
    flags = list(scaler._per_optimizer_states[id(base)]["found_inf_per_device"].values())
    first_pass_overflow = optimizer.found_nonfinite
    if first_pass_overflow is not None:
        for found_inf in flags:
            found_inf.add_(first_pass_overflow.to(device=found_inf.device, dtype=found_inf.dtype))
    return flags


def scaler_step(optimizer: "SharpnessAwareOptimizer", scaler: "torch.amp.GradScaler"):
    """``scaler.step(optimizer.base_optimizer)``, also skipped when the first pass overflowed."""
    base = optimizer.base_optimizer
    if not scaler.is_enabled():
        return base.step()
    _unscale_through(optimizer, scaler)
    return scaler.step(base)


def scaler_skip_flag(optimizer: "SharpnessAwareOptimizer", scaler: "torch.amp.GradScaler",
                     device: torch.device) -> torch.Tensor | None:
    """For a base step the optimizer runs itself (the fused second step): unscale as :func:`scaler_step`
    does and return the overflow as a 0-d bool tensor on ``device`` — no host read — or None without
    a scaler. Call :func:`mark_stepped` after the step."""
    if not scaler.is_enabled():
        return None
    flags = _unscale_through(optimizer, scaler)
    if not flags:  # no gradient at all: GradScaler.step would refuse; nothing overflowed
        return None
    total = flags[0].to(device)
    for flag in flags[1:]:
        total = total + flag.to(device)
    return total > 0


def mark_stepped(optimizer: "SharpnessAwareOptimizer", scaler: "torch.amp.GradScaler") -> None:
    """Record in the scaler that the base optimizer stepped, as ``scaler.step`` does (``update()`` reads it)."""
    if scaler.is_enabled():
        from torch.amp.grad_scaler import OptState

        scaler._per_optimizer_states[id(optimizer.base_optimizer)]["stage"] = OptState.STEPPED


def called_by_grad_scaler_skip_flag(optimizer: "SharpnessAwareOptimizer") -> torch.Tensor | None:
    """:func:`unscale_for_grad_scaler` without the host read: the gradients unscaled when the scaler left
    them scaled, and the overflow of either pass as a 0-d bool device tensor (None when no GradScaler
    called ``step()``)."""
    found_inf = optimizer.__dict__.get("found_inf")
    if found_inf is None:
        return None
    _unscale_grads(optimizer)
    overflow = found_inf.float().sum()
    if optimizer.found_nonfinite is not None:
        overflow = overflow + optimizer.found_nonfinite.to(overflow.device, overflow.dtype)
    return overflow > 0


def _unscale_grads(optimizer: "SharpnessAwareOptimizer") -> None:
    grad_scale = optimizer.__dict__.get("grad_scale")
    if grad_scale is None:
        return
    inv_scale = grad_scale.double().reciprocal().float()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    for device, same_device in by_device.items():
        torch._foreach_mul_(same_device, inv_scale.to(device))


def unscale_for_grad_scaler(optimizer: "SharpnessAwareOptimizer") -> bool:
    """Whether the base step may run, when ``GradScaler.step(opt)`` is what called ``opt.step()``.

    The optimizers declare ``_step_supports_amp_scaling``, so ``GradScaler.step(opt)``
    (Lightning's ``precision="16-mixed"`` calls it) does not skip ``opt.step()`` on
    overflow — which would leave the weights perturbed — but calls it with
    ``opt.grad_scale`` (the scale still on the gradients, or None once unscaled)
    and ``opt.found_inf`` set. Here the gradients are unscaled and the base step is
    skipped on overflow in either pass. Reading the overflow flag synchronises
    with the device, as ``GradScaler.step`` itself does. Without those attributes
    (every other call) the base step runs.
    """
    found_inf = optimizer.__dict__.get("found_inf")
    if found_inf is None:
        return True
    _unscale_grads(optimizer)
    overflow = found_inf.float().sum()
    if optimizer.found_nonfinite is not None:
        overflow = overflow + optimizer.found_nonfinite.to(overflow.device, overflow.dtype)
    return not bool(overflow)
