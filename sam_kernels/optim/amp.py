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


def scaler_step(optimizer: "SharpnessAwareOptimizer", scaler: "torch.amp.GradScaler"):
    """``scaler.step(optimizer.base_optimizer)``, also skipped when the first pass overflowed."""
    base = optimizer.base_optimizer
    if not scaler.is_enabled():
        return base.step()
    if _stage_name(scaler, optimizer) == "UNSCALED":
        raise RuntimeError(
            "scaler.unscale_() was applied to the SAM wrapper: its gradients would be unscaled twice. "
            "Apply it to the base optimizer instead: scaler.unscale_(opt.base_optimizer)"
        )
    if _stage_name(scaler, base) != "UNSCALED":
        scaler.unscale_(base)
    first_pass_overflow = optimizer.found_nonfinite
    if first_pass_overflow is not None:
        for found_inf in scaler._per_optimizer_states[id(base)]["found_inf_per_device"].values():
            found_inf.add_(first_pass_overflow.to(device=found_inf.device, dtype=found_inf.dtype))
    return scaler.step(base)


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
    grad_scale = optimizer.__dict__.get("grad_scale")
    if grad_scale is not None:
        inv_scale = grad_scale.double().reciprocal().float()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in grads:
            by_device.setdefault(grad.device, []).append(grad)
        for device, same_device in by_device.items():
            torch._foreach_mul_(same_device, inv_scale.to(device))
    overflow = found_inf.float().sum()
    if optimizer.found_nonfinite is not None:
        overflow = overflow + optimizer.found_nonfinite.to(overflow.device, overflow.dtype)
    return not bool(overflow)
