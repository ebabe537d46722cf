"""SAM (Foret et al. 2020) and ASAM (Kwon et al. 2021): one first-order method, SAM being t ≡ 1."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .. import functional as F
from .._validation import check_granularity, check_p
from .base import SharpnessAwareOptimizer


class FirstOrderSAM(SharpnessAwareOptimizer):
    r"""The perturbation from the gradient at w, in ASAM's scale t (docs/DESIGN.md §2).

    ε = ρ · t² ⊙ g / (‖t ⊙ g‖₂ + 1e-12) (p = 2) or ε = ρ · t ⊙ sign(g) (p = ∞),
    with t ≡ 1 (``granularity=None``: SAM), t = |w| + η (``"element"``) or
    t = ‖f_i‖₂ + η (``"filter"``). :class:`SAM` and :class:`ASAM` are its two
    public faces.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float,
        eta: float,
        p: float,
        granularity: str | None,
        backend: str,
        extra_defaults: dict[str, float] | None = None,
        **base_kwargs: Any,
    ) -> None:
        """``extra_defaults``: per-group hyperparameters a subclass adds (GSAM's ``alpha``, ...)."""
        self._p = check_p(p)
        self._granularity = None if granularity is None else check_granularity(granularity)
        defaults = {"rho": rho} if self._granularity is None else {"rho": rho, "eta": eta}
        super().__init__(params, base_optimizer, {**defaults, **(extra_defaults or {})}, backend=backend,
                         **base_kwargs)

    _MODES = {None: 0, "element": 1, "filter": 2}

    def _etas(self, selection) -> list[float] | float:
        return 0.0 if self._granularity is None else selection.per_tensor("eta")

    def _group_etas(self) -> list[float]:
        return [0.0] * len(self.param_groups) if self._granularity is None else self._group_values("eta")

    @torch.compiler.disable
    def first_step(self, zero_grad: bool = False) -> None:
        """Save w and move to w + ε, ε computed from the gradients now in ``.grad``."""
        self._expect("idle", "first_step()", "call second_step() to finish the previous step, or restore()")
        self._expect_sam_step()
        plan = self._begin()
        if plan.native is not None and plan.native.sam_first_step(
            self._group_values("rho"), self._group_etas(), self._MODES[self._granularity], self._p != 2
        ) >= 0:
            self._path = "native"
        else:
            self._generic_first_step(plan)
        self._perturbed_now(zero_grad)

    @torch.no_grad()
    def _generic_first_step(self, plan) -> None:
        selection = self._select(plan, needs_grad=True)
        saved = self._allocate_saved(selection)
        grads = selection.grads
        etas = self._etas(selection)
        if selection.params:
            sq_sum = F.scaled_grad_sq_sum(
                selection.tensors, grads, granularity=self._granularity, etas=etas, backend=self._backend
            )
            scales, skipped = F.sam_scales(selection.all_reduce_(sq_sum), selection.per_tensor("rho"), p=self._p)
            F.perturb_(
                selection.tensors, grads, saved, scales,
                granularity=self._granularity, etas=etas, p=self._p, backend=self._backend,
            )
            self._record_skip(skipped, selection.tensors[0].device)
        self._perturbed = selection
        self._path = "generic"


class SAM(FirstOrderSAM):
    r"""Sharpness-Aware Minimization.

    After the first backward (gradient g at w) :meth:`first_step` moves to
    w + ε with ε = ρ · g / (‖g‖₂ + 1e-12), the norm taken over every parameter
    that has a gradient, across all param groups (ρ may differ per group).
    After the second backward, :meth:`second_step` restores w bit-exactly and
    the base optimizer steps with the gradient taken at w + ε.

    Args:
        params: parameters or param-group dicts (``rho`` may be set per group).
        base_optimizer: a ``torch.optim.Optimizer`` class (its kwargs follow as
            ``**base_kwargs``) or an instance built over the same parameters.
        rho: radius ρ of the neighbourhood (≥ 0).
        backend: ``"auto"``, ``"reference"``, ``"foreach"`` (and the fused
            backends when available): see :func:`sam_kernels.available_backends`.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params, base_optimizer, rho=rho, eta=0.0, p=2, granularity=None, backend=backend, **base_kwargs
        )


class ASAM(FirstOrderSAM):
    r"""Adaptive SAM: sharpness measured in a scale-invariant neighbourhood.

    With t = |w| + η (``granularity="element"``) or t = ‖f_i‖₂ + η for every
    weight of filter i (``granularity="filter"``; tensors with ndim ≤ 1 use
    the element-wise t):

    * p = 2: ε = ρ · t² ⊙ g / (‖t ⊙ g‖₂ + 1e-12), so ‖t⁻¹ ⊙ ε‖₂ = ρ;
    * p = ∞: ε = ρ · t ⊙ sign(g), so max |t⁻¹ ⊙ ε| = ρ.

    ``rho`` and ``eta`` may be set per param group; ``p`` and ``granularity``
    hold for the whole optimizer.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.5,
        eta: float = 0.01,
        p: float = 2,
        granularity: str = "element",
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        if granularity is None:  # SAM's t ≡ 1 is spelt SAM
            check_granularity(granularity)
        super().__init__(
            params, base_optimizer, rho=rho, eta=eta, p=p, granularity=granularity, backend=backend, **base_kwargs
        )

    @property
    def p(self) -> float:
        return self._p

    @property
    def granularity(self) -> str:
        return self._granularity  # type: ignore[return-value]

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "p": self._p, "granularity": self._granularity}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._p = check_p(extra.get("p", self._p))
        self._granularity = check_granularity(extra.get("granularity", self._granularity))
