"""Build script: the Python package plus the native extension ``sam_kernels._C``.

    pip install -e . --no-build-isolation        # builds against the torch you installed

The extension (csrc/) is compiled with torch.utils.cpp_extension and ninja:
the host part always, the CUDA part (csrc/cuda_ops.cu) when torch was built
with CUDA and a toolkit is found (CUDA_HOME or nvcc on PATH);
TORCH_CUDA_ARCH_LIST picks the GPU architectures (e.g. "9.0"), and
SAM_KERNELS_NO_CUDA=1 builds the host part only. If torch is not importable at build time, or the build
fails, the package installs without it and runs on the other backends
(``sam_kernels.available_backends()`` says why) — unless
SAM_KERNELS_REQUIRE_EXTENSION=1, which turns a failed build into an error
(CI sets it). SAM_KERNELS_NO_EXTENSION=1 skips the build.
"""

import os
import sys

from setuptools import setup

REQUIRE = os.environ.get("SAM_KERNELS_REQUIRE_EXTENSION") == "1"
SKIP = os.environ.get("SAM_KERNELS_NO_EXTENSION") == "1"
SKIP_CUDA = os.environ.get("SAM_KERNELS_NO_CUDA") == "1"
HOST_SOURCES = ["csrc/host_ops.cpp", "csrc/host_fused_step.cpp", "csrc/host_family_ops.cpp", "csrc/host_plan.cpp", "csrc/noise_batch.cpp", "csrc/bindings.cpp"]
CUDA_SOURCES = ["csrc/cuda_ops.cu"]


def _with_cuda() -> bool:
    """Build the CUDA kernels: torch has CUDA, a toolkit is found, and nobody said no."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if SKIP_CUDA or torch.version.cuda is None:
        return False
    if CUDA_HOME is None:
        print("sam_kernels: torch has CUDA but no CUDA toolkit was found (set CUDA_HOME); "
              "building the host part only", file=sys.stderr)
        return False
    return True


def _extension_setup() -> dict:
    if SKIP:
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        if REQUIRE:
            raise
        print(f"sam_kernels: building without the native extension ({exc})", file=sys.stderr)
        return {}

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # a missing compiler must not make the package uninstallable
                if REQUIRE:
                    raise
                print(f"sam_kernels: the native extension failed to build ({exc}); "
                      "continuing without it", file=sys.stderr)

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    common = {
        "include_dirs": [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        "extra_link_args": openmp,
    }
    if _with_cuda():
        extension = CUDAExtension(
            "sam_kernels._C",
            HOST_SOURCES + CUDA_SOURCES,
            define_macros=[("SAM_WITH_CUDA", None)],
            extra_compile_args={"cxx": ["-O3", "-fno-math-errno", "-ffp-contract=off", *openmp], "nvcc": ["-O3"]},
            **common,
        )
    else:
        extension = CppExtension("sam_kernels._C", HOST_SOURCES, extra_compile_args=["-O3", "-fno-math-errno", "-ffp-contract=off", *openmp], **common)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**_extension_setup())
