// Checks the tensors handed to the private kernels and packs them into kernel_args.h structs.
// The Python op wrappers validate user input with friendly errors; these checks guard the
// kernel boundary itself (shapes, dtypes, devices), shared by the CPU and CUDA glue.
#pragma once
#include "torch_glue.h"

namespace ddpm_fast {

inline Table table_arg(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  check_same_device(ref, t, name);
  DDPM_CHECK((t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) && t.dim() == 1 && t.is_contiguous(),
             "ddpm_fast: ", name, " must be a contiguous float32/float64 table");
  return Table{t.data_ptr(), t.scalar_type() == at::kDouble};
}

// Same (N, C, S) as ref (one may be a 3-D view of the other's shape), same device and dtype.
inline void check_like(const at::Tensor& ref, const at::Tensor& t, const char* name, bool same_dtype = true) {
  check_same_device(ref, t, name);
  DDPM_CHECK(same_ncs(t, ref), "ddpm_fast: ", name, " has shape ", t.sizes(), ", expected ", ref.sizes());
  DDPM_CHECK(!same_dtype || t.scalar_type() == ref.scalar_type(), "ddpm_fast: ", name, " has dtype ",
             t.scalar_type(), ", expected ", ref.scalar_type());
}

inline const int64_t* seed_arg(const at::Tensor& ref, const std::optional<at::Tensor>& seed) {
  if (!seed.has_value()) return nullptr;
  check_same_device(ref, *seed, "seed");
  DDPM_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, "ddpm_fast: seed must be one int64");
  return seed->data_ptr<int64_t>();
}

inline QSampleArgs make_q_sample_args(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                                      const at::Tensor& sqrt_1mab, const std::optional<at::Tensor>& noise,
                                      const std::optional<at::Tensor>& seed, const at::Tensor& x_t,
                                      const std::optional<at::Tensor>& noise_out,
                                      const std::optional<at::Tensor>& target, int64_t target_kind) {
  DDPM_CHECK(is_float_type(x0.scalar_type()), "ddpm_fast: q_sample needs a floating-point x0");
  DDPM_CHECK(x0.dim() >= 2, "ddpm_fast: q_sample kernels take (N, C, ...) tensors");
  DDPM_CHECK(noise.has_value() != seed.has_value(), "ddpm_fast: pass exactly one of noise and seed");
  DDPM_CHECK(target_kind >= kTargetNone && target_kind <= kTargetV, "ddpm_fast: bad target kind");
  QSampleArgs a;
  a.N = x0.size(0), a.C = x0.size(1), a.S = spatial_numel(x0);
  check_index_tensor(x0, t, "t", a.N);
  a.sqrt_ab = table_arg(x0, sqrt_ab, "sqrt_alphas_cumprod");
  a.sqrt_1mab = table_arg(x0, sqrt_1mab, "sqrt_one_minus_alphas_cumprod");
  DDPM_CHECK(sqrt_ab.numel() == sqrt_1mab.numel(), "ddpm_fast: coefficient tables differ in length");
  a.T = sqrt_ab.numel();
  check_like(x0, x_t, "x_t");
  if (noise.has_value()) check_like(x0, *noise, "noise");
  if (noise_out.has_value()) check_like(x0, *noise_out, "noise_out");
  if (target.has_value()) check_like(x0, *target, "target");
  DDPM_CHECK(target.has_value() == (target_kind != kTargetNone), "ddpm_fast: target buffer and kind disagree");
  a.x0 = view3(x0), a.noise = view3(noise), a.x_t = view3(x_t), a.noise_out = view3(noise_out),
  a.target = view3(target);
  a.t = t.data_ptr<int64_t>();
  a.seed = seed_arg(x0, seed);
  a.target_kind = static_cast<int>(target_kind);
  return a;
}

inline PosteriorArgs make_posterior_args(
    const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& t, const at::Tensor& prev_t,
    const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& thresh_scale, const at::Tensor& prev, const std::optional<at::Tensor>& pred_x0,
    const std::optional<at::Tensor>& abs_x0, double final_alpha_cumprod, double guidance_scale, double clip_range,
    double eta, int64_t kind, int64_t pred, int64_t var, int64_t clip, bool guidance, bool use_clipped_model_output,
    const std::optional<at::Tensor>& guide) {
  DDPM_CHECK(is_float_type(sample.scalar_type()) && is_float_type(model_output.scalar_type()),
             "ddpm_fast: posterior_step needs floating-point model_output and sample");
  DDPM_CHECK(sample.dim() >= 2 && model_output.dim() >= 2, "ddpm_fast: posterior kernels take (N, C, ...) tensors");
  PosteriorArgs a;
  a.N = sample.size(0), a.C = sample.size(1), a.S = spatial_numel(sample);
  check_same_device(sample, model_output, "model_output");
  DDPM_CHECK(model_output.size(0) == (guidance ? 2 : 1) * a.N, "ddpm_fast: model_output batch ",
             model_output.size(0), " does not fit sample batch ", a.N, guidance ? " with guidance" : "");
  DDPM_CHECK(model_output.size(1) == a.C || model_output.size(1) == 2 * a.C,
             "ddpm_fast: model_output must have C or 2C channels");
  DDPM_CHECK(spatial_numel(model_output) == a.S, "ddpm_fast: model_output and sample differ in spatial size");
  a.has_variance = model_output.size(1) == 2 * a.C;
  DDPM_CHECK(!(var == kLearned || var == kLearnedRange) || a.has_variance || kind == kDDIM,
             "ddpm_fast: learned variance needs 2C model output channels");
  check_index_tensor(sample, t, "t", a.N);
  check_index_tensor(sample, prev_t, "prev_t", a.N);
  a.alphas_cumprod = table_arg(sample, alphas_cumprod, "alphas_cumprod");
  a.T = alphas_cumprod.numel();
  if (noise.has_value()) check_like(sample, *noise, "noise");
  if (guide.has_value()) check_like(sample, *guide, "guide");
  check_like(sample, prev, "prev");
  if (pred_x0.has_value()) check_like(sample, *pred_x0, "pred_x0");
  const at::ScalarType stats = sample.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (abs_x0.has_value()) {
    check_like(sample, *abs_x0, "abs_x0", false);
    DDPM_CHECK(abs_x0->scalar_type() == stats, "ddpm_fast: abs_x0 must be ", stats);
  }
  if (thresh_scale.has_value()) {
    check_same_device(sample, *thresh_scale, "thresh_scale");
    DDPM_CHECK(thresh_scale->scalar_type() == stats && thresh_scale->numel() == a.N && thresh_scale->is_contiguous(),
               "ddpm_fast: thresh_scale must be a contiguous ", stats, " tensor of N values");
  }
  DDPM_CHECK(clip != kThreshold || abs_x0.has_value() || thresh_scale.has_value(),
             "ddpm_fast: thresholding needs the per-sample scale (phase 2) or the abs_x0 buffer (phase 1)");
  a.model_output = view3(model_output), a.sample = view3(sample), a.noise = view3(noise), a.prev = view3(prev),
  a.pred_x0 = view3(pred_x0), a.abs_x0 = view3(abs_x0), a.guide = view3(guide);
  a.mo_half = a.N * model_output.stride(0);
  a.mo_var = a.C * model_output.stride(1);
  a.t = t.data_ptr<int64_t>(), a.prev_t = prev_t.data_ptr<int64_t>();
  a.thresh_scale = thresh_scale.has_value() ? thresh_scale->data_ptr() : nullptr;
  a.seed = seed_arg(sample, seed);
  a.final_alpha_cumprod = final_alpha_cumprod, a.guidance_scale = guidance_scale, a.clip_range = clip_range;
  a.eta = eta;
  a.kind = static_cast<int>(kind), a.pred = static_cast<int>(pred), a.var = static_cast<int>(var);
  a.clip = static_cast<int>(clip), a.guidance = guidance, a.use_clipped_model_output = use_clipped_model_output;
  return a;
}

}  // namespace ddpm_fast
