// The R-SAM noise stream on the host, in batches the compiler can vectorise (docs/DESIGN.md §3).
//
// Same stream as sam_math.h's NormalStream (Philox4x32-10 counter (c mod 2^32, c >> 32, j, s), u = ((x >> 9)
// + 0.5) * 2^-23, Box-Muller in float32), but log, sin and cos are branch-free polynomials instead of
// libm calls, so a batch of blocks runs in SIMD lanes: equal to the libm stream up to float rounding
// (a few ulp), as every backend is.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "sam_math.h"

namespace sam_host {

constexpr int64_t kNoiseBatch = 256;  // normals per batch (64 Philox blocks)

namespace detail {

// Branch-free select and sign flip (bit operations, so that the loops below stay SIMD).
inline float select(bool pick_a, float a, float b) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  const uint32_t mask = 0u - static_cast<uint32_t>(pick_a);
  const uint32_t r = (ua & mask) | (ub & ~mask);
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}

inline float negate_if(bool negate, float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u ^= static_cast<uint32_t>(negate) << 31;
  float out;
  std::memcpy(&out, &u, 4);
  return out;
}

// ln(u) for u in (0, 1]: u = m * 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m-1)/(m+1).
inline float log_unit(float u) {
  uint32_t bits;
  std::memcpy(&bits, &u, 4);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFF) - 127;
  uint32_t mant = (bits & 0x7FFFFFu) | 0x3F800000u;  // m in [1, 2)
  float m;
  std::memcpy(&m, &mant, 4);
  const bool big = m > 1.41421356f;
  m = select(big, m * 0.5f, m);
  e += static_cast<int32_t>(big);
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float series = 1.0f + s2 * (0.333333343f + s2 * (0.2f + s2 * (0.142857149f + s2 * 0.111111112f)));
  const float fe = static_cast<float>(e);
  return (fe * 0.693145752f + 2.0f * s * series) + fe * 1.42860677e-06f;  // ln 2 split hi + lo
}

// sin and cos of theta in [0, 2 pi]: Cody-Waite reduction by pi/2, minimax polynomials on [-pi/4, pi/4].
inline void sincos_turn(float theta, float& sin_out, float& cos_out) {
  const float q = static_cast<float>(static_cast<int32_t>(theta * 0.636619772f + 0.5f));  // nearest quadrant, 0..4 (theta >= 0)
  float x = theta - q * 1.5703125f;
  x = x - q * 4.837512969970703125e-4f;
  x = x - q * 7.54978995489188216e-8f;
  const float x2 = x * x;
  const float s = x + x * x2 * (-1.6666654611e-1f + x2 * (8.3321608736e-3f + x2 * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * x2 + x2 * x2 * (4.166664568298827e-2f + x2 * (-1.388731625493765e-3f + x2 * 2.443315711809948e-5f));
  const int quadrant = static_cast<int>(q) & 3;
  const bool odd = quadrant & 1;
  sin_out = negate_if(quadrant & 2, select(odd, c, s));        // {s, c, -s, -c}
  cos_out = negate_if((quadrant + 1) & 2, select(odd, s, c));  // {c, -s, -c, s}
}

}  // namespace detail

// out[k] = z(e0 + k) for k in [0, n), n <= kNoiseBatch: the standard normals of elements e0 .. e0 + n - 1
// of tensor j at step `step` (noise_batch.cpp: AVX-512 intrinsics, or the functions above vectorised by
// the compiler for AVX2 or plain x86-64, picked at load time; SAM_KERNELS_NOISE_ISA=avx2|default forces
// a narrower path, for tests. Every path gives the same bits).
void standard_normals(float* out, int64_t e0, int64_t n, uint32_t k0, uint32_t k1, uint32_t j, uint32_t step);

}  // namespace sam_host
