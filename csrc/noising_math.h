// Per-element arithmetic of forward noising, shared by the C++ and CUDA kernels.
#pragma once
#include "kernel_args.h"

namespace ddpm_fast {

// x_t = sqrt(a_bar) x0 + sqrt(1 - a_bar) z (DDPM eq. 4) and the training target for it.
template <typename F>
DDPM_HD F q_sample_element(F sqrt_ab, F sqrt_1mab, F x0, F z, int target_kind, F* target) {
  if (target_kind == kTargetEps) *target = z;
  else if (target_kind == kTargetX0) *target = x0;
  else if (target_kind == kTargetV) *target = sqrt_ab * z - sqrt_1mab * x0;
  return sqrt_ab * x0 + sqrt_1mab * z;
}

}  // namespace ddpm_fast
