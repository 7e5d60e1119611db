// The per-sample coefficients and per-element arithmetic of one reverse step, shared by the
// C++ and CUDA kernels so that both compute exactly what reference.posterior_step does
// (same formulas, same order). F is the compute type: float, or double for float64 inputs.
#pragma once
#include <cmath>

#include "kernel_args.h"

namespace ddpm_fast {

template <typename F>
struct StepCoefs {
  F sqrt_a_t, sqrt_1m_a_t;
  F coef_x0, coef_xt;          // DDPM posterior mean (DDPM eq. 7)
  F log_beta_tilde, log_beta;  // learned_range bounds
  F sqrt_a_prev, dir_coef;     // DDIM (Song et al. eq. 12)
  F std;                       // sigma_t for the fixed variance types and DDIM
  F guide_x0;                  // DDIM with a guide: x0 + guide_x0 g, eps - sqrt(1 - a_t) g
  bool noisy;
};

DDPM_HD int64_t clamp_index(int64_t i, int64_t hi) { return i < 0 ? 0 : (i >= hi ? hi - 1 : i); }

template <typename F>
DDPM_HD StepCoefs<F> step_coefs(const PosteriorArgs& a, int64_t n) {
  using std::exp; using std::log; using std::sqrt;
  StepCoefs<F> k;
  const int64_t t = a.t[n], p = a.prev_t[n];
  const F one = F(1);
  const F a_t = a.alphas_cumprod.template get<F>(clamp_index(t, a.T));
  const F final_a = a.kind == kDDPM ? one : F(a.final_alpha_cumprod);
  const F a_prev = p >= 0 ? a.alphas_cumprod.template get<F>(clamp_index(p, a.T)) : final_a;
  k.sqrt_a_t = sqrt(a_t);
  k.sqrt_1m_a_t = sqrt(one - a_t);
  k.sqrt_a_prev = sqrt(a_prev);
  k.guide_x0 = (one - a_t) / k.sqrt_a_t;  // x0 of eps - sqrt(1 - a_t) g at fixed x_t
  if (a.kind == kDDPM) {
    const F current_alpha = a_t / a_prev;
    const F current_beta = one - current_alpha;
    k.coef_x0 = k.sqrt_a_prev * (one - current_alpha) / (one - a_t);
    k.coef_xt = sqrt(current_alpha) * (one - a_prev) / (one - a_t);
    F beta_tilde = (one - a_prev) / (one - a_t) * current_beta;
    beta_tilde = beta_tilde > F(1e-20) ? beta_tilde : F(1e-20);
    k.log_beta_tilde = log(beta_tilde);
    k.log_beta = log(current_beta);
    if (a.var == kFixedSmall) k.std = sqrt(beta_tilde);
    else if (a.var == kFixedSmallLog) k.std = exp(F(0.5) * k.log_beta_tilde);
    else if (a.var == kFixedLarge) k.std = sqrt(current_beta);
    else k.std = F(0);  // learned: per element
    k.noisy = t > 0;
    k.dir_coef = F(0);
  } else {
    // Clamped at 0: a_t / a_prev can round above 1 when a_t ~ a_prev (diffusers gives NaN there).
    // The direction subtracts sigma^2 itself (not std * std): exactly 0 at a_t = 0, eta = 1.
    const F ratio = (one - a_prev) / (one - a_t) * (one - a_t / a_prev);
    const F variance = F(a.eta * a.eta) * (ratio > F(0) ? ratio : F(0));
    k.std = sqrt(variance);
    const F d = one - a_prev - variance;
    k.dir_coef = sqrt(d > F(0) ? d : F(0));
    k.noisy = a.eta > 0.0;
    k.coef_x0 = k.coef_xt = k.log_beta_tilde = k.log_beta = F(0);
  }
  return k;
}

template <typename F>
DDPM_HD F predict_x0(F mo, F x, const StepCoefs<F>& k, int pred) {
  if (pred == kPredEps) return (x - k.sqrt_1m_a_t * mo) / k.sqrt_a_t;
  if (pred == kPredSample) return mo;
  return k.sqrt_a_t * x - k.sqrt_1m_a_t * mo;
}

template <typename F>
DDPM_HD F predict_eps(F mo, F x, const StepCoefs<F>& k, int pred) {
  if (pred == kPredEps) return mo;
  if (pred == kPredSample) return (x - k.sqrt_a_t * mo) / k.sqrt_1m_a_t;
  return k.sqrt_a_t * mo + k.sqrt_1m_a_t * x;
}

template <typename F>
DDPM_HD F clamp_value(F x, F lo, F hi) { return x < lo ? lo : (x > hi ? hi : x); }

template <typename F>
DDPM_HD F clip_x0(F x0, const PosteriorArgs& a, F thresh_s) {
  if (a.clip == kClip) return clamp_value(x0, F(-a.clip_range), F(a.clip_range));
  if (a.clip == kThreshold) return clamp_value(x0, -thresh_s, thresh_s) / thresh_s;
  return x0;
}

// One element: from the (guided) model output, its variance channel, x_t and z, returns x_prev
// and writes the clipped x0 prediction to *x0_out. g: the guide's element, applied after the x0
// clip as Dhariwal & Nichol do (unread without a guide): DDPM mean + sigma_t^2 g (condition_mean);
// DDIM eps - sqrt(1 - a_t) g and x0 + (1 - a_t) / sqrt(a_t) g (condition_score).
template <typename F>
DDPM_HD F step_element(const PosteriorArgs& a, const StepCoefs<F>& k, F mo, F variance, F x, F z, F thresh_s,
                       F* x0_out, F g = F(0)) {
  using std::exp; using std::sqrt;
  const F x0 = clip_x0(predict_x0(mo, x, k, a.pred), a, thresh_s);
  *x0_out = x0;
  F mean, std = k.std;
  if (a.kind == kDDPM) {
    mean = k.coef_x0 * x0 + k.coef_xt * x;
    if (a.var == kLearned) {
      std = sqrt(variance);
    } else if (a.var == kLearnedRange) {
      const F frac = (variance + F(1)) / F(2);
      std = exp(F(0.5) * (frac * k.log_beta + (F(1) - frac) * k.log_beta_tilde));
    }
    if (a.guide.ptr) mean = mean + std * std * g;
  } else {
    F eps = predict_eps(mo, x, k, a.pred);
    if (a.use_clipped_model_output) eps = (x - k.sqrt_a_t * x0) / k.sqrt_1m_a_t;
    F x0g = x0;
    if (a.guide.ptr) {
      x0g = x0 + k.guide_x0 * g;
      eps = eps - k.sqrt_1m_a_t * g;
      *x0_out = x0g;
    }
    mean = k.sqrt_a_prev * x0g + k.dir_coef * eps;
  }
  return k.noisy ? mean + std * z : mean;
}

}  // namespace ddpm_fast
