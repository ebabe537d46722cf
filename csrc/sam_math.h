// Per-element math of sam_kernels, shared by the host (C++) and device (CUDA) builds.
// It follows docs/DESIGN.md §2 equation by equation; the Python reference backend is the oracle.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SAM_HD __host__ __device__ __forceinline__
#else
#define SAM_HD inline
#endif

namespace sam {

// ASAM scale t: SAM (t = 1), element-wise |w| + eta, filter-wise ||f_i|| + eta.
enum Mode : int { kSam = 0, kElement = 1, kFilter = 2 };

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPi = 6.2831854820251465f;  // float32(2*pi)

struct Uint4 {
  uint32_t x[4];
};

// One Philox4x32 round on the words (c0, c1, c2, c3) with round key (k0, k1):
// (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2 (64-bit products); c <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0).
// Word is uint32_t, or uint64_t holding a 32-bit word (the host's batched stream keeps words in 64-bit
// SIMD lanes so that each product is one vector multiply).
template <typename Word>
SAM_HD void philox_round(Word& c0, Word& c1, Word& c2, Word& c3, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const Word n0 = static_cast<Word>((p1 >> 32) ^ c1 ^ k0);
  const Word n2 = static_cast<Word>((p0 >> 32) ^ c3 ^ k1);
  c1 = static_cast<Word>(p1 & 0xFFFFFFFFu);
  c3 = static_cast<Word>(p0 & 0xFFFFFFFFu);
  c0 = n0;
  c2 = n2;
}

// Philox4x32-10 (Salmon et al. 2011): 10 rounds, the key bumped by (W0, W1) between rounds.
SAM_HD Uint4 philox4x32_10(Uint4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    philox_round(c.x[0], c.x[1], c.x[2], c.x[3], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// u = ((x >> 9) + 0.5) * 2^-23: exact in float32, strictly inside (0, 1).
SAM_HD float unit_float(uint32_t x) { return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f; }

// The Philox outputs of noise block c (elements 4c .. 4c+3) of tensor j at R-SAM step s:
// counter (c mod 2^32, c >> 32, j, s).
SAM_HD Uint4 noise_block(uint64_t block, uint32_t j, uint32_t step, uint32_t k0, uint32_t k1) {
  return philox4x32_10(Uint4{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), j, step}}, k0, k1);
}

// z_k of a block: Box-Muller on (u0, u1) for k = 0, 1 and on (u2, u3) for k = 2, 3; even k takes
// r cos(2 pi u_b), odd k takes r sin(2 pi u_b), all in float32.
SAM_HD float block_normal(const Uint4& x, int k) {
  // Selects with constant indices: a computed index would put the words in local memory on a GPU.
  const float ua = unit_float(k < 2 ? x.x[0] : x.x[2]);
  const float ub = unit_float(k < 2 ? x.x[1] : x.x[3]);
  const float radius = sqrtf(-2.0f * logf(ua));
  const float theta = kTwoPi * ub;
  return (k & 1) ? radius * sinf(theta) : radius * cosf(theta);
}

// Standard normal of element e of tensor j at R-SAM step s: element 4c + k takes z_k of block c.
// A stream object serves consecutive elements with one Philox call per block of four; copy it per
// thread (it caches the current block).
struct NormalStream {
  uint32_t j, step, k0, k1;
  uint64_t cached_block = ~uint64_t(0);
  Uint4 words{};
  SAM_HD float operator()(int64_t e) {
    const uint64_t block = static_cast<uint64_t>(e) >> 2;
    if (block != cached_block) {
      words = noise_block(block, j, step, k0, k1);
      cached_block = block;
    }
    return block_normal(words, static_cast<int>(e & 3));
  }
};

// t for one element: filter_value is ||f_i|| (ndim >= 2) or |w| (ndim <= 1).
template <typename acc_t>
SAM_HD acc_t asam_scale(acc_t w, acc_t eta, acc_t filter_value, int mode) {
  if (mode == kSam) return acc_t(1);
  if (mode == kElement) return (w < acc_t(0) ? -w : w) + eta;
  return filter_value + eta;
}

// epsilon = s * t^2 * g (p = 2) or s * t * sign(g) (p = inf).
template <typename acc_t>
SAM_HD acc_t sam_perturbation(acc_t scale, acc_t t, acc_t g, bool p_inf) {
  if (p_inf) {
    const acc_t sign = g > acc_t(0) ? acc_t(1) : (g < acc_t(0) ? acc_t(-1) : acc_t(0));
    return scale * t * sign;
  }
  return (scale * t) * (t * g);  // not t * t first: t^2 overflows where eps does not
}

// A skipped (non-finite) step has every scale zero, so eps = 0 * g may be NaN: make it 0.
template <typename acc_t>
SAM_HD acc_t finite_or_zero(acc_t x) {
  return (x - x == acc_t(0)) ? x : acc_t(0);
}

// ---------------------------------------------------------------- R-SAM (docs/DESIGN.md §2.4)
// The noise std of an element of filter i (ndim >= 2): (gamma / sqrt(n_i)) * ||w_i||, the first factor
// computed once per tensor (gamma_over_sqrt_n, rounded to acc_t) and the norm that of the weights before
// the noise.
template <typename acc_t>
SAM_HD acc_t filter_noise_std(acc_t gamma_over_sqrt_n, acc_t filter_norm) {
  return gamma_over_sqrt_n * filter_norm;
}

// The noise std of an element of an ndim <= 1 tensor (its own group): gamma * |w|, w before the noise.
template <typename acc_t>
SAM_HD acc_t element_noise_std(acc_t gamma, acc_t w) {
  return gamma * (w < acc_t(0) ? -w : w);
}

// delta0 = sigma * z (z the standard normal of the element, §3).
template <typename acc_t>
SAM_HD acc_t noise_delta(acc_t sigma, float z) {
  return sigma * static_cast<acc_t>(z);
}

// eps = a * delta0 + b * g, formed from delta0 (not (a * sigma) * z), so a pass that kept delta0 and one
// that regenerates it give the same bits. The caller applies finite_or_zero.
template <typename acc_t>
SAM_HD acc_t rsam_perturbation(acc_t a, acc_t delta, acc_t b, acc_t g) {
  return a * delta + b * g;
}

// One tensor's share of the four sums S1..S4 from its (sum delta^2, sum g^2, sum delta g) and its
// group's lambda: (S1, S2, lambda S3, lambda^2 S2).
template <typename T>
SAM_HD void rsam_weighted_sums(const T (&sums)[3], T lam, T (&out)[4]) {
  out[0] = sums[0];
  out[1] = sums[1];
  out[2] = lam * sums[2];
  out[3] = lam * lam * sums[1];
}

// ----------------------------------------------------------------------------------------------------
// The fused second step (docs/DESIGN.md §2.11): torch.optim.SGD's and Adam/AdamW's update of one element,
// taken from the saved weight w (the perturbed weight is discarded). Per-tensor hyperparameters arrive in
// the order of the operation's declaration (sam_kernels/backends/operations.py), as these indices say.
enum SgdHyper : int { kSgdLr, kSgdWeightDecay, kSgdMomentum, kSgdDampening, kSgdNesterov, kSgdMaximize, kSgdFresh,
                      kSgdHypers };
enum AdamHyper : int { kAdamLr, kAdamBeta1, kAdamBeta2, kAdamEps, kAdamWeightDecay, kAdamDecoupled, kAdamAmsgrad,
                       kAdamMaximize, kAdamStepSize, kAdamBiasCorrection2Sqrt, kAdamHypers };

// One tensor's SGD coefficients in the accumulation dtype; combinations such as 1 - dampening are formed
// in double first, as the Python reference forms them.
template <typename acc_t>
struct SgdCoefs {
  acc_t lr, weight_decay, momentum, one_minus_dampening, sign;
  bool weight_decay_on, nesterov, fresh;
};

template <typename acc_t>
SAM_HD SgdCoefs<acc_t> sgd_coefs(const double* h) {
  return {static_cast<acc_t>(h[kSgdLr]), static_cast<acc_t>(h[kSgdWeightDecay]), static_cast<acc_t>(h[kSgdMomentum]),
          static_cast<acc_t>(1.0 - h[kSgdDampening]), static_cast<acc_t>(h[kSgdMaximize] != 0 ? -1 : 1),
          h[kSgdWeightDecay] != 0, h[kSgdNesterov] != 0, h[kSgdFresh] != 0};
}

// d = ±g + lambda w; with momentum (kMomentum) m <- d (fresh) or mu m + (1 - tau) d, rounded to the state's
// dtype, and d = d + mu m (nesterov) or m; returns w - lr d.
template <bool kMomentum, typename acc_t, typename state_t>
SAM_HD acc_t sgd_update(acc_t w, acc_t g, state_t& m, const SgdCoefs<acc_t>& c) {
  acc_t d = c.sign * g;
  if (c.weight_decay_on) d = d + c.weight_decay * w;
  if (kMomentum) {
    const state_t m_new =
        static_cast<state_t>(c.fresh ? d : c.momentum * static_cast<acc_t>(m) + c.one_minus_dampening * d);
    m = m_new;
    const acc_t mr = static_cast<acc_t>(m_new);
    d = c.nesterov ? d + c.momentum * mr : mr;
  }
  return w - c.lr * d;
}

template <typename acc_t>
struct AdamCoefs {
  acc_t decay, weight_decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, sign;
};

// How Adam applies its weight decay: not at all, as L2 on the gradient (Adam), or decoupled (AdamW).
enum AdamDecay : int { kNoDecay = 0, kCoupledDecay = 1, kDecoupledDecay = 2 };

SAM_HD int adam_decay_kind(const double* h) {
  if (h[kAdamWeightDecay] == 0) return kNoDecay;
  return h[kAdamDecoupled] != 0 ? kDecoupledDecay : kCoupledDecay;
}

template <typename acc_t>
SAM_HD AdamCoefs<acc_t> adam_coefs(const double* h) {
  return {static_cast<acc_t>(1.0 - h[kAdamLr] * h[kAdamWeightDecay]), static_cast<acc_t>(h[kAdamWeightDecay]),
          static_cast<acc_t>(1.0 - h[kAdamBeta1]), static_cast<acc_t>(h[kAdamBeta2]),
          static_cast<acc_t>(1.0 - h[kAdamBeta2]), static_cast<acc_t>(h[kAdamEps]),
          static_cast<acc_t>(h[kAdamStepSize]), static_cast<acc_t>(h[kAdamBiasCorrection2Sqrt]),
          static_cast<acc_t>(h[kAdamMaximize] != 0 ? -1 : 1)};
}

// d = ±g; w <- w (1 - lr lambda) (AdamW) or d += lambda w (Adam); m <- m + (1 - b1)(d - m);
// v <- b2 v + (1 - b2) d^2; vmax <- max(vmax, v) (kAmsgrad); each moment rounded to the state's dtype before
// it is read; returns w - step_size m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps). The options are template
// parameters so that the host loop has no branch and vectorises.
template <int kDecay, bool kAmsgrad, typename acc_t, typename state_t>
SAM_HD acc_t adam_update(acc_t w, acc_t g, state_t& m, state_t& v, state_t* vmax, const AdamCoefs<acc_t>& c) {
  acc_t d = c.sign * g;
  if (kDecay == kDecoupledDecay) w = w * c.decay;
  if (kDecay == kCoupledDecay) d = d + c.weight_decay * w;
  const acc_t m0 = static_cast<acc_t>(m);
  const state_t m_new = static_cast<state_t>(m0 + c.one_minus_beta1 * (d - m0));
  const state_t v_new = static_cast<state_t>(c.beta2 * static_cast<acc_t>(v) + c.one_minus_beta2 * d * d);
  m = m_new;
  v = v_new;
  acc_t second = static_cast<acc_t>(v_new);
  if (kAmsgrad) {
    const acc_t old = static_cast<acc_t>(*vmax);
    second = old != old ? old : (old > second ? old : second);  // torch.maximum: a NaN on either side wins
    *vmax = static_cast<state_t>(second);
  }
  using std::sqrt;
  const acc_t denom = sqrt(second) / c.bias_correction2_sqrt + c.eps;
  return w - c.step_size * static_cast<acc_t>(m_new) / denom;
}

}  // namespace sam
