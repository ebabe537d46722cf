"""Host-side metadata of the Triton kernels: tile tables, device arrays.

A *bucket* is the tensors of one call that share (weight dtype, gradient
dtype) and are contiguous; one launch covers a bucket. Everything derived
from shapes (tile tables, filter tables, offsets) is cached here by the
shapes; the call plans of ``__init__.py`` cache the buckets by the lists'
signature and the address and hyperparameter arrays by their values, so a step
whose storage and settings did not change copies nothing from the host (the
copy would be a synchronisation, and would break CUDA-graph capture). New
arrays travel through pinned memory with ``non_blocking=True``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_CACHE_SIZE = 256


@dataclass(frozen=True)
class StaticLayout:
    """Tile and filter tables of one bucket, derived from its shapes only."""

    numels: Tensor  # int64 [n]
    fsizes: Tensor  # int64 [n]: elements per filter, 0 for ndim ≤ 1
    n_filters: Tensor  # int64 [n]
    fnorm_offs: Tensor  # int64 [n]: start of each tensor's filter norms
    total_filters: int
    tile_tensor: Tensor  # int32 [tiles]
    tile_start: Tensor  # int64 [tiles]
    num_tiles: int
    ftile_tensor: Tensor  # int32 [filter tiles]
    ftile_row: Tensor  # int64 [filter tiles]
    num_ftiles: int
    has_filters: bool


def device_array(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A device copy of host values that never waits for the device."""
    host = torch.tensor(list(values), dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def static_layout(shapes: tuple[tuple[int, ...], ...], device: torch.device, block: int, rows: int) -> StaticLayout:
    numels, fsizes, n_filters, fnorm_offs = [], [], [], []
    tile_tensor, tile_start, ftile_tensor, ftile_row = [], [], [], []
    total_filters = 0
    for slot, shape in enumerate(shapes):
        numel = math.prod(shape)
        filters = shape[0] if len(shape) >= 2 else 0
        fsize = math.prod(shape[1:]) if filters else 0
        numels.append(numel)
        fsizes.append(fsize)
        n_filters.append(filters)
        fnorm_offs.append(total_filters)
        total_filters += filters
        for start in range(0, numel, block):
            tile_tensor.append(slot)
            tile_start.append(start)
        if fsize:
            for row in range(0, filters, rows):
                ftile_tensor.append(slot)
                ftile_row.append(row)
    as_device = lambda values, dtype: device_array(values, dtype, device)  # noqa: E731
    return StaticLayout(
        numels=as_device(numels, torch.int64),
        fsizes=as_device(fsizes, torch.int64),
        n_filters=as_device(n_filters, torch.int64),
        fnorm_offs=as_device(fnorm_offs, torch.int64),
        total_filters=total_filters,
        tile_tensor=as_device(tile_tensor, torch.int32),
        tile_start=as_device(tile_start, torch.int64),
        num_tiles=len(tile_tensor),
        ftile_tensor=as_device(ftile_tensor, torch.int32),
        ftile_row=as_device(ftile_row, torch.int64),
        num_ftiles=len(ftile_tensor),
        has_filters=bool(ftile_tensor),
    )
