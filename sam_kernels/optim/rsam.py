"""R-SAM: random-smoothing-based SAM (Liu et al. 2022)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .. import functional as F
from .._validation import check_seed
from ..noise import NoiseStream
from .base import ParamSelection, SharpnessAwareOptimizer


class RSAM(SharpnessAwareOptimizer):
    r"""Random Sharpness-Aware Minimization.

    One step (docs/DESIGN.md §1–2):

    1. :meth:`noise_step` (before the first forward): save w, set
       ŵ = w + δ₀ with δ₀ ~ N(0, σ_i² I), σ_i = γ · ‖w_i‖₂ / √n_i per filter i
       (ndim ≤ 1: σ = γ|w|). δ₀ comes from the Philox stream keyed by ``seed``
       and is regenerated, never stored.
    2. forward/backward at ŵ → g.
    3. :meth:`first_step`: d = δ₀/‖δ₀‖ + λ · g/‖g‖ (global norms),
       ε = ρ · d / ‖d‖, w ← w_saved + ε.
    4. forward/backward at w + ε.
    5. :meth:`second_step`: restore w, base optimizer step.

    γ = 0 is exactly SAM; λ = 0 is the pure noise direction; λ → ∞ is SAM's
    direction taken at ŵ. ``rho``, ``gamma`` and ``lam`` may be set per param
    group. ``seed`` (64-bit; drawn from torch's default generator when None)
    and the step counter are saved by :meth:`state_dict`.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        gamma: float = 0.1,
        lam: float = 1.0,
        seed: int | None = None,
        *,
        backend: str = "auto",
        extra_defaults: dict[str, float] | None = None,
        **base_kwargs: Any,
    ) -> None:
        """``extra_defaults``: per-group hyperparameters a subclass adds (R-GSAM's ``alpha``)."""
        if seed is None:
            # Drawn once, at construction, from torch's default generator (so torch.manual_seed fixes it).
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self._seed = check_seed(seed)
        self._step = 0
        defaults = {"rho": rho, "gamma": gamma, "lam": lam, **(extra_defaults or {})}
        super().__init__(params, base_optimizer, defaults, backend=backend, **base_kwargs)
        if self._schedule.needs_gradient:
            raise ValueError(
                "RSAM cannot use an adaptive schedule: it draws its noise before the first forward, before the "
                "gradient the schedule decides from exists; use an int or Bernoulli schedule"
            )

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def noise_step_count(self) -> int:
        """R-SAM steps completed so far: the ``s`` of the noise stream's counter."""
        return self._step

    def _stream(self, selection) -> dict[str, Any]:
        """The noise arguments of the functional R-SAM operations for ``selection``."""
        stream = NoiseStream(self._seed, self._step, selection.tensor_indices, selection.element_offsets)
        return {"gammas": selection.per_tensor("gamma"), "stream": stream, "backend": self._backend}

    @torch.compiler.disable
    def noise_step(self) -> None:
        """Before the first forward: save w and move every trainable param to ŵ = w + δ₀."""
        self._expect("idle", "noise_step()", "call second_step() to finish the previous step, or restore()")
        if not self.sam_step_due:  # a step the schedule skips: no noise, the plain step follows
            return
        plan = self._begin()
        if plan.native is not None and plan.native.add_noise(self._group_values("gamma"), self._seed, self._step) >= 0:
            self._path = "native"
        else:
            self._generic_noise_step(plan)
        self._phase = "noised"

    @torch.no_grad()
    def _generic_noise_step(self, plan) -> None:
        selection = self._select(plan, needs_grad=False)
        F.add_noise_(selection.tensors, self._allocate_saved(selection), **self._stream(selection))
        self._perturbed = selection
        self._path = "generic"

    def _before_first_forward(self) -> None:
        self.noise_step()

    @torch.compiler.disable
    def first_step(self, zero_grad: bool = False) -> None:
        """After the backward at ŵ: move to w_saved + ε, ε = ρ·d/‖d‖, d = δ₀/‖δ₀‖ + λ·g/‖g‖."""
        if self._phase == "idle":
            self._expect_sam_step()
        self._expect("noised", "first_step()", "call noise_step() before the first forward pass")
        self._check_groups()
        plan = self._step_plan
        values = self._group_values
        if not (
            self._path == "native"
            and plan.native.rsam_first_step(values("rho"), values("gamma"), values("lam"), self._seed, self._step) >= 0
        ):
            if self._path == "native":  # the native plan cannot take this step: continue on the generic path
                self._perturbed = ParamSelection.of(plan, self.param_groups, plan.native.active())
                plan.native.clear_active()
                self._path = "generic"  # before anything can raise: restore() must find the noised params
            self._generic_first_step(plan)
        self._perturbed_now(zero_grad)

    @torch.no_grad()
    def _generic_first_step(self, plan) -> None:
        noised = self._perturbed
        self._check_unchanged(noised)
        with_grad = self._select(plan, needs_grad=True)
        has_grad = {id(p) for p in with_grad.params}
        keep = [id(p) in has_grad for p in noised.params]
        # Trainable params that got no gradient take no part in this step: undo their noise now.
        dropped = noised.subset([not k for k in keep])
        self._restore_generic(dropped)
        selection = noised.subset(keep)
        params, grads = selection.tensors, selection.grads
        saved = self._saved_now(selection)  # checked by _check_unchanged
        if params:
            stream = self._stream(selection)
            sums = selection.all_reduce_(F.noise_grad_sums(grads, saved, lams=selection.per_tensor("lam"), **stream))
            noise_coefs, grad_coefs, skipped = F.rsam_coefficients(
                sums, selection.per_tensor("rho"), selection.per_tensor("lam")
            )
            F.mix_perturb_(params, grads, saved, noise_coefs, grad_coefs, **stream)
            self._record_skip(skipped, params[0].device)
        self._perturbed = selection

    def _check_unchanged(self, noised: ParamSelection) -> None:
        """Refuse a first step on weights whose dtype, shape or device changed since noise_step()."""
        saved = self._saved_now(noised)
        for k, (tensor, buffer) in enumerate(zip(noised.tensors, saved)):
            if buffer is None or buffer.shape != tensor.shape:
                was = "nothing" if buffer is None else f"shape {tuple(buffer.shape)}"
                raise RuntimeError(
                    f"RSAM.first_step(): {noised.name(k)} changed from {was} to shape {tuple(tensor.shape)} after "
                    "noise_step(); call restore() (the other weights are put back; this one keeps its new value)"
                )
            if tensor.dtype != buffer.dtype or tensor.device != buffer.device:
                raise RuntimeError(
                    f"RSAM.first_step(): {noised.name(k)} changed from {buffer.dtype} on {buffer.device} to "
                    f"{tensor.dtype} on {tensor.device} after noise_step(); call restore() (which puts back "
                    "the saved weights, converted) and start the step again"
                )

    def _after_second_step(self) -> None:
        self._step += 1

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "seed": self._seed, "step": self._step}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._seed = check_seed(int(extra["seed"]))
        self._step = int(extra["step"])
