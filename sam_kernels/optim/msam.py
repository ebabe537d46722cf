"""Momentum-SAM (Becker et al. 2024, arXiv:2401.12033): SAM's perturbation along the momentum, one pass per step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import functional as F
from . import fused_base, hooks
from .amp import unscale_for_grad_scaler
from .base import SharpnessAwareOptimizer
from .plan import StepPlan

# The base optimizers MSAM knows the momentum of, and the state key that holds it.
_MOMENTUM_KEY = {torch.optim.SGD: "momentum_buffer", torch.optim.Adam: "exp_avg", torch.optim.AdamW: "exp_avg"}


class MSAM(SharpnessAwareOptimizer):
    r"""Momentum-SAM: the ascent direction is the base optimizer's momentum, so a step takes one
    forward/backward, and the weights live at the perturbed point between steps.

    With v the momentum (SGD's ``momentum_buffer``, Adam/AdamW's ``exp_avg``) and
    ŵ = w − c_G · v the weights the model holds between steps, one :meth:`step`
    (after the backward at ŵ put g = ∇L(ŵ) in ``.grad``) is

    1. w ← ŵ + c_G · v            (undo the last perturbation; c_G = 0 before the first step)
    2. the base optimizer's step at w with g (v and w updated as torch computes them)
    3. c_G ← ρ_G / (‖v‖₂ + 1e-12), ‖v‖ over every param with a momentum;  ŵ ← w − c_G · v

    ``rho`` may differ per param group (the norm is global). The base optimizer's
    weight decay acts at w, as in SAM's base step; the authors' SGD code adds it
    to the gradient at ŵ instead (a difference of order weight_decay · ρ).
    The weights are never put back by subtraction for evaluation:
    :meth:`unperturbed` moves them to w and restores ŵ bit for bit afterwards.
    No host synchronisation; with ``GradScaler.step(opt)`` the overflow check
    reads one flag, as the scaler does.

    Args:
        params: parameters or param-group dicts (``rho`` may be set per group).
        base_optimizer: ``torch.optim.SGD`` (with momentum > 0), ``Adam`` or ``AdamW``
            (a class and its ``**base_kwargs``, or an instance over the same params).
        rho: radius ρ of the perturbation (≥ 0); the paper uses larger values than SAM's
            (e.g. 0.3 for SGD on CIFAR, 1–3 for AdamW).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.3,
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, {"rho": rho}, backend=backend, **base_kwargs)
        if self._schedule.needs_gradient or not self._schedule.due(1):
            raise ValueError("MSAM takes one pass on every step: it has no schedule= (it is already the cheap step)")
        kind = next((cls for cls in _MOMENTUM_KEY if isinstance(self.base_optimizer, cls)), None)
        if kind is None:
            raise TypeError(
                f"MSAM needs the momentum of torch.optim.SGD, Adam or AdamW; got {type(self.base_optimizer).__name__}"
            )
        self._momentum_key = _MOMENTUM_KEY[kind]
        self._check_momentum()
        # The perturbation the weights carry now: which params (plan positions) and c_G per group.
        self._moved: list[int] = []
        self._coefs: Tensor | None = None
        self._evaluating = False

    def _check_momentum(self) -> None:
        if self._momentum_key == "momentum_buffer":
            for g, group in enumerate(self.param_groups):
                if not group.get("momentum", 0) > 0:
                    raise ValueError(
                        f"MSAM perturbs along SGD's momentum: param_groups[{g}] has momentum="
                        f"{group.get('momentum')!r}; give SGD a momentum > 0"
                    )

    # ------------------------------------------------------------ the step
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One MSAM step with the gradient now in ``.grad`` (taken at ŵ); ``closure``, if given, is called
        once first (under grad mode) to compute it, as with any torch optimizer."""
        if self._evaluating:
            raise RuntimeError("MSAM.step() called inside unperturbed(); leave the context first")
        args, kwargs = hooks.fire_pre_hooks(self, (self, closure), {})
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        self._check_momentum()
        plan = self._plan()
        if plan.sharded:
            raise NotImplementedError("MSAM does not support sharded (DTensor) parameters yet")
        runs = unscale_for_grad_scaler(self)  # a GradScaler called step(): unscaled, and False on overflow
        if not (runs and self._fused_step(plan)):
            self._shift(plan, +1)  # w ← ŵ + c·v
            self._moved, self._coefs = [], None
            if runs:
                with hooks.global_hooks_silenced():
                    self.base_optimizer.step()
            self._perturb(plan)  # ŵ ← w − c·v, with the new v
        self._opt_called = True
        hooks.fire_post_hooks(self, args, kwargs)
        return loss

    def _fused_step(self, plan) -> bool:
        """Steps 1 and 2 in one pass per dtype bucket (``msam_sgd_``: the undo, SGD's update and Σ v²), then
        step 3's shift; False (nothing touched) where the configuration does not fuse (docs/DESIGN.md §2.10)."""
        if self._momentum_key != "momentum_buffer":
            return False
        device = StepPlan.device_of(self.param_groups)
        if fused_base.why_not_fused(self, device, operation="msam_sgd_") is not None:
            return False
        state, groups = self.base_optimizer.state, self.param_groups
        moved = set(self._moved)
        zero = self._no_shift(device)
        per_group = list(self._coefs.unbind()) if self._coefs is not None else []
        rounded: dict = {}  # c as the unfused shift applies it: rounded to the param's dtype first
        indices, params, grads, momenta, shifts, fresh, owners = [], [], [], [], [], [], []
        for i, param in enumerate(plan.params):
            entry = state.get(param)
            buffer = entry.get("momentum_buffer") if entry else None
            grad = param.grad
            if grad is None:
                if buffer is not None or i in moved:
                    return False  # a momentum that this step does not update: the general path
                continue
            if buffer is not None and buffer.shape != grad.shape:
                return False
            indices.append(i)
            params.append(param)
            grads.append(grad)
            owners.append(groups[plan.group_of[i]])
            if i in moved:
                key = (plan.group_of[i], param.dtype)
                shift = rounded.get(key)
                if shift is None:
                    shift = rounded[key] = per_group[key[0]].to(param.dtype).to(torch.float64)
                shifts.append(shift)
            else:
                shifts.append(zero)
            fresh.append(0.0 if buffer is not None else 1.0)
            momenta.append(buffer)
        if not params:
            return False
        for k, param in enumerate(params):
            if momenta[k] is None:  # torch creates the buffer in the step (m = d): the pass writes it
                momenta[k] = state[param]["momentum_buffer"] = torch.empty_like(
                    grads[k], memory_format=torch.preserve_format)
        with torch.no_grad():
            sq_sum = F.msam_sgd_(
                params, grads, momenta, shifts, [self._no_skip(device)] * len(params),
                lrs=[g["lr"] for g in owners], weight_decays=[g["weight_decay"] for g in owners],
                momentums=[g["momentum"] for g in owners], dampenings=[g["dampening"] for g in owners],
                nesterovs=[float(g["nesterov"]) for g in owners], maximizes=[float(g["maximize"]) for g in owners],
                fresh=fresh, backend=self._backend)
        self.base_optimizer._opt_called = True
        norm = sq_sum.to(torch.float64).sqrt()
        rhos = torch.tensor(self._group_values("rho"), dtype=torch.float64, device=device)
        coefs = rhos / (norm + 1e-12)
        self._coefs = torch.where(torch.isfinite(coefs), coefs, torch.zeros_like(coefs))
        self._moved = indices
        self._shift(plan, -1)
        return True

    def _why_not_fused(self) -> str | None:
        """Why MSAM's undo and base step do not run as one pass now (None: they do; see ``base_step_fused``)."""
        if self._momentum_key != "momentum_buffer":
            return "MSAM fuses its step with SGD only (Adam/AdamW: the shift, torch's step and the shift)"
        return fused_base.why_not_fused(self, StepPlan.device_of(self.param_groups), operation="msam_sgd_")

    def _no_shift(self, device: torch.device) -> Tensor:
        cached = getattr(self, "_zero_shift", None)
        if cached is None or cached.device != device:
            cached = self._zero_shift = torch.zeros((), dtype=torch.float64, device=device)
        return cached

    def _momenta(self, plan) -> tuple[list[int], list[Tensor]]:
        state, key = self.state, self._momentum_key
        indices = [i for i, p in enumerate(plan.params) if key in state.get(p, ())]
        return indices, [state[plan.params[i]][key] for i in indices]

    def _shift(self, plan, sign: int) -> None:
        """w ← w + sign · c_G · v over the params the perturbation was applied to (v: their momentum)."""
        if not self._moved:
            return
        key, state = self._momentum_key, self.state
        by_group: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        for i in self._moved:
            param = plan.params[i]
            params, momenta = by_group.setdefault(plan.group_of[i], ([], []))
            params.append(param)
            momenta.append(state[param][key])
        for g, (params, momenta) in by_group.items():
            # w ± c·v in one pass per tensor, c a 0-d device tensor (no temporaries, no host read); foreach
            # takes per-tensor broadcasting through its per-tensor path.
            coef = self._coefs[g].to(momenta[0].dtype)
            torch._foreach_addcmul_(params, momenta, [coef] * len(params), value=sign)

    def _perturb(self, plan) -> None:
        """c_G ← ρ_G / (‖v‖ + 1e-12) (0 if not finite), ŵ ← w − c_G · v."""
        state, key = self.state, self._momentum_key
        indices = [i for i, p in enumerate(plan.params) if key in state.get(p, ())]
        if not indices:
            return
        momenta = [state[plan.params[i]][key] for i in indices]
        device = momenta[0].device
        norm = torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in torch._foreach_norm(momenta)]))
        rhos = torch.tensor(self._group_values("rho"), dtype=torch.float64, device=device)
        coefs = rhos / (norm + 1e-12)
        self._coefs = torch.where(torch.isfinite(coefs), coefs, torch.zeros_like(coefs))
        self._moved = indices
        self._shift(plan, -1)

    # ------------------------------------------------------------ evaluation at w
    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """The weights at the unperturbed point w = ŵ + c·v inside the block (evaluate, save inference
        weights); ŵ is put back exactly (from a copy) when it ends."""
        plan = self._plan()
        params = [plan.params[i] for i in self._moved]
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            self._shift(plan, +1)
        self._evaluating = True
        try:
            yield
        finally:
            self._evaluating = False
            if params:
                with torch.no_grad():
                    torch._foreach_copy_(params, saved)

    # ------------------------------------------------------------ what MSAM does not have
    def first_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("MSAM takes one forward/backward per step: call step() after the backward")

    # ------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        coefs = None if self._coefs is None else self._coefs.detach().cpu()
        return {**super()._extra_state(), "moved": list(self._moved), "coefs": coefs}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._moved = [int(i) for i in extra.get("moved", [])]
        coefs = extra.get("coefs")
        if coefs is None or not self._moved:
            self._coefs, self._moved = None, []
            return
        plan = self._plan()
        device = plan.params[self._moved[0]].device
        self._coefs = torch.as_tensor(coefs, dtype=torch.float64).to(device)

