// The CUDA vlb_terms kernels' launchers (vlb_terms_cuda.cu): plain CUDA, no torch, so that the torch
// glue (cuda_ops.cpp) and the CPU emulation tests (tests/cuda_emulation/) call the same declarations.
// The arguments and the maths are vlb_terms_math.h's, shared with the CPU kernels.
#pragma once
#include <cuda_runtime.h>

#include "vlb_terms_math.h"

namespace ddpm_fast {

// The forward's float64 workspace: one partial sum per (row, tile) of 1024 elements (kTile).
inline int64_t vlb_terms_partials(const VlbTermsArgs& a) { return a.N * a.C * ((a.S + 1023) / 1024); }

// terms[n] (float32, or float64 when terms_f64) = the sample's summed terms x per; partial: a device
// buffer of vlb_terms_partials(a) doubles.
cudaError_t launch_vlb_terms_fwd_cuda(const VlbTermsArgs& a, DType dtype, double* partial, void* terms, bool terms_f64,
                                      cudaStream_t stream);
// grad (dtype, shaped like mo) = g[n] x per x d term / d mo; the mean channels 0 where !mean_grad.
cudaError_t launch_vlb_terms_bwd_cuda(const VlbTermsArgs& a, DType dtype, cudaStream_t stream);

}  // namespace ddpm_fast
