// Checks the tensors handed to the private vlb_terms kernels and packs them into a VlbTermsArgs
// (host side, shared by the CPU and CUDA glue). The Python wrapper (ddpm_fast/ops/vlb_terms.py)
// validates user input with friendly errors; these checks guard the kernel boundary itself.
#pragma once
#include "op_args.h"
#include "vlb_terms_math.h"

namespace ddpm_fast {

// The forward's arguments; the table is float64 for float64 inputs, else float32 (as the wrapper
// passes it).
inline VlbTermsArgs make_vlb_terms_args(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& x_t,
                                        const at::Tensor& t, const at::Tensor& table, int64_t var, bool clip) {
  DDPM_CHECK(is_float_type(x0.scalar_type()) && x0.dim() >= 2, "ddpm_fast: vlb_terms needs (N, C, ...) float x0");
  DDPM_CHECK(model_output.scalar_type() == x0.scalar_type() && x_t.scalar_type() == x0.scalar_type(),
             "ddpm_fast: vlb_terms needs model_output, x0 and x_t of one dtype");
  DDPM_CHECK(var >= kVlbVarFixed && var <= kVlbVarLearned, "ddpm_fast: bad variance code");
  VlbTermsArgs a;
  a.N = x0.size(0), a.C = x0.size(1), a.S = spatial_numel(x0);
  DDPM_CHECK(same_ncs(x0, x_t), "ddpm_fast: x_t has shape ", x_t.sizes(), ", expected ", x0.sizes());
  DDPM_CHECK(model_output.size(0) == a.N && spatial_numel(model_output) == a.S &&
                 model_output.size(1) == (var == kVlbVarFixed ? 1 : 2) * a.C,
             "ddpm_fast: model_output has shape ", model_output.sizes(), " for x0 of shape ", x0.sizes());
  check_same_device(x0, model_output, "model_output");
  check_same_device(x0, x_t, "x_t");
  check_same_device(x0, table, "the vlb table");
  check_index_tensor(x0, t, "t", a.N);
  const at::ScalarType table_type = x0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  DDPM_CHECK(table.dim() == 2 && table.size(1) == kVlbTableCols && table.is_contiguous() &&
                 table.scalar_type() == table_type,
             "ddpm_fast: the vlb table must be a contiguous (T, 8) ", table_type, " tensor");
  a.mo = view3(model_output), a.x0 = view3(x0), a.xt = view3(x_t);
  a.mo_var = a.C * model_output.stride(1);
  a.t = t.data_ptr<int64_t>();
  a.table = Table{table.data_ptr(), table_type == at::kDouble};
  a.T = table.size(0);
  a.per = 1.0 / (static_cast<double>(a.C * a.S) * 0.69314718055994530942);  // ln 2
  a.var = static_cast<int>(var), a.clip = clip;
  return a;
}

// The forward's output: a contiguous (N,) tensor, float64 for float64 inputs, else float32.
inline void check_vlb_terms_out(const VlbTermsArgs& a, const at::Tensor& x0, const at::Tensor& terms) {
  const at::ScalarType terms_type = x0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_same_device(x0, terms, "terms");
  DDPM_CHECK(terms.dim() == 1 && terms.size(0) == a.N && terms.is_contiguous() && terms.scalar_type() == terms_type,
             "ddpm_fast: terms must be a contiguous ", terms_type, " (N,) tensor");
}

// The backward's arguments: g, the float64 contiguous copy of grad_terms (the caller keeps it alive
// through the launch); grad_model_output shaped like model_output.
inline VlbTermsArgs make_vlb_terms_bwd_args(const at::Tensor& model_output, const at::Tensor& x0,
                                            const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& table,
                                            int64_t var, bool clip, bool mean_grad, const at::Tensor& g,
                                            const at::Tensor& grad_model_output) {
  VlbTermsArgs a = make_vlb_terms_args(model_output, x0, x_t, t, table, var, clip);
  check_same_device(x0, g, "grad_terms");
  check_same_device(x0, grad_model_output, "grad_model_output");
  DDPM_CHECK(g.dim() == 1 && g.size(0) == a.N && g.scalar_type() == at::kDouble && g.is_contiguous(),
             "ddpm_fast: grad_terms must have shape (N,)");
  DDPM_CHECK(grad_model_output.sizes() == model_output.sizes() &&
                 grad_model_output.scalar_type() == model_output.scalar_type(),
             "ddpm_fast: grad_model_output must be shaped like model_output");
  a.grad = view3(grad_model_output);
  a.grad_var = a.C * grad_model_output.stride(1);
  a.g = g.data_ptr<double>();
  a.mean_grad = mean_grad;
  return a;
}

}  // namespace ddpm_fast
