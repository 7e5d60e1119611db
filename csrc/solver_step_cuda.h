// The CUDA solver_step kernel's launcher (solver_step_cuda.cu): plain CUDA, no torch, so that the
// torch glue (cuda_ops.cpp) and the CPU emulation tests (tests/cuda_emulation/) call the same
// declaration.
#pragma once
#include <cuda_runtime.h>

#include "kernel_args.h"
#include "solver_step.h"

namespace ddpm_fast {

cudaError_t launch_solver_step_cuda(const SolverStepArgs& a, DType mo_dtype, DType x_dtype, cudaStream_t stream);

}  // namespace ddpm_fast
