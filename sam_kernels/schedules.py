"""Which steps are SAM steps: the ``schedule=`` of every two-pass optimizer (docs/DESIGN.md §2.8).

A skipped step is the base optimizer's plain step: one forward/backward, no
perturbation, no saved copy. The decision for step t (counted from 0 over all
steps, SAM or not) is

* ``None`` — every step (the default);
* an int k — steps with t mod k = 0 (Composer's ``interval``);
* :class:`Bernoulli` — u_t < p(t), u_t a uniform number from a counter-based
  hash of (seed, t) on the host: reproducible, the same on every rank and backend
  (RST / SS-SAM, Zhao et al. 2022);
* :class:`Adaptive` — ‖g_t‖² ≥ μ + c·σ with μ, σ² running (EMA β) statistics of
  ‖g‖² over the previous steps (AE-SAM, Jiang et al. 2023). It needs the first-pass
  gradient, so it is decided after the first backward and reads one number from the
  device per step (the decision controls whether a second forward runs).

Schedules are small host-side objects whose state (counters, statistics) goes
into the optimizer's ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Schedule:
    """Every step is a SAM step. Subclasses decide per step ``t``."""

    needs_gradient = False  # True: decided from the first-pass gradient (after the first backward)

    def due(self, t: int) -> bool:
        return True

    def due_given(self, t: int, grad_sq_norm: float) -> bool:  # pragma: no cover - adaptive only
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Interval(Schedule):
    """A SAM step when t mod k = 0."""

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"schedule interval must be an int >= 1, got {k!r}")
        self.k = k

    def due(self, t: int) -> bool:
        return t % self.k == 0

    def __repr__(self) -> str:
        return f"Interval({self.k})"


class Bernoulli(Schedule):
    """A SAM step when u_t < p(t); u_t = splitmix64(seed ⊕ splitmix64(t)) / 2⁶⁴.

    ``p`` is a probability or a function of the step t returning one (RST's
    scheduled probability). ``seed`` (64-bit) is drawn from torch's default
    generator when None; pass the same seed on every rank.
    """

    def __init__(self, p: float | Callable[[int], float], seed: int | None = None) -> None:
        if not callable(p):
            _check_probability(p)
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"Bernoulli seed must be an int in [0, 2**64), got {seed!r}")
        self.p, self.seed = p, seed

    def uniform(self, t: int) -> float:
        return _splitmix64(self.seed ^ _splitmix64(t)) / 2.0 ** 64

    def due(self, t: int) -> bool:
        p = _check_probability(self.p(t)) if callable(self.p) else self.p
        return self.uniform(t) < p

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))

    def __repr__(self) -> str:
        return f"Bernoulli(p={self.p!r}, seed={self.seed})"


class Adaptive(Schedule):
    """AE-SAM: a SAM step when ‖g_t‖² ≥ μ_{t−1} + c·σ_{t−1}, then
    μ_t = β μ_{t−1} + (1 − β) ‖g_t‖², σ²_t = β σ²_{t−1} + (1 − β)(‖g_t‖² − μ_t)².

    ‖g_t‖² is the squared global norm of the first-pass gradient, summed in float64.
    The first step (no statistics yet) is a SAM step.
    """

    needs_gradient = True

    def __init__(self, c: float = 0.0, beta: float = 0.9) -> None:
        if not (isinstance(c, (int, float)) and math.isfinite(c)):
            raise ValueError(f"Adaptive c must be a finite number, got {c!r}")
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"Adaptive beta must be in [0, 1), got {beta!r}")
        self.c, self.beta = float(c), float(beta)
        self.mean, self.var, self.count = 0.0, 0.0, 0

    def due_given(self, t: int, grad_sq_norm: float) -> bool:
        if not math.isfinite(grad_sq_norm):
            return False  # a non-finite gradient: no perturbation (and no statistics from it)
        due = self.count == 0 or grad_sq_norm >= self.mean + self.c * math.sqrt(self.var)
        if self.count == 0:
            self.mean, self.var = grad_sq_norm, 0.0
        else:
            self.mean = self.beta * self.mean + (1.0 - self.beta) * grad_sq_norm
            self.var = self.beta * self.var + (1.0 - self.beta) * (grad_sq_norm - self.mean) ** 2
        self.count += 1
        return due

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])

    def __repr__(self) -> str:
        return f"Adaptive(c={self.c}, beta={self.beta})"


def _check_probability(p) -> float:
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"Bernoulli probability must be in [0, 1], got {p!r}")
    return float(p)


def make_schedule(schedule) -> Schedule:
    """The ``schedule=`` argument as a :class:`Schedule`."""
    if schedule is None:
        return Schedule()
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, int) and not isinstance(schedule, bool):
        return Interval(schedule)
    raise ValueError(f"schedule must be None, an int k, Bernoulli(...) or Adaptive(...), got {schedule!r}")
