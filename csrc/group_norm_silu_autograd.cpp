// group_norm_silu's eager autograd in C++: group_norm_silu_autograd (ddpm_fast._C.group_norm_silu_eager,
// module.cpp) returns y and records a C++ autograd node whose backward runs group_norm_silu_bwd and
// finishes the parameter gradients. The Python autograd.Function it replaces in eager mode cost ~120 us a forward +
// backward (Function.apply, the Python backward and its dozen small ops), which is as much as the
// whole op at batch 1; the engine calls this node without Python. The maths mirrors
// ddpm_fast/ops/groupnorm_silu.py (_group_norm_silu_impl, _backward_impl), which stays the path for
// torch.compile, and a backward with create_graph=True goes through that file's custom backward op
// so a second derivative raises its clear error.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>

#include "group_norm_silu_autograd.h"
#include "torch_glue.h"

namespace ddpm_fast {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType stat_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The per-channel parameters as the kernels take them: contiguous, in the statistics dtype.
optional<Tensor> kernel_param(const optional<Tensor>& p, at::ScalarType st) {
  if (!p.has_value() || !p->defined()) return std::nullopt;
  return p->scalar_type() == st && p->is_contiguous() ? *p : p->to(st).contiguous();
}

// x as the kernels take it: NCHW-contiguous and channels_last as they are, anything else copied
// (the kernels merge the trailing dims into one strided dim).
Tensor kernel_input(const Tensor& x) {
  if (x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))) return x;
  return x.contiguous();
}

// An output shaped, laid out and typed like a kernel input (kernel_input's layouts keep theirs).
Tensor output_like(const Tensor& x) { return at::empty_like(x); }

Tensor defined_or_empty(const optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

optional<Tensor> present(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

void call_forward(const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b, const optional<Tensor>& bnc,
                  const optional<Tensor>& sc, const optional<Tensor>& sh, const optional<Tensor>& res, int64_t groups,
                  double eps, bool silu, const Tensor& y, const Tensor& mean, const Tensor& rstd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ddpm_fast_C::group_norm_silu_fwd", "")
                       .typed<void(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                   const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
                                   const optional<Tensor>&, int64_t, double, bool, const Tensor&, const Tensor&,
                                   const Tensor&)>();
  op.call(x, w, b, bnc, sc, sh, res, groups, eps, silu, y, mean, rstd);
}

void call_backward(const Tensor& dy, const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b,
                   const optional<Tensor>& bnc, const optional<Tensor>& sc, const optional<Tensor>& sh,
                   const Tensor& mean, const Tensor& rstd, int64_t groups, bool silu, const Tensor& dx,
                   const Tensor& sum_g, const Tensor& sum_gx, const optional<Tensor>& dbnc) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ddpm_fast_C::group_norm_silu_bwd", "")
                       .typed<void(const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                   const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
                                   const Tensor&, const Tensor&, int64_t, bool, const Tensor&, const Tensor&,
                                   const Tensor&, const optional<Tensor>&)>();
  op.call(dy, x, w, b, bnc, sc, sh, mean, rstd, groups, silu, dx, sum_g, sum_gx, dbnc);
}

// The Python custom op ddpm_fast::group_norm_silu_backward (registered when ddpm_fast.ops is
// imported), for a backward that is itself recorded (create_graph=True): its outputs carry
// torch.library's "no autograd formula" node, as the Python path's do.
std::array<Tensor, 6> recorded_backward(const Tensor& dy, const Tensor& x, const optional<Tensor>& w,
                                        const optional<Tensor>& b, const optional<Tensor>& bnc,
                                        const optional<Tensor>& sc, const optional<Tensor>& sh, const Tensor& mean,
                                        const Tensor& rstd, int64_t groups, bool silu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ddpm_fast::group_norm_silu_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                           const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
                           const Tensor&, int64_t, bool, c10::string_view)>();
  auto [gx, gw, gb, gbnc, gsc, gsh] = op.call(dy, x, w, b, bnc, sc, sh, mean, rstd, groups, silu, "cpp");
  return {gx, gw, gb, gbnc, gsc, gsh};
}

// (dx, dweight, dbias, d bias_nc, d scale_nc, d shift_nc) as _backward_impl computes them, each in
// its input's dtype (undefined for an absent input).
std::array<Tensor, 6> kernel_backward(const Tensor& grad_y, const Tensor& x, const optional<Tensor>& weight,
                                      const optional<Tensor>& bias, const optional<Tensor>& bias_nc,
                                      const optional<Tensor>& scale_nc, const optional<Tensor>& shift_nc,
                                      const Tensor& mean, const Tensor& rstd, int64_t groups, bool silu) {
  const at::ScalarType st = mean.scalar_type();
  const auto w = kernel_param(weight, st), b = kernel_param(bias, st), bnc = kernel_param(bias_nc, st);
  const auto sc = kernel_param(scale_nc, st), sh = kernel_param(shift_nc, st);
  const int64_t n = x.size(0), c = x.size(1);
  Tensor grad_x = output_like(x);
  const auto stat_opts = mean.options();
  // the kernel writes every (n, c) of its sums; with no positions it does not run, and they are 0
  const auto alloc = [&] { return x.numel() ? at::empty({n, c}, stat_opts) : at::zeros({n, c}, stat_opts); };
  Tensor sum_g = alloc(), sum_gx = alloc();
  Tensor grad_bnc = bias_nc.has_value() ? alloc() : Tensor();
  if (x.numel()) {
    const Tensor dy = kernel_input(grad_y.scalar_type() == x.scalar_type() ? grad_y : grad_y.to(x.scalar_type()));
    call_backward(dy, x, w, b, bnc, sc, sh, mean, rstd, groups, silu, grad_x, sum_g, sum_gx, present(grad_bnc));
  } else {
    grad_x.zero_();
  }
  // n = (x_hat w + b)(1 + scale) + shift: per (n, c), dL/dw = (1 + scale) sum g x_hat, dL/db =
  // (1 + scale) sum g, dL/dscale = w sum g x_hat + b sum g, dL/dshift = sum g.
  const Tensor s1 = sc.has_value() ? 1 + *sc : Tensor();
  // the sum over n; one image's row as it is (a sum of one term: the same value, without an op)
  const auto sum_n = [n, c](const Tensor& t) { return n == 1 ? t.view({c}) : t.sum(0); };
  std::array<Tensor, 6> grads;
  grads[0] = grad_x;
  if (weight.has_value()) grads[1] = sum_n(s1.defined() ? s1 * sum_gx : sum_gx).to(weight->scalar_type());
  if (bias.has_value()) grads[2] = sum_n(s1.defined() ? s1 * sum_g : sum_g).to(bias->scalar_type());
  if (bias_nc.has_value()) grads[3] = grad_bnc.to(bias_nc->scalar_type());
  if (scale_nc.has_value()) {
    Tensor u = w.has_value() ? *w * sum_gx : sum_gx;
    if (b.has_value()) u = u + *b * sum_g;
    grads[4] = u.to(scale_nc->scalar_type());
  }
  // (at batch 1 without scale_nc dbias is a view of sum_g: d shift_nc gets a copy, so that no two
  // gradients share memory, which an in-place accumulation into one .grad would change in both)
  if (shift_nc.has_value())
    grads[5] = sum_g.to(shift_nc->scalar_type(), false, /*copy=*/n == 1 && bias.has_value() && !s1.defined());
  return grads;
}

struct GroupNormSiluFunction : public torch::autograd::Function<GroupNormSiluFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const optional<Tensor>& bias_nc,
                        const optional<Tensor>& scale_nc, const optional<Tensor>& shift_nc,
                        const optional<Tensor>& residual, int64_t groups, double eps, bool silu) {
    const Tensor x = kernel_input(x_in);
    const at::ScalarType st = stat_dtype(x);
    Tensor y = output_like(x);
    Tensor mean = at::empty({x.size(0), groups}, x.options().dtype(st));
    Tensor rstd = at::empty_like(mean);
    if (x.numel()) {
      const optional<Tensor> res = residual.has_value() ? optional<Tensor>(kernel_input(*residual)) : std::nullopt;
      call_forward(x, kernel_param(weight, st), kernel_param(bias, st), kernel_param(bias_nc, st),
                   kernel_param(scale_nc, st), kernel_param(shift_nc, st), res, groups, eps, silu, y, mean, rstd);
    } else {
      mean.zero_(), rstd.zero_();
    }
    ctx->save_for_backward({x, defined_or_empty(weight), defined_or_empty(bias), defined_or_empty(bias_nc),
                            defined_or_empty(scale_nc), defined_or_empty(shift_nc), mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    ctx->saved_data["residual"] = residual.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const std::array<optional<Tensor>, 5> params{present(saved[1]), present(saved[2]), present(saved[3]),
                                                 present(saved[4]), present(saved[5])};
    const Tensor &mean = saved[6], &rstd = saved[7];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool silu = ctx->saved_data["silu"].toBool();
    const bool has_residual = ctx->saved_data["residual"].toBool();
    variable_list result(10);  // one per forward argument; undefined = no gradient
    const Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return result;
    const auto grads = at::GradMode::is_enabled()
                           ? recorded_backward(grad_y, x, params[0], params[1], params[2], params[3], params[4], mean,
                                               rstd, groups, silu)
                           : kernel_backward(grad_y, x, params[0], params[1], params[2], params[3], params[4], mean,
                                             rstd, groups, silu);
    // needs_input_grad counts only the inputs that were given (x, then the present optionals).
    size_t edge = 0;
    if (ctx->needs_input_grad(edge++)) result[0] = grads[0];
    for (size_t i = 0; i < params.size(); ++i) {
      if (!params[i].has_value()) continue;
      if (ctx->needs_input_grad(edge++)) result[i + 1] = grads[i + 1];
    }
    if (has_residual && ctx->needs_input_grad(edge)) result[6] = grad_y;
    return result;
  }
};

}  // namespace

Tensor group_norm_silu_autograd(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                                const optional<Tensor>& bias_nc, const optional<Tensor>& scale_nc,
                                const optional<Tensor>& shift_nc, const optional<Tensor>& residual, int64_t groups,
                                double eps, bool silu) {
  return GroupNormSiluFunction::apply(x, weight, bias, bias_nc, scale_nc, shift_nc, residual, groups, eps, silu);
}

}  // namespace ddpm_fast
