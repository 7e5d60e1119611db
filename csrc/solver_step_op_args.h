// Checks the tensors handed to the private solver_step kernels and packs them into a
// SolverStepArgs (host side, shared by the CPU and CUDA glue). The Python wrapper
// (ddpm_fast/ops/solver_step.py) validates user input with friendly errors; these checks guard
// the kernel boundary itself.
#pragma once
#include "op_args.h"
#include "solver_step.h"

namespace ddpm_fast {

inline SolverStepArgs make_solver_step_args(
    const at::Tensor& model_output, const at::Tensor& x, const at::Tensor& history,
    const std::optional<at::Tensor>& step_t, int64_t step, const at::Tensor& to_d_x, const at::Tensor& to_d_out,
    const at::Tensor& mix, const at::Tensor& write_slot, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& thresh_scale, const at::Tensor& x_next,
    const std::optional<at::Tensor>& abs_d0, double guidance_scale, double clip_range, int64_t limit,
    bool guidance, const std::optional<at::Tensor>& guide, const std::optional<at::Tensor>& guide_coef) {
  DDPM_CHECK(is_float_type(x.scalar_type()) && is_float_type(model_output.scalar_type()),
             "ddpm_fast: solver_step needs floating-point model_output and x");
  DDPM_CHECK(x.dim() >= 2 && model_output.dim() >= 2, "ddpm_fast: solver_step kernels take (N, C, ...) tensors");
  SolverStepArgs a;
  a.N = x.size(0), a.C = x.size(1), a.S = spatial_numel(x);
  check_same_device(x, model_output, "model_output");
  DDPM_CHECK(model_output.size(0) == (guidance ? 2 : 1) * a.N, "ddpm_fast: model_output batch ",
             model_output.size(0), " does not fit x batch ", a.N, guidance ? " with guidance" : "");
  DDPM_CHECK(model_output.size(1) == a.C || model_output.size(1) == 2 * a.C,
             "ddpm_fast: model_output must have C or 2C channels");
  DDPM_CHECK(spatial_numel(model_output) == a.S, "ddpm_fast: model_output and x differ in spatial size");

  DDPM_CHECK(mix.scalar_type() == at::kDouble && mix.dim() == 3 && mix.is_contiguous(),
             "ddpm_fast: mix must be a contiguous float64 (S, 1 + W, 4 + R) tensor");
  a.num_steps = mix.size(0), a.W = static_cast<int>(mix.size(1) - 1), a.R = static_cast<int>(mix.size(2) - 4);
  DDPM_CHECK(a.num_steps > 0 && a.W >= 0 && a.W <= kSolverMaxWrites && a.R >= 0 && a.R <= kSolverMaxSlots,
             "ddpm_fast: solver_step takes at most ", kSolverMaxSlots, " history slots and ", kSolverMaxWrites,
             " writes, got mix of shape ", mix.sizes());
  for (const auto* t : {&mix, &to_d_x, &to_d_out, &write_slot}) check_same_device(x, *t, "plan tensor");
  DDPM_CHECK(to_d_x.scalar_type() == at::kDouble && to_d_out.scalar_type() == at::kDouble && to_d_x.dim() == 1 &&
                 to_d_out.dim() == 1 && to_d_x.size(0) == a.num_steps && to_d_out.size(0) == a.num_steps &&
                 to_d_x.is_contiguous() && to_d_out.is_contiguous(),
             "ddpm_fast: to_d_x and to_d_out must be contiguous float64 (S,) tensors");
  DDPM_CHECK(write_slot.scalar_type() == at::kLong && write_slot.dim() == 2 && write_slot.size(0) == a.num_steps &&
                 write_slot.size(1) == a.W && write_slot.is_contiguous(),
             "ddpm_fast: write_slot must be a contiguous int64 (S, W) tensor");
  if (step_t.has_value()) {
    check_same_device(x, *step_t, "step");
    DDPM_CHECK(step_t->scalar_type() == at::kLong && step_t->numel() == 1, "ddpm_fast: step must be one int64");
    a.step_ptr = step_t->data_ptr<int64_t>();
  }
  a.step = step;

  check_same_device(x, history, "history");
  DDPM_CHECK(history.dim() >= 3 && history.size(0) == a.R + 1, "ddpm_fast: history must have shape (", a.R + 1,
             ", *x.shape), got ", history.sizes());
  const at::Tensor slot0 = history.select(0, 0);
  check_like(x, slot0, "history slot");
  check_like(x, x_next, "x_next");
  if (noise.has_value()) check_like(x, *noise, "noise");
  DDPM_CHECK(guide.has_value() == guide_coef.has_value(), "ddpm_fast: a guide needs its plan's guide_coef");
  if (guide.has_value()) {
    check_like(x, *guide, "guide");
    check_same_device(x, *guide_coef, "guide_coef");
    DDPM_CHECK(guide_coef->scalar_type() == at::kDouble && guide_coef->dim() == 1 &&
                   guide_coef->size(0) == a.num_steps && guide_coef->is_contiguous(),
               "ddpm_fast: guide_coef must be a contiguous float64 (S,) tensor");
    a.guide = view3(*guide);
    a.guide_coef = guide_coef->data_ptr<double>();
  }
  const at::ScalarType stats = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (abs_d0.has_value()) {
    check_like(x, *abs_d0, "abs_d0", false);
    DDPM_CHECK(abs_d0->scalar_type() == stats, "ddpm_fast: abs_d0 must be ", stats);
  }
  if (thresh_scale.has_value()) {
    check_same_device(x, *thresh_scale, "thresh_scale");
    DDPM_CHECK(thresh_scale->scalar_type() == stats && thresh_scale->numel() == a.N && thresh_scale->is_contiguous(),
               "ddpm_fast: thresh_scale must be a contiguous ", stats, " tensor of N values");
  }
  DDPM_CHECK(limit >= kLimitNone && limit <= kLimitDynamic, "ddpm_fast: bad limit code ", limit);
  DDPM_CHECK(limit != kLimitDynamic || abs_d0.has_value() || thresh_scale.has_value(),
             "ddpm_fast: dynamic thresholding needs the per-sample scale (phase 2) or the abs_d0 buffer (phase 1)");

  a.model_output = view3(model_output), a.x = view3(x), a.noise = view3(noise), a.x_next = view3(x_next);
  a.history = view3(slot0), a.abs_d0 = view3(abs_d0);
  a.hist_slot = history.stride(0);
  a.mo_half = a.N * model_output.stride(0);
  a.to_d_x = to_d_x.data_ptr<double>(), a.to_d_out = to_d_out.data_ptr<double>();
  a.mix = mix.data_ptr<double>(), a.write_slot = write_slot.data_ptr<int64_t>();
  a.thresh_scale = thresh_scale.has_value() ? thresh_scale->data_ptr() : nullptr;
  a.seed = seed_arg(x, seed);
  a.guidance_scale = guidance_scale, a.clip_range = clip_range;
  a.limit = static_cast<int>(limit), a.guidance = guidance;
  return a;
}

}  // namespace ddpm_fast
