// The batched host noise stream (noise_batch.h), compiled once per instruction set and chosen at load time.
#include "noise_batch.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SAM_NOISE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SAM_NOISE_CLONES
#endif

namespace sam_host {

// out[k] = z(e0 + k) for k in [0, n), n <= kNoiseBatch: the standard normals of elements e0 .. e0 + n - 1
// of tensor j at step `step`.
SAM_NOISE_CLONES void standard_normals(float* out, int64_t e0, int64_t n, uint32_t k0, uint32_t k1, uint32_t j,
                             uint32_t step) {
  constexpr int kBlocks = kNoiseBatch / 4 + 1;
  const uint64_t first = static_cast<uint64_t>(e0) >> 2;
  const int blocks = static_cast<int>(((static_cast<uint64_t>(e0 + n - 1)) >> 2) - first + 1);
  // Stage 1: Philox4x32-10 of every block, round by round over the whole batch (one SIMD lane a block).
  // The words live in 64-bit lanes (upper half zero): the 32x32->64 products are then single vector
  // multiplies (pmuludq) with no shuffles to split high and low halves.
  uint64_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  for (int b = 0; b < blocks; ++b) {
    const uint64_t block = first + static_cast<uint64_t>(b);
    c0[b] = block & 0xFFFFFFFFu;
    c1[b] = block >> 32;
    c2[b] = j;
    c3[b] = step;
  }
  uint32_t key0 = k0, key1 = k1;
  for (int round = 0; round < 10; ++round) {
    for (int b = 0; b < blocks; ++b) sam::philox_round(c0[b], c1[b], c2[b], c3[b], key0, key1);
    key0 += sam::kPhiloxW0;
    key1 += sam::kPhiloxW1;
  }
  // Stage 2: Box-Muller on (u0, u1) and (u2, u3) of each block.
  float z[kBlocks * 4];
  for (int b = 0; b < blocks; ++b) {
    const float ra = std::sqrt(-2.0f * detail::log_unit(sam::unit_float(static_cast<uint32_t>(c0[b]))));
    const float rb = std::sqrt(-2.0f * detail::log_unit(sam::unit_float(static_cast<uint32_t>(c2[b]))));
    float sa, ca, sb, cb;
    detail::sincos_turn(sam::kTwoPi * sam::unit_float(static_cast<uint32_t>(c1[b])), sa, ca);
    detail::sincos_turn(sam::kTwoPi * sam::unit_float(static_cast<uint32_t>(c3[b])), sb, cb);
    z[4 * b + 0] = ra * ca;
    z[4 * b + 1] = ra * sa;
    z[4 * b + 2] = rb * cb;
    z[4 * b + 3] = rb * sb;
  }
  const int skip = static_cast<int>(static_cast<uint64_t>(e0) & 3);
  std::memcpy(out, z + skip, static_cast<size_t>(n) * sizeof(float));
}

}  // namespace sam_host
