"""The R-SAM noise stream: Philox4x32-10 + Box–Muller, in torch integer arithmetic.

This is the one definition of δ₀'s standard-normal part (docs/DESIGN.md §2, "Noise
stream") that every backend must reproduce:

* key ``(k0, k1) = (seed mod 2³², seed >> 32)``;
* element ``e`` of tensor number ``j`` at R-SAM step ``s`` belongs to block
  ``c = e // 4``, whose counter is ``(c mod 2³², c >> 32, j, s mod 2³²)``;
* each 32-bit output ``x`` becomes ``u = ((x >> 9) + 0.5) · 2⁻²³`` (exact in
  float32, strictly inside (0, 1));
* Box–Muller on ``(u0, u1)`` and ``(u2, u3)``: ``r = √(−2 ln u_a)``,
  ``z_a = r cos(2π u_b)``, ``z_b = r sin(2π u_b)``, in float32; element
  ``4c + k`` takes ``z_k``.

torch has no full uint32 arithmetic, so 32-bit words live in int64 tensors and
the 32×32 → 64-bit products of Philox are split into 16-bit halves, which keeps
every intermediate below 2⁴⁹.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_TWO_PI_F32 = float(torch.tensor(2.0 * math.pi, dtype=torch.float32))
# Blocks generated per chunk: bounds the int64 temporaries to a few hundred MB.
_CHUNK_BLOCKS = 1 << 22


@dataclass(frozen=True)
class NoiseStream:
    """Where the δ₀ of a list of tensors comes from (docs/DESIGN.md §3).

    ``seed`` keys Philox (64-bit); ``step`` is the R-SAM step s; tensor k of the
    list is tensor number ``tensor_indices[k]`` of the stream and its first
    element is element ``element_offsets[k]`` of that tensor (non-zero for a
    dim-0 shard of a bigger tensor, FSDP2; all 0 when None).
    """

    seed: int
    step: int
    tensor_indices: tuple[int, ...]
    element_offsets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensor_indices", tuple(int(j) for j in self.tensor_indices))
        if self.element_offsets is not None:
            object.__setattr__(self, "element_offsets", tuple(int(e) for e in self.element_offsets))

    @property
    def offsets(self) -> tuple[int, ...]:
        """Each tensor's element offset (zeros when none were given)."""
        return self.element_offsets if self.element_offsets is not None else (0,) * len(self.tensor_indices)

    def pick(self, positions: Sequence[int]) -> "NoiseStream":
        """The stream of the tensors at ``positions`` of the list."""
        offsets = None if self.element_offsets is None else tuple(self.element_offsets[i] for i in positions)
        return NoiseStream(self.seed, self.step, tuple(self.tensor_indices[i] for i in positions), offsets)


def seed_to_key(seed: int) -> tuple[int, int]:
    """Split a 64-bit seed into the Philox key (seed mod 2³², seed >> 32)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & _MASK32, seed >> 32


def _mulhilo32(multiplier: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``multiplier * x`` for 32-bit values held in int64."""
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    low_product = x_lo * multiplier  # < 2^48
    carry = x_hi * multiplier + (low_product >> 16)  # < 2^49
    lo = ((carry & 0xFFFF) << 16) | (low_product & 0xFFFF)
    hi = carry >> 16
    return hi, lo


def philox4x32_10(
    counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 (Salmon et al. 2011) on int64 tensors holding uint32 words.

    Each round: ``(hi0, lo0) = M0·c0``, ``(hi1, lo1) = M1·c2``,
    ``c ← (hi1 ⊕ c1 ⊕ k0, lo1, hi0 ⊕ c3 ⊕ k1, lo0)``; the key is bumped by
    ``(W0, W1)`` between rounds.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uint32_to_unit_float(x: Tensor) -> Tensor:
    """``u = ((x >> 9) + 0.5) · 2⁻²³`` as float32, exact and inside (0, 1)."""
    return ((x >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def box_muller(u_a: Tensor, u_b: Tensor) -> tuple[Tensor, Tensor]:
    """Two standard normals from two uniforms, in float32: r = √(−2 ln u_a), θ = 2π u_b."""
    radius = torch.sqrt(-2.0 * torch.log(u_a))
    theta = _TWO_PI_F32 * u_b
    return radius * torch.cos(theta), radius * torch.sin(theta)


def normal_blocks(block: Tensor, tensor_index: Tensor | int, step: int, key: tuple[int, int]) -> Tensor:
    """Standard normals for Philox blocks: returns float32 of shape ``block.shape + (4,)``.

    ``block`` holds block numbers ``c`` (int64); ``tensor_index`` is ``j`` (an
    int or an int64 tensor broadcastable to ``block``).
    """
    c0 = block & _MASK32
    c1 = block >> 32
    c2 = torch.as_tensor(tensor_index, dtype=torch.int64, device=block.device).expand_as(block)
    c3 = torch.full_like(block, step & _MASK32)
    x0, x1, x2, x3 = philox4x32_10((c0, c1, c2, c3), key)
    z0, z1 = box_muller(uint32_to_unit_float(x0), uint32_to_unit_float(x1))
    z2, z3 = box_muller(uint32_to_unit_float(x2), uint32_to_unit_float(x3))
    return torch.stack((z0, z1, z2, z3), dim=-1)


def standard_normal(
    numel: int, *, seed: int, tensor_index: int, step: int, device: torch.device | str = "cpu", offset: int = 0
) -> Tensor:
    """Elements ``offset … offset + numel − 1`` of the stream of tensor ``j`` at step ``s`` (float32, 1-D).

    A shard of a tensor (FSDP) passes the global index of its first element as
    ``offset`` and gets exactly its part of the whole tensor's noise.
    """
    key = seed_to_key(seed)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    first_block, end_block = offset // 4, (offset + numel + 3) // 4
    skip = offset % 4
    for first in range(first_block, end_block, _CHUNK_BLOCKS):
        last = min(first + _CHUNK_BLOCKS, end_block)
        blocks = torch.arange(first, last, dtype=torch.int64, device=device)
        z = normal_blocks(blocks, tensor_index, step, key).reshape(-1)
        start = max(4 * first - offset, 0)  # position in out of this chunk's first kept element
        stop = min(4 * last - offset, numel)
        z_start = skip if first == first_block else 0
        out[start:stop] = z[z_start : z_start + stop - start]
    return out


@functools.lru_cache(maxsize=16)
def _block_layout(block_counts: tuple[int, ...], tensor_indices: tuple[int, ...], device: torch.device):
    """Block number and owning tensor index of every block of a tensor list.

    Built on the host once per layout and cached on the device, so that later
    steps copy nothing from host to device (such a copy would synchronise).
    """
    blocks = torch.cat([torch.arange(n, dtype=torch.int64) for n in block_counts])
    owner = torch.repeat_interleave(
        torch.tensor(tensor_indices, dtype=torch.int64), torch.tensor(block_counts, dtype=torch.int64)
    )
    return blocks.to(device), owner.to(device)


def standard_normal_multi(
    numels: list[int],
    *,
    seed: int,
    tensor_indices: list[int],
    step: int,
    device: torch.device | str = "cpu",
    offsets: list[int] | None = None,
) -> list[Tensor]:
    """The streams of several tensors generated in one batched pass (float32, 1-D each).

    Equal, element for element, to calling :func:`standard_normal` per tensor;
    used by the foreach backend to keep the launch count independent of the
    number of tensors.
    """
    if offsets is not None and any(offsets):
        return [
            standard_normal(n, seed=seed, tensor_index=j, step=step, device=device, offset=o)
            for n, j, o in zip(numels, tensor_indices, offsets)
        ]
    key = seed_to_key(seed)
    block_counts = [(n + 3) // 4 for n in numels]
    total_blocks = sum(block_counts)
    if total_blocks == 0:
        return [torch.empty(0, dtype=torch.float32, device=device) for _ in numels]
    if total_blocks > _CHUNK_BLOCKS:
        return [
            standard_normal(n, seed=seed, tensor_index=j, step=step, device=device)
            for n, j in zip(numels, tensor_indices)
        ]
    blocks, owner = _block_layout(tuple(block_counts), tuple(tensor_indices), torch.device(device))
    z = normal_blocks(blocks, owner, step, key)
    per_tensor = torch.split(z, block_counts)
    return [part.reshape(-1)[:n] for part, n in zip(per_tensor, numels)]
