// The CUDA kernels' launchers (noising_cuda.cu, posterior_cuda.cu): plain CUDA, no torch, so
// that the torch glue (cuda_ops.cpp) and the CPU emulation tests (tests/cuda_emulation/) call
// the same declarations.
#pragma once
#include <cuda_runtime.h>

#include "kernel_args.h"

namespace ddpm_fast {

cudaError_t launch_q_sample_cuda(const QSampleArgs& a, DType x_dtype, cudaStream_t stream);
cudaError_t launch_posterior_cuda(const PosteriorArgs& a, DType mo_dtype, DType x_dtype, cudaStream_t stream);

}  // namespace ddpm_fast
