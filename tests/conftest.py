"""Shared fixtures. Inputs are random and fresh every run; the seed is printed in
the header and can be fixed with SAM_KERNELS_TEST_SEED to reproduce a failure."""

from __future__ import annotations

import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be on
    # before any kernel is defined, i.e. before sam_kernels' Triton backend loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_rounds_bfloat16_to_nearest() -> None:
    """Triton 3.7's interpreter converts float32 to bfloat16 by truncation; a GPU rounds to nearest even.
    Make the interpreter round as the GPU does, so that CPU runs check the kernels' real numerics (a
    truncated bf16 weight drifts towards zero by up to an ulp each step)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # no triton: its backend is unavailable and its tests skip
        return
    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return truncating(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


_interpreter_rounds_bfloat16_to_nearest()

_SEED = int(os.environ.get("SAM_KERNELS_TEST_SEED", random.SystemRandom().randrange(2**31)))

try:  # hypothesis profiles for tests/test_properties.py, registered before hypothesis' plugin reads
    # --hypothesis-profile: "ci" (the default: small, derandomized) and "long" (local soak runs).
    from hypothesis import HealthCheck
    from hypothesis import settings as _hypothesis_settings

    _COMMON = dict(deadline=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    _hypothesis_settings.register_profile("ci", max_examples=10, derandomize=True, database=None, **_COMMON)
    _hypothesis_settings.register_profile("long", max_examples=2000, derandomize=False, **_COMMON)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test dependency; without it test_properties.py skips itself
    pass


def pytest_report_header(config):
    return f"sam_kernels test seed: {_SEED} (set SAM_KERNELS_TEST_SEED={_SEED} to reproduce)"


@pytest.fixture(autouse=True)
def _seed_everything(request):
    # A per-test seed derived from the run seed and the test id: fresh each run,
    # independent of test order.
    torch.manual_seed((_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
