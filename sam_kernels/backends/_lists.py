"""Small helpers the fused backends share for splitting lists and joining partial results."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pick(items: Sequence, positions: Sequence[int]) -> list:
    """items[i] for i in positions."""
    return [items[i] for i in positions]


def sum_parts(parts: list[Tensor], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Σ of partial totals (one per launch bucket or fallback), in float32 — float64 when any part is.

    Zeros of ``shape`` when there is no part (every tensor was empty).
    """
    if not parts:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    total = parts[0].to(dtype)
    for part in parts[1:]:
        total = total + part.to(dtype)
    return total
