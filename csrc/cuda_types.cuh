// Loads and stores between storage dtypes and the compute type, and the dtype switch, for
// the CUDA kernels (plain CUDA: no torch headers, so `nvcc -c` checks them anywhere).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernel_args.h"
#include "philox.h"

namespace ddpm_fast {

template <typename F> __device__ __forceinline__ F load_as(const float* p, int64_t i) { return F(p[i]); }
template <typename F> __device__ __forceinline__ F load_as(const double* p, int64_t i) { return F(p[i]); }
template <typename F> __device__ __forceinline__ F load_as(const __half* p, int64_t i) { return F(__half2float(p[i])); }
template <typename F> __device__ __forceinline__ F load_as(const __nv_bfloat16* p, int64_t i) {
  return F(__bfloat162float(p[i]));
}

__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(double* p, int64_t i, double v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// Round a float to storage type T and back (so that drawn noise equals what is stored).
template <typename T> __device__ __forceinline__ float round_to(float v) { return v; }
template <> __device__ __forceinline__ float round_to<__half>(float v) { return __half2float(__float2half_rn(v)); }
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

template <typename Fn>
void dispatch_dtype(DType d, Fn&& fn) {
  switch (d) {
    case kF32: fn(float{}); break;
    case kF64: fn(double{}); break;
    case kF16: fn(__half{}); break;
    case kBF16: fn(__nv_bfloat16{}); break;
  }
}

// Launch shape shared by the elementwise kernels: a block covers kTile elements of one
// (n, c) row; a flat 1-D grid over rows x tiles (grid.y would cap N*C at 65535).
constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kTile = kThreads * kPerThread;

// Which elements of its tile thread `tid` handles. Given noise: i * kThreads + tid, so that each
// load instruction of a warp reads consecutive elements. Drawn noise on rows whose length is a
// multiple of 4: the 4 consecutive elements 4 tid + i, whose normals are the 4 lanes of one
// Philox block (one Philox call, not 4 calls using one lane each).
__device__ __forceinline__ int64_t tile_element(int i, bool quad) {
  return quad ? static_cast<int64_t>(threadIdx.x) * kPerThread + i : static_cast<int64_t>(i) * kThreads + threadIdx.x;
}

// The normals of this thread's elements in a quad tile (see tile_element): Philox block
// (row * S + s0) / 4 + tid; nothing past the end of the row.
__device__ __forceinline__ void tile_normals(uint64_t seed, int64_t row, int64_t S, int64_t s0, float out[kPerThread]) {
  static_assert(kPerThread == 4, "one Philox block per thread");
  const int64_t first = s0 + static_cast<int64_t>(threadIdx.x) * kPerThread;
  if (first < S) philox_randn4(seed, static_cast<uint64_t>(row * S + first) / 4, out);
}

}  // namespace ddpm_fast
