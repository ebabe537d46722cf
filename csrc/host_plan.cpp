// backend="cpp": the step plan (host_plan.h). Each phase reads every param it touches once into a View
// (checking it), then runs fused passes over raw memory. No ATen op is dispatched in a step once the
// saved buffers exist (a TorchDispatchMode sees none), and the per-tensor cost is a few tens of ns.
#include "host_plan.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include "host_common.h"
#include "noise_batch.h"
#include "sam_math.h"

namespace sam_host {
namespace {

using View = StepPlan::View;
constexpr double kNormGuard = 1e-12;

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A weight the plan's passes can run on: a dense contiguous CPU tensor of a floating dtype.
bool usable_weight(const at::Tensor& w) {
  return w.layout() == at::kStrided && w.device().is_cpu() && supported_dtype(w.scalar_type()) && w.is_contiguous();
}

// A buffer (gradient or saved copy) that matches its weight element for element.
bool matches(const at::Tensor& t, const at::Tensor& w) {
  return t.defined() && t.layout() == at::kStrided && t.device() == w.device() &&
         t.scalar_type() == w.scalar_type() && t.sizes().equals(w.sizes()) && t.is_contiguous();
}

void bump_version(const at::Tensor& w) { w.unsafeGetTensorImpl()->bump_version(); }

// at::parallel_for, called only for ranges worth splitting (small tensors run inline, with no overhead).
template <typename F>
void parallel_range(int64_t n, int64_t grain, const F& f) {
  if (n <= grain) {
    if (n > 0) f(int64_t(0), n);
    return;
  }
  at::parallel_for(0, n, grain, f);
}

// sum += the lane sum (lane_sums) of term(k) over [0, n).
template <typename acc_t, typename Term>
inline void add_lane_sum(int64_t n, acc_t& sum, const Term& term) {
  std::array<acc_t, 1> out{sum};
  lane_sums<acc_t, 1>(0, n, out, [&term](int64_t k) { return std::array<acc_t, 1>{term(k)}; });
  sum = out[0];
}

// Calls f(scalar_t{}) for the view's dtype.
template <typename F>
void dispatch(at::ScalarType type, const F& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "StepPlan: unsupported dtype ", type);
  }
}

// ||row|| of each row of [r0, r1) into norms.
template <typename scalar_t>
void row_norms(const scalar_t* w, int64_t fsize, int64_t r0, int64_t r1, double* norms) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = r0; r < r1; ++r) norms[r] = row_norm<acc_t>(w + r * fsize, fsize);
}

// Runs body(base, n, delta) over [begin, end) of tensor j in batches of up to kNoiseBatch elements:
// delta[k] = sigma * z the noise delta0 of element base + k (docs/DESIGN.md §2.4-§3), sigma per row from
// the norms kept by add_noise (ndim >= 2) or gamma * |w| of `before_noise` (ndim <= 1).
template <typename acc_t, typename scalar_t, typename Body>
void noise_batches(int64_t begin, int64_t end, const NoiseKey& key, uint32_t j, int64_t fsize, const double* norms,
                   double gamma, const scalar_t* before_noise, const Body& body) {
  float z[kNoiseBatch];
  acc_t delta[kNoiseBatch];
  const acc_t gamma_acc = static_cast<acc_t>(gamma);
  const acc_t gamma_over_sqrt_n = fsize ? static_cast<acc_t>(gamma / std::sqrt(static_cast<double>(fsize))) : acc_t(0);
  for (int64_t base = begin; base < end; base += kNoiseBatch) {
    const int64_t n = std::min<int64_t>(kNoiseBatch, end - base);
    standard_normals(z, base, n, key.k0, key.k1, j, key.step);
    if (fsize) {
      int64_t row = base / fsize, col = base - row * fsize;
      for (int64_t k = 0; k < n; col = 0, ++row) {
        const acc_t sigma = sam::filter_noise_std(gamma_over_sqrt_n, static_cast<acc_t>(norms[row]));
        const int64_t run = std::min(n - k, fsize - col);
        for (int64_t q = k; q < k + run; ++q) delta[q] = sam::noise_delta(sigma, z[q]);
        k += run;
      }
    } else {
      const scalar_t* w = before_noise + base;
      for (int64_t k = 0; k < n; ++k)
        delta[k] = sam::noise_delta(sam::element_noise_std(gamma_acc, static_cast<acc_t>(w[k])), z[k]);
    }
    body(base, n, static_cast<const acc_t*>(delta));
  }
}

// ---------------------------------------------------------------- SAM / ASAM passes
// Sum of (t * g)^2 over the view; filter-wise ASAM keeps each row's norm (one pass reads w and g once).
template <typename scalar_t>
SAM_HOST_CLONES double sam_sum(const View& v, int mode, double eta_value, double* norms) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* wd = static_cast<const scalar_t*>(v.w);
  const scalar_t* gd = static_cast<const scalar_t*>(v.g);
  const acc_t eta = static_cast<acc_t>(eta_value);
  if (mode == sam::kFilter && v.fsize) {
    const int64_t fsize = v.fsize;
    auto sum = chunked_sum<acc_t, 1>(
        v.rows,
        [&](int64_t r0, int64_t r1, std::array<acc_t, 1>& s) {
          for (int64_t r = r0; r < r1; ++r) {
            // One pass for sum w^2 and sum g^2, and t^2 * sum g^2 when every factor is well inside float
            // range (always, but at the extremes of the dtype); else the row's exact norm, then its (t g)^2
            // term by term while the row is in cache (t g is in range where t^2 and g^2 are not).
            const scalar_t* x = wd + r * fsize;
            const scalar_t* y = gd + r * fsize;
            acc_t sq[2] = {0, 0};  // two one-term lane sums: same bits as one two-term sum, no shuffles
            add_lane_sum(fsize, sq[0], [x](int64_t k) {
              const acc_t a = static_cast<acc_t>(x[k]);
              return a * a;
            });
            add_lane_sum(fsize, sq[1], [y](int64_t k) {
              const acc_t b = static_cast<acc_t>(y[k]);
              return b * b;
            });
            const bool safe = fsize > 1 && squares_in_range(sq[0]) && squares_in_range(sq[1]) && eta < 1e15;
            if (safe) {
              const acc_t norm = std::sqrt(sq[0]);
              norms[r] = static_cast<double>(norm);
              s[0] += (norm + eta) * (norm + eta) * sq[1];
              continue;
            }
            norms[r] = row_norm<acc_t>(x, fsize);
            const acc_t t = static_cast<acc_t>(norms[r]) + eta;
            lane_sums<acc_t, 1>(0, fsize, s, [t, y](int64_t k) {
              const acc_t tg = t * static_cast<acc_t>(y[k]);
              return std::array<acc_t, 1>{tg * tg};
            });
          }
        },
        std::max<int64_t>(1, kChunk / fsize));
    return static_cast<double>(sum[0]);
  }
  const int m = mode == sam::kFilter ? int(sam::kElement) : mode;
  auto sum = chunked_sum<acc_t, 1>(v.numel, [&](int64_t b, int64_t e, std::array<acc_t, 1>& s) {
    if (m == sam::kSam) {
      lane_sums<acc_t, 1>(b, e, s, [gd](int64_t k) {
        const acc_t g = static_cast<acc_t>(gd[k]);
        return std::array<acc_t, 1>{g * g};
      });
    } else {
      lane_sums<acc_t, 1>(b, e, s, [wd, gd, eta](int64_t k) {
        const acc_t tg = (std::abs(static_cast<acc_t>(wd[k])) + eta) * static_cast<acc_t>(gd[k]);
        return std::array<acc_t, 1>{tg * tg};
      });
    }
  });
  return static_cast<double>(sum[0]);
}

// saved <- w; w <- w + eps, eps = s t^2 g (p = 2) or s t sign(g) (p = inf). One loop per (mode, p).
template <typename scalar_t, int kMode, bool kPInf>
SAM_HOST_CLONES void sam_perturb(const View& v, double eta_value, double scale_value, const double* norms) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* wd = static_cast<scalar_t*>(v.w);
  scalar_t* sd = static_cast<scalar_t*>(v.s);
  const scalar_t* gd = static_cast<const scalar_t*>(v.g);
  const acc_t eta = static_cast<acc_t>(eta_value), scale = static_cast<acc_t>(scale_value);
  auto update = [&](int64_t begin, int64_t end, acc_t t_row) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t wk = static_cast<acc_t>(wd[k]);
      sd[k] = wd[k];
      const acc_t t = kMode == sam::kFilter ? t_row : sam::asam_scale<acc_t>(wk, eta, acc_t(0), kMode);
      const acc_t eps = sam::sam_perturbation<acc_t>(scale, t, static_cast<acc_t>(gd[k]), kPInf);
      wd[k] = static_cast<scalar_t>(wk + sam::finite_or_zero(eps));
    }
  };
  if (kMode == sam::kFilter) {  // row by row: t is one value per row
    parallel_range(v.rows, std::max<int64_t>(1, kGrain / v.fsize), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) update(r * v.fsize, (r + 1) * v.fsize, static_cast<acc_t>(norms[r]) + eta);
    });
  } else {
    parallel_range(v.numel, kGrain, [&](int64_t b, int64_t e) { update(b, e, acc_t(0)); });
  }
}

template <typename scalar_t>
void sam_perturb_any(const View& v, int mode, bool p_inf, double eta, double scale, const double* norms) {
  const int m = mode == sam::kFilter && !v.fsize ? int(sam::kElement) : mode;
#define SAM_PERTURB_CASE(M)                                                 \
  case M:                                                                   \
    p_inf ? sam_perturb<scalar_t, M, true>(v, eta, scale, norms)            \
          : sam_perturb<scalar_t, M, false>(v, eta, scale, norms);          \
    break;
  switch (m) {
    SAM_PERTURB_CASE(sam::kSam)
    SAM_PERTURB_CASE(sam::kElement)
    SAM_PERTURB_CASE(sam::kFilter)
  }
#undef SAM_PERTURB_CASE
}

// ---------------------------------------------------------------- R-SAM passes
// saved <- w; w <- w + delta0. For filters: the rows' norms (kept for sigma in the later passes), then
// their noise while they are in cache.
template <typename scalar_t>
SAM_HOST_CLONES void noise_add(const View& v, double gamma, const NoiseKey& key, double* norms) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* wd = static_cast<scalar_t*>(v.w);
  scalar_t* sd = static_cast<scalar_t*>(v.s);
  auto noise_range = [&](int64_t begin, int64_t end) {
    noise_batches<acc_t>(begin, end, key, static_cast<uint32_t>(v.i), v.fsize, norms, gamma, wd,
                         [&](int64_t base, int64_t n, const acc_t* __restrict delta) {
                           scalar_t* __restrict x = wd + base;
                           scalar_t* __restrict saved = sd + base;
                           for (int64_t k = 0; k < n; ++k) {
                             saved[k] = x[k];
                             x[k] = static_cast<scalar_t>(static_cast<acc_t>(x[k]) + delta[k]);
                           }
                         });
  };
  if (v.fsize) {
    parallel_range(v.rows, std::max<int64_t>(1, kGrain / v.fsize), [&](int64_t r0, int64_t r1) {
      row_norms(static_cast<const scalar_t*>(wd), v.fsize, r0, r1, norms);
      noise_range(r0 * v.fsize, r1 * v.fsize);
    });
  } else {
    parallel_range(v.numel, kGrain, noise_range);
  }
}

// Whether the sums pass may keep delta0 in the weight's memory for the mix pass (one draw of the stream
// instead of two; docs/DESIGN.md §6): the weight holds acc_t exactly (float32, float64), and the
// gradient does not share its memory (the mix pass still reads it).
template <typename scalar_t>
bool keeps_delta(const View& v) {
  if (!std::is_same<scalar_t, at::opmath_type<scalar_t>>::value) return false;
  const char* w = static_cast<const char*>(v.w);
  const char* g = static_cast<const char*>(v.g);
  const int64_t bytes = v.numel * static_cast<int64_t>(sizeof(scalar_t));
  return g + bytes <= w || w + bytes <= g;
}

// (sum delta^2, sum g^2, sum delta * g), delta regenerated from the saved weights; with keep, delta is
// also written over the weight (the mix pass that follows overwrites every element of it).
template <typename scalar_t>
SAM_HOST_CLONES std::array<double, 3> rsam_sums(const View& v, double gamma, const NoiseKey& key, const double* norms, bool keep) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* sd = static_cast<const scalar_t*>(v.s);
  const scalar_t* gd = static_cast<const scalar_t*>(v.g);
  scalar_t* kept = keep ? static_cast<scalar_t*>(v.w) : nullptr;
  auto sum = chunked_sum<acc_t, 3>(v.numel, [&](int64_t b, int64_t e, std::array<acc_t, 3>& acc) {
    noise_batches<acc_t>(b, e, key, static_cast<uint32_t>(v.i), v.fsize, norms, gamma, sd,
                         [&](int64_t base, int64_t n, const acc_t* delta) {
                           // Three one-term lane sums (same lanes, same bits as one three-term sum),
                           // each a plain vector loop.
                           const scalar_t* gb = gd + base;
                           add_lane_sum(n, acc[0], [delta](int64_t k) { return delta[k] * delta[k]; });
                           add_lane_sum(n, acc[1], [gb](int64_t k) {
                             const acc_t gk = static_cast<acc_t>(gb[k]);
                             return gk * gk;
                           });
                           add_lane_sum(n, acc[2], [delta, gb](int64_t k) { return delta[k] * static_cast<acc_t>(gb[k]); });
                           if (kept)
                             for (int64_t k = 0; k < n; ++k) kept[base + k] = static_cast<scalar_t>(delta[k]);
                         });
  });
  return {static_cast<double>(sum[0]), static_cast<double>(sum[1]), static_cast<double>(sum[2])};
}

// w <- saved + a * delta + b * g; delta read from w where the sums pass kept it there, else regenerated.
template <typename scalar_t>
SAM_HOST_CLONES void rsam_mix(const View& v, double gamma, double a_value, double b_value, const NoiseKey& key, const double* norms,
              bool kept) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* wd = static_cast<scalar_t*>(v.w);
  const scalar_t* sd = static_cast<const scalar_t*>(v.s);
  const scalar_t* gd = static_cast<const scalar_t*>(v.g);
  const acc_t a = static_cast<acc_t>(a_value), b = static_cast<acc_t>(b_value);
  auto eps = [a, b](acc_t delta, scalar_t g) {
    return sam::finite_or_zero(sam::rsam_perturbation(a, delta, b, static_cast<acc_t>(g)));
  };
  // w, saved and g are distinct buffers (restrict: plain vector loops).
  auto mix_kept = [&](int64_t n, scalar_t* __restrict x, const scalar_t* __restrict sv,
                      const scalar_t* __restrict gv) {  // delta0 in x (scalar_t is acc_t)
    for (int64_t k = 0; k < n; ++k) x[k] = static_cast<scalar_t>(static_cast<acc_t>(sv[k]) + eps(x[k], gv[k]));
  };
  auto mix = [&](int64_t n, const acc_t* __restrict delta, scalar_t* __restrict x, const scalar_t* __restrict sv,
                 const scalar_t* __restrict gv) {
    for (int64_t k = 0; k < n; ++k) x[k] = static_cast<scalar_t>(static_cast<acc_t>(sv[k]) + eps(delta[k], gv[k]));
  };
  parallel_range(v.numel, kGrain, [&](int64_t begin, int64_t end) {
    if (kept) {
      mix_kept(end - begin, wd + begin, sd + begin, gd + begin);
      return;
    }
    noise_batches<acc_t>(begin, end, key, static_cast<uint32_t>(v.i), v.fsize, norms, gamma, sd,
                         [&](int64_t base, int64_t n, const acc_t* delta) {
                           mix(n, delta, wd + base, sd + base, gd + base);
                         });
  });
}

void copy_back(const View& v) {
  const int64_t bytes = v.numel * static_cast<int64_t>(c10::elementSize(v.dtype));
  char* dst = static_cast<char*>(v.w);
  const char* src = static_cast<const char*>(v.s);
  parallel_range(bytes, kGrain * 4, [&](int64_t b, int64_t e) { std::memcpy(dst + b, src + b, e - b); });
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
  views_.reserve(params_.size());
  scratch_.reserve(params_.size());
}

std::vector<int64_t> StepPlan::active() const {
  std::vector<int64_t> positions;
  positions.reserve(views_.size());
  for (const View& v : views_) positions.push_back(v.i);
  return positions;
}

at::Tensor StepPlan::saved(int64_t i) const {
  TORCH_CHECK(0 <= i && i < size(), "StepPlan.saved: position ", i, " out of range");
  return saved_[i];
}

void StepPlan::set_saved(int64_t i, const at::Tensor& buffer) {
  TORCH_CHECK(0 <= i && i < size(), "StepPlan.set_saved: position ", i, " out of range");
  saved_[i] = buffer;
}

// The view of param i (its gradient too when with_grad), or false when a pass cannot take it here.
bool StepPlan::view_of(int64_t i, bool with_grad, View& view) {
  const at::Tensor& w = params_[i];
  if (!usable_weight(w)) return false;
  view.i = i;
  view.w = w.data_ptr();
  view.g = nullptr;
  if (with_grad) {
    const at::Tensor& g = w.grad();
    if (!matches(g, w)) return false;
    view.g = g.data_ptr();
  }
  view.s = nullptr;
  view.numel = w.numel();
  view.rows = w.dim() >= 2 ? w.size(0) : 0;
  view.fsize = view.rows ? view.numel / view.rows : 0;
  view.dtype = w.scalar_type();
  view.group = group_of_[i];
  return true;
}

// Whether no two weights share memory (params viewing one storage would be perturbed and restored twice).
// Sorting costs O(n log n): it runs only when the set of addresses and sizes changed since the last check.
bool StepPlan::disjoint(const std::vector<View>& views) {
  uint64_t signature = 1469598103934665603ull;
  for (const View& v : views) {
    signature = (signature ^ reinterpret_cast<uintptr_t>(v.w)) * 1099511628211ull;
    signature = (signature ^ static_cast<uint64_t>(v.numel)) * 1099511628211ull;
  }
  if (signature == checked_layout_) return true;
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  spans.reserve(views.size());
  for (const View& v : views) {
    if (!v.numel) continue;
    const uintptr_t start = reinterpret_cast<uintptr_t>(v.w);
    spans.emplace_back(start, start + static_cast<uintptr_t>(v.numel) * c10::elementSize(v.dtype));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k)
    if (spans[k].first < spans[k - 1].second) return false;
  checked_layout_ = signature;
  return true;
}

// The views of a step's first phase in scratch_: the params with a gradient (with_grad) or trainable,
// checked; then their saved buffers (made or re-made here only, at the start of a step) and norm buffers.
// False, with nothing written, when a pass cannot take one of them.
bool StepPlan::begin_step(bool with_grad) {
  scratch_.clear();
  View v;
  for (int64_t i = 0; i < size(); ++i) {
    if (with_grad ? !params_[i].grad().defined() : !params_[i].requires_grad()) continue;
    if (!view_of(i, with_grad, v)) return false;
    scratch_.push_back(v);
  }
  if (!disjoint(scratch_)) return false;
  for (View& view : scratch_) {
    const at::Tensor& w = params_[view.i];
    if (!matches(saved_[view.i], w)) saved_[view.i] = at::empty(w.sizes(), w.options());
    view.s = saved_[view.i].data_ptr();
    norms_[view.i].resize(view.rows);
  }
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
  TORCH_CHECK(0 <= mode && mode <= 2, "StepPlan.sam_first_step: mode must be 0, 1 or 2");
  if (!begin_step(/*with_grad=*/true)) return -1;
  double total = 0;  // pass 1: sum of (t * g)^2, in a fixed order
  for (const View& view : scratch_)
    dispatch(view.dtype, [&](auto tag) {
      total += sam_sum<decltype(tag)>(view, static_cast<int>(mode), etas[view.group], norms_[view.i].data());
    });
  const bool skipped = !std::isfinite(total);
  const double unit = skipped ? 0.0 : (p_inf ? 1.0 : 1.0 / (std::sqrt(total) + kNormGuard));
  for (const View& view : scratch_) {  // pass 2: saved <- w, w <- w + eps
    dispatch(view.dtype, [&](auto tag) {
      sam_perturb_any<decltype(tag)>(view, static_cast<int>(mode), p_inf, etas[view.group], unit * rhos[view.group],
                                     norms_[view.i].data());
    });
    bump_version(params_[view.i]);
  }
  record_skip(skipped);
  std::swap(views_, scratch_);
  return static_cast<int64_t>(views_.size());
}

int64_t StepPlan::add_noise(const std::vector<double>& gammas, uint64_t seed, int64_t step) {
  TORCH_CHECK(static_cast<int64_t>(gammas.size()) == num_groups_, "StepPlan.add_noise: one gamma per param group");
  if (!begin_step(/*with_grad=*/false)) return -1;
  const NoiseKey key = noise_key(seed, step);
  for (const View& view : scratch_) {
    dispatch(view.dtype, [&](auto tag) {
      noise_add<decltype(tag)>(view, gammas[view.group], key, norms_[view.i].data());
    });
    bump_version(params_[view.i]);
  }
  std::swap(views_, scratch_);
  return static_cast<int64_t>(views_.size());
}

int64_t StepPlan::rsam_first_step(const std::vector<double>& rhos, const std::vector<double>& gammas,
                                  const std::vector<double>& lams, uint64_t seed, int64_t step) {
  TORCH_CHECK(static_cast<int64_t>(rhos.size()) == num_groups_ && static_cast<int64_t>(gammas.size()) == num_groups_ &&
                  static_cast<int64_t>(lams.size()) == num_groups_,
              "StepPlan.rsam_first_step: one rho, gamma and lam per param group");
  // The noised params: each must still be what noise_step() saved (same storage, dtype, shape).
  scratch_.clear();
  std::vector<View> dropped;
  View v;
  for (const View& noised : views_) {
    const int64_t i = noised.i;
    const bool has_grad = params_[i].grad().defined();
    if (!view_of(i, has_grad, v) || v.w != noised.w || !matches(saved_[i], params_[i])) return -1;
    v.s = noised.s;
    (has_grad ? scratch_ : dropped).push_back(v);
  }
  // Noised params that got no gradient take no part in this step: undo their noise now.
  for (const View& view : dropped) {
    copy_back(view);
    bump_version(params_[view.i]);
  }
  const NoiseKey key = noise_key(seed, step);
  double noise_sq = 0, grad_sq = 0, lam_dot = 0, lam_sq_grad_sq = 0;  // pass 1, in a fixed order
  kept_.assign(scratch_.size(), false);
  for (size_t q = 0; q < scratch_.size(); ++q) {
    const View& view = scratch_[q];
    dispatch(view.dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      kept_[q] = keeps_delta<scalar_t>(view);
      const auto sums = rsam_sums<scalar_t>(view, gammas[view.group], key, norms_[view.i].data(), kept_[q]);
      const double tensor_sums[3] = {sums[0], sums[1], sums[2]};
      double weighted[4];
      sam::rsam_weighted_sums(tensor_sums, lams[view.group], weighted);
      noise_sq += weighted[0];
      grad_sq += weighted[1];
      lam_dot += weighted[2];
      lam_sq_grad_sq += weighted[3];
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
  for (size_t q = 0; q < scratch_.size(); ++q) {  // pass 2: w <- saved + a * delta + b * g
    const View& view = scratch_[q];
    const double rho = rhos[view.group], lam = lams[view.group];
    dispatch(view.dtype, [&](auto tag) {
      rsam_mix<decltype(tag)>(view, gammas[view.group], rho * noise_unit, rho * lam * grad_unit, key,
                              norms_[view.i].data(), kept_[q]);
    });
    bump_version(params_[view.i]);
  }
  record_skip(skipped);
  std::swap(views_, scratch_);
  return static_cast<int64_t>(views_.size());
}

int64_t StepPlan::restore() {
  for (const View& view : views_) {
    const at::Tensor& w = params_[view.i];
    // Still the storage, dtype and shape that was saved: else the caller converts or refuses.
    if (!usable_weight(w) || w.data_ptr() != view.w || !matches(saved_[view.i], w)) return -1;
  }
  for (const View& view : views_) {
    copy_back(view);
    bump_version(params_[view.i]);
  }
  const int64_t count = static_cast<int64_t>(views_.size());
  views_.clear();
  return count;
}

}  // namespace sam_host
