// The SAM family's operations on the host (backend="cpp"): GSAM/R-GSAM/LookSAM/WSAM's kept gradient, their
// dot products and combinations, FriendlySAM's residual direction (docs/DESIGN.md §2.5–§2.8). Each mirrors
// sam_kernels/backends/reference.py; sums are deterministic (fixed chunks and lanes, any thread count).
#include "host_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstring>
#include <vector>

#include "host_common.h"
#include "sam_math.h"

namespace sam_host {
namespace {

void check_like(const at::Tensor& t, const at::Tensor& first, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu() && t.scalar_type() == first.scalar_type() &&
                  t.numel() == first.numel(),
              "sam_kernels cpp backend: ", what, " must be a contiguous CPU tensor of the first list's dtype and size");
}

// The value of a one-element CPU tensor (a coefficient or scale), read through its pointer when it is a
// double or float (no dispatch: this runs once per tensor).
double scalar_value(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1, "sam_kernels cpp backend: a coefficient must be a one-element CPU tensor");
  if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
  return t.item<double>();
}

at::Tensor sums_tensor(const std::vector<double>& sums, bool any_double) {
  at::Tensor out = at::empty({static_cast<int64_t>(sums.size())}, at::TensorOptions().dtype(at::kDouble));
  std::memcpy(out.data_ptr<double>(), sums.data(), sums.size() * sizeof(double));
  return out.to(any_double ? at::kDouble : at::kFloat);
}

template <typename acc_t>
inline acc_t finite_or_zero(acc_t x) {
  return x - x == acc_t(0) ? x : acc_t(0);  // x - x is 0 exactly when x is finite
}

// x <- a x + b y over [begin, end), a term left out (0) where its coefficient is 0: a branch-free loop.
template <bool kA, bool kB, typename scalar_t, typename acc_t>
SAM_HOST_CLONES void combine_range(scalar_t* x, const scalar_t* y, acc_t a, acc_t b, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const acc_t ax = kA ? a * static_cast<acc_t>(x[i]) : acc_t(0);
    const acc_t by = kB ? b * static_cast<acc_t>(y[i]) : acc_t(0);
    x[i] = static_cast<scalar_t>(ax + by);
  }
}

}  // namespace

void copy_(const std::vector<at::Tensor>& targets, const std::vector<at::Tensor>& sources) {
  for (size_t j = 0; j < targets.size(); ++j) {
    const at::Tensor &x = targets[j], &y = sources[j];
    check_like(x, x, "target");
    check_like(y, x, "source");
    if (x.data_ptr() == y.data_ptr() || x.numel() == 0) continue;
    auto* out = static_cast<char*>(x.data_ptr());
    const auto* in = static_cast<const char*>(y.data_ptr());
    const int64_t size = x.element_size();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      std::memcpy(out + begin * size, in + begin * size, (end - begin) * size);
    });
  }
}

at::Tensor pair_sums(const std::vector<at::Tensor>& firsts, const std::vector<at::Tensor>& seconds) {
  std::vector<double> total(3, 0.0);
  bool any_double = false;
  for (size_t j = 0; j < firsts.size(); ++j) {
    const at::Tensor &x = firsts[j], &y = seconds[j];
    check_like(x, x, "first");
    check_like(y, x, "second");
    any_double |= x.scalar_type() == at::kDouble;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pair_sums", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xd = x.data_ptr<scalar_t>();
      const scalar_t* yd = y.data_ptr<scalar_t>();
      auto sum = chunked_sum<acc_t, 3>(x.numel(), [&](int64_t begin, int64_t end, std::array<acc_t, 3>& out) {
        lane_sums<acc_t, 3>(begin, end, out, [xd, yd](int64_t i) {
          const acc_t a = static_cast<acc_t>(xd[i]), b = static_cast<acc_t>(yd[i]);
          return std::array<acc_t, 3>{a * b, a * a, b * b};
        });
      });
      for (int k = 0; k < 3; ++k) total[k] += static_cast<double>(sum[k]);
    });
  }
  return sums_tensor(total, any_double);
}

void combine_(const std::vector<at::Tensor>& targets, const std::vector<at::Tensor>& others,
              const std::vector<at::Tensor>& target_coefs, const std::vector<at::Tensor>& other_coefs) {
  for (size_t j = 0; j < targets.size(); ++j) {
    const at::Tensor &x = targets[j], &y = others[j];
    check_like(x, x, "target");
    check_like(y, x, "other");
    const double a_value = scalar_value(target_coefs[j]), b_value = scalar_value(other_coefs[j]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "combine_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* xd = x.data_ptr<scalar_t>();
      const scalar_t* yd = y.data_ptr<scalar_t>();
      const acc_t a = static_cast<acc_t>(a_value), b = static_cast<acc_t>(b_value);
      // A term whose coefficient is 0 counts 0 (not 0 * Inf = NaN): a skipped update drops it entirely.
      const bool a_on = a != acc_t(0), b_on = b != acc_t(0);
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
        if (a_on && b_on) combine_range<true, true>(xd, yd, a, b, begin, end);
        if (a_on && !b_on) combine_range<true, false>(xd, yd, a, b, begin, end);
        if (!a_on && b_on) combine_range<false, true>(xd, yd, a, b, begin, end);
        if (!a_on && !b_on) combine_range<false, false>(xd, yd, a, b, begin, end);
      });
    });
  }
}

void split_difference_(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& firsts,
                       const std::vector<at::Tensor>& skips) {
  for (size_t j = 0; j < grads.size(); ++j) {
    const at::Tensor &g_sam = grads[j], &first = firsts[j];
    check_like(g_sam, g_sam, "gradient");
    check_like(first, g_sam, "kept gradient");
    const bool skip = scalar_value(skips[j]) != 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_sam.scalar_type(), "split_difference_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* gd = g_sam.data_ptr<scalar_t>();
      scalar_t* fd = first.data_ptr<scalar_t>();
      at::parallel_for(0, g_sam.numel(), kGrain, [&](int64_t begin, int64_t end) {
        if (skip) {  // a non-finite first pass: .grad keeps g_sam, no sharpness term
          for (int64_t i = begin; i < end; ++i) fd[i] = scalar_t(0);
          return;
        }
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t g = fd[i];
          fd[i] = static_cast<scalar_t>(static_cast<acc_t>(gd[i]) - static_cast<acc_t>(g));
          gd[i] = g;
        }
      });
    });
  }
}

at::Tensor residual_sq_sum(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                           const std::vector<at::Tensor>& moments, const std::vector<double>& sigmas) {
  std::vector<double> total(1, 0.0);
  bool any_double = false;
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor &w = params[j], &g = grads[j], &m = moments[j];
    check_like(g, w, "gradient");
    check_like(m, w, "moment");
    any_double |= w.scalar_type() == at::kDouble;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "residual_sq_sum", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gd = g.data_ptr<scalar_t>();
      const scalar_t* md = m.data_ptr<scalar_t>();
      const acc_t sigma = static_cast<acc_t>(sigmas[j]);
      auto sum = chunked_sum<acc_t, 1>(g.numel(), [&](int64_t begin, int64_t end, std::array<acc_t, 1>& out) {
        lane_sums<acc_t, 1>(begin, end, out, [gd, md, sigma](int64_t i) {
          const acc_t d = static_cast<acc_t>(gd[i]) - sigma * static_cast<acc_t>(md[i]);
          return std::array<acc_t, 1>{d * d};
        });
      });
      total[0] += static_cast<double>(sum[0]);
    });
  }
  return sums_tensor(total, any_double).squeeze(0);
}

void residual_perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& moments, const std::vector<at::Tensor>& saved,
                       const std::vector<at::Tensor>& scales, const std::vector<double>& sigmas,
                       const std::vector<double>& lmbdas) {
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor &w = params[j], &g = grads[j], &m = moments[j], &s = saved[j];
    check_like(w, w, "weight");
    check_like(g, w, "gradient");
    check_like(m, w, "moment");
    check_like(s, w, "saved copy");
    const double scale_value = scalar_value(scales[j]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "residual_perturb_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* wd = w.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      scalar_t* md = m.data_ptr<scalar_t>();
      scalar_t* sd = s.data_ptr<scalar_t>();
      const acc_t scale = static_cast<acc_t>(scale_value), sigma = static_cast<acc_t>(sigmas[j]);
      const acc_t lmbda = static_cast<acc_t>(lmbdas[j]), rest = static_cast<acc_t>(1.0 - lmbdas[j]);
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          sd[i] = wd[i];
          const acc_t gi = static_cast<acc_t>(gd[i]), mi = static_cast<acc_t>(md[i]);
          const acc_t eps = scale * (gi - sigma * mi);
          wd[i] = static_cast<scalar_t>(static_cast<acc_t>(sd[i]) + finite_or_zero(eps));
          const acc_t new_m = lmbda * mi + rest * gi;
          md[i] = new_m - new_m == acc_t(0) ? static_cast<scalar_t>(new_m) : md[i];  // a non-finite m keeps its old
        }
      });
    });
  }
}

}  // namespace sam_host
