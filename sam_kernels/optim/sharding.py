"""FSDP2 support: parameters that are DTensors sharded along dim 0.

The optimizer works on each rank's local shard (a view of the parameter's
storage). Filters are dim-0 slices, so with dim-0 sharding every filter lies
whole on one rank and per-filter norms need no communication; the global
sums (‖g‖², R-SAM's Σδ₀², …) are summed over the shards with one all-reduce.
R-SAM's noise is drawn at each element's global index, so a sharded run
perturbs exactly as an unsharded one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # torch.distributed may be absent from a build
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = None
    Shard = None


def is_sharded(tensor: Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The rank-local shard (a view sharing the parameter's storage), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_of(param: Tensor, name: str, owner: str) -> tuple[int, object]:
    """(global index of the local shard's first element, the process group of its mesh)."""
    mesh = param.device_mesh
    if mesh.ndim != 1 or len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise RuntimeError(
            f"{owner} supports DTensor parameters sharded along dim 0 on a 1-D mesh (FSDP2's fully_shard); "
            f"{name} has placements {param.placements} on a {mesh.ndim}-D mesh"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, mesh, param.placements)
    first_row = offset[0] if offset else 0
    return first_row * math.prod(param.shape[1:]), mesh.get_group()


def all_reduce_sum_(tensor: Tensor, group) -> Tensor:
    """Sum a (small) tensor of per-rank partial sums over the shards' process group, in place."""
    if group is not None:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
    return tensor
