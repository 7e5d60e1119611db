// One reverse step (DDPM ancestral or DDIM) on the CPU, fused: guidance combine, x0
// prediction, clip/threshold, posterior mean and noise in one pass over the tensors.
// With abs_x0 given it runs phase 1 of dynamic thresholding instead (writes |x0| only).
#include <ATen/Parallel.h>

#include "cpu_chunks.h"
#include "op_args.h"
#include "philox_cpu.h"
#include "step_math.h"

namespace ddpm_fast {
namespace {

template <typename M, typename X, typename F>
void posterior_rows(const PosteriorArgs& a) {
  const M* mo = static_cast<const M*>(a.model_output.ptr);
  const X* sample = static_cast<const X*>(a.sample.ptr);
  const X* noise = static_cast<const X*>(a.noise.ptr);
  const X* guide = static_cast<const X*>(a.guide.ptr);
  X* prev = static_cast<X*>(a.prev.ptr);
  X* pred_x0 = static_cast<X*>(a.pred_x0.ptr);
  F* abs_x0 = static_cast<F*>(a.abs_x0.ptr);
  const F* thresh = static_cast<const F*>(a.thresh_scale);
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t var_offset = a.mo_var + (a.guidance ? a.mo_half : 0);  // variance from the cond half
  const F g = static_cast<F>(a.guidance_scale);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      const StepCoefs<F> k = step_coefs<F>(a, n);
      const F ts = thresh ? thresh[n] : F(1);
      const bool draw = k.noisy && !noise && !abs_x0;
      float drawn_chunk[kNoiseChunk];
      for (int64_t s = 0; s < a.S; ++s) {
        if (draw && s % kNoiseChunk == 0) {
          philox_randn_fill(seed, static_cast<uint64_t>(row * a.S + s), std::min(kNoiseChunk, a.S - s), drawn_chunk);
        }
        const int64_t m = a.model_output.at(n, c, s);
        F out = static_cast<F>(mo[m]);
        if (a.guidance) out = out + g * (static_cast<F>(mo[m + a.mo_half]) - out);
        const F x = static_cast<F>(sample[a.sample.at(n, c, s)]);
        const F g = guide ? static_cast<F>(guide[a.guide.at(n, c, s)]) : F(0);
        if (abs_x0) {
          const F x0 = predict_x0<F>(out, x, k, a.pred);
          abs_x0[a.abs_x0.at(n, c, s)] = x0 < 0 ? -x0 : x0;
          continue;
        }
        const F variance = a.has_variance ? static_cast<F>(mo[m + var_offset]) : F(0);
        F z = F(0);
        if (k.noisy) {
          z = noise ? static_cast<F>(noise[a.noise.at(n, c, s)])
                    : static_cast<F>(static_cast<X>(drawn_chunk[s % kNoiseChunk]));
        }
        F x0;
        const F p = step_element<F>(a, k, out, variance, x, z, ts, &x0, g);
        prev[a.prev.at(n, c, s)] = static_cast<X>(p);
        if (pred_x0) pred_x0[a.pred_x0.at(n, c, s)] = static_cast<X>(x0);
      }
    }
  });
}

// fp32 compute (every input dtype but float64): chunks through cpu_chunks.h's vector loops.
template <typename M, typename X>
void posterior_rows_f32(const PosteriorArgs& a) {
  const M* mo = static_cast<const M*>(a.model_output.ptr);
  const X* sample = static_cast<const X*>(a.sample.ptr);
  const X* noise = static_cast<const X*>(a.noise.ptr);
  const X* guide = static_cast<const X*>(a.guide.ptr);
  X* prev = static_cast<X*>(a.prev.ptr);
  X* pred_x0 = static_cast<X*>(a.pred_x0.ptr);
  float* abs_x0 = static_cast<float*>(a.abs_x0.ptr);
  const float* thresh = static_cast<const float*>(a.thresh_scale);
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t var_offset = a.mo_var + (a.guidance ? a.mo_half : 0);  // variance from the cond half
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    float out[kChunk], cond[kChunk], var[kChunk], xb[kChunk], z[kChunk], p[kChunk], x0[kChunk], gb[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      StepChunkParams params{step_coefs<float>(a, n), static_cast<float>(a.guidance_scale),
                             static_cast<float>(a.clip_range), thresh ? thresh[n] : 1.0f,
                             a.kind, a.pred, a.var, a.clip, a.guidance, a.use_clipped_model_output};
      const bool need_noise = params.k.noisy && !abs_x0 && (noise || a.seed);
      // eps prediction, fixed variance, clip or none, no guide: the fused single loop (else the stages)
      const bool eps_fast = !abs_x0 && !guide && eps_fast_ok(params);
      for (int64_t s0 = 0; s0 < a.S; s0 += kChunk) {
        const int64_t len = std::min(kChunk, a.S - s0);
        const int64_t m0 = a.model_output.at(n, c, s0), ms = a.model_output.ss;
        const float* x = row_in(sample + a.sample.at(n, c, s0), a.sample.ss, len, xb);
        const float* g = guide ? row_in(guide + a.guide.at(n, c, s0), a.guide.ss, len, gb) : nullptr;
        if (abs_x0) {
          load_row(mo + m0, ms, len, out);  // copies: guidance combines into out in place
          if (a.guidance) load_row(mo + m0 + a.mo_half, ms, len, cond);
          float* dst = abs_x0 + a.abs_x0.at(n, c, s0);
          float* ab = row_out(dst, a.abs_x0.ss, p);
          abs_x0_chunk_f32(params, len, out, cond, x, g, ab);
          row_out_done(ab, len, dst, a.abs_x0.ss);
          continue;
        }
        const float* zp = nullptr;
        if (need_noise && noise) {
          zp = row_in(noise + a.noise.at(n, c, s0), a.noise.ss, len, z);
        } else if (need_noise) {
          philox_randn_fill(seed, static_cast<uint64_t>(row * a.S + s0), len, z);
          if constexpr (!std::is_same_v<X, float>) {
            for (int64_t i = 0; i < len; ++i) z[i] = static_cast<float>(static_cast<X>(z[i]));  // as if stored
          }
          zp = z;
        }
        X* prev_dst = prev + a.prev.at(n, c, s0);
        float* pv = row_out(prev_dst, a.prev.ss, p);
        X* x0_dst = pred_x0 ? pred_x0 + a.pred_x0.at(n, c, s0) : nullptr;
        float* x0v = pred_x0 ? row_out(x0_dst, a.pred_x0.ss, x0) : x0;
        if (eps_fast) {
          // the fused loop only reads the model output: float stride-1 rows are used in place
          const float* o = row_in(mo + m0, ms, len, out);
          const float* cd = a.guidance ? row_in(mo + m0 + a.mo_half, ms, len, cond) : nullptr;
          step_chunk_eps_f32(params, len, o, cd, x, zp, pv, x0v);
        } else {
          load_row(mo + m0, ms, len, out);  // copies: guidance combines into out in place
          if (a.guidance) load_row(mo + m0 + a.mo_half, ms, len, cond);
          if (a.has_variance) load_row(mo + m0 + var_offset, ms, len, var);
          step_chunk_f32(params, len, out, cond, var, x, zp, g, pv, x0v);
        }
        row_out_done(pv, len, prev_dst, a.prev.ss);
        if (pred_x0) row_out_done(x0v, len, x0_dst, a.pred_x0.ss);
      }
    }
  });
}

void posterior_step_cpu(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& t,
                        const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
                        const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                        const std::optional<at::Tensor>& thresh_scale, const at::Tensor& prev,
                        const std::optional<at::Tensor>& pred_x0, const std::optional<at::Tensor>& abs_x0,
                        double final_alpha_cumprod, double guidance_scale, double clip_range, double eta, int64_t kind,
                        int64_t pred, int64_t var, int64_t clip, bool guidance, bool use_clipped_model_output,
                        const std::optional<at::Tensor>& guide) {
  const PosteriorArgs a = make_posterior_args(model_output, sample, t, prev_t, alphas_cumprod, noise, seed,
                                              thresh_scale, prev, pred_x0, abs_x0, final_alpha_cumprod,
                                              guidance_scale, clip_range, eta, kind, pred, var, clip, guidance,
                                              use_clipped_model_output, guide);
  DDPM_CHECK(noise.has_value() || seed.has_value() || abs_x0.has_value() || (kind == kDDIM && eta == 0.0),
             "ddpm_fast: this step adds noise: pass noise or a seed");
  dispatch_float(sample.scalar_type(), [&](auto xtag) {
    using X = decltype(xtag);
    dispatch_float(model_output.scalar_type(), [&](auto mtag) {
      using M = decltype(mtag);
      if constexpr (std::is_same_v<X, double>) posterior_rows<M, X, double>(a);
      else if constexpr (std::is_same_v<M, double>) posterior_rows<M, X, float>(a);
      else posterior_rows_f32<M, X>(a);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast_C, CPU, m) { m.impl("posterior_step", &posterior_step_cpu); }

}  // namespace ddpm_fast
