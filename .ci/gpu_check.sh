#!/usr/bin/env bash
# The checks that need a GPU, for a machine with an NVIDIA GPU, torch with CUDA, Triton and a CUDA
# toolkit, and no network (the device tool's H100): build the extension in place for the local
# architecture list, run the whole test suite (tests marked `gpu` included), then the benchmark
# report, which rewrites bench/RESULTS.md.
#
#   bash .ci/gpu_check.sh [build|test|bench|all]      # default all; stages fit one 10-minute call each
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" SAM_KERNELS_REQUIRE_EXTENSION=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if [[ $stage == build || $stage == all ]]; then
  echo "== build sam_kernels._C in place (host + CUDA kernels for $TORCH_CUDA_ARCH_LIST)"
  python setup.py -q build_ext --inplace
fi
python - <<'PY'
import torch, sam_kernels
status = sam_kernels.available_backends()
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(0))
print(status)
assert status["cuda"] is None and status["triton"] is None, "a GPU backend is unavailable here"
PY
if [[ $stage == test || $stage == all ]]; then
  echo "== the whole test suite on the GPU machine"
  python -m pytest -q -p no:cacheprovider tests
fi
if [[ $stage == bench || $stage == all ]]; then
  # The peer (pytorch-optimizer) cannot be downloaded on an offline GPU machine: fetch its wheel beforehand
  # (pip download pytorch_optimizer==4.1.0 --no-deps -d bench/.wheels) and carry bench/.wheels along.
  if compgen -G "bench/.wheels/*.whl" > /dev/null; then
    python -m pip install -q --no-deps --no-index bench/.wheels/*.whl
  fi
  echo "== benchmark report -> bench/RESULTS.md"
  python bench/report.py
fi
