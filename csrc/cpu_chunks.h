// Chunked fp32 CPU arithmetic: a row of the (N, C, S) view is processed kChunk elements at a
// time, gathered into contiguous float buffers, run through one simple loop per stage (the
// config is branched on once per chunk, not per element, so the loops vectorise), then
// scattered back. Same formulas, in the same order, as step_math.h / noising_math.h.
#pragma once
#include <cstdint>
#include <type_traits>

#include "kernel_args.h"
#include "step_math.h"

namespace ddpm_fast {

constexpr int64_t kChunk = 512;

// Row gather/scatter between a strided tensor row and a float buffer. Stride-1 rows (NCHW)
// get their own loop: with a runtime stride the compiler leaves the loop scalar, and that
// scalar copy cost more than the arithmetic (q_sample ran at half of torch.compile's speed).
template <typename X>
inline void load_row(const X* src, int64_t stride, int64_t len, float* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i * stride]);
  }
}

template <typename X>
inline void store_row(const float* src, int64_t len, X* dst, int64_t stride) {
  if (stride == 1) {
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<X>(src[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i * stride] = static_cast<X>(src[i]);
  }
}

// A read-only float view of a row: the tensor itself when it is float and stride 1 (no copy),
// else `buf` filled by load_row.
template <typename X>
inline const float* row_in(const X* src, int64_t stride, int64_t len, float* buf) {
  if constexpr (std::is_same_v<X, float>) {
    if (stride == 1) return src;
  }
  load_row(src, stride, len, buf);
  return buf;
}

// Where to compute an output row: the tensor itself when it is float and stride 1, else
// `buf`, which row_out_done then scatters.
template <typename X>
inline float* row_out(X* dst, int64_t stride, float* buf) {
  if constexpr (std::is_same_v<X, float>) {
    if (stride == 1) return dst;
  }
  return buf;
}

template <typename X>
inline void row_out_done(const float* computed, int64_t len, X* dst, int64_t stride) {
  if (static_cast<const void*>(computed) != static_cast<const void*>(dst)) store_row(computed, len, dst, stride);
}

// Per-row constants of one reverse step (fp32).
struct StepChunkParams {
  StepCoefs<float> k;
  float guidance_scale, clip_range, thresh;
  int kind, pred, var, clip;
  bool guided, use_clipped_model_output;
};

// out: model output (uncond half when guided), cond: cond half (guided only), var: variance
// channel, x: x_t, z: noise (noisy steps only), g: the guidance gradient or null (step_math.h:
// guided_output, step_element). Writes prev and x0.
void step_chunk_f32(const StepChunkParams& p, int64_t len, float* out, const float* cond, const float* var,
                    const float* x, const float* z, const float* g, float* prev, float* x0);

// The common configurations, which step_chunk_eps_f32 runs in one loop: eps prediction, fixed
// variance, any clipping (none, a range, or dynamic thresholding's phase 2 with its scale), no
// clipped-model-output DDIM.
inline bool eps_fast_ok(const StepChunkParams& p) {
  return p.pred == kPredEps && p.var != kLearned && p.var != kLearnedRange &&
         !(p.kind == kDDIM && p.use_clipped_model_output);
}

// step_chunk_f32 for eps_fast_ok configurations: same formulas and order, but every stage stays
// in registers (step_chunk_f32 makes ~6 passes over L1 buffers). out and cond are only read.
void step_chunk_eps_f32(const StepChunkParams& p, int64_t len, const float* out, const float* cond,
                        const float* x, const float* z, float* prev, float* x0);

// |x0| only (phase 1 of dynamic thresholding); g: the guidance gradient or null.
void abs_x0_chunk_f32(const StepChunkParams& p, int64_t len, float* out, const float* cond, const float* x,
                      const float* g, float* abs_x0);

// x_t = sa x0 + s1a z, and the training target.
void q_sample_chunk_f32(float sa, float s1a, int target_kind, int64_t len, const float* x0, const float* z,
                        float* x_t, float* target);

}  // namespace ddpm_fast
