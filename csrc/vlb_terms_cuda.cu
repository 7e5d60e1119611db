// The variational bound's per-sample terms on CUDA (ops/vlb_terms.py), forward and backward, with the
// maths of csrc/vlb_terms_cpu.cpp: where t > 0 the KL in fp32 (float64 for float64 inputs), its
// variance part f(d) = d - 1 + exp(-d) from its series for |d| < 0.5; where t == 0 the discretized
// Gaussian decoder in float64, its CDF in log space (erfc, and the asymptotic series past -30 sigma).
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

constexpr float kVarFloor = 1e-20f;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;

struct VlbRow {
  double c1, c2, lvq, lvp, D, a, b, dfix;
};

__device__ __forceinline__ VlbRow vlb_row(const VlbTermsArgs& a, int64_t n) {
  const int64_t tn = a.t[n];
  const int64_t o = (tn < 0 ? 0 : (tn >= a.T ? a.T - 1 : tn)) * kVlbTableCols;
  const Table& k = a.table;
  return VlbRow{k.get<double>(o),     k.get<double>(o + 1), k.get<double>(o + 2), k.get<double>(o + 3),
                k.get<double>(o + 4), k.get<double>(o + 5), k.get<double>(o + 6), k.get<double>(o + 7)};
}

// ---------------------------------------------------------------- fp32 KL (t > 0)
struct KlRowF {
  float c1, a, b, lvq, lvp, D_half, dfix;
};

__device__ __forceinline__ KlRowF kl_row(const VlbRow& r) {
  return KlRowF{float(r.c1), float(r.a), float(r.b), float(r.lvq), float(r.lvp), float(0.5 * r.D), float(r.dfix)};
}

// std::min(std::max(x, -1), 1), NaN passing through as it does there.
__device__ __forceinline__ float clamp_unit(float x) {
  const float lo = x < -1.0f ? -1.0f : x;
  return 1.0f < lo ? 1.0f : lo;
}

// f(d) = d - 1 + exp(-d) >= 0: its Taylor series d^2 (1/2 - d/6 + ...) for |d| < 0.5, else directly.
__device__ __forceinline__ float kl_var_term(float d) {
  float s = -2.7557319e-7f;  // -1/9!
  s = s * d + 2.4801587e-5f;
  s = s * d - 1.9841270e-4f;
  s = s * d + 1.3888889e-3f;
  s = s * d - 8.3333333e-3f;
  s = s * d + 4.1666667e-2f;
  s = s * d - 1.6666667e-1f;
  s = s * d + 0.5f;
  const float series = d * d * s;
  const float direct = (d - 1.0f) + expf(-d);
  return (d < 0.5f && d > -0.5f) ? series : direct;
}

// (d, lvp) of one element: the log-variance gap to the true posterior and the model log-variance.
__device__ __forceinline__ void kl_logvar(const KlRowF& r, int var, float v, float* d, float* lvp) {
  if (var == kVlbVarLearnedRange) {
    *d = (v + 1.0f) * r.D_half;
    *lvp = r.lvq + *d;
  } else if (var == kVlbVarLearned) {
    *lvp = logf(v < kVarFloor ? kVarFloor : v);
    *d = *lvp - r.lvq;
  } else {
    *d = r.dfix;
    *lvp = r.lvp;
  }
}

__device__ __forceinline__ float kl_value(const KlRowF& r, int var, bool clip, float out, float v, float x0, float xt) {
  float x0p = r.a * xt + r.b * out;
  if (clip) x0p = clamp_unit(x0p);
  const float diff = r.c1 * (x0 - x0p);
  float d, lvp;
  kl_logvar(r, var, v, &d, &lvp);
  return 0.5f * (kl_var_term(d) + diff * diff * expf(-lvp));
}

// d KL / d out (mean channel) and d KL / d v (variance channel), times scale.
__device__ __forceinline__ void kl_grads(const KlRowF& r, int var, bool clip, bool mean_grad, float scale, float out,
                                         float v, float x0, float xt, float* g_mean, float* g_var) {
  const float raw = r.a * xt + r.b * out;
  float x0p = raw, mask = 1.0f;
  if (clip) {
    x0p = clamp_unit(raw);
    mask = (raw >= -1.0f && raw <= 1.0f) ? 1.0f : 0.0f;
  }
  const float diff = r.c1 * (x0 - x0p);
  float d, lvp;
  kl_logvar(r, var, v, &d, &lvp);
  const float e = expf(-lvp);
  // dKL/dmu_p = -diff e; dmu_p/dout = c1 b (inside the clip)
  *g_mean = mean_grad ? -(diff * e) * (r.c1 * r.b) * mask * scale : 0.0f;
  *g_var = 0.0f;
  if (var != kVlbVarFixed) {
    // dKL/dlvp = 0.5 (1 - exp(-d) - diff^2 e), 1 - exp(-d) = d - f(d)
    const float dlvp = 0.5f * ((d - kl_var_term(d)) - diff * diff * e);
    const float dv = var == kVlbVarLearnedRange ? r.D_half : (v > kVarFloor ? 1.0f / v : 0.0f);
    *g_var = dlvp * dv * scale;
  }
}

// ---------------------------------------------------------------- float64 elements (decoder, f64 KL)
// log Phi(z): log(erfc(-z / sqrt 2) / 2) while erfc is a normal double, else the asymptotic series.
__device__ __forceinline__ double log_ndtr(double z) {
  if (z > 6.0) return log1p(-0.5 * erfc(z * 0.70710678118654752440));
  if (z > -30.0) return log(0.5 * erfc(-z * 0.70710678118654752440));
  const double w = 1.0 / (z * z);
  const double series = 1.0 + w * (-1.0 + w * (3.0 + w * (-15.0 + w * (105.0 - w * 945.0))));
  return -0.5 * z * z - log(-z) - kLogSqrt2Pi + log(series);
}

struct BinNll {
  double nll, d_m, d_ls;
};

// -log P(bin of x) under N(m, exp(ls)^2) and its derivatives in m and ls (vlb.log_bin_probability).
__device__ __forceinline__ BinNll bin_nll(double x, double m, double ls) {
  const double inv_s = exp(-ls);
  const double zb = (x - m + 1.0 / 255.0) * inv_s, za = (x - m - 1.0 / 255.0) * inv_s;
  bool has_a = true, has_b = true;
  double logp;
  if (x < -0.999) {
    logp = log_ndtr(zb), has_a = false;
  } else if (x > 0.999) {
    logp = log_ndtr(-za), has_b = false;
  } else {
    const double hi = za > 0 ? -za : zb, lo = za > 0 ? -zb : za;
    const double lh = log_ndtr(hi), ll = log_ndtr(lo);
    const double gap = ll - lh;
    logp = lh + log(-expm1(gap < 0.0 ? gap : 0.0));
  }
  // d log P / dz at each end: phi(z) / P, in log space
  const double rb = has_b ? exp(-0.5 * zb * zb - kLogSqrt2Pi - logp) : 0.0;
  const double ra = has_a ? exp(-0.5 * za * za - kLogSqrt2Pi - logp) : 0.0;
  return BinNll{-logp, (rb - ra) * inv_s, rb * zb - ra * za};
}

struct Element {
  double value, g_mean, g_var;  // the term (nats) and its derivatives in the mean and variance outputs
};

__device__ __forceinline__ Element element64(const VlbRow& r, int var, bool clip, bool decoder, double out, double v,
                                             double x0, double xt) {
  const double raw = r.a * xt + r.b * out;
  double x0p = raw;
  if (clip) x0p = raw < -1.0 ? -1.0 : (1.0 < raw ? 1.0 : raw);
  const double mask = (!clip || (raw >= -1.0 && raw <= 1.0)) ? 1.0 : 0.0;
  double d, lvp, dv;
  if (var == kVlbVarLearnedRange) {
    d = 0.5 * (v + 1.0) * r.D, lvp = r.lvq + d, dv = 0.5 * r.D;
  } else if (var == kVlbVarLearned) {
    lvp = log(v < 1e-20 ? 1e-20 : v), d = lvp - r.lvq, dv = v > 1e-20 ? 1.0 / v : 0.0;
  } else {
    d = r.dfix, lvp = r.lvp, dv = 0.0;
  }
  if (decoder) {
    const double m = r.c1 * x0p + r.c2 * xt;
    const BinNll b = bin_nll(x0, m, 0.5 * lvp);
    return Element{b.nll, b.d_m * r.c1 * r.b * mask, 0.5 * b.d_ls * dv};
  }
  const double diff = r.c1 * (x0 - x0p);
  const double e = exp(-lvp);
  const double f =
      (d < 0.5 && d > -0.5)
          ? d * d *
                (0.5 + d * (-1.0 / 6 + d * (1.0 / 24 + d * (-1.0 / 120 + d * (1.0 / 720 + d * (-1.0 / 5040 + d * (1.0 / 40320 + d * (-1.0 / 362880 + d / 3628800))))))))
          : (d - 1.0) + exp(-d);
  return Element{0.5 * (f + diff * diff * e), -(diff * e) * r.c1 * r.b * mask, 0.5 * ((d - f) - diff * diff * e) * dv};
}

// ---------------------------------------------------------------- kernels
// partial[blockIdx.x] = the sum (nats, float64) of the terms of the block's tile of one (n, c) row.
template <typename X>
__global__ void vlb_terms_fwd_kernel(VlbTermsArgs a, int64_t tiles_per_row, double* partial) {
  __shared__ double sums[kThreads];
  constexpr bool kF64 = std::is_same<X, double>::value;
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t s0 = (blockIdx.x % tiles_per_row) * kTile;
  const int64_t n = row / a.C, c = row % a.C;
  const VlbRow r = vlb_row(a, n);
  const bool decoder = a.t[n] <= 0;
  const bool has_var = a.var != kVlbVarFixed;
  const X* mo = static_cast<const X*>(a.mo.ptr);
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* xt = static_cast<const X*>(a.xt.ptr);
  double sum = 0.0;
  if (!kF64 && !decoder) {
    const KlRowF k = kl_row(r);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t s = s0 + tile_element(i, false);
      if (s >= a.S) break;
      const int64_t m = a.mo.at(n, c, s);
      const float v = has_var ? load_as<float>(mo, m + a.mo_var) : 0.0f;
      sum += static_cast<double>(kl_value(k, a.var, a.clip, load_as<float>(mo, m), v,
                                          load_as<float>(x0, a.x0.at(n, c, s)), load_as<float>(xt, a.xt.at(n, c, s))));
    }
  } else {
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t s = s0 + tile_element(i, false);
      if (s >= a.S) break;
      const int64_t m = a.mo.at(n, c, s);
      const double v = has_var ? load_as<double>(mo, m + a.mo_var) : 0.0;
      sum += element64(r, a.var, a.clip, decoder, load_as<double>(mo, m), v, load_as<double>(x0, a.x0.at(n, c, s)),
                       load_as<double>(xt, a.xt.at(n, c, s)))
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
  const VlbRow r = vlb_row(a, n);
  const bool decoder = a.t[n] <= 0;
  const bool has_var = a.var != kVlbVarFixed;
  const double scale = a.g[n] * a.per;
  const X* mo = static_cast<const X*>(a.mo.ptr);
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* xt = static_cast<const X*>(a.xt.ptr);
  X* grad = static_cast<X*>(a.grad.ptr);
  if (!kF64 && !decoder) {
    const KlRowF k = kl_row(r);
    const float fscale = static_cast<float>(scale);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t s = s0 + tile_element(i, false);
      if (s >= a.S) break;
      const int64_t m = a.mo.at(n, c, s);
      const float v = has_var ? load_as<float>(mo, m + a.mo_var) : 0.0f;
      float gm, gv;
      kl_grads(k, a.var, a.clip, a.mean_grad, fscale, load_as<float>(mo, m), v, load_as<float>(x0, a.x0.at(n, c, s)),
               load_as<float>(xt, a.xt.at(n, c, s)), &gm, &gv);
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
    const Element e = element64(r, a.var, a.clip, decoder, load_as<double>(mo, m), v,
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
