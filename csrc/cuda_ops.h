// CUDA operations of the native extension (cuda_ops.cu), backend="cuda": the operations of operations.inc
// and the fused second step of fused_step_ops.inc.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace sam_cuda {

#include "operations.inc"
#include "fused_step_ops.inc"

}  // namespace sam_cuda
