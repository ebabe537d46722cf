// CUDA operations of the native extension (cuda_ops.cu), backend="cuda".
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace sam_cuda {

#include "operations.inc"

}  // namespace sam_cuda
