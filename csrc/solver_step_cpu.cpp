// One planned linear solver step on the CPU, fused: guidance combine, D_0 and its limit, x_next and
// the history writes in one pass over the tensors (solver_step.h). With abs_d0 given it runs phase 1
// of dynamic thresholding instead (writes |D_0| only).
//
// fp32 compute (every x dtype but float64): float tensors that are contiguous (N, C, S) blocks go
// through in runs of whole rows (no guidance, guide, drawn noise or dynamic threshold); else each
// (n, c) row goes kChunk elements at a time through float buffers (or the tensors themselves where
// they are float and stride 1). D_0, its limit and every row of the mix are computed in one loop
// (with a guide, D_0 goes through a buffer first), specialised on the number of slots read, of
// writes, on the noise column and on how D_0 is made, so that it vectorises; only the slots with a
// nonzero coefficient are read, only the writes into real slots computed, and D_0 only where a row
// uses it; built per vector ISA (cpu_isa.h) and, with -ffp-contract=off, the same bits in each
// build. Every history value of an element is read before any write to it.
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
        for (int r = 0; r < a.R; ++r) h[r] = k.reads[r] ? static_cast<F>(hist[h_at + r * a.hist_slot]) : F(0);
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
  float lo, hi;  // D_0's clamp: +-clip_range (clip), +-thresh (dynamic, then / thresh), +-inf (none)
  // The mix with its slot columns compacted: column kColHist + j is the j-th slot read.
  float mix[1 + kSolverMaxWrites][kSolverCols];
  int reads;  // the slots with a nonzero coefficient this step (the others are not read)
  int W;      // the writes into real slots (a write into the scratch slot is not computed)
  int limit;
  bool guided, has_z, phase1;
  bool uses_d0;  // some row has a nonzero D_0 coefficient
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
  const float* h[kSolverMaxSlots];  // the slots read, compacted as SolverChunkParams::mix
  float* guided;      // buffer: the combined output (guided)
  float* d0;          // buffer (with a guide)
  float* abs_d0;      // phase 1
  float* rows[1 + kSolverMaxWrites];
};

// One row of the mix at one element, in apply_step's order (solver_step.h: solver_row). Without D
// (its column zero in every row) its term, 0 * D_0, is left out: the same sum.
template <int NH, bool Z, bool D>
DDPM_BODY float mix_value(const float* m, float x, float o, float d, float z, float h0, float h1, float h2,
                          float h3) {
  float acc = m[kColX] * x + m[kColOut] * o;
  if constexpr (D) acc = acc + m[kColD0] * d;
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

DDPM_BODY float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Where D_0 comes from: a buffer (computed, limited and shifted by a guide beforehand), or computed
// in the loop from x and the output (plain, clipped to [lo, hi], or clamped to the sample's
// threshold and divided by it), or nowhere: its column is zero in every row (a folded plan's rows
// that only mix x and the output) and it is not computed.
enum DSource : int { kDBuffer = 0, kDUnused = 1, kDPlain = 2, kDClip = 3, kDDynamic = 4 };

// Every row of the mix in one loop: each element's inputs are read, then its 1 + NW values
// written (no element is read after another one's write, so the history slots may be written in
// place; ivdep: no dependence between iterations). Without a guide (DS != kDBuffer) the whole step
// stays in registers: one pass over the tensors, no buffer.
template <int NH, int NW, bool Z, int DS>
DDPM_BODY void mix_rows_loop(const SolverChunkParams& p, int64_t len, const float* x, const float* o,
                             const float* d, const float* z, const float* const* h, float* const* rows) {
  float m[1 + kSolverMaxWrites][kSolverCols];
  for (int k = 0; k <= NW; ++k)
    for (int c = 0; c < kSolverCols; ++c) m[k][c] = p.mix[k][c];
  const float to_x = p.to_d_x, to_o = p.to_d_out, lo = p.lo, hi = p.hi, thresh = p.thresh;
  const float* h0 = h[0];
  const float* h1 = h[1];
  const float* h2 = h[2];
  const float* h3 = h[3];
  float* r0 = rows[0];
  float* r1 = rows[1];
  float* r2 = rows[2];
#pragma GCC ivdep
  for (int64_t i = 0; i < len; ++i) {
    const float xv = x[i], ov = o[i];
    float dv = 0.0f;
    if constexpr (DS == kDBuffer) dv = d[i];
    if constexpr (DS >= kDPlain) dv = to_x * xv + to_o * ov;
    if constexpr (DS >= kDClip) dv = clampf(dv, lo, hi);
    if constexpr (DS == kDDynamic) dv = dv / thresh;
    const float zv = Z ? z[i] : 0.0f;
    const float a = NH > 0 ? h0[i] : 0.0f, b = NH > 1 ? h1[i] : 0.0f;
    const float c = NH > 2 ? h2[i] : 0.0f, e = NH > 3 ? h3[i] : 0.0f;
    constexpr bool D = DS != kDUnused;
    const float v0 = mix_value<NH, Z, D>(m[0], xv, ov, dv, zv, a, b, c, e);
    const float v1 = NW > 0 ? mix_value<NH, Z, D>(m[1], xv, ov, dv, zv, a, b, c, e) : 0.0f;
    const float v2 = NW > 1 ? mix_value<NH, Z, D>(m[2], xv, ov, dv, zv, a, b, c, e) : 0.0f;
    r0[i] = v0;
    if constexpr (NW > 0) r1[i] = v1;
    if constexpr (NW > 1) r2[i] = v2;
  }
}

template <int NW, bool Z, int DS>
DDPM_BODY void mix_rows_slots(const SolverChunkParams& p, int64_t len, const float* x, const float* o,
                              const float* d, const float* z, const float* const* h, float* const* rows) {
  switch (p.reads) {
    case 0: mix_rows_loop<0, NW, Z, DS>(p, len, x, o, d, z, h, rows); break;
    case 1: mix_rows_loop<1, NW, Z, DS>(p, len, x, o, d, z, h, rows); break;
    case 2: mix_rows_loop<2, NW, Z, DS>(p, len, x, o, d, z, h, rows); break;
    case 3: mix_rows_loop<3, NW, Z, DS>(p, len, x, o, d, z, h, rows); break;
    default: mix_rows_loop<4, NW, Z, DS>(p, len, x, o, d, z, h, rows); break;
  }
}

template <bool Z, int DS>
DDPM_BODY void mix_rows_writes(const SolverChunkParams& p, int64_t len, const float* x, const float* o,
                               const float* d, const float* z, const float* const* h, float* const* rows) {
  switch (p.W) {
    case 0: mix_rows_slots<0, Z, DS>(p, len, x, o, d, z, h, rows); break;
    case 1: mix_rows_slots<1, Z, DS>(p, len, x, o, d, z, h, rows); break;
    default: mix_rows_slots<2, Z, DS>(p, len, x, o, d, z, h, rows); break;
  }
}

template <int DS>
DDPM_BODY void mix_rows(const SolverChunkParams& p, int64_t len, const float* x, const float* o, const float* d,
                        const float* z, const float* const* h, float* const* rows) {
  if (p.has_z) mix_rows_writes<true, DS>(p, len, x, o, d, z, h, rows);
  else mix_rows_writes<false, DS>(p, len, x, o, d, z, h, rows);
}

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
  if (!r.g) {  // one pass: D_0 and its limit computed in the rows' loop, where a row reads it
    if (!p.uses_d0) mix_rows<kDUnused>(p, len, r.x, o, nullptr, r.z, r.h, r.rows);
    else if (p.limit == kLimitDynamic) mix_rows<kDDynamic>(p, len, r.x, o, nullptr, r.z, r.h, r.rows);
    else if (p.limit == kLimitClip) mix_rows<kDClip>(p, len, r.x, o, nullptr, r.z, r.h, r.rows);
    else mix_rows<kDPlain>(p, len, r.x, o, nullptr, r.z, r.h, r.rows);
    return;
  }
  // With a guide: D_0, its limit, then out + c g and D_0 + to_d_out c g (solver_step.h: solver_element)
  d0_loop(p, len, r.x, o, r.d0);
  float* __restrict__ d = r.d0;
  if (p.limit == kLimitClip || p.limit == kLimitDynamic) {
    for (int64_t i = 0; i < len; ++i) d[i] = clampf(d[i], p.lo, p.hi);
  }
  if (p.limit == kLimitDynamic) {
    const float s = p.thresh;
    for (int64_t i = 0; i < len; ++i) d[i] = d[i] / s;
  }
  float* gd = r.guided;  // may be o itself (guided): each element read before written
  const float* __restrict__ g = r.g;
  const float c = p.guide_coef, q = p.to_d_out;
  for (int64_t i = 0; i < len; ++i) {
    const float shift = c * g[i];
    gd[i] = o[i] + shift;
    d[i] = d[i] + q * shift;
  }
  mix_rows<kDBuffer>(p, len, r.x, gd, d, r.z, r.h, r.rows);
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
  base.lo = a.limit == kLimitClip ? -base.clip_range : -INFINITY;
  base.hi = a.limit == kLimitClip ? base.clip_range : INFINITY;
  int read_slot[kSolverMaxSlots] = {0, 0, 0, 0};  // the slots read, in order
  for (int q = 0; q < a.R; ++q) {
    if (k.reads[q]) read_slot[base.reads++] = q;
  }
  int write_to[kSolverMaxWrites] = {0, 0};  // the real slots written, in order (a scratch write is not computed)
  int mix_row[1 + kSolverMaxWrites] = {0, 0, 0};  // base.mix row i is k.mix row mix_row[i]
  for (int w = 0; w < a.W; ++w) {
    if (k.slot[w] < a.R) write_to[base.W] = k.slot[w], mix_row[1 + base.W++] = 1 + w;
  }
  for (int row = 0; row <= base.W; ++row) {
    for (int c = 0; c < kColHist; ++c) base.mix[row][c] = k.mix[mix_row[row]][c];
    for (int j = 0; j < base.reads; ++j) base.mix[row][kColHist + j] = k.mix[mix_row[row]][kColHist + read_slot[j]];
  }
  for (int row = 0; row <= base.W; ++row) base.uses_d0 = base.uses_d0 || base.mix[row][kColD0] != 0.0f;
  base.limit = a.limit, base.guided = a.guidance;
  base.phase1 = abs_d0 != nullptr;
  base.has_z = !base.phase1 && (noise || a.seed);
  const bool draw = base.has_z && !noise;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  // Runs of whole rows in one call where nothing goes through a buffer: float tensors, each a
  // contiguous (N, C, S) block, nothing per sample (no dynamic threshold), no guidance, no drawn
  // noise. One long loop streams the tensors where 512-element chunks stop and start every 2 KB
  // (the Heun predictor's kernel at 64x3x32x32, one thread: 51 -> 46 us).
  const auto packed = [&](const View3& v) { return v.ss == 1 && v.sc == a.S && v.sn == a.C * a.S; };
  const bool runs = std::is_same_v<X, float> && std::is_same_v<M, float> && !a.guidance && !guide && !draw &&
              !base.phase1 && a.limit != kLimitDynamic && packed(a.model_output) &&
              packed(a.x) && packed(a.x_next) && (!noise || packed(a.noise)) && packed(a.history);
  if (runs) {
    at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
      const int64_t off = begin * a.S, len = (end - begin) * a.S;
      SolverChunkRows r{};
      r.out = reinterpret_cast<const float*>(mo) + off;
      r.x = reinterpret_cast<const float*>(xs) + off;
      if (noise) r.z = reinterpret_cast<const float*>(noise) + off;
      float* slots = reinterpret_cast<float*>(hist) + off;
      for (int q = 0; q < base.reads; ++q) r.h[q] = slots + read_slot[q] * a.hist_slot;
      r.rows[0] = reinterpret_cast<float*>(x_next) + off;
      for (int w = 0; w < base.W; ++w) r.rows[1 + w] = slots + write_to[w] * a.hist_slot;
      solver_chunk_f32(base, len, r);
    });
    return;
  }
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    float out_b[kChunk], cond_b[kChunk], guided_b[kChunk], x_b[kChunk], z_b[kChunk], d0_b[kChunk], g_b[kChunk];
    float h_b[kSolverMaxSlots][kChunk], row_b[1 + kSolverMaxWrites][kChunk];
    SolverChunkParams p = base;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      p.thresh = thresh ? thresh[n] : 1.0f;
      if (a.limit == kLimitDynamic) p.lo = -p.thresh, p.hi = p.thresh;
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
          r.h[q] = q < p.reads ? row_in(hist + h_at + read_slot[q] * a.hist_slot, a.history.ss, len, h_b[q]) : nullptr;
        }
        X* next_dst = x_next + a.x_next.at(n, c, s0);
        r.rows[0] = row_out(next_dst, a.x_next.ss, row_b[0]);
        for (int w = 0; w < p.W; ++w) {
          r.rows[1 + w] = row_out(hist + h_at + write_to[w] * a.hist_slot, a.history.ss, row_b[1 + w]);
        }
        solver_chunk_f32(p, len, r);
        row_out_done(r.rows[0], len, next_dst, a.x_next.ss);
        for (int w = 0; w < p.W; ++w) {  // buffered writes, after every read of the chunk
          row_out_done(r.rows[1 + w], len, hist + h_at + write_to[w] * a.hist_slot, a.history.ss);
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
