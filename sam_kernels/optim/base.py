"""The step protocol shared by every sharpness-aware optimizer.

The step methods are excluded from torch.compile (``torch.compiler.disable``):
a compiled training step graph-breaks cleanly around them instead of tracing
host-side bookkeeping (phase, step counter) that would recompile every step.

A :class:`SharpnessAwareOptimizer` wraps a ``torch.optim`` base optimizer and
shares its ``param_groups`` (so LR schedulers, ``add_param_group`` and
per-group hyperparameters work as usual). It owns only what SAM adds: the
saved copy of the weights, the phase of the step (idle → perturbed → idle) and
the device-side flag of skipped (non-finite) perturbations. The per-step math
is in :mod:`sam_kernels.functional`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import operator

from .. import functional as F
from ..schedules import make_schedule
from .amp import (called_by_grad_scaler_skip_flag, mark_stepped, scaler_skip_flag, scaler_step,
                  unscale_for_grad_scaler)
from ..backends import resolve_backend
from ..batchnorm import frozen_running_stats
from . import fused_base, hooks
from .plan import StepPlan, structure_key
from .sharding import all_reduce_sum_, is_sharded, local, shard_of
from .._validation import (
    check_backend, check_gradients, check_memory, check_non_negative, check_param_groups, check_real,
    check_single_device, param_of,
)

_EXTRA_STATE_KEY = "sam_kernels"

_PHASE_TEXT = {
    "idle": "the weights are not perturbed",
    "noised": "the weights are at w + δ₀ (after noise_step())",
    "perturbed": "the weights are perturbed (after first_step())",
}


_shape, _dtype, _device = (operator.attrgetter(name) for name in ("shape", "dtype", "device"))


@dataclass
class ParamSelection:
    """The parameters taking part in a step, with what each needs, in the optimizer's stable order."""

    params: list[Tensor] = field(default_factory=list)
    # What the kernels work on: the params themselves, or their local shards (FSDP2).
    tensors: list[Tensor] = field(default_factory=list)
    # Global index of each tensor's first element (non-zero for shards), for the noise stream.
    element_offsets: list[int] = field(default_factory=list)
    # (group number, position in the group) of each param, for error messages.
    positions: list[tuple[int, int]] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    # Position of each param among *all* params of all groups, frozen ones too:
    # the tensor number j of the R-SAM noise stream.
    tensor_indices: list[int] = field(default_factory=list)

    # Process group over which global sums are all-reduced (sharded params), else None.
    group: object = None
    # The saved-copy buffers of `params`, looked up once per step (see _allocate_saved, _saved_now).
    saved: list[Tensor] | None = None
    # Whether any param is a DTensor (FSDP2): only then do gradients need their local shard taken.
    sharded: bool = False

    @property
    def grads(self) -> list[Tensor]:
        if not self.sharded:
            return [p.grad for p in self.params]
        return [local(p.grad) for p in self.params]

    def per_tensor(self, key: str) -> list[float]:
        return [group[key] for group in self.groups]

    def subset(self, keep: list[bool]) -> "ParamSelection":
        pick = lambda items: [x for x, k in zip(items, keep) if k]  # noqa: E731
        return ParamSelection(
            pick(self.params), pick(self.tensors), pick(self.element_offsets), pick(self.positions),
            pick(self.groups), pick(self.tensor_indices), self.group, sharded=self.sharded,
        )

    def all_reduce_(self, partial_sums: Tensor) -> Tensor:
        """Global sums from per-shard partial sums (no-op for unsharded params)."""
        return all_reduce_sum_(partial_sums, self.group)

    def name(self, i: int) -> str:
        group_number, param_number = self.positions[i]
        return f"param_groups[{group_number}]['params'][{param_number}]"

    @classmethod
    def of(cls, plan: StepPlan, param_groups: list[dict], indices: list[int]) -> "ParamSelection":
        """The selection of the plan's params at ``indices`` (unsharded params)."""
        params = [plan.params[i] for i in indices]
        return cls(
            params, [local(p) for p in params], [0] * len(indices), [plan.positions[i] for i in indices],
            [param_groups[plan.group_of[i]] for i in indices], list(indices), sharded=plan.sharded,
        )


class SharpnessAwareOptimizer(Optimizer):
    """Base class: wraps ``base_optimizer`` (a class plus its kwargs, or an instance over the same params)."""

    # GradScaler.step(opt) calls step() even on overflow, with grad_scale/found_inf set (amp.py).
    _step_supports_amp_scaling = True
    # Whether second_step() may restore and run the base step in one fused pass (fused_base.py). A subclass
    # whose _before_base_step reads the weights, or whose base step is not the base optimizer's, sets False.
    _fusable_base_step = True

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, float],
        *,
        backend: str = "auto",
        schedule: Any = None,
        fuse_base_step: bool = True,
        **base_kwargs: Any,
    ) -> None:
        self._backend = check_backend(backend)
        if not isinstance(fuse_base_step, bool):
            raise TypeError(f"fuse_base_step must be a bool, got {fuse_base_step!r}")
        self._fuse_base_step = fuse_base_step
        self._no_skips: dict[torch.device, Tensor] = {}
        self._schedule = make_schedule(schedule)
        self._schedule_step = 0  # t: steps completed, SAM or plain
        self._decision: bool | None = None  # whether the step under way is a SAM step (None: not decided yet)
        self._own_defaults = {key: check_non_negative(key, value) for key, value in defaults.items()}
        params = list(params)
        # Optimizer.__init__ fills defaults into group dicts: give it copies so the
        # caller's dicts keep saying which keys were set explicitly.
        super().__init__([dict(g) if isinstance(g, dict) else g for g in params], dict(self._own_defaults))
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise ValueError(
                    f"base optimizer keyword arguments {sorted(base_kwargs)} were given with an optimizer "
                    "instance; pass the class instead, or configure the instance"
                )
            self._check_no_key_clash(base_optimizer)
            self._adopt_instance(params, base_optimizer)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            instance = base_optimizer(self.param_groups, **base_kwargs)
            self._check_no_key_clash(instance)
            self.base_optimizer = instance
        else:
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass or instance, got {base_optimizer!r}"
            )
        self._link_base()
        # The base optimizer's defaults (momentum, betas, lr, ...) show through, as schedulers expect
        # (OneCycleLR/CyclicLR look for momentum or betas here); our own keys win.
        self.defaults = {**self.base_optimizer.defaults, **self._own_defaults}
        for stale in ("_initial_param_groups", "_initial_state"):  # Optimizer.__init__'s, now the base's
            self.__dict__.pop(stale, None)
        self._phase = "idle"
        self._perturbed = ParamSelection()
        # "native": the last phase ran in the backend's own step plan; "generic": through the functional layer.
        self._path = "generic"
        self._cached_plan: StepPlan | None = None
        self._step_plan: StepPlan | None = None  # the plan of the step under way
        self._nonfinite: Tensor | None = None
        self._nonfinite_count: Tensor | None = None
        self._step_hooks_open = False  # the pre hooks fired for the step under way, the post hooks not yet
        self._in_closure_step = False  # step(closure) runs: it fired the pre hooks itself
        # One gradient step(closure) left behind (and its version): finding another there means a backward
        # ran outside the closure. One param is checked, not all: the check is on every step's host path.
        self._left_grad: tuple[weakref.ref, int] | None = None
        self._warned_grads = False
        self._second_pass_model: weakref.ref | None = None

    # ----------------------------------------------------------- construction
    def _check_no_key_clash(self, base: Optimizer) -> None:
        clash = sorted(set(self._own_defaults) & set(base.defaults))
        if clash:
            raise ValueError(
                f"{type(base).__name__} already uses the param-group key(s) {clash}, which "
                f"{type(self).__name__} needs for its own hyperparameters; use another base optimizer"
            )

    def _adopt_instance(self, params: list, base: Optimizer) -> None:
        """Share an existing base optimizer's groups; SAM keys given in ``params`` dicts win."""
        given = params if params and isinstance(params[0], dict) else [{"params": params}]
        as_set = lambda ps: {id(param_of(p)) for p in ([ps] if isinstance(ps, Tensor) else ps)}  # noqa: E731
        check_param_groups(base.param_groups, type(self).__name__)
        base_ids = set().union(*(as_set(g["params"]) for g in base.param_groups))
        given_ids = set().union(*(as_set(g["params"]) for g in given))
        if base_ids != given_ids:
            raise ValueError(
                "params must be exactly the parameters of the given base optimizer instance "
                f"({len(given_ids)} given, the instance has {len(base_ids)})"
            )
        for group in given:
            explicit = {k: v for k, v in group.items() if k in self._own_defaults}
            if not explicit:
                continue
            target = [g for g in base.param_groups if as_set(g["params"]) == as_set(group["params"])]
            if not target:
                raise ValueError("a params dict with SAM hyperparameters matches no param group of the base optimizer")
            target[0].update(explicit)
        for group in base.param_groups:
            self._fill_and_check_group(group)
        self.base_optimizer = base

    def _link_base(self) -> None:
        for group in self.param_groups:
            self._fill_and_check_group(group)

    # One list, one dict: ``param_groups`` and ``state`` are the base optimizer's, whatever replaces them
    # (its own load_state_dict, a checkpoint tool writing to it): schedulers and ρ edits reach both.
    # (getattr, not __dict__: a framework's wrapper that forwards attributes, like Lightning's, sees them too.)
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        base = getattr(self, "base_optimizer", None)
        return base.param_groups if base is not None else self.__dict__.setdefault("_initial_param_groups", [])

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.param_groups = groups
        else:  # Optimizer.__init__, before the base optimizer exists
            self.__dict__["_initial_param_groups"] = groups

    @property
    def state(self):  # type: ignore[override]
        base = getattr(self, "base_optimizer", None)
        return base.state if base is not None else self.__dict__.setdefault("_initial_state", {})

    @state.setter
    def state(self, state) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.state = state
        else:
            self.__dict__["_initial_state"] = state

    def _fill_and_check_group(self, group: dict) -> None:
        for key, default in self._own_defaults.items():
            group.setdefault(key, default)
            check_non_negative(key, group[key], owner="a param group")

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # a generator is read once, here
            param_group["params"] = list(params)
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            check_param_groups([param_group], type(self).__name__,
                               taken={id(p) for g in self.param_groups for p in g["params"]})
            self._check_group_values(param_group)
            super().add_param_group(param_group)
            return
        if self._phase != "idle":
            raise RuntimeError(f"add_param_group() called while {_PHASE_TEXT[self._phase]}; call it between steps")
        check_param_groups([param_group], type(self).__name__,
                           taken={id(p) for g in self.param_groups for p in g["params"]})
        self._fill_and_check_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    def _check_group_values(self, group: dict) -> None:
        for key in self._own_defaults:
            if key in group:
                check_non_negative(key, group[key], owner="a param group")

    # ------------------------------------------------------------ plan
    def _plan(self) -> StepPlan:
        """The cached step plan, rebuilt when the structure of ``param_groups`` changed (docs/DESIGN.md §5)."""
        plan = self._cached_plan
        if plan is not None and plan.key == structure_key(self.param_groups):
            return plan
        plan = StepPlan(self.param_groups)
        device = StepPlan.device_of(self.param_groups)
        make_plan = getattr(self._backend_for(device), "make_plan", None) if device is not None else None
        if make_plan is not None and not plan.sharded:
            self._ensure_skip_tensors(device)
            plan.native = make_plan(
                plan.params, plan.group_of, len(self.param_groups), self._nonfinite, self._nonfinite_count
            )
        self._cached_plan = plan
        return plan

    def _backend_for(self, device: torch.device):
        try:
            return resolve_backend(self._backend, device)
        except (RuntimeError, ValueError):
            return None  # the functional layer raises the error when a step runs

    def _check_groups(self) -> None:
        """Every group has valid values of this optimizer's hyperparameters (they may have changed since)."""
        for group in self.param_groups:
            for key in self._own_defaults:
                value = group.get(key)
                # Fast path: a finite float >= 0 (NaN fails the comparison); anything else gets the full check.
                if type(value) is not float or not 0.0 <= value < math.inf:
                    self._fill_and_check_group(group)
                    break

    def _begin(self) -> StepPlan:
        """Start a step: fire the step pre hooks, check the groups' hyperparameters, fix the plan this step uses."""
        self._open_step_hooks()
        self._check_groups()
        self._step_plan = self._plan()
        return self._step_plan

    def _group_values(self, key: str) -> list[float]:
        return [group[key] for group in self.param_groups]

    # ------------------------------------------------------------ selection
    def _select(self, plan: StepPlan, *, needs_grad: bool) -> ParamSelection:
        """Params that take part: with a gradient (needs_grad) or trainable (before the first backward)."""
        selection = ParamSelection(sharded=plan.sharded)
        groups = self.param_groups
        for index, param in enumerate(plan.params):
            takes_part = param.grad is not None if needs_grad else param.requires_grad
            if not takes_part:
                continue
            if param.is_complex():  # became complex after construction (p.data = ...)
                check_real(param, f"param_groups[{plan.positions[index][0]}]['params'][{plan.positions[index][1]}]",
                           type(self).__name__)
            selection.params.append(param)
            selection.positions.append(plan.positions[index])
            offset = 0
            if is_sharded(param):
                selection.tensors.append(param.to_local())
                offset, selection.group = shard_of(param, selection.name(-1), type(self).__name__)
            else:
                selection.tensors.append(param)
            selection.element_offsets.append(offset)
            selection.groups.append(groups[plan.group_of[index]])
            selection.tensor_indices.append(index)
        owner = type(self).__name__
        if needs_grad:
            check_gradients(selection.params, selection.name, owner)
        else:
            check_single_device({p.device for p in selection.params}, owner)
        check_memory(selection.tensors, selection.name, owner)
        return selection

    def _allocate_saved(self, selection: ParamSelection) -> list[Tensor]:
        """At the start of a step: a saved buffer for each param of ``selection``, kept on it for the step.

        A buffer that does not match its weight (shape, dtype, device) is replaced here, and only here.
        """
        plan = self._step_plan
        copies = []
        for index, tensor in zip(selection.tensor_indices, selection.tensors):
            buffer = plan.saved(index)
            if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (tensor.shape, tensor.dtype,
                                                                                   tensor.device):
                buffer = torch.empty_like(tensor, memory_format=torch.preserve_format)
                plan.set_saved(index, buffer)
            copies.append(buffer)
        selection.saved = copies
        return copies

    def _saved_now(self, selection: ParamSelection) -> list[Tensor | None]:
        """Mid-step: the saved buffers of ``selection``'s params as they are (they hold the weights to put
        back, so they are never replaced; callers compare them with the weights)."""
        if selection.saved is None:
            selection.saved = [self._step_plan.saved(i) for i in selection.tensor_indices]
        return selection.saved

    # ------------------------------------------------------------ protocol
    def _expect(self, phase: str, call: str, hint: str) -> None:
        if self._phase != phase:
            raise RuntimeError(
                f"{type(self).__name__}.{call} called while {_PHASE_TEXT[self._phase]}; "
                f"expected {_PHASE_TEXT[phase]}: {hint}"
            )

    def _expect_sam_step(self) -> None:
        if not self.sam_step_due:
            raise RuntimeError(
                f"{type(self).__name__}: step {self._schedule_step} is not a SAM step ({self._schedule!r}); "
                "nothing was touched: call second_step() now, which only steps the base optimizer "
                "(check opt.sam_step_due after the first backward)"
            )

    def _ensure_skip_tensors(self, device: torch.device) -> None:
        if self._nonfinite is None or self._nonfinite.device != device:
            count = self._nonfinite_count
            self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            self._nonfinite_count = torch.zeros((), dtype=torch.int64, device=device)
            if count is not None:
                self._nonfinite_count.copy_(count)
            self._cached_plan = None  # a native plan writes the old tensors

    def _perturbed_now(self, zero_grad: bool) -> None:
        """The end of every first step: the weights are at w + ε."""
        self._phase = "perturbed"
        if zero_grad:
            self.zero_grad()

    def _record_skip(self, skipped: Tensor, device: torch.device) -> None:
        """Keep the device-side 'perturbation skipped' flag and count without reading them."""
        self._ensure_skip_tensors(device)
        skipped = skipped.to(device)
        self._nonfinite.copy_(skipped)
        self._nonfinite_count.add_(skipped)

    @property
    def found_nonfinite(self) -> Tensor | None:
        """0-d bool device tensor: whether the last first_step() met a non-finite norm and skipped ε."""
        return self._nonfinite

    @property
    def nonfinite_steps(self) -> Tensor | None:
        """0-d int64 device tensor: how many perturbations were skipped so far."""
        return self._nonfinite_count

    @property
    def backend(self) -> str:
        return self._backend

    @torch.compiler.disable
    def restore(self) -> None:
        """Put back the saved weights (undo noise_step()/first_step()) without a base step.

        The step is abandoned: its post hooks do not fire.
        """
        self._step_hooks_open = False
        self._put_back()

    def _put_back(self) -> None:
        if self._phase != "idle":
            try:
                if self._path == "native":
                    native = self._step_plan.native
                    if native.restore() < 0:  # a weight changed dtype, shape or layout since
                        selection = ParamSelection.of(self._step_plan, self.param_groups, native.active())
                        native.clear_active()
                        self._restore_generic(selection)
                else:
                    self._restore_generic(self._perturbed)
            finally:
                self._perturbed = ParamSelection()
                self._phase = "idle"
                self._path = "generic"

    @torch.no_grad()
    def _restore_generic(self, selection: ParamSelection) -> None:
        """w ← saved. A weight whose dtype or device changed mid-step gets its saved values converted; one
        whose shape changed cannot be put back: the others are restored, then that one is named in an error."""
        if not selection.params:
            return
        saved = self._saved_now(selection)
        same, convert, refused = [], [], []
        for k, (tensor, buffer) in enumerate(zip(selection.tensors, saved)):
            if buffer is None or buffer.shape != tensor.shape:
                refused.append(k)
            elif buffer.dtype == tensor.dtype and buffer.device == tensor.device:
                same.append(k)
            else:
                convert.append(k)
        F.restore_([selection.tensors[k] for k in same], [saved[k] for k in same], backend=self._backend)
        for k in convert:
            selection.tensors[k].copy_(saved[k])
        if refused:
            changes = ", ".join(
                f"{selection.name(k)} (saved {tuple(saved[k].shape) if saved[k] is not None else 'nothing'}, "
                f"now {tuple(selection.tensors[k].shape)})" for k in refused
            )
            raise RuntimeError(
                f"{type(self).__name__}.restore(): these params changed shape during the step and keep their "
                f"new values: {changes}; every other weight was restored"
            )

    @torch.compiler.disable
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: "torch.amp.GradScaler | None" = None) -> None:
        """Restore w bit-exactly, then let the base optimizer step with the gradients taken at w + ε.

        With a ``torch.amp.GradScaler`` the base step goes through it (unscaled
        once, skipped on overflow in either pass); call ``scaler.update()`` after.
        """
        if self._phase == "idle" and not self.sam_step_due:  # a step the schedule skips: the plain base step
            self._open_step_hooks()
        else:
            self._expect("perturbed", "second_step()", "call first_step() after the first backward pass")
        sam_step = self._phase != "idle"
        try:
            if not (sam_step and self._fused_second_step(scaler)):
                self._put_back()
                if sam_step:
                    self._before_base_step()
                with hooks.global_hooks_silenced():  # one SAM step fires the global step hooks once (hooks.py)
                    if scaler is not None:
                        scaler_step(self, scaler)
                    elif unscale_for_grad_scaler(self):  # GradScaler.step(opt) called step(): its unscale and skip
                        self.base_optimizer.step()
        except BaseException:
            self._step_hooks_open = False  # the step failed: no post hooks, the next step fires its pre hooks
            if self._phase != "idle":  # it failed before the fused pass put the weights back: do it now
                self._put_back()
            raise
        self._opt_called = True  # tells torch LR schedulers that the optimizer stepped
        if sam_step:
            self._after_second_step()
        self._schedule_step += 1
        self._decision = None
        if zero_grad:
            self.zero_grad()
        self._close_step_hooks()

    @property
    def base_step_fused(self) -> bool:
        """Whether second_step() restores and runs the base step in one fused pass, as configured now
        (``fuse_base_step=True``, the base optimizer exactly torch.optim.SGD, Adam or AdamW with options the
        pass implements, a backend with the fused operations; docs/DESIGN.md §2.11)."""
        return self._why_not_fused() is None

    def _why_not_fused(self) -> str | None:
        plan = self._cached_plan
        if plan is not None and plan.sharded:
            return "sharded (DTensor) params"
        return fused_base.why_not_fused(self, StepPlan.device_of(self.param_groups))

    def _no_skip(self, device: torch.device) -> Tensor:
        """A 0-d False on ``device``: the fused step's skip flag when nothing can overflow."""
        flag = self._no_skips.get(device)
        if flag is None:
            flag = self._no_skips[device] = torch.zeros((), dtype=torch.bool, device=device)
        return flag

    def _fused_second_step(self, scaler: "torch.amp.GradScaler | None") -> bool:
        """Restore and step the base optimizer in one pass, if this configuration fuses (else False, and
        nothing was touched)."""
        plan = self._step_plan
        device = StepPlan.device_of(self.param_groups)
        if plan is None or plan.sharded or fused_base.why_not_fused(self, device) is not None:
            return False
        if self._path == "native":
            selection = ParamSelection.of(plan, self.param_groups, plan.native.active())
        else:
            selection = self._perturbed
        saved = self._saved_now(selection)
        if any(b is None for b in saved) or any(list(map(key, saved)) != list(map(key, selection.tensors))
                                for key in (_shape, _dtype, _device)):
            return False  # a weight changed mid-step: the general path converts or names it
        self._before_base_step()
        if scaler is not None:
            skip = scaler_skip_flag(self, scaler, device)
        else:
            skip = called_by_grad_scaler_skip_flag(self)
        fused_base.fused_second_step(self, selection, saved, skip)
        if self._path == "native":
            plan.native.clear_active()
        self._perturbed = ParamSelection()
        self._phase = "idle"
        self._path = "generic"
        if scaler is not None:
            mark_stepped(self, scaler)
        self.base_optimizer._opt_called = True  # an LR scheduler attached to the base optimizer looks for it
        return True

    def _before_base_step(self) -> None:
        """Hook: ``.grad`` holds g_sam; the restore and the base step come next (a variant that changes the
        update direction, e.g. GSAM's decomposition, does it here). Unfused, the weights are already restored;
        fused, the restore is part of the pass that follows: a hook that reads the weights sets
        ``_fusable_base_step = False``."""

    def _after_second_step(self) -> None:
        pass

    def _before_first_forward(self) -> None:
        pass

    def first_step(self, zero_grad: bool = False) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.compiler.disable
    @hooks.mark_hooks_handled  # this class fires the step hooks itself (hooks.py)
    def step(self, closure: Callable[[], Any] | None = None, scaler: "torch.amp.GradScaler | None" = None) -> Any:  # type: ignore[override]
        """One whole sharpness-aware step; ``closure`` runs forward + backward and returns the loss.

        Gradients are cleared before each of the (two) closure calls, so gradients
        already in ``.grad`` are discarded (with a warning: accumulate with the
        explicit API). Returns the loss of the first call (at the unperturbed
        weights, or ŵ for R-SAM). With AMP, the closure backpropagates
        ``scaler.scale(loss)`` and the scaler is passed here (see :meth:`second_step`).
        See :meth:`freeze_running_stats_in_second_pass` for BatchNorm.

        After :meth:`first_step` and the second backward, ``step()`` finishes the
        step instead: it calls ``closure`` once if one is given (as torch's
        optimizers do; Lightning's manual optimization passes one that runs its
        hooks), then :meth:`second_step`. This is how frameworks that own the
        ``optimizer.step()`` call (Lightning, ``GradScaler.step(opt)``) run SAM.
        """
        try:
            return self._run_step(closure, scaler)
        except BaseException:
            # GradScaler.step(opt) sets these for the one call; it does not remove them when step() raises.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    def _run_step(self, closure: Callable[[], Any] | None, scaler: "torch.amp.GradScaler | None") -> Any:
        if self._phase == "perturbed":
            loss = None
            try:
                if closure is not None:
                    with torch.enable_grad():
                        loss = closure()
                self.second_step(scaler=scaler)
            except BaseException:
                self.restore()
                raise
            return loss
        if self._phase == "noised":
            self._expect("perturbed", "step()", "call first_step() after the first backward pass")
        if closure is None and self._phase == "idle" and not self.sam_step_due:
            return self.second_step(scaler=scaler)  # a step the schedule skips: the plain base step
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called without a closure and no SAM step is pending "
                f"({_PHASE_TEXT[self._phase]}, first_step() has not run). step() needs a closure that runs forward "
                "and backward and returns the loss (it is called twice); or run the step explicitly: first_step() "
                "after the first backward, then step() or second_step() after the second. A framework that calls "
                "optimizer.step() itself needs its recipe (README, 'Training stacks'): transformers' Trainer -> "
                "sam_kernels.integrations.transformers.SAMTrainer; accelerate -> "
                "sam_kernels.integrations.accelerate.prepare(); Lightning with accumulation or "
                "precision='16-mixed' -> manual optimization"
            )
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            args, kwargs = hooks.fire_pre_hooks(self, (self, closure), {"scaler": scaler} if scaler is not None
                                                else {})
            _, closure, *rest = args
            scaler = kwargs.get("scaler", rest[0] if rest else None)
            self._warn_if_gradients_were_given()
            closure = torch.enable_grad()(closure)
            model = self._second_pass_model() if self._second_pass_model is not None else None
            second_pass = frozen_running_stats(model) if model is not None else contextlib.nullcontext()
            self._step_hooks_open, self._in_closure_step = True, True
            try:
                self._before_first_forward()
                self.zero_grad()
                loss = closure()
                if self.sam_step_due:
                    self.first_step(zero_grad=True)
                    with second_pass:
                        closure()
                self.second_step(scaler=scaler)
            except BaseException:
                self.restore()
                raise
            finally:
                self._in_closure_step = False
            self._optimizer_step_code()
            self._remember_left_grad()
            return loss

    @property
    def sam_step_due(self) -> bool:
        """Whether the step under way is a SAM step (``schedule=``; always True by default).

        Known before the first forward for every schedule but :class:`~sam_kernels.schedules.Adaptive`,
        which decides from the first-pass gradient: read it after the first backward (it reads one number
        from the device). When False, call :meth:`second_step` right away: it only steps the base optimizer.
        """
        if self._decision is None:
            schedule, t = self._schedule, self._schedule_step
            if not schedule.needs_gradient:
                self._decision = schedule.due(t)
            else:
                grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
                if not grads:
                    raise RuntimeError(
                        f"{type(self).__name__}.sam_step_due: the adaptive schedule decides from the first-pass "
                        "gradient; read it after the first backward"
                    )
                self._decision = schedule.due_given(t, _squared_norm(grads))
        return self._decision

    @property
    def schedule(self):
        """The :mod:`sam_kernels.schedules` object deciding which steps are SAM steps."""
        return self._schedule

    def freeze_running_stats_in_second_pass(self, model: torch.nn.Module | None) -> None:
        """Make :meth:`step` run its second closure call under :func:`sam_kernels.frozen_running_stats`:
        BatchNorm running statistics then only see the first pass (``None`` undoes it)."""
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"freeze_running_stats_in_second_pass() takes an nn.Module or None, got {model!r}")
        # A weak reference: the optimizer does not keep the model alive, and copies of the optimizer do not
        # carry it (register the copy's model again).
        self._second_pass_model = weakref.ref(model) if model is not None else None

    # ------------------------------------------------------------ step hooks
    def _open_step_hooks(self) -> None:
        """The first call of a step (first_step, or noise_step): the pre hooks fire, once. A call while the
        weights are not moved starts a step (an earlier one that failed or was restored fired no post hooks)."""
        if self._in_closure_step or (self._step_hooks_open and self._phase != "idle"):
            return
        hooks.fire_pre_hooks(self, (self,), {})  # explicit API: new args a hook returns have no use here
        self._step_hooks_open = True

    def _close_step_hooks(self) -> None:
        if self._step_hooks_open:
            self._step_hooks_open = False
            hooks.fire_post_hooks(self, (self,), {})

    # ------------------------------------------------------------ gradients given to step(closure)
    def _remember_left_grad(self) -> None:
        grad = next((p.grad for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        self._left_grad = None if grad is None else (weakref.ref(grad), grad._version)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._left_grad is not None:  # zeroed in place: still the gradient step(closure) left
            self._remember_left_grad()

    def _warn_if_gradients_were_given(self) -> None:
        """step(closure) clears .grad: warn (once) when it holds gradients that step() did not leave there
        (checked on the first param that has one: a backward outside the closure reaches it too)."""
        if self._warned_grads:
            return
        grad = next((p.grad for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        if grad is None:
            return
        left = self._left_grad
        if left is not None and left[0]() is grad and left[1] == grad._version:
            return
        self._warned_grads = True
        warnings.warn(
            f"{type(self).__name__}.step(closure) found parameters that already hold gradients (a backward "
            "outside the closure: gradient accumulation, or a loop ported from another SAM library); "
            "step(closure) clears them and runs both passes itself, so they are discarded. To accumulate, use "
            "the explicit API: backward over the micro-batches, first_step(), backward over them again, "
            "second_step(). (Warned once.)",
            UserWarning, stacklevel=_user_stacklevel(),
        )

    # --------------------------------------------------------- checkpoints
    def _extra_state(self) -> dict[str, Any]:
        return {"version": 1, "schedule_step": self._schedule_step, "schedule": self._schedule.state_dict()}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._schedule_step = int(extra.get("schedule_step", 0))
        self._schedule.load_state_dict(extra.get("schedule", {}))
        self._decision = None

    def sam_state_dict(self) -> dict[str, Any]:
        """Only what SAM adds to the base optimizer's state (R-SAM's seed and step, ASAM's p/granularity).

        For checkpoint tools that handle the base optimizer themselves, e.g.
        torch.distributed.checkpoint's ``get_state_dict(model, opt.base_optimizer)``.
        """
        return self._extra_state()

    def load_sam_state_dict(self, state: dict[str, Any]) -> None:
        self._load_extra_state(state)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its param_groups carry SAM's keys) plus SAM's own entry.

        This optimizer's ``register_state_dict_pre_hook``/``post_hook`` hooks run around it.
        """
        if self._phase != "idle":
            raise RuntimeError(
                f"state_dict() called while {_PHASE_TEXT[self._phase]}: a checkpoint would hold perturbed "
                "weights; call it after second_step() (or call restore() first)"
            )
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base_optimizer.state_dict()
        state[_EXTRA_STATE_KEY] = self._extra_state()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._phase != "idle":
            raise RuntimeError(f"load_state_dict() called while {_PHASE_TEXT[self._phase]}; call restore() first")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        extra = state_dict.pop(_EXTRA_STATE_KEY, None)
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base()
        if extra is not None:
            self._load_extra_state(extra)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------ copies
    # What a step caches from the live objects: rebuilt after a copy (and the native plan cannot be pickled).
    _NOT_COPIED = ("_cached_plan", "_step_plan", "_left_grad", "_second_pass_model", "_no_skips")

    def __getstate__(self) -> dict[str, Any]:
        """Everything (base optimizer, backend, seed/step, ...) but the caches and, as torch does, the hooks."""
        if self._phase != "idle":
            raise RuntimeError(
                f"cannot copy or pickle {type(self).__name__} while {_PHASE_TEXT[self._phase]}; "
                "finish the step with second_step() (or restore()) first"
            )
        return {
            key: value for key, value in self.__dict__.items()
            # "step": an LR scheduler's wrapper of this object's step, bound to the original
            if key not in self._NOT_COPIED and key != "step" and not key.startswith("_optimizer_")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        groups, base_state = state.pop("param_groups", None), state.pop("state", None)  # torch's own keys
        super().__setstate__(state)  # the hook dicts, torch's bookkeeping
        for key in self._NOT_COPIED:
            self.__dict__.setdefault(key, None)
        self._no_skips = {}
        self.__dict__.setdefault("_fuse_base_step", True)  # pickled before the fused second step existed
        if groups is not None:
            self.param_groups = groups
        if base_state is not None:
            self.state = base_state

    # ------------------------------------------------------------ wrappers
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _EXPLICIT_API:
            if name in cls.__dict__:
                setattr(cls, name, _on_wrapped_optimizer(cls.__dict__[name]))
        if "step" in cls.__dict__:  # a variant's own step() fires the hooks itself, as this class's does
            hooks.mark_hooks_handled(cls.__dict__["step"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self._backend!r}, base_optimizer={self.base_optimizer!r})"


# The step methods a framework's optimizer wrapper may expose (below).
_EXPLICIT_API = ("noise_step", "first_step", "second_step", "restore", "add_param_group", "state_dict",
                 "load_state_dict", "sam_state_dict", "load_sam_state_dict", "freeze_running_stats_in_second_pass",
                 "zero_grad")


def _on_wrapped_optimizer(method: Callable) -> Callable:
    """Run ``method`` on the real optimizer when it is called through a wrapper that subclasses the
    optimizer's class and forwards unknown attributes to it, without its state (Lightning's
    ``LightningOptimizer``: ``self.optimizers().first_step()`` in a LightningModule)."""

    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        if "base_optimizer" not in self.__dict__:
            inner = getattr(self, "optimizer", None)
            if isinstance(inner, SharpnessAwareOptimizer) and inner is not self:
                return getattr(inner, method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return run


for _name in _EXPLICIT_API:
    if _name in SharpnessAwareOptimizer.__dict__:
        setattr(SharpnessAwareOptimizer, _name, _on_wrapped_optimizer(SharpnessAwareOptimizer.__dict__[_name]))


def _squared_norm(grads: list[Tensor]) -> float:
    """Σ g² over every gradient, in float64, read to the host (the adaptive schedule's one sync)."""
    if any(is_sharded(g) for g in grads):
        raise NotImplementedError("the adaptive schedule does not support sharded (DTensor) gradients yet")
    return float(sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads))


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside sam_kernels and torch (a warning points at the user's line)."""
    import os
    import sys

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith((package, torch_dir)):
        frame, level = frame.f_back, level + 1
    return level
