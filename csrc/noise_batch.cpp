// The batched host noise stream (noise_batch.h): a hand-vectorised AVX-512 path and the portable code
// compiled for AVX2 and plain x86-64; one is picked at load time. Every path does the same IEEE float
// operations in the same order (no FMA: the build has -ffp-contract=off), so all give the same bits.
#include "noise_batch.h"

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
// GCC 12 flags the intrinsics' own _mm512_undefined_* placeholders as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define SAM_NOISE_X86 1
#endif

namespace sam_host {
namespace {

constexpr int kMaxBlocks = kNoiseBatch / 4 + 1;  // a batch that starts inside a block spans one block more

// ---------------------------------------------------------------- portable path (auto-vectorised)
// Philox round by round over the whole batch (one SIMD lane a block), words in 64-bit lanes (upper half
// zero) so the 32x32->64 products are single vector multiplies; then Box-Muller block by block.
__attribute__((always_inline)) inline void normals_portable(float* out, int64_t e0, int64_t n, uint32_t k0,
                                                            uint32_t k1, uint32_t j, uint32_t step) {
  const uint64_t first = static_cast<uint64_t>(e0) >> 2;
  const int blocks = static_cast<int>(((static_cast<uint64_t>(e0 + n - 1)) >> 2) - first + 1);
  uint64_t c0[kMaxBlocks], c1[kMaxBlocks], c2[kMaxBlocks], c3[kMaxBlocks];
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
  float z[kMaxBlocks * 4];
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
  std::memcpy(out, z + (e0 & 3), static_cast<size_t>(n) * sizeof(float));
}

void normals_default(float* out, int64_t e0, int64_t n, uint32_t k0, uint32_t k1, uint32_t j, uint32_t step) {
  normals_portable(out, e0, n, k0, k1, j, step);
}

#ifdef SAM_NOISE_X86
__attribute__((target("avx2"))) void normals_avx2(float* out, int64_t e0, int64_t n, uint32_t k0, uint32_t k1,
                                                  uint32_t j, uint32_t step) {
  normals_portable(out, e0, n, k0, k1, j, step);
}

// ---------------------------------------------------------------- AVX-512 path (intrinsics)
#define SAM_AVX512 __attribute__((target("avx512f,avx512dq"), always_inline)) inline

// Philox4x32-10 of G groups of 8 consecutive blocks from block `first`, one block per 64-bit lane. Only
// the low 32 bits of a lane are the word: vpmuludq reads only those, and whatever the xors leave in the
// high half never reaches a low half, so no masking is needed. words[g][w]: word w of group g's blocks.
template <int G>
SAM_AVX512 void philox_groups(uint64_t first, uint32_t j, uint32_t step, uint32_t k0, uint32_t k1,
                              __m256i words[G][4]) {
  const __m512i m0 = _mm512_set1_epi64(sam::kPhiloxM0), m1 = _mm512_set1_epi64(sam::kPhiloxM1);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  __m512i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    const __m512i block = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(first + 8 * g)), lane);
    c0[g] = block;  // low word c mod 2^32 (the high half is ignored)
    c1[g] = _mm512_srli_epi64(block, 32);
    c2[g] = _mm512_set1_epi64(j);
    c3[g] = _mm512_set1_epi64(step);
  }
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < G; ++g) {
      const __m512i p0 = _mm512_mul_epu32(c0[g], m0), p1 = _mm512_mul_epu32(c2[g], m1);
      c0[g] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(p1, _MM_PERM_CDAB), c1[g], key0, 0x96);  // hi1 ^ c1 ^ k0
      c2[g] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(p0, _MM_PERM_CDAB), c3[g], key1, 0x96);  // hi0 ^ c3 ^ k1
      c1[g] = p1;  // lo1
      c3[g] = p0;  // lo0
    }
    k0 += sam::kPhiloxW0;
    k1 += sam::kPhiloxW1;
  }
  for (int g = 0; g < G; ++g) {
    words[g][0] = _mm512_cvtepi64_epi32(c0[g]);
    words[g][1] = _mm512_cvtepi64_epi32(c1[g]);
    words[g][2] = _mm512_cvtepi64_epi32(c2[g]);
    words[g][3] = _mm512_cvtepi64_epi32(c3[g]);
  }
}

SAM_AVX512 __m512 unit16(__m256i lo, __m256i hi) {  // sam::unit_float of 16 words
  const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  const __m512 k = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 9));
  return _mm512_mul_ps(_mm512_add_ps(k, _mm512_set1_ps(0.5f)), _mm512_set1_ps(1.1920928955078125e-07f));
}

SAM_AVX512 __m512 c16(float x) { return _mm512_set1_ps(x); }

// detail::log_unit, operation for operation.
SAM_AVX512 __m512 log16(__m512 u) {
  const __m512i bits = _mm512_castps_si512(u);
  __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xFF)),
                               _mm512_set1_epi32(127));
  __m512 m = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFF)), _mm512_set1_epi32(0x3F800000)));
  const __mmask16 big = _mm512_cmp_ps_mask(m, c16(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, c16(0.5f));
  e = _mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1));
  const __m512 s = _mm512_div_ps(_mm512_sub_ps(m, c16(1.0f)), _mm512_add_ps(m, c16(1.0f)));
  const __m512 s2 = _mm512_mul_ps(s, s);
  __m512 series = _mm512_add_ps(c16(0.142857149f), _mm512_mul_ps(s2, c16(0.111111112f)));
  series = _mm512_add_ps(c16(0.2f), _mm512_mul_ps(s2, series));
  series = _mm512_add_ps(c16(0.333333343f), _mm512_mul_ps(s2, series));
  series = _mm512_add_ps(c16(1.0f), _mm512_mul_ps(s2, series));
  const __m512 fe = _mm512_cvtepi32_ps(e);
  const __m512 head = _mm512_add_ps(_mm512_mul_ps(fe, c16(0.693145752f)),
                                    _mm512_mul_ps(_mm512_mul_ps(c16(2.0f), s), series));
  return _mm512_add_ps(head, _mm512_mul_ps(fe, c16(1.42860677e-06f)));
}

// detail::sincos_turn, operation for operation.
SAM_AVX512 void sincos16(__m512 theta, __m512& sin_out, __m512& cos_out) {
  const __m512i qi = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(theta, c16(0.636619772f)), c16(0.5f)));
  const __m512 q = _mm512_cvtepi32_ps(qi);
  __m512 x = _mm512_sub_ps(theta, _mm512_mul_ps(q, c16(1.5703125f)));
  x = _mm512_sub_ps(x, _mm512_mul_ps(q, c16(4.837512969970703125e-4f)));
  x = _mm512_sub_ps(x, _mm512_mul_ps(q, c16(7.54978995489188216e-8f)));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 ps = _mm512_add_ps(c16(8.3321608736e-3f), _mm512_mul_ps(x2, c16(-1.9515295891e-4f)));
  ps = _mm512_add_ps(c16(-1.6666654611e-1f), _mm512_mul_ps(x2, ps));
  const __m512 s = _mm512_add_ps(x, _mm512_mul_ps(_mm512_mul_ps(x, x2), ps));
  __m512 pc = _mm512_add_ps(c16(-1.388731625493765e-3f), _mm512_mul_ps(x2, c16(2.443315711809948e-5f)));
  pc = _mm512_add_ps(c16(4.166664568298827e-2f), _mm512_mul_ps(x2, pc));
  const __m512 c = _mm512_add_ps(_mm512_sub_ps(c16(1.0f), _mm512_mul_ps(c16(0.5f), x2)),
                                 _mm512_mul_ps(_mm512_mul_ps(x2, x2), pc));
  const __mmask16 odd = _mm512_test_epi32_mask(qi, _mm512_set1_epi32(1));
  const __m512i sign_sin = _mm512_slli_epi32(_mm512_and_si512(qi, _mm512_set1_epi32(2)), 30);
  const __m512i sign_cos =
      _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(qi, _mm512_set1_epi32(1)), _mm512_set1_epi32(2)), 30);
  sin_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(odd, s, c)), sign_sin));
  cos_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(odd, c, s)), sign_cos));
}

// Box-Muller on 16 blocks (the words of two groups), written as their 64 normals in element order.
SAM_AVX512 void box_muller16(const __m256i (&lo)[4], const __m256i (&hi)[4], float* z) {
  const __m512 ra = _mm512_sqrt_ps(_mm512_mul_ps(c16(-2.0f), log16(unit16(lo[0], hi[0]))));
  const __m512 rb = _mm512_sqrt_ps(_mm512_mul_ps(c16(-2.0f), log16(unit16(lo[2], hi[2]))));
  __m512 sa, ca, sb, cb;
  sincos16(_mm512_mul_ps(c16(sam::kTwoPi), unit16(lo[1], hi[1])), sa, ca);
  sincos16(_mm512_mul_ps(c16(sam::kTwoPi), unit16(lo[3], hi[3])), sb, cb);
  const __m512 z0 = _mm512_mul_ps(ra, ca), z1 = _mm512_mul_ps(ra, sa);
  const __m512 z2 = _mm512_mul_ps(rb, cb), z3 = _mm512_mul_ps(rb, sb);
  // 4 x 16 -> 16 x 4: within each 128-bit lane L, u_k holds block 4L + k's four normals ...
  const __m512 t0 = _mm512_unpacklo_ps(z0, z1), t1 = _mm512_unpackhi_ps(z0, z1);
  const __m512 t2 = _mm512_unpacklo_ps(z2, z3), t3 = _mm512_unpackhi_ps(z2, z3);
  const __m512 u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const __m512 u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  // ... then output vector v gathers lane v of u0..u3 (blocks 4v .. 4v + 3).
  const __m512 a = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 b = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 c = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 d = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm512_store_ps(z + 0, _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_store_ps(z + 16, _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_store_ps(z + 32, _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_store_ps(z + 48, _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The normals of G groups (8G blocks from `first`) into z (64 * ceil(G / 2) floats).
template <int G>
SAM_AVX512 void normal_groups(uint64_t first, uint32_t j, uint32_t step, uint32_t k0, uint32_t k1, float* z) {
  __m256i words[G][4];
  philox_groups<G>(first, j, step, k0, k1, words);
  for (int g = 0; g < G; g += 2) box_muller16(words[g], words[g + 1 < G ? g + 1 : g], z + 32 * g);
}

__attribute__((target("avx512f,avx512dq"))) void normals_avx512(float* out, int64_t e0, int64_t n, uint32_t k0,
                                                                uint32_t k1, uint32_t j, uint32_t step) {
  const uint64_t first = static_cast<uint64_t>(e0) >> 2;
  const int blocks = static_cast<int>(((static_cast<uint64_t>(e0 + n - 1)) >> 2) - first + 1);
  alignas(64) float z[(kMaxBlocks + 15) / 16 * 64];
  // Up to 4 groups (32 blocks) at a time: 16 state registers, 8 independent multiplies per round.
  for (int done = 0; done < blocks;) {
    const int left = blocks - done;
    float* dst = z + 4 * done;
    if (left > 24) {
      normal_groups<4>(first + done, j, step, k0, k1, dst);
      done += 32;
    } else if (left > 16) {
      normal_groups<3>(first + done, j, step, k0, k1, dst);
      done += 24;
    } else if (left > 8) {
      normal_groups<2>(first + done, j, step, k0, k1, dst);
      done += 16;
    } else {
      normal_groups<1>(first + done, j, step, k0, k1, dst);
      done += 8;
    }
  }
  std::memcpy(out, z + (e0 & 3), static_cast<size_t>(n) * sizeof(float));
}
#endif

using NormalsFn = void (*)(float*, int64_t, int64_t, uint32_t, uint32_t, uint32_t, uint32_t);

// The widest path this CPU runs; SAM_KERNELS_NOISE_ISA=avx2 or default picks a narrower one (tests).
NormalsFn pick_normals() {
  const char* forced = std::getenv("SAM_KERNELS_NOISE_ISA");
  const std::string want = forced ? forced : "";
#ifdef SAM_NOISE_X86
  __builtin_cpu_init();
  if ((want.empty() || want == "avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
    return normals_avx512;
  if ((want.empty() || want == "avx512" || want == "avx2") && __builtin_cpu_supports("avx2")) return normals_avx2;
#endif
  return normals_default;
}

const NormalsFn normals_impl = pick_normals();

}  // namespace

void standard_normals(float* out, int64_t e0, int64_t n, uint32_t k0, uint32_t k1, uint32_t j, uint32_t step) {
  normals_impl(out, e0, n, k0, k1, j, step);
}

}  // namespace sam_host
