// Forward noising q_sample on the CPU: one pass over x0 (and the given noise) writing x_t,
// the drawn noise and the training target. Parallel over (n, c) rows with at::parallel_for.
#include <ATen/Parallel.h>

#include "cpu_chunks.h"
#include "noising_math.h"
#include "op_args.h"
#include "philox_cpu.h"

namespace ddpm_fast {
namespace {

template <typename X, typename F>
void q_sample_rows(const QSampleArgs& a) {
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* noise = static_cast<const X*>(a.noise.ptr);
  X* x_t = static_cast<X*>(a.x_t.ptr);
  X* noise_out = static_cast<X*>(a.noise_out.ptr);
  X* target = static_cast<X*>(a.target.ptr);
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      const int64_t t = a.t[n] < 0 ? 0 : (a.t[n] >= a.T ? a.T - 1 : a.t[n]);
      const F sa = a.sqrt_ab.get<F>(t), s1a = a.sqrt_1mab.get<F>(t);
      float drawn_chunk[kNoiseChunk];
      for (int64_t s = 0; s < a.S; ++s) {
        F z;
        if (noise) {
          z = static_cast<F>(noise[a.noise.at(n, c, s)]);
        } else {
          if (s % kNoiseChunk == 0) {
            philox_randn_fill(seed, static_cast<uint64_t>(row * a.S + s), std::min(kNoiseChunk, a.S - s), drawn_chunk);
          }
          // Round the draw to the output dtype first, so x_t and the returned noise agree.
          const X drawn = static_cast<X>(drawn_chunk[s % kNoiseChunk]);
          if (noise_out) noise_out[a.noise_out.at(n, c, s)] = drawn;
          z = static_cast<F>(drawn);
        }
        F tgt;
        const F xt = q_sample_element<F>(sa, s1a, static_cast<F>(x0[a.x0.at(n, c, s)]), z, a.target_kind, &tgt);
        x_t[a.x_t.at(n, c, s)] = static_cast<X>(xt);
        if (target) target[a.target.at(n, c, s)] = static_cast<X>(tgt);
      }
    }
  });
}

// fp32 compute (every dtype but float64): chunks through cpu_chunks.h's vector loops.
template <typename X>
void q_sample_rows_f32(const QSampleArgs& a) {
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* noise = static_cast<const X*>(a.noise.ptr);
  X* x_t = static_cast<X*>(a.x_t.ptr);
  X* noise_out = static_cast<X*>(a.noise_out.ptr);
  X* target = static_cast<X*>(a.target.ptr);
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  // Given fp32 noise and stride-1 rows, every row is read and written in place: one loop over
  // the whole row (chunks exist to keep gathered or drawn values in L1).
  const bool in_place = std::is_same_v<X, float> && noise && a.x0.ss == 1 && a.noise.ss == 1 && a.x_t.ss == 1 &&
                        (!target || a.target.ss == 1);
  const int64_t step = in_place ? std::max<int64_t>(a.S, 1) : kChunk;
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    float xb[kChunk], zb[kChunk], xb_out[kChunk], tb[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      const int64_t t = a.t[n] < 0 ? 0 : (a.t[n] >= a.T ? a.T - 1 : a.t[n]);
      const float sa = a.sqrt_ab.get<float>(t), s1a = a.sqrt_1mab.get<float>(t);
      for (int64_t s0 = 0; s0 < a.S; s0 += step) {
        const int64_t len = std::min(step, a.S - s0);
        const float* xin = row_in(x0 + a.x0.at(n, c, s0), a.x0.ss, len, xb);
        const float* z;
        if (noise) {
          z = row_in(noise + a.noise.at(n, c, s0), a.noise.ss, len, zb);
        } else {
          X* nout = noise_out + a.noise_out.at(n, c, s0);
          float* drawn = row_out(nout, a.noise_out.ss, zb);
          philox_randn_fill(seed, static_cast<uint64_t>(row * a.S + s0), len, drawn);
          if constexpr (!std::is_same_v<X, float>) {
            // Round the draw to the output dtype first, so x_t and the returned noise agree.
            for (int64_t i = 0; i < len; ++i) drawn[i] = static_cast<float>(static_cast<X>(drawn[i]));
          }
          row_out_done(drawn, len, nout, a.noise_out.ss);
          z = drawn;
        }
        X* xt_dst = x_t + a.x_t.at(n, c, s0);
        float* xt = row_out(xt_dst, a.x_t.ss, xb_out);
        X* tg_dst = target ? target + a.target.at(n, c, s0) : nullptr;
        float* tg = target ? row_out(tg_dst, a.target.ss, tb) : nullptr;
        q_sample_chunk_f32(sa, s1a, target ? a.target_kind : kTargetNone, len, xin, z, xt, tg);
        row_out_done(xt, len, xt_dst, a.x_t.ss);
        if (target) row_out_done(tg, len, tg_dst, a.target.ss);
      }
    }
  });
}

void q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                  const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed, const at::Tensor& x_t,
                  const std::optional<at::Tensor>& noise_out, const std::optional<at::Tensor>& target,
                  int64_t target_kind) {
  const QSampleArgs a =
      make_q_sample_args(x0, t, sqrt_ab, sqrt_1mab, noise, seed, x_t, noise_out, target, target_kind);
  dispatch_float(x0.scalar_type(), [&](auto tag) {
    using X = decltype(tag);
    if constexpr (std::is_same_v<X, double>) q_sample_rows<X, double>(a);
    else q_sample_rows_f32<X>(a);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast_C, CPU, m) { m.impl("q_sample", &q_sample_cpu); }

}  // namespace ddpm_fast
