"""The R-SAM noise stream: Philox4x32-10 known answers, Box–Muller, σ_i per filter."""

import math

import pytest
import torch

from sam_kernels import functional as F
from sam_kernels import noise
from helpers import BACKENDS

# Known-answer vectors of Random123's kat_vectors for philox4x32_10.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF,) * 4,
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = tuple(torch.tensor([c], dtype=torch.int64) for c in counter)
    out = noise.philox4x32_10(words, key)
    assert tuple(int(x) for x in out) == expected


def test_seed_splits_into_key_words():
    assert noise.seed_to_key(0x0123456789ABCDEF) == (0x89ABCDEF, 0x01234567)
    with pytest.raises(ValueError, match="seed"):
        noise.seed_to_key(2**64)


def test_unit_float_is_exact_and_open():
    x = torch.tensor([0, 1, 511, 512, 0xFFFFFFFF, 0x80000000], dtype=torch.int64)
    u = noise.uint32_to_unit_float(x)
    expected = [((v >> 9) + 0.5) / 2**23 for v in x.tolist()]
    assert u.dtype == torch.float32
    assert u.tolist() == expected  # exact, not approximate
    assert bool((u > 0).all()) and bool((u < 1).all())


def test_stream_layout_follows_the_counter_definition():
    """Element 4c+k takes z_k of block c; block c uses counter (c mod 2^32, c >> 32, j, s)."""
    seed, j, s = 0xDEADBEEF12345678, 7, 3
    z = noise.standard_normal(10, seed=seed, tensor_index=j, step=s)
    key = noise.seed_to_key(seed)
    for c in range(3):
        counter = tuple(torch.tensor([v], dtype=torch.int64) for v in (c, 0, j, s))
        x = noise.philox4x32_10(counter, key)
        u = [noise.uint32_to_unit_float(v) for v in x]
        r01 = math.sqrt(-2 * math.log(float(u[0])))
        r23 = math.sqrt(-2 * math.log(float(u[2])))
        expected = [
            r01 * math.cos(2 * math.pi * float(u[1])),
            r01 * math.sin(2 * math.pi * float(u[1])),
            r23 * math.cos(2 * math.pi * float(u[3])),
            r23 * math.sin(2 * math.pi * float(u[3])),
        ]
        for k in range(4):
            if 4 * c + k < 10:
                assert float(z[4 * c + k]) == pytest.approx(expected[k], rel=1e-5, abs=1e-5)


def test_high_block_numbers_use_the_second_counter_word():
    key = noise.seed_to_key(5)
    block = torch.tensor([2**32 + 3], dtype=torch.int64)
    z = noise.normal_blocks(block, 1, 0, key)
    low_only = noise.normal_blocks(torch.tensor([3], dtype=torch.int64), 1, 0, key)
    assert not torch.equal(z, low_only)


def test_batched_stream_equals_per_tensor_stream():
    numels, indices = [5, 0, 1, 1001, 16], [0, 3, 4, 9, 2]
    batched = noise.standard_normal_multi(numels, seed=99, tensor_indices=indices, step=11)
    for n, j, z in zip(numels, indices, batched):
        assert torch.equal(z, noise.standard_normal(n, seed=99, tensor_index=j, step=11))


def test_streams_differ_by_seed_tensor_and_step():
    base = noise.standard_normal(64, seed=1, tensor_index=0, step=0)
    for kwargs in ({"seed": 2, "tensor_index": 0, "step": 0}, {"seed": 1, "tensor_index": 1, "step": 0},
                   {"seed": 1, "tensor_index": 0, "step": 1}):
        assert not torch.allclose(base, noise.standard_normal(64, **kwargs))


def test_stream_is_standard_normal():
    z = noise.standard_normal(200_000, seed=12345, tensor_index=0, step=0).double()
    assert abs(float(z.mean())) < 0.01
    assert float(z.std()) == pytest.approx(1.0, abs=0.01)
    # Tail mass beyond 2σ of a normal: 4.55 %.
    assert float((z.abs() > 2).double().mean()) == pytest.approx(0.0455, abs=0.003)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_std_per_filter_matches_sigma(backend):
    gamma = 0.1
    filter_scales = torch.tensor([0.5, 1.0, 3.0, 10.0], dtype=torch.float64)
    w = torch.randn(4, 20_000, dtype=torch.float64) * filter_scales[:, None]
    bias = torch.rand(50_000, dtype=torch.float64) + 0.5
    params = [w.clone().float(), bias.clone().float()]
    saved = [torch.empty_like(p) for p in params]
    F.add_noise_(params, saved, gammas=gamma, stream=F.NoiseStream(2024, 0, [0, 1]), backend=backend)
    delta = (params[0].double() - w.float().double())
    sigma = gamma * w.float().double().norm(dim=1) / math.sqrt(w.shape[1])
    assert torch.allclose(delta.std(dim=1), sigma, rtol=0.03)
    # ndim ≤ 1: every element is its own group, σ = γ|w|: the standardised noise is N(0, 1).
    standardised = (params[1].double() - bias.float().double()) / (gamma * bias.float().double())
    assert float(standardised.std()) == pytest.approx(1.0, abs=0.02)
    assert torch.equal(saved[0], w.float())
