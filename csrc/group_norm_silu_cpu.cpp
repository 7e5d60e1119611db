// GroupNorm + SiLU on the CPU, forward and backward, with the time embedding folded in:
//   h = x + bias_nc;  n = GroupNorm(h) * w + b;  n = n (1 + scale_nc) + shift_nc;  y = SiLU(n) + residual.
// Channels_last inputs (channels contiguous in x, y/dy, dx): forward_cl_kernel / backward_cl_kernel,
// vectorised along C over fixed chunks of pixels (run_cl_passes). Otherwise one task per
// (n, group) (at::parallel_for): NCHW rows are read in place (other strides are gathered into a
// contiguous float buffer, double for double inputs), the statistics are two passes (mean, then
// squared deviations) with per-chunk partials added in double, and the affine + SiLU (+ residual)
// loop writes the output rows in x's dtype. The backward recomputes x_hat from the saved mean/rstd
// and writes dx plus per-(n, c) sums of g = dL/dn, g x_hat and dx, from which the op wrapper forms
// dweight, dbias (a deterministic sum over n), dscale, dshift and d bias_nc.
// Float rows run hand-vectorised code (RowsSimd, simd.h) built for AVX-512, AVX2+FMA and baseline
// x86-64, the active ISA chosen at run time (cpu_isa.h); bfloat16 rows the same code (widened on
// load, rounded once on store); double and half rows run the portable loops of Rows<F>.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "simd.h"
#include "torch_glue.h"

#define DDPM_INLINE inline __attribute__((always_inline))

namespace ddpm_fast {
namespace {

// NCHW rows of at most this many positions run a group as one block (backward_kernel, and
// forward_kernel up to kForwardBlockRows), its coefficients looked up by channel (ByChannel):
// shorter than one unrolled step of the AVX-512 activation loops (4 x 16), a row of its own would
// run them one vector at a time (each exp chain waiting on the last) and pay a call and a tail per
// row. In the backward, from 8x8 up the rows' own loops measured faster (their coefficients are
// scalars: 32x256x8x8 ~1.1x, 10x10 to 14x14 1.05-1.2x, ad hoc, 1 thread).
constexpr int64_t kBlockRows = 63;
// The forward's block measured faster up to 15x15 (ad hoc, 1 thread, rows: 64x256x8x8 740 -> 660
// us, 9x9 and 10x10 ~1710 -> ~900, 12x12 770 -> 665, 15x15 630 -> 530) and slower at 16x16 (1050
// -> 1350) and 32x32 (68 -> 92 at batch 1).
constexpr int64_t kForwardBlockRows = 255;

// Elements per parallel task, at least (at::parallel_for's grain: the NCHW kernels' groups; the
// channels_last kernels' chunks take twice this, about one chunk). Batch-1 calls of 8K-16K elements
// then use a second thread, whose start costs less than half their work: ad hoc, 2 threads,
// 1x256x8x8 forward 12.9 -> 9.7 us and 1x128x8x8 backward 11.1 -> 8.5 us (from 16384 and 8192).
constexpr int64_t kTaskElems = 4096;

// Per-channel coefficients of a block of a group's short rows (S positions each): element i's is
// v[chan[i]], chan[i] = i / S (one array per call). v holds the cpg values and kChannelPad more
// (unused), so that a vector loads the V channels from its first element's at once and picks
// each lane's from them (RowsSimd::coef: one vpermps), where per-element copies filled for every
// group cost more than the block's arithmetic.
template <typename F>
struct ByChannel {
  const F* v;
  const uint32_t* chan;
};
constexpr int64_t kChannelPad = 16;

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

// exp for the portable float rows (half-precision tensors): simd::exp's arithmetic for one
// float, branch-free so that loops calling it vectorise (within ~1 ulp of exp over [-87, 87]; clamped outside, which
// changes SiLU and its derivative by < 1e-36).
DDPM_INLINE float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 87.0f);
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = simd::kExpP[0];
  for (int j = 1; j < 5; ++j) p = p * r + simd::kExpP[j];
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

// Asks for the cache lines of a row ahead of its use.
template <typename X>
DDPM_INLINE void prefetch_row(const X* row, int64_t len) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = len * static_cast<int64_t>(sizeof(X));
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset);
}

// ---- a row function of R over many rows in one call (so that the ISA builds loop inside their
// target code: one call per row cost more than a short row's arithmetic). The channels_last passes
// with an activation run pixel by pixel (apply_ch, grad_elems, dx_elems), so that the rows stream (register-
// blocked columns of channels measured 5-10% slower, waiting on strided misses); the NCHW backward
// runs a group's channels (norm_grad_sums, norm_grad_x).
template <typename R, typename F>
struct RowLoops {
  // next (or null): the same pixels of the next image (stride ss), asked into cache row by row as
  // this image's are computed, so that its first pass does not wait on L3 / DRAM (the NCHW kernel
  // prefetches the next group's rows likewise).
  template <typename X>
  DDPM_INLINE static void px_apply(const X* src, int64_t ss, int64_t cnt, int64_t C, const F* d, const F* a,
                                   const F* b, bool silu, const X* res, int64_t rss, X* out, int64_t oss,
                                   const X* next) {
    for (int64_t p = 0; p < cnt; ++p) {
      if (next) prefetch_row(next + p * ss, C);
      R::apply_ch(src + p * ss, C, d, a, b, silu, res ? res + p * rss : nullptr, out + p * oss);
    }
  }

  // The backward's passes (pixel strides xs, dys, os; g at pixel p is g + p C).
  template <typename X>
  DDPM_INLINE static void px_grad(const X* src, int64_t xs, const X* dy, int64_t dys, int64_t cnt, int64_t C,
                                  const F* d, const F* r, const F* A, const F* B, bool silu, F* g, F* acc_g,
                                  F* acc_gx) {
    for (int64_t p = 0; p < cnt; ++p)
      R::template grad_elems<true>(src + p * xs, dy + p * dys, C, d, r, A, B, silu, g + p * C, acc_g, acc_gx);
  }
  template <typename X>
  DDPM_INLINE static void px_dx(const X* src, int64_t xs, const F* g, int64_t cnt, int64_t C, const F* d, const F* r,
                                const F* A, const F* m1, const F* m2, X* out, int64_t os, F* acc) {
    for (int64_t p = 0; p < cnt; ++p)
      R::template dx_elems<true>(src + p * xs, g + p * C, C, d, r, A, m1, m2, out + p * os, acc);
  }

  // The NCHW backward's passes over a group's cpg rows of S: row c of x at src + c xs, of dy at
  // dy + c dys, of dx at out + c os; its g and x_hat (portable rows) at g + c S, xh + c S.
  template <typename X>
  DDPM_INLINE static void norm_grad_sums_rows(const X* src, int64_t xs, const X* dy, int64_t dys, int64_t S,
                                              int64_t cpg, const F* add, F mean, F rstd, F* xh, F* g, const F* a,
                                              const F* b, bool silu, double* sum_g, double* sum_gx) {
    for (int64_t c = 0; c < cpg; ++c)
      R::norm_grad_sums(src + c * xs, S, add[c], mean, rstd, xh + c * S, dy + c * dys, g + c * S, a[c], b[c], silu,
                        sum_g + c, sum_gx + c);
  }
  template <typename X, typename O>
  DDPM_INLINE static void norm_grad_x_rows(const X* src, int64_t xs, const F* add, F mean, F rstd, const F* xh,
                                           const F* g, int64_t S, int64_t cpg, const F* a, F m1, F m2, O* out,
                                           int64_t os, double* totals) {
    for (int64_t c = 0; c < cpg; ++c)
      totals[c] = R::norm_grad_x(src + c * xs, add[c], mean, rstd, xh + c * S, g + c * S, S, a[c], m1, m2, out + c * os);
  }

  // ---- the NCHW backward of a group of short rows (S <= kBlockRows) as one block of M = cpg S
  // contiguous elements of x, dy and dx (backward_kernel's block path): one call per pass over the
  // block with coefficients by channel (ByChannel; one call per row cost more than a short row's
  // arithmetic), all of it inside the ISA build.

  // A short row's sum in double, 4 partials side by side (one chain of dependent additions per row
  // was the block's slowest part).
  DDPM_INLINE static double row_sum(const F* v, int64_t S) {
    typedef double D4 __attribute__((vector_size(32)));
    typedef F F4 __attribute__((vector_size(4 * sizeof(F))));
    D4 t = {0, 0, 0, 0};  // t[k]: the elements 4 j + k (GCC vectors: one 4-wide addition per step)
    int64_t j = 0;
    for (; j + 4 <= S; j += 4) {
      F4 f;
      std::memcpy(&f, v + j, sizeof(f));
      t += __builtin_convertvector(f, D4);
    }
    for (; j < S; ++j) t[0] += static_cast<double>(v[j]);
    return (t[0] + t[1]) + (t[2] + t[3]);
  }

  // Backward: g = dy act'(z) and its row sums (sum_g, sum_gx: of g and g x_hat), then dx and, when
  // dbias is given, its row sums (d bias_nc). Per channel: add (bias_nc), A = dn/dx_hat, B (the
  // affine's shift), A and B padded by kChannelPad; chan as ByChannel's. Scratch: d (cpg +
  // kChannelPad), g and gx (M).
  template <typename X>
  DDPM_INLINE static void backward_block(const X* x, const X* dy, X* dx, int64_t S, int64_t cpg,
                                         const uint32_t* chan, const F* add, const F* A, const F* B, F mean, F rstd,
                                         bool silu, F* d, F* g, F* gx, F* sum_g, F* sum_gx, F* dbias) {
    const int64_t M = cpg * S;
    for (int64_t c = 0; c < cpg; ++c) d[c] = add[c] - mean;
    const ByChannel<F> e_d{d, chan}, e_a{A, chan}, e_b{B, chan};
    R::template grad_elems<false>(x, dy, M, e_d, rstd, e_a, e_b, silu, g, static_cast<F*>(nullptr), gx);
    double m1 = 0, m2 = 0;
    for (int64_t c = 0; c < cpg; ++c) {
      const double sg = row_sum(g + c * S, S), sgx = row_sum(gx + c * S, S);
      sum_g[c] = static_cast<F>(sg), sum_gx[c] = static_cast<F>(sgx);
      m1 += A[c] * sg, m2 += A[c] * sgx;
    }
    const F mean_g = static_cast<F>(m1 / static_cast<double>(M));
    const F mean_gx = static_cast<F>(m2 / static_cast<double>(M));
    R::template dx_elems<false>(x, g, M, e_d, rstd, e_a, mean_g, mean_gx, dx, dbias ? gx : nullptr);
    if (dbias)
      for (int64_t c = 0; c < cpg; ++c) dbias[c] = static_cast<F>(row_sum(gx + c * S, S));
  }
};

// ---- the hot loops over one contiguous row (F = float or double; X = the tensors' dtype, or F
// for a row of the group buffer). Long sums add per-chunk partials in double.
template <typename F>
struct Rows : RowLoops<Rows<F>, F> {
  // sum over i < len of term(i): in F within each chunk of kSumChunk elements, then in double.
  template <typename Term>
  DDPM_INLINE static double chunked_sum(int64_t len, const Term& term) {
    double total = 0;
    for (int64_t i0 = 0; i0 < len; i0 += kSumChunk) {
      const int64_t end = std::min(len, i0 + kSumChunk);
      F s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = i0; i < end; ++i) s += term(i);
      total += s;
    }
    return total;
  }

  // sum of F(src).
  template <typename X>
  DDPM_INLINE static double sum(const X* src, int64_t len) {
    return chunked_sum(len, [&](int64_t i) { return static_cast<F>(src[i]); });
  }

  // sum of (h - mean)^2 (the second pass of the two-pass variance); h a row of x or of the buffer.
  template <typename H>
  DDPM_INLINE static double sq_dev(const H* h, int64_t len, F mean) {
    return chunked_sum(len, [&](int64_t i) {
      const F d = static_cast<F>(h[i]) - mean;
      return d * d;
    });
  }

  // sum of (F(src) + d)^2 with a shift per element (D = const F* or ByChannel<F>: a group's rows
  // at once, d = bias_nc - mean).
  template <typename X, typename D>
  DDPM_INLINE static double sq_dev_ch(const X* src, int64_t len, D d) {
    return chunked_sum(len, [&](int64_t i) {
      const F v = static_cast<F>(src[i]) + coef(d, i);
      return v * v;
    });
  }

  // out = act((h - mean) a + b) (+ res), rounded once to X; act = SiLU or identity. out may be h.
  template <typename H, typename X>
  DDPM_INLINE static void apply(const H* h, int64_t len, F mean, F a, F b, bool silu, const X* res, X* out) {
    if (silu && res) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const F z = (static_cast<F>(h[i]) - mean) * a + b;
        out[i] = static_cast<X>(z * sigmoid(z) + static_cast<F>(res[i]));
      }
    } else if (silu) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const F z = (static_cast<F>(h[i]) - mean) * a + b;
        out[i] = static_cast<X>(z * sigmoid(z));
      }
    } else if (res) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i)
        out[i] = static_cast<X>((static_cast<F>(h[i]) - mean) * a + b + static_cast<F>(res[i]));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] = static_cast<X>((static_cast<F>(h[i]) - mean) * a + b);
    }
  }

  // One pixel of a channels-contiguous image: out[c] = act((F(src[c]) + d[c]) a[c] + b[c]) (+ res[c]);
  // or a group's short rows (D = ByChannel<F>).
  template <typename X, typename D>
  DDPM_INLINE static void apply_ch(const X* src, int64_t len, D d, D a, D b, bool silu, const X* res, X* out) {
    if (silu && res) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const F z = (static_cast<F>(src[i]) + coef(d, i)) * coef(a, i) + coef(b, i);
        out[i] = static_cast<X>(z * sigmoid(z) + static_cast<F>(res[i]));
      }
    } else if (silu) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const F z = (static_cast<F>(src[i]) + coef(d, i)) * coef(a, i) + coef(b, i);
        out[i] = static_cast<X>(z * sigmoid(z));
      }
    } else if (res) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i)
        out[i] =
            static_cast<X>((static_cast<F>(src[i]) + coef(d, i)) * coef(a, i) + coef(b, i) + static_cast<F>(res[i]));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i)
        out[i] = static_cast<X>((static_cast<F>(src[i]) + coef(d, i)) * coef(a, i) + coef(b, i));
    }
  }

  // ---- cnt pixels of C contiguous channels, pixel stride ss (channels_last): per-channel sums,
  // vectorised along C. acc[c] = sum over the pixels of F(src[c]).
  template <typename X>
  DDPM_INLINE static void px_sum(const X* src, int64_t ss, int64_t cnt, int64_t C, F* acc) {
    std::fill(acc, acc + C, F(0));
    for (int64_t p = 0; p < cnt; ++p) {
      const X* row = src + p * ss;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<F>(row[c]);
    }
  }

  // acc[c] = sum over the pixels of (F(src[c]) + d[c])^2, d[c] = bias_nc[c] - mean of c's group.
  template <typename X>
  DDPM_INLINE static void px_sq_dev(const X* src, int64_t ss, int64_t cnt, int64_t C, const F* d, F* acc) {
    std::fill(acc, acc + C, F(0));
    for (int64_t p = 0; p < cnt; ++p) {
      const X* row = src + p * ss;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const F v = static_cast<F>(row[c]) + d[c];
        acc[c] += v * v;
      }
    }
  }

  // A coefficient per element, one for the whole call, or per channel (Coef = const F*, F or
  // ByChannel<F>).
  DDPM_INLINE static F coef(const F* p, int64_t i) { return p[i]; }
  DDPM_INLINE static F coef(F s, int64_t) { return s; }
  DDPM_INLINE static F coef(ByChannel<F> p, int64_t i) { return p.v[p.chan[i]]; }

  // ---- the backward's passes over len elements with coefficients per element (D = const F*) or
  // per channel (ByChannel<F>): d = bias_nc - mean, A = dn/dx_hat, B (as in apply_ch); r = rstd
  // (per element, or one: Coef). First pass: x_hat = (x + d) r, g = dy act'(x_hat A + B), stored.
  // kAccumulate (a channels-contiguous pixel, vectorised along C): acc_g += g, acc_gx += g x_hat;
  // else (a group's short rows): acc_gx = g x_hat, stored.
  template <bool kAccumulate, typename X, typename D, typename Coef>
  DDPM_INLINE static void grad_elems(const X* src, const X* dy, int64_t len, D d, Coef r, D A, D B, bool silu, F* g,
                                     F* acc_g, F* acc_gx) {
    if (silu) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const F xh = (static_cast<F>(src[i]) + coef(d, i)) * coef(r, i);
        const F z = xh * coef(A, i) + coef(B, i);
        const F sig = sigmoid(z);
        const F gi = static_cast<F>(dy[i]) * sig * (F(1) + z * (F(1) - sig));
        g[i] = gi;
        if constexpr (kAccumulate) acc_g[i] += gi, acc_gx[i] += gi * xh;
        else acc_gx[i] = gi * xh;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const F xh = (static_cast<F>(src[i]) + coef(d, i)) * coef(r, i);
        const F gi = static_cast<F>(dy[i]);
        g[i] = gi;
        if constexpr (kAccumulate) acc_g[i] += gi, acc_gx[i] += gi * xh;
        else acc_gx[i] = gi * xh;
      }
    }
  }

  // Second pass: out = X(dx), dx = r (A g - m1 - x_hat m2) (m1, m2: the group's means of A g and
  // A g x_hat; r, m1, m2 per element or one: Coef); when acc is given (d bias_nc), acc += dx
  // (kAccumulate) or acc = dx.
  template <bool kAccumulate, typename X, typename D, typename Coef>
  DDPM_INLINE static void dx_elems(const X* src, const F* g, int64_t len, D d, Coef r, D A, Coef m1, Coef m2, X* out,
                                   F* acc) {
    if (acc) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const F xh = (static_cast<F>(src[i]) + coef(d, i)) * coef(r, i);
        const F dx = coef(r, i) * (coef(A, i) * g[i] - coef(m1, i) - xh * coef(m2, i));
        out[i] = static_cast<X>(dx);
        if constexpr (kAccumulate) acc[i] += dx;
        else acc[i] = dx;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const F xh = (static_cast<F>(src[i]) + coef(d, i)) * coef(r, i);
        out[i] = static_cast<X>(coef(r, i) * (coef(A, i) * g[i] - coef(m1, i) - xh * coef(m2, i)));
      }
    }
  }

  // xh = (F(src) - (mean - add)) rstd (the forward's centring: one subtraction per element).
  template <typename X>
  DDPM_INLINE static void load_normalize(const X* src, int64_t len, F add, F mean, F rstd, F* xh) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) xh[i] = (static_cast<F>(src[i]) - (mean - add)) * rstd;
  }

  // The backward's first pass over one channel: g = dy act'(xh a + b); sums of g and g xh.
  template <typename X>
  DDPM_INLINE static void grad_sums(const F* xh, const X* dy, F* g, int64_t len, F a, F b, bool silu, double* sum_g,
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
          const F gi = static_cast<F>(dy[i]) * sig * (F(1) + z * (F(1) - sig));
          g[i] = gi;
          sg += gi;
          sgx += gi * xh[i];
        }
      } else {
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t i = i0; i < end; ++i) {
          const F gi = static_cast<F>(dy[i]);
          g[i] = gi;
          sg += gi;
          sgx += gi * xh[i];
        }
      }
      tg += sg, tgx += sgx;
    }
    *sum_g = tg, *sum_gx = tgx;
  }

  // load_normalize then grad_sums over one row (RowsSimd fuses the two).
  template <typename X>
  DDPM_INLINE static void norm_grad_sums(const X* src, int64_t len, F add, F mean, F rstd, F* xh, const X* dy, F* g,
                                         F a, F b, bool silu, double* sum_g, double* sum_gx) {
    load_normalize(src, len, add, mean, rstd, xh);
    grad_sums(xh, dy, g, len, a, b, silu, sum_g, sum_gx);
  }

  // grad_x after norm_grad_sums (whose xh holds x_hat here; RowsSimd recomputes it from src).
  template <typename X, typename O>
  DDPM_INLINE static double norm_grad_x(const X*, F, F, F rstd, const F* xh, const F* g, int64_t len, F a, F m1,
                                        F m2, O* out) {
    return grad_x(xh, g, len, rstd, a, m1, m2, out);
  }

  // The second pass: out = X(dx), dx = rstd (a g - m1 - xh m2); returns sum dx. out may be g.
  template <typename X>
  DDPM_INLINE static double grad_x(const F* xh, const F* g, int64_t len, F rstd, F a, F m1, F m2, X* out) {
    return chunked_sum(len, [&](int64_t i) {
      const F d = rstd * (a * g[i] - m1 - xh[i] * m2);
      out[i] = static_cast<X>(d);
      return d;
    });
  }
};

// ---- the float rows of every ISA build, hand-vectorised once for any width (simd.h): W = 16 in
// the AVX-512 build, 8 in the AVX2 one, 4 in the baseline one; W = 1 for the tail of a row.
// Multiply-adds are fused (kFused) in the AVX2 and AVX-512 builds, which then give the same bits
// (simd.h). Rows of other dtypes take Rows<float>.
#define DDPM_W(w) decltype(w)::value
#define DDPM_LAMBDA_INLINE __attribute__((always_inline))

template <int W, bool kFused>
struct RowsSimd : RowLoops<RowsSimd<W, kFused>, float> {
  using Portable = Rows<float>;
  // vectors per step of the activation loops (simd::silu_n): as many chains as registers allow
  static constexpr int kActUnroll = W >= 16 ? 4 : 2;
  // float and bfloat16 tensors run these vector loops (bfloat16 widened on load, rounded once on
  // store: load_x / store_x); half and double ones the portable loops.
  template <typename X>
  static constexpr bool kFloat = std::is_same_v<X, float> || std::is_same_v<X, c10::BFloat16>;

  template <int V>
  DDPM_INLINE static simd::Lanes<V> load_x(const float* p) {
    return simd::load<V>(p);
  }
  template <int V>
  DDPM_INLINE static simd::Lanes<V> load_x(const c10::BFloat16* p) {
    return simd::load_bf16<V>(reinterpret_cast<const uint16_t*>(p));
  }
  template <int V>
  DDPM_INLINE static void store_x(float* p, simd::Lanes<V> v) {
    simd::store<V>(p, v);
  }
  template <int V>
  DDPM_INLINE static void store_x(c10::BFloat16* p, simd::Lanes<V> v) {
    simd::store_bf16<V>(reinterpret_cast<uint16_t*>(p), v);
  }

  template <typename X>
  DDPM_INLINE static double sum(const X* src, int64_t len) {
    if constexpr (!kFloat<X>) {
      return Portable::sum(src, len);
    } else {
      return simd::sum32<W>(len, kSumChunk, [&](auto w, int64_t i) DDPM_LAMBDA_INLINE {
        return load_x<DDPM_W(w)>(src + i);
      });
    }
  }

  template <typename H>
  DDPM_INLINE static double sq_dev(const H* h, int64_t len, float mean) {
    if constexpr (!kFloat<H>) {
      return Portable::sq_dev(h, len, mean);
    } else {
      return simd::sum32<W>(len, kSumChunk, [&](auto w, int64_t i) DDPM_LAMBDA_INLINE {
        constexpr int V = DDPM_W(w);
        const simd::Lanes<V> d = load_x<V>(h + i) - mean;
        return d * d;
      });
    }
  }
  template <typename X, typename D>
  DDPM_INLINE static double sq_dev_ch(const X* src, int64_t len, D d) {
    if constexpr (!kFloat<X>) {
      return Portable::sq_dev_ch(src, len, d);
    } else {
      return simd::sum32<W>(len, kSumChunk, [&](auto w, int64_t i) DDPM_LAMBDA_INLINE {
        constexpr int V = DDPM_W(w);
        const simd::Lanes<V> v = load_x<V>(src + i) + coef<V>(d, at<V>(d, i));
        return v * v;
      });
    }
  }


  template <typename H, typename X>
  DDPM_INLINE static void apply(const H* h, int64_t len, float mean, float a, float b, bool silu, const X* res,
                                X* out) {
    if constexpr (!kFloat<H> || !kFloat<X>) {
      Portable::apply(h, len, mean, a, b, silu, res, out);
    } else {
      auto run = [&](auto act, auto with_res) DDPM_LAMBDA_INLINE {
        int64_t i0 = 0;
        if constexpr (decltype(act)::value && W > 1) {  // U vectors at a time (silu_n), then the rest
          constexpr int U = kActUnroll;
          for (; i0 + U * W <= len; i0 += U * W) {
            simd::Lanes<W> z[U];
            DDPM_EACH(u) {
              z[u] = simd::fma<W, kFused>(load_x<W>(h + i0 + u * W) - mean, simd::splat<W>(a), simd::splat<W>(b));
            }
            simd::silu_n<W, kFused, U>(z);
            if constexpr (decltype(with_res)::value) DDPM_EACH(u) z[u] += load_x<W>(res + i0 + u * W);
            DDPM_EACH(u) store_x<W>(out + i0 + u * W, z[u]);
          }
        }
        simd::for_lanes<W>(len - i0, [&](auto w, int64_t j) DDPM_LAMBDA_INLINE {
          constexpr int V = DDPM_W(w);
          const int64_t i = i0 + j;
          const simd::Lanes<V> z =
              simd::fma<V, kFused>(load_x<V>(h + i) - mean, simd::splat<V>(a), simd::splat<V>(b));
          simd::Lanes<V> y = decltype(act)::value ? simd::silu<V, kFused>(z) : z;
          if constexpr (decltype(with_res)::value) y += load_x<V>(res + i);
          store_x<V>(out + i, y);
        });
      };
      dispatch2(silu, res != nullptr, run);
    }
  }

  // One channels-contiguous pixel: out[c] = act((src[c] + d[c]) a[c] + b[c]) (+ res[c]), or a
  // group's short rows (D = ByChannel<float>); the activation kActUnroll vectors at a time
  // (silu_n), as apply.
  template <typename X, typename D>
  DDPM_INLINE static void apply_ch(const X* src, int64_t len, D d, D a, D b, bool silu, const X* res, X* out) {
    if constexpr (!kFloat<X>) {
      Portable::apply_ch(src, len, d, a, b, silu, res, out);
    } else {
      auto run = [&](auto act, auto with_res) DDPM_LAMBDA_INLINE {
        int64_t i0 = 0;
        if constexpr (decltype(act)::value && W > 1) {
          constexpr int U = kActUnroll;
          for (; i0 + U * W <= len; i0 += U * W) {
            simd::Lanes<W> z[U];
            DDPM_EACH(u) {
              const int64_t i = i0 + u * W;
              const At<W> k = at<W>(d, i);
              z[u] = simd::fma<W, kFused>(load_x<W>(src + i) + coef<W>(d, k), coef<W>(a, k), coef<W>(b, k));
            }
            simd::silu_n<W, kFused, U>(z);
            if constexpr (decltype(with_res)::value) DDPM_EACH(u) z[u] += load_x<W>(res + i0 + u * W);
            DDPM_EACH(u) store_x<W>(out + i0 + u * W, z[u]);
          }
        }
        simd::for_lanes<W>(len - i0, [&](auto w, int64_t j) DDPM_LAMBDA_INLINE {
          constexpr int V = DDPM_W(w);
          const int64_t i = i0 + j;
          const At<V> k = at<V>(d, i);
          const simd::Lanes<V> z =
              simd::fma<V, kFused>(load_x<V>(src + i) + coef<V>(d, k), coef<V>(a, k), coef<V>(b, k));
          simd::Lanes<V> y = decltype(act)::value ? simd::silu<V, kFused>(z) : z;
          if constexpr (decltype(with_res)::value) y += load_x<V>(res + i);
          store_x<V>(out + i, y);
        });
      };
      dispatch2(silu, res != nullptr, run);
    }
  }

  // ---- the channels_last sums over cnt pixels of C contiguous channels, register-blocked: each
  // block of kSumBlock vectors of channels keeps its sums in registers while the loop walks the
  // block's column through the pixels (per pixel, they were loaded and stored for every element);
  // the channels after the last full block run per pixel, in the same order, so the bits are the
  // same. (The passes with an activation run per pixel: RowLoops.)
  static constexpr int kSumBlock = 4;  // vectors of channels per block in the sums

  // v[j] = the per-channel values p[c0 + j W ..] of a block; store_block writes them back.
  template <int kB>
  DDPM_INLINE static void load_block(const float* p, int64_t c0, simd::Lanes<W> (&v)[kB]) {
    for (int j = 0; j < kB; ++j) v[j] = simd::load<W>(p + c0 + j * W);
  }
  template <int kB>
  DDPM_INLINE static void store_block(float* p, int64_t c0, const simd::Lanes<W> (&v)[kB]) {
    for (int j = 0; j < kB; ++j) simd::store<W>(p + c0 + j * W, v[j]);
  }

  // Per-channel sums over cnt channels-contiguous pixels (pixel stride ss): acc[c] = sum of src[c].
  template <typename X>
  DDPM_INLINE static void px_sum(const X* src, int64_t ss, int64_t cnt, int64_t C, float* acc) {
    if constexpr (!kFloat<X>) {
      Portable::px_sum(src, ss, cnt, C, acc);
    } else {
      constexpr int kB = kSumBlock;
      int64_t c0 = 0;
      for (; c0 + kB * W <= C; c0 += kB * W) {
        simd::Lanes<W> t[kB];
        for (int j = 0; j < kB; ++j) t[j] = simd::splat<W>(0.0f);
        for (int64_t p = 0; p < cnt; ++p) {
          const X* row = src + p * ss + c0;
          for (int j = 0; j < kB; ++j) t[j] = t[j] + load_x<W>(row + j * W);
        }
        store_block(acc, c0, t);
      }
      std::fill(acc + c0, acc + C, 0.0f);
      for (int64_t p = 0; p < cnt; ++p) {
        const X* row = src + p * ss;
        simd::for_lanes<W>(C - c0, [&](auto w, int64_t i) DDPM_LAMBDA_INLINE {
          constexpr int V = DDPM_W(w);
          const int64_t c = c0 + i;
          simd::store<V>(acc + c, simd::load<V>(acc + c) + load_x<V>(row + c));
        });
      }
    }
  }

  // acc[c] = sum over the pixels of (src[c] + d[c])^2.
  template <typename X>
  DDPM_INLINE static void px_sq_dev(const X* src, int64_t ss, int64_t cnt, int64_t C, const float* d, float* acc) {
    if constexpr (!kFloat<X>) {
      Portable::px_sq_dev(src, ss, cnt, C, d, acc);
    } else {
      constexpr int kB = kSumBlock;
      int64_t c0 = 0;
      for (; c0 + kB * W <= C; c0 += kB * W) {
        simd::Lanes<W> t[kB], dd[kB];
        for (int j = 0; j < kB; ++j) t[j] = simd::splat<W>(0.0f);
        load_block(d, c0, dd);
        for (int64_t p = 0; p < cnt; ++p) {
          const X* row = src + p * ss + c0;
          for (int j = 0; j < kB; ++j) {
            const simd::Lanes<W> v = load_x<W>(row + j * W) + dd[j];
            t[j] = t[j] + v * v;
          }
        }
        store_block(acc, c0, t);
      }
      std::fill(acc + c0, acc + C, 0.0f);
      for (int64_t p = 0; p < cnt; ++p) {
        const X* row = src + p * ss;
        simd::for_lanes<W>(C - c0, [&](auto w, int64_t i) DDPM_LAMBDA_INLINE {
          constexpr int V = DDPM_W(w);
          const int64_t c = c0 + i;
          const simd::Lanes<V> v = load_x<V>(row + c) + simd::load<V>(d + c);
          simd::store<V>(acc + c, simd::load<V>(acc + c) + v * v);
        });
      }
    }
  }

  // A coefficient per element, one for the whole call, or per channel (Coef = const float*, float
  // or ByChannel<float>), for the V elements from i: at<V>(d, i) says where they are, once for all
  // the coefficients of a call (its ByChannel ones share d's chan): the channel c of element i and
  // each lane's channel - c, the index into the V channels from c (one vpermps per coefficient).
  template <int V>
  struct At {
    int64_t i;
    uint32_t c;
    simd::IntLanes<V> lane;
  };
  template <int V, typename D>
  DDPM_INLINE static At<V> at(D d, int64_t i) {
    if constexpr (std::is_same_v<D, ByChannel<float>>) {
      const uint32_t c = d.chan[i];
      return At<V>{i, c, simd::load_u32<V>(d.chan + i) - c};
    } else {
      return At<V>{i, 0u, simd::IntLanes<V>{}};
    }
  }
  template <int V>
  DDPM_INLINE static simd::Lanes<V> coef(const float* p, const At<V>& k) {
    return simd::load<V>(p + k.i);
  }
  template <int V>
  DDPM_INLINE static simd::Lanes<V> coef(float s, const At<V>&) {
    return simd::splat<V>(s);
  }
  template <int V>
  DDPM_INLINE static simd::Lanes<V> coef(ByChannel<float> p, const At<V>& k) {
    return simd::lookup<V>(simd::load<V>(p.v + k.c), k.lane);
  }

  // The backward's first pass (Portable::grad_elems): x_hat = (x + d) r, g = dy act'(x_hat A + B),
  // stored; kAccumulate: acc_g += g, acc_gx += g x_hat; else acc_gx = g x_hat. kActUnroll vectors at
  // a time (grad_act_n), as grad_sums.
  template <bool kAccumulate, typename X, typename D, typename Coef>
  DDPM_INLINE static void grad_elems(const X* src, const X* dy, int64_t len, D d, Coef r, D A, D B, bool silu,
                                     float* g, float* acc_g, float* acc_gx) {
    if constexpr (!kFloat<X>) {
      Portable::grad_elems<kAccumulate>(src, dy, len, d, r, A, B, silu, g, acc_g, acc_gx);
    } else {
      auto out = [&](auto w, int64_t i, auto gi, auto xh) DDPM_LAMBDA_INLINE {
        constexpr int V = DDPM_W(w);
        simd::store<V>(g + i, gi);
        if constexpr (kAccumulate) {
          simd::store<V>(acc_g + i, simd::load<V>(acc_g + i) + gi);
          simd::store<V>(acc_gx + i, simd::fma<V, kFused>(gi, xh, simd::load<V>(acc_gx + i)));
        } else {
          simd::store<V>(acc_gx + i, gi * xh);
        }
      };
      auto run = [&](auto act) DDPM_LAMBDA_INLINE {
        int64_t i0 = 0;
        if constexpr (W > 1) {
          constexpr int U = kActUnroll;
          for (; i0 + U * W <= len; i0 += U * W) {
            simd::Lanes<W> xh[U], z[U], gi[U];
            DDPM_EACH(u) {
              const int64_t i = i0 + u * W;
              const At<W> k = at<W>(d, i);
              xh[u] = (load_x<W>(src + i) + coef<W>(d, k)) * coef<W>(r, k);
              z[u] = simd::fma<W, kFused>(xh[u], coef<W>(A, k), coef<W>(B, k));
            }
            grad_act_n<W, decltype(act)::value, U>(z, dy + i0, gi);
            DDPM_EACH(u) out(simd::Width<W>{}, i0 + u * W, gi[u], xh[u]);
          }
        }
        simd::for_lanes<W>(len - i0, [&](auto w, int64_t j) DDPM_LAMBDA_INLINE {
          constexpr int V = DDPM_W(w);
          const int64_t i = i0 + j;
          const At<V> k = at<V>(d, i);
          const simd::Lanes<V> xh = (load_x<V>(src + i) + coef<V>(d, k)) * coef<V>(r, k);
          const simd::Lanes<V> z = simd::fma<V, kFused>(xh, coef<V>(A, k), coef<V>(B, k));
          out(w, i, grad_act<V, decltype(act)::value>(z, load_x<V>(dy + i)), xh);
        });
      };
      if (silu) run(std::true_type{});
      else run(std::false_type{});
    }
  }

  // The second pass (Portable::dx_elems): out = dx = r (A g - m1 - x_hat m2); when acc is given
  // (d bias_nc), acc += dx (kAccumulate) or acc = dx.
  template <bool kAccumulate, typename X, typename D, typename Coef>
  DDPM_INLINE static void dx_elems(const X* src, const float* g, int64_t len, D d, Coef r, D A, Coef m1, Coef m2,
                                   X* out, float* acc) {
    if constexpr (!kFloat<X>) {
      Portable::dx_elems<kAccumulate>(src, g, len, d, r, A, m1, m2, out, acc);
    } else {
      simd::for_lanes<W>(len, [&](auto w, int64_t i) DDPM_LAMBDA_INLINE {
        constexpr int V = DDPM_W(w);
        const At<V> k = at<V>(d, i);
        const simd::Lanes<V> rr = coef<V>(r, k);
        const simd::Lanes<V> xh = (load_x<V>(src + i) + coef<V>(d, k)) * rr;
        const simd::Lanes<V> dx =
            rr * dx_inner<V>(coef<V>(A, k), simd::load<V>(g + i), coef<V>(m1, k), xh, coef<V>(m2, k));
        store_x<V>(out + i, dx);
        if (!acc) return;
        if constexpr (kAccumulate) simd::store<V>(acc + i, simd::load<V>(acc + i) + dx);
        else simd::store<V>(acc + i, dx);
      });
    }
  }

  template <typename X>
  DDPM_INLINE static void load_normalize(const X* src, int64_t len, float add, float mean, float rstd, float* xh) {
    if constexpr (!kFloat<X>) {
      Portable::load_normalize(src, len, add, mean, rstd, xh);
    } else {
      simd::for_lanes<W>(len, [&](auto w, int64_t i) DDPM_LAMBDA_INLINE {
        constexpr int V = DDPM_W(w);
        simd::store<V>(xh + i, (load_x<V>(src + i) - (mean - add)) * rstd);
      });
    }
  }

  // g = dy act'(xh a + b), stored; returns the sums of g and g xh. With kFromX, xh is computed
  // from the input row src as (src - (mean - add)) rstd, and not stored: norm_grad_x computes it
  // again (a load of x and two operations cost less than storing and reloading x_hat).
  template <bool kFromX, typename Src, typename X>
  DDPM_INLINE static void grad_sums_impl(const Src* src, float add, float mean, float rstd, const X* dy, float* g,
                                         int64_t len, float a, float b, bool silu, double* sum_g, double* sum_gx) {
    auto run = [&](auto act) DDPM_LAMBDA_INLINE {
      simd::sum32x2<W, (W >= 16 ? 2 : 1)>(
          len, kSumChunk,
          [&](auto w, int64_t i, auto& out_g, auto& out_gx) DDPM_LAMBDA_INLINE {
            constexpr int V = DDPM_W(w);
            constexpr int U = std::extent_v<std::remove_reference_t<decltype(out_g)>>;
            simd::Lanes<V> x[U], z[U];
            DDPM_EACH(u) x[u] = load_x<V>(src + i + u * V);
            if constexpr (kFromX) DDPM_EACH(u) x[u] = (x[u] - (mean - add)) * rstd;
            DDPM_EACH(u) z[u] = simd::fma<V, kFused>(x[u], simd::splat<V>(a), simd::splat<V>(b));
            grad_act_n<V, decltype(act)::value, U>(z, dy + i, out_g);
            DDPM_EACH(u) simd::store<V>(g + i + u * V, out_g[u]);
            DDPM_EACH(u) out_gx[u] = out_g[u] * x[u];
          },
          sum_g, sum_gx);
    };
    if (silu) run(std::true_type{});
    else run(std::false_type{});
  }

  template <typename X>
  DDPM_INLINE static void grad_sums(const float* xh, const X* dy, float* g, int64_t len, float a, float b, bool silu,
                                    double* sum_g, double* sum_gx) {
    if constexpr (!kFloat<X>) {
      Portable::grad_sums(xh, dy, g, len, a, b, silu, sum_g, sum_gx);
    } else {
      grad_sums_impl<false>(xh, 0.0f, 0.0f, 0.0f, dy, g, len, a, b, silu, sum_g, sum_gx);
    }
  }

  template <typename X>
  DDPM_INLINE static void norm_grad_sums(const X* src, int64_t len, float add, float mean, float rstd, float* xh,
                                         const X* dy, float* g, float a, float b, bool silu, double* sum_g,
                                         double* sum_gx) {
    if constexpr (!kFloat<X>) {
      Portable::norm_grad_sums(src, len, add, mean, rstd, xh, dy, g, a, b, silu, sum_g, sum_gx);
    } else {
      grad_sums_impl<true>(src, add, mean, rstd, dy, g, len, a, b, silu, sum_g, sum_gx);
    }
  }

  // grad_x after norm_grad_sums: x_hat recomputed from the input row src, as norm_grad_sums did.
  template <typename X, typename O>
  DDPM_INLINE static double norm_grad_x(const X* src, float add, float mean, float rstd, const float* xh,
                                        const float* g, int64_t len, float a, float m1, float m2, O* out) {
    if constexpr (!kFloat<X> || !kFloat<O>) {
      return Portable::norm_grad_x(src, add, mean, rstd, xh, g, len, a, m1, m2, out);
    } else {
      return simd::sum32<W>(len, kSumChunk, [&](auto w, int64_t i) DDPM_LAMBDA_INLINE {
        constexpr int V = DDPM_W(w);
        const simd::Lanes<V> x_hat = (load_x<V>(src + i) - (mean - add)) * rstd;
        const simd::Lanes<V> dx = rstd * dx_inner<V>(simd::splat<V>(a), simd::load<V>(g + i), simd::splat<V>(m1),
                                                    x_hat, simd::splat<V>(m2));
        store_x<V>(out + i, dx);
        return dx;
      });
    }
  }

  // out = dx = rstd (a g - m1 - xh m2); returns the sum of dx. out may be g.
  template <typename X>
  DDPM_INLINE static double grad_x(const float* xh, const float* g, int64_t len, float rstd, float a, float m1,
                                   float m2, X* out) {
    if constexpr (!kFloat<X>) {
      return Portable::grad_x(xh, g, len, rstd, a, m1, m2, out);
    } else {
      return simd::sum32<W>(len, kSumChunk, [&](auto w, int64_t i) DDPM_LAMBDA_INLINE {
        constexpr int V = DDPM_W(w);
        const simd::Lanes<V> dx = rstd * dx_inner<V>(simd::splat<V>(a), simd::load<V>(g + i), simd::splat<V>(m1),
                                                    simd::load<V>(xh + i), simd::splat<V>(m2));
        store_x<V>(out + i, dx);
        return dx;
      });
    }
  }

 private:
  // grad_act of U vectors at once (simd::sigmoid_n), the U vectors of dy from dy_row.
  template <int V, bool kSilu, int U, typename X>
  DDPM_INLINE static void grad_act_n(const simd::Lanes<V> (&z)[U], const X* dy_row, simd::Lanes<V> (&g)[U]) {
    if constexpr (!kSilu) {
      DDPM_EACH(u) g[u] = load_x<V>(dy_row + u * V);
    } else {
      simd::Lanes<V> sig[U];
      simd::sigmoid_n<V, kFused, U>(z, sig);
      DDPM_EACH(u) {
        g[u] = load_x<V>(dy_row + u * V) * (sig[u] * simd::fma<V, kFused>(z[u], 1.0f - sig[u], simd::splat<V>(1.0f)));
      }
    }
  }

  // g = dy act'(z): SiLU' = sig (1 + z (1 - sig)), or dy itself without the activation.
  template <int V, bool kSilu>
  DDPM_INLINE static simd::Lanes<V> grad_act(simd::Lanes<V> z, simd::Lanes<V> dy) {
    if constexpr (!kSilu) {
      return dy;
    } else {
      const simd::Lanes<V> sig = simd::sigmoid<V, kFused>(z);
      return dy * (sig * simd::fma<V, kFused>(z, 1.0f - sig, simd::splat<V>(1.0f)));
    }
  }

  // a g - m1 - x_hat m2, the backward's dx before the factor rstd.
  template <int V>
  DDPM_INLINE static simd::Lanes<V> dx_inner(simd::Lanes<V> a, simd::Lanes<V> g, simd::Lanes<V> m1,
                                             simd::Lanes<V> xh, simd::Lanes<V> m2) {
    return simd::fma<V, kFused>(-xh, m2, simd::fma<V, kFused>(a, g, -m1));
  }

  // f(silu, with_res) with both as compile-time constants.
  template <typename Fn>
  DDPM_INLINE static void dispatch2(bool silu, bool with_res, const Fn& f) {
    if (silu) {
      if (with_res) f(std::true_type{}, std::true_type{});
      else f(std::true_type{}, std::false_type{});
    } else {
      if (with_res) f(std::false_type{}, std::true_type{});
      else f(std::false_type{}, std::false_type{});
    }
  }
};
#undef DDPM_W
#undef DDPM_LAMBDA_INLINE

// One ISA build of the rows: each function noinline with the target attribute ATTR, its body the
// always-inline RowsSimd<W> (so the vector code is compiled for that target).
#define DDPM_ROWS_FOR_TARGET(NAME, ATTR, W, FUSED)                                                                  \
  struct NAME {                                                                                              \
    using Impl = RowsSimd<W, FUSED>;                                                                                \
    template <typename X>                                                                                    \
    ATTR static double sum(const X* src, int64_t len) {                                                      \
      return Impl::sum(src, len);                                                                            \
    }                                                                                                        \
    template <typename H>                                                                                    \
    ATTR static double sq_dev(const H* h, int64_t len, float mean) {                                         \
      return Impl::sq_dev(h, len, mean);                                                                     \
    }                                                                                                        \
    template <typename X, typename D>                                                                        \
    ATTR static double sq_dev_ch(const X* src, int64_t len, D d) {                                           \
      return Impl::sq_dev_ch(src, len, d);                                                                   \
    }                                                                                                        \
    template <typename X, typename D>                                                                        \
    ATTR static void apply_ch(const X* src, int64_t len, D d, D a, D b, bool silu, const X* res, X* out) {   \
      Impl::apply_ch(src, len, d, a, b, silu, res, out);                                                     \
    }                                                                                                        \
    template <typename H, typename X>                                                                        \
    ATTR static void apply(const H* h, int64_t len, float mean, float a, float b, bool silu, const X* res,   \
                           X* out) {                                                                         \
      Impl::apply(h, len, mean, a, b, silu, res, out);                                                       \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static void px_sum(const X* src, int64_t ss, int64_t cnt, int64_t C, float* acc) {                  \
      Impl::px_sum(src, ss, cnt, C, acc);                                                                    \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static void px_sq_dev(const X* src, int64_t ss, int64_t cnt, int64_t C, const float* d, float* acc) { \
      Impl::px_sq_dev(src, ss, cnt, C, d, acc);                                                              \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static void px_apply(const X* src, int64_t ss, int64_t cnt, int64_t C, const float* d, const float* a, \
                              const float* b, bool silu, const X* res, int64_t rss, X* out, int64_t oss,    \
                              const X* next) {                                                               \
      Impl::px_apply(src, ss, cnt, C, d, a, b, silu, res, rss, out, oss, next);                              \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static void px_grad(const X* src, int64_t xs, const X* dy, int64_t dys, int64_t cnt, int64_t C,      \
                             const float* d, const float* r, const float* A, const float* B, bool silu, float* g, \
                             float* acc_g, float* acc_gx) {                                                  \
      Impl::px_grad(src, xs, dy, dys, cnt, C, d, r, A, B, silu, g, acc_g, acc_gx);                            \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static void px_dx(const X* src, int64_t xs, const float* g, int64_t cnt, int64_t C, const float* d,  \
                           const float* r, const float* A, const float* m1, const float* m2, X* out, int64_t os, \
                           float* acc) {                                                                     \
      Impl::px_dx(src, xs, g, cnt, C, d, r, A, m1, m2, out, os, acc);                                         \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static void load_normalize(const X* src, int64_t len, float add, float mean, float rstd, float* xh) { \
      Impl::load_normalize(src, len, add, mean, rstd, xh);                                                   \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static void grad_sums(const float* xh, const X* dy, float* g, int64_t len, float a, float b, bool silu, \
                               double* sum_g, double* sum_gx) {                                              \
      Impl::grad_sums(xh, dy, g, len, a, b, silu, sum_g, sum_gx);                                            \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static void norm_grad_sums_rows(const X* src, int64_t xs, const X* dy, int64_t dys, int64_t S,      \
                                         int64_t cpg, const float* add, float mean, float rstd, float* xh,   \
                                         float* g, const float* a, const float* b, bool silu, double* sum_g, \
                                         double* sum_gx) {                                                   \
      Impl::norm_grad_sums_rows(src, xs, dy, dys, S, cpg, add, mean, rstd, xh, g, a, b, silu, sum_g, sum_gx); \
    }                                                                                                        \
    template <typename X, typename O>                                                                        \
    ATTR static void norm_grad_x_rows(const X* src, int64_t xs, const float* add, float mean, float rstd,    \
                                      const float* xh, const float* g, int64_t S, int64_t cpg, const float* a, \
                                      float m1, float m2, O* out, int64_t os, double* totals) {              \
      Impl::norm_grad_x_rows(src, xs, add, mean, rstd, xh, g, S, cpg, a, m1, m2, out, os, totals);           \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static void backward_block(const X* x, const X* dy, X* dx, int64_t S, int64_t cpg, const uint32_t* chan, \
                                    const float* add, const float* A, const float* B, float mean, float rstd, \
                                    bool silu, float* d, float* g, float* gx, float* sum_g, float* sum_gx,   \
                                    float* dbias) {                                                          \
      Impl::backward_block(x, dy, dx, S, cpg, chan, add, A, B, mean, rstd, silu, d, g, gx, sum_g, sum_gx, dbias); \
    }                                                                                                        \
    template <typename X>                                                                                    \
    ATTR static double grad_x(const float* xh, const float* g, int64_t len, float rstd, float a, float m1,   \
                              float m2, X* out) {                                                            \
      return Impl::grad_x(xh, g, len, rstd, a, m1, m2, out);                                                 \
    }                                                                                                        \
  };
DDPM_ROWS_FOR_TARGET(RowsAvx512, DDPM_TARGET_AVX512 __attribute__((noinline)), 16, true)
DDPM_ROWS_FOR_TARGET(RowsAvx2, DDPM_TARGET_AVX2 __attribute__((noinline)), 8, true)
DDPM_ROWS_FOR_TARGET(RowsBaseline, __attribute__((noinline)), 4, false)
#undef DDPM_ROWS_FOR_TARGET

// ---- moving a group between the tensor and the buffer buf[c * S + s] (F), for layouts whose
// positions are not contiguous (channels_last); NCHW rows are read and written in place.
template <typename X, typename F>
void gather(const View3& v, const X* src, int64_t n, int64_t c0, int64_t cpg, int64_t S, const F* add, F* buf) {
  const X* base = src + v.at(n, c0, 0);
  for (int64_t s = 0; s < S; ++s) {
    const X* col = base + s * v.ss;
    for (int64_t c = 0; c < cpg; ++c) buf[c * S + s] = static_cast<F>(col[c * v.sc]) + (add ? add[c] : F(0));
  }
}

// dst = buf (+ residual), rounded once to X.
template <typename X, typename F>
void scatter(const View3& v, X* dst, const View3& rv, const X* res, int64_t n, int64_t c0, int64_t cpg, int64_t S,
             const F* buf) {
  X* base = dst + v.at(n, c0, 0);
  const X* rbase = res ? res + rv.at(n, c0, 0) : nullptr;
  for (int64_t s = 0; s < S; ++s) {
    X* col = base + s * v.ss;
    for (int64_t c = 0; c < cpg; ++c) {
      F val = buf[c * S + s];
      if (res) val += static_cast<F>(rbase[c * rv.sc + s * rv.ss]);
      col[c * v.sc] = static_cast<X>(val);
    }
  }
}

template <typename F>
DDPM_INLINE F param(const void* p, int64_t i, F absent) {
  return p ? static_cast<const F*>(p)[i] : absent;
}

// Channel cc of image n after the normalisation, folded into one multiply-add: the pre-activation
// is x_hat A + B with A = w (1 + scale_nc) and B = b (1 + scale_nc) + shift_nc. The forward passes
// its rstd for rstd A, its coefficient on x - mean (rstd w first; rstd = 1 leaves A's bits as they
// are, as the backward needs).
template <typename F>
struct ChannelAffine {
  F a, b;
};
template <typename F>
DDPM_INLINE ChannelAffine<F> channel_affine(const GroupNormArgs& args, int64_t n, int64_t cc, F rstd) {
  const int64_t nc = n * args.C + cc;
  const F s1 = F(1) + param<F>(args.scale_nc, nc, F(0));
  return {rstd * param<F>(args.w, cc, F(1)) * s1, param<F>(args.b, cc, F(0)) * s1 + param<F>(args.shift_nc, nc, F(0))};
}

// chan[i] = i / S for i < cpg S: the channel of each element of a block of short rows (ByChannel),
// filled row by row (a division per element cost ~5 us a call at M = 512).
std::vector<uint32_t> block_channels(int64_t cpg, int64_t S) {
  std::vector<uint32_t> chan(cpg * S);
  for (int64_t c = 0; c < cpg; ++c) std::fill_n(chan.data() + c * S, S, static_cast<uint32_t>(c));
  return chan;
}

// ---- forward: one (n, group) per task. NCHW x is read in place (a channel's bias_nc folds into
// its shift: mean - bias_nc); other layouts are gathered into buf first.
template <typename X, typename F, typename R>
void forward_kernel(const GroupNormArgs& a) {
  const int64_t cpg = a.C / a.G, S = a.S, M = cpg * S;
  const X* x = static_cast<const X*>(a.x.ptr);
  const X* res = static_cast<const X*>(a.res.ptr);
  X* y = static_cast<X*>(a.y.ptr);
  F* mean_out = static_cast<F*>(a.mean);
  F* rstd_out = static_cast<F*>(a.rstd);
  const bool in_rows = a.x.ss == 1;                                // NCHW: read rows in place
  const bool out_rows = a.y.ss == 1 && (!res || a.res.ss == 1);  // ... and write them
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(M, 1));
  // Short rows (NCHW below 16x16): a group's rows are one contiguous block of x, y and the
  // residual, and each pass takes the block in one call, its coefficients by channel (ByChannel),
  // where one call per row cost more than the row's arithmetic.
  const bool block =
      in_rows && out_rows && S <= kForwardBlockRows && a.x.sc == S && a.y.sc == S && (!res || a.res.sc == S);
  const std::vector<uint32_t> chan = block_channels(block ? cpg : 0, S);
  at::parallel_for(0, a.N * a.G, grain, [&](int64_t begin, int64_t end) {
    std::vector<F> buf(in_rows && out_rows ? 0 : M);
    const int64_t table = block ? cpg + kChannelPad : 0;  // per channel: bias_nc - mean, the affine's a and b
    std::vector<F> shift(table), ca(table), cb(table);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / a.G, c0 = (ng % a.G) * cpg;
      const F* bias_nc = a.bias_nc ? static_cast<const F*>(a.bias_nc) + n * a.C + c0 : nullptr;
      auto add = [&](int64_t c) { return bias_nc ? bias_nc[c] : F(0); };
      auto x_row = [&](int64_t c) { return x + a.x.at(n, c0 + c, 0); };
      double total = 0;
      if (block) {
        total = R::sum(x_row(0), M);
        for (int64_t c = 0; c < cpg; ++c) total += static_cast<double>(S) * add(c);
      } else if (in_rows) {
        for (int64_t c = 0; c < cpg; ++c) total += R::sum(x_row(c), S) + static_cast<double>(S) * add(c);
      } else {
        gather<X, F>(a.x, x, n, c0, cpg, S, bias_nc, buf.data());
        total = R::sum(buf.data(), M);
      }
      const F mean = static_cast<F>(total / static_cast<double>(M));
      double sq = 0;
      if (block) {
        for (int64_t c = 0; c < cpg; ++c) shift[c] = add(c) - mean;
        sq = R::sq_dev_ch(x_row(0), M, ByChannel<F>{shift.data(), chan.data()});
      } else if (in_rows) {
        for (int64_t c = 0; c < cpg; ++c) sq += R::sq_dev(x_row(c), S, mean - add(c));
      } else {
        sq = R::sq_dev(buf.data(), M, mean);
      }
      const F rstd = F(1) / std::sqrt(static_cast<F>(sq / static_cast<double>(M)) + static_cast<F>(a.eps));
      mean_out[ng] = mean, rstd_out[ng] = rstd;
      // The statistics of the next group wait on memory, the SiLU of this one on arithmetic: start
      // loading the next group's rows now, one row ahead of each row written.
      const X* next = in_rows && ng + 1 < end ? x + a.x.at((ng + 1) / a.G, ((ng + 1) % a.G) * cpg, 0) : nullptr;
      if (block) {  // the whole group at once, its coefficients by channel (shift, ca, cb)
        for (int64_t c = 0; c < cpg; ++c) {
          const ChannelAffine<F> af = channel_affine(a, n, c0 + c, rstd);
          ca[c] = af.a, cb[c] = af.b;
        }
        if (next) prefetch_row(next, M);
        R::apply_ch(x_row(0), M, ByChannel<F>{shift.data(), chan.data()}, ByChannel<F>{ca.data(), chan.data()},
                    ByChannel<F>{cb.data(), chan.data()}, a.silu, res ? res + a.res.at(n, c0, 0) : nullptr,
                    y + a.y.at(n, c0, 0));
        continue;
      }
      for (int64_t c = 0; c < cpg; ++c) {
        const int64_t cc = c0 + c;
        const ChannelAffine<F> af = channel_affine(a, n, cc, rstd);
        const F ca = af.a, cb = af.b;
        if (next) prefetch_row(next + c * a.x.sc, S);
        F* row = buf.data() + c * S;
        const X* res_row = res && out_rows ? res + a.res.at(n, cc, 0) : nullptr;
        if (in_rows && out_rows) {
          R::apply(x_row(c), S, mean - add(c), ca, cb, a.silu, res_row, y + a.y.at(n, cc, 0));
        } else if (in_rows) {
          R::apply(x_row(c), S, mean - add(c), ca, cb, a.silu, static_cast<const F*>(nullptr), row);
        } else if (out_rows) {
          R::apply(row, S, mean, ca, cb, a.silu, res_row, y + a.y.at(n, cc, 0));
        } else {
          R::apply(row, S, mean, ca, cb, a.silu, static_cast<const F*>(nullptr), row);
        }
      }
      if (!out_rows) scatter<X, F>(a.y, y, a.res, res, n, c0, cpg, S, buf.data());
    }
  });
}

// ---- the channels_last kernels' schedule. Each image's positions are cut into K chunks of P
// pixels (P a function of C only); a pass computes per-(n, chunk, c) partials that finish(pass, n)
// adds in a fixed order, so results do not depend on the thread count. Batches of at least two
// images per thread run one image per task, all passes in turn (its passes then find it in
// cache); smaller ones split each pass's chunks across the threads and finish every image after
// the pass. chunk(pass, n, k, scratch) and finish(pass, n, scratch) get a Scratch made by
// make_scratch(per_image): one per task, or one for the sequential finishes.
struct ClChunks {
  int64_t P, K;
};

inline ClChunks cl_chunks(int64_t C, int64_t S) {
  const int64_t P = std::clamp<int64_t>(8192 / C, 1, kSumChunk);
  return {P, (S + P - 1) / P};
}

inline bool cl_image_per_task(int64_t N) {
  const int64_t threads = at::get_num_threads();
  return N >= 2 * threads || N % threads == 0;
}

template <typename MakeScratch, typename Chunk, typename Finish>
void run_cl_passes(int64_t N, int64_t S, int64_t C, ClChunks ch, int passes, const MakeScratch& make_scratch,
                   const Chunk& chunk, const Finish& finish) {
  if (cl_image_per_task(N)) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(S * C, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      auto scratch = make_scratch(true);
      for (int64_t n = begin; n < end; ++n) {
        for (int pass = 0; pass < passes; ++pass) {
          for (int64_t k = 0; k < ch.K; ++k) chunk(pass, n, k, scratch);
          finish(pass, n, scratch);
        }
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 2 * kTaskElems / (ch.P * C));
  for (int pass = 0; pass < passes; ++pass) {
    at::parallel_for(0, N * ch.K, grain, [&](int64_t begin, int64_t end) {
      auto scratch = make_scratch(false);
      for (int64_t i = begin; i < end; ++i) chunk(pass, i / ch.K, i % ch.K, scratch);
    });
    auto scratch = make_scratch(false);
    for (int64_t n = 0; n < N; ++n) finish(pass, n, scratch);
  }
}

// ---- forward for channels-contiguous layouts (channels_last), vectorised along C, on the
// run_cl_passes schedule. Pass 0: sums of h = x + bias_nc -> group means; pass 1: sums of
// (h - mean)^2 -> rstd (two-pass variance); pass 2: y = act((x + bias_nc - mean) a_c + b_c)
// (+ residual), with a_c, b_c folding rstd, weight, bias, scale and shift.
template <typename X, typename F, typename R>
void forward_cl_kernel(const GroupNormArgs& a) {
  const int64_t N = a.N, C = a.C, G = a.G, S = a.S, cpg = C / G;
  const ClChunks ch = cl_chunks(C, S);
  const int64_t P = ch.P, K = ch.K;
  const double M = static_cast<double>(cpg * S);
  const X* x = static_cast<const X*>(a.x.ptr);
  const X* res = static_cast<const X*>(a.res.ptr);
  X* y = static_cast<X*>(a.y.ptr);
  F* mean_out = static_cast<F*>(a.mean);
  F* rstd_out = static_cast<F*>(a.rstd);
  std::vector<double> part(N * K * C);        // per-(n, chunk, c) partial sums of the current pass
  std::vector<F> d(N * C), ca(N * C), cb(N * C);  // per (n, c): bias_nc - mean, a_c, b_c
  struct Scratch {
    std::vector<F> acc;      // per-channel sums of a chunk
    std::vector<double> tot;  // per-group totals of an image
  };
  auto make_scratch = [&](bool) { return Scratch{std::vector<F>(C), std::vector<double>(G)}; };

  auto chunk = [&](int pass, int64_t n, int64_t k, Scratch& sc) {
    F* acc = sc.acc.data();
    const int64_t s0 = k * P, cnt = std::min(P, S - s0);
    const X* src = x + a.x.at(n, 0, s0);
    double* out = part.data() + (n * K + k) * C;
    if (pass == 0) {
      R::px_sum(src, a.x.ss, cnt, C, acc);
      for (int64_t c = 0; c < C; ++c)
        out[c] = static_cast<double>(acc[c]) + static_cast<double>(cnt) * param<F>(a.bias_nc, n * C + c, F(0));
    } else if (pass == 1) {
      R::px_sq_dev(src, a.x.ss, cnt, C, d.data() + n * C, acc);
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<double>(acc[c]);
    } else {
      const X* next = n + 1 < N ? x + a.x.at(n + 1, 0, s0) : nullptr;  // the next image's chunk k
      R::px_apply(src, a.x.ss, cnt, C, d.data() + n * C, ca.data() + n * C, cb.data() + n * C, a.silu,
                  res ? res + a.res.at(n, 0, s0) : nullptr, a.res.ss, y + a.y.at(n, 0, s0), a.y.ss, next);
    }
  };
  // After passes 0 and 1: the group totals of image n's partials (chunks in order, channels in
  // order within each) -> mean and d, then rstd and a_c, b_c.
  auto finish = [&](int pass, int64_t n, Scratch& sc) {
    if (pass == 2) return;
    double* tot = sc.tot.data();
    std::fill(tot, tot + G, 0.0);
    // group by group (no division per channel; each group's chain of additions runs beside the others')
    for (int64_t k = 0; k < K; ++k) {
      const double* p = part.data() + (n * K + k) * C;
      for (int64_t g = 0; g < G; ++g) {
        double t = tot[g];
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) t += p[c];
        tot[g] = t;
      }
    }
    if (pass == 0) {
      for (int64_t g = 0; g < G; ++g) {
        const F mean = static_cast<F>(tot[g] / M);
        mean_out[n * G + g] = mean;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) d[n * C + c] = param<F>(a.bias_nc, n * C + c, F(0)) - mean;
      }
      return;
    }
    for (int64_t g = 0; g < G; ++g) {
      const F var = static_cast<F>(tot[g] / M);
      const F rstd = F(1) / std::sqrt(var + static_cast<F>(a.eps));
      rstd_out[n * G + g] = rstd;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const ChannelAffine<F> af = channel_affine(a, n, c, rstd);
        ca[n * C + c] = af.a, cb[n * C + c] = af.b;
      }
    }
  };
  run_cl_passes(N, S, C, ch, 3, make_scratch, chunk, finish);
}

// Channels contiguous in x, y and the residual, positions not (channels_last; or one position).
bool channels_contiguous(const GroupNormArgs& a) {
  return a.x.sc == 1 && a.y.sc == 1 && (!a.res.ptr || a.res.sc == 1) && (a.x.ss != 1 || a.S == 1);
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
  const bool x_rows = a.x.ss == 1, dy_rows = a.dy.ss == 1, dx_rows = a.dx.ss == 1;
  const bool fused = x_rows && dy_rows;  // NCHW x and dy: normalise inside the gradient sums
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(M, 1));
  // Short rows (as forward_kernel's): a group's rows are one block of x, dy and dx, the whole group
  // one call into the ISA build (RowLoops::backward_block), its per-channel sums 4-wide loops in
  // double (a 32-lane reduction per row of 16 cost more than the row).
  const bool block = fused && dx_rows && S <= kBlockRows && a.x.sc == S && a.dy.sc == S && a.dx.sc == S;
  const std::vector<uint32_t> chan = block_channels(block ? cpg : 0, S);
  at::parallel_for(0, a.N * a.G, grain, [&](int64_t begin, int64_t end) {
    std::vector<F> xh(block ? 0 : M), g(M);
    // per channel: d n / d x_hat, the affine's shift (padded for ByChannel), bias_nc
    std::vector<F> coef(cpg + kChannelPad), shift(cpg + kChannelPad), add(cpg);
    std::vector<double> sums_g(cpg), sums_gx(cpg);  // per channel: sums of g and g x_hat, then of dx
    // block: per channel, bias_nc - mean (padded); per element, g x_hat (then dx)
    std::vector<F> d_table(block ? cpg + kChannelPad : 0), e_gx(block ? M : 0);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / a.G, c0 = (ng % a.G) * cpg;
      const F mean = mean_in[ng], rstd = rstd_in[ng];
      const F* bias_nc = a.bias_nc ? static_cast<const F*>(a.bias_nc) + n * a.C + c0 : nullptr;
      if (fused) {
        // x_hat is computed row by row inside the gradient sums below
      } else if (x_rows) {
        for (int64_t c = 0; c < cpg; ++c) {
          const F add = bias_nc ? bias_nc[c] : F(0);
          R::load_normalize(x + a.x.at(n, c0 + c, 0), S, add, mean, rstd, xh.data() + c * S);
        }
      } else {
        gather<X, F>(a.x, x, n, c0, cpg, S, bias_nc, xh.data());
        R::load_normalize(xh.data(), M, F(0), mean, rstd, xh.data());
      }
      if (!dy_rows) gather<X, F>(a.dy, dy, n, c0, cpg, S, static_cast<const F*>(nullptr), g.data());
      for (int64_t c = 0; c < cpg; ++c) {
        const ChannelAffine<F> af = channel_affine(a, n, c0 + c, F(1));
        coef[c] = af.a, shift[c] = af.b;  // d n / d x_hat, the affine's shift
        add[c] = bias_nc ? bias_nc[c] : F(0);
      }
      if (block) {
        const int64_t nc0 = n * a.C + c0;
        R::backward_block(x + a.x.at(n, c0, 0), dy + a.dy.at(n, c0, 0), dx + a.dx.at(n, c0, 0), S, cpg, chan.data(),
                          add.data(), coef.data(), shift.data(), mean, rstd, a.silu, d_table.data(), g.data(),
                          e_gx.data(), sum_g + nc0, sum_gx + nc0, dbias_nc ? dbias_nc + nc0 : nullptr);
        continue;
      }
      if (fused)
        R::norm_grad_sums_rows(x + a.x.at(n, c0, 0), a.x.sc, dy + a.dy.at(n, c0, 0), a.dy.sc, S, cpg, add.data(),
                               mean, rstd, xh.data(), g.data(), coef.data(), shift.data(), a.silu, sums_g.data(),
                               sums_gx.data());
      double m1 = 0, m2 = 0;
      for (int64_t c = 0; c < cpg; ++c) {
        const int64_t cc = c0 + c, nc = n * a.C + cc;
        F* g_row = g.data() + c * S;
        double sg = sums_g[c], sgx = sums_gx[c];
        if (fused) {
          // summed above
        } else if (dy_rows) {
          R::grad_sums(xh.data() + c * S, dy + a.dy.at(n, cc, 0), g_row, S, coef[c], shift[c], a.silu, &sg, &sgx);
        } else {
          R::grad_sums(xh.data() + c * S, static_cast<const F*>(g_row), g_row, S, coef[c], shift[c], a.silu, &sg,
                       &sgx);
        }
        sum_g[nc] = static_cast<F>(sg), sum_gx[nc] = static_cast<F>(sgx);
        m1 += coef[c] * sg, m2 += coef[c] * sgx;
      }
      const F mean_g = static_cast<F>(m1 / static_cast<double>(M));
      const F mean_gx = static_cast<F>(m2 / static_cast<double>(M));
      if (fused && dx_rows) {
        R::norm_grad_x_rows(x + a.x.at(n, c0, 0), a.x.sc, add.data(), mean, rstd, xh.data(), g.data(), S, cpg,
                            coef.data(), mean_g, mean_gx, dx + a.dx.at(n, c0, 0), a.dx.sc, sums_g.data());
      } else if (fused) {  // dx through g, scattered below
        R::norm_grad_x_rows(x + a.x.at(n, c0, 0), a.x.sc, add.data(), mean, rstd, xh.data(), g.data(), S, cpg,
                            coef.data(), mean_g, mean_gx, g.data(), S, sums_g.data());
      } else {
        for (int64_t c = 0; c < cpg; ++c) {
          const F* xh_row = xh.data() + c * S;
          F* g_row = g.data() + c * S;
          X* dx_row = dx + a.dx.at(n, c0 + c, 0);
          sums_g[c] = dx_rows ? R::grad_x(xh_row, g_row, S, rstd, coef[c], mean_g, mean_gx, dx_row)
                              : R::grad_x(xh_row, g_row, S, rstd, coef[c], mean_g, mean_gx, g_row);
        }
      }
      if (dbias_nc)
        for (int64_t c = 0; c < cpg; ++c) dbias_nc[n * a.C + c0 + c] = static_cast<F>(sums_g[c]);
      if (!dx_rows) scatter<X, F>(a.dx, dx, View3{}, static_cast<const X*>(nullptr), n, c0, cpg, S, g.data());
    }
  });
}

// ---- backward for channels-contiguous layouts (channels_last), vectorised along C, on the
// run_cl_passes schedule. Pass 0: g = dy act'(z), kept in a float buffer (one image per thread
// when each task is an image; else the whole batch), and the sums of g and g x_hat -> sum_g,
// sum_gx and the group means m1, m2. Pass 1: dx from x, g, m1, m2, and its sums (d bias_nc) when
// asked.
template <typename X, typename F, typename R>
void backward_cl_kernel(const GroupNormArgs& a) {
  const int64_t N = a.N, C = a.C, G = a.G, S = a.S, cpg = C / G;
  const ClChunks ch = cl_chunks(C, S);
  const int64_t P = ch.P, K = ch.K;
  const double M = static_cast<double>(cpg * S);
  const X* x = static_cast<const X*>(a.x.ptr);
  const X* dy = static_cast<const X*>(a.dy.ptr);
  X* dx = static_cast<X*>(a.dx.ptr);
  const F* mean_in = static_cast<const F*>(a.mean);
  const F* rstd_in = static_cast<const F*>(a.rstd);
  F* sum_g = static_cast<F*>(a.sum_g);
  F* sum_gx = static_cast<F*>(a.sum_g_xhat);
  F* dbias_nc = static_cast<F*>(a.dbias_nc);
  // Per (n, c): d = bias_nc - mean, r = rstd, A = dn/dx_hat, B = the affine's shift; m1, m2 later.
  std::vector<F> d(N * C), r(N * C), A(N * C), B(N * C), m1(N * C), m2(N * C);
  for (int64_t ng = 0; ng < N * G; ++ng) {
    const int64_t n = ng / G, c0 = (ng % G) * cpg;
    for (int64_t c = c0; c < c0 + cpg; ++c) {
      const int64_t nc = n * C + c;
      const ChannelAffine<F> af = channel_affine(a, n, c, F(1));
      d[nc] = param<F>(a.bias_nc, nc, F(0)) - mean_in[ng];
      r[nc] = rstd_in[ng];
      A[nc] = af.a, B[nc] = af.b;
    }
  }
  std::vector<double> part_g(N * K * C), part_gx(N * K * C);  // pass 1 reuses part_g for dx
  // g of the whole batch when the chunks of one image are split across threads (else per thread)
  std::vector<F> g_batch(cl_image_per_task(N) ? 0 : N * S * C);
  struct Scratch {
    std::vector<F> acc1, acc2, g_img;  // per-channel chunk sums; g of the task's image
    std::vector<double> tg, tgx;       // per-channel totals of an image
    F* g_batch;
    int64_t image_size;
    F* g(int64_t n) { return g_batch ? g_batch + n * image_size : g_img.data(); }
  };
  auto make_scratch = [&](bool per_image) {
    return Scratch{std::vector<F>(C), std::vector<F>(C), std::vector<F>(per_image ? S * C : 0),
                   std::vector<double>(C), std::vector<double>(C), per_image ? nullptr : g_batch.data(), S * C};
  };

  // g of image n: pixel s at g[s * C + c].
  auto chunk = [&](int pass, int64_t n, int64_t k, Scratch& sc) {
    const int64_t s0 = k * P, cnt = std::min(P, S - s0), o = n * C;
    F* g = sc.g(n);
    F *acc1 = sc.acc1.data(), *acc2 = sc.acc2.data();
    double* p1 = part_g.data() + (n * K + k) * C;
    std::fill(acc1, acc1 + C, F(0));
    if (pass == 0) {
      std::fill(acc2, acc2 + C, F(0));
      R::px_grad(x + a.x.at(n, 0, s0), a.x.ss, dy + a.dy.at(n, 0, s0), a.dy.ss, cnt, C, d.data() + o, r.data() + o,
                 A.data() + o, B.data() + o, a.silu, g + s0 * C, acc1, acc2);
      double* p2 = part_gx.data() + (n * K + k) * C;
      for (int64_t c = 0; c < C; ++c) p1[c] = acc1[c], p2[c] = acc2[c];
      return;
    }
    F* acc = dbias_nc ? acc1 : nullptr;
    R::px_dx(x + a.x.at(n, 0, s0), a.x.ss, g + s0 * C, cnt, C, d.data() + o, r.data() + o, A.data() + o,
             m1.data() + o, m2.data() + o, dx + a.dx.at(n, 0, s0), a.dx.ss, acc);
    if (dbias_nc)
      for (int64_t c = 0; c < C; ++c) p1[c] = acc1[c];
  };
  // Image n's totals per channel (chunks in order), then per group (channel by channel from the
  // double totals, the NCHW kernel's order).
  auto finish = [&](int pass, int64_t n, Scratch& sc) {
    if (pass == 1 && !dbias_nc) return;
    double *tg = sc.tg.data(), *tgx = sc.tgx.data();
    for (int64_t c = 0; c < C; ++c) {
      tg[c] = tgx[c] = 0;
      for (int64_t k = 0; k < K; ++k) {
        tg[c] += part_g[(n * K + k) * C + c];
        if (pass == 0) tgx[c] += part_gx[(n * K + k) * C + c];
      }
    }
    if (pass == 1) {
      for (int64_t c = 0; c < C; ++c) dbias_nc[n * C + c] = static_cast<F>(tg[c]);
      return;
    }
    for (int64_t c = 0; c < C; ++c)
      sum_g[n * C + c] = static_cast<F>(tg[c]), sum_gx[n * C + c] = static_cast<F>(tgx[c]);
    for (int64_t g = 0; g < G; ++g) {
      double t1 = 0, t2 = 0;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) t1 += A[n * C + c] * tg[c], t2 += A[n * C + c] * tgx[c];
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
        m1[n * C + c] = static_cast<F>(t1 / M), m2[n * C + c] = static_cast<F>(t2 / M);
    }
  };
  run_cl_passes(N, S, C, ch, 2, make_scratch, chunk, finish);
}

// Channels contiguous in x, dy and dx, positions not (channels_last; or one position).
bool channels_contiguous_bwd(const GroupNormArgs& a) {
  return a.x.sc == 1 && a.dy.sc == 1 && a.dx.sc == 1 && (a.x.ss != 1 || a.S == 1);
}

template <typename X, typename F, typename R>
void run_with(const GroupNormArgs& a, bool backward) {
  if (backward) {
    if (channels_contiguous_bwd(a)) backward_cl_kernel<X, F, R>(a);
    else backward_kernel<X, F, R>(a);
  } else if (channels_contiguous(a)) {
    forward_cl_kernel<X, F, R>(a);
  } else {
    forward_kernel<X, F, R>(a);
  }
}

template <typename X, typename F>
void run(const GroupNormArgs& a, bool backward) {
  if constexpr (std::is_same_v<F, float>) {
    switch (cpu_isa()) {
      case CpuIsa::kAvx512: return run_with<X, F, RowsAvx512>(a, backward);
      case CpuIsa::kAvx2: return run_with<X, F, RowsAvx2>(a, backward);
      default: return run_with<X, F, RowsBaseline>(a, backward);
    }
  } else {
    run_with<X, F, Rows<F>>(a, backward);
  }
}

// ---- argument checks at the kernel boundary (the Python wrapper gives the friendly errors)
const void* param_ptr(const at::Tensor& x, const std::optional<at::Tensor>& p, at::ScalarType st,
                      std::initializer_list<int64_t> shape, const char* name) {
  if (!p.has_value()) return nullptr;
  check_same_device(x, *p, name);
  DDPM_CHECK(p->scalar_type() == st && p->is_contiguous() && p->sizes() == at::IntArrayRef(shape), "ddpm_fast: ",
             name, " must be a contiguous ", st, " tensor of shape ", at::IntArrayRef(shape), ", got ",
             p->scalar_type(), " ", p->sizes());
  return p->const_data_ptr();
}

// Same dtype and (N, C, S) as x (either may be a 3-D view of the other's shape).
void check_like(const at::Tensor& x, const at::Tensor& t, const char* name) {
  check_same_device(x, t, name);
  DDPM_CHECK(same_ncs(t, x) && t.scalar_type() == x.scalar_type(), "ddpm_fast: ", name, " must be a ",
             x.scalar_type(), " tensor of shape ", x.sizes(), ", got ", t.scalar_type(), " ", t.sizes());
}

void* stat_ptr(const at::Tensor& x, const at::Tensor& t, at::ScalarType st, int64_t rows, int64_t cols,
               const char* name) {
  check_same_device(x, t, name);
  DDPM_CHECK(t.scalar_type() == st && t.is_contiguous() && t.numel() == rows * cols, "ddpm_fast: ", name,
             " must be a contiguous ", st, " tensor of ", rows, " x ", cols, " elements");
  return t.data_ptr();
}

GroupNormArgs make_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_nc,
                        const std::optional<at::Tensor>& scale_nc, const std::optional<at::Tensor>& shift_nc,
                        int64_t num_groups, bool silu) {
  DDPM_CHECK(is_float_type(x.scalar_type()), "ddpm_fast: group_norm_silu needs a floating-point x");
  DDPM_CHECK(x.dim() >= 2, "ddpm_fast: group_norm_silu kernels take (N, C, ...) tensors");
  GroupNormArgs a;
  a.N = x.size(0), a.C = x.size(1), a.S = spatial_numel(x), a.G = num_groups;
  DDPM_CHECK(a.G > 0 && a.C % a.G == 0, "ddpm_fast: ", a.C, " channels do not split into ", a.G, " groups");
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
