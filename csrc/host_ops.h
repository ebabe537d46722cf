// Host (CPU) operations of the native extension; see host_ops.cpp and sam_kernels/backends/__init__.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace sam_host {

std::vector<at::Tensor> filter_norms(const std::vector<at::Tensor>& tensors);
at::Tensor scaled_grad_sq_sum(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<double>& etas, int64_t mode);
void perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& scales,
              const std::vector<double>& etas, int64_t mode, bool p_inf);
void restore_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved);
void add_noise_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved,
                const std::vector<double>& gammas, uint64_t seed, const std::vector<int64_t>& tensor_indices,
                int64_t step, const std::vector<int64_t>& element_offsets);
at::Tensor noise_grad_sums(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& saved,
                           const std::vector<double>& gammas, const std::vector<double>& lams, uint64_t seed,
                           const std::vector<int64_t>& tensor_indices, int64_t step,
                           const std::vector<int64_t>& element_offsets);
void mix_perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& noise_coefs,
                  const std::vector<at::Tensor>& grad_coefs, const std::vector<double>& gammas, uint64_t seed,
                  const std::vector<int64_t>& tensor_indices, int64_t step,
                  const std::vector<int64_t>& element_offsets);

// Test hooks: the noise stream through the host path.
std::vector<int64_t> philox4x32_10(std::vector<int64_t> counter, std::vector<int64_t> key);
at::Tensor standard_normal(int64_t numel, uint64_t seed, int64_t tensor_index, int64_t step, int64_t offset);

}  // namespace sam_host
