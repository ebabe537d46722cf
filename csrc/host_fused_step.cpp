// The fused second step on the host (backend="cpp"): w <- saved, then torch.optim.SGD's or Adam(W)'s
// update, in one pass per tensor (docs/DESIGN.md §2.11). The per-element math is sam_math.h's; this file
// walks the tensors, parallelised with at::parallel_for.
#include "host_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <vector>

#include "host_common.h"
#include "sam_math.h"

namespace sam_host {
namespace {

void check_dense(const at::Tensor& t, const at::Tensor& w, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu() && t.scalar_type() == w.scalar_type() &&
                  t.numel() == w.numel(),
              "sam_kernels cpp backend: ", what, " must be a contiguous CPU tensor of the weight's dtype and size");
}

// The per-tensor hyperparameters of tensor j, in declaration order.
std::vector<double> hypers_of(const std::vector<std::vector<double>>& hypers, size_t j, int count) {
  TORCH_CHECK(static_cast<int>(hypers.size()) == count, "sam_kernels cpp backend: expected ", count,
              " hyperparameter lists, got ", hypers.size());
  std::vector<double> h(count);
  for (int k = 0; k < count; ++k) h[k] = hypers[k][j];
  return h;
}

// A CPU 0-d bool, read through its pointer (no dispatch: this runs once per tensor).
bool skipped(const at::Tensor& skip) {
  TORCH_CHECK(skip.device().is_cpu() && skip.numel() == 1 && skip.scalar_type() == at::kBool,
              "sam_kernels cpp backend: a skip flag must be a one-element CPU bool tensor");
  return *skip.const_data_ptr<bool>();
}

// A skipped step still ends the SAM step: the weights go back to the saved ones.
void restore_only(const at::Tensor& w, const at::Tensor& s) {
  if (w.data_ptr() != s.data_ptr()) w.copy_(s);
}

template <bool kMomentum, typename scalar_t>
SAM_HOST_CLONES void sgd_range(scalar_t* w, const scalar_t* s, const scalar_t* g, scalar_t* m, int64_t begin,
                               int64_t end, const sam::SgdCoefs<at::opmath_type<scalar_t>>& coefs) {
  using acc_t = at::opmath_type<scalar_t>;
  const sam::SgdCoefs<acc_t> c = coefs;  // a local copy: the stores below cannot alias it, so it stays in registers
  scalar_t unused{};
  for (int64_t i = begin; i < end; ++i) {
    scalar_t& mi = kMomentum ? m[i] : unused;
    w[i] = static_cast<scalar_t>(
        sam::sgd_update<kMomentum, acc_t, scalar_t>(static_cast<acc_t>(s[i]), static_cast<acc_t>(g[i]), mi, c));
  }
}

template <int kDecay, bool kAmsgrad, typename scalar_t>
SAM_HOST_CLONES void adam_range(scalar_t* w, const scalar_t* s, const scalar_t* g, scalar_t* m, scalar_t* v,
                                scalar_t* vmax, int64_t begin, int64_t end,
                                const sam::AdamCoefs<at::opmath_type<scalar_t>>& coefs) {
  using acc_t = at::opmath_type<scalar_t>;
  const sam::AdamCoefs<acc_t> c = coefs;  // a local copy: the stores below cannot alias it, so it stays in registers
  for (int64_t i = begin; i < end; ++i)
    w[i] = static_cast<scalar_t>(sam::adam_update<kDecay, kAmsgrad, acc_t, scalar_t>(
        static_cast<acc_t>(s[i]), static_cast<acc_t>(g[i]), m[i], v[i], kAmsgrad ? vmax + i : nullptr, c));
}

// adam_range with its options as template arguments.
template <typename scalar_t>
void adam_range_for(int decay, bool amsgrad, scalar_t* w, const scalar_t* s, const scalar_t* g, scalar_t* m,
                    scalar_t* v, scalar_t* vmax, int64_t begin, int64_t end,
                    const sam::AdamCoefs<at::opmath_type<scalar_t>>& c) {
  using sam::kCoupledDecay;
  using sam::kDecoupledDecay;
  using sam::kNoDecay;
  if (amsgrad) {
    if (decay == kNoDecay) adam_range<kNoDecay, true>(w, s, g, m, v, vmax, begin, end, c);
    if (decay == kCoupledDecay) adam_range<kCoupledDecay, true>(w, s, g, m, v, vmax, begin, end, c);
    if (decay == kDecoupledDecay) adam_range<kDecoupledDecay, true>(w, s, g, m, v, vmax, begin, end, c);
  } else {
    if (decay == kNoDecay) adam_range<kNoDecay, false>(w, s, g, m, v, vmax, begin, end, c);
    if (decay == kCoupledDecay) adam_range<kCoupledDecay, false>(w, s, g, m, v, vmax, begin, end, c);
    if (decay == kDecoupledDecay) adam_range<kDecoupledDecay, false>(w, s, g, m, v, vmax, begin, end, c);
  }
}

// Momentum-SAM: w0 = w + a m_old (a fresh buffer holds nothing: w0 = w), then SGD's update from w0.
template <bool kFresh, typename scalar_t>
SAM_HOST_CLONES void msam_sgd_range(scalar_t* w, const scalar_t* g, scalar_t* m, int64_t begin, int64_t end,
                                    at::opmath_type<scalar_t> shift,
                                    const sam::SgdCoefs<at::opmath_type<scalar_t>>& coefs) {
  using acc_t = at::opmath_type<scalar_t>;
  const sam::SgdCoefs<acc_t> c = coefs;
  const acc_t a = shift;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t wi = static_cast<acc_t>(w[i]);
    const acc_t w0 = kFresh ? wi : wi + a * static_cast<acc_t>(m[i]);
    w[i] = static_cast<scalar_t>(sam::sgd_update<true, acc_t, scalar_t>(w0, static_cast<acc_t>(g[i]), m[i], c));
  }
}

// A skipped Momentum-SAM step: only the undo, w <- w + a m.
template <typename scalar_t>
void msam_undo_range(scalar_t* w, const scalar_t* m, int64_t begin, int64_t end, at::opmath_type<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i)
    w[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) + a * static_cast<acc_t>(m[i]));
}

}  // namespace

void restore_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved,
                  const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& momenta,
                  const std::vector<at::Tensor>& skips, const std::vector<std::vector<double>>& hypers) {
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor &w = params[j], &s = saved[j], &g = grads[j], &m = momenta[j];
    const std::vector<double> h = hypers_of(hypers, j, sam::kSgdHypers);
    const bool momentum = h[sam::kSgdMomentum] != 0;
    check_dense(w, w, "weight");
    check_dense(s, w, "saved copy");
    check_dense(g, w, "gradient");
    if (momentum) check_dense(m, w, "momentum buffer");
    if (skipped(skips[j])) {
      restore_only(w, s);
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "restore_sgd_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const sam::SgdCoefs<acc_t> c = sam::sgd_coefs<acc_t>(h.data());
      scalar_t* wd = w.data_ptr<scalar_t>();
      const scalar_t* sd = s.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      scalar_t* md = momentum ? m.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        if (momentum)
          sgd_range<true>(wd, sd, gd, md, begin, end, c);
        else
          sgd_range<false>(wd, sd, gd, md, begin, end, c);
      });
    });
  }
}

void restore_adam_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved,
                   const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                   const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& max_exp_avg_sqs,
                   const std::vector<at::Tensor>& skips, const std::vector<std::vector<double>>& hypers) {
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor &w = params[j], &s = saved[j], &g = grads[j];
    const std::vector<double> h = hypers_of(hypers, j, sam::kAdamHypers);
    const bool amsgrad = h[sam::kAdamAmsgrad] != 0;
    check_dense(w, w, "weight");
    check_dense(s, w, "saved copy");
    check_dense(g, w, "gradient");
    check_dense(exp_avgs[j], w, "exp_avg");
    check_dense(exp_avg_sqs[j], w, "exp_avg_sq");
    if (amsgrad) check_dense(max_exp_avg_sqs[j], w, "max_exp_avg_sq");
    if (skipped(skips[j])) {
      restore_only(w, s);
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "restore_adam_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const sam::AdamCoefs<acc_t> c = sam::adam_coefs<acc_t>(h.data());
      scalar_t* wd = w.data_ptr<scalar_t>();
      const scalar_t* sd = s.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      scalar_t* md = exp_avgs[j].data_ptr<scalar_t>();
      scalar_t* vd = exp_avg_sqs[j].data_ptr<scalar_t>();
      scalar_t* xd = amsgrad ? max_exp_avg_sqs[j].data_ptr<scalar_t>() : nullptr;
      const int decay = sam::adam_decay_kind(h.data());
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        adam_range_for(decay, amsgrad, wd, sd, gd, md, vd, xd, begin, end, c);
      });
    });
  }
}

at::Tensor msam_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& momenta, const std::vector<at::Tensor>& shifts,
                     const std::vector<at::Tensor>& skips, const std::vector<std::vector<double>>& hypers) {
  double total = 0;
  bool any_double = false;
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor &w = params[j], &g = grads[j], &m = momenta[j];
    std::vector<double> h = hypers_of(hypers, j, sam::kSgdHypers);
    check_dense(w, w, "weight");
    check_dense(g, w, "gradient");
    check_dense(m, w, "momentum buffer");
    TORCH_CHECK(h[sam::kSgdMomentum] != 0, "sam_kernels cpp backend: msam_sgd_ needs momentum > 0");
    any_double |= w.scalar_type() == at::kDouble;
    const bool fresh = h[sam::kSgdFresh] != 0, skip = skipped(skips[j]);
    const at::Tensor& c = shifts[j];
    TORCH_CHECK(c.device().is_cpu() && c.numel() == 1, "sam_kernels cpp backend: a shift must be a one-element CPU tensor");
    const double shift = c.scalar_type() == at::kDouble ? *c.const_data_ptr<double>() : c.item<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "msam_sgd_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const sam::SgdCoefs<acc_t> coefs = sam::sgd_coefs<acc_t>(h.data());
      const acc_t a = static_cast<acc_t>(shift);
      scalar_t* wd = w.data_ptr<scalar_t>();
      const scalar_t* gd = g.data_ptr<scalar_t>();
      scalar_t* md = m.data_ptr<scalar_t>();
      // Per chunk: the update (a loop that vectorises), then sum m_new^2 over the chunk, still in cache.
      auto sum = chunked_sum<acc_t, 1>(w.numel(), [&](int64_t begin, int64_t end, std::array<acc_t, 1>& out) {
        if (skip) {
          if (!fresh) msam_undo_range<scalar_t>(wd, md, begin, end, a);  // a fresh buffer: nothing to undo
        } else if (fresh)
          msam_sgd_range<true, scalar_t>(wd, gd, md, begin, end, a, coefs);
        else
          msam_sgd_range<false, scalar_t>(wd, gd, md, begin, end, a, coefs);
        lane_sums<acc_t, 1>(begin, end, out, [md](int64_t i) {
          const acc_t mi = static_cast<acc_t>(md[i]);
          return std::array<acc_t, 1>{mi * mi};
        });
      });
      total += static_cast<double>(sum[0]);
    });
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble)).to(any_double ? at::kDouble : at::kFloat);
}

}  // namespace sam_host
