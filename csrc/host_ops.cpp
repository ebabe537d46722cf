// Host (CPU) implementation of the sam_kernels backend operations, parallelised with at::parallel_for.
// Each operation mirrors sam_kernels/backends/reference.py; the per-element math is in sam_math.h.
// Reductions are deterministic: fixed-size chunks summed in a fixed order, whatever the thread count.
#include "host_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "host_common.h"
#include "noise_batch.h"
#include "sam_math.h"

namespace sam_host {
namespace {

at::ScalarType acc_type(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

void check_contiguous(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "sam_kernels cpp backend: ", what,
              " must be a contiguous CPU tensor");
}

// ||f_i|| of every filter, as a contiguous tensor in the accumulation dtype (empty for ndim <= 1).
at::Tensor row_norms(const at::Tensor& w) {
  check_contiguous(w, "weight");
  const FilterShape shape = filter_shape(w);
  at::Tensor out = at::empty({shape.rows}, w.options().dtype(acc_type(w.scalar_type())));
  if (!shape.fsize) return out.zero_();  // (N, 0): every filter is empty, its norm 0
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "row_norms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = w.data_ptr<scalar_t>();
    acc_t* norms = out.data_ptr<acc_t>();
    at::parallel_for(0, shape.rows, std::max<int64_t>(1, kGrain / shape.fsize), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        norms[row] = static_cast<acc_t>(row_norm<acc_t>(data + row * shape.fsize, shape.fsize));
    });
  });
  return out;
}

at::Tensor totals_tensor(const std::vector<std::array<double, 4>>& per_tensor, int width, bool any_double) {
  at::Tensor out = at::zeros({width}, at::TensorOptions().dtype(at::kDouble));
  auto* data = out.data_ptr<double>();
  for (const auto& t : per_tensor)
    for (int k = 0; k < width; ++k) data[k] += t[k];
  return out.to(any_double ? at::kDouble : at::kFloat);
}

// What an R-SAM pass needs of one tensor: the filter norms of its weights before the noise (sigma_i)
// and its place in the noise stream. Each parallel task copies `stream`, which caches a Philox block.
struct NoiseSource {
  FilterShape shape;
  at::Tensor norms;
  int64_t offset;
  sam::NormalStream stream;
};

NoiseSource noise_source(const at::Tensor& before_noise, const NoiseKey& key, int64_t tensor_index, int64_t offset) {
  return {filter_shape(before_noise), row_norms(before_noise), offset,
          sam::NormalStream{static_cast<uint32_t>(tensor_index), key.step, key.k0, key.k1}};
}

// sigma of element i: gamma * ||w_row|| / sqrt(n_row) (ndim >= 2) or gamma * |w_i| (ndim <= 1).
template <typename acc_t>
struct NoiseStd {
  const acc_t* norms;
  int64_t fsize;
  acc_t gamma_over_sqrt_n;
  acc_t gamma;
  acc_t operator()(int64_t i, acc_t saved) const {
    if (fsize) return sam::filter_noise_std(gamma_over_sqrt_n, norms[i / fsize]);
    return sam::element_noise_std(gamma, saved);
  }
};

template <typename acc_t>
NoiseStd<acc_t> noise_std(const at::Tensor& norms, const FilterShape& shape, double gamma) {
  const double inv = shape.fsize ? 1.0 / std::sqrt(static_cast<double>(shape.fsize)) : 1.0;
  return {norms.data_ptr<acc_t>(), shape.fsize, static_cast<acc_t>(gamma * inv), static_cast<acc_t>(gamma)};
}

}  // namespace

std::vector<at::Tensor> filter_norms(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& w : tensors) out.push_back(w.dim() >= 2 ? row_norms(w) : w.abs().to(acc_type(w.scalar_type())));
  return out;
}

at::Tensor scaled_grad_sq_sum(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<double>& etas, int64_t mode) {
  std::vector<std::array<double, 4>> totals;
  bool any_double = false;
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor &w = params[j], &g = grads[j];
    check_contiguous(w, "weight");
    check_contiguous(g, "gradient");
    any_double |= w.scalar_type() == at::kDouble;
    const FilterShape shape = filter_shape(w);
    const at::Tensor norms = mode == sam::kFilter ? row_norms(w) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "scaled_grad_sq_sum", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* wd = w.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      const acc_t* nd = norms.defined() ? norms.data_ptr<acc_t>() : nullptr;
      const acc_t eta = static_cast<acc_t>(etas[j]);
      auto sum = chunked_sum<acc_t, 1>(w.numel(), [&](int64_t begin, int64_t end, std::array<acc_t, 1>& s) {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t wi = static_cast<acc_t>(wd[i]);
          const acc_t filter_value = (nd && shape.fsize) ? nd[i / shape.fsize] : (wi < 0 ? -wi : wi);
          const acc_t tg = sam::asam_scale<acc_t>(wi, eta, filter_value, static_cast<int>(mode)) * static_cast<acc_t>(gd[i]);
          s[0] += tg * tg;
        }
      });
      totals.push_back({static_cast<double>(sum[0]), 0, 0, 0});
    });
  }
  return totals_tensor(totals, 1, any_double).squeeze(0);
}

void perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& scales,
              const std::vector<double>& etas, int64_t mode, bool p_inf) {
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor &w = params[j], &g = grads[j], &s = saved[j];
    check_contiguous(w, "weight");
    check_contiguous(g, "gradient");
    check_contiguous(s, "saved copy");
    const FilterShape shape = filter_shape(w);
    const at::Tensor norms = mode == sam::kFilter ? row_norms(w) : at::Tensor();
    const double scale_value = scales[j].item<double>();  // a CPU scalar: no device to wait for
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "perturb_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* wd = w.data_ptr<scalar_t>();
      scalar_t* sd = s.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      const acc_t* nd = norms.defined() ? norms.data_ptr<acc_t>() : nullptr;
      const acc_t eta = static_cast<acc_t>(etas[j]);
      const acc_t scale = static_cast<acc_t>(scale_value);
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          sd[i] = wd[i];
          const acc_t wi = static_cast<acc_t>(wd[i]);
          const acc_t filter_value = (nd && shape.fsize) ? nd[i / shape.fsize] : (wi < 0 ? -wi : wi);
          const acc_t t = sam::asam_scale<acc_t>(wi, eta, filter_value, static_cast<int>(mode));
          const acc_t eps = sam::sam_perturbation<acc_t>(scale, t, static_cast<acc_t>(gd[i]), p_inf);
          wd[i] = static_cast<scalar_t>(wi + sam::finite_or_zero(eps));
        }
      });
    });
  }
}

void restore_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved) {
  for (size_t j = 0; j < params.size(); ++j) params[j].copy_(saved[j]);
}

void add_noise_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved,
                const std::vector<double>& gammas, uint64_t seed, const std::vector<int64_t>& tensor_indices,
                int64_t step, const std::vector<int64_t>& element_offsets) {
  const NoiseKey key = noise_key(seed, step);
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor &w = params[j], &s = saved[j];
    check_contiguous(w, "weight");
    check_contiguous(s, "saved copy");
    const NoiseSource source = noise_source(w, key, tensor_indices[j], element_offsets[j]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "add_noise_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* wd = w.data_ptr<scalar_t>();
      scalar_t* sd = s.data_ptr<scalar_t>();
      const NoiseStd<acc_t> sigma = noise_std<acc_t>(source.norms, source.shape, gammas[j]);
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        sam::NormalStream z = source.stream;
        for (int64_t i = begin; i < end; ++i) {
          sd[i] = wd[i];
          const acc_t wi = static_cast<acc_t>(wd[i]);
          wd[i] = static_cast<scalar_t>(wi + sam::noise_delta(sigma(i, wi), z(source.offset + i)));
        }
      });
    });
  }
}

at::Tensor noise_grad_sums(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& saved,
                           const std::vector<double>& gammas, const std::vector<double>& lams, uint64_t seed,
                           const std::vector<int64_t>& tensor_indices, int64_t step,
                           const std::vector<int64_t>& element_offsets) {
  const NoiseKey key = noise_key(seed, step);
  std::vector<std::array<double, 4>> totals;
  bool any_double = false;
  for (size_t j = 0; j < grads.size(); ++j) {
    const at::Tensor &g = grads[j], &s = saved[j];
    check_contiguous(g, "gradient");
    any_double |= s.scalar_type() == at::kDouble;
    const NoiseSource source = noise_source(s, key, tensor_indices[j], element_offsets[j]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "noise_grad_sums", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* sd = s.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      const NoiseStd<acc_t> sigma = noise_std<acc_t>(source.norms, source.shape, gammas[j]);
      auto sum = chunked_sum<acc_t, 3>(s.numel(), [&](int64_t begin, int64_t end, std::array<acc_t, 3>& acc) {
        sam::NormalStream z = source.stream;
        for (int64_t i = begin; i < end; ++i) {
          const acc_t si = static_cast<acc_t>(sd[i]);
          const acc_t delta = sam::noise_delta(sigma(i, si), z(source.offset + i));
          const acc_t gi = static_cast<acc_t>(gd[i]);
          acc[0] += delta * delta;
          acc[1] += gi * gi;
          acc[2] += delta * gi;
        }
      });
      const double sums[3] = {static_cast<double>(sum[0]), static_cast<double>(sum[1]), static_cast<double>(sum[2])};
      double weighted[4];
      sam::rsam_weighted_sums(sums, lams[j], weighted);
      totals.push_back({weighted[0], weighted[1], weighted[2], weighted[3]});
    });
  }
  return totals_tensor(totals, 4, any_double);
}

void mix_perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& noise_coefs,
                  const std::vector<at::Tensor>& grad_coefs, const std::vector<double>& gammas, uint64_t seed,
                  const std::vector<int64_t>& tensor_indices, int64_t step,
                  const std::vector<int64_t>& element_offsets) {
  const NoiseKey key = noise_key(seed, step);
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor &w = params[j], &g = grads[j], &s = saved[j];
    check_contiguous(w, "weight");
    check_contiguous(g, "gradient");
    check_contiguous(s, "saved copy");
    const NoiseSource source = noise_source(s, key, tensor_indices[j], element_offsets[j]);
    const double a_value = noise_coefs[j].item<double>();
    const double b_value = grad_coefs[j].item<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "mix_perturb_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* wd = w.data_ptr<scalar_t>();
      const scalar_t* sd = s.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      const NoiseStd<acc_t> sigma = noise_std<acc_t>(source.norms, source.shape, gammas[j]);
      const acc_t a = static_cast<acc_t>(a_value), b = static_cast<acc_t>(b_value);
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        sam::NormalStream z = source.stream;
        for (int64_t i = begin; i < end; ++i) {
          const acc_t si = static_cast<acc_t>(sd[i]);
          const acc_t delta = sam::noise_delta(sigma(i, si), z(source.offset + i));
          const acc_t eps = sam::rsam_perturbation(a, delta, b, static_cast<acc_t>(gd[i]));
          wd[i] = static_cast<scalar_t>(si + sam::finite_or_zero(eps));
        }
      });
    });
  }
}

std::vector<int64_t> philox4x32_10(std::vector<int64_t> counter, std::vector<int64_t> key) {
  TORCH_CHECK(counter.size() == 4 && key.size() == 2, "philox4x32_10 takes 4 counter words and 2 key words");
  sam::Uint4 c{{static_cast<uint32_t>(counter[0]), static_cast<uint32_t>(counter[1]),
                static_cast<uint32_t>(counter[2]), static_cast<uint32_t>(counter[3])}};
  const sam::Uint4 x = sam::philox4x32_10(c, static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  return {x.x[0], x.x[1], x.x[2], x.x[3]};
}

at::Tensor standard_normal(int64_t numel, uint64_t seed, int64_t tensor_index, int64_t step, int64_t offset) {
  // The batched stream the step plan draws from (noise_batch.h), so the tests hold it to the reference.
  const NoiseKey key = noise_key(seed, step);
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  float* data = out.data_ptr<float>();
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kNoiseBatch)
      standard_normals(data + i, offset + i, std::min(kNoiseBatch, end - i), key.k0, key.k1,
                       static_cast<uint32_t>(tensor_index), key.step);
  });
  return out;
}

}  // namespace sam_host
