// One planned linear solver step on CUDA, fused into one pass (solver_step.h's arithmetic); with
// abs_d0 set it runs phase 1 of dynamic thresholding (|D_0| only). The step index is read on the
// device (a replayed CUDA graph steps through the plan), and so are the step's coefficients: each
// thread reads the same few float64 values of the plan (L1 broadcasts) into registers. The loops
// over slots and writes run to their compile-time maxima with uniform guards, so every array stays
// in registers (no local memory).
#include <cuda_runtime.h>

#include "cuda_types.cuh"
#include "philox.h"
#include "solver_step_cuda.h"

namespace ddpm_fast {
namespace {

template <typename M, typename X, typename F>
__global__ void solver_step_kernel(SolverStepArgs a, int64_t tiles_per_row) {
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t s0 = (blockIdx.x % tiles_per_row) * kTile;
  const int64_t n = row / a.C, c = row % a.C;
  const SolverCoefs<F> k = solver_coefs<F>(a);
  const F ts = a.thresh_scale ? static_cast<const F*>(a.thresh_scale)[n] : F(1);
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const bool phase1 = a.abs_d0.ptr != nullptr;
  const bool draw = !phase1 && !a.noise.ptr && a.seed;
  const bool has_z = !phase1 && (a.noise.ptr || a.seed);
  const bool quad = draw && a.S % 4 == 0;
  const M* mo = static_cast<const M*>(a.model_output.ptr);
  const X* xs = static_cast<const X*>(a.x.ptr);
  X* hist = static_cast<X*>(a.history.ptr);
  float drawn[kPerThread];
  if (quad) tile_normals(seed, row, a.S, s0, drawn);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t s = s0 + tile_element(i, quad);
    if (s >= a.S) break;
    const int64_t m = a.model_output.at(n, c, s);
    F out = load_as<F>(mo, m);
    if (a.guidance) out = out + F(a.guidance_scale) * (load_as<F>(mo, m + a.mo_half) - out);
    const F x = load_as<F>(xs, a.x.at(n, c, s));
    if (phase1) {
      const F d0 = solver_d0(k, x, out);
      static_cast<F*>(a.abs_d0.ptr)[a.abs_d0.at(n, c, s)] = d0 < F(0) ? -d0 : d0;
      continue;
    }
    F z = F(0);
    if (a.noise.ptr) {
      z = load_as<F>(static_cast<const X*>(a.noise.ptr), a.noise.at(n, c, s));
    } else if (draw) {
      z = F(round_to<X>(quad ? drawn[i] : philox_randn(seed, static_cast<uint64_t>(row * a.S + s))));
    }
    const int64_t h_at = a.history.at(n, c, s);
    F h[kSolverMaxSlots];
#pragma unroll
    for (int r = 0; r < kSolverMaxSlots; ++r) {
      h[r] = r < a.R && k.reads[r] ? load_as<F>(hist, h_at + r * a.hist_slot) : F(0);  // unused slots: not read
    }
    F written[kSolverMaxWrites];
    const F g = a.guide.ptr ? load_as<F>(static_cast<const X*>(a.guide.ptr), a.guide.at(n, c, s)) : F(0);
    const F next = solver_element<F>(a, k, x, out, z, has_z, h, ts, written, g);
    store(static_cast<X*>(a.x_next.ptr), a.x_next.at(n, c, s), next);
#pragma unroll
    for (int w = 0; w < kSolverMaxWrites; ++w) {
      if (w < a.W && k.slot[w] < a.R) store(hist, h_at + k.slot[w] * a.hist_slot, written[w]);
    }
  }
}

}  // namespace

cudaError_t launch_solver_step_cuda(const SolverStepArgs& a, DType mo_dtype, DType x_dtype, cudaStream_t stream) {
  const int64_t tiles = (a.S + kTile - 1) / kTile;
  const int64_t blocks = a.N * a.C * tiles;
  if (blocks == 0) return cudaSuccess;
  dispatch_dtype(x_dtype, [&](auto xtag) {
    using X = decltype(xtag);
    dispatch_dtype(mo_dtype, [&](auto mtag) {
      using M = decltype(mtag);
      using F = typename std::conditional<std::is_same<X, double>::value, double, float>::type;
      solver_step_kernel<M, X, F><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, tiles);
    });
  });
  return cudaGetLastError();
}

}  // namespace ddpm_fast
