"""The cached step plan: what every step of one optimizer touches, built once per param list.

A :class:`StepPlan` holds the optimizer's parameters in their stable order
(param groups in order, params in order, frozen ones too: position ``i`` is
the tensor number j of the R-SAM noise stream), each one's group and
position, the saved-copy buffers and, when the backend offers one, the
backend's own whole-step plan (``backend.make_plan``; ``cpp`` builds a C++
object that runs each phase of a step in one call).

It depends only on the structure of ``param_groups`` — which group dicts,
which params lists, how long — so it is rebuilt when that changes
(``add_param_group``, ``load_state_dict``, a base optimizer loading state or
given new groups). Everything else a step depends on is read at the step:
which params have a gradient, their current storage, dtype and shape (after
``.to()``), the hyperparameters in the groups (schedulers may change them).
See docs/DESIGN.md §5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .sharding import is_sharded


def structure_key(param_groups: Sequence[dict]) -> tuple:
    """What a plan depends on: the identity of each group dict and params list, and its length."""
    return tuple((id(group), id(group["params"]), len(group["params"])) for group in param_groups)


class StepPlan:
    """The params of ``param_groups`` in stable order, with their saved buffers and the backend's own plan."""

    def __init__(self, param_groups: Sequence[dict]) -> None:
        self.key = structure_key(param_groups)
        self.params: list[Tensor] = [p for group in param_groups for p in group["params"]]
        self.group_of: list[int] = [g for g, group in enumerate(param_groups) for _ in group["params"]]
        self.positions: list[tuple[int, int]] = [
            (g, k) for g, group in enumerate(param_groups) for k in range(len(group["params"]))
        ]
        self.sharded = any(is_sharded(p) for p in self.params)
        # The backend's whole-step plan (None: every phase runs through the functional layer).
        self.native: Any = None
        self._saved: list[Tensor | None] = [None] * len(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def saved(self, i: int) -> Tensor | None:
        """The buffer holding param ``i``'s weights (its local shard) during a step, if one exists."""
        return self.native.saved(i) if self.native is not None else self._saved[i]

    def set_saved(self, i: int, buffer: Tensor) -> None:
        if self.native is not None:
            self.native.set_saved(i, buffer)
        else:
            self._saved[i] = buffer

    @staticmethod
    def device_of(param_groups: Sequence[dict]) -> torch.device | None:
        """The one device of every param, or None (no params, several devices, or DTensors)."""
        devices = {p.device for group in param_groups for p in group["params"]}
        return devices.pop() if len(devices) == 1 else None
