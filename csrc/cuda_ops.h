// CUDA operations of the native extension (cuda_ops.cu), backend="cuda": the operations of operations.inc
// the fused second step and Momentum-SAM's step
// of fused_step_ops.inc, and the SAM family's operations of family_ops.inc.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace sam_cuda {

#include "operations.inc"
#include "fused_step_ops.inc"
#include "family_ops.inc"

}  // namespace sam_cuda
