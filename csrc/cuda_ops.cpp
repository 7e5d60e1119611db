// Torch glue for the CUDA kernels: checks, the current stream, error reporting. The kernels
// themselves live in the .cu files, which stay free of torch headers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.h"
#include "op_args.h"
#include "solver_step_cuda.h"
#include "solver_step_op_args.h"
#include "vlb_terms_cuda.cuh"
#include "vlb_terms_op_args.h"

namespace ddpm_fast {
namespace {

void check_launch(cudaError_t err, const char* what) {
  DDPM_CHECK(err == cudaSuccess, "ddpm_fast: ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

void q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                   const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed, const at::Tensor& x_t,
                   const std::optional<at::Tensor>& noise_out, const std::optional<at::Tensor>& target,
                   int64_t target_kind) {
  const c10::cuda::CUDAGuard guard(x0.device());
  const QSampleArgs a =
      make_q_sample_args(x0, t, sqrt_ab, sqrt_1mab, noise, seed, x_t, noise_out, target, target_kind);
  check_launch(launch_q_sample_cuda(a, dtype_code(x0.scalar_type()), at::cuda::getCurrentCUDAStream()), "q_sample");
}

void posterior_step_cuda(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& t,
                         const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
                         const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                         const std::optional<at::Tensor>& thresh_scale, const at::Tensor& prev,
                         const std::optional<at::Tensor>& pred_x0, const std::optional<at::Tensor>& abs_x0,
                         double final_alpha_cumprod, double guidance_scale, double clip_range, double eta,
                         int64_t kind, int64_t pred, int64_t var, int64_t clip, bool guidance,
                         bool use_clipped_model_output, const std::optional<at::Tensor>& guide) {
  const c10::cuda::CUDAGuard guard(sample.device());
  const PosteriorArgs a = make_posterior_args(model_output, sample, t, prev_t, alphas_cumprod, noise, seed,
                                              thresh_scale, prev, pred_x0, abs_x0, final_alpha_cumprod,
                                              guidance_scale, clip_range, eta, kind, pred, var, clip, guidance,
                                              use_clipped_model_output, guide);
  DDPM_CHECK(noise.has_value() || seed.has_value() || abs_x0.has_value() || (kind == kDDIM && eta == 0.0),
             "ddpm_fast: this step adds noise: pass noise or a seed");
  check_launch(launch_posterior_cuda(a, dtype_code(model_output.scalar_type()), dtype_code(sample.scalar_type()),
                                     at::cuda::getCurrentCUDAStream()),
               "posterior_step");
}

void solver_step_cuda(const at::Tensor& model_output, const at::Tensor& x, const at::Tensor& history,
                      const std::optional<at::Tensor>& step_t, int64_t step, const at::Tensor& to_d_x,
                      const at::Tensor& to_d_out, const at::Tensor& mix, const at::Tensor& write_slot,
                      const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                      const std::optional<at::Tensor>& thresh_scale, const at::Tensor& x_next,
                      const std::optional<at::Tensor>& abs_d0, double guidance_scale, double clip_range,
                      int64_t limit, bool guidance, const std::optional<at::Tensor>& guide,
                      const std::optional<at::Tensor>& guide_coef) {
  const c10::cuda::CUDAGuard guard(x.device());
  const SolverStepArgs a =
      make_solver_step_args(model_output, x, history, step_t, step, to_d_x, to_d_out, mix, write_slot, noise, seed,
                            thresh_scale, x_next, abs_d0, guidance_scale, clip_range, limit, guidance, guide,
                            guide_coef);
  check_launch(launch_solver_step_cuda(a, dtype_code(model_output.scalar_type()), dtype_code(x.scalar_type()),
                                       at::cuda::getCurrentCUDAStream()),
               "solver_step");
}

void vlb_terms_fwd_cuda(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& x_t,
                        const at::Tensor& t, const at::Tensor& table, int64_t var, bool clip, const at::Tensor& terms) {
  const c10::cuda::CUDAGuard guard(x0.device());
  const VlbTermsArgs a = make_vlb_terms_args(model_output, x0, x_t, t, table, var, clip);
  check_vlb_terms_out(a, x0, terms);
  const at::Tensor partial = at::empty({vlb_terms_partials(a)}, x0.options().dtype(at::kDouble));
  check_launch(launch_vlb_terms_fwd_cuda(a, dtype_code(x0.scalar_type()), partial.data_ptr<double>(), terms.data_ptr(),
                                         terms.scalar_type() == at::kDouble, at::cuda::getCurrentCUDAStream()),
               "vlb_terms_fwd");
}

void vlb_terms_bwd_cuda(const at::Tensor& grad_terms, const at::Tensor& model_output, const at::Tensor& x0,
                        const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& table, int64_t var, bool clip,
                        bool mean_grad, const at::Tensor& grad_model_output) {
  const c10::cuda::CUDAGuard guard(x0.device());
  const at::Tensor g = grad_terms.to(at::kDouble).contiguous();
  const VlbTermsArgs a =
      make_vlb_terms_bwd_args(model_output, x0, x_t, t, table, var, clip, mean_grad, g, grad_model_output);
  check_launch(launch_vlb_terms_bwd_cuda(a, dtype_code(x0.scalar_type()), at::cuda::getCurrentCUDAStream()),
               "vlb_terms_bwd");
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast_C, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("posterior_step", &posterior_step_cuda);
  m.impl("solver_step", &solver_step_cuda);
  m.impl("vlb_terms_fwd", &vlb_terms_fwd_cuda);
  m.impl("vlb_terms_bwd", &vlb_terms_bwd_cuda);
}

}  // namespace ddpm_fast
