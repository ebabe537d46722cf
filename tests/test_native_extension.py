"""The native extension sam_kernels._C: its noise stream against the reference, its
availability report, and its CUDA kernels against its host path (on a GPU).

Parity of the ``cpp`` and ``cuda`` backends with the reference for every optimizer,
variant and dtype is in test_backend_parity.py (they are in FAST_BACKENDS when usable).
"""

import os

import pytest
import torch

import sam_kernels
from sam_kernels import functional as F
from sam_kernels import noise
from test_noise import PHILOX_KAT

_STATUS = sam_kernels.available_backends()
needs_extension = pytest.mark.skipif(_STATUS["cpp"] is not None, reason=f"extension not built: {_STATUS['cpp']}")


def test_extension_is_built_where_the_build_requires_it():
    """CI builds with SAM_KERNELS_REQUIRE_EXTENSION=1: there, a missing backend is a failure, not a skip."""
    if os.environ.get("SAM_KERNELS_REQUIRE_EXTENSION") != "1":
        pytest.skip("SAM_KERNELS_REQUIRE_EXTENSION is not set")
    assert _STATUS["cpp"] is None
    from sam_kernels import _C

    if torch.version.cuda is not None and os.environ.get("SAM_KERNELS_NO_CUDA") != "1":
        assert _C.HAS_CUDA, "torch has CUDA, so the CUDA kernels should have been built"


def test_unavailable_backends_say_why():
    for name, reason in _STATUS.items():
        assert reason is None or (isinstance(reason, str) and reason)
    if _STATUS["cpp"] is None:
        from sam_kernels import _C

        assert (_STATUS["cuda"] is None) == (_C.HAS_CUDA and torch.cuda.is_available())
        if not _C.HAS_CUDA:
            assert "without its CUDA kernels" in _STATUS["cuda"]


@needs_extension
@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_host_philox_known_answers(counter, key, expected):
    from sam_kernels import _C

    assert tuple(_C.host.philox4x32_10(list(counter), list(key))) == expected


# Offsets: aligned, mid-block (the stream starts inside a block of four) and past 2^34,
# where block numbers need the counter's second word.
@needs_extension
@pytest.mark.parametrize("offset", [0, 3, 4 * 2**32 + 6])
@pytest.mark.parametrize("numel", [1, 7, 4099])
def test_host_noise_stream_equals_the_reference(numel, offset):
    from sam_kernels import _C

    seed, j, step = torch.randint(0, 2**63 - 1, ()).item(), 5, 17
    expected = noise.standard_normal(numel + offset, seed=seed, tensor_index=j, step=step)[offset:] \
        if offset < 2**20 else _reference_at(numel, seed, j, step, offset)
    actual = _C.host.standard_normal(numel, seed, j, step, offset)
    assert actual.dtype == torch.float32 and actual.shape == (numel,)
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5)


def _reference_at(numel, seed, j, step, offset):
    """The reference stream from element `offset` on, without materialising the elements before it."""
    first, last = offset // 4, (offset + numel - 1) // 4
    blocks = torch.arange(first, last + 1, dtype=torch.int64)
    z = noise.normal_blocks(blocks, j, step, noise.seed_to_key(seed)).reshape(-1)
    start = offset - 4 * first
    return z[start:start + numel]


@needs_extension
@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_host_noise_stream_is_the_same_bits_on_every_instruction_set(isa):
    """The host stream is built for AVX-512 (intrinsics), AVX2 and plain x86-64 and picked at load time;
    SAM_KERNELS_NOISE_ISA picks a narrower one. Every path must give the same bits (docs/DESIGN.md §3)."""
    import subprocess
    import sys

    from sam_kernels import _C

    args = [(4099, 12345, 5, 17, 3), (1, 7, 0, 0, 0), (37, 2**63 + 5, 9, 2, 4 * 2**32 + 6)]
    program = (
        "import sys, torch\n"
        "from sam_kernels import _C\n"
        f"for a in {args!r}:\n"
        "    sys.stdout.write(_C.host.standard_normal(*a).numpy().tobytes().hex() + '\\n')\n"
    )
    env = {**os.environ, "SAM_KERNELS_NOISE_ISA": isa}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = [_C.host.standard_normal(*a).numpy().tobytes().hex() for a in args]
    assert result.stdout.split() == expected


@needs_extension
def test_host_noise_stream_differs_by_tensor_and_step():
    from sam_kernels import _C

    base = _C.host.standard_normal(64, 1, 0, 0, 0)
    assert not torch.allclose(base, _C.host.standard_normal(64, 1, 1, 0, 0))
    assert not torch.allclose(base, _C.host.standard_normal(64, 1, 0, 1, 0))
    assert not torch.allclose(base, _C.host.standard_normal(64, 2, 0, 0, 0))


@needs_extension
def test_cpp_routes_what_it_cannot_take_to_foreach():
    from sam_kernels.backends import native

    w = torch.randn(6, 4).t()  # non-contiguous
    saved = torch.empty_like(w)
    before = w.clone()
    F.add_noise_([w], [saved], gammas=0.1, stream=F.NoiseStream(3, 0, [0]), backend="cpp")
    assert torch.equal(saved, before) and not torch.equal(w, before)
    assert "non-contiguous" in native.ROUTED_TO_FOREACH[(4, 6)]


# ------------------------------------------------------------------ on a GPU
cuda_kernels = pytest.mark.skipif(_STATUS["cuda"] is not None, reason=f"cuda backend: {_STATUS['cuda']}")


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("offset", [0, 1, 4 * 2**32 + 2])
def test_cuda_noise_stream_equals_the_host_stream(offset):
    from sam_kernels import _C

    seed = torch.randint(0, 2**63 - 1, ()).item()
    host = _C.host.standard_normal(100_003, seed, 2, 9, offset)
    device = _C.cuda.standard_normal(100_003, seed, 2, 9, offset)
    torch.testing.assert_close(device.cpu(), host, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_filter_norms_cover_short_and_long_filters(dtype):
    shapes = [(300, 7), (3, 5000), (2, 3, 3, 3), (9,), ()]
    tensors = [torch.randn(s, dtype=dtype, device="cuda") for s in shapes]
    for actual, expected in zip(F.filter_norms(tensors, backend="cuda"), F.filter_norms(tensors, backend="reference")):
        torch.testing.assert_close(actual, expected, rtol=1e-5 if dtype == torch.float64 else 1e-4, atol=1e-6)


@pytest.mark.gpu
@cuda_kernels
def test_cuda_handles_lists_longer_than_one_launch_and_unaligned_tensors():
    """Over kMaxTensors (32) tensors: several launches; views at odd element offsets: no vector loads."""
    storage = torch.randn(100_000, device="cuda")
    params = [storage[1 + 997 * k: 1 + 997 * k + 5 + 13 * k] for k in range(70)]  # contiguous, misaligned
    params += [torch.randn(64, 33, device="cuda") for _ in range(10)]
    grads = [torch.randn_like(p) for p in params]
    etas = [0.01] * len(params)
    for granularity in (None, "element", "filter"):
        expected = F.scaled_grad_sq_sum(params, grads, etas=etas, granularity=granularity, backend="reference")
        actual = F.scaled_grad_sq_sum(params, grads, etas=etas, granularity=granularity, backend="cuda")
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)


def test_package_runs_without_the_extension():
    """An install without a built extension imports, says why cpp/cuda are unavailable, and trains on the rest."""
    import subprocess
    import sys

    program = (
        "import sys; sys.modules['sam_kernels._C'] = None\n"  # makes `from .. import _C` raise ImportError
        "import torch, sam_kernels\n"
        "status = sam_kernels.available_backends()\n"
        "assert 'not built' in status['cpp'] and 'not built' in status['cuda'], status\n"
        "assert sam_kernels.functional.resolve('auto', [torch.zeros(1)]).NAME == 'foreach'\n"
        "w = torch.nn.Parameter(torch.randn(4, 3)); w.grad = torch.randn(4, 3)\n"
        "opt = sam_kernels.SAM([w], torch.optim.SGD, lr=0.1)\n"
        "before = w.detach().clone(); opt.first_step(); assert not torch.equal(w, before); opt.second_step()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
