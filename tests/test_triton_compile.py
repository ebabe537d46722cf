"""Every Triton kernel compiles for sm_90 (H100) without a GPU: GPU-only compile errors fail CI.

The same compilation checks what the machine code of the element-wise kernels looks like (issue 12):
full tiles load 16 bytes per instruction, no element pays a 64-bit division, and registers stay
within a budget that keeps several blocks resident per SM.
"""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

VARIANTS = 97  # compile_check._configurations()

# Registers per thread at num_warps = 8 (256 threads per block). An SM of sm_90 has 65,536 registers
# and holds at most 64 warps. The kernels stream memory: what keeps HBM busy is bytes in flight per SM,
# about bandwidth × latency / SMs ≈ 3.35 TB/s × ~1 µs / 132 ≈ 25 KB. A thread of a full float32 tile
# has two 16-byte loads per stream in flight (BLOCK / 256 = 8 elements).
#   streaming kernels (restore, norm sums, perturb, the fused SGD/Adam second step, the SAM family's
#   operations): ≤ 64 → 4 blocks = 32 warps
#   per SM, ≥ 64 KB in flight;
#   noise kernels (Philox + Box–Muller, ALU-heavy): ≤ 80 → 3 blocks (3 × 80 × 256 = 61,440 registers);
#   float64 (two registers per value): ≤ 128 → 2 blocks.
BUDGET = {"stream": 64, "noise": 80, "fp64": 128}
NOISE_KERNELS = {"add_noise_kernel", "noise_grad_sums_kernel", "mix_perturb_kernel"}
FUSED_STEP_KERNELS = {"restore_sgd_kernel", "restore_adam_kernel"}
# The SAM family's operations (docs/DESIGN.md §2.5–§2.8, §2.10; copy_ launches restore_kernel) and the streams
# each reads (Momentum-SAM's step: w, g, m).
FAMILY_STREAMS = {"pair_sums_kernel": 2, "combine_kernel": 2, "split_difference_kernel": 2,
                  "residual_sq_sum_kernel": 2, "residual_perturb_kernel": 3, "msam_sgd_kernel": 3}
ELEMENTWISE = {"restore_kernel", "scaled_grad_sq_sum_kernel", "perturb_kernel"} | NOISE_KERNELS | FUSED_STEP_KERNELS \
    | set(FAMILY_STREAMS)

_LINE = re.compile(r"^(\w+) (\S+) num_warps=(\d+) regs=(\w+) stack=(\w+) vector_loads=(\d+) div64=(\d+)$")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "sam_kernels.backends.triton_backend.compile_check", "--arch", "90", "--report"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = []
    for line in result.stdout.splitlines():
        match = _LINE.match(line)
        if match:
            name, variant, warps, regs, stack, vectors, div64 = match.groups()
            rows.append({
                "name": name, "variant": dict(item.split("=") for item in variant.split(",")),
                "num_warps": int(warps), "regs": None if regs == "None" else int(regs),
                "vector_loads": int(vectors), "div64": int(div64), "line": line,
            })
    return result.stdout, rows


def test_all_triton_kernels_compile_for_sm90(report):
    stdout, rows = report
    assert f"compiled {VARIANTS} Triton kernel variants for sm_90" in stdout
    assert len(rows) == VARIANTS


def test_full_tiles_of_aligned_lists_use_vector_loads(report):
    _, rows = report
    aligned = [r for r in rows if r["name"] in ELEMENTWISE and r["variant"].get("ALIGNED") == "True"]
    assert len(aligned) == 72  # float32 21, bfloat16 17, float16 17, float64 17
    assert {r["variant"]["W_DTYPE"] for r in aligned} == {"fp32", "bf16", "fp16", "fp64"}
    missing = [r["line"] for r in aligned if r["vector_loads"] == 0]
    assert not missing, "no ld.global.v2/v4 in:\n" + "\n".join(missing)


def test_no_element_pays_a_64_bit_division(report):
    # One 64-bit division per tile (an element's filter: start // fsize) in each of the two branches,
    # full and partial tile; per element it would be BLOCK / threads = 8 of them.
    _, rows = report
    over = [r["line"] for r in rows if r["name"] in ELEMENTWISE and r["div64"] > 2]
    assert not over, "\n".join(over)


def test_registers_within_budget(report):
    _, rows = report
    rows = [r for r in rows if r["name"] in ELEMENTWISE]
    if any(r["regs"] is None for r in rows):
        pytest.skip("no cuobjdump to read the register counts")
    assert all(r["num_warps"] == 8 for r in rows)

    def budget(r):
        if r["variant"]["W_DTYPE"] == "fp64":
            return BUDGET["fp64"]
        return BUDGET["noise"] if r["name"] in NOISE_KERNELS else BUDGET["stream"]

    over = [f"{r['line']} (budget {budget(r)})" for r in rows if r["regs"] > budget(r)]
    assert not over, "\n".join(over)


def test_fused_step_kernels_load_every_stream_in_vectors(report):
    # restore_sgd_kernel reads saved, g and the momentum buffer; restore_adam_kernel saved, g, m, v and v̂:
    # at least one vector load per stream on aligned full tiles (float32: two, 16 bytes each per thread).
    _, rows = report
    streams = {"restore_sgd_kernel": 3, "restore_adam_kernel": 5}
    fused = [r for r in rows if r["name"] in FUSED_STEP_KERNELS and r["variant"].get("ALIGNED") == "True"]
    assert len(fused) == 8
    few = [r["line"] for r in fused if r["vector_loads"] < streams[r["name"]]]
    assert not few, "fewer vector loads than streams in:\n" + "\n".join(few)


def test_family_kernels_load_every_stream_in_vectors(report):
    # Each operation of the SAM family reads two or three streams: at least one vector load per stream on
    # aligned full tiles in every dtype, two (16 bytes each per thread) in float32.
    _, rows = report
    family = [r for r in rows if r["name"] in FAMILY_STREAMS]
    assert len(family) == 5 * len(FAMILY_STREAMS)  # float32 aligned and not, bfloat16, float16, float64
    aligned = [r for r in family if r["variant"]["ALIGNED"] == "True"]
    assert len(aligned) == 4 * len(FAMILY_STREAMS)
    few = [r["line"] for r in aligned if r["vector_loads"] < FAMILY_STREAMS[r["name"]]]
    assert not few, "fewer vector loads than streams in:\n" + "\n".join(few)
    float32 = [r for r in aligned if r["variant"]["W_DTYPE"] == "fp32"]
    two_each = [r["line"] for r in float32 if r["vector_loads"] < 2 * FAMILY_STREAMS[r["name"]]]
    assert not two_each, "float32: fewer than two 16-byte loads per stream in:\n" + "\n".join(two_each)
