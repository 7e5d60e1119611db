// Forward noising q_sample on CUDA: one pass, noise drawn in-kernel with Philox when asked.
#include <cuda_runtime.h>

#include "cuda_launch.h"
#include "cuda_types.cuh"
#include "noising_math.h"
#include "philox.h"

namespace ddpm_fast {
namespace {

template <typename X, typename F>
__global__ void q_sample_kernel(QSampleArgs a, int64_t tiles_per_row) {
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t s0 = (blockIdx.x % tiles_per_row) * kTile;
  const int64_t n = row / a.C, c = row % a.C;
  const int64_t t = a.t[n] < 0 ? 0 : (a.t[n] >= a.T ? a.T - 1 : a.t[n]);
  const F sa = a.sqrt_ab.get<F>(t), s1a = a.sqrt_1mab.get<F>(t);
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* noise = static_cast<const X*>(a.noise.ptr);
  const bool quad = !noise && a.S % 4 == 0;
  float drawn[kPerThread];
  if (quad) tile_normals(seed, row, a.S, s0, drawn);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t s = s0 + tile_element(i, quad);
    if (s >= a.S) break;
    F z;
    if (noise) {
      z = load_as<F>(noise, a.noise.at(n, c, s));
    } else {
      z = F(round_to<X>(quad ? drawn[i] : philox_randn(seed, static_cast<uint64_t>(row * a.S + s))));
      if (a.noise_out.ptr) store(static_cast<X*>(a.noise_out.ptr), a.noise_out.at(n, c, s), z);
    }
    F tgt;
    const F xt = q_sample_element<F>(sa, s1a, load_as<F>(x0, a.x0.at(n, c, s)), z, a.target_kind, &tgt);
    store(static_cast<X*>(a.x_t.ptr), a.x_t.at(n, c, s), xt);
    if (a.target.ptr) store(static_cast<X*>(a.target.ptr), a.target.at(n, c, s), tgt);
  }
}

}  // namespace

cudaError_t launch_q_sample_cuda(const QSampleArgs& a, DType x_dtype, cudaStream_t stream) {
  const int64_t tiles = (a.S + kTile - 1) / kTile;
  const int64_t blocks = a.N * a.C * tiles;
  if (blocks == 0) return cudaSuccess;
  dispatch_dtype(x_dtype, [&](auto tag) {
    using X = decltype(tag);
    using F = typename std::conditional<std::is_same<X, double>::value, double, float>::type;
    q_sample_kernel<X, F><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, tiles);
  });
  return cudaGetLastError();
}

}  // namespace ddpm_fast
