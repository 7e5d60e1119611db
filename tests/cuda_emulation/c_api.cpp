// A C entry point per CUDA launcher, for test_cuda_emulation.py to call through ctypes with
// flat arrays (pointers, integers, reals in the orders below): the emulated kernels then run
// against the reference on every step configuration, as the GPU test suite would.
#include <cstdint>
#include <vector>

#include "cuda_launch.h"
#include "kernel_args.h"
#include "vlb_terms_cuda.cuh"

using namespace ddpm_fast;

namespace {
View3 view(void* ptr, const int64_t* strides) { return View3{ptr, strides[0], strides[1], strides[2]}; }
}  // namespace

// p: x0, noise, x_t, noise_out, target, t, sqrt_ab, sqrt_1mab, seed (null: absent)
// i: strides (3 each) of x0, noise, x_t, noise_out, target; then T, N, C, S, target_kind, the
//    x dtype (kernel_args.h DType; float64 x reads float64 tables)
extern "C" int emulated_q_sample(void* const* p, const int64_t* i) {
  QSampleArgs a;
  a.x0 = view(p[0], i), a.noise = view(p[1], i + 3), a.x_t = view(p[2], i + 6), a.noise_out = view(p[3], i + 9);
  a.target = view(p[4], i + 12);
  a.t = static_cast<const int64_t*>(p[5]);
  const DType x_dtype = static_cast<DType>(i[20]);
  a.sqrt_ab = Table{p[6], x_dtype == kF64}, a.sqrt_1mab = Table{p[7], x_dtype == kF64};
  a.seed = static_cast<const int64_t*>(p[8]);
  a.T = i[15], a.N = i[16], a.C = i[17], a.S = i[18], a.target_kind = static_cast<int>(i[19]);
  return launch_q_sample_cuda(a, x_dtype, nullptr);
}

// p: model_output, sample, noise, prev, pred_x0, abs_x0, t, prev_t, alphas_cumprod, thresh_scale, seed, guide
// i: strides (3 each) of model_output, sample, noise, prev, pred_x0, abs_x0; then mo_half, mo_var,
//    T, N, C, S, kind, pred, var, clip, guidance, has_variance, use_clipped_model_output, the
//    model_output and x dtypes (kernel_args.h DType; float64 x reads a float64 table); the
//    guide's strides
// r: final_alpha_cumprod, guidance_scale, clip_range, eta
extern "C" int emulated_posterior_step(void* const* p, const int64_t* i, const double* r) {
  PosteriorArgs a;
  a.model_output = view(p[0], i), a.sample = view(p[1], i + 3), a.noise = view(p[2], i + 6);
  a.prev = view(p[3], i + 9), a.pred_x0 = view(p[4], i + 12), a.abs_x0 = view(p[5], i + 15);
  a.t = static_cast<const int64_t*>(p[6]), a.prev_t = static_cast<const int64_t*>(p[7]);
  const DType mo_dtype = static_cast<DType>(i[31]), x_dtype = static_cast<DType>(i[32]);
  a.alphas_cumprod = Table{p[8], x_dtype == kF64};
  a.thresh_scale = p[9];
  a.seed = static_cast<const int64_t*>(p[10]);
  a.guide = view(p[11], i + 33);
  a.mo_half = i[18], a.mo_var = i[19], a.T = i[20], a.N = i[21], a.C = i[22], a.S = i[23];
  a.kind = static_cast<int>(i[24]), a.pred = static_cast<int>(i[25]), a.var = static_cast<int>(i[26]);
  a.clip = static_cast<int>(i[27]), a.guidance = i[28] != 0, a.has_variance = i[29] != 0;
  a.use_clipped_model_output = i[30] != 0;
  a.final_alpha_cumprod = r[0], a.guidance_scale = r[1], a.clip_range = r[2], a.eta = r[3];
  return launch_posterior_cuda(a, mo_dtype, x_dtype, nullptr);
}

// p: model_output, x0, x_t, grad, t, table, g (backward), terms (forward; null: absent)
// i: strides (3 each) of model_output, x0, x_t, grad; then mo_var, grad_var, T, N, C, S, var, clip,
//    mean_grad, the inputs' dtype (kernel_args.h DType; float64 reads a float64 table and writes
//    float64 terms)
// r: per (1 / (C S log 2))
namespace {
VlbTermsArgs vlb_args(void* const* p, const int64_t* i, const double* r) {
  VlbTermsArgs a;
  a.mo = view(p[0], i), a.x0 = view(p[1], i + 3), a.xt = view(p[2], i + 6), a.grad = view(p[3], i + 9);
  a.t = static_cast<const int64_t*>(p[4]);
  a.table = Table{p[5], static_cast<DType>(i[21]) == kF64};
  a.g = static_cast<const double*>(p[6]);
  a.mo_var = i[12], a.grad_var = i[13], a.T = i[14], a.N = i[15], a.C = i[16], a.S = i[17];
  a.var = static_cast<int>(i[18]), a.clip = i[19] != 0, a.mean_grad = i[20] != 0;
  a.per = r[0];
  return a;
}
}  // namespace

extern "C" int emulated_vlb_terms_fwd(void* const* p, const int64_t* i, const double* r) {
  const VlbTermsArgs a = vlb_args(p, i, r);
  std::vector<double> partial(static_cast<size_t>(vlb_terms_partials(a)));
  const DType dtype = static_cast<DType>(i[21]);
  return launch_vlb_terms_fwd_cuda(a, dtype, partial.data(), p[7], dtype == kF64, nullptr);
}

extern "C" int emulated_vlb_terms_bwd(void* const* p, const int64_t* i, const double* r) {
  return launch_vlb_terms_bwd_cuda(vlb_args(p, i, r), static_cast<DType>(i[21]), nullptr);
}
