"""Compile every Triton kernel for a GPU target without a GPU (catches GPU-only errors in CI).

    python -m sam_kernels.backends.triton_backend.compile_check [--arch 90] [--report]

Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_INT32_POINTERS = {"tile_tensor", "ftile_tensor", "scale_slots", "coef_slots", "skip_slots", "flag_slots"}
_INT64_POINTERS = {
    "tile_start", "ftile_row", "numels", "fsizes", "n_filters", "fnorm_offs",
    "w_ptrs", "g_ptrs", "s_ptrs", "m_ptrs", "v_ptrs", "vmax_ptrs", "x_ptrs", "y_ptrs", "f_ptrs", "tensor_indices",
}
_BOOL_POINTERS = {"skips"}  # 0-d bool flags, stacked
_INT_SCALARS = {"key0", "key1", "step"}


def _signature(fn, acc_name: str) -> dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name.isupper():
            signature[name] = "constexpr"
        elif name in _INT32_POINTERS:
            signature[name] = "*i32"
        elif name in _INT64_POINTERS:
            signature[name] = "*i64"
        elif name in _BOOL_POINTERS:
            signature[name] = "*i1"
        elif name in _INT_SCALARS:
            signature[name] = "i64"
        else:  # per-tensor floats (and tables of them), filter norms, partial sums, scales
            signature[name] = f"*{acc_name}"
    return signature


def _configurations():
    """(kernel, constexprs, num_warps) triples covering every dtype, mode and variant the backend launches.

    Every element-wise kernel as launched on 16-byte aligned lists (ALIGNED=True); the float32 ones
    also as launched when some address of the list is not (ALIGNED=False).
    """
    import triton.language as tl

    from . import BLOCK, FILTER_COLS, FILTER_ROWS, NUM_WARPS
    from . import kernels as K

    dtypes = [(tl.float32, tl.float32), (tl.bfloat16, tl.float32), (tl.float16, tl.float32), (tl.float64, tl.float64)]
    for w_dtype, acc in dtypes:
        yield K.filter_norm_kernel, {"W_DTYPE": w_dtype, "ACC": acc, "ROWS": FILTER_ROWS, "COLS": FILTER_COLS}, 4
        for aligned in (True, False) if w_dtype == tl.float32 else (True,):
            base = {"W_DTYPE": w_dtype, "ACC": acc, "ALIGNED": aligned}
            with_grad = {**base, "G_DTYPE": w_dtype, "BLOCK": BLOCK}
            yield K.restore_kernel, {"W_DTYPE": w_dtype, "BLOCK": BLOCK, "ALIGNED": aligned}, NUM_WARPS
            for mode in (K.MODE_SAM, K.MODE_ELEMENT, K.MODE_FILTER):
                yield K.scaled_grad_sq_sum_kernel, {**with_grad, "MODE": mode}, NUM_WARPS
            modes = itertools.product((K.MODE_SAM, K.MODE_ELEMENT, K.MODE_FILTER), (False, True))
            for mode, p_inf in modes if w_dtype == tl.float32 else [(K.MODE_FILTER, False), (K.MODE_ELEMENT, True)]:
                yield K.perturb_kernel, {**with_grad, "MODE": mode, "P_INF": p_inf}, NUM_WARPS
            yield K.add_noise_kernel, {**base, "BLOCK": BLOCK}, NUM_WARPS
            yield K.noise_grad_sums_kernel, with_grad, NUM_WARPS
            yield K.mix_perturb_kernel, with_grad, NUM_WARPS
            yield K.restore_sgd_kernel, with_grad, NUM_WARPS
            yield K.restore_adam_kernel, with_grad, NUM_WARPS
            # The SAM family (copy_ launches restore_kernel).
            yield K.pair_sums_kernel, {**base, "BLOCK": BLOCK}, NUM_WARPS
            yield K.combine_kernel, {**base, "BLOCK": BLOCK}, NUM_WARPS
            yield K.split_difference_kernel, {**base, "BLOCK": BLOCK}, NUM_WARPS
            yield K.residual_sq_sum_kernel, with_grad, NUM_WARPS
            yield K.residual_perturb_kernel, with_grad, NUM_WARPS
            yield K.msam_sgd_kernel, with_grad, NUM_WARPS


def compile_all(arch: int = 90):
    """Yield (kernel name, constexprs, num_warps, compiled kernel) for every configuration, for sm_<arch>."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    for fn, constexprs, num_warps in _configurations():
        acc_name = "fp64" if constexprs.get("ACC") == tl.float64 else "fp32"
        source = ASTSource(fn, _signature(fn, acc_name), constexprs=constexprs)
        compiled = triton.compile(source, target=target, options={"num_warps": num_warps})
        assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
        yield fn.__name__, constexprs, num_warps, compiled


def vector_loads(ptx: str) -> int:
    """Number of vector global loads (ld.global….v2/.v4) in PTX."""
    return len(re.findall(r"\bld\.global\S*\.v[24]\.", ptx))


def wide_divisions(ptx: str) -> int:
    """Number of 64-bit integer divisions and remainders in PTX."""
    return len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx))


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack bytes of a compiled kernel (``cuobjdump -res-usage`` on its cubin:
    the one Triton ships, else one on the PATH); empty without cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        out = subprocess.run([tool, "-res-usage", file.name], capture_output=True, text=True, check=True).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK):(\d+)", out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    parser.add_argument("--report", action="store_true",
                        help="one line per variant: registers per thread, stack bytes, vector loads, 64-bit divisions")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    start = time.perf_counter()
    count = 0
    for name, constexprs, num_warps, compiled in compile_all(args.arch):
        count += 1
        if args.report:
            ptx = compiled.asm["ptx"]
            variant = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items() if k not in ("BLOCK", "ROWS", "COLS"))
            usage = resources(compiled.asm["cubin"])
            print(f"{name} {variant} num_warps={num_warps} regs={usage.get('reg')} stack={usage.get('stack')} "
                  f"vector_loads={vector_loads(ptx)} div64={wide_divisions(ptx)}")
    print(f"compiled {count} Triton kernel variants for sm_{args.arch} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
