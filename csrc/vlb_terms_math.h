// The kernel arguments and per-element maths of vlb_terms (ops/vlb_terms.py), shared by the C++
// (vlb_terms_cpu.cpp) and CUDA (vlb_terms_cuda.cu) kernels: for each sample, the mean over its
// elements of KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (t > 0) or of the discretized Gaussian
// decoder's -log p(x_0 | x_1) (t == 0), in bits, and d terms / d model_output.
//
// Per timestep the Python side packs a table row (float64, cast to float32 for every dtype but
// float64): c1, c2 (posterior mean coefficients), lvq (log beta~_t, clipped), lvp (the fixed model
// log-variance), D (log beta_t - lvq, learned_range's span), a, b (x0 = a x_t + b out), dfix (lvp - lvq,
// formed in float64). The KL is 0.5 (f(d) + (c1 (x0 - x0_pred))^2 exp(-lvp)) with d = lvp - lvq and
// f(d) = d - 1 + exp(-d) taken from its series for |d| < 0.5 (no cancellation): in fp32 (kl_value,
// kl_grads) for every dtype but float64, with the exp a kernel chooses (the CPU's vectorises); in
// float64 (element64) for float64 inputs and for the decoder, whose CDF is taken in log space (erfc,
// and its asymptotic series past -30 sigma), as the float64 reference does.
// Plain data and arithmetic: no torch, no CUDA runtime (nvcc and the CPU build both compile it).
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"
#include "kernel_args.h"

namespace ddpm_fast {

// Variance codes (ops/vlb_terms.py VAR_CODES) and the table's columns per timestep.
enum VlbVarCode : int { kVlbVarFixed = 0, kVlbVarLearnedRange = 1, kVlbVarLearned = 2 };
constexpr int kVlbTableCols = 8;

struct VlbTermsArgs {
  View3 mo, x0, xt;            // (N, C or 2C, S), (N, C, S), (N, C, S)
  View3 grad;                  // backward: shaped like mo
  int64_t mo_var = 0;          // element offset of mo's variance channels (C * mo's channel stride)
  int64_t grad_var = 0;        // the same in grad
  const int64_t* t = nullptr;  // (N,) timesteps, clamped to [0, T) in the kernels
  Table table;                 // (T, 8) row-major: c1, c2, lvq, lvp, D, a, b, dfix
  const double* g = nullptr;   // backward: (N,) float64 d loss / d terms
  double per = 0.0;            // 1 / (C S log 2): nats summed over a sample -> bits per dimension
  int64_t T = 0, N = 0, C = 0, S = 0;
  int var = kVlbVarFixed;
  bool clip = false, mean_grad = true;
};

namespace vlb {

constexpr float kVarFloor = 1e-20f;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;

struct Row {
  double c1, c2, lvq, lvp, D, a, b, dfix;
};

// Sample n's table row, its timestep clamped to [0, T).
DDPM_HD Row table_row(const VlbTermsArgs& a, int64_t n) {
  const int64_t tn = a.t[n];
  const int64_t o = (tn < 0 ? 0 : (tn >= a.T ? a.T - 1 : tn)) * kVlbTableCols;
  const Table& k = a.table;
  return Row{k.get<double>(o),     k.get<double>(o + 1), k.get<double>(o + 2), k.get<double>(o + 3),
             k.get<double>(o + 4), k.get<double>(o + 5), k.get<double>(o + 6), k.get<double>(o + 7)};
}

// ---------------------------------------------------------------- fp32 KL (t > 0)
// The fp32 functions are always inlined (on the host too): the CPU calls them in loops that must
// vectorise, with var, clip and mean_grad constant there. Exp is a functor, float -> float.
struct KlRow {
  float c1, a, b, lvq, lvp, D_half, dfix;
};

DDPM_HD_ALWAYS_INLINE KlRow kl_row(const Row& r) {
  return KlRow{float(r.c1), float(r.a), float(r.b), float(r.lvq), float(r.lvp), float(0.5 * r.D), float(r.dfix)};
}

// The math library's expf (CUDA).
struct LibExp {
  DDPM_HD_ALWAYS_INLINE float operator()(float x) const { return expf(x); }
};

// std::min(std::max(x, -1), 1), NaN passing through as it does there.
template <typename F>
DDPM_HD_ALWAYS_INLINE F clamp_unit(F x) {
  const F lo = x < F(-1) ? F(-1) : x;
  return F(1) < lo ? F(1) : lo;
}

// f(d) = d - 1 + exp(-d) >= 0: its Taylor series d^2 (1/2 - d/6 + ...) for |d| < 0.5, else directly.
template <typename Exp>
DDPM_HD_ALWAYS_INLINE float kl_var_term(float d) {
  float s = -2.7557319e-7f;  // -1/9!
  s = s * d + 2.4801587e-5f;
  s = s * d - 1.9841270e-4f;
  s = s * d + 1.3888889e-3f;
  s = s * d - 8.3333333e-3f;
  s = s * d + 4.1666667e-2f;
  s = s * d - 1.6666667e-1f;
  s = s * d + 0.5f;
  const float series = d * d * s;
  const float direct = (d - 1.0f) + Exp()(-d);
  return (d < 0.5f && d > -0.5f) ? series : direct;
}

// (d, lvp) of one element: the log-variance gap to the true posterior and the model log-variance.
DDPM_HD_ALWAYS_INLINE void kl_logvar(const KlRow& r, int var, float v, float* d, float* lvp) {
  using std::log;
  if (var == kVlbVarLearnedRange) {
    *d = (v + 1.0f) * r.D_half;
    *lvp = r.lvq + *d;
  } else if (var == kVlbVarLearned) {
    *lvp = log(v < kVarFloor ? kVarFloor : v);
    *d = *lvp - r.lvq;
  } else {
    *d = r.dfix;
    *lvp = r.lvp;
  }
}

// The KL term (nats) of one element; v: its variance channel (unused for the fixed variances).
template <typename Exp>
DDPM_HD_ALWAYS_INLINE float kl_value(const KlRow& r, int var, bool clip, float out, float v, float x0, float xt) {
  float x0p = r.a * xt + r.b * out;
  if (clip) x0p = clamp_unit(x0p);
  const float diff = r.c1 * (x0 - x0p);
  float d, lvp;
  kl_logvar(r, var, v, &d, &lvp);
  return 0.5f * (kl_var_term<Exp>(d) + diff * diff * Exp()(-lvp));
}

// d KL / d out (mean channel; 0 where !mean_grad) and d KL / d v (variance channel; 0 for the fixed
// variances), times scale.
template <typename Exp>
DDPM_HD_ALWAYS_INLINE void kl_grads(const KlRow& r, int var, bool clip, bool mean_grad, float scale, float out, float v,
                                    float x0, float xt, float* g_mean, float* g_var) {
  const float raw = r.a * xt + r.b * out;
  float x0p = raw, mask = 1.0f;
  if (clip) {
    x0p = clamp_unit(raw);
    mask = (raw >= -1.0f && raw <= 1.0f) ? 1.0f : 0.0f;
  }
  const float diff = r.c1 * (x0 - x0p);
  float d, lvp;
  kl_logvar(r, var, v, &d, &lvp);
  const float e = Exp()(-lvp);
  // dKL/dmu_p = -diff e; dmu_p/dout = c1 b (inside the clip)
  *g_mean = mean_grad ? -(diff * e) * (r.c1 * r.b) * mask * scale : 0.0f;
  *g_var = 0.0f;
  if (var != kVlbVarFixed) {
    // dKL/dlvp = 0.5 (1 - exp(-d) - diff^2 e), 1 - exp(-d) = d - f(d)
    const float dlvp = 0.5f * ((d - kl_var_term<Exp>(d)) - diff * diff * e);
    const float dv = var == kVlbVarLearnedRange ? r.D_half : (v > kVarFloor ? 1.0f / v : 0.0f);
    *g_var = dlvp * dv * scale;
  }
}

// ---------------------------------------------------------------- float64 elements (decoder, f64 KL)
// log Phi(z): log(erfc(-z / sqrt 2) / 2) while erfc is a normal double, else the asymptotic series.
DDPM_HD double log_ndtr(double z) {
  using std::erfc; using std::log; using std::log1p;
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
DDPM_HD BinNll bin_nll(double x, double m, double ls) {
  using std::exp; using std::expm1; using std::log;
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
    logp = lh + log(-expm1(0.0 < gap ? 0.0 : gap));  // std::min(gap, 0.0)
  }
  // d log P / dz at each end: phi(z) / P, in log space
  const double rb = has_b ? exp(-0.5 * zb * zb - kLogSqrt2Pi - logp) : 0.0;
  const double ra = has_a ? exp(-0.5 * za * za - kLogSqrt2Pi - logp) : 0.0;
  return BinNll{-logp, (rb - ra) * inv_s, rb * zb - ra * za};
}

struct Element {
  double value, g_mean, g_var;  // the term (nats) and its derivatives in the mean and variance outputs
};

DDPM_HD Element element64(const Row& r, int var, bool clip, bool decoder, double out, double v, double x0, double xt) {
  using std::exp; using std::log;
  const double raw = r.a * xt + r.b * out;
  const double x0p = clip ? clamp_unit(raw) : raw;
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
  const double f = (d < 0.5 && d > -0.5)
                       ? d * d *
                             (0.5 + d * (-1.0 / 6 + d * (1.0 / 24 + d * (-1.0 / 120 + d * (1.0 / 720 +
                              d * (-1.0 / 5040 + d * (1.0 / 40320 + d * (-1.0 / 362880 + d / 3628800))))))))
                       : (d - 1.0) + exp(-d);
  return Element{0.5 * (f + diff * diff * e), -(diff * e) * r.c1 * r.b * mask, 0.5 * ((d - f) - diff * diff * e) * dv};
}

}  // namespace vlb
}  // namespace ddpm_fast
