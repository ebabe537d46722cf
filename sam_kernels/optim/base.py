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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import functional as F
from ..amp import scaler_step
from .sharding import all_reduce_sum_, is_sharded, local, shard_of
from .._validation import check_backend, check_gradients, check_non_negative, check_single_device

_EXTRA_STATE_KEY = "sam_kernels"

_PHASE_TEXT = {
    "idle": "the weights are not perturbed",
    "noised": "the weights are at w + δ₀ (after noise_step())",
    "perturbed": "the weights are perturbed (after first_step())",
}


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
    # The saved-copy buffers of `params`, looked up once per step (see _saved_of).
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


class SharpnessAwareOptimizer(Optimizer):
    """Base class: wraps ``base_optimizer`` (a class plus its kwargs, or an instance over the same params)."""

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, float],
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        self._backend = check_backend(backend)
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
        self._phase = "idle"
        self._perturbed = ParamSelection()
        self._saved: dict[Tensor, Tensor] = {}
        self._nonfinite: Tensor | None = None
        self._nonfinite_count: Tensor | None = None

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
        as_set = lambda ps: {id(p) for p in ([ps] if isinstance(ps, Tensor) else ps)}  # noqa: E731
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
        # One list, one dict: schedulers, add_param_group and checkpoints see the same objects.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            self._fill_and_check_group(group)

    def _fill_and_check_group(self, group: dict) -> None:
        for key, default in self._own_defaults.items():
            group.setdefault(key, default)
            check_non_negative(key, group[key], owner="a param group")

    def add_param_group(self, param_group: dict) -> None:
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            self._check_group_values(param_group)
            super().add_param_group(param_group)
            return
        if self._phase != "idle":
            raise RuntimeError(f"add_param_group() called while {_PHASE_TEXT[self._phase]}; call it between steps")
        self._fill_and_check_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    def _check_group_values(self, group: dict) -> None:
        for key in self._own_defaults:
            if key in group:
                check_non_negative(key, group[key], owner="a param group")

    # ------------------------------------------------------------ selection
    def _select(self, *, needs_grad: bool) -> ParamSelection:
        """Params that take part: with a gradient (needs_grad) or trainable (before the first backward)."""
        selection = ParamSelection()
        index = 0
        for group_number, group in enumerate(self.param_groups):
            self._fill_and_check_group(group)
            for param_number, param in enumerate(group["params"]):
                takes_part = param.grad is not None if needs_grad else param.requires_grad
                if takes_part:
                    selection.params.append(param)
                    selection.positions.append((group_number, param_number))
                    offset = 0
                    if is_sharded(param):
                        selection.sharded = True
                        selection.tensors.append(param.to_local())
                        offset, selection.group = shard_of(param, selection.name(-1), type(self).__name__)
                    else:
                        selection.tensors.append(param)
                    selection.element_offsets.append(offset)
                    selection.groups.append(group)
                    selection.tensor_indices.append(index)
                index += 1
        owner = type(self).__name__
        if needs_grad:
            check_gradients(selection.params, selection.name, owner)
        else:
            check_single_device({p.device for p in selection.params}, owner)
        return selection

    def _saved_of(self, selection: ParamSelection) -> list[Tensor]:
        """The saved copies of a selection's params, kept on the selection for the rest of the step."""
        if selection.saved is None:
            selection.saved = self._saved_copies(selection.params)
        return selection.saved

    def _saved_copies(self, params: list[Tensor]) -> list[Tensor]:
        """The buffers that hold w (its local shard) during a step, allocated once per param."""
        copies = []
        for param in params:
            tensor = local(param)
            buffer = self._saved.get(param)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype or buffer.device != tensor.device:
                buffer = torch.empty_like(tensor, memory_format=torch.preserve_format)
                self._saved[param] = buffer
            copies.append(buffer)
        return copies

    # ------------------------------------------------------------ protocol
    def _expect(self, phase: str, call: str, hint: str) -> None:
        if self._phase != phase:
            raise RuntimeError(
                f"{type(self).__name__}.{call} called while {_PHASE_TEXT[self._phase]}; "
                f"expected {_PHASE_TEXT[phase]}: {hint}"
            )

    def _record_skip(self, skipped: Tensor, device: torch.device) -> None:
        """Keep the device-side 'perturbation skipped' flag and count without reading them."""
        if self._nonfinite is None or self._nonfinite.device != device:
            self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            self._nonfinite_count = torch.zeros((), dtype=torch.int64, device=device)
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
    @torch.no_grad()
    def restore(self) -> None:
        """Put back the saved weights (undo noise_step()/first_step()) without a base step."""
        if self._phase != "idle":
            selection = self._perturbed
            F.restore_(selection.tensors, self._saved_of(selection), backend=self._backend)
        self._perturbed = ParamSelection()
        self._phase = "idle"

    @torch.compiler.disable
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: "torch.amp.GradScaler | None" = None) -> None:
        """Restore w bit-exactly, then let the base optimizer step with the gradients taken at w + ε.

        With a ``torch.amp.GradScaler`` the base step goes through it (unscaled
        once, skipped on overflow in either pass); call ``scaler.update()`` after.
        """
        self._expect("perturbed", "second_step()", "call first_step() after the first backward pass")
        self.restore()
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler_step(self, scaler)
        self._opt_called = True  # tells torch LR schedulers that the optimizer stepped
        self._after_second_step()
        if zero_grad:
            self.zero_grad()

    def _after_second_step(self) -> None:
        pass

    def _before_first_forward(self) -> None:
        pass

    def first_step(self, zero_grad: bool = False) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None, scaler: "torch.amp.GradScaler | None" = None) -> Any:  # type: ignore[override]
        """One whole sharpness-aware step; ``closure`` runs forward + backward and returns the loss.

        Gradients are cleared before each of the (two) closure calls. Returns the
        loss of the first call (at the unperturbed weights, or ŵ for R-SAM).
        With AMP, the closure backpropagates ``scaler.scale(loss)`` and the
        scaler is passed here (see :meth:`second_step`).
        """
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that runs forward and backward and returns "
                "the loss (it is called twice); or use first_step()/second_step() explicitly"
            )
        closure = torch.enable_grad()(closure)
        try:
            self._before_first_forward()
            self.zero_grad()
            loss = closure()
            self.first_step(zero_grad=True)
            closure()
            self.second_step(scaler=scaler)
        except BaseException:
            self.restore()
            raise
        return loss

    # --------------------------------------------------------- checkpoints
    def _extra_state(self) -> dict[str, Any]:
        return {"version": 1}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def sam_state_dict(self) -> dict[str, Any]:
        """Only what SAM adds to the base optimizer's state (R-SAM's seed and step, ASAM's p/granularity).

        For checkpoint tools that handle the base optimizer themselves, e.g.
        torch.distributed.checkpoint's ``get_state_dict(model, opt.base_optimizer)``.
        """
        return self._extra_state()

    def load_sam_state_dict(self, state: dict[str, Any]) -> None:
        self._load_extra_state(state)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its param_groups carry SAM's keys) plus SAM's own entry."""
        if self._phase != "idle":
            raise RuntimeError(
                f"state_dict() called while {_PHASE_TEXT[self._phase]}: a checkpoint would hold perturbed "
                "weights; call it after second_step() (or call restore() first)"
            )
        state = self.base_optimizer.state_dict()
        state[_EXTRA_STATE_KEY] = self._extra_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._phase != "idle":
            raise RuntimeError(f"load_state_dict() called while {_PHASE_TEXT[self._phase]}; call restore() first")
        state_dict = dict(state_dict)
        extra = state_dict.pop(_EXTRA_STATE_KEY, None)
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base()
        if extra is not None:
            self._load_extra_state(extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self._backend!r}, base_optimizer={self.base_optimizer!r})"
