// The variational bound's per-sample terms on the CPU (ops/vlb_terms.py), forward and backward, with the
// per-element maths of vlb_terms_math.h (shared with the CUDA kernels).
//
// fp32 KL rows (every dtype but float64) go kChunk elements at a time through float buffers, with a
// branch-free exp (Cephes' expf polynomial) so that the loops vectorise; built per vector ISA
// (cpu_isa.h) with -ffp-contract=off: the same bits in each build. Decoder rows (t == 0) and float64
// inputs take the float64 scalar code. Per-row sums are float64; a sample's sum adds its rows in order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_chunks.h"
#include "cpu_isa.h"
#include "vlb_terms_op_args.h"

#define DDPM_BODY static inline __attribute__((always_inline))

namespace ddpm_fast {
namespace {

// ---------------------------------------------------------------- float KL chunks
// A row's KL constants, the backward's g_n / (M log 2), and the config the loops are specialised on.
struct KlChunkRow {
  vlb::KlRow k;
  float scale;
  int var;
  bool clip, mean_grad;
};

// exp(x), branch-free: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial),
// within ~2 ulp; x clamped to [-87.3, 88.3] (no denormals, no overflow of the exponent bits).
struct PolyExp {
  inline __attribute__((always_inline)) float operator()(float x) const {
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
};

// The loops are specialised on the variance type and the clip (no branch inside, so they vectorise);
// the forward writes each element's term to `vals` and sums them in a second loop with 8 float64
// accumulators (a float64 reduction in one accumulator would keep the first loop scalar).
template <int VAR, bool CLIP>
DDPM_BODY void kl_fwd_loop(const KlChunkRow& r, int64_t len, const float* __restrict__ out,
                           const float* __restrict__ v, const float* __restrict__ x0, const float* __restrict__ xt,
                           float* __restrict__ vals) {
  for (int64_t i = 0; i < len; ++i) {
    vals[i] = vlb::kl_value<PolyExp>(r.k, VAR, CLIP, out[i], VAR == kVlbVarFixed ? 0.0f : v[i], x0[i], xt[i]);
  }
}

DDPM_BODY void kl_fwd_chunk_body(const KlChunkRow& r, int64_t len, const float* out, const float* v, const float* x0,
                                 const float* xt, double* sum) {
  float vals[kChunk];
  switch (r.var * 2 + (r.clip ? 1 : 0)) {
    case kVlbVarLearnedRange * 2: kl_fwd_loop<kVlbVarLearnedRange, false>(r, len, out, v, x0, xt, vals); break;
    case kVlbVarLearnedRange * 2 + 1: kl_fwd_loop<kVlbVarLearnedRange, true>(r, len, out, v, x0, xt, vals); break;
    case kVlbVarLearned * 2: kl_fwd_loop<kVlbVarLearned, false>(r, len, out, v, x0, xt, vals); break;
    case kVlbVarLearned * 2 + 1: kl_fwd_loop<kVlbVarLearned, true>(r, len, out, v, x0, xt, vals); break;
    case kVlbVarFixed * 2 + 1: kl_fwd_loop<kVlbVarFixed, true>(r, len, out, v, x0, xt, vals); break;
    default: kl_fwd_loop<kVlbVarFixed, false>(r, len, out, v, x0, xt, vals); break;
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
DDPM_BODY void kl_bwd_loop(const KlChunkRow& r, int64_t len, const float* __restrict__ out,
                           const float* __restrict__ v, const float* __restrict__ x0, const float* __restrict__ xt,
                           float* __restrict__ g_mean, float* __restrict__ g_var) {
  for (int64_t i = 0; i < len; ++i) {
    float gm, gv;
    vlb::kl_grads<PolyExp>(r.k, VAR, CLIP, MEAN_GRAD, r.scale, out[i], VAR == kVlbVarFixed ? 0.0f : v[i], x0[i],
                           xt[i], &gm, &gv);
    g_mean[i] = gm;
    if constexpr (VAR != kVlbVarFixed) g_var[i] = gv;
  }
}

template <int VAR>
DDPM_BODY void kl_bwd_var(const KlChunkRow& r, int64_t len, const float* out, const float* v, const float* x0,
                          const float* xt, float* g_mean, float* g_var) {
  if (r.clip && r.mean_grad) kl_bwd_loop<VAR, true, true>(r, len, out, v, x0, xt, g_mean, g_var);
  else if (r.clip) kl_bwd_loop<VAR, true, false>(r, len, out, v, x0, xt, g_mean, g_var);
  else if (r.mean_grad) kl_bwd_loop<VAR, false, true>(r, len, out, v, x0, xt, g_mean, g_var);
  else kl_bwd_loop<VAR, false, false>(r, len, out, v, x0, xt, g_mean, g_var);
}

DDPM_BODY void kl_bwd_chunk_body(const KlChunkRow& r, int64_t len, const float* out, const float* v, const float* x0,
                                 const float* xt, float* g_mean, float* g_var) {
  if (r.var == kVlbVarLearnedRange) kl_bwd_var<kVlbVarLearnedRange>(r, len, out, v, x0, xt, g_mean, g_var);
  else if (r.var == kVlbVarLearned) kl_bwd_var<kVlbVarLearned>(r, len, out, v, x0, xt, g_mean, g_var);
  else kl_bwd_var<kVlbVarFixed>(r, len, out, v, x0, xt, g_mean, g_var);
}

DDPM_ISA_VARIANTS(kl_fwd_chunk,
                  (const KlChunkRow& r, int64_t len, const float* out, const float* v, const float* x0,
                   const float* xt, double* sum),
                  (r, len, out, v, x0, xt, sum))
DDPM_ISA_VARIANTS(kl_bwd_chunk,
                  (const KlChunkRow& r, int64_t len, const float* out, const float* v, const float* x0,
                   const float* xt, float* g_mean, float* g_var),
                  (r, len, out, v, x0, xt, g_mean, g_var))

// ---------------------------------------------------------------- rows
// Forward: partial[row] = sum over the row's elements of the term (nats).
template <typename X>
void fwd_rows(const VlbTermsArgs& a, double* partial) {
  const X* mo = static_cast<const X*>(a.mo.ptr);
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* xt = static_cast<const X*>(a.xt.ptr);
  const bool has_var = a.var != kVlbVarFixed;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    float ob[kChunk], vb[kChunk], x0b[kChunk], xtb[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      const vlb::Row r = vlb::table_row(a, n);
      const bool decoder = a.t[n] <= 0;
      double sum = 0.0;
      if constexpr (!std::is_same_v<X, double>) {
        if (!decoder) {
          const KlChunkRow k{vlb::kl_row(r), 0.0f, a.var, a.clip, true};
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
        sum += vlb::element64(r, a.var, a.clip, decoder, static_cast<double>(mo[m]), v,
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
void bwd_rows(const VlbTermsArgs& a) {
  const X* mo = static_cast<const X*>(a.mo.ptr);
  const X* x0 = static_cast<const X*>(a.x0.ptr);
  const X* xt = static_cast<const X*>(a.xt.ptr);
  X* grad = static_cast<X*>(a.grad.ptr);
  const bool has_var = a.var != kVlbVarFixed;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.S, 1));
  at::parallel_for(0, a.N * a.C, grain, [&](int64_t begin, int64_t end) {
    float ob[kChunk], vb[kChunk], x0b[kChunk], xtb[kChunk], gm[kChunk], gv[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.C, c = row % a.C;
      const vlb::Row r = vlb::table_row(a, n);
      const bool decoder = a.t[n] <= 0;
      const double scale = a.g[n] * a.per;
      if constexpr (!std::is_same_v<X, double>) {
        if (!decoder) {
          const KlChunkRow k{vlb::kl_row(r), float(scale), a.var, a.clip, a.mean_grad};
          for (int64_t s0 = 0; s0 < a.S; s0 += kChunk) {
            const int64_t len = std::min(kChunk, a.S - s0);
            const float* o = row_in(mo + a.mo.at(n, c, s0), a.mo.ss, len, ob);
            const float* v = has_var ? row_in(mo + a.mo.at(n, c, s0) + a.mo_var, a.mo.ss, len, vb) : nullptr;
            X* gm_dst = grad + a.grad.at(n, c, s0);
            float* gmo = row_out(gm_dst, a.grad.ss, gm);
            float* gvo = has_var ? row_out(gm_dst + a.grad_var, a.grad.ss, gv) : nullptr;
            kl_bwd_chunk(k, len, o, v, row_in(x0 + a.x0.at(n, c, s0), a.x0.ss, len, x0b),
                         row_in(xt + a.xt.at(n, c, s0), a.xt.ss, len, xtb), gmo, gvo);
            row_out_done(gmo, len, gm_dst, a.grad.ss);
            if (has_var) row_out_done(gvo, len, gm_dst + a.grad_var, a.grad.ss);
          }
          continue;
        }
      }
      for (int64_t s = 0; s < a.S; ++s) {
        const int64_t m = a.mo.at(n, c, s);
        const double v = has_var ? static_cast<double>(mo[m + a.mo_var]) : 0.0;
        const vlb::Element e = vlb::element64(r, a.var, a.clip, decoder, static_cast<double>(mo[m]), v,
                                              static_cast<double>(x0[a.x0.at(n, c, s)]),
                                              static_cast<double>(xt[a.xt.at(n, c, s)]));
        const int64_t o = a.grad.at(n, c, s);
        grad[o] = static_cast<X>(a.mean_grad ? e.g_mean * scale : 0.0);
        if (has_var) grad[o + a.grad_var] = static_cast<X>(e.g_var * scale);
      }
    }
  });
}

void vlb_terms_fwd_cpu(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& x_t,
                       const at::Tensor& t, const at::Tensor& table, int64_t var, bool clip, const at::Tensor& terms) {
  const VlbTermsArgs a = make_vlb_terms_args(model_output, x0, x_t, t, table, var, clip);
  check_vlb_terms_out(a, x0, terms);
  std::vector<double> partial(static_cast<size_t>(a.N * a.C));
  dispatch_float(x0.scalar_type(), [&](auto tag) { fwd_rows<decltype(tag)>(a, partial.data()); });
  for (int64_t n = 0; n < a.N; ++n) {
    double sum = 0.0;
    for (int64_t c = 0; c < a.C; ++c) sum += partial[n * a.C + c];
    if (terms.scalar_type() == at::kDouble) terms.data_ptr<double>()[n] = sum * a.per;
    else terms.data_ptr<float>()[n] = static_cast<float>(sum * a.per);
  }
}

void vlb_terms_bwd_cpu(const at::Tensor& grad_terms, const at::Tensor& model_output, const at::Tensor& x0,
                       const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& table, int64_t var, bool clip,
                       bool mean_grad, const at::Tensor& grad_model_output) {
  const at::Tensor g = grad_terms.to(at::kDouble).contiguous();
  const VlbTermsArgs a =
      make_vlb_terms_bwd_args(model_output, x0, x_t, t, table, var, clip, mean_grad, g, grad_model_output);
  dispatch_float(x0.scalar_type(), [&](auto tag) { bwd_rows<decltype(tag)>(a); });
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
