// One reverse step (DDPM ancestral or DDIM) on CUDA, fused into one pass; with abs_x0 set it
// runs phase 1 of dynamic thresholding (|x0| only). The arithmetic is step_math.h's.
#include <cuda_runtime.h>

#include "cuda_launch.h"
#include "cuda_types.cuh"
#include "philox.h"
#include "step_math.h"

namespace ddpm_fast {
namespace {

template <typename M, typename X, typename F>
__global__ void posterior_kernel(PosteriorArgs a, int64_t tiles_per_row) {
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t s0 = (blockIdx.x % tiles_per_row) * kTile;
  const int64_t n = row / a.C, c = row % a.C;
  const StepCoefs<F> k = step_coefs<F>(a, n);
  const F ts = a.thresh_scale ? static_cast<const F*>(a.thresh_scale)[n] : F(1);
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t var_offset = a.mo_var + (a.guidance ? a.mo_half : 0);
  const M* mo = static_cast<const M*>(a.model_output.ptr);
  const X* sample = static_cast<const X*>(a.sample.ptr);
  const bool quad = k.noisy && !a.noise.ptr && !a.abs_x0.ptr && a.S % 4 == 0;
  float drawn[kPerThread];
  if (quad) tile_normals(seed, row, a.S, s0, drawn);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t s = s0 + tile_element(i, quad);
    if (s >= a.S) break;
    const int64_t m = a.model_output.at(n, c, s);
    F out = load_as<F>(mo, m);
    if (a.guidance) out = out + F(a.guidance_scale) * (load_as<F>(mo, m + a.mo_half) - out);
    const F x = load_as<F>(sample, a.sample.at(n, c, s));
    const F g = a.guide.ptr ? load_as<F>(static_cast<const X*>(a.guide.ptr), a.guide.at(n, c, s)) : F(0);
    if (a.abs_x0.ptr) {
      const F x0 = predict_x0<F>(out, x, k, a.pred);
      static_cast<F*>(a.abs_x0.ptr)[a.abs_x0.at(n, c, s)] = x0 < F(0) ? -x0 : x0;
      continue;
    }
    const F variance = a.has_variance ? load_as<F>(mo, m + var_offset) : F(0);
    F z = F(0);
    if (k.noisy) {
      z = a.noise.ptr ? load_as<F>(static_cast<const X*>(a.noise.ptr), a.noise.at(n, c, s))
                      : F(round_to<X>(quad ? drawn[i] : philox_randn(seed, static_cast<uint64_t>(row * a.S + s))));
    }
    F x0;
    const F p = step_element<F>(a, k, out, variance, x, z, ts, &x0, g);
    store(static_cast<X*>(a.prev.ptr), a.prev.at(n, c, s), p);
    if (a.pred_x0.ptr) store(static_cast<X*>(a.pred_x0.ptr), a.pred_x0.at(n, c, s), x0);
  }
}

}  // namespace

cudaError_t launch_posterior_cuda(const PosteriorArgs& a, DType mo_dtype, DType x_dtype, cudaStream_t stream) {
  const int64_t tiles = (a.S + kTile - 1) / kTile;
  const int64_t blocks = a.N * a.C * tiles;
  if (blocks == 0) return cudaSuccess;
  dispatch_dtype(x_dtype, [&](auto xtag) {
    using X = decltype(xtag);
    dispatch_dtype(mo_dtype, [&](auto mtag) {
      using M = decltype(mtag);
      using F = typename std::conditional<std::is_same<X, double>::value, double, float>::type;
      posterior_kernel<M, X, F><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, tiles);
    });
  });
  return cudaGetLastError();
}

}  // namespace ddpm_fast
