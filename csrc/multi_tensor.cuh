// Multi-tensor launching for the CUDA kernels of sam_kernels.
//
// A launch covers up to kMaxTensors tensors whose metadata (pointers, sizes,
// filter sizes, per-tensor hyperparameters) travels by value as one kernel
// argument. Each tensor is cut into work units (chunks of kChunk elements, or
// groups of filter rows for the norm pass); block b finds its tensor by binary
// search over the cumulative unit counts, so a launch has as many blocks as its
// tensors have units and long lists take ceil(count / kMaxTensors) launches.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <array>
#include <cstdint>
#include <limits>
#include <vector>

namespace sam_cuda {

constexpr int kThreads = 256;      // threads per block in every pass
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 16384;  // elements per block in elementwise and reduction passes
constexpr int kMaxTensors = 32;    // tensors per launch: keeps the argument under the classic 4 KiB
constexpr int kMaxPointers = 3;
constexpr int64_t kWholeBlockRow = 2048;  // filters longer than this are reduced by a whole block

// Host-side description of one tensor of a pass.
struct TensorEntry {
  std::array<void*, kMaxPointers> ptr{};
  int64_t numel = 0;
  int64_t fsize = 0;      // elements per filter (ndim >= 2), 0 when every element is its own group
  int64_t fnorm_off = 0;  // first filter's slot in the norms buffer
  int64_t elem_off = 0;   // global index of element 0 in the noise stream (dim-0 shards)
  double param[3] = {0.0, 0.0, 0.0};  // per-tensor hyperparameters (eta; or gamma, gamma / sqrt(n_row), lambda)
  const void* scalar[2] = {nullptr, nullptr};  // per-tensor device scalars (scale; coefficients a, b)
  uint32_t index = 0;     // tensor number j of the noise stream
  int32_t rows_per_block = 1;  // norm pass: filters per block (1: a whole block per filter)
  int64_t units = 0;      // blocks this tensor needs
};

// What a kernel receives: up to kMaxTensors entries, structure of arrays.
template <int NPTR>
struct TensorList {
  void* ptr[NPTR][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t fsize[kMaxTensors];
  int64_t fnorm_off[kMaxTensors];
  int64_t elem_off[kMaxTensors];
  double param[3][kMaxTensors];
  const void* scalar[2][kMaxTensors];
  uint32_t index[kMaxTensors];
  int32_t rows_per_block[kMaxTensors];
  int32_t first_block[kMaxTensors + 1];  // tensor t owns blocks [first_block[t], first_block[t + 1])
  bool vec_ok[kMaxTensors];              // every pointer of tensor t is 16-byte aligned
  int32_t count;
  int64_t partial0;  // reductions: slot of this launch's first block in the partials buffer
};
static_assert(sizeof(TensorList<kMaxPointers>) <= 4096, "kernel argument over 4 KiB");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Packs the entries into launches and calls launch(meta, blocks) for each; returns the total blocks.
template <int NPTR, typename Launch>
int64_t launch_lists(const std::vector<TensorEntry>& entries, Launch&& launch) {
  TensorList<NPTR> meta{};
  int64_t blocks = 0, total = 0;
  auto flush = [&] {
    if (!meta.count) return;
    meta.first_block[meta.count] = static_cast<int32_t>(blocks);
    meta.partial0 = total;
    launch(meta, blocks);
    total += blocks;
    blocks = 0;
    meta = TensorList<NPTR>{};
  };
  for (const TensorEntry& e : entries) {
    if (e.units <= 0) continue;
    TORCH_CHECK(e.units < std::numeric_limits<int32_t>::max(), "sam_kernels cuda: tensor too large");
    if (meta.count == kMaxTensors || blocks + e.units >= std::numeric_limits<int32_t>::max()) flush();
    const int t = meta.count++;
    bool vec_ok = true;
    for (int k = 0; k < NPTR; ++k) {
      meta.ptr[k][t] = e.ptr[k];
      vec_ok = vec_ok && aligned16(e.ptr[k]);
    }
    meta.vec_ok[t] = vec_ok;
    meta.numel[t] = e.numel;
    meta.fsize[t] = e.fsize;
    meta.fnorm_off[t] = e.fnorm_off;
    meta.elem_off[t] = e.elem_off;
    meta.param[0][t] = e.param[0];
    meta.param[1][t] = e.param[1];
    meta.param[2][t] = e.param[2];
    meta.scalar[0][t] = e.scalar[0];
    meta.scalar[1][t] = e.scalar[1];
    meta.index[t] = e.index;
    meta.rows_per_block[t] = e.rows_per_block;
    meta.first_block[t] = static_cast<int32_t>(blocks);
    blocks += e.units;
  }
  flush();
  return total;
}

// ---------------------------------------------------------------------------------------------------
// Passes whose per-tensor data does not fit TensorList (more pointers, a struct of hyperparameters and
// device flags per tensor): the kernel's functor reads a per-tensor payload P of its own. A launch holds
// as many tensors as keep the argument under 4 KiB (at most kMaxTensors); each tensor is cut into chunks
// of kChunk elements, and block b finds its tensor as in TensorList.
template <int NPTR, typename P>
struct PayloadList {
  static constexpr int kPerTensor = static_cast<int>(NPTR * sizeof(void*) + sizeof(int64_t) + sizeof(P) +
                                                     sizeof(int32_t) + sizeof(bool));
  static constexpr int kCapacity = (4096 - 64) / kPerTensor < kMaxTensors ? (4096 - 64) / kPerTensor : kMaxTensors;
  static_assert(kCapacity >= 1, "per-tensor payload too large for one kernel argument");

  void* ptr[NPTR][kCapacity];
  int64_t numel[kCapacity];
  P payload[kCapacity];
  int32_t first_block[kCapacity + 1];  // tensor t owns blocks [first_block[t], first_block[t + 1])
  bool vec_ok[kCapacity];              // every non-null pointer of tensor t is 16-byte aligned
  int32_t count;
  int64_t partial0;  // reductions: slot of this launch's first block in the partials buffer
};

// Host-side description of one tensor of a payload pass. A pointer the pass does not use for this tensor
// (a state the tensor's options turn off) is null: it is never read, and does not spoil vec_ok.
template <int NPTR, typename P>
struct PayloadEntry {
  std::array<void*, NPTR> ptr{};
  int64_t numel = 0;
  P payload{};
};

// Packs the entries into launches of PayloadList<NPTR, P> and calls launch(meta, blocks) for each;
// returns the total blocks (a reduction's partial slots: one per block, launch after launch, from
// meta.partial0; payload_units gives the count beforehand).
template <int NPTR, typename P, typename Launch>
int64_t launch_payload_lists(const std::vector<PayloadEntry<NPTR, P>>& entries, Launch&& launch) {
  using List = PayloadList<NPTR, P>;
  static_assert(sizeof(List) <= 4096, "kernel argument over 4 KiB");
  List meta{};
  int64_t blocks = 0, total = 0;
  auto flush = [&] {
    if (!meta.count) return;
    meta.first_block[meta.count] = static_cast<int32_t>(blocks);
    meta.partial0 = total;
    launch(meta, blocks);
    total += blocks;
    blocks = 0;
    meta = List{};
  };
  for (const auto& e : entries) {
    const int64_t units = ceil_div(e.numel, kChunk);
    if (units <= 0) continue;
    TORCH_CHECK(units < std::numeric_limits<int32_t>::max(), "sam_kernels cuda: tensor too large");
    if (meta.count == List::kCapacity || blocks + units >= std::numeric_limits<int32_t>::max()) flush();
    const int t = meta.count++;
    bool vec_ok = true;
    for (int k = 0; k < NPTR; ++k) {
      meta.ptr[k][t] = e.ptr[k];
      vec_ok = vec_ok && aligned16(e.ptr[k]);  // a null pointer is aligned
    }
    meta.vec_ok[t] = vec_ok;
    meta.numel[t] = e.numel;
    meta.payload[t] = e.payload;
    meta.first_block[t] = static_cast<int32_t>(blocks);
    blocks += units;
  }
  flush();
  return total;
}

// The blocks (work units) launch_payload_lists will launch for these entries.
template <int NPTR, typename P>
int64_t payload_units(const std::vector<PayloadEntry<NPTR, P>>& entries) {
  int64_t units = 0;
  for (const auto& e : entries) units += ceil_div(e.numel, kChunk);
  return units;
}

#if defined(__CUDACC__)

// The tensor that block `block` works on: the last t with first_block[t] <= block (TensorList, PayloadList).
template <typename List>
__device__ __forceinline__ int tensor_of_block(const List& m, int32_t block) {
  int lo = 0, hi = m.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (m.first_block[mid] <= block) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Elements per 16-byte vector access.
template <typename T>
constexpr int vec_width() {
  return 16 / sizeof(T) > 0 ? static_cast<int>(16 / sizeof(T)) : 1;
}

// Loads elements i .. i+n-1 (n <= VEC) of p: one 16-byte load when the group is whole and aligned.
template <int VEC, typename T, typename A>
__device__ __forceinline__ void load(const T* p, int64_t i, int n, bool vec, A (&out)[VEC]) {
  if (vec && n == VEC) {
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = static_cast<A>(pack.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = k < n ? static_cast<A>(p[i + k]) : A(0);
  }
}

template <int VEC, typename T, typename A>
__device__ __forceinline__ void store(T* p, int64_t i, int n, bool vec, const A (&in)[VEC]) {
  if (vec && n == VEC) {
    Pack<T, VEC> pack;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pack.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p + i) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (k < n) p[i + k] = static_cast<T>(in[k]);
  }
}

// Calls body(i, n) for this thread's groups of VEC consecutive elements in [begin, end).
template <int VEC, typename Body>
__device__ __forceinline__ void for_each_group(int64_t begin, int64_t end, Body&& body) {
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC; i < end; i += static_cast<int64_t>(blockDim.x) * VEC)
    body(i, static_cast<int>(end - i < VEC ? end - i : VEC));
}

// Fixed-order warp sum (the same tree every run: deterministic).
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Fixed-order block sum of W values; the result is valid in thread 0. `shared` holds W * 32 values.
template <int W, typename A>
__device__ __forceinline__ void block_sum(A (&v)[W], A* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < W; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < W; ++k) shared[k * 32 + warp] = v[k];
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = warp_sum(lane < warps ? shared[k * 32 + lane] : A(0));
  }
  __syncthreads();  // `shared` may be reused by the caller
}

#endif  // __CUDACC__

}  // namespace sam_cuda
