// The C entry point of the CUDA solver_step launcher, for tests/test_solver_step.py to call through
// ctypes with flat arrays (pointers, integers, reals in the orders below), as c_api.cpp does for
// q_sample and posterior_step.
#include <cstdint>

#include "kernel_args.h"
#include "solver_step_cuda.h"

using namespace ddpm_fast;

namespace {
View3 view(void* ptr, const int64_t* strides) { return View3{ptr, strides[0], strides[1], strides[2]}; }
}  // namespace

// p: model_output, x, noise, x_next, history, abs_d0, step_t, to_d_x, to_d_out, mix, write_slot,
//    thresh_scale, seed, guide, guide_coef (null: absent)
// i: strides (3 each) of model_output, x, noise, x_next, history slot 0, abs_d0; then hist_slot,
//    mo_half, step, num_steps, N, C, S, R, W, limit, guidance, the model_output and x dtypes
//    (kernel_args.h DType); the guide's strides
// r: guidance_scale, clip_range
extern "C" int emulated_solver_step(void* const* p, const int64_t* i, const double* r) {
  SolverStepArgs a;
  a.model_output = view(p[0], i), a.x = view(p[1], i + 3), a.noise = view(p[2], i + 6);
  a.x_next = view(p[3], i + 9), a.history = view(p[4], i + 12), a.abs_d0 = view(p[5], i + 15);
  a.step_ptr = static_cast<const int64_t*>(p[6]);
  a.to_d_x = static_cast<const double*>(p[7]), a.to_d_out = static_cast<const double*>(p[8]);
  a.mix = static_cast<const double*>(p[9]), a.write_slot = static_cast<const int64_t*>(p[10]);
  a.thresh_scale = p[11];
  a.seed = static_cast<const int64_t*>(p[12]);
  a.guide = view(p[13], i + 31), a.guide_coef = static_cast<const double*>(p[14]);
  a.hist_slot = i[18], a.mo_half = i[19], a.step = i[20], a.num_steps = i[21];
  a.N = i[22], a.C = i[23], a.S = i[24], a.R = static_cast<int>(i[25]), a.W = static_cast<int>(i[26]);
  a.limit = static_cast<int>(i[27]), a.guidance = i[28] != 0;
  a.guidance_scale = r[0], a.clip_range = r[1];
  return launch_solver_step_cuda(a, static_cast<DType>(i[29]), static_cast<DType>(i[30]), nullptr);
}
