// The private op namespace ddpm_fast_C (kernels called by the public ddpm_fast:: custom ops)
// and the Python module ddpm_fast._C, whose import loads the registrations.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/python.h>

#include <vector>

#include "cpu_isa.h"
#include "group_norm_silu_autograd.h"
#include "philox_cpu.h"

#ifndef DDPM_FAST_TORCH_VERSION
#define DDPM_FAST_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(ddpm_fast_C, m) {
  m.def(
      "q_sample(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1mab, Tensor? noise, Tensor? seed, "
      "Tensor(a!) x_t, Tensor(b!)? noise_out, Tensor(c!)? target, int target_kind) -> ()");
  m.def(
      "posterior_step(Tensor model_output, Tensor sample, Tensor t, Tensor prev_t, Tensor alphas_cumprod, "
      "Tensor? noise, Tensor? seed, Tensor? thresh_scale, Tensor(a!) prev, Tensor(b!)? pred_x0, "
      "Tensor(c!)? abs_x0, float final_alpha_cumprod, float guidance_scale, float clip_range, float eta, "
      "int kind, int pred, int var, int clip, bool guidance, bool use_clipped_model_output, "
      "Tensor? guide=None) -> ()");
  // One planned linear solver step (solver_step.h); history updated in place, step read from step_t
  // when given (a device index), else step.
  m.def(
      "solver_step(Tensor model_output, Tensor x, Tensor(a!) history, Tensor? step_t, int step, Tensor to_d_x, "
      "Tensor to_d_out, Tensor mix, Tensor write_slot, Tensor? noise, Tensor? seed, Tensor? thresh_scale, "
      "Tensor(b!) x_next, Tensor(c!)? abs_d0, float guidance_scale, float clip_range, int limit, bool guidance, "
      "Tensor? guide=None, Tensor? guide_coef=None) -> ()");
  // Values at ascending ranks r and r + 1 of each row of |x| (dynamic thresholding's quantile).
  m.def("abs_order_stats(Tensor x, int rank) -> (Tensor, Tensor)");
  m.def(
      "group_norm_silu_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? bias_nc, Tensor? scale_nc, "
      "Tensor? shift_nc, Tensor? residual, int num_groups, float eps, bool silu, Tensor(a!) y, Tensor(b!) mean, "
      "Tensor(c!) rstd) -> ()");
  m.def(
      "group_norm_silu_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? bias_nc, "
      "Tensor? scale_nc, Tensor? shift_nc, Tensor mean, Tensor rstd, int num_groups, bool silu, "
      "Tensor(a!) grad_x, Tensor(b!) sum_g, Tensor(c!) sum_g_xhat, Tensor(d!)? grad_bias_nc) -> ()");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpm_fast compiled kernels (registered as torch.ops.ddpm_fast_C.*)";
  m.attr("torch_version") = DDPM_FAST_TORCH_VERSION;
#ifdef DDPM_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def(
      "cpu_isa",
      [] {
        using namespace ddpm_fast;
        return std::vector<std::string>{cpu_isa_name(cpu_isa()), cpu_isa_name(cpu_isa_detected())};
      },
      "[active, detected]: the vector ISA the CPU kernels run (avx512, avx2 or base) and the best this CPU has.");
  m.def(
      "set_cpu_isa",
      [](const std::string& cap) {
        using namespace ddpm_fast;
        CpuIsa isa;
        if (!parse_cpu_isa(cap, &isa))
          throw pybind11::value_error("set_cpu_isa: expected avx512, avx2 or base, got '" + cap + "'");
        const std::string previous = cpu_isa_name(cpu_isa_cap());
        set_cpu_isa_cap(isa);
        return previous;
      },
      pybind11::arg("cap"),
      "Cap the CPU kernels' vector ISA (as DDPM_FAST_CPU_ISA does at start-up); returns the previous cap.");
  // Eager group_norm_silu with its C++ autograd node, called straight from Python: the dispatcher's
  // Python entry (torch.ops) cost ~2.4 us more a call (ad hoc: 6.4 vs 4.2 us at 1x32x1x1), ~6% of a
  // batch-1 forward. For plain tensors in eager mode only (ops/groupnorm_silu.py): no dispatch keys
  // to honour there (torch.compile, tensor subclasses and modes take the custom ops).
  m.def("group_norm_silu_eager", &ddpm_fast::group_norm_silu_autograd,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "y = group_norm_silu(x, weight, bias, bias_nc, scale_nc, shift_nc, residual, num_groups, eps, silu), "
        "recording the C++ autograd node (csrc/group_norm_silu_autograd.cpp).");
  // A test hook: the CPU kernels' bulk draw at any offset (reference.philox_randn's offset=).
  m.def(
      "philox_randn_fill",
      [](uint64_t seed, uint64_t offset, int64_t count, bool portable) {
        if (count < 0) throw pybind11::value_error("philox_randn_fill: count must be >= 0");
        std::vector<float> out(static_cast<size_t>(count));
        if (portable) ddpm_fast::philox_randn_fill_portable(seed, offset, count, out.data());
        else ddpm_fast::philox_randn_fill(seed, offset, count, out.data());
        return out;
      },
      pybind11::arg("seed"), pybind11::arg("offset"), pybind11::arg("count"), pybind11::arg("portable") = false,
      "Normals of elements offset .. offset + count - 1 of the stream seed, as the CPU kernels draw them "
      "(portable=True: the loop that CPUs without AVX2 run).");
}
