// CUDA implementation of the sam_kernels backend operations (backend="cuda").
//
// Every pass is one multi-tensor kernel per launch of up to kMaxTensors tensors
// (multi_tensor.cuh): 16-byte vector loads where a tensor's pointers are aligned,
// a scalar tail, int64 indexing, and per-tensor scales read from device memory so
// no step waits on the host and a step can be captured in a CUDA graph.
// Reductions are two-stage and deterministic: every block writes its partial sum to
// its own slot, then one block adds the slots in a fixed order.
// The per-element math (ASAM scale, Philox + Box-Muller, the non-finite guard) is
// sam_math.h, shared with the host build; reference.py is the oracle.
#include "cuda_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <cmath>
#include <unordered_map>

#include "multi_tensor.cuh"
#include "sam_math.h"

namespace sam_cuda {
namespace {

constexpr int kSumThreads = 1024;

template <typename A>
__device__ __forceinline__ A abs_of(A x) {
  return x < A(0) ? -x : x;
}

// Filter (row) of element i of a tensor with `fsize` elements per filter; 32-bit division when it fits.
__device__ __forceinline__ int64_t row_of(int64_t i, int64_t fsize) {
  if (i <= INT32_MAX && fsize <= INT32_MAX) return static_cast<int32_t>(i) / static_cast<int32_t>(fsize);
  return i / fsize;
}

// The elements [begin, end) of the chunk this block works on, and its tensor t.
struct BlockWork {
  int t;
  int64_t begin, end;
};

template <typename List>  // TensorList or PayloadList
__device__ __forceinline__ BlockWork block_work(const List& m) {
  const int t = tensor_of_block(m, static_cast<int32_t>(blockIdx.x));
  const int64_t begin = static_cast<int64_t>(static_cast<int32_t>(blockIdx.x) - m.first_block[t]) * kChunk;
  const int64_t end = begin + kChunk < m.numel[t] ? begin + kChunk : m.numel[t];
  return {t, begin, end};
}

// ASAM's t of element i (SAM: 1): |w| + eta element-wise, ||f_i|| + eta filter-wise (|w| + eta for ndim <= 1).
template <typename A>
__device__ __forceinline__ A scale_t(int mode, A w, A eta, int64_t fsize, const A* fnorms, int64_t i) {
  if (mode == sam::kSam) return A(1);
  const A filter_value = (mode == sam::kFilter && fsize) ? fnorms[row_of(i, fsize)] : abs_of(w);
  return sam::asam_scale<A>(w, eta, filter_value, mode);
}

// R-SAM's sigma of element i: gamma ||w_row|| / sqrt(n_row) (ndim >= 2) or gamma |w_i| (ndim <= 1).
template <typename A>
__device__ __forceinline__ A noise_std(A w, A gamma, A gamma_over_sqrt_n, int64_t fsize, const A* fnorms, int64_t i) {
  return fsize ? sam::filter_noise_std(gamma_over_sqrt_n, fnorms[row_of(i, fsize)]) : sam::element_noise_std(gamma, w);
}

// R-SAM's delta0 for the elements of tensor t of a launch: sigma_i and the Philox stream at the
// tensor's offset (one Philox call per block of four consecutive elements).
template <typename A>
struct TensorNoise {
  A gamma, gamma_over_sqrt_n;
  int64_t fsize, offset;
  const A* fnorms;
  sam::NormalStream z;

  template <int NPTR>
  __device__ TensorNoise(const TensorList<NPTR>& m, int t, const sam::NormalStream& base, const A* norms)
      : gamma(static_cast<A>(m.param[0][t])),
        gamma_over_sqrt_n(static_cast<A>(m.param[1][t])),
        fsize(m.fsize[t]),
        offset(m.elem_off[t]),
        fnorms(norms + m.fnorm_off[t]),
        z(base) {
    z.j = m.index[t];
  }

  // delta0 of element i, whose weight before the noise is w.
  __device__ __forceinline__ A operator()(A w, int64_t i) {
    return sam::noise_delta(noise_std<A>(w, gamma, gamma_over_sqrt_n, fsize, fnorms, i), z(offset + i));
  }
};

// ------------------------------------------------------------------ kernels
// ||f_i|| of every filter: a warp per filter (rows_per_block filters per block) or a block per long filter.
// Squares are summed in double, so a norm is right over the whole range of the dtype (w^2 under- or
// overflows float32 for |w| < 1e-19 or > 1.8e19) as on every backend (docs/DESIGN.md §4).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    filter_norms_kernel(const __grid_constant__ TensorList<1> m, at::opmath_type<scalar_t>* norms) {
  using A = at::opmath_type<scalar_t>;
  const int t = tensor_of_block(m, static_cast<int32_t>(blockIdx.x));
  const int64_t unit = static_cast<int32_t>(blockIdx.x) - m.first_block[t];
  const auto* w = static_cast<const scalar_t*>(m.ptr[0][t]);
  const int64_t fsize = m.fsize[t], rows = m.numel[t] / fsize;
  A* out = norms + m.fnorm_off[t];
  if (m.rows_per_block[t] == 1) {
    const scalar_t* row = w + unit * fsize;
    double sum[1] = {0.0};
    for (int64_t k = threadIdx.x; k < fsize; k += blockDim.x) {
      const double x = static_cast<double>(static_cast<A>(row[k]));
      sum[0] += x * x;
    }
    __shared__ double shared[32];
    block_sum<1>(sum, shared);
    if (threadIdx.x == 0) out[unit] = static_cast<A>(sqrt(sum[0]));
    return;
  }
  const int64_t r = unit * m.rows_per_block[t] + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warps leave together: the shuffles below stay converged
  const scalar_t* row = w + r * fsize;
  double sum = 0.0;
  for (int64_t k = threadIdx.x & 31; k < fsize; k += 32) {
    const double x = static_cast<double>(static_cast<A>(row[k]));
    sum += x * x;
  }
  sum = warp_sum(sum);
  if ((threadIdx.x & 31) == 0) out[r] = static_cast<A>(sqrt(sum));
}

// Partial sums of (t * g)^2, one per block. Pointers: w, g. param[0]: eta.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scaled_grad_sq_kernel(const __grid_constant__ TensorList<2> m, int mode, const at::opmath_type<scalar_t>* norms,
                          at::opmath_type<scalar_t>* partials) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  const auto* w = static_cast<const scalar_t*>(m.ptr[0][b.t]);
  const auto* g = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  const A eta = static_cast<A>(m.param[0][b.t]);
  const int64_t fsize = m.fsize[b.t];
  const A* fnorms = norms + m.fnorm_off[b.t];
  const bool vec = m.vec_ok[b.t];
  A sum[1] = {A(0)};
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    A wv[VEC], gv[VEC];
    if (mode != sam::kSam) load<VEC>(w, i, n, vec, wv);
    load<VEC>(g, i, n, vec, gv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < n) {
        const A tg = scale_t<A>(mode, mode != sam::kSam ? wv[k] : A(0), eta, fsize, fnorms, i + k) * gv[k];
        sum[0] += tg * tg;
      }
    }
  });
  __shared__ A shared[32];
  block_sum<1>(sum, shared);
  if (threadIdx.x == 0) partials[m.partial0 + blockIdx.x] = sum[0];
}

// saved <- w; w <- w + eps, eps = s t^2 g (p = 2) or s t sign(g) (p = inf); non-finite eps -> 0.
// Pointers: w, g, saved. param[0]: eta. scalar[0]: s.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const __grid_constant__ TensorList<3> m, int mode, bool p_inf, const at::opmath_type<scalar_t>* norms) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  auto* w = static_cast<scalar_t*>(m.ptr[0][b.t]);
  const auto* g = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  auto* saved = static_cast<scalar_t*>(m.ptr[2][b.t]);
  const A eta = static_cast<A>(m.param[0][b.t]);
  const A s = *static_cast<const A*>(m.scalar[0][b.t]);
  const int64_t fsize = m.fsize[b.t];
  const A* fnorms = norms + m.fnorm_off[b.t];
  const bool vec = m.vec_ok[b.t];
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    scalar_t raw[VEC];
    A gv[VEC], out[VEC];
    load<VEC>(w, i, n, vec, raw);
    load<VEC>(g, i, n, vec, gv);
    store<VEC>(saved, i, n, vec, raw);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A wk = static_cast<A>(raw[k]);
      const A t = k < n ? scale_t<A>(mode, wk, eta, fsize, fnorms, i + k) : A(0);
      out[k] = wk + sam::finite_or_zero(sam::sam_perturbation<A>(s, t, gv[k], p_inf));
    }
    store<VEC>(w, i, n, vec, out);
  });
}

// w <- saved, bit-exactly. Pointers: w, saved.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) restore_kernel(const __grid_constant__ TensorList<2> m) {
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  auto* w = static_cast<scalar_t*>(m.ptr[0][b.t]);
  const auto* saved = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    scalar_t raw[VEC];
    load<VEC>(saved, i, n, vec, raw);
    store<VEC>(w, i, n, vec, raw);
  });
}

// saved <- w; w <- w + sigma z. Pointers: w, saved. param: gamma, gamma / sqrt(n_row).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    add_noise_kernel(const __grid_constant__ TensorList<2> m, sam::NormalStream base, const at::opmath_type<scalar_t>* norms) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  auto* w = static_cast<scalar_t*>(m.ptr[0][b.t]);
  auto* saved = static_cast<scalar_t*>(m.ptr[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  TensorNoise<A> delta(m, b.t, base, norms);
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    scalar_t raw[VEC];
    A out[VEC];
    load<VEC>(w, i, n, vec, raw);
    store<VEC>(saved, i, n, vec, raw);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A wk = static_cast<A>(raw[k]);
      out[k] = k < n ? wk + delta(wk, i + k) : wk;
    }
    store<VEC>(w, i, n, vec, out);
  });
}

// Partial (sum delta^2, sum g^2, lambda sum delta g, lambda^2 sum g^2) per block, delta regenerated
// from the saved weights. Pointers: g, saved. param: gamma, gamma / sqrt(n_row), lambda.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    noise_grad_sums_kernel(const __grid_constant__ TensorList<2> m, sam::NormalStream base,
                           const at::opmath_type<scalar_t>* norms, at::opmath_type<scalar_t>* partials) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  const auto* g = static_cast<const scalar_t*>(m.ptr[0][b.t]);
  const auto* saved = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  TensorNoise<A> delta(m, b.t, base, norms);
  A sum[3] = {A(0), A(0), A(0)};
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    A sv[VEC], gv[VEC];
    load<VEC>(saved, i, n, vec, sv);
    load<VEC>(g, i, n, vec, gv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < n) {
        const A d = delta(sv[k], i + k);
        sum[0] += d * d;
        sum[1] += gv[k] * gv[k];
        sum[2] += d * gv[k];
      }
    }
  });
  __shared__ A shared[3 * 32];
  block_sum<3>(sum, shared);
  if (threadIdx.x == 0) {
    A weighted[4];
    sam::rsam_weighted_sums(sum, static_cast<A>(m.param[2][b.t]), weighted);
    A* out = partials + 4 * (m.partial0 + blockIdx.x);
    for (int k = 0; k < 4; ++k) out[k] = weighted[k];
  }
}

// w <- saved + a delta + b g (non-finite a delta + b g -> 0). Pointers: w, g, saved. scalar: a, b.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mix_perturb_kernel(const __grid_constant__ TensorList<3> m, sam::NormalStream base, const at::opmath_type<scalar_t>* norms) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  auto* w = static_cast<scalar_t*>(m.ptr[0][b.t]);
  const auto* g = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  const auto* saved = static_cast<const scalar_t*>(m.ptr[2][b.t]);
  const A a = *static_cast<const A*>(m.scalar[0][b.t]), c = *static_cast<const A*>(m.scalar[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  TensorNoise<A> delta(m, b.t, base, norms);
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    A sv[VEC], gv[VEC], out[VEC];
    load<VEC>(saved, i, n, vec, sv);
    load<VEC>(g, i, n, vec, gv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A d = k < n ? delta(sv[k], i + k) : A(0);
      out[k] = sv[k] + sam::finite_or_zero(sam::rsam_perturbation(a, d, c, gv[k]));
    }
    store<VEC>(w, i, n, vec, out);
  });
}

// ------------------------------------------------- the fused second step (docs/DESIGN.md §2.11)
// restore_sgd_ / restore_adam_: w <- saved, then torch.optim.SGD's / Adam(W)'s update, in one pass. The
// per-tensor payload carries the coefficients (sam_math.h's SgdCoefs/AdamCoefs, formed on the host in the
// accumulation dtype), which optional state the tensor has, and its skip flag: a device bool read here,
// by every block of the tensor, so no step waits on the host and a captured graph replays the read.
// Where it is set: w <- saved, the state untouched. A state that is off (no momentum, no amsgrad) has a
// null pointer and is never read (the list the caller passed there is a placeholder).
template <typename A>
struct SgdTensor {
  sam::SgdCoefs<A> c;
  const bool* skip;
  bool momentum;  // pointer 3, the momentum buffer, is read (unless fresh) and written
};

template <typename A>
struct AdamTensor {
  sam::AdamCoefs<A> c;
  const bool* skip;
  int decay;     // sam::AdamDecay: none, L2 on the gradient (Adam) or decoupled (AdamW)
  bool amsgrad;  // pointer 5, max_exp_avg_sq, is read and written
};

template <typename A>
using SgdList = PayloadList<4, SgdTensor<A>>;  // pointers: w, saved, g, momentum buffer
template <typename A>
using AdamList = PayloadList<6, AdamTensor<A>>;  // pointers: w, saved, g, exp_avg, exp_avg_sq, max_exp_avg_sq

// A skipped step still ends the SAM step: w <- saved, bit-exactly (nothing to do where they alias).
template <int VEC, typename scalar_t>
__device__ __forceinline__ void restore_range(scalar_t* w, const scalar_t* saved, int64_t begin, int64_t end,
                                              bool vec) {
  if (w == saved) return;
  for_each_group<VEC>(begin, end, [&](int64_t i, int n) {
    scalar_t raw[VEC];
    load<VEC>(saved, i, n, vec, raw);
    store<VEC>(w, i, n, vec, raw);
  });
}

template <bool kMomentum, int VEC, typename scalar_t, typename A>
__device__ __forceinline__ void sgd_range(scalar_t* w, const scalar_t* saved, const scalar_t* g, scalar_t* mom,
                                          int64_t begin, int64_t end, bool vec, const sam::SgdCoefs<A>& c) {
  const bool read_m = kMomentum && !c.fresh;  // a fresh buffer is written (m <- d), never read
  for_each_group<VEC>(begin, end, [&](int64_t i, int n) {
    A sv[VEC], gv[VEC], out[VEC];
    scalar_t mv[VEC] = {};
    load<VEC>(saved, i, n, vec, sv);
    load<VEC>(g, i, n, vec, gv);
    if (read_m) load<VEC>(mom, i, n, vec, mv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = sam::sgd_update<kMomentum, A, scalar_t>(sv[k], gv[k], mv[k], c);
    store<VEC>(w, i, n, vec, out);
    if (kMomentum) store<VEC>(mom, i, n, vec, mv);
  });
}

template <int kDecay, bool kAmsgrad, int VEC, typename scalar_t, typename A>
__device__ __forceinline__ void adam_range(scalar_t* w, const scalar_t* saved, const scalar_t* g, scalar_t* exp_avg,
                                           scalar_t* exp_avg_sq, scalar_t* max_exp_avg_sq, int64_t begin,
                                           int64_t end, bool vec, const sam::AdamCoefs<A>& c) {
  for_each_group<VEC>(begin, end, [&](int64_t i, int n) {
    A sv[VEC], gv[VEC], out[VEC];
    scalar_t mv[VEC], vv[VEC], xv[VEC] = {};
    load<VEC>(saved, i, n, vec, sv);
    load<VEC>(g, i, n, vec, gv);
    load<VEC>(exp_avg, i, n, vec, mv);
    load<VEC>(exp_avg_sq, i, n, vec, vv);
    if (kAmsgrad) load<VEC>(max_exp_avg_sq, i, n, vec, xv);
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      out[k] = sam::adam_update<kDecay, kAmsgrad, A, scalar_t>(sv[k], gv[k], mv[k], vv[k], kAmsgrad ? &xv[k] : nullptr,
                                                              c);
    store<VEC>(w, i, n, vec, out);
    store<VEC>(exp_avg, i, n, vec, mv);
    store<VEC>(exp_avg_sq, i, n, vec, vv);
    if (kAmsgrad) store<VEC>(max_exp_avg_sq, i, n, vec, xv);
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    restore_sgd_kernel(const __grid_constant__ SgdList<at::opmath_type<scalar_t>> m) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  const SgdTensor<A>& p = m.payload[b.t];
  auto* w = static_cast<scalar_t*>(m.ptr[0][b.t]);
  const auto* saved = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  if (*p.skip) {  // one flag per tensor: the whole block takes the same branch
    restore_range<VEC>(w, saved, b.begin, b.end, vec);
    return;
  }
  const auto* g = static_cast<const scalar_t*>(m.ptr[2][b.t]);
  auto* mom = static_cast<scalar_t*>(m.ptr[3][b.t]);
  const sam::SgdCoefs<A> c = p.c;
  if (p.momentum)
    sgd_range<true, VEC>(w, saved, g, mom, b.begin, b.end, vec, c);
  else
    sgd_range<false, VEC>(w, saved, g, mom, b.begin, b.end, vec, c);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    restore_adam_kernel(const __grid_constant__ AdamList<at::opmath_type<scalar_t>> m) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  const AdamTensor<A>& p = m.payload[b.t];
  auto* w = static_cast<scalar_t*>(m.ptr[0][b.t]);
  const auto* saved = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  if (*p.skip) {
    restore_range<VEC>(w, saved, b.begin, b.end, vec);
    return;
  }
  const auto* g = static_cast<const scalar_t*>(m.ptr[2][b.t]);
  auto* exp_avg = static_cast<scalar_t*>(m.ptr[3][b.t]);
  auto* exp_avg_sq = static_cast<scalar_t*>(m.ptr[4][b.t]);
  auto* max_exp_avg_sq = static_cast<scalar_t*>(m.ptr[5][b.t]);
  const sam::AdamCoefs<A> c = p.c;
  // The tensor's options as template arguments (the same for the whole block: no divergence).
#define SAM_ADAM_RANGE(DECAY, AMSGRAD) \
  adam_range<DECAY, AMSGRAD, VEC>(w, saved, g, exp_avg, exp_avg_sq, max_exp_avg_sq, b.begin, b.end, vec, c)
  if (p.amsgrad) {
    if (p.decay == sam::kNoDecay) SAM_ADAM_RANGE(sam::kNoDecay, true);
    else if (p.decay == sam::kCoupledDecay) SAM_ADAM_RANGE(sam::kCoupledDecay, true);
    else SAM_ADAM_RANGE(sam::kDecoupledDecay, true);
  } else {
    if (p.decay == sam::kNoDecay) SAM_ADAM_RANGE(sam::kNoDecay, false);
    else if (p.decay == sam::kCoupledDecay) SAM_ADAM_RANGE(sam::kCoupledDecay, false);
    else SAM_ADAM_RANGE(sam::kDecoupledDecay, false);
  }
#undef SAM_ADAM_RANGE
}

// ------------------------------------------- the SAM family (docs/DESIGN.md §2.5–§2.8) and MSAM (§2.10)
// Per-tensor device scalars (combine_'s coefficients, residual_perturb_'s scale, msam_sgd_'s shift) are
// read in their own dtype by the kernel, once per block, and rounded to the accumulation dtype there
// (as reference.py's `.to(acc)`): no conversion launch, no host read, and a captured graph replays the
// scalar's current value. Skip flags are device bools, as in the fused second step.
enum ValueKind : int32_t { kValueDouble = 0, kValueFloat = 1, kValueHalf = 2, kValueBFloat16 = 3, kValueBool = 4 };

struct DeviceValue {
  const void* ptr;
  int32_t kind;  // ValueKind
};

template <typename A>
__device__ __forceinline__ A read_value(const DeviceValue& v) {
  switch (v.kind) {
    case kValueDouble: return static_cast<A>(*static_cast<const double*>(v.ptr));
    case kValueFloat: return static_cast<A>(*static_cast<const float*>(v.ptr));
    case kValueHalf: return static_cast<A>(static_cast<float>(*static_cast<const c10::Half*>(v.ptr)));
    case kValueBFloat16: return static_cast<A>(static_cast<float>(*static_cast<const c10::BFloat16*>(v.ptr)));
    default: return *static_cast<const bool*>(v.ptr) ? A(1) : A(0);
  }
}

struct NoPayload {};

struct CombineTensor {
  DeviceValue a, b;  // x <- a x + b y
};

struct SplitTensor {
  const bool* skip;
};

template <typename A>
struct ResidualSumTensor {
  A sigma;
};

template <typename A>
struct ResidualTensor {
  DeviceValue scale;
  A sigma, lmbda, rest;  // rest = 1 - lambda, formed in double on the host
};

template <typename A>
struct MsamTensor {
  sam::SgdCoefs<A> c;  // momentum > 0; c.fresh: the buffer holds nothing yet (not read, w0 = w)
  DeviceValue shift;
  const bool* skip;
};

// Writes block blockIdx.x's W partial sums (valid in thread 0) to its slot.
template <int W, typename A, typename List>
__device__ __forceinline__ void write_partials(const List& m, A (&sum)[W], A* partials) {
  __shared__ A shared[W * 32];
  block_sum<W>(sum, shared);
  if (threadIdx.x == 0) {
    A* out = partials + W * (m.partial0 + static_cast<int64_t>(blockIdx.x));
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = sum[k];
  }
}

// Partial (sum x y, sum x^2, sum y^2) per block. Pointers: x, y.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pair_sums_kernel(const __grid_constant__ PayloadList<2, NoPayload> m, at::opmath_type<scalar_t>* partials) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  const auto* x = static_cast<const scalar_t*>(m.ptr[0][b.t]);
  const auto* y = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  A sum[3] = {A(0), A(0), A(0)};
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    A xv[VEC], yv[VEC];
    load<VEC>(x, i, n, vec, xv);
    load<VEC>(y, i, n, vec, yv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < n) {
        sum[0] += xv[k] * yv[k];
        sum[1] += xv[k] * xv[k];
        sum[2] += yv[k] * yv[k];
      }
    }
  });
  write_partials<3>(m, sum, partials);
}

// x <- a x + b y, a zero coefficient's term exactly 0 (its tensor is then not even read).
// Pointers: x, y.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) combine_kernel(const __grid_constant__ PayloadList<2, CombineTensor> m) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  auto* x = static_cast<scalar_t*>(m.ptr[0][b.t]);
  const auto* y = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  const A a = read_value<A>(m.payload[b.t].a), c = read_value<A>(m.payload[b.t].b);
  const bool use_x = a != A(0), use_y = c != A(0);  // one tensor's coefficients: block-uniform
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    A xv[VEC] = {}, yv[VEC] = {}, out[VEC];
    if (use_x) load<VEC>(x, i, n, vec, xv);
    if (use_y) load<VEC>(y, i, n, vec, yv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = (use_x ? a * xv[k] : A(0)) + (use_y ? c * yv[k] : A(0));
    store<VEC>(x, i, n, vec, out);
  });
}

// firsts <- grads - firsts, grads <- old firsts (bits); skip set: firsts <- 0, grads kept.
// Pointers: grads, firsts.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    split_difference_kernel(const __grid_constant__ PayloadList<2, SplitTensor> m) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  auto* grads = static_cast<scalar_t*>(m.ptr[0][b.t]);
  auto* firsts = static_cast<scalar_t*>(m.ptr[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  if (*m.payload[b.t].skip) {  // a non-finite first pass: .grad keeps g_sam, no sharpness term
    for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
      const A zeros[VEC] = {};
      store<VEC>(firsts, i, n, vec, zeros);
    });
    return;
  }
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    scalar_t gv[VEC], fv[VEC];
    A out[VEC];
    load<VEC>(grads, i, n, vec, gv);
    load<VEC>(firsts, i, n, vec, fv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = static_cast<A>(gv[k]) - static_cast<A>(fv[k]);
    store<VEC>(firsts, i, n, vec, out);
    store<VEC>(grads, i, n, vec, fv);
  });
}

// Partial sum (g - sigma m)^2 per block. Pointers: g, m.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    residual_sq_kernel(const __grid_constant__ PayloadList<2, ResidualSumTensor<at::opmath_type<scalar_t>>> m,
                       at::opmath_type<scalar_t>* partials) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  const auto* g = static_cast<const scalar_t*>(m.ptr[0][b.t]);
  const auto* mom = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  const bool vec = m.vec_ok[b.t];
  const A sigma = m.payload[b.t].sigma;
  A sum[1] = {A(0)};
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    A gv[VEC], mv[VEC];
    load<VEC>(g, i, n, vec, gv);
    load<VEC>(mom, i, n, vec, mv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < n) {
        const A d = gv[k] - sigma * mv[k];
        sum[0] += d * d;
      }
    }
  });
  write_partials<1>(m, sum, partials);
}

// saved <- w; w <- w + finite_or_zero(s (g - sigma m)); m <- lambda m + (1 - lambda) g where finite, else
// kept. Pointers: w, g, m, saved.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    residual_perturb_kernel(const __grid_constant__ PayloadList<4, ResidualTensor<at::opmath_type<scalar_t>>> m) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  auto* w = static_cast<scalar_t*>(m.ptr[0][b.t]);
  const auto* g = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  auto* mom = static_cast<scalar_t*>(m.ptr[2][b.t]);
  auto* saved = static_cast<scalar_t*>(m.ptr[3][b.t]);
  const bool vec = m.vec_ok[b.t];
  const ResidualTensor<A>& p = m.payload[b.t];
  const A s = read_value<A>(p.scale), sigma = p.sigma, lmbda = p.lmbda, rest = p.rest;
  for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
    scalar_t wraw[VEC], mraw[VEC];
    A gv[VEC], out[VEC];
    load<VEC>(w, i, n, vec, wraw);
    load<VEC>(g, i, n, vec, gv);
    load<VEC>(mom, i, n, vec, mraw);
    store<VEC>(saved, i, n, vec, wraw);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A mk = static_cast<A>(mraw[k]);
      out[k] = static_cast<A>(wraw[k]) + sam::finite_or_zero(s * (gv[k] - sigma * mk));
      const A new_m = lmbda * mk + rest * gv[k];
      if (new_m - new_m == A(0)) mraw[k] = static_cast<scalar_t>(new_m);  // a non-finite m keeps its old
    }
    store<VEC>(w, i, n, vec, out);
    store<VEC>(mom, i, n, vec, mraw);
  });
}

// Momentum-SAM's SGD step over [begin, end): w0 = w + a m_old (kFresh: w0 = w, m not read), then
// sgd_update<true> from w0; adds the new m^2 (m rounded to its dtype) to `sum`.
template <bool kFresh, int VEC, typename scalar_t, typename A>
__device__ __forceinline__ void msam_range(scalar_t* w, const scalar_t* g, scalar_t* mom, int64_t begin,
                                           int64_t end, bool vec, A a, const sam::SgdCoefs<A>& c, A& sum) {
  for_each_group<VEC>(begin, end, [&](int64_t i, int n) {
    A wv[VEC], gv[VEC], out[VEC];
    scalar_t mv[VEC] = {};
    load<VEC>(w, i, n, vec, wv);
    load<VEC>(g, i, n, vec, gv);
    if (!kFresh) load<VEC>(mom, i, n, vec, mv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A w0 = kFresh ? wv[k] : wv[k] + a * static_cast<A>(mv[k]);
      out[k] = sam::sgd_update<true, A, scalar_t>(w0, gv[k], mv[k], c);
      const A mk = static_cast<A>(mv[k]);
      if (k < n) sum += mk * mk;
    }
    store<VEC>(w, i, n, vec, out);
    store<VEC>(mom, i, n, vec, mv);
  });
}

// Momentum-SAM with SGD, one pass: the undo w0 = w + a m, SGD's update from w0, and a partial sum of the
// new m^2 per block. Skip set: w <- w0 (nothing to write when fresh), m kept (its m^2 still counted).
// Pointers: w, g, m.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    msam_sgd_kernel(const __grid_constant__ PayloadList<3, MsamTensor<at::opmath_type<scalar_t>>> m,
                    at::opmath_type<scalar_t>* partials) {
  using A = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  const BlockWork b = block_work(m);
  auto* w = static_cast<scalar_t*>(m.ptr[0][b.t]);
  const auto* g = static_cast<const scalar_t*>(m.ptr[1][b.t]);
  auto* mom = static_cast<scalar_t*>(m.ptr[2][b.t]);
  const bool vec = m.vec_ok[b.t];
  const MsamTensor<A>& p = m.payload[b.t];
  const A a = read_value<A>(p.shift);
  A sum[1] = {A(0)};
  if (*p.skip) {  // one flag per tensor: the whole block takes the same branch
    const bool undo = !p.c.fresh;
    for_each_group<VEC>(b.begin, b.end, [&](int64_t i, int n) {
      A mv[VEC], wv[VEC];
      load<VEC>(mom, i, n, vec, mv);
      if (undo) {
        load<VEC>(w, i, n, vec, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) wv[k] = wv[k] + a * mv[k];
        store<VEC>(w, i, n, vec, wv);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        if (k < n) sum[0] += mv[k] * mv[k];
    });
  } else {
    const sam::SgdCoefs<A> c = p.c;
    if (c.fresh)
      msam_range<true, VEC>(w, g, mom, b.begin, b.end, vec, a, c, sum[0]);
    else
      msam_range<false, VEC>(w, g, mom, b.begin, b.end, vec, a, c, sum[0]);
  }
  write_partials<1>(m, sum, partials);
}

// out[k] = sum over slots of partials[slot * W + k], in a fixed order (one block).
template <typename A, int W>
__global__ void __launch_bounds__(kSumThreads) sum_partials_kernel(const A* partials, int64_t count, A* out) {
  A sum[W];
#pragma unroll
  for (int k = 0; k < W; ++k) sum[k] = A(0);
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x)
#pragma unroll
    for (int k = 0; k < W; ++k) sum[k] += partials[i * W + k];
  __shared__ A shared[W * 32];
  block_sum<W>(sum, shared);
  if (threadIdx.x == 0)
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = sum[k];
}

__global__ void standard_normal_kernel(float* out, int64_t numel, int64_t offset, sam::NormalStream base) {
  sam::NormalStream z = base;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * 4;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4; i < numel; i += stride)
    for (int k = 0; k < 4 && i + k < numel; ++k) out[i + k] = z(offset + i + k);
}

// --------------------------------------------------------------- host side
at::ScalarType acc_type(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Every tensor: defined, contiguous, on `like`'s CUDA device, of `like`'s dtype; `count` of them.
void check_list(const std::vector<at::Tensor>& tensors, const at::Tensor& like, const char* what, size_t count) {
  TORCH_CHECK(tensors.size() == count, "sam_kernels cuda: ", count, " ", what, " expected, got ", tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.defined() && t.is_cuda() && t.device() == like.device(), "sam_kernels cuda: every ", what,
                " must be a CUDA tensor on ", like.device());
    TORCH_CHECK(t.is_contiguous(), "sam_kernels cuda: every ", what, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "sam_kernels cuda: every ", what, " must be ",
                like.scalar_type(), " (got ", t.scalar_type(), ")");
  }
}

int64_t filter_size(const at::Tensor& t) { return t.dim() >= 2 && t.size(0) ? t.numel() / t.size(0) : 0; }

// The norms of every filter of the ndim >= 2 tensors in one pass; offsets[j] is tensor j's first slot.
struct FilterNorms {
  at::Tensor buffer;
  std::vector<int64_t> offsets;
};

FilterNorms compute_filter_norms(const std::vector<at::Tensor>& tensors) {
  FilterNorms result;
  std::vector<TensorEntry> entries;
  int64_t total = 0;
  for (const auto& t : tensors) {
    result.offsets.push_back(total);
    const int64_t fsize = filter_size(t);
    if (!fsize || !t.numel()) continue;
    TensorEntry e;
    e.ptr[0] = t.data_ptr();
    e.numel = t.numel();
    e.fsize = fsize;
    e.fnorm_off = total;
    e.rows_per_block = fsize > kWholeBlockRow ? 1 : kWarps;
    e.units = ceil_div(t.size(0), e.rows_per_block);
    entries.push_back(e);
    total += t.size(0);
  }
  const at::Tensor& like = tensors.front();
  result.buffer = at::empty({total > 0 ? total : 1}, like.options().dtype(acc_type(like.scalar_type())));
  if (entries.empty()) return result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "sam_filter_norms", [&] {
    using A = at::opmath_type<scalar_t>;
    A* out = result.buffer.data_ptr<A>();
    launch_lists<1>(entries, [&](const TensorList<1>& meta, int64_t blocks) {
      filter_norms_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return result;
}

// One entry per non-empty tensor: chunks of kChunk elements.
using Pointers = std::vector<const at::Tensor*>;  // the tensors whose data a pass reads or writes, in kernel order

TensorEntry chunk_entry(const at::Tensor& t, const Pointers& pointers) {
  TORCH_CHECK(pointers.size() <= static_cast<size_t>(kMaxPointers), "sam_kernels cuda: too many tensors per element");
  TensorEntry e;
  int k = 0;
  for (const at::Tensor* p : pointers) e.ptr[k++] = p->data_ptr();
  e.numel = t.numel();
  e.fsize = filter_size(t);
  e.units = ceil_div(t.numel(), kChunk);
  return e;
}

// Per-tensor device scalars in the accumulation dtype; tensors sharing a scalar share one conversion.
class DeviceScalars {
 public:
  DeviceScalars(const at::Tensor& like, at::ScalarType acc) : device_(like.device()), acc_(acc) {}
  const void* operator()(const at::Tensor& s, const char* what) {
    TORCH_CHECK(s.defined() && s.numel() == 1 && s.device() == device_, "sam_kernels cuda: every ", what,
                " must be a one-element tensor on ", device_);
    auto it = converted_.find(s.unsafeGetTensorImpl());
    if (it == converted_.end())
      it = converted_.emplace(s.unsafeGetTensorImpl(), s.to(acc_).contiguous()).first;
    return it->second.data_ptr();
  }

 private:
  at::Device device_;
  at::ScalarType acc_;
  std::unordered_map<const c10::TensorImpl*, at::Tensor> converted_;
};

sam::NormalStream noise_stream(uint64_t seed, int64_t step) {
  return sam::NormalStream{0u, static_cast<uint32_t>(step & 0xFFFFFFFF), static_cast<uint32_t>(seed & 0xFFFFFFFFu),
                           static_cast<uint32_t>(seed >> 32)};
}

// Partial sums of W values per block -> their fixed-order total, in the accumulation dtype.
template <typename A, int W>
at::Tensor total_of(const at::Tensor& partials, int64_t count) {
  if (!count) return at::zeros({W}, partials.options());
  at::Tensor out = at::empty({W}, partials.options());
  sum_partials_kernel<A, W><<<1, kSumThreads, 0, stream()>>>(partials.data_ptr<A>(), count, out.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

int64_t total_units(const std::vector<TensorEntry>& entries) {
  int64_t units = 0;
  for (const auto& e : entries) units += e.units;
  return units;
}

}  // namespace

std::vector<at::Tensor> filter_norms(const std::vector<at::Tensor>& tensors) {
  if (tensors.empty()) return {};
  const c10::cuda::CUDAGuard guard(tensors.front().device());
  check_list(tensors, tensors.front(), "tensor", tensors.size());
  const FilterNorms norms = compute_filter_norms(tensors);
  std::vector<at::Tensor> out;
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    if (t.dim() >= 2)
      out.push_back(filter_size(t) ? norms.buffer.narrow(0, norms.offsets[j], t.size(0))
                                   : at::zeros({t.size(0)}, norms.buffer.options()));
    else
      out.push_back(t.abs().to(acc_type(t.scalar_type())));
  }
  return out;
}

at::Tensor scaled_grad_sq_sum(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<double>& etas, int64_t mode) {
  TORCH_CHECK(!params.empty(), "sam_kernels cuda: empty tensor list");
  const c10::cuda::CUDAGuard guard(params.front().device());
  check_list(params, params.front(), "weight", params.size());
  check_list(grads, params.front(), "gradient", params.size());
  TORCH_CHECK(etas.size() == params.size(), "sam_kernels cuda: one eta per tensor expected");
  const FilterNorms norms = mode == sam::kFilter ? compute_filter_norms(params) : FilterNorms{};
  std::vector<TensorEntry> entries;
  for (size_t j = 0; j < params.size(); ++j) {
    if (!params[j].numel()) continue;
    TensorEntry e = chunk_entry(params[j], {&params[j], &grads[j]});
    e.param[0] = etas[j];
    if (norms.buffer.defined()) e.fnorm_off = norms.offsets[j];
    entries.push_back(e);
  }
  const int64_t units = total_units(entries);
  const at::ScalarType acc = acc_type(params.front().scalar_type());
  at::Tensor partials = at::empty({units > 0 ? units : 1}, params.front().options().dtype(acc));
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.front().scalar_type(), "sam_scaled_grad_sq", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* fnorms = norms.buffer.defined() ? norms.buffer.data_ptr<A>() : nullptr;
    A* out = partials.data_ptr<A>();
    launch_lists<2>(entries, [&](const TensorList<2>& meta, int64_t blocks) {
      scaled_grad_sq_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(
          meta, static_cast<int>(mode), fnorms, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    total = total_of<A, 1>(partials, units);
  });
  return total.squeeze(0);
}

void perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& scales,
              const std::vector<double>& etas, int64_t mode, bool p_inf) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params.front().device());
  check_list(params, params.front(), "weight", params.size());
  check_list(grads, params.front(), "gradient", params.size());
  check_list(saved, params.front(), "saved copy", params.size());
  TORCH_CHECK(scales.size() == params.size() && etas.size() == params.size(),
              "sam_kernels cuda: one scale and one eta per tensor expected");
  const FilterNorms norms = mode == sam::kFilter ? compute_filter_norms(params) : FilterNorms{};
  const at::ScalarType acc = acc_type(params.front().scalar_type());
  DeviceScalars scalars(params.front(), acc);
  std::vector<TensorEntry> entries;
  for (size_t j = 0; j < params.size(); ++j) {
    if (!params[j].numel()) continue;
    TensorEntry e = chunk_entry(params[j], {&params[j], &grads[j], &saved[j]});
    e.param[0] = etas[j];
    e.scalar[0] = scalars(scales[j], "scale");
    if (norms.buffer.defined()) e.fnorm_off = norms.offsets[j];
    entries.push_back(e);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.front().scalar_type(), "sam_perturb", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* fnorms = norms.buffer.defined() ? norms.buffer.data_ptr<A>() : nullptr;
    launch_lists<3>(entries, [&](const TensorList<3>& meta, int64_t blocks) {
      perturb_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(
          meta, static_cast<int>(mode), p_inf, fnorms);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void restore_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params.front().device());
  check_list(params, params.front(), "weight", params.size());
  check_list(saved, params.front(), "saved copy", params.size());
  std::vector<TensorEntry> entries;
  for (size_t j = 0; j < params.size(); ++j)
    if (params[j].numel()) entries.push_back(chunk_entry(params[j], {&params[j], &saved[j]}));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.front().scalar_type(), "sam_restore", [&] {
    launch_lists<2>(entries, [&](const TensorList<2>& meta, int64_t blocks) {
      restore_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

namespace {

// Entries of an R-SAM pass: sigma factors, noise stream index and offset, filter norms of `norm_source`.
std::vector<TensorEntry> noise_entries(const std::vector<at::Tensor>& shape_source,
                                       const std::vector<Pointers>& pointers,
                                       const FilterNorms& norms, const std::vector<double>& gammas,
                                       const std::vector<int64_t>& tensor_indices,
                                       const std::vector<int64_t>& element_offsets) {
  const size_t count = shape_source.size();
  TORCH_CHECK(gammas.size() == count && tensor_indices.size() == count && element_offsets.size() == count,
              "sam_kernels cuda: one gamma, tensor index and element offset per tensor expected");
  std::vector<TensorEntry> entries;
  for (size_t j = 0; j < count; ++j) {
    const at::Tensor& t = shape_source[j];
    if (!t.numel()) continue;
    TensorEntry e = chunk_entry(t, pointers[j]);
    e.param[0] = gammas[j];
    e.param[1] = e.fsize ? gammas[j] / std::sqrt(static_cast<double>(e.fsize)) : gammas[j];
    e.fnorm_off = norms.offsets[j];
    e.index = static_cast<uint32_t>(tensor_indices[j]);
    e.elem_off = element_offsets[j];
    entries.push_back(e);
  }
  return entries;
}

}  // namespace

void add_noise_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved,
                const std::vector<double>& gammas, uint64_t seed, const std::vector<int64_t>& tensor_indices,
                int64_t step, const std::vector<int64_t>& element_offsets) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params.front().device());
  check_list(params, params.front(), "weight", params.size());
  check_list(saved, params.front(), "saved copy", params.size());
  const FilterNorms norms = compute_filter_norms(params);  // of w before the noise
  std::vector<Pointers> pointers;
  for (size_t j = 0; j < params.size(); ++j) pointers.push_back({&params[j], &saved[j]});
  const auto entries = noise_entries(params, pointers, norms, gammas, tensor_indices, element_offsets);
  const sam::NormalStream base = noise_stream(seed, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.front().scalar_type(), "sam_add_noise", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* fnorms = norms.buffer.data_ptr<A>();
    launch_lists<2>(entries, [&](const TensorList<2>& meta, int64_t blocks) {
      add_noise_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta, base, fnorms);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor noise_grad_sums(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& saved,
                           const std::vector<double>& gammas, const std::vector<double>& lams, uint64_t seed,
                           const std::vector<int64_t>& tensor_indices, int64_t step,
                           const std::vector<int64_t>& element_offsets) {
  TORCH_CHECK(!saved.empty(), "sam_kernels cuda: empty tensor list");
  const c10::cuda::CUDAGuard guard(saved.front().device());
  check_list(saved, saved.front(), "saved copy", saved.size());
  check_list(grads, saved.front(), "gradient", saved.size());
  TORCH_CHECK(lams.size() == saved.size(), "sam_kernels cuda: one lambda per tensor expected");
  const FilterNorms norms = compute_filter_norms(saved);
  std::vector<Pointers> pointers;
  for (size_t j = 0; j < saved.size(); ++j) pointers.push_back({&grads[j], &saved[j]});
  auto entries = noise_entries(saved, pointers, norms, gammas, tensor_indices, element_offsets);
  for (size_t j = 0, e = 0; j < saved.size(); ++j)
    if (saved[j].numel()) entries[e++].param[2] = lams[j];
  const int64_t units = total_units(entries);
  const at::ScalarType acc = acc_type(saved.front().scalar_type());
  at::Tensor partials = at::empty({4 * (units > 0 ? units : 1)}, saved.front().options().dtype(acc));
  const sam::NormalStream base = noise_stream(seed, step);
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.front().scalar_type(), "sam_noise_grad_sums", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* fnorms = norms.buffer.data_ptr<A>();
    A* out = partials.data_ptr<A>();
    launch_lists<2>(entries, [&](const TensorList<2>& meta, int64_t blocks) {
      noise_grad_sums_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta, base, fnorms, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    total = total_of<A, 4>(partials, units);
  });
  return total;
}

void mix_perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& noise_coefs,
                  const std::vector<at::Tensor>& grad_coefs, const std::vector<double>& gammas, uint64_t seed,
                  const std::vector<int64_t>& tensor_indices, int64_t step,
                  const std::vector<int64_t>& element_offsets) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params.front().device());
  check_list(params, params.front(), "weight", params.size());
  check_list(grads, params.front(), "gradient", params.size());
  check_list(saved, params.front(), "saved copy", params.size());
  TORCH_CHECK(noise_coefs.size() == params.size() && grad_coefs.size() == params.size(),
              "sam_kernels cuda: one noise and one gradient coefficient per tensor expected");
  const FilterNorms norms = compute_filter_norms(saved);  // sigma uses the weights before the noise
  std::vector<Pointers> pointers;
  for (size_t j = 0; j < params.size(); ++j) pointers.push_back({&params[j], &grads[j], &saved[j]});
  auto entries = noise_entries(saved, pointers, norms, gammas, tensor_indices, element_offsets);
  DeviceScalars scalars(params.front(), acc_type(params.front().scalar_type()));
  for (size_t j = 0, e = 0; j < params.size(); ++j) {
    if (!params[j].numel()) continue;
    entries[e].scalar[0] = scalars(noise_coefs[j], "noise coefficient");
    entries[e].scalar[1] = scalars(grad_coefs[j], "gradient coefficient");
    ++e;
  }
  const sam::NormalStream base = noise_stream(seed, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.front().scalar_type(), "sam_mix_perturb", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* fnorms = norms.buffer.data_ptr<A>();
    launch_lists<3>(entries, [&](const TensorList<3>& meta, int64_t blocks) {
      mix_perturb_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta, base, fnorms);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

namespace {

// The fused second step's skip flags: one-element tensors of the weights' device, each given to the kernel
// as a device bool (never read here: no step waits on the device). Tensors sharing a flag share it; a flag
// of another dtype is converted on the device (non-zero: skip).
class SkipFlags {
 public:
  explicit SkipFlags(const at::Tensor& like) : device_(like.device()) {}
  const bool* operator()(const at::Tensor& s) {
    TORCH_CHECK(s.defined() && s.numel() == 1 && s.device() == device_,
                "sam_kernels cuda: every skip flag must be a one-element tensor on ", device_);
    auto it = flags_.find(s.unsafeGetTensorImpl());
    if (it == flags_.end())
      it = flags_.emplace(s.unsafeGetTensorImpl(), s.scalar_type() == at::kBool ? s : s.ne(0)).first;
    return it->second.data_ptr<bool>();
  }

 private:
  at::Device device_;
  std::unordered_map<const c10::TensorImpl*, at::Tensor> flags_;
};

// A state or other buffer of weight w: a contiguous CUDA tensor of w's device, dtype and size.
void check_like(const at::Tensor& t, const at::Tensor& w, const char* what) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.device() == w.device() && t.is_contiguous() &&
                  t.scalar_type() == w.scalar_type() && t.numel() == w.numel(),
              "sam_kernels cuda: every ", what, " must be a contiguous CUDA tensor of its weight's device, dtype ",
              "and size");
}

// Tensor j's hyperparameters, in declaration order (sam::SgdHyper, sam::AdamHyper).
template <int kCount>
std::array<double, kCount> hypers_of(const std::vector<std::vector<double>>& hypers, size_t j) {
  std::array<double, kCount> h{};
  for (int k = 0; k < kCount; ++k) h[k] = hypers[k][j];
  return h;
}

void check_hypers(const std::vector<std::vector<double>>& hypers, int count, size_t tensors) {
  TORCH_CHECK(static_cast<int>(hypers.size()) == count, "sam_kernels cuda: expected ", count,
              " hyperparameter lists, got ", hypers.size());
  for (const auto& list : hypers)
    TORCH_CHECK(list.size() == tensors, "sam_kernels cuda: one value per tensor expected in every hyperparameter ",
                "list (", list.size(), " for ", tensors, " tensors)");
}

}  // namespace

void restore_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved,
                  const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& momenta,
                  const std::vector<at::Tensor>& skips, const std::vector<std::vector<double>>& hypers) {
  if (params.empty()) return;
  const at::Tensor& like = params.front();
  const c10::cuda::CUDAGuard guard(like.device());
  const size_t count = params.size();
  check_list(params, like, "weight", count);
  check_list(saved, like, "saved copy", count);
  check_list(grads, like, "gradient", count);
  TORCH_CHECK(momenta.size() == count && skips.size() == count,
              "sam_kernels cuda: one momentum buffer and one skip flag per tensor expected");
  check_hypers(hypers, sam::kSgdHypers, count);
  SkipFlags flags(like);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "sam_restore_sgd", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<PayloadEntry<4, SgdTensor<A>>> entries;
    for (size_t j = 0; j < count; ++j) {
      const at::Tensor& w = params[j];
      check_like(saved[j], w, "saved copy");
      check_like(grads[j], w, "gradient");
      const auto h = hypers_of<sam::kSgdHypers>(hypers, j);
      const bool momentum = h[sam::kSgdMomentum] != 0;
      if (momentum) check_like(momenta[j], w, "momentum buffer");  // else a placeholder: not looked at
      const bool* skip = flags(skips[j]);
      if (!w.numel()) continue;
      PayloadEntry<4, SgdTensor<A>> e;
      e.ptr = {w.data_ptr(), saved[j].data_ptr(), grads[j].data_ptr(), momentum ? momenta[j].data_ptr() : nullptr};
      e.numel = w.numel();
      e.payload = {sam::sgd_coefs<A>(h.data()), skip, momentum};
      entries.push_back(e);
    }
    launch_payload_lists(entries, [&](const SgdList<A>& meta, int64_t blocks) {
      restore_sgd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void restore_adam_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved,
                   const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                   const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& max_exp_avg_sqs,
                   const std::vector<at::Tensor>& skips, const std::vector<std::vector<double>>& hypers) {
  if (params.empty()) return;
  const at::Tensor& like = params.front();
  const c10::cuda::CUDAGuard guard(like.device());
  const size_t count = params.size();
  check_list(params, like, "weight", count);
  check_list(saved, like, "saved copy", count);
  check_list(grads, like, "gradient", count);
  check_list(exp_avgs, like, "exp_avg", count);
  check_list(exp_avg_sqs, like, "exp_avg_sq", count);
  TORCH_CHECK(max_exp_avg_sqs.size() == count && skips.size() == count,
              "sam_kernels cuda: one max_exp_avg_sq and one skip flag per tensor expected");
  check_hypers(hypers, sam::kAdamHypers, count);
  SkipFlags flags(like);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "sam_restore_adam", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<PayloadEntry<6, AdamTensor<A>>> entries;
    for (size_t j = 0; j < count; ++j) {
      const at::Tensor& w = params[j];
      check_like(saved[j], w, "saved copy");
      check_like(grads[j], w, "gradient");
      check_like(exp_avgs[j], w, "exp_avg");
      check_like(exp_avg_sqs[j], w, "exp_avg_sq");
      const auto h = hypers_of<sam::kAdamHypers>(hypers, j);
      const bool amsgrad = h[sam::kAdamAmsgrad] != 0;
      if (amsgrad) check_like(max_exp_avg_sqs[j], w, "max_exp_avg_sq");  // else a placeholder: not looked at
      const bool* skip = flags(skips[j]);
      if (!w.numel()) continue;
      PayloadEntry<6, AdamTensor<A>> e;
      e.ptr = {w.data_ptr(),        saved[j].data_ptr(),       grads[j].data_ptr(),
               exp_avgs[j].data_ptr(), exp_avg_sqs[j].data_ptr(), amsgrad ? max_exp_avg_sqs[j].data_ptr() : nullptr};
      e.numel = w.numel();
      e.payload = {sam::adam_coefs<A>(h.data()), skip, sam::adam_decay_kind(h.data()), amsgrad};
      entries.push_back(e);
    }
    launch_payload_lists(entries, [&](const AdamList<A>& meta, int64_t blocks) {
      restore_adam_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

namespace {

// Per-tensor device scalars (coefficients, scales, shifts): one-element tensors of the weights' device,
// given to the kernel as a pointer and a dtype, read there (never here: no step waits on the device).
// A scalar of a dtype the kernels do not read (an integer) is converted to double on the device once.
class DeviceValues {
 public:
  explicit DeviceValues(const at::Tensor& like) : device_(like.device()) {}
  DeviceValue operator()(const at::Tensor& s, const char* what) {
    TORCH_CHECK(s.defined() && s.numel() == 1 && s.device() == device_, "sam_kernels cuda: every ", what,
                " must be a one-element tensor on ", device_);
    switch (s.scalar_type()) {
      case at::kDouble: return {s.data_ptr(), kValueDouble};
      case at::kFloat: return {s.data_ptr(), kValueFloat};
      case at::kHalf: return {s.data_ptr(), kValueHalf};
      case at::kBFloat16: return {s.data_ptr(), kValueBFloat16};
      case at::kBool: return {s.data_ptr(), kValueBool};
      default: break;
    }
    auto it = converted_.find(s.unsafeGetTensorImpl());
    if (it == converted_.end()) it = converted_.emplace(s.unsafeGetTensorImpl(), s.to(at::kDouble)).first;
    return {it->second.data_ptr(), kValueDouble};
  }

 private:
  at::Device device_;
  std::unordered_map<const c10::TensorImpl*, at::Tensor> converted_;
};

// Launches `kernel` over the entries, one partial slot of W values per block, and returns their
// fixed-order total (W values in the accumulation dtype A).
template <typename A, int W, int NPTR, typename P, typename Kernel>
at::Tensor reduce_payload_lists(const std::vector<PayloadEntry<NPTR, P>>& entries, const at::Tensor& like,
                                Kernel kernel) {
  const int64_t units = payload_units(entries);
  at::Tensor partials = at::empty({W * (units > 0 ? units : 1)}, like.options().dtype(c10::CppTypeToScalarType<A>::value));
  A* out = partials.data_ptr<A>();
  launch_payload_lists(entries, [&](const PayloadList<NPTR, P>& meta, int64_t blocks) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return total_of<A, W>(partials, units);
}

template <int NPTR, typename P>
PayloadEntry<NPTR, P> payload_entry(const at::Tensor& t, std::array<void*, NPTR> ptr, const P& payload) {
  PayloadEntry<NPTR, P> e;
  e.ptr = ptr;
  e.numel = t.numel();
  e.payload = payload;
  return e;
}

// copy_'s kernel works on raw elements of the dtype's size (a bit copy).
template <typename word_t>
void copy_words(const std::vector<TensorEntry>& entries) {
  launch_lists<2>(entries, [&](const TensorList<2>& meta, int64_t blocks) {
    restore_kernel<word_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void copy_(const std::vector<at::Tensor>& targets, const std::vector<at::Tensor>& sources) {
  if (targets.empty()) return;
  const at::Tensor& like = targets.front();
  const c10::cuda::CUDAGuard guard(like.device());
  check_list(targets, like, "target", targets.size());
  check_list(sources, like, "source", targets.size());
  std::vector<TensorEntry> entries;
  for (size_t j = 0; j < targets.size(); ++j) {
    check_like(sources[j], targets[j], "source");
    if (targets[j].numel() && targets[j].data_ptr() != sources[j].data_ptr())
      entries.push_back(chunk_entry(targets[j], {&targets[j], &sources[j]}));
  }
  switch (like.element_size()) {
    case 1: copy_words<uint8_t>(entries); break;
    case 2: copy_words<uint16_t>(entries); break;
    case 4: copy_words<uint32_t>(entries); break;
    case 8: copy_words<uint64_t>(entries); break;
    default:  // complex128: not a SAM dtype, but a copy all the same
      for (size_t j = 0; j < targets.size(); ++j) targets[j].copy_(sources[j]);
  }
}

at::Tensor pair_sums(const std::vector<at::Tensor>& firsts, const std::vector<at::Tensor>& seconds) {
  TORCH_CHECK(!firsts.empty(), "sam_kernels cuda: empty tensor list");
  const at::Tensor& like = firsts.front();
  const c10::cuda::CUDAGuard guard(like.device());
  check_list(firsts, like, "first", firsts.size());
  check_list(seconds, like, "second", firsts.size());
  std::vector<PayloadEntry<2, NoPayload>> entries;
  for (size_t j = 0; j < firsts.size(); ++j) {
    check_like(seconds[j], firsts[j], "second");
    if (firsts[j].numel()) entries.push_back(payload_entry<2>(firsts[j], {firsts[j].data_ptr(), seconds[j].data_ptr()}, NoPayload{}));
  }
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "sam_pair_sums", [&] {
    using A = at::opmath_type<scalar_t>;
    total = reduce_payload_lists<A, 3>(entries, like, pair_sums_kernel<scalar_t>);
  });
  return total;
}

void combine_(const std::vector<at::Tensor>& targets, const std::vector<at::Tensor>& others,
              const std::vector<at::Tensor>& target_coefs, const std::vector<at::Tensor>& other_coefs) {
  if (targets.empty()) return;
  const at::Tensor& like = targets.front();
  const c10::cuda::CUDAGuard guard(like.device());
  const size_t count = targets.size();
  check_list(targets, like, "target", count);
  check_list(others, like, "other", count);
  TORCH_CHECK(target_coefs.size() == count && other_coefs.size() == count,
              "sam_kernels cuda: one target and one other coefficient per tensor expected");
  DeviceValues values(like);
  std::vector<PayloadEntry<2, CombineTensor>> entries;
  for (size_t j = 0; j < count; ++j) {
    check_like(others[j], targets[j], "other");
    const CombineTensor c{values(target_coefs[j], "target coefficient"), values(other_coefs[j], "other coefficient")};
    if (targets[j].numel()) entries.push_back(payload_entry<2>(targets[j], {targets[j].data_ptr(), others[j].data_ptr()}, c));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "sam_combine", [&] {
    launch_payload_lists(entries, [&](const PayloadList<2, CombineTensor>& meta, int64_t blocks) {
      combine_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void split_difference_(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& firsts,
                       const std::vector<at::Tensor>& skips) {
  if (grads.empty()) return;
  const at::Tensor& like = grads.front();
  const c10::cuda::CUDAGuard guard(like.device());
  const size_t count = grads.size();
  check_list(grads, like, "gradient", count);
  check_list(firsts, like, "kept gradient", count);
  TORCH_CHECK(skips.size() == count, "sam_kernels cuda: one skip flag per tensor expected");
  SkipFlags flags(like);
  std::vector<PayloadEntry<2, SplitTensor>> entries;
  for (size_t j = 0; j < count; ++j) {
    check_like(firsts[j], grads[j], "kept gradient");
    const SplitTensor s{flags(skips[j])};
    if (grads[j].numel()) entries.push_back(payload_entry<2>(grads[j], {grads[j].data_ptr(), firsts[j].data_ptr()}, s));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "sam_split_difference", [&] {
    launch_payload_lists(entries, [&](const PayloadList<2, SplitTensor>& meta, int64_t blocks) {
      split_difference_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor residual_sq_sum(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                           const std::vector<at::Tensor>& moments, const std::vector<double>& sigmas) {
  TORCH_CHECK(!params.empty(), "sam_kernels cuda: empty tensor list");
  const at::Tensor& like = params.front();
  const c10::cuda::CUDAGuard guard(like.device());
  const size_t count = params.size();
  check_list(params, like, "weight", count);
  check_list(grads, like, "gradient", count);
  check_list(moments, like, "moment", count);
  TORCH_CHECK(sigmas.size() == count, "sam_kernels cuda: one sigma per tensor expected");
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "sam_residual_sq_sum", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<PayloadEntry<2, ResidualSumTensor<A>>> entries;
    for (size_t j = 0; j < count; ++j) {
      check_like(grads[j], params[j], "gradient");
      check_like(moments[j], params[j], "moment");
      if (params[j].numel())
        entries.push_back(payload_entry<2>(params[j], {grads[j].data_ptr(), moments[j].data_ptr()},
                                           ResidualSumTensor<A>{static_cast<A>(sigmas[j])}));
    }
    total = reduce_payload_lists<A, 1>(entries, like, residual_sq_kernel<scalar_t>);
  });
  return total.squeeze(0);
}

void residual_perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& moments, const std::vector<at::Tensor>& saved,
                       const std::vector<at::Tensor>& scales, const std::vector<double>& sigmas,
                       const std::vector<double>& lmbdas) {
  if (params.empty()) return;
  const at::Tensor& like = params.front();
  const c10::cuda::CUDAGuard guard(like.device());
  const size_t count = params.size();
  check_list(params, like, "weight", count);
  check_list(grads, like, "gradient", count);
  check_list(moments, like, "moment", count);
  check_list(saved, like, "saved copy", count);
  TORCH_CHECK(scales.size() == count && sigmas.size() == count && lmbdas.size() == count,
              "sam_kernels cuda: one scale, sigma and lambda per tensor expected");
  DeviceValues values(like);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "sam_residual_perturb", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<PayloadEntry<4, ResidualTensor<A>>> entries;
    for (size_t j = 0; j < count; ++j) {
      const at::Tensor& w = params[j];
      check_like(grads[j], w, "gradient");
      check_like(moments[j], w, "moment");
      check_like(saved[j], w, "saved copy");
      const ResidualTensor<A> r{values(scales[j], "scale"), static_cast<A>(sigmas[j]), static_cast<A>(lmbdas[j]),
                                static_cast<A>(1.0 - lmbdas[j])};
      if (w.numel())
        entries.push_back(payload_entry<4>(
            w, {w.data_ptr(), grads[j].data_ptr(), moments[j].data_ptr(), saved[j].data_ptr()}, r));
    }
    launch_payload_lists(entries, [&](const PayloadList<4, ResidualTensor<A>>& meta, int64_t blocks) {
      residual_perturb_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(meta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor msam_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& momenta, const std::vector<at::Tensor>& shifts,
                     const std::vector<at::Tensor>& skips, const std::vector<std::vector<double>>& hypers) {
  TORCH_CHECK(!params.empty(), "sam_kernels cuda: empty tensor list");
  const at::Tensor& like = params.front();
  const c10::cuda::CUDAGuard guard(like.device());
  const size_t count = params.size();
  check_list(params, like, "weight", count);
  check_list(grads, like, "gradient", count);
  check_list(momenta, like, "momentum buffer", count);
  TORCH_CHECK(shifts.size() == count && skips.size() == count,
              "sam_kernels cuda: one shift and one skip flag per tensor expected");
  check_hypers(hypers, sam::kSgdHypers, count);
  SkipFlags flags(like);
  DeviceValues values(like);
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "sam_msam_sgd", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<PayloadEntry<3, MsamTensor<A>>> entries;
    for (size_t j = 0; j < count; ++j) {
      const at::Tensor& w = params[j];
      check_like(grads[j], w, "gradient");
      check_like(momenta[j], w, "momentum buffer");
      const auto h = hypers_of<sam::kSgdHypers>(hypers, j);
      TORCH_CHECK(h[sam::kSgdMomentum] != 0, "sam_kernels cuda: msam_sgd_ needs momentum > 0");
      const MsamTensor<A> p{sam::sgd_coefs<A>(h.data()), values(shifts[j], "shift"), flags(skips[j])};
      if (w.numel())
        entries.push_back(payload_entry<3>(w, {w.data_ptr(), grads[j].data_ptr(), momenta[j].data_ptr()}, p));
    }
    total = reduce_payload_lists<A, 1>(entries, like, msam_sgd_kernel<scalar_t>);
  });
  return total.squeeze(0);
}

at::Tensor standard_normal(int64_t numel, uint64_t seed, int64_t tensor_index, int64_t step, int64_t offset) {
  TORCH_CHECK(numel >= 0, "numel must be >= 0");
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
  if (!numel) return out;
  sam::NormalStream base = noise_stream(seed, step);
  base.j = static_cast<uint32_t>(tensor_index);
  const int64_t groups = ceil_div(numel, 4);
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(groups, kThreads), 65535));
  standard_normal_kernel<<<blocks, kThreads, 0, stream()>>>(out.data_ptr<float>(), numel, offset, base);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace sam_cuda
