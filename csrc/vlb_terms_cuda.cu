// The variational bound's per-sample terms on CUDA (ops/vlb_terms.py), forward and backward, with the
// per-element maths of vlb_terms_math.h (shared with the CPU kernels): where t > 0 the KL in fp32
// (float64 for float64 inputs), its exp the device's expf; where t == 0 the discretized Gaussian decoder
// in float64.
//
// A block covers kTile elements of one (n, c) row, so the decoder/KL choice is uniform in a block.
// Forward: each thread sums its elements' terms in float64, the block adds the 256 sums in a fixed
// tree (shared memory) into one partial per (row, tile), and a second kernel adds a sample's partials
// in order: the same bits on every run (no float atomics). Backward: elementwise, no reduction.
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda_types.cuh"
#include "vlb_terms_cuda.cuh"

namespace ddpm_fast {
namespace {

static_assert(kTile == 1024, "vlb_terms_partials (vlb_terms_cuda.cuh) assumes 1024-element tiles");

// The KL's exp on the device: the math library's expf.
using Exp = vlb::LibExp;

// ---------------------------------------------------------------- kernels
// partial[blockIdx.x] = the sum (nats, float64) of the terms of the block's tile of one (n, c) row.
template <typename X>
__global__ void vlb_terms_fwd_kernel(VlbTermsArgs a, int64_t tiles_per_row, double* partial) {
  __shared__ double sums[kThreads];
  constexpr bool kF64 = std::is_same<X, double>::value;
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t s0 = (blockIdx.x % tiles_per_row) * kTile;
  const int64_t n = row / a.C, c = row % a.C;
  const vlb::Row r = vlb::table_row(a, n);
  const bool decoder = a.t[n] <= 0;
  const bool has_var = a.var != kVlbVarFixed;
  const X* mo = static_cast<const X*>(a.mo.ptr);
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* xt = static_cast<const X*>(a.xt.ptr);
  double sum = 0.0;
  if (!kF64 && !decoder) {
    const vlb::KlRow k = vlb::kl_row(r);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t s = s0 + tile_element(i, false);
      if (s >= a.S) break;
      const int64_t m = a.mo.at(n, c, s);
      const float v = has_var ? load_as<float>(mo, m + a.mo_var) : 0.0f;
      sum += static_cast<double>(vlb::kl_value<Exp>(k, a.var, a.clip, load_as<float>(mo, m), v,
                                                    load_as<float>(x0, a.x0.at(n, c, s)),
                                                    load_as<float>(xt, a.xt.at(n, c, s))));
    }
  } else {
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t s = s0 + tile_element(i, false);
      if (s >= a.S) break;
      const int64_t m = a.mo.at(n, c, s);
      const double v = has_var ? load_as<double>(mo, m + a.mo_var) : 0.0;
      sum += vlb::element64(r, a.var, a.clip, decoder, load_as<double>(mo, m), v,
                            load_as<double>(x0, a.x0.at(n, c, s)), load_as<double>(xt, a.xt.at(n, c, s)))
                 .value;
    }
  }
  // a fixed tree over the block's threads: deterministic
  sums[threadIdx.x] = sum;
  __syncthreads();
#pragma unroll
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w) sums[threadIdx.x] += sums[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sums[0];
}

// terms[n] = per x the sum of sample n's partials, in order (its rows, each row's tiles).
template <typename R>
__global__ void vlb_terms_sum_kernel(const double* partial, int64_t per_sample, int64_t N, double per, R* terms) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= N) return;
  double s = 0.0;
  for (int64_t k = 0; k < per_sample; ++k) s += partial[n * per_sample + k];
  terms[n] = static_cast<R>(s * per);
}

// grad = g[n] x per x the element's derivatives: mean channels (0 where !mean_grad) and variance channels.
template <typename X>
__global__ void vlb_terms_bwd_kernel(VlbTermsArgs a, int64_t tiles_per_row) {
  constexpr bool kF64 = std::is_same<X, double>::value;
  using F = typename std::conditional<kF64, double, float>::type;
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t s0 = (blockIdx.x % tiles_per_row) * kTile;
  const int64_t n = row / a.C, c = row % a.C;
  const vlb::Row r = vlb::table_row(a, n);
  const bool decoder = a.t[n] <= 0;
  const bool has_var = a.var != kVlbVarFixed;
  const double scale = a.g[n] * a.per;
  const X* mo = static_cast<const X*>(a.mo.ptr);
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* xt = static_cast<const X*>(a.xt.ptr);
  X* grad = static_cast<X*>(a.grad.ptr);
  if (!kF64 && !decoder) {
    const vlb::KlRow k = vlb::kl_row(r);
    const float fscale = static_cast<float>(scale);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t s = s0 + tile_element(i, false);
      if (s >= a.S) break;
      const int64_t m = a.mo.at(n, c, s);
      const float v = has_var ? load_as<float>(mo, m + a.mo_var) : 0.0f;
      float gm, gv;
      vlb::kl_grads<Exp>(k, a.var, a.clip, a.mean_grad, fscale, load_as<float>(mo, m), v,
                         load_as<float>(x0, a.x0.at(n, c, s)), load_as<float>(xt, a.xt.at(n, c, s)), &gm, &gv);
      const int64_t o = a.grad.at(n, c, s);
      store(grad, o, static_cast<F>(gm));
      if (has_var) store(grad, o + a.grad_var, static_cast<F>(gv));
    }
    return;
  }
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t s = s0 + tile_element(i, false);
    if (s >= a.S) break;
    const int64_t m = a.mo.at(n, c, s);
    const double v = has_var ? load_as<double>(mo, m + a.mo_var) : 0.0;
    const vlb::Element e = vlb::element64(r, a.var, a.clip, decoder, load_as<double>(mo, m), v,
                                          load_as<double>(x0, a.x0.at(n, c, s)), load_as<double>(xt, a.xt.at(n, c, s)));
    const int64_t o = a.grad.at(n, c, s);
    store(grad, o, static_cast<F>(a.mean_grad ? e.g_mean * scale : 0.0));
    if (has_var) store(grad, o + a.grad_var, static_cast<F>(e.g_var * scale));
  }
}

}  // namespace

cudaError_t launch_vlb_terms_fwd_cuda(const VlbTermsArgs& a, DType dtype, double* partial, void* terms, bool terms_f64,
                                      cudaStream_t stream) {
  const int64_t tiles = (a.S + kTile - 1) / kTile;
  const int64_t blocks = a.N * a.C * tiles;
  if (a.N == 0) return cudaSuccess;
  if (blocks > 0) {
    dispatch_dtype(dtype, [&](auto xtag) {
      using X = decltype(xtag);
      vlb_terms_fwd_kernel<X><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, tiles, partial);
    });
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t sum_blocks = (a.N + kThreads - 1) / kThreads;
  auto sum = [&](auto rtag) {
    using R = decltype(rtag);
    vlb_terms_sum_kernel<R><<<static_cast<unsigned>(sum_blocks), kThreads, 0, stream>>>(
        partial, a.C * tiles, a.N, a.per, static_cast<R*>(terms));
  };
  if (terms_f64) sum(double{});
  else sum(float{});
  return cudaGetLastError();
}

cudaError_t launch_vlb_terms_bwd_cuda(const VlbTermsArgs& a, DType dtype, cudaStream_t stream) {
  const int64_t tiles = (a.S + kTile - 1) / kTile;
  const int64_t blocks = a.N * a.C * tiles;
  if (blocks == 0) return cudaSuccess;
  dispatch_dtype(dtype, [&](auto xtag) {
    using X = decltype(xtag);
    vlb_terms_bwd_kernel<X><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, tiles);
  });
  return cudaGetLastError();
}

}  // namespace ddpm_fast
