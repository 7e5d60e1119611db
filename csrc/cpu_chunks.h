// Chunked fp32 CPU arithmetic: a row of the (N, C, S) view is processed kChunk elements at a
// time, gathered into contiguous float buffers, run through one simple loop per stage (the
// config is branched on once per chunk, not per element, so the loops vectorise), then
// scattered back. Same formulas, in the same order, as step_math.h / noising_math.h.
#pragma once
#include <cstdint>

#include "kernel_args.h"
#include "step_math.h"

namespace ddpm_fast {

constexpr int64_t kChunk = 512;

// Per-row constants of one reverse step (fp32).
struct StepChunkParams {
  StepCoefs<float> k;
  float guidance_scale, clip_range, thresh;
  int kind, pred, var, clip;
  bool guided, use_clipped_model_output;
};

// out: model output (uncond half when guided), cond: cond half (guided only), var: variance
// channel, x: x_t, z: noise (noisy steps only). Writes prev and x0.
void step_chunk_f32(const StepChunkParams& p, int64_t len, float* out, const float* cond, const float* var,
                    const float* x, const float* z, float* prev, float* x0);

// |x0| only (phase 1 of dynamic thresholding).
void abs_x0_chunk_f32(const StepChunkParams& p, int64_t len, float* out, const float* cond, const float* x,
                      float* abs_x0);

// x_t = sa x0 + s1a z, and the training target.
void q_sample_chunk_f32(float sa, float s1a, int target_kind, int64_t len, const float* x0, const float* z,
                        float* x_t, float* target);

}  // namespace ddpm_fast
