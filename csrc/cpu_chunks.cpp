// The vectorised fp32 stages of cpu_chunks.h, built for AVX-512, AVX2+FMA and baseline x86-64
// (cpu_isa.h's DDPM_ISA_VARIANTS: the active ISA's build runs, so tests can run each).
#include "cpu_chunks.h"

#include <cmath>

#include "cpu_isa.h"

#define DDPM_BODY static inline __attribute__((always_inline))

namespace ddpm_fast {
namespace {

DDPM_BODY float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// out <- uncond + s (cond - uncond)
DDPM_BODY void guide(int64_t len, float* out, const float* cond, float s) {
  for (int64_t i = 0; i < len; ++i) out[i] = out[i] + s * (cond[i] - out[i]);
}


DDPM_BODY void predict_x0_loop(const StepChunkParams& p, int64_t len, const float* out, const float* x, float* x0) {
  const float sa = p.k.sqrt_a_t, s1a = p.k.sqrt_1m_a_t;
  if (p.pred == kPredEps) {
    for (int64_t i = 0; i < len; ++i) x0[i] = (x[i] - s1a * out[i]) / sa;
  } else if (p.pred == kPredSample) {
    for (int64_t i = 0; i < len; ++i) x0[i] = out[i];
  } else {
    for (int64_t i = 0; i < len; ++i) x0[i] = sa * x[i] - s1a * out[i];
  }
}

}  // namespace

DDPM_BODY void abs_x0_chunk_f32_body(const StepChunkParams& p, int64_t len, float* __restrict__ out,
                                     const float* __restrict__ cond, const float* __restrict__ x,
                                     const float* __restrict__ g, float* __restrict__ abs_x0) {
  if (p.guided) guide(len, out, cond, p.guidance_scale);
  (void)g;  // the guide comes after the x0 limit: phase 1 reads the unguided x0
  predict_x0_loop(p, len, out, x, abs_x0);
  for (int64_t i = 0; i < len; ++i) abs_x0[i] = std::fabs(abs_x0[i]);
}

DDPM_BODY void step_chunk_f32_body(const StepChunkParams& p, int64_t len, float* __restrict__ out,
                                   const float* __restrict__ cond, const float* __restrict__ var,
                                   const float* __restrict__ x, const float* __restrict__ z,
                                   const float* __restrict__ g, float* __restrict__ prev, float* __restrict__ x0) {
  if (p.guided) guide(len, out, cond, p.guidance_scale);
  predict_x0_loop(p, len, out, x, x0);
  if (p.clip == kClip) {
    const float r = p.clip_range;
    for (int64_t i = 0; i < len; ++i) x0[i] = clampf(x0[i], -r, r);
  } else if (p.clip == kThreshold) {
    const float s = p.thresh;
    for (int64_t i = 0; i < len; ++i) x0[i] = clampf(x0[i], -s, s) / s;
  }
  const StepCoefs<float>& k = p.k;
  if (p.kind == kDDPM) {
    for (int64_t i = 0; i < len; ++i) prev[i] = k.coef_x0 * x0[i] + k.coef_xt * x[i];
    if (g) {  // condition_mean: + sigma_t^2 g, sigma_t as the noise below takes it
      if (p.var == kLearned) {
        for (int64_t i = 0; i < len; ++i) {
          const float sd = std::sqrt(var[i]);
          prev[i] = prev[i] + sd * sd * g[i];
        }
      } else if (p.var == kLearnedRange) {
        for (int64_t i = 0; i < len; ++i) {
          const float frac = (var[i] + 1.0f) / 2.0f;
          const float sd = std::exp(0.5f * (frac * k.log_beta + (1.0f - frac) * k.log_beta_tilde));
          prev[i] = prev[i] + sd * sd * g[i];
        }
      } else {
        const float v = k.std * k.std;
        for (int64_t i = 0; i < len; ++i) prev[i] = prev[i] + v * g[i];
      }
    }
    if (!k.noisy || !z) return;
    if (p.var == kLearned) {
      for (int64_t i = 0; i < len; ++i) prev[i] = prev[i] + std::sqrt(var[i]) * z[i];
    } else if (p.var == kLearnedRange) {
      for (int64_t i = 0; i < len; ++i) {
        const float frac = (var[i] + 1.0f) / 2.0f;
        prev[i] = prev[i] + std::exp(0.5f * (frac * k.log_beta + (1.0f - frac) * k.log_beta_tilde)) * z[i];
      }
    } else {
      for (int64_t i = 0; i < len; ++i) prev[i] = prev[i] + k.std * z[i];
    }
    return;
  }
  // DDIM: the eps estimate goes in prev, then the update overwrites it.
  const float sa = k.sqrt_a_t, s1a = k.sqrt_1m_a_t;
  if (p.use_clipped_model_output) {
    for (int64_t i = 0; i < len; ++i) prev[i] = (x[i] - sa * x0[i]) / s1a;
  } else if (p.pred == kPredEps) {
    for (int64_t i = 0; i < len; ++i) prev[i] = out[i];
  } else if (p.pred == kPredSample) {
    for (int64_t i = 0; i < len; ++i) prev[i] = (x[i] - sa * out[i]) / s1a;
  } else {
    for (int64_t i = 0; i < len; ++i) prev[i] = sa * out[i] + s1a * x[i];
  }
  if (g) {  // condition_score after the clip: x0 + (1 - a) / sqrt(a) g, eps - sqrt(1 - a) g
    const float c = k.guide_x0;
    for (int64_t i = 0; i < len; ++i) {
      x0[i] = x0[i] + c * g[i];
      prev[i] = prev[i] - s1a * g[i];
    }
  }
  for (int64_t i = 0; i < len; ++i) prev[i] = k.sqrt_a_prev * x0[i] + k.dir_coef * prev[i];
  if (k.noisy && z) {
    for (int64_t i = 0; i < len; ++i) prev[i] = prev[i] + k.std * z[i];
  }
}

namespace {

template <bool kDDIM, bool kGuided, int kClipMode, bool kNoise>
inline __attribute__((always_inline)) void step_eps_loop(const StepChunkParams& p, int64_t len,
                                                         const float* __restrict__ out,
                                                         const float* __restrict__ cond,
                                                         const float* __restrict__ x, const float* __restrict__ z,
                                                         float* __restrict__ prev, float* __restrict__ x0) {
  const StepCoefs<float>& k = p.k;
  const float s = p.guidance_scale, r = p.clip_range, ts = p.thresh;
  for (int64_t i = 0; i < len; ++i) {
    float o = out[i];
    if constexpr (kGuided) o = o + s * (cond[i] - o);
    float x0v = (x[i] - k.sqrt_1m_a_t * o) / k.sqrt_a_t;
    if constexpr (kClipMode == kClip) x0v = clampf(x0v, -r, r);
    if constexpr (kClipMode == kThreshold) x0v = clampf(x0v, -ts, ts) / ts;
    x0[i] = x0v;
    float pv;
    if constexpr (kDDIM) {
      pv = k.sqrt_a_prev * x0v + k.dir_coef * o;
    } else {
      pv = k.coef_x0 * x0v + k.coef_xt * x[i];
    }
    if constexpr (kNoise) pv = pv + k.std * z[i];
    prev[i] = pv;
  }
}

template <bool kDDIM, bool kGuided, int kClipMode>
inline __attribute__((always_inline)) void step_eps_noise(const StepChunkParams& p, int64_t len, const float* out,
                                                          const float* cond, const float* x, const float* z,
                                                          float* prev, float* x0) {
  if (p.k.noisy && z) step_eps_loop<kDDIM, kGuided, kClipMode, true>(p, len, out, cond, x, z, prev, x0);
  else step_eps_loop<kDDIM, kGuided, kClipMode, false>(p, len, out, cond, x, z, prev, x0);
}

template <bool kDDIM, bool kGuided>
inline __attribute__((always_inline)) void step_eps_clip(const StepChunkParams& p, int64_t len, const float* out,
                                                         const float* cond, const float* x, const float* z,
                                                         float* prev, float* x0) {
  if (p.clip == kClip) step_eps_noise<kDDIM, kGuided, kClip>(p, len, out, cond, x, z, prev, x0);
  else if (p.clip == kThreshold) step_eps_noise<kDDIM, kGuided, kThreshold>(p, len, out, cond, x, z, prev, x0);
  else step_eps_noise<kDDIM, kGuided, kClipNone>(p, len, out, cond, x, z, prev, x0);
}

}  // namespace

DDPM_BODY void step_chunk_eps_f32_body(const StepChunkParams& p, int64_t len, const float* out, const float* cond,
                                       const float* x, const float* z, float* prev, float* x0) {
  if (p.kind == kDDIM) {
    if (p.guided) step_eps_clip<true, true>(p, len, out, cond, x, z, prev, x0);
    else step_eps_clip<true, false>(p, len, out, cond, x, z, prev, x0);
  } else {
    if (p.guided) step_eps_clip<false, true>(p, len, out, cond, x, z, prev, x0);
    else step_eps_clip<false, false>(p, len, out, cond, x, z, prev, x0);
  }
}

DDPM_BODY void q_sample_chunk_f32_body(float sa, float s1a, int target_kind, int64_t len,
                                       const float* __restrict__ x0, const float* __restrict__ z,
                                       float* __restrict__ x_t, float* __restrict__ target) {
  for (int64_t i = 0; i < len; ++i) x_t[i] = sa * x0[i] + s1a * z[i];
  if (target_kind == kTargetEps) {
    for (int64_t i = 0; i < len; ++i) target[i] = z[i];
  } else if (target_kind == kTargetX0) {
    for (int64_t i = 0; i < len; ++i) target[i] = x0[i];
  } else if (target_kind == kTargetV) {
    for (int64_t i = 0; i < len; ++i) target[i] = sa * z[i] - s1a * x0[i];
  }
}

// The entry points of cpu_chunks.h: each body above, built per ISA.
DDPM_ISA_VARIANTS(abs_x0_chunk_f32,
                  (const StepChunkParams& p, int64_t len, float* __restrict__ out, const float* __restrict__ cond,
                   const float* __restrict__ x, const float* __restrict__ g, float* __restrict__ abs_x0),
                  (p, len, out, cond, x, g, abs_x0))
DDPM_ISA_VARIANTS(step_chunk_f32,
                  (const StepChunkParams& p, int64_t len, float* __restrict__ out, const float* __restrict__ cond,
                   const float* __restrict__ var, const float* __restrict__ x, const float* __restrict__ z,
                   const float* __restrict__ g, float* __restrict__ prev, float* __restrict__ x0),
                  (p, len, out, cond, var, x, z, g, prev, x0))
DDPM_ISA_VARIANTS(step_chunk_eps_f32,
                  (const StepChunkParams& p, int64_t len, const float* out, const float* cond, const float* x,
                   const float* z, float* prev, float* x0),
                  (p, len, out, cond, x, z, prev, x0))
DDPM_ISA_VARIANTS(q_sample_chunk_f32,
                  (float sa, float s1a, int target_kind, int64_t len, const float* __restrict__ x0,
                   const float* __restrict__ z, float* __restrict__ x_t, float* __restrict__ target),
                  (sa, s1a, target_kind, len, x0, z, x_t, target))

}  // namespace ddpm_fast
