"""Compile every Triton kernel for a GPU target without a GPU (catches GPU-only errors in CI).

    python -m sam_kernels.backends.triton_backend.compile_check [--arch 90]

Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

_INT32_POINTERS = {"tile_tensor", "ftile_tensor", "scale_slots", "coef_slots"}
_INT64_POINTERS = {
    "tile_start", "ftile_row", "numels", "fsizes", "n_filters", "fnorm_offs",
    "w_ptrs", "g_ptrs", "s_ptrs", "tensor_indices",
}
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
        elif name in _INT_SCALARS:
            signature[name] = "i64"
        else:  # per-tensor floats, filter norms, partial sums, scales
            signature[name] = f"*{acc_name}"
    return signature


def _configurations():
    """(kernel, constexprs) pairs covering every dtype, mode and variant the backend launches."""
    import triton.language as tl

    from . import BLOCK, FILTER_COLS, FILTER_ROWS
    from . import kernels as K

    dtypes = [(tl.float32, tl.float32), (tl.bfloat16, tl.float32), (tl.float16, tl.float32), (tl.float64, tl.float64)]
    for w_dtype, acc in dtypes:
        base = {"W_DTYPE": w_dtype, "ACC": acc}
        with_grad = {**base, "G_DTYPE": w_dtype, "BLOCK": BLOCK}
        yield K.filter_norm_kernel, {**base, "ROWS": FILTER_ROWS, "COLS": FILTER_COLS}
        yield K.restore_kernel, {"W_DTYPE": w_dtype, "BLOCK": BLOCK}
        for mode in (K.MODE_SAM, K.MODE_ELEMENT, K.MODE_FILTER):
            yield K.scaled_grad_sq_sum_kernel, {**with_grad, "MODE": mode}
        modes = itertools.product((K.MODE_SAM, K.MODE_ELEMENT, K.MODE_FILTER), (False, True))
        for mode, p_inf in modes if w_dtype == tl.float32 else [(K.MODE_FILTER, False), (K.MODE_ELEMENT, True)]:
            yield K.perturb_kernel, {**with_grad, "MODE": mode, "P_INF": p_inf}
        yield K.add_noise_kernel, {**base, "BLOCK": BLOCK}
        yield K.noise_grad_sums_kernel, with_grad
        yield K.mix_perturb_kernel, with_grad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    start = time.perf_counter()
    count = 0
    for fn, constexprs in _configurations():
        acc_name = "fp64" if constexprs.get("ACC") == tl.float64 else "fp32"
        source = ASTSource(fn, _signature(fn, acc_name), constexprs=constexprs)
        compiled = triton.compile(source, target=target)
        assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
        count += 1
    print(f"compiled {count} Triton kernel variants for sm_{args.arch} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
