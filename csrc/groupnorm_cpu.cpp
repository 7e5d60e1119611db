// GroupNorm + SiLU on the CPU, forward and backward, with the time embedding folded in:
//   h = x + bias_nc;  n = GroupNorm(h) * w + b;  n = n (1 + scale_nc) + shift_nc;  y = SiLU(n) + residual.
// One task per (n, group) (at::parallel_for): the group is gathered once into a contiguous
// float buffer (NCHW and channels_last read in place), its statistics are two-pass sums in
// float (double for double inputs) with per-chunk partials added in double, the affine and
// SiLU run in vectorised loops (an AVX2+FMA build of the hot loops is picked at run time),
// and the result is scattered to the output in its dtype and layout. The backward saves no
// per-element state: it recomputes x_hat from the saved mean/rstd and writes dx plus per-(n, c)
// sums from which the op wrapper forms dweight, dbias, dscale and dshift (a deterministic
// sum over n).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "torch_glue.h"

#define DDPM_INLINE inline __attribute__((always_inline))

namespace ddpm_fast {
namespace {

// Elements per partial sum (then added in double): bounds the rounding of long float sums.
constexpr int64_t kSumChunk = 2048;

struct GroupNormArgs {
  View3 x, y, res, dy, dx;
  // Per-channel (C,) and per-(n, c) (N, C) parameters in the compute type F, contiguous; null = absent.
  const void *w = nullptr, *b = nullptr, *bias_nc = nullptr, *scale_nc = nullptr, *shift_nc = nullptr;
  void *mean = nullptr, *rstd = nullptr;                         // (N, G), F
  void *sum_g = nullptr, *sum_g_xhat = nullptr, *dbias_nc = nullptr;  // (N, C), F
  int64_t N = 0, C = 0, G = 0, S = 0;
  double eps = 0;
  bool silu = true;
};

// exp for float: Cephes' polynomial after the range reduction x = k ln2 + r, branch-free so
// that loops calling it vectorise (within 2 ulp of expf over [-87, 88], clamped outside).
DDPM_INLINE float exp_fast(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

DDPM_INLINE double exp_fast(double x) { return std::exp(x); }

template <typename F>
DDPM_INLINE F sigmoid(F z) {
  return F(1) / (F(1) + exp_fast(-z));
}

// ---- the hot loops over one contiguous row of the group buffer (F = float or double)
template <typename F>
struct Rows {
  // mean and sum of squared deviations of h[0..m), two-pass.
  DDPM_INLINE static void moments(const F* h, int64_t m, F* mean_out, F* m2_out) {
    double total = 0;
    for (int64_t i0 = 0; i0 < m; i0 += kSumChunk) {
      const int64_t end = std::min(m, i0 + kSumChunk);
      F s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = i0; i < end; ++i) s += h[i];
      total += s;
    }
    const F mean = static_cast<F>(total / static_cast<double>(m));
    double total2 = 0;
    for (int64_t i0 = 0; i0 < m; i0 += kSumChunk) {
      const int64_t end = std::min(m, i0 + kSumChunk);
      F s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = i0; i < end; ++i) s += (h[i] - mean) * (h[i] - mean);
      total2 += s;
    }
    *mean_out = mean;
    *m2_out = static_cast<F>(total2);
  }

  // row <- act((row - mean) * a + b), act = SiLU or identity.
  DDPM_INLINE static void apply(F* row, int64_t len, F mean, F a, F b, bool silu) {
    if (silu) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const F z = (row[i] - mean) * a + b;
        row[i] = z * sigmoid(z);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) row[i] = (row[i] - mean) * a + b;
    }
  }

  // xh <- (xh - mean) * rstd (x_hat, in place).
  DDPM_INLINE static void normalize(F* xh, int64_t len, F mean, F rstd) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) xh[i] = (xh[i] - mean) * rstd;
  }

  // One channel of the backward's first pass: g <- dy * act'(x_hat * a + b); returns sum g and
  // sum g x_hat.
  DDPM_INLINE static void grad_sums(const F* xh, F* g, int64_t len, F a, F b, bool silu, double* sum_g,
                                    double* sum_gx) {
    double tg = 0, tgx = 0;
    for (int64_t i0 = 0; i0 < len; i0 += kSumChunk) {
      const int64_t end = std::min(len, i0 + kSumChunk);
      F sg = 0, sgx = 0;
      if (silu) {
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t i = i0; i < end; ++i) {
          const F z = xh[i] * a + b;
          const F sig = sigmoid(z);
          const F gi = g[i] * sig * (F(1) + z * (F(1) - sig));
          g[i] = gi;
          sg += gi;
          sgx += gi * xh[i];
        }
      } else {
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t i = i0; i < end; ++i) {
          sg += g[i];
          sgx += g[i] * xh[i];
        }
      }
      tg += sg, tgx += sgx;
    }
    *sum_g = tg, *sum_gx = tgx;
  }

  // One channel of the backward's second pass: g <- dx = rstd (a g - m1 - x_hat m2); returns sum dx.
  DDPM_INLINE static double grad_x(const F* xh, F* g, int64_t len, F rstd, F a, F m1, F m2) {
    double total = 0;
    for (int64_t i0 = 0; i0 < len; i0 += kSumChunk) {
      const int64_t end = std::min(len, i0 + kSumChunk);
      F s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = i0; i < end; ++i) {
        const F d = rstd * (a * g[i] - m1 - xh[i] * m2);
        g[i] = d;
        s += d;
      }
      total += s;
    }
    return total;
  }
};

// The float loops again, compiled for AVX2 + FMA and chosen at run time where the CPU has them.
#define DDPM_ROWS_FOR_TARGET(NAME, ATTR)                                                                     \
  struct NAME {                                                                                              \
    ATTR static void moments(const float* h, int64_t m, float* mean, float* m2) {                            \
      Rows<float>::moments(h, m, mean, m2);                                                                  \
    }                                                                                                        \
    ATTR static void apply(float* row, int64_t len, float mean, float a, float b, bool silu) {               \
      Rows<float>::apply(row, len, mean, a, b, silu);                                                        \
    }                                                                                                        \
    ATTR static void normalize(float* xh, int64_t len, float mean, float rstd) {                             \
      Rows<float>::normalize(xh, len, mean, rstd);                                                           \
    }                                                                                                        \
    ATTR static void grad_sums(const float* xh, float* g, int64_t len, float a, float b, bool silu,          \
                               double* sum_g, double* sum_gx) {                                              \
      Rows<float>::grad_sums(xh, g, len, a, b, silu, sum_g, sum_gx);                                         \
    }                                                                                                        \
    ATTR static double grad_x(const float* xh, float* g, int64_t len, float rstd, float a, float m1, float m2) { \
      return Rows<float>::grad_x(xh, g, len, rstd, a, m1, m2);                                               \
    }                                                                                                        \
  };
DDPM_ROWS_FOR_TARGET(RowsAvx2, __attribute__((target("avx2,fma"))) __attribute__((noinline)))
DDPM_ROWS_FOR_TARGET(RowsBase, __attribute__((noinline)))
#undef DDPM_ROWS_FOR_TARGET

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// ---- moving a group between the tensor (any strides, dtype X) and the buffer buf[c * S + s] (F)
template <typename X, typename F>
void gather(const View3& v, const X* src, int64_t n, int64_t c0, int64_t cpg, int64_t S, const F* add, F* buf) {
  const X* base = src + v.at(n, c0, 0);
  if (v.ss == 1) {
    for (int64_t c = 0; c < cpg; ++c) {
      const X* row = base + c * v.sc;
      const F shift = add ? add[c] : F(0);
      F* out = buf + c * S;
      for (int64_t s = 0; s < S; ++s) out[s] = static_cast<F>(row[s]) + shift;
    }
  } else {
    for (int64_t s = 0; s < S; ++s) {
      const X* col = base + s * v.ss;
      for (int64_t c = 0; c < cpg; ++c) buf[c * S + s] = static_cast<F>(col[c * v.sc]) + (add ? add[c] : F(0));
    }
  }
}

// dst = buf (+ residual), rounded once to X.
template <typename X, typename F>
void scatter(const View3& v, X* dst, const View3& rv, const X* res, int64_t n, int64_t c0, int64_t cpg, int64_t S,
             const F* buf) {
  X* base = dst + v.at(n, c0, 0);
  const X* rbase = res ? res + rv.at(n, c0, 0) : nullptr;
  if (v.ss == 1 && (!res || rv.ss == 1)) {
    for (int64_t c = 0; c < cpg; ++c) {
      X* row = base + c * v.sc;
      const F* in = buf + c * S;
      if (res) {
        const X* r = rbase + c * rv.sc;
        for (int64_t s = 0; s < S; ++s) row[s] = static_cast<X>(in[s] + static_cast<F>(r[s]));
      } else {
        for (int64_t s = 0; s < S; ++s) row[s] = static_cast<X>(in[s]);
      }
    }
  } else {
    for (int64_t s = 0; s < S; ++s) {
      X* col = base + s * v.ss;
      for (int64_t c = 0; c < cpg; ++c) {
        F val = buf[c * S + s];
        if (res) val += static_cast<F>(rbase[c * rv.sc + s * rv.ss]);
        col[c * v.sc] = static_cast<X>(val);
      }
    }
  }
}

template <typename F>
DDPM_INLINE F param(const void* p, int64_t i, F absent) {
  return p ? static_cast<const F*>(p)[i] : absent;
}

// ---- forward: one (n, group) per task
template <typename X, typename F, typename R>
void forward_kernel(const GroupNormArgs& a) {
  const int64_t cpg = a.C / a.G, S = a.S, M = cpg * S;
  const X* x = static_cast<const X*>(a.x.ptr);
  const X* res = static_cast<const X*>(a.res.ptr);
  X* y = static_cast<X*>(a.y.ptr);
  F* mean_out = static_cast<F*>(a.mean);
  F* rstd_out = static_cast<F*>(a.rstd);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1));
  at::parallel_for(0, a.N * a.G, grain, [&](int64_t begin, int64_t end) {
    std::vector<F> buf(M);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / a.G, c0 = (ng % a.G) * cpg;
      const F* bias_nc = a.bias_nc ? static_cast<const F*>(a.bias_nc) + n * a.C + c0 : nullptr;
      gather<X, F>(a.x, x, n, c0, cpg, S, bias_nc, buf.data());
      F mean, m2;
      R::moments(buf.data(), M, &mean, &m2);
      const F rstd = static_cast<F>(1) / std::sqrt(m2 / static_cast<F>(M) + static_cast<F>(a.eps));
      mean_out[ng] = mean, rstd_out[ng] = rstd;
      for (int64_t c = 0; c < cpg; ++c) {
        const int64_t cc = c0 + c, nc = n * a.C + cc;
        const F s1 = F(1) + param<F>(a.scale_nc, nc, F(0));
        const F ca = rstd * param<F>(a.w, cc, F(1)) * s1;
        const F cb = param<F>(a.b, cc, F(0)) * s1 + param<F>(a.shift_nc, nc, F(0));
        R::apply(buf.data() + c * S, S, mean, ca, cb, a.silu);
      }
      scatter<X, F>(a.y, y, a.res, res, n, c0, cpg, S, buf.data());
    }
  });
}

// ---- backward: one (n, group) per task
template <typename X, typename F, typename R>
void backward_kernel(const GroupNormArgs& a) {
  const int64_t cpg = a.C / a.G, S = a.S, M = cpg * S;
  const X* x = static_cast<const X*>(a.x.ptr);
  const X* dy = static_cast<const X*>(a.dy.ptr);
  X* dx = static_cast<X*>(a.dx.ptr);
  const F* mean_in = static_cast<const F*>(a.mean);
  const F* rstd_in = static_cast<const F*>(a.rstd);
  F* sum_g = static_cast<F*>(a.sum_g);
  F* sum_gx = static_cast<F*>(a.sum_g_xhat);
  F* dbias_nc = static_cast<F*>(a.dbias_nc);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(M, 1));
  at::parallel_for(0, a.N * a.G, grain, [&](int64_t begin, int64_t end) {
    std::vector<F> xh(M), g(M);
    std::vector<F> coef(cpg);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / a.G, c0 = (ng % a.G) * cpg;
      const F mean = mean_in[ng], rstd = rstd_in[ng];
      const F* bias_nc = a.bias_nc ? static_cast<const F*>(a.bias_nc) + n * a.C + c0 : nullptr;
      gather<X, F>(a.x, x, n, c0, cpg, S, bias_nc, xh.data());
      R::normalize(xh.data(), M, mean, rstd);
      gather<X, F>(a.dy, dy, n, c0, cpg, S, static_cast<const F*>(nullptr), g.data());
      double m1 = 0, m2 = 0;
      for (int64_t c = 0; c < cpg; ++c) {
        const int64_t cc = c0 + c, nc = n * a.C + cc;
        const F s1 = F(1) + param<F>(a.scale_nc, nc, F(0));
        const F w = param<F>(a.w, cc, F(1));
        const F cb = param<F>(a.b, cc, F(0)) * s1 + param<F>(a.shift_nc, nc, F(0));
        double sg, sgx;
        R::grad_sums(xh.data() + c * S, g.data() + c * S, S, w * s1, cb, a.silu, &sg, &sgx);
        sum_g[nc] = static_cast<F>(sg), sum_gx[nc] = static_cast<F>(sgx);
        coef[c] = w * s1;  // d n / d x_hat
        m1 += coef[c] * sg, m2 += coef[c] * sgx;
      }
      const F mean_g = static_cast<F>(m1 / static_cast<double>(M));
      const F mean_gx = static_cast<F>(m2 / static_cast<double>(M));
      for (int64_t c = 0; c < cpg; ++c) {
        const double total = R::grad_x(xh.data() + c * S, g.data() + c * S, S, rstd, coef[c], mean_g, mean_gx);
        if (dbias_nc) dbias_nc[n * a.C + c0 + c] = static_cast<F>(total);
      }
      scatter<X, F>(a.dx, dx, View3{}, static_cast<const X*>(nullptr), n, c0, cpg, S, g.data());
    }
  });
}

template <typename X, typename F>
void run(const GroupNormArgs& a, bool backward) {
  if constexpr (std::is_same_v<F, float>) {
    if (cpu_has_avx2_fma()) {
      backward ? backward_kernel<X, F, RowsAvx2>(a) : forward_kernel<X, F, RowsAvx2>(a);
      return;
    }
    backward ? backward_kernel<X, F, RowsBase>(a) : forward_kernel<X, F, RowsBase>(a);
  } else {
    backward ? backward_kernel<X, F, Rows<F>>(a) : forward_kernel<X, F, Rows<F>>(a);
  }
}

// ---- argument checks at the kernel boundary (the Python wrapper gives the friendly errors)
const void* param_ptr(const at::Tensor& x, const std::optional<at::Tensor>& p, at::ScalarType st,
                      std::initializer_list<int64_t> shape, const char* name) {
  if (!p.has_value()) return nullptr;
  check_same_device(x, *p, name);
  TORCH_CHECK(p->scalar_type() == st && p->is_contiguous() && p->sizes() == at::IntArrayRef(shape), "ddpm_fast: ",
              name, " must be a contiguous ", st, " tensor of shape ", at::IntArrayRef(shape), ", got ",
              p->scalar_type(), " ", p->sizes());
  return p->const_data_ptr();
}

void check_like(const at::Tensor& x, const at::Tensor& t, const char* name) {
  check_same_device(x, t, name);
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), "ddpm_fast: ", name, " must be a ",
              x.scalar_type(), " tensor of shape ", x.sizes(), ", got ", t.scalar_type(), " ", t.sizes());
}

void* stat_ptr(const at::Tensor& x, const at::Tensor& t, at::ScalarType st, int64_t rows, int64_t cols,
               const char* name) {
  check_same_device(x, t, name);
  TORCH_CHECK(t.scalar_type() == st && t.is_contiguous() && t.numel() == rows * cols, "ddpm_fast: ", name,
              " must be a contiguous ", st, " tensor of ", rows, " x ", cols, " elements");
  return t.data_ptr();
}

GroupNormArgs make_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_nc,
                        const std::optional<at::Tensor>& scale_nc, const std::optional<at::Tensor>& shift_nc,
                        int64_t num_groups, bool silu) {
  TORCH_CHECK(is_float_type(x.scalar_type()), "ddpm_fast: group_norm_silu needs a floating-point x");
  TORCH_CHECK(x.dim() == 3, "ddpm_fast: group_norm_silu kernels take (N, C, S) views");
  GroupNormArgs a;
  a.N = x.size(0), a.C = x.size(1), a.S = x.size(2), a.G = num_groups;
  TORCH_CHECK(a.G > 0 && a.C % a.G == 0, "ddpm_fast: ", a.C, " channels do not split into ", a.G, " groups");
  const at::ScalarType st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  a.w = param_ptr(x, weight, st, {a.C}, "weight");
  a.b = param_ptr(x, bias, st, {a.C}, "bias");
  a.bias_nc = param_ptr(x, bias_nc, st, {a.N, a.C}, "bias_nc");
  a.scale_nc = param_ptr(x, scale_nc, st, {a.N, a.C}, "scale_nc");
  a.shift_nc = param_ptr(x, shift_nc, st, {a.N, a.C}, "shift_nc");
  a.x = view3(x);
  a.silu = silu;
  return a;
}

at::ScalarType stat_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void group_norm_silu_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_nc,
                             const std::optional<at::Tensor>& scale_nc, const std::optional<at::Tensor>& shift_nc,
                             const std::optional<at::Tensor>& residual, int64_t num_groups, double eps, bool silu,
                             const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
  GroupNormArgs a = make_args(x, weight, bias, bias_nc, scale_nc, shift_nc, num_groups, silu);
  check_like(x, y, "y");
  if (residual.has_value()) {
    check_like(x, *residual, "residual");
    a.res = view3(*residual);
  }
  a.y = view3(y);
  a.mean = stat_ptr(x, mean, stat_type(x), a.N, a.G, "mean");
  a.rstd = stat_ptr(x, rstd, stat_type(x), a.N, a.G, "rstd");
  a.eps = eps;
  if (x.numel() == 0) return;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using X = decltype(tag);
    if constexpr (std::is_same_v<X, double>) run<X, double>(a, false);
    else run<X, float>(a, false);
  });
}

void group_norm_silu_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_nc,
                             const std::optional<at::Tensor>& scale_nc, const std::optional<at::Tensor>& shift_nc,
                             const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups, bool silu,
                             const at::Tensor& grad_x, const at::Tensor& sum_g, const at::Tensor& sum_g_xhat,
                             const std::optional<at::Tensor>& grad_bias_nc) {
  GroupNormArgs a = make_args(x, weight, bias, bias_nc, scale_nc, shift_nc, num_groups, silu);
  check_like(x, grad_y, "grad_y");
  check_like(x, grad_x, "grad_x");
  a.dy = view3(grad_y), a.dx = view3(grad_x);
  const at::ScalarType st = stat_type(x);
  a.mean = stat_ptr(x, mean, st, a.N, a.G, "mean");
  a.rstd = stat_ptr(x, rstd, st, a.N, a.G, "rstd");
  a.sum_g = stat_ptr(x, sum_g, st, a.N, a.C, "sum_g");
  a.sum_g_xhat = stat_ptr(x, sum_g_xhat, st, a.N, a.C, "sum_g_xhat");
  if (grad_bias_nc.has_value()) a.dbias_nc = stat_ptr(x, *grad_bias_nc, st, a.N, a.C, "grad_bias_nc");
  if (x.numel() == 0) return;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using X = decltype(tag);
    if constexpr (std::is_same_v<X, double>) run<X, double>(a, true);
    else run<X, float>(a, true);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast_C, CPU, m) {
  m.impl("group_norm_silu_fwd", &group_norm_silu_fwd_cpu);
  m.impl("group_norm_silu_bwd", &group_norm_silu_bwd_cpu);
}

}  // namespace ddpm_fast
