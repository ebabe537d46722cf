// Host (CPU) operations of the native extension (host_ops.cpp), backend="cpp".
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace sam_host {

#include "operations.inc"
#include "fused_step_ops.inc"
#include "family_ops.inc"

// Test hook: Philox4x32-10 of one counter (4 words) and key (2 words).
std::vector<int64_t> philox4x32_10(std::vector<int64_t> counter, std::vector<int64_t> key);

}  // namespace sam_host
