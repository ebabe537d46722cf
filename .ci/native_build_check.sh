#!/usr/bin/env bash
# Builds the native extension the way a GPU machine does, on any machine with a CUDA toolkit and no
# GPU: torch's CUDA build (from the registry) in a virtual environment of its own, then
#   1. setup.py (torch cpp_extension + ninja): host part + CUDA kernels, and the extension's tests;
#   2. CMakeLists.txt: the same sources into the same module, and the same tests against that module.
# Each build runs in its own copy of the working tree, so the checkout's own build is left alone.
#
#   bash .ci/native_build_check.sh        # CUDA_HOME defaults to /usr/local/cuda, arch list to 9.0
# SAM_KERNELS_CUDA_VENV=DIR reuses (or creates) that environment instead of a throwaway one.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export SAM_KERNELS_REQUIRE_EXTENSION=1 MAX_JOBS="${MAX_JOBS:-2}" PIP_DISABLE_PIP_VERSION_CHECK=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="${SAM_KERNELS_CUDA_VENV:-$work/venv}"
py="$venv/bin/python"
export PATH="$venv/bin:$PATH"  # its ninja, for setup.py and CMake

copy_tree() {  # the tracked and untracked-but-not-ignored files, into $1
  mkdir -p "$1"
  git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$1"
}

run_extension_tests() {  # in $1, whose sam_kernels/ holds the module built there
  (cd "$1" && "$py" -c "import sam_kernels._C as C, os; assert C.HAS_CUDA, 'built without CUDA'; \
assert os.path.dirname(C.__file__) == os.path.abspath('sam_kernels'), C.__file__; print('sam_kernels._C:', C.__file__)" \
    && "$py" -m pytest -q -p no:cacheprovider tests/test_native_extension.py \
    && "$py" -m pytest -q -p no:cacheprovider tests/test_backend_parity.py -k cpp)
}

echo "== torch's CUDA build, in $venv"
[ -x "$py" ] || python -m venv "$venv"
"$py" -m pip install -q "torch==2.13.0,!=2.13.0+cpu" "triton==3.7.1" ninja pybind11 numpy pytest
"$py" -c "import torch; assert torch.version.cuda, torch.__version__; print('torch', torch.__version__)"

echo "== setup.py: host + CUDA kernels for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
copy_tree "$work/setup"
(cd "$work/setup" && "$py" setup.py -q build_ext --inplace)
run_extension_tests "$work/setup"

echo "== CMake: the same sources into the same module"
copy_tree "$work/cmake"
prefix="$("$py" -c 'import torch, pybind11; print(torch.utils.cmake_prefix_path + ";" + pybind11.get_cmake_dir())')"
cmake -S "$work/cmake" -B "$work/cmake/build/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE="$py" -DCMAKE_PREFIX_PATH="$prefix" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DSAM_KERNELS_OUTPUT_DIR="$work/cmake/sam_kernels" \
  --log-level=WARNING
cmake --build "$work/cmake/build/cmake" -j "$MAX_JOBS"
run_extension_tests "$work/cmake"
