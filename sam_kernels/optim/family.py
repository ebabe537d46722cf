"""The SAM family: GSAM, R-GSAM, LookSAM, WSAM and FriendlySAM (docs/DESIGN.md §2.5–§2.8).

Each one is a sharpness-aware optimizer of this library (same base-optimizer wrapping, both step APIs,
per-group hyperparameters, checkpoints, backends) that changes either the perturbation (FriendlySAM) or
the gradient the base optimizer steps with (GSAM, R-GSAM, LookSAM, WSAM). The perturbation of GSAM,
LookSAM and WSAM is SAM's, and R-GSAM's is R-SAM's, run by the same code (the ``cpp`` step plan included);
what they add runs in the ``_before_base_step`` hook (the weights are restored, ``.grad`` holds g_sam) as
list operations of :mod:`sam_kernels.functional`. Every global sum (g·g_sam, ‖g_sam‖², ‖g_v‖², ‖g − σm‖²)
is one reduction over all parameters, all-reduced over shards, and every coefficient is a device scalar:
no step reads a value on the host.

Extra memory per parameter element (one buffer where the math needs one):
GSAM, R-GSAM, WSAM: the first-pass gradient g, for the step only; LookSAM: g_v, kept across steps (it
holds g during a SAM step); FriendlySAM: the EMA m, kept across steps. The kept buffers are saved by
``state_dict()`` (in the ``"sam_kernels"`` entry, so the base optimizer's own state is untouched).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from .. import functional as F
from .amp import _stage_name
from .base import ParamSelection, SharpnessAwareOptimizer
from .rsam import RSAM
from .sam import FirstOrderSAM


# ------------------------------------------------------------------ shared pieces
class _ParamBuffers:
    """One buffer per parameter, made like the tensor it is to hold (its gradient), kept while it matches.

    ``persistent`` buffers (LookSAM's g_v, FriendlySAM's m) go with a copy or pickle of the optimizer, each
    with its parameter; scratch buffers (the g of one step) do not.
    """

    def __init__(self, persistent: bool = False) -> None:
        self._buffers = WeakIdKeyDictionary()
        self.persistent = persistent

    def __getstate__(self) -> dict[str, Any]:
        pairs = list(self._buffers.items()) if self.persistent else []
        return {"persistent": self.persistent, "pairs": pairs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.persistent = state["persistent"]
        self._buffers = WeakIdKeyDictionary()
        for param, buffer in state["pairs"]:
            self._buffers[param] = buffer

    def get(self, param: Tensor) -> Tensor | None:
        return self._buffers.get(param)

    def like(self, param: Tensor, tensor: Tensor) -> tuple[Tensor, bool]:
        """(the buffer of ``param`` shaped like ``tensor``, whether it was just made)."""
        buffer = self._buffers.get(param)
        if buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (tensor.shape, tensor.dtype,
                                                                                  tensor.device):
            return buffer, False
        buffer = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        self._buffers[param] = buffer
        return buffer, True

    def state(self, params: Sequence[Tensor]) -> list[Tensor | None]:
        """The buffers of ``params`` in order (None where there is none), for a checkpoint."""
        return [self._buffers.get(p) for p in params]

    def load(self, params: Sequence[Tensor], buffers: Sequence[Tensor | None]) -> None:
        if len(buffers) != len(params):
            raise ValueError(f"the checkpoint has {len(buffers)} buffers for {len(params)} parameters")
        self._buffers = WeakIdKeyDictionary()
        for param, buffer in zip(params, buffers):
            if buffer is not None:
                self._buffers[param] = buffer.to(param.device).clone(memory_format=torch.preserve_format)


def _all_params(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _with_grad(selection: ParamSelection, buffers: list[Tensor]) -> tuple[ParamSelection, list[Tensor]]:
    """The part of a first-step selection whose params still have a gradient of the kept shape."""
    keep = [p.grad is not None and tuple(p.grad.shape) == tuple(p.shape) for p in selection.params]
    if all(keep):
        return selection, buffers
    return selection.subset(keep), [b for b, k in zip(buffers, keep) if k]


def _device_scalars(values: Sequence[float], device: torch.device) -> list[Tensor]:
    """0-d float64 device tensors of host values (a fill, no synchronisation), shared per distinct value."""
    made = {v: torch.full((), v, dtype=torch.float64, device=device) for v in dict.fromkeys(values)}
    return [made[v] for v in values]


class _KeepsFirstGradient:
    """Copies g, the gradient of the first pass, into a per-param buffer before the perturbation."""

    _kept: ParamSelection
    _kept_grads: list[Tensor]

    def _init_kept(self, store: _ParamBuffers | None = None) -> None:
        self._kept_store = store if store is not None else _ParamBuffers()
        self._kept = ParamSelection()
        self._kept_grads = []
        self._kept_inv_scale: Tensor | None = None

    @torch.compiler.disable
    def second_step(self, zero_grad: bool = False, scaler: "torch.amp.GradScaler | None" = None) -> None:
        # The kept g is the scaled first-pass gradient; when the caller already unscaled .grad (g_sam) through
        # scaler.unscale_(opt.base_optimizer), e.g. to clip, the kept g is unscaled the same way first.
        base = self.base_optimizer
        if scaler is not None and scaler.is_enabled() and _stage_name(scaler, base) == "UNSCALED":
            self._kept_inv_scale = scaler._scale.double().reciprocal().float()
        try:
            super().second_step(zero_grad, scaler)
        finally:
            self._kept_inv_scale = None

    def _keep_first_gradient(self, plan) -> None:
        selection = self._select(plan, needs_grad=True)
        grads = selection.grads
        buffers = [self._kept_store.like(p, g)[0] for p, g in zip(selection.params, grads)]
        if buffers:
            F.copy_(buffers, grads, backend=self._backend)
        selection.saved = None  # the saved weights are looked up by the perturbation's own selection
        self._kept, self._kept_grads = selection, buffers

    def _take_kept(self) -> tuple[ParamSelection, list[Tensor]]:
        selection, buffers = _with_grad(self._kept, self._kept_grads)
        self._kept, self._kept_grads = ParamSelection(), []
        inv = self._kept_inv_scale
        if inv is not None and buffers:
            inv = inv.to(buffers[0].device)
            F.combine_(buffers, buffers, [inv] * len(buffers), [torch.zeros_like(inv)] * len(buffers),
                       backend=self._backend)
        return selection, buffers


class _GradientDecomposition(_KeepsFirstGradient):
    """GSAM's update: .grad ← g_sam − α·g_⊥, g_⊥ the part of g orthogonal to g_sam (global dot products)."""

    @torch.no_grad()
    def _before_base_step(self) -> None:
        selection, kept = self._take_kept()
        if not selection.params:
            return
        g_sam = selection.grads
        sums = selection.all_reduce_(F.pair_sums(kept, g_sam, backend=self._backend))  # (Σ g·g_sam, Σ g², Σ g_sam²)
        a, b = F.gsam_coefficients(sums, selection.per_tensor("alpha"))
        F.combine_(g_sam, kept, a, b, backend=self._backend)


# ------------------------------------------------------------------ GSAM
class GSAM(_GradientDecomposition, FirstOrderSAM):
    r"""Surrogate Gap Guided SAM (Zhuang et al., ICLR 2022, arXiv:2203.08065).

    g = ∇L(w), ε = ρ · g / (‖g‖ + 1e-12), g_sam = ∇L(w + ε) (SAM's two passes). Decompose g into its part
    parallel to g_sam and the rest, g_⊥ = g − ((g·g_sam) / (‖g_sam‖ + 1e-12)²) · g_sam, and let the base
    optimizer step with

        g_sam − α · g_⊥

    (norms and dot products global over all parameters; α and ρ per param group). The paper schedules ρ
    in proportion to the learning rate: :class:`ProportionalRho`. Extra memory: one buffer (g) per
    parameter for the step. When a sum is not finite the decomposition is skipped (the base step gets g_sam).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        alpha: float = 0.4,
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, eta=0.0, p=2, granularity=None, backend=backend,
                         extra_defaults={"alpha": alpha}, **base_kwargs)
        self._init_kept()

    @torch.compiler.disable
    def first_step(self, zero_grad: bool = False) -> None:
        """Keep g, then move to w + ε as SAM does."""
        self._expect("idle", "first_step()", "call second_step() to finish the previous step, or restore()")
        self._keep_first_gradient(self._plan())
        super().first_step(zero_grad)


class RGSAM(_GradientDecomposition, RSAM):
    r"""R-GSAM: R-SAM's perturbation with GSAM's decomposition (Liu et al., NeurIPS 2022, Fig. 3a).

    :meth:`noise_step` moves to ŵ = w + δ₀ (kernel-scaled Gaussian noise, as :class:`RSAM`); the first
    backward gives g = ∇L(ŵ); :meth:`first_step` keeps g and moves to w + ε with R-SAM's
    ε = ρ · d / ‖d‖, d = δ₀/‖δ₀‖ + λ · g/‖g‖; the second backward gives g_sam = ∇L(w + ε), and the base
    optimizer steps with g_sam − α · g_⊥, g_⊥ = g − ((g·g_sam)/(‖g_sam‖ + 1e-12)²) · g_sam. With γ = 0,
    δ₀ = 0, ŵ = w and this is GSAM (up to the rounding of the 1e-12 guards). Extra memory: one buffer (g).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        alpha: float = 0.4,
        gamma: float = 0.1,
        lam: float = 1.0,
        seed: int | None = None,
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, gamma, lam, seed, backend=backend,
                         extra_defaults={"alpha": alpha}, **base_kwargs)
        self._init_kept()

    @torch.compiler.disable
    def first_step(self, zero_grad: bool = False) -> None:
        """Keep g(ŵ), then move to w + ε as R-SAM does."""
        self._expect("noised", "first_step()", "call noise_step() before the first forward pass")
        self._keep_first_gradient(self._step_plan)
        super().first_step(zero_grad)


class ProportionalRho:
    r"""GSAM's schedule of ρ: proportional to the learning rate (Zhuang et al. 2022, §5).

    ``step()`` sets every param group's ρ to

        ρ = ρ_min + (ρ_max − ρ_min) · (lr − lr_min) / (lr_max − lr_min)

    from the group's current ``lr`` (ρ_max when lr_max = lr_min). Call it after the LR scheduler's step;
    it is called once at construction. ``rho_key`` names the group key it writes (``"rho"``).
    """

    def __init__(
        self, optimizer: Optimizer, *, rho_max: float, rho_min: float, lr_max: float, lr_min: float = 0.0,
        rho_key: str = "rho",
    ) -> None:
        if not 0 <= rho_min <= rho_max or not math.isfinite(rho_max):
            raise ValueError(f"need 0 <= rho_min <= rho_max < inf, got rho_min={rho_min}, rho_max={rho_max}")
        if not lr_min <= lr_max:
            raise ValueError(f"need lr_min <= lr_max, got lr_min={lr_min}, lr_max={lr_max}")
        self.optimizer = optimizer
        self.rho_max, self.rho_min, self.lr_max, self.lr_min = float(rho_max), float(rho_min), float(lr_max), float(lr_min)
        self.rho_key = rho_key
        self.step()

    def rho_for(self, lr: float) -> float:
        if self.lr_max == self.lr_min:
            return self.rho_max
        fraction = (float(lr) - self.lr_min) / (self.lr_max - self.lr_min)
        return max(0.0, self.rho_min + (self.rho_max - self.rho_min) * fraction)

    def step(self) -> list[float]:
        values = []
        for group in self.optimizer.param_groups:
            group[self.rho_key] = self.rho_for(group["lr"])
            values.append(group[self.rho_key])
        return values


# ------------------------------------------------------------------ LookSAM
class LookSAM(_KeepsFirstGradient, FirstOrderSAM):
    r"""LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization",
    arXiv:2203.02714).

    Every k-th step (steps 0, k, 2k, …) is a SAM step: g = ∇L(w), ε = ρ · g/(‖g‖ + 1e-12),
    g_sam = ∇L(w + ε); the base optimizer steps with g_sam, and LookSAM keeps

        g_v = g_sam − ((g·g_sam) / (‖g‖ + 1e-12)²) · g,

    the part of g_sam orthogonal to g. The other steps take one forward/backward (g at w) and step with

        g + α · ‖g‖ / (‖g_v‖ + 1e-12) · g_v.

    Norms and dot products are global over all parameters (the paper's vectors; pytorch-optimizer 4.1
    computes them per tensor). ``step(closure)`` calls the closure twice on SAM steps and once otherwise;
    with the explicit API, :attr:`needs_second_pass` says whether the step under way (or about to start)
    needs the second forward/backward between :meth:`first_step` and :meth:`second_step`::

        loss.backward(); opt.first_step(zero_grad=True)
        if opt.needs_second_pass:
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    On a step without a second pass :meth:`first_step` moves nothing and leaves ``.grad`` (the gradient the
    base step uses) alone, whatever ``zero_grad`` says. ``rho`` and ``alpha`` may be set per param group;
    ``k`` holds for the optimizer. Extra memory: one buffer (g_v) per parameter, kept across steps and
    saved by :meth:`state_dict` with the step counter.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        self._k = self._check_k(k)
        self._looksam_step = 0
        super().__init__(params, base_optimizer, rho=rho, eta=0.0, p=2, granularity=None, backend=backend,
                         extra_defaults={"alpha": alpha}, **base_kwargs)
        self._init_kept(_ParamBuffers(persistent=True))  # g during a SAM step, then g_v
        self._sam_pass = False

    @staticmethod
    def _check_k(k) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        return k

    @property
    def k(self) -> int:
        return self._k

    @property
    def needs_second_pass(self) -> bool:
        """Whether the current step is a SAM step (a second forward/backward at w + ε)."""
        return self._looksam_step % self._k == 0

    @torch.compiler.disable
    def first_step(self, zero_grad: bool = False) -> None:
        """SAM step: keep g, move to w + ε. Other steps: nothing moves and ``.grad`` stays."""
        self._expect("idle", "first_step()", "call second_step() to finish the previous step, or restore()")
        self._sam_pass = self.needs_second_pass
        if self._sam_pass:
            self._keep_first_gradient(self._plan())
            super().first_step(zero_grad)
            return
        plan = self._begin()
        self._select(plan, needs_grad=True)  # the gradients are checked as on a SAM step (nothing is written)
        self._perturbed = ParamSelection()
        self._path = "generic"
        if self._nonfinite is not None:
            self._nonfinite.fill_(False)  # nothing was perturbed: a scaler must not skip for a past step
        self._perturbed_now(False)

    @torch.no_grad()
    def _before_base_step(self) -> None:
        if self._sam_pass:
            selection, kept = self._take_kept()  # kept: g, becomes g_v
            if selection.params:
                g_sam = selection.grads
                sums = selection.all_reduce_(F.pair_sums(kept, g_sam, backend=self._backend))
                a, b = F.looksam_orthogonal_coefficients(sums, len(kept))
                F.combine_(kept, g_sam, a, b, backend=self._backend)
            return
        selection = self._select(self._step_plan, needs_grad=True)
        grads = selection.grads
        keep = [self._kept_store.get(p) is not None and self._kept_store.get(p).shape == g.shape
                for p, g in zip(selection.params, grads)]
        if not all(keep):  # params that never had a SAM step have no g_v: they step with g
            selection = selection.subset(keep)
            grads = selection.grads
        if not selection.params:
            return
        g_v = [self._kept_store.get(p) for p in selection.params]
        sums = selection.all_reduce_(F.pair_sums(g_v, grads, backend=self._backend))  # (Σ g_v·g, Σ g_v², Σ g²)
        a, b = F.looksam_reuse_coefficients(sums, selection.per_tensor("alpha"))
        F.combine_(grads, g_v, a, b, backend=self._backend)

    def _after_second_step(self) -> None:
        self._looksam_step += 1

    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None, scaler: "torch.amp.GradScaler | None" = None) -> Any:
        """One LookSAM step: the closure runs twice on SAM steps (every k-th), once on the others."""
        if closure is None or self.needs_second_pass:
            return super().step(closure, scaler)
        calls = 0

        def first_call_only():  # the protocol's second call: nothing to compute, .grad keeps g
            nonlocal calls
            calls += 1
            return closure() if calls == 1 else None

        return super().step(first_call_only, scaler)

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "k": self._k, "step": self._looksam_step,
                "g_v": self._kept_store.state(_all_params(self))}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._k = self._check_k(extra.get("k", self._k))
        self._looksam_step = int(extra.get("step", self._looksam_step))
        if "g_v" in extra:
            self._kept_store.load(_all_params(self), extra["g_v"])


# ------------------------------------------------------------------ WSAM
class WSAM(_KeepsFirstGradient, FirstOrderSAM):
    r"""Weighted SAM (Yue et al., KDD 2023, arXiv:2305.15817): sharpness as a weighted regulariser.

    The loss is L(w) + β · (max_{‖ε‖≤ρ} L(w + ε) − L(w)) with β = γ / (1 − γ) (0 ≤ γ < 1; γ = 1/2 is
    SAM). With g = ∇L(w), ε = ρ · g/(‖g‖ + 1e-12) and g_sam = ∇L(w + ε):

    * ``decouple=False``: the base optimizer steps with β · g_sam + (1 − β) · g;
    * ``decouple=True`` (the paper's default): the base optimizer steps with g, then
      w ← w − lr · β · (g_sam − g), the sharpness term applied outside the base optimizer (like decoupled
      weight decay).

    When the first pass is not finite (SAM skips ε, ``found_nonfinite``), the base step takes g_sam alone.

    ``rho`` and ``gamma`` may be set per param group, ``decouple`` holds for the optimizer. Extra memory:
    one buffer per parameter for the step (g, then g_sam − g). ``decouple=True`` does not take a
    ``GradScaler`` (the sharpness term would need unscaling outside the base step).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        self._decouple = bool(decouple)
        super().__init__(params, base_optimizer, rho=rho, eta=0.0, p=2, granularity=None, backend=backend,
                         extra_defaults={"gamma": gamma}, **base_kwargs)
        self._check_gammas()
        self._init_kept()
        self._sharpness: tuple[ParamSelection, list[Tensor]] | None = None

    @property
    def decouple(self) -> bool:
        return self._decouple

    def _check_gammas(self) -> None:
        self._check_groups()  # a number >= 0 first, with the common message
        for number, group in enumerate(self.param_groups):
            if not group["gamma"] < 1:
                raise ValueError(f"WSAM: param_groups[{number}]['gamma'] must be in [0, 1), got {group['gamma']!r}")

    def _betas(self, selection: ParamSelection) -> list[float]:
        return [gamma / (1.0 - gamma) for gamma in selection.per_tensor("gamma")]

    @torch.compiler.disable
    def first_step(self, zero_grad: bool = False) -> None:
        """Keep g, then move to w + ε as SAM does."""
        self._expect("idle", "first_step()", "call second_step() to finish the previous step, or restore()")
        self._check_gammas()
        self._keep_first_gradient(self._plan())
        super().first_step(zero_grad)

    @torch.compiler.disable
    def second_step(self, zero_grad: bool = False, scaler: "torch.amp.GradScaler | None" = None) -> None:
        if scaler is not None and self._decouple:
            raise ValueError("WSAM(decouple=True) does not take a GradScaler; use decouple=False with AMP")
        super().second_step(zero_grad, scaler)

    @torch.no_grad()
    def _before_base_step(self) -> None:
        selection, kept = self._take_kept()
        if not selection.params:
            return
        grads = selection.grads
        device = grads[0].device
        # A non-finite first pass (SAM skipped ε): the base step takes g_sam, as SAM's would.
        skip = self._nonfinite.to(device)
        if self._decouple:
            F.split_difference_(grads, kept, [skip] * len(grads), backend=self._backend)  # .grad ← g, kept ← s
            self._sharpness = (selection, kept)
            return
        betas = self._betas(selection)
        one, zero = torch.ones((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.float64, device=device)
        a = [torch.where(skip, one, beta) for beta in _device_scalars(betas, device)]
        b = [torch.where(skip, zero, rest) for rest in _device_scalars([1.0 - beta for beta in betas], device)]
        F.combine_(grads, kept, a, b, backend=self._backend)

    @torch.no_grad()
    def _after_second_step(self) -> None:
        if self._sharpness is None:
            return
        (selection, sharpness), self._sharpness = self._sharpness, None
        device = sharpness[0].device
        coefs = [-group["lr"] * beta for group, beta in zip(selection.groups, self._betas(selection))]
        F.combine_(selection.tensors, sharpness, _device_scalars([1.0] * len(coefs), device),
                   _device_scalars(coefs, device), backend=self._backend)

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "decouple": self._decouple}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._decouple = bool(extra.get("decouple", self._decouple))


# ------------------------------------------------------------------ FriendlySAM
class FriendlySAM(SharpnessAwareOptimizer):
    r"""Friendly SAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization", arXiv:2403.12350).

    The perturbation leaves out the full-batch part of the gradient, estimated by an EMA m of past
    gradients. At step t, with g_t = ∇L(w):

        d = g_t − σ · m_{t−1},   ε = ρ · d / (‖d‖ + 1e-12),   m_t = λ · m_{t−1} + (1 − λ) · g_t,

    and m starts as the first gradient (m_1 = g_1, d = g_1: the first step is SAM's). This follows the
    authors' code (and pytorch-optimizer 4.1): d uses m_{t−1}, the EMA before g_t is added. The base
    optimizer steps with g_sam = ∇L(w + ε). ``rho``, ``sigma``, ``lmbda`` may be set per param group
    (0 ≤ λ ≤ 1). Extra memory: one buffer (m) per parameter, kept across steps and saved by
    :meth:`state_dict`. A non-finite ‖d‖ skips ε (as SAM); an element whose new m is not finite keeps
    its old m. With a ``GradScaler`` m holds scaled gradients: after the scale changes, d mixes the two
    scales until the EMA forgets the old one (about 1/(1 − λ) steps).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, {"rho": rho, "sigma": sigma, "lmbda": lmbda}, backend=backend,
                         **base_kwargs)
        self._check_lmbdas()
        self._moments = _ParamBuffers(persistent=True)

    def _check_lmbdas(self) -> None:
        self._check_groups()  # a number >= 0 first, with the common message
        for number, group in enumerate(self.param_groups):
            if not group["lmbda"] <= 1:
                raise ValueError(f"FriendlySAM: param_groups[{number}]['lmbda'] must be in [0, 1], "
                                 f"got {group['lmbda']!r}")

    @torch.compiler.disable
    def first_step(self, zero_grad: bool = False) -> None:
        """m and d = g − σ·m, then save w and move to w + ρ·d/‖d‖."""
        self._expect("idle", "first_step()", "call second_step() to finish the previous step, or restore()")
        plan = self._begin()
        self._check_lmbdas()
        self._generic_first_step(plan)
        self._perturbed_now(zero_grad)

    @torch.no_grad()
    def _generic_first_step(self, plan) -> None:
        selection = self._select(plan, needs_grad=True)
        grads = selection.grads
        moments, sigmas, lmbdas = [], [], []
        for param, grad, group in zip(selection.params, grads, selection.groups):
            moment, fresh = self._moments.like(param, grad)
            moments.append(moment)
            # A fresh m is zero: σ = λ = 0 give d = g and m = g, the first step of the EMA.
            sigmas.append(0.0 if fresh else group["sigma"])
            lmbdas.append(0.0 if fresh else group["lmbda"])
        saved = self._allocate_saved(selection)
        if selection.params:
            sq_sum = F.residual_sq_sum(selection.tensors, grads, moments, sigmas=sigmas, backend=self._backend)
            scales, skipped = F.sam_scales(selection.all_reduce_(sq_sum), selection.per_tensor("rho"))
            F.residual_perturb_(selection.tensors, grads, moments, saved, scales, sigmas=sigmas, lmbdas=lmbdas,
                                backend=self._backend)
            self._record_skip(skipped, selection.tensors[0].device)
        self._perturbed = selection
        self._path = "generic"

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "momentum": self._moments.state(_all_params(self))}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if "momentum" in extra:
            self._moments.load(_all_params(self), extra["momentum"])
