// backend="cpp": the step plan (host_plan.h). Each phase validates, then runs fused passes over raw
// memory: no ATen op is dispatched in a step once the saved buffers exist (a TorchDispatchMode sees none).
#include "host_plan.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "host_common.h"
#include "noise_batch.h"
#include "sam_math.h"

namespace sam_host {
namespace {

constexpr double kNormGuard = 1e-12;

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A weight the plan's passes can run on: a dense contiguous CPU tensor of a floating dtype.
bool usable_weight(const at::Tensor& w) {
  return w.defined() && w.layout() == at::kStrided && w.device().is_cpu() && supported_dtype(w.scalar_type()) &&
         w.is_contiguous();
}

// A buffer (gradient or saved copy) that matches its weight element for element.
bool matches(const at::Tensor& t, const at::Tensor& w) {
  return t.defined() && t.layout() == at::kStrided && t.device() == w.device() &&
         t.scalar_type() == w.scalar_type() && t.sizes().equals(w.sizes()) && t.is_contiguous();
}

void bump_version(const at::Tensor& w) { w.unsafeGetTensorImpl()->bump_version(); }

// sigma of the noise of one row: gamma * ||w_row|| / sqrt(n_row).
template <typename acc_t>
acc_t row_sigma(double gamma, double norm, int64_t fsize) {
  return static_cast<acc_t>(gamma * norm / std::sqrt(static_cast<double>(fsize)));
}

// Runs body(base, n, z, sigma) over [begin, end) of tensor j in batches of up to kNoiseBatch elements:
// z the standard normals of elements base .. base + n - 1, sigma their noise std (per row from the norms
// kept by add_noise for ndim >= 2, gamma * |w| of `before_noise` for ndim <= 1). docs/DESIGN.md §2-§3.
template <typename acc_t, typename scalar_t, typename Body>
void noise_batches(int64_t begin, int64_t end, const NoiseKey& key, uint32_t j, const FilterShape& shape,
                   const double* norms, double gamma, const scalar_t* before_noise, Body body) {
  float z[kNoiseBatch];
  acc_t sigma[kNoiseBatch];
  for (int64_t base = begin; base < end; base += kNoiseBatch) {
    const int64_t n = std::min<int64_t>(kNoiseBatch, end - base);
    standard_normals(z, base, n, key.k0, key.k1, j, key.step);
    if (shape.fsize) {
      int64_t row = base / shape.fsize, col = base - row * shape.fsize;
      for (int64_t k = 0; k < n; col = 0, ++row) {
        const acc_t s = row_sigma<acc_t>(gamma, norms[row], shape.fsize);
        const int64_t run = std::min(n - k, shape.fsize - col);
        for (int64_t q = 0; q < run; ++q) sigma[k + q] = s;
        k += run;
      }
    } else {
      const acc_t g = static_cast<acc_t>(gamma);
      for (int64_t k = 0; k < n; ++k) sigma[k] = g * std::abs(static_cast<acc_t>(before_noise[base + k]));
    }
    body(base, n, z, sigma);
  }
}

}  // namespace

StepPlan::StepPlan(std::vector<at::Tensor> params, std::vector<int64_t> group_of, int64_t num_groups,
                   at::Tensor skip_flag, at::Tensor skip_count)
    : params_(std::move(params)),
      group_of_(std::move(group_of)),
      num_groups_(num_groups),
      saved_(params_.size()),
      norms_(params_.size()),
      skip_flag_(std::move(skip_flag)),
      skip_count_(std::move(skip_count)) {
  TORCH_CHECK(group_of_.size() == params_.size(), "StepPlan: group_of has ", group_of_.size(), " entries for ",
              params_.size(), " params");
  for (int64_t g : group_of_) TORCH_CHECK(0 <= g && g < num_groups_, "StepPlan: group ", g, " out of range");
  TORCH_CHECK(skip_flag_.scalar_type() == at::kBool && skip_flag_.numel() == 1 && skip_flag_.device().is_cpu(),
              "StepPlan: skip_flag must be a one-element CPU bool tensor");
  TORCH_CHECK(skip_count_.scalar_type() == at::kLong && skip_count_.numel() == 1 && skip_count_.device().is_cpu(),
              "StepPlan: skip_count must be a one-element CPU int64 tensor");
}

at::Tensor StepPlan::saved(int64_t i) const {
  TORCH_CHECK(0 <= i && i < size(), "StepPlan.saved: position ", i, " out of range");
  return saved_[i];
}

void StepPlan::set_saved(int64_t i, const at::Tensor& buffer) {
  TORCH_CHECK(0 <= i && i < size(), "StepPlan.set_saved: position ", i, " out of range");
  saved_[i] = buffer;
}

bool StepPlan::ensure_saved(const std::vector<int64_t>& positions) {
  for (int64_t i : positions) {
    const at::Tensor& w = params_[i];
    if (!matches(saved_[i], w)) saved_[i] = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  }
  return true;
}

bool StepPlan::gradients_usable(const std::vector<int64_t>& positions) const {
  for (int64_t i : positions)
    if (!usable_weight(params_[i]) || !matches(params_[i].grad(), params_[i])) return false;
  return true;
}

void StepPlan::record_skip(bool skipped) {
  *skip_flag_.data_ptr<bool>() = skipped;
  *skip_count_.data_ptr<int64_t>() += skipped ? 1 : 0;
}

int64_t StepPlan::sam_first_step(const std::vector<double>& rhos, const std::vector<double>& etas, int64_t mode,
                                 bool p_inf) {
  TORCH_CHECK(static_cast<int64_t>(rhos.size()) == num_groups_ && static_cast<int64_t>(etas.size()) == num_groups_,
              "StepPlan.sam_first_step: one rho and one eta per param group");
  std::vector<int64_t> positions;
  for (int64_t i = 0; i < size(); ++i)
    if (params_[i].grad().defined()) positions.push_back(i);
  if (!gradients_usable(positions)) return -1;
  ensure_saved(positions);

  // Pass 1: sum of (t * g)^2; filter-wise ASAM keeps each row's norm for pass 2.
  double total = 0;
  for (int64_t i : positions) {
    const at::Tensor& w = params_[i];
    const at::Tensor& g = w.grad();
    const FilterShape shape = filter_shape(w);
    const bool by_row = mode == sam::kFilter && shape.fsize;
    if (by_row) norms_[i].resize(shape.rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sam_first_step", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* wd = w.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      const acc_t eta = static_cast<acc_t>(etas[group_of_[i]]);
      if (by_row) {
        double* norms = norms_[i].data();
        const int64_t fsize = shape.fsize;
        auto sum = chunked_sum<acc_t, 1>(
            shape.rows,
            [&](int64_t r0, int64_t r1, std::array<acc_t, 1>& s) {
              for (int64_t r = r0; r < r1; ++r) {
                std::array<acc_t, 2> sq{};
                const scalar_t* x = wd + r * fsize;
                const scalar_t* y = gd + r * fsize;
                lane_sums<acc_t, 2>(0, fsize, sq, [&](int64_t k) {
                  const acc_t a = static_cast<acc_t>(x[k]), b = static_cast<acc_t>(y[k]);
                  return std::array<acc_t, 2>{a * a, b * b};
                });
                const acc_t norm = std::sqrt(sq[0]), gg = sq[1];
                norms[r] = static_cast<double>(norm);
                s[0] += (norm + eta) * (norm + eta) * gg;
              }
            },
            std::max<int64_t>(1, kChunk / fsize));
        total += static_cast<double>(sum[0]);
      } else {
        const int m = static_cast<int>(mode == sam::kFilter ? sam::kElement : mode);
        auto sum = chunked_sum<acc_t, 1>(w.numel(), [&](int64_t b, int64_t e, std::array<acc_t, 1>& s) {
          lane_sums<acc_t, 1>(b, e, s, [&](int64_t k) {
            const acc_t wk = static_cast<acc_t>(wd[k]);
            const acc_t tg = sam::asam_scale<acc_t>(wk, eta, acc_t(0), m) * static_cast<acc_t>(gd[k]);
            return std::array<acc_t, 1>{tg * tg};
          });
        });
        total += static_cast<double>(sum[0]);
      }
    });
  }
  const bool skipped = !std::isfinite(total);
  const double unit = skipped ? 0.0 : (p_inf ? 1.0 : 1.0 / (std::sqrt(total) + kNormGuard));

  // Pass 2: saved <- w; w <- w + eps.
  for (int64_t i : positions) {
    const at::Tensor& w = params_[i];
    const at::Tensor& g = w.grad();
    const FilterShape shape = filter_shape(w);
    const bool by_row = mode == sam::kFilter && shape.fsize;
    const int m = static_cast<int>(mode == sam::kFilter && !shape.fsize ? sam::kElement : mode);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sam_first_step", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* wd = w.data_ptr<scalar_t>();
      scalar_t* sd = saved_[i].data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      const acc_t eta = static_cast<acc_t>(etas[group_of_[i]]);
      const acc_t scale = static_cast<acc_t>(unit * rhos[group_of_[i]]);
      const double* norms = by_row ? norms_[i].data() : nullptr;
      // One loop per (mode, p): the branches on them leave the element loop, which then vectorises.
      auto pass = [&](auto mode_c, auto p_inf_c) {
        constexpr int kMode = decltype(mode_c)::value;
        constexpr bool kPInf = decltype(p_inf_c)::value;
        if (kMode == sam::kFilter) {  // row by row: t is one value per row
          const int64_t fsize = shape.fsize;
          at::parallel_for(0, shape.rows, std::max<int64_t>(1, kGrain / fsize), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              const acc_t t = static_cast<acc_t>(norms[r]) + eta;
              scalar_t* x = wd + r * fsize;
              scalar_t* saved = sd + r * fsize;
              const scalar_t* y = gd + r * fsize;
              for (int64_t k = 0; k < fsize; ++k) {
                const acc_t wk = static_cast<acc_t>(x[k]);
                saved[k] = x[k];
                const acc_t eps = sam::sam_perturbation<acc_t>(scale, t, static_cast<acc_t>(y[k]), kPInf);
                x[k] = static_cast<scalar_t>(wk + sam::finite_or_zero(eps));
              }
            }
          });
          return;
        }
        at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            const acc_t wk = static_cast<acc_t>(wd[k]);
            sd[k] = wd[k];
            const acc_t t = sam::asam_scale<acc_t>(wk, eta, acc_t(0), kMode);
            const acc_t eps = sam::sam_perturbation<acc_t>(scale, t, static_cast<acc_t>(gd[k]), kPInf);
            wd[k] = static_cast<scalar_t>(wk + sam::finite_or_zero(eps));
          }
        });
      };
      using std::integral_constant;
      switch (by_row ? int(sam::kFilter) : m) {
        case sam::kSam:
          p_inf ? pass(integral_constant<int, sam::kSam>{}, std::true_type{})
                : pass(integral_constant<int, sam::kSam>{}, std::false_type{});
          break;
        case sam::kElement:
          p_inf ? pass(integral_constant<int, sam::kElement>{}, std::true_type{})
                : pass(integral_constant<int, sam::kElement>{}, std::false_type{});
          break;
        default:
          p_inf ? pass(integral_constant<int, sam::kFilter>{}, std::true_type{})
                : pass(integral_constant<int, sam::kFilter>{}, std::false_type{});
      }
    });
    bump_version(w);
  }
  record_skip(skipped);
  active_ = std::move(positions);
  return static_cast<int64_t>(active_.size());
}

int64_t StepPlan::add_noise(const std::vector<double>& gammas, uint64_t seed, int64_t step) {
  TORCH_CHECK(static_cast<int64_t>(gammas.size()) == num_groups_, "StepPlan.add_noise: one gamma per param group");
  std::vector<int64_t> positions;
  for (int64_t i = 0; i < size(); ++i) {
    if (!params_[i].requires_grad()) continue;
    if (!usable_weight(params_[i])) return -1;
    positions.push_back(i);
  }
  ensure_saved(positions);
  const NoiseKey key = noise_key(seed, step);
  for (int64_t i : positions) {
    const at::Tensor& w = params_[i];
    const FilterShape shape = filter_shape(w);
    norms_[i].resize(shape.rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "add_noise", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* wd = w.data_ptr<scalar_t>();
      scalar_t* sd = saved_[i].data_ptr<scalar_t>();
      double* norms = norms_[i].data();
      const int64_t fsize = shape.fsize;
      auto noise_range = [&](int64_t begin, int64_t end) {
        noise_batches<acc_t>(begin, end, key, static_cast<uint32_t>(i), shape, norms, gammas[group_of_[i]], wd,
                             [&](int64_t base, int64_t n, const float* z, const acc_t* sigma) {
                               scalar_t* x = wd + base;
                               scalar_t* saved = sd + base;
                               for (int64_t k = 0; k < n; ++k) {
                                 saved[k] = x[k];
                                 x[k] = static_cast<scalar_t>(static_cast<acc_t>(x[k]) + sigma[k] * z[k]);
                               }
                             });
      };
      if (fsize) {
        // The rows' norms (kept for sigma in the later passes), then their noise while they are in cache.
        at::parallel_for(0, shape.rows, std::max<int64_t>(1, kGrain / fsize), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            std::array<acc_t, 1> ww{};
            const scalar_t* x = wd + r * fsize;
            lane_sums<acc_t, 1>(0, fsize, ww, [&](int64_t k) {
              const acc_t a = static_cast<acc_t>(x[k]);
              return std::array<acc_t, 1>{a * a};
            });
            norms[r] = static_cast<double>(std::sqrt(ww[0]));
          }
          noise_range(r0 * fsize, r1 * fsize);
        });
      } else {
        at::parallel_for(0, w.numel(), kGrain, noise_range);
      }
    });
    bump_version(w);
  }
  active_ = std::move(positions);
  return static_cast<int64_t>(active_.size());
}

int64_t StepPlan::rsam_first_step(const std::vector<double>& rhos, const std::vector<double>& gammas,
                                  const std::vector<double>& lams, uint64_t seed, int64_t step) {
  TORCH_CHECK(static_cast<int64_t>(rhos.size()) == num_groups_ && static_cast<int64_t>(gammas.size()) == num_groups_ &&
                  static_cast<int64_t>(lams.size()) == num_groups_,
              "StepPlan.rsam_first_step: one rho, gamma and lam per param group");
  std::vector<int64_t> kept, dropped;
  for (int64_t i : active_) {
    // The weight must still be what noise_step() saved (same dtype, shape, layout), and the rows the same.
    if (!usable_weight(params_[i]) || !matches(saved_[i], params_[i])) return -1;
    if (static_cast<int64_t>(norms_[i].size()) != filter_shape(params_[i]).rows) return -1;
    (params_[i].grad().defined() ? kept : dropped).push_back(i);
  }
  if (!gradients_usable(kept)) return -1;
  // Noised params that got no gradient take no part in this step: undo their noise now.
  for (int64_t i : dropped) {
    std::memcpy(params_[i].data_ptr(), saved_[i].data_ptr(), params_[i].nbytes());
    bump_version(params_[i]);
  }
  const NoiseKey key = noise_key(seed, step);

  // Pass 1: (sum delta^2, sum g^2, sum delta*g) per tensor, delta regenerated from the saved weights.
  double noise_sq = 0, grad_sq = 0, lam_dot = 0, lam_sq_grad_sq = 0;
  for (int64_t i : kept) {
    const at::Tensor& s = saved_[i];
    const at::Tensor& g = params_[i].grad();
    const FilterShape shape = filter_shape(s);
    const double gamma = gammas[group_of_[i]], lam = lams[group_of_[i]];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "rsam_first_step", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* sd = s.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      const double* norms = norms_[i].data();
      auto sum = chunked_sum<acc_t, 3>(s.numel(), [&](int64_t b, int64_t e, std::array<acc_t, 3>& acc) {
        noise_batches<acc_t>(b, e, key, static_cast<uint32_t>(i), shape, norms, gamma, sd,
                             [&](int64_t base, int64_t n, const float* z, const acc_t* sigma) {
                               const scalar_t* gb = gd + base;
                               lane_sums<acc_t, 3>(0, n, acc, [&](int64_t k) {
                                 const acc_t delta = sigma[k] * z[k];
                                 const acc_t gk = static_cast<acc_t>(gb[k]);
                                 return std::array<acc_t, 3>{delta * delta, gk * gk, delta * gk};
                               });
                             });
      });
      noise_sq += static_cast<double>(sum[0]);
      grad_sq += static_cast<double>(sum[1]);
      lam_dot += lam * static_cast<double>(sum[2]);
      lam_sq_grad_sq += lam * lam * static_cast<double>(sum[1]);
    });
  }
  // eps = a * delta + b * g = rho * d / (||d|| + 1e-12), d = delta/||delta|| + lam * g/||g|| (docs/DESIGN.md §2).
  const bool skipped = !(std::isfinite(noise_sq) && std::isfinite(grad_sq) && std::isfinite(lam_dot) &&
                         std::isfinite(lam_sq_grad_sq));
  const double inv_noise = 1.0 / (std::sqrt(noise_sq) + kNormGuard);
  const double inv_grad = 1.0 / (std::sqrt(grad_sq) + kNormGuard);
  const double d_sq = inv_noise * inv_noise * noise_sq + 2 * inv_noise * inv_grad * lam_dot +
                      inv_grad * inv_grad * lam_sq_grad_sq;
  const double inv_d = 1.0 / (std::sqrt(std::max(d_sq, 0.0)) + kNormGuard);
  const double noise_unit = skipped ? 0.0 : inv_noise * inv_d;
  const double grad_unit = skipped ? 0.0 : inv_grad * inv_d;

  // Pass 2: w <- saved + a * delta + b * g.
  for (int64_t i : kept) {
    const at::Tensor& w = params_[i];
    const at::Tensor& s = saved_[i];
    const at::Tensor& g = w.grad();
    const FilterShape shape = filter_shape(s);
    const double gamma = gammas[group_of_[i]], rho = rhos[group_of_[i]], lam = lams[group_of_[i]];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "rsam_first_step", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* wd = w.data_ptr<scalar_t>();
      const scalar_t* sd = s.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      const double* norms = norms_[i].data();
      const acc_t a = static_cast<acc_t>(rho * noise_unit), bcoef = static_cast<acc_t>(rho * lam * grad_unit);
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        noise_batches<acc_t>(begin, end, key, static_cast<uint32_t>(i), shape, norms, gamma, sd,
                             [&](int64_t base, int64_t n, const float* z, const acc_t* sigma) {
                               scalar_t* x = wd + base;
                               const scalar_t* sb = sd + base;
                               const scalar_t* gb = gd + base;
                               for (int64_t k = 0; k < n; ++k) {
                                 const acc_t eps = a * sigma[k] * z[k] + bcoef * static_cast<acc_t>(gb[k]);
                                 x[k] = static_cast<scalar_t>(static_cast<acc_t>(sb[k]) + sam::finite_or_zero(eps));
                               }
                             });
      });
    });
    bump_version(w);
  }
  record_skip(skipped);
  active_ = std::move(kept);
  return static_cast<int64_t>(active_.size());
}

int64_t StepPlan::restore() {
  for (int64_t i : active_)
    if (!usable_weight(params_[i]) || !matches(saved_[i], params_[i])) return -1;
  for (int64_t i : active_) {
    const at::Tensor& w = params_[i];
    char* dst = static_cast<char*>(w.data_ptr());
    const char* src = static_cast<const char*>(saved_[i].data_ptr());
    const int64_t bytes = static_cast<int64_t>(w.nbytes());
    at::parallel_for(0, bytes, kGrain * 4, [&](int64_t b, int64_t e) { std::memcpy(dst + b, src + b, e - b); });
    bump_version(w);
  }
  const int64_t count = static_cast<int64_t>(active_.size());
  active_.clear();
  return count;
}

}  // namespace sam_host
