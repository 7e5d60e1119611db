// The variational bound's per-sample terms on the CPU (ops/vlb_terms.py): for each sample, the mean
// over its elements of KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (t > 0) or of the discretized
// Gaussian decoder's -log p(x_0 | x_1) (t == 0), in bits; and the backward, d terms / d model_output.
//
// Per timestep the Python side packs a float64 table row (cast to float32 for every dtype but
// float64): c1, c2 (posterior mean coefficients), lvq (log beta~_t, clipped), lvp (the fixed model
// log-variance), D (log beta_t - lvq, learned_range's span), a, b (x0 = a x_t + b out), dfix (lvp - lvq,
// formed in float64). The KL is computed as 0.5 (f(d) + (c1 (x0 - x0_pred))^2 exp(-lvp)) with
// d = lvp - lvq and f(d) = d - 1 + exp(-d) taken from its series for |d| < 0.5 (no cancellation).
//
// fp32 KL rows (every dtype but float64) go kChunk elements at a time through float buffers, with a
// branch-free exp (Cephes' expf polynomial) so that the loops vectorise; built per vector ISA
// (cpu_isa.h) with -ffp-contract=off: the same bits in each build. Decoder rows (t == 0) are computed
// in float64 scalar code, the CDF in log space (erfc, and its asymptotic series past -30 sigma), as the
// float64 reference does. Per-row sums are float64; a sample's sum adds its rows in order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_chunks.h"
#include "cpu_isa.h"
#include "torch_glue.h"

#define DDPM_BODY static inline __attribute__((always_inline))

namespace ddpm_fast {
namespace {

constexpr int kTableCols = 8;
enum VlbVar : int { kVlbFixed = 0, kVlbLearnedRange = 1, kVlbLearned = 2 };
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;
constexpr float kVarFloor = 1e-20f;

struct VlbArgs {
  View3 mo, x0, xt, grad;
  int64_t mo_var = 0;  // element offset of the variance channels
  const int64_t* t = nullptr;
  const void* table = nullptr;
  bool f64 = false;
  int64_t T = 0, N = 0, C = 0, S = 0;
  int var = kVlbFixed;
  bool clip = false, mean_grad = true;
};

struct Row {
  double c1, c2, lvq, lvp, D, a, b, dfix;
};

Row table_row(const VlbArgs& a, int64_t n) {
  const int64_t t = a.t[n] < 0 ? 0 : (a.t[n] >= a.T ? a.T - 1 : a.t[n]);
  double v[kTableCols];
  for (int k = 0; k < kTableCols; ++k) {
    v[k] = a.f64 ? static_cast<const double*>(a.table)[t * kTableCols + k]
                 : static_cast<double>(static_cast<const float*>(a.table)[t * kTableCols + k]);
  }
  return Row{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
}

// ---------------------------------------------------------------- float KL chunks
struct KlRow {
  float c1, a, b, lvq, lvp, D_half, dfix, scale;  // scale: the backward's g_n / (M log 2)
  int var;
  bool clip, mean_grad;
};

// exp(x), branch-free: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial),
// within ~2 ulp; x clamped to [-87.3, 88.3] (no denormals, no overflow of the exponent bits).
DDPM_BODY float vexp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// f(d) = d - 1 + exp(-d) >= 0: its Taylor series d^2 (1/2 - d/6 + ...) for |d| < 0.5, else directly.
DDPM_BODY float kl_var_term(float d) {
  float s = -2.7557319e-7f;  // -1/9!
  s = s * d + 2.4801587e-5f;
  s = s * d - 1.9841270e-4f;
  s = s * d + 1.3888889e-3f;
  s = s * d - 8.3333333e-3f;
  s = s * d + 4.1666667e-2f;
  s = s * d - 1.6666667e-1f;
  s = s * d + 0.5f;
  const float series = d * d * s;
  const float direct = (d - 1.0f) + vexp(-d);
  return (d < 0.5f && d > -0.5f) ? series : direct;
}

// (d, lvp) of one element: the log-variance gap to the true posterior and the model log-variance.
template <int VAR>
DDPM_BODY void kl_logvar(const KlRow& r, float v, float* d, float* lvp) {
  if constexpr (VAR == kVlbLearnedRange) {
    *d = (v + 1.0f) * r.D_half;
    *lvp = r.lvq + *d;
  } else if constexpr (VAR == kVlbLearned) {
    *lvp = std::log(std::max(v, kVarFloor));
    *d = *lvp - r.lvq;
  } else {
    *d = r.dfix;
    *lvp = r.lvp;
  }
}

// The loops are specialised on the variance type and the clip (no branch inside, so they vectorise);
// the forward writes each element's term to `vals` and sums them in a second loop with 8 float64
// accumulators (a float64 reduction in one accumulator would keep the first loop scalar).
template <int VAR, bool CLIP>
DDPM_BODY void kl_fwd_loop(const KlRow& r, int64_t len, const float* __restrict__ out, const float* __restrict__ v,
                           const float* __restrict__ x0, const float* __restrict__ xt, float* __restrict__ vals) {
  for (int64_t i = 0; i < len; ++i) {
    float x0p = r.a * xt[i] + r.b * out[i];
    if constexpr (CLIP) x0p = std::min(std::max(x0p, -1.0f), 1.0f);
    const float diff = r.c1 * (x0[i] - x0p);
    float d, lvp;
    kl_logvar<VAR>(r, VAR == kVlbFixed ? 0.0f : v[i], &d, &lvp);
    vals[i] = 0.5f * (kl_var_term(d) + diff * diff * vexp(-lvp));
  }
}

DDPM_BODY void kl_fwd_chunk_body(const KlRow& r, int64_t len, const float* out, const float* v, const float* x0,
                                 const float* xt, double* sum) {
  float vals[kChunk];
  switch (r.var * 2 + (r.clip ? 1 : 0)) {
    case kVlbLearnedRange * 2: kl_fwd_loop<kVlbLearnedRange, false>(r, len, out, v, x0, xt, vals); break;
    case kVlbLearnedRange * 2 + 1: kl_fwd_loop<kVlbLearnedRange, true>(r, len, out, v, x0, xt, vals); break;
    case kVlbLearned * 2: kl_fwd_loop<kVlbLearned, false>(r, len, out, v, x0, xt, vals); break;
    case kVlbLearned * 2 + 1: kl_fwd_loop<kVlbLearned, true>(r, len, out, v, x0, xt, vals); break;
    case kVlbFixed * 2 + 1: kl_fwd_loop<kVlbFixed, true>(r, len, out, v, x0, xt, vals); break;
    default: kl_fwd_loop<kVlbFixed, false>(r, len, out, v, x0, xt, vals); break;
  }
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(vals[i + k]);
  }
  for (; i < len; ++i) acc[0] += static_cast<double>(vals[i]);
  *sum += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <int VAR, bool CLIP, bool MEAN_GRAD>
DDPM_BODY void kl_bwd_loop(const KlRow& r, int64_t len, const float* __restrict__ out, const float* __restrict__ v,
                           const float* __restrict__ x0, const float* __restrict__ xt, float* __restrict__ g_mean,
                           float* __restrict__ g_var) {
  for (int64_t i = 0; i < len; ++i) {
    const float raw = r.a * xt[i] + r.b * out[i];
    float x0p = raw, mask = 1.0f;
    if constexpr (CLIP) {
      x0p = std::min(std::max(raw, -1.0f), 1.0f);
      mask = (raw >= -1.0f && raw <= 1.0f) ? 1.0f : 0.0f;
    }
    const float diff = r.c1 * (x0[i] - x0p);
    float d, lvp;
    const float vi = VAR == kVlbFixed ? 0.0f : v[i];
    kl_logvar<VAR>(r, vi, &d, &lvp);
    const float e = vexp(-lvp);
    // dKL/dmu_p = -diff e; dmu_p/dout = c1 b (inside the clip)
    if constexpr (MEAN_GRAD) g_mean[i] = -(diff * e) * (r.c1 * r.b) * mask * r.scale;
    else g_mean[i] = 0.0f;
    if constexpr (VAR != kVlbFixed) {
      // dKL/dlvp = 0.5 (1 - exp(-d) - diff^2 e), 1 - exp(-d) = d - f(d)
      const float dlvp = 0.5f * ((d - kl_var_term(d)) - diff * diff * e);
      float dv;
      if constexpr (VAR == kVlbLearnedRange) dv = r.D_half;
      else dv = vi > kVarFloor ? 1.0f / vi : 0.0f;
      g_var[i] = dlvp * dv * r.scale;
    }
  }
}

template <int VAR>
DDPM_BODY void kl_bwd_var(const KlRow& r, int64_t len, const float* out, const float* v, const float* x0,
                          const float* xt, float* g_mean, float* g_var) {
  if (r.clip && r.mean_grad) kl_bwd_loop<VAR, true, true>(r, len, out, v, x0, xt, g_mean, g_var);
  else if (r.clip) kl_bwd_loop<VAR, true, false>(r, len, out, v, x0, xt, g_mean, g_var);
  else if (r.mean_grad) kl_bwd_loop<VAR, false, true>(r, len, out, v, x0, xt, g_mean, g_var);
  else kl_bwd_loop<VAR, false, false>(r, len, out, v, x0, xt, g_mean, g_var);
}

DDPM_BODY void kl_bwd_chunk_body(const KlRow& r, int64_t len, const float* out, const float* v, const float* x0,
                                 const float* xt, float* g_mean, float* g_var) {
  if (r.var == kVlbLearnedRange) kl_bwd_var<kVlbLearnedRange>(r, len, out, v, x0, xt, g_mean, g_var);
  else if (r.var == kVlbLearned) kl_bwd_var<kVlbLearned>(r, len, out, v, x0, xt, g_mean, g_var);
  else kl_bwd_var<kVlbFixed>(r, len, out, v, x0, xt, g_mean, g_var);
}

DDPM_ISA_VARIANTS(kl_fwd_chunk,
                  (const KlRow& r, int64_t len, const float* out, const float* v, const float* x0, const float* xt,
                   double* sum),
                  (r, len, out, v, x0, xt, sum))
DDPM_ISA_VARIANTS(kl_bwd_chunk,
                  (const KlRow& r, int64_t len, const float* out, const float* v, const float* x0, const float* xt,
                   float* g_mean, float* g_var),
                  (r, len, out, v, x0, xt, g_mean, g_var))

// ---------------------------------------------------------------- float64 elements (decoder, f64 KL)
// log Phi(z): log(erfc(-z / sqrt 2) / 2) while erfc is a normal double, else the asymptotic series.
double log_ndtr(double z) {
  if (z > 6.0) return std::log1p(-0.5 * std::erfc(z * 0.70710678118654752440));
  if (z > -30.0) return std::log(0.5 * std::erfc(-z * 0.70710678118654752440));
  const double w = 1.0 / (z * z);
  const double series = 1.0 + w * (-1.0 + w * (3.0 + w * (-15.0 + w * (105.0 - w * 945.0))));
  return -0.5 * z * z - std::log(-z) - kLogSqrt2Pi + std::log(series);
}

// -log P(bin of x) under N(m, exp(ls)^2) and its derivatives in m and ls (vlb.log_bin_probability).
struct BinNll {
  double nll, d_m, d_ls;
};

BinNll bin_nll(double x, double m, double ls) {
  const double inv_s = std::exp(-ls);
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
    logp = lh + std::log(-std::expm1(std::min(ll - lh, 0.0)));
  }
  // d log P / dz at each end: phi(z) / P, in log space
  const double rb = has_b ? std::exp(-0.5 * zb * zb - kLogSqrt2Pi - logp) : 0.0;
  const double ra = has_a ? std::exp(-0.5 * za * za - kLogSqrt2Pi - logp) : 0.0;
  return BinNll{-logp, (rb - ra) * inv_s, rb * zb - ra * za};
}

struct Element {
  double value, g_mean, g_var;  // the term (nats) and its derivatives in the mean and variance outputs
};

Element element64(const Row& r, int var, bool clip, bool decoder, double out, double v, double x0, double xt) {
  const double raw = r.a * xt + r.b * out;
  const double x0p = clip ? std::min(std::max(raw, -1.0), 1.0) : raw;
  const double mask = (!clip || (raw >= -1.0 && raw <= 1.0)) ? 1.0 : 0.0;
  double d, lvp, dv;
  if (var == kVlbLearnedRange) {
    d = 0.5 * (v + 1.0) * r.D, lvp = r.lvq + d, dv = 0.5 * r.D;
  } else if (var == kVlbLearned) {
    lvp = std::log(std::max(v, 1e-20)), d = lvp - r.lvq, dv = v > 1e-20 ? 1.0 / v : 0.0;
  } else {
    d = r.dfix, lvp = r.lvp, dv = 0.0;
  }
  if (decoder) {
    const double m = r.c1 * x0p + r.c2 * xt;
    const BinNll b = bin_nll(x0, m, 0.5 * lvp);
    return Element{b.nll, b.d_m * r.c1 * r.b * mask, 0.5 * b.d_ls * dv};
  }
  const double diff = r.c1 * (x0 - x0p);
  const double e = std::exp(-lvp);
  const double f = (d < 0.5 && d > -0.5) ? d * d * (0.5 + d * (-1.0 / 6 + d * (1.0 / 24 + d * (-1.0 / 120 + d * (1.0 / 720 + d * (-1.0 / 5040 + d * (1.0 / 40320 + d * (-1.0 / 362880 + d / 3628800))))))))
                                         : (d - 1.0) + std::exp(-d);
  return Element{0.5 * (f + diff * diff * e), -(diff * e) * r.c1 * r.b * mask, 0.5 * ((d - f) - diff * diff * e) * dv};
}

// ---------------------------------------------------------------- rows
// Forward: partial[row] = sum over the row's elements of the term (nats).
template <typename X>
void fwd_rows(const VlbArgs& a, double* partial) {
  const X* mo = static_cast<const X*>(a.mo.ptr);
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* xt = static_cast<const X*>(a.xt.ptr);
  const bool has_var = a.var != kVlbFixed;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    float ob[kChunk], vb[kChunk], x0b[kChunk], xtb[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      const Row r = table_row(a, n);
      const bool decoder = a.t[n] <= 0;
      double sum = 0.0;
      if constexpr (!std::is_same_v<X, double>) {
        if (!decoder) {
          const KlRow k{float(r.c1), float(r.a), float(r.b), float(r.lvq), float(r.lvp), float(0.5 * r.D),
                        float(r.dfix), 0.0f, a.var, a.clip, true};
          for (int64_t s0 = 0; s0 < a.S; s0 += kChunk) {
            const int64_t len = std::min(kChunk, a.S - s0);
            const float* o = row_in(mo + a.mo.at(n, c, s0), a.mo.ss, len, ob);
            const float* v = has_var ? row_in(mo + a.mo.at(n, c, s0) + a.mo_var, a.mo.ss, len, vb) : nullptr;
            kl_fwd_chunk(k, len, o, v, row_in(x0 + a.x0.at(n, c, s0), a.x0.ss, len, x0b),
                         row_in(xt + a.xt.at(n, c, s0), a.xt.ss, len, xtb), &sum);
          }
          partial[row] = sum;
          continue;
        }
      }
      for (int64_t s = 0; s < a.S; ++s) {
        const int64_t m = a.mo.at(n, c, s);
        const double v = has_var ? static_cast<double>(mo[m + a.mo_var]) : 0.0;
        sum += element64(r, a.var, a.clip, decoder, static_cast<double>(mo[m]), v,
                         static_cast<double>(x0[a.x0.at(n, c, s)]), static_cast<double>(xt[a.xt.at(n, c, s)]))
                   .value;
      }
      partial[row] = sum;
    }
  });
}

// Backward: grad[n, c, s] (mean channels) and grad[n, C + c, s] (variance channels) = g_n / (M log 2) x
// the element's derivatives.
template <typename X>
void bwd_rows(const VlbArgs& a, const double* g) {
  const X* mo = static_cast<const X*>(a.mo.ptr);
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* xt = static_cast<const X*>(a.xt.ptr);
  X* grad = static_cast<X*>(a.grad.ptr);
  const int64_t grad_var = a.C * a.grad.sc;
  const bool has_var = a.var != kVlbFixed;
  const double per = 1.0 / (static_cast<double>(a.C * a.S) * kLn2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    float ob[kChunk], vb[kChunk], x0b[kChunk], xtb[kChunk], gm[kChunk], gv[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      const Row r = table_row(a, n);
      const bool decoder = a.t[n] <= 0;
      const double scale = g[n] * per;
      if constexpr (!std::is_same_v<X, double>) {
        if (!decoder) {
          const KlRow k{float(r.c1), float(r.a), float(r.b), float(r.lvq), float(r.lvp), float(0.5 * r.D),
                        float(r.dfix), float(scale), a.var, a.clip, a.mean_grad};
          for (int64_t s0 = 0; s0 < a.S; s0 += kChunk) {
            const int64_t len = std::min(kChunk, a.S - s0);
            const float* o = row_in(mo + a.mo.at(n, c, s0), a.mo.ss, len, ob);
            const float* v = has_var ? row_in(mo + a.mo.at(n, c, s0) + a.mo_var, a.mo.ss, len, vb) : nullptr;
            X* gm_dst = grad + a.grad.at(n, c, s0);
            float* gmo = row_out(gm_dst, a.grad.ss, gm);
            float* gvo = has_var ? row_out(gm_dst + grad_var, a.grad.ss, gv) : nullptr;
            kl_bwd_chunk(k, len, o, v, row_in(x0 + a.x0.at(n, c, s0), a.x0.ss, len, x0b),
                         row_in(xt + a.xt.at(n, c, s0), a.xt.ss, len, xtb), gmo, gvo);
            row_out_done(gmo, len, gm_dst, a.grad.ss);
            if (has_var) row_out_done(gvo, len, gm_dst + grad_var, a.grad.ss);
          }
          continue;
        }
      }
      for (int64_t s = 0; s < a.S; ++s) {
        const int64_t m = a.mo.at(n, c, s);
        const double v = has_var ? static_cast<double>(mo[m + a.mo_var]) : 0.0;
        const Element e = element64(r, a.var, a.clip, decoder, static_cast<double>(mo[m]), v,
                                    static_cast<double>(x0[a.x0.at(n, c, s)]),
                                    static_cast<double>(xt[a.xt.at(n, c, s)]));
        const int64_t o = a.grad.at(n, c, s);
        grad[o] = static_cast<X>(a.mean_grad ? e.g_mean * scale : 0.0);
        if (has_var) grad[o + grad_var] = static_cast<X>(e.g_var * scale);
      }
    }
  });
}

VlbArgs make_args(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& t,
                  const at::Tensor& table, int64_t var, bool clip) {
  DDPM_CHECK(is_float_type(x0.scalar_type()) && x0.dim() >= 2, "ddpm_fast: vlb_terms needs (N, C, ...) float x0");
  DDPM_CHECK(model_output.scalar_type() == x0.scalar_type() && x_t.scalar_type() == x0.scalar_type(),
             "ddpm_fast: vlb_terms needs model_output, x0 and x_t of one dtype");
  DDPM_CHECK(var >= kVlbFixed && var <= kVlbLearned, "ddpm_fast: bad variance code");
  VlbArgs a;
  a.N = x0.size(0), a.C = x0.size(1), a.S = spatial_numel(x0);
  DDPM_CHECK(same_ncs(x0, x_t), "ddpm_fast: x_t has shape ", x_t.sizes(), ", expected ", x0.sizes());
  DDPM_CHECK(model_output.size(0) == a.N && spatial_numel(model_output) == a.S &&
                 model_output.size(1) == (var == kVlbFixed ? 1 : 2) * a.C,
             "ddpm_fast: model_output has shape ", model_output.sizes(), " for x0 of shape ", x0.sizes());
  check_index_tensor(x0, t, "t", a.N);
  DDPM_CHECK(table.dim() == 2 && table.size(1) == kTableCols && table.is_contiguous() &&
                 (table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble),
             "ddpm_fast: the vlb table must be a contiguous (T, 8) float32/float64 tensor");
  a.mo = view3(model_output), a.x0 = view3(x0), a.xt = view3(x_t);
  a.mo_var = a.C * model_output.stride(1);
  a.t = t.data_ptr<int64_t>();
  a.table = table.data_ptr(), a.f64 = table.scalar_type() == at::kDouble, a.T = table.size(0);
  a.var = static_cast<int>(var), a.clip = clip;
  return a;
}

void vlb_terms_fwd_cpu(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& x_t,
                       const at::Tensor& t, const at::Tensor& table, int64_t var, bool clip, const at::Tensor& terms) {
  const VlbArgs a = make_args(model_output, x0, x_t, t, table, var, clip);
  DDPM_CHECK(terms.dim() == 1 && terms.size(0) == a.N && terms.is_contiguous() &&
                 (terms.scalar_type() == at::kFloat || terms.scalar_type() == at::kDouble),
             "ddpm_fast: terms must be a contiguous float (N,) tensor");
  std::vector<double> partial(static_cast<size_t>(a.N * a.C));
  dispatch_float(x0.scalar_type(), [&](auto tag) { fwd_rows<decltype(tag)>(a, partial.data()); });
  const double per = 1.0 / (static_cast<double>(a.C * a.S) * kLn2);
  for (int64_t n = 0; n < a.N; ++n) {
    double sum = 0.0;
    for (int64_t c = 0; c < a.C; ++c) sum += partial[n * a.C + c];
    if (terms.scalar_type() == at::kDouble) terms.data_ptr<double>()[n] = sum * per;
    else terms.data_ptr<float>()[n] = static_cast<float>(sum * per);
  }
}

void vlb_terms_bwd_cpu(const at::Tensor& grad_terms, const at::Tensor& model_output, const at::Tensor& x0,
                       const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& table, int64_t var, bool clip,
                       bool mean_grad, const at::Tensor& grad_model_output) {
  VlbArgs a = make_args(model_output, x0, x_t, t, table, var, clip);
  DDPM_CHECK(grad_terms.dim() == 1 && grad_terms.size(0) == a.N, "ddpm_fast: grad_terms must have shape (N,)");
  DDPM_CHECK(grad_model_output.sizes() == model_output.sizes() &&
                 grad_model_output.scalar_type() == model_output.scalar_type(),
             "ddpm_fast: grad_model_output must be shaped like model_output");
  a.grad = view3(grad_model_output);
  a.mean_grad = mean_grad;
  const at::Tensor g = grad_terms.to(at::kDouble).contiguous();
  dispatch_float(x0.scalar_type(), [&](auto tag) { bwd_rows<decltype(tag)>(a, g.data_ptr<double>()); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ddpm_fast_C, m) {
  m.def(
      "vlb_terms_fwd(Tensor model_output, Tensor x0, Tensor x_t, Tensor t, Tensor table, int var, bool clip, "
      "Tensor(a!) terms) -> ()");
  m.def(
      "vlb_terms_bwd(Tensor grad_terms, Tensor model_output, Tensor x0, Tensor x_t, Tensor t, Tensor table, "
      "int var, bool clip, bool mean_grad, Tensor(a!) grad_model_output) -> ()");
}

TORCH_LIBRARY_IMPL(ddpm_fast_C, CPU, m) {
  m.impl("vlb_terms_fwd", &vlb_terms_fwd_cpu);
  m.impl("vlb_terms_bwd", &vlb_terms_bwd_cpu);
}

}  // namespace ddpm_fast
