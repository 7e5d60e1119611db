// Loads and stores between storage dtypes and the compute type, and the dtype switch, for
// the CUDA kernels (plain CUDA: no torch headers, so `nvcc -c` checks them anywhere).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernel_args.h"

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

}  // namespace ddpm_fast
