// Helpers shared by the host (CPU) code: filter shapes, deterministic chunked sums, the noise key.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "sam_math.h"

namespace sam_host {

// A pass compiled for AVX-512, AVX2 and plain x86-64, picked at load time. The build has no FP contraction
// and the vectoriser keeps every sum's lanes and order, so every clone gives the same bits.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SAM_HOST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SAM_HOST_CLONES
#endif

constexpr int64_t kGrain = 32768;  // elements per parallel task in elementwise passes
constexpr int64_t kChunk = 16384;  // elements per partial sum in reductions

struct FilterShape {
  int64_t rows = 0;   // number of filters (size(0)) for ndim >= 2
  int64_t fsize = 0;  // elements per filter; 0 for ndim <= 1 (each element is its own group)
};

inline FilterShape filter_shape(const at::Tensor& t) {
  FilterShape shape;
  if (t.dim() >= 2) {
    shape.rows = t.size(0);
    shape.fsize = shape.rows ? t.numel() / shape.rows : 0;
  }
  return shape;
}

// Deterministic sum over [0, n): add_range(begin, end, sum) adds one fixed chunk's terms into a zeroed
// sum (each chunk on one thread, so a chunk may keep state such as a noise stream); chunks summed in order.
// `chunk` fixes the boundaries (never the thread count), so the result is the same on any machine.
template <typename acc_t, int N, typename AddRange>
std::array<acc_t, N> chunked_sum(int64_t n, AddRange add_range, int64_t chunk = kChunk) {
  if (n <= chunk) {  // one chunk: no task, no allocation
    std::array<acc_t, N> sum{};
    if (n > 0) add_range(0, n, sum);
    return sum;
  }
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<std::array<acc_t, N>> partials(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      std::array<acc_t, N> sum{};
      add_range(c * chunk, std::min(n, (c + 1) * chunk), sum);
      partials[c] = sum;
    }
  });
  std::array<acc_t, N> total{};
  for (const auto& p : partials)
    for (int k = 0; k < N; ++k) total[k] += p[k];
  return total;
}

// Sum of term(k) for k in [begin, end) in independent accumulators (element k in lane (k - begin) mod
// lanes; 16 lanes, 4 for short ranges, 1 for tiny ones, chosen by the length only), folded in a fixed order
// at the end: vectorisable, and the same on every run and thread count.
constexpr int kLanes = 16;

template <typename acc_t, int N, typename Term>
inline void lane_sums(int64_t begin, int64_t end, std::array<acc_t, N>& out, Term term) {
  if (end - begin < 8) {  // tiny ranges (small filters): one accumulator
    for (int64_t k = begin; k < end; ++k) {
      std::array<acc_t, N> t = term(k);
      for (int m = 0; m < N; ++m) out[m] += t[m];
    }
    return;
  }
  if (end - begin < 8 * kLanes) {  // short ranges: 4 lanes, cheap to set up and to fold
    acc_t lanes[N][4] = {};
    int64_t k = begin;
    for (; k + 4 <= end; k += 4)
      for (int l = 0; l < 4; ++l) {
        const std::array<acc_t, N> t = term(k + l);
        for (int m = 0; m < N; ++m) lanes[m][l] += t[m];
      }
    for (int m = 0; m < N; ++m) {
      acc_t tail = 0;
      for (int64_t q = k; q < end; ++q) tail += term(q)[m];
      out[m] += ((lanes[m][0] + lanes[m][1]) + (lanes[m][2] + lanes[m][3])) + tail;
    }
    return;
  }
  acc_t lanes[N][kLanes] = {};
  int64_t k = begin;
  for (; k + kLanes <= end; k += kLanes) {
    // The lane loops stay loops (not unrolled early), so the vectoriser takes them, not the k loop
    // (vectorising the k loop would gather across blocks).
    acc_t terms[N][kLanes];
#pragma GCC unroll 1
    for (int l = 0; l < kLanes; ++l) {
      const std::array<acc_t, N> t = term(k + l);
      for (int m = 0; m < N; ++m) terms[m][l] = t[m];
    }
    for (int m = 0; m < N; ++m)
#pragma GCC unroll 1
      for (int l = 0; l < kLanes; ++l) lanes[m][l] += terms[m][l];
  }
  std::array<acc_t, N> tail{};
  for (; k < end; ++k) {
    std::array<acc_t, N> t = term(k);
    for (int m = 0; m < N; ++m) tail[m] += t[m];
  }
  for (int m = 0; m < N; ++m) {
    acc_t total = 0;
    for (int l = 0; l < kLanes; ++l) total += lanes[m][l];
    out[m] += total + tail[m];
  }
}

// Whether a float32 sum of squares is well inside float32's range (neither under- nor overflowed).
inline bool squares_in_range(double sum) { return sum > 1e-30 && sum < 1e30; }

// ||x||_2 of n contiguous values: squares summed in lanes in the accumulation type; when that sum
// leaves float32's safe range (w^2 under- or overflowing at the extremes of the dtype), once more with
// the squares in double. A one-element filter's norm is |x| itself.
template <typename acc_t, typename scalar_t>
double row_norm(const scalar_t* x, int64_t n) {
  if (n == 1) return std::abs(static_cast<double>(static_cast<acc_t>(x[0])));
  std::array<acc_t, 1> sq{};
  lane_sums<acc_t, 1>(0, n, sq, [x](int64_t k) {
    const acc_t a = static_cast<acc_t>(x[k]);
    return std::array<acc_t, 1>{a * a};
  });
  const double s = static_cast<double>(sq[0]);
  if (squares_in_range(s)) return std::sqrt(s);
  std::array<double, 1> wide{};
  lane_sums<double, 1>(0, n, wide, [x](int64_t k) {
    const double a = static_cast<double>(static_cast<acc_t>(x[k]));
    return std::array<double, 1>{a * a};
  });
  return std::sqrt(wide[0]);
}

struct NoiseKey {
  uint32_t k0, k1, step;
};

inline NoiseKey noise_key(uint64_t seed, int64_t step) {
  return {static_cast<uint32_t>(seed & 0xFFFFFFFFu), static_cast<uint32_t>(seed >> 32),
          static_cast<uint32_t>(step & 0xFFFFFFFF)};
}

}  // namespace sam_host
