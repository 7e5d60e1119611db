// One planned linear solver step on the CPU, fused: guidance combine, D_0 and its limit, x_next and
// the history writes in one pass over the tensors (solver_step.h). With abs_d0 given it runs phase 1
// of dynamic thresholding instead (writes |D_0| only).
//
// fp32 compute (every x dtype but float64): each (n, c) row goes kChunk elements at a time through
// float buffers (or the tensors themselves where they are float and stride 1); every row of the mix
// is computed in one loop, specialised on the number of slots, of writes and on the noise column so
// that it vectorises; built per vector ISA (cpu_isa.h) and, with -ffp-contract=off, the same bits in
// each build. Every history value of an element is read before any write to it.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu_chunks.h"
#include "cpu_isa.h"
#include "philox_cpu.h"
#include "solver_step.h"
#include "solver_step_op_args.h"

#define DDPM_BODY static inline __attribute__((always_inline))

namespace ddpm_fast {
namespace {

// ---------------------------------------------------------------- float64 (and generic) rows
template <typename M, typename X, typename F>
void solver_rows(const SolverStepArgs& a) {
  const M* mo = static_cast<const M*>(a.model_output.ptr);
  const X* xs = static_cast<const X*>(a.x.ptr);
  const X* noise = static_cast<const X*>(a.noise.ptr);
  const X* guide = static_cast<const X*>(a.guide.ptr);
  X* hist = static_cast<X*>(a.history.ptr);
  X* x_next = static_cast<X*>(a.x_next.ptr);
  F* abs_d0 = static_cast<F*>(a.abs_d0.ptr);
  const F* thresh = static_cast<const F*>(a.thresh_scale);
  const SolverCoefs<F> k = solver_coefs<F>(a);
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const bool draw = !noise && a.seed && !abs_d0;
  const bool has_z = (noise || a.seed) && !abs_d0;
  const F g = static_cast<F>(a.guidance_scale);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    float drawn[kNoiseChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      const F ts = thresh ? thresh[n] : F(1);
      for (int64_t s = 0; s < a.S; ++s) {
        if (draw && s % kNoiseChunk == 0) {
          philox_randn_fill(seed, static_cast<uint64_t>(row * a.S + s), std::min(kNoiseChunk, a.S - s), drawn);
        }
        const int64_t m = a.model_output.at(n, c, s);
        F out = static_cast<F>(mo[m]);
        if (a.guidance) out = out + g * (static_cast<F>(mo[m + a.mo_half]) - out);
        const F x = static_cast<F>(xs[a.x.at(n, c, s)]);
        if (abs_d0) {
          const F d0 = solver_d0(k, x, out);
          abs_d0[a.abs_d0.at(n, c, s)] = d0 < 0 ? -d0 : d0;
          continue;
        }
        F z = F(0);
        if (noise) z = static_cast<F>(noise[a.noise.at(n, c, s)]);
        else if (draw) z = static_cast<F>(static_cast<X>(drawn[s % kNoiseChunk]));  // as if stored
        const int64_t h_at = a.history.at(n, c, s);
        F h[kSolverMaxSlots];
        for (int r = 0; r < a.R; ++r) h[r] = static_cast<F>(hist[h_at + r * a.hist_slot]);
        F written[kSolverMaxWrites];
        const F g = guide ? static_cast<F>(guide[a.guide.at(n, c, s)]) : F(0);
        const F next = solver_element<F>(a, k, x, out, z, has_z, h, ts, written, g);
        x_next[a.x_next.at(n, c, s)] = static_cast<X>(next);
        for (int w = 0; w < a.W; ++w) {
          if (k.slot[w] < a.R) hist[h_at + k.slot[w] * a.hist_slot] = static_cast<X>(written[w]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- fp32 chunks, per ISA
struct SolverChunkParams {
  float to_d_x, to_d_out, guidance_scale, clip_range, thresh, guide_coef;
  float mix[1 + kSolverMaxWrites][kSolverCols];
  int R, W, limit;
  bool guided, has_z, phase1;
};

// The rows of one chunk: inputs (read only), buffers and destinations. rows[0] receives x_next,
// rows[1 + w] write w: the history slot itself where it is float and stride 1 (each element's
// values are all read before its writes), else a buffer stored into the slot afterwards.
struct SolverChunkRows {
  const float* out;   // model output (uncond half when guided)
  const float* cond;  // cond half (guided)
  const float* g;     // the guidance gradient, or null
  const float* x;
  const float* z;     // has_z
  const float* h[kSolverMaxSlots];
  float* guided;      // buffer: the combined output (guided)
  float* d0;          // buffer
  float* abs_d0;      // phase 1
  float* rows[1 + kSolverMaxWrites];
};

// One row of the mix at one element, in apply_step's order (solver_step.h: solver_row).
template <int NH, bool Z>
DDPM_BODY float mix_value(const float* m, float x, float o, float d, float z, float h0, float h1, float h2,
                          float h3) {
  float acc = m[kColX] * x + m[kColOut] * o;
  acc = acc + m[kColD0] * d;
  if constexpr (Z) acc = acc + m[kColNoise] * z;
  if constexpr (NH > 0) {
    float hs = m[kColHist] * h0;
    if constexpr (NH > 1) hs = hs + m[kColHist + 1] * h1;
    if constexpr (NH > 2) hs = hs + m[kColHist + 2] * h2;
    if constexpr (NH > 3) hs = hs + m[kColHist + 3] * h3;
    acc = acc + hs;
  }
  return acc;
}

// Every row of the mix in one loop: each element's inputs are read, then its 1 + NW values
// written (no element is read after another one's write, so the history slots may be written in
// place; ivdep: no dependence between iterations).
template <int NH, int NW, bool Z>
DDPM_BODY void mix_rows_loop(const SolverChunkParams& p, int64_t len, const float* x, const float* o,
                             const float* d, const float* z, const float* const* h, float* const* rows) {
  float m[1 + kSolverMaxWrites][kSolverCols];
  for (int k = 0; k <= NW; ++k)
    for (int c = 0; c < kSolverCols; ++c) m[k][c] = p.mix[k][c];
  const float* h0 = h[0];
  const float* h1 = h[1];
  const float* h2 = h[2];
  const float* h3 = h[3];
  float* r0 = rows[0];
  float* r1 = rows[1];
  float* r2 = rows[2];
#pragma GCC ivdep
  for (int64_t i = 0; i < len; ++i) {
    const float xv = x[i], ov = o[i], dv = d[i];
    const float zv = Z ? z[i] : 0.0f;
    const float a = NH > 0 ? h0[i] : 0.0f, b = NH > 1 ? h1[i] : 0.0f;
    const float c = NH > 2 ? h2[i] : 0.0f, e = NH > 3 ? h3[i] : 0.0f;
    const float v0 = mix_value<NH, Z>(m[0], xv, ov, dv, zv, a, b, c, e);
    const float v1 = NW > 0 ? mix_value<NH, Z>(m[1], xv, ov, dv, zv, a, b, c, e) : 0.0f;
    const float v2 = NW > 1 ? mix_value<NH, Z>(m[2], xv, ov, dv, zv, a, b, c, e) : 0.0f;
    r0[i] = v0;
    if constexpr (NW > 0) r1[i] = v1;
    if constexpr (NW > 1) r2[i] = v2;
  }
}

template <int NW, bool Z>
DDPM_BODY void mix_rows_slots(const SolverChunkParams& p, int64_t len, const float* x, const float* o,
                              const float* d, const float* z, const float* const* h, float* const* rows) {
  switch (p.R) {
    case 0: mix_rows_loop<0, NW, Z>(p, len, x, o, d, z, h, rows); break;
    case 1: mix_rows_loop<1, NW, Z>(p, len, x, o, d, z, h, rows); break;
    case 2: mix_rows_loop<2, NW, Z>(p, len, x, o, d, z, h, rows); break;
    case 3: mix_rows_loop<3, NW, Z>(p, len, x, o, d, z, h, rows); break;
    default: mix_rows_loop<4, NW, Z>(p, len, x, o, d, z, h, rows); break;
  }
}

template <bool Z>
DDPM_BODY void mix_rows(const SolverChunkParams& p, int64_t len, const float* x, const float* o, const float* d,
                        const float* z, const float* const* h, float* const* rows) {
  switch (p.W) {
    case 0: mix_rows_slots<0, Z>(p, len, x, o, d, z, h, rows); break;
    case 1: mix_rows_slots<1, Z>(p, len, x, o, d, z, h, rows); break;
    default: mix_rows_slots<2, Z>(p, len, x, o, d, z, h, rows); break;
  }
}

DDPM_BODY float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

DDPM_BODY void d0_loop(const SolverChunkParams& p, int64_t len, const float* __restrict__ x,
                       const float* __restrict__ o, float* __restrict__ d) {
  const float a = p.to_d_x, b = p.to_d_out;
  for (int64_t i = 0; i < len; ++i) d[i] = a * x[i] + b * o[i];
}

DDPM_BODY void solver_chunk_f32_body(const SolverChunkParams& p, int64_t len, const SolverChunkRows& r) {
  const float* o = r.out;
  if (p.guided) {
    float* __restrict__ gd = r.guided;
    const float* __restrict__ u = r.out;
    const float* __restrict__ cd = r.cond;
    const float s = p.guidance_scale;
    for (int64_t i = 0; i < len; ++i) gd[i] = u[i] + s * (cd[i] - u[i]);
    o = gd;
  }
  if (p.phase1) {
    d0_loop(p, len, r.x, o, r.abs_d0);
    float* __restrict__ ab = r.abs_d0;
    for (int64_t i = 0; i < len; ++i) ab[i] = std::fabs(ab[i]);
    return;
  }
  d0_loop(p, len, r.x, o, r.d0);
  float* __restrict__ d = r.d0;
  if (p.limit == kLimitClip) {
    const float c = p.clip_range;
    for (int64_t i = 0; i < len; ++i) d[i] = clampf(d[i], -c, c);
  } else if (p.limit == kLimitDynamic) {
    const float s = p.thresh;
    for (int64_t i = 0; i < len; ++i) d[i] = clampf(d[i], -s, s) / s;
  }
  if (r.g) {  // after the limit: out + c g, D_0 + to_d_out c g (solver_step.h: solver_element)
    float* gd = r.guided;  // may be o itself (guided): each element read before written
    const float* __restrict__ g = r.g;
    const float c = p.guide_coef, q = p.to_d_out;
    for (int64_t i = 0; i < len; ++i) {
      const float shift = c * g[i];
      gd[i] = o[i] + shift;
      d[i] = d[i] + q * shift;
    }
    o = gd;
  }
  if (p.has_z) mix_rows<true>(p, len, r.x, o, d, r.z, r.h, r.rows);
  else mix_rows<false>(p, len, r.x, o, d, r.z, r.h, r.rows);
}

DDPM_ISA_VARIANTS(solver_chunk_f32, (const SolverChunkParams& p, int64_t len, const SolverChunkRows& r), (p, len, r))

template <typename M, typename X>
void solver_rows_f32(const SolverStepArgs& a) {
  const M* mo = static_cast<const M*>(a.model_output.ptr);
  const X* xs = static_cast<const X*>(a.x.ptr);
  const X* noise = static_cast<const X*>(a.noise.ptr);
  const X* guide = static_cast<const X*>(a.guide.ptr);
  X* hist = static_cast<X*>(a.history.ptr);
  X* x_next = static_cast<X*>(a.x_next.ptr);
  float* abs_d0 = static_cast<float*>(a.abs_d0.ptr);
  const float* thresh = static_cast<const float*>(a.thresh_scale);
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const SolverCoefs<float> k = solver_coefs<float>(a);
  SolverChunkParams base{};
  base.to_d_x = k.to_d_x, base.to_d_out = k.to_d_out, base.guide_coef = k.guide_coef;
  base.guidance_scale = static_cast<float>(a.guidance_scale), base.clip_range = static_cast<float>(a.clip_range);
  for (int row = 0; row <= kSolverMaxWrites; ++row)
    for (int c = 0; c < kSolverCols; ++c) base.mix[row][c] = k.mix[row][c];
  base.R = a.R, base.W = a.W, base.limit = a.limit, base.guided = a.guidance;
  base.phase1 = abs_d0 != nullptr;
  base.has_z = !base.phase1 && (noise || a.seed);
  const bool draw = base.has_z && !noise;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    float out_b[kChunk], cond_b[kChunk], guided_b[kChunk], x_b[kChunk], z_b[kChunk], d0_b[kChunk], g_b[kChunk];
    float h_b[kSolverMaxSlots][kChunk], row_b[1 + kSolverMaxWrites][kChunk];
    SolverChunkParams p = base;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      p.thresh = thresh ? thresh[n] : 1.0f;
      for (int64_t s0 = 0; s0 < a.S; s0 += kChunk) {
        const int64_t len = std::min(kChunk, a.S - s0);
        SolverChunkRows r{};
        const int64_t m0 = a.model_output.at(n, c, s0), ms = a.model_output.ss;
        r.out = row_in(mo + m0, ms, len, out_b);
        if (a.guidance) r.cond = row_in(mo + m0 + a.mo_half, ms, len, cond_b);
        r.guided = guided_b, r.d0 = d0_b;
        if (guide) r.g = row_in(guide + a.guide.at(n, c, s0), a.guide.ss, len, g_b);
        r.x = row_in(xs + a.x.at(n, c, s0), a.x.ss, len, x_b);
        if (p.phase1) {
          float* dst = abs_d0 + a.abs_d0.at(n, c, s0);
          r.abs_d0 = row_out(dst, a.abs_d0.ss, row_b[0]);
          solver_chunk_f32(p, len, r);
          row_out_done(r.abs_d0, len, dst, a.abs_d0.ss);
          continue;
        }
        if (noise) {
          r.z = row_in(noise + a.noise.at(n, c, s0), a.noise.ss, len, z_b);
        } else if (draw) {
          philox_randn_fill(seed, static_cast<uint64_t>(row * a.S + s0), len, z_b);
          if constexpr (!std::is_same_v<X, float>) {
            for (int64_t i = 0; i < len; ++i) z_b[i] = static_cast<float>(static_cast<X>(z_b[i]));  // as if stored
          }
          r.z = z_b;
        }
        const int64_t h_at = a.history.at(n, c, s0);
        for (int q = 0; q < kSolverMaxSlots; ++q) {
          r.h[q] = q < a.R ? row_in(hist + h_at + q * a.hist_slot, a.history.ss, len, h_b[q]) : nullptr;
        }
        X* next_dst = x_next + a.x_next.at(n, c, s0);
        r.rows[0] = row_out(next_dst, a.x_next.ss, row_b[0]);
        for (int w = 0; w < kSolverMaxWrites; ++w) {  // the scratch slot: computed, not stored
          r.rows[1 + w] = w < a.W && k.slot[w] < a.R
                              ? row_out(hist + h_at + k.slot[w] * a.hist_slot, a.history.ss, row_b[1 + w])
                              : row_b[1 + w];
        }
        solver_chunk_f32(p, len, r);
        row_out_done(r.rows[0], len, next_dst, a.x_next.ss);
        for (int w = 0; w < a.W; ++w) {  // buffered writes, after every read of the chunk
          if (k.slot[w] < a.R) row_out_done(r.rows[1 + w], len, hist + h_at + k.slot[w] * a.hist_slot, a.history.ss);
        }
      }
    }
  });
}

void solver_step_cpu(const at::Tensor& model_output, const at::Tensor& x, const at::Tensor& history,
                     const std::optional<at::Tensor>& step_t, int64_t step, const at::Tensor& to_d_x,
                     const at::Tensor& to_d_out, const at::Tensor& mix, const at::Tensor& write_slot,
                     const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                     const std::optional<at::Tensor>& thresh_scale, const at::Tensor& x_next,
                     const std::optional<at::Tensor>& abs_d0, double guidance_scale, double clip_range, int64_t limit,
                     bool guidance, const std::optional<at::Tensor>& guide,
                     const std::optional<at::Tensor>& guide_coef) {
  const SolverStepArgs a =
      make_solver_step_args(model_output, x, history, step_t, step, to_d_x, to_d_out, mix, write_slot, noise, seed,
                            thresh_scale, x_next, abs_d0, guidance_scale, clip_range, limit, guidance, guide,
                            guide_coef);
  if (a.N * a.C * a.S == 0) return;
  dispatch_float(x.scalar_type(), [&](auto xtag) {
    using X = decltype(xtag);
    dispatch_float(model_output.scalar_type(), [&](auto mtag) {
      using M = decltype(mtag);
      if constexpr (std::is_same_v<X, double>) solver_rows<M, X, double>(a);
      else solver_rows_f32<M, X>(a);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast_C, CPU, m) { m.impl("solver_step", &solver_step_cpu); }

}  // namespace ddpm_fast
