// The CUDA vlb_terms kernels' arguments and launchers (vlb_terms_cuda.cu): plain CUDA, no torch, so
// that the torch glue (cuda_ops.cpp) and the CPU emulation tests (tests/cuda_emulation/) call the same
// declarations. The maths is csrc/vlb_terms_cpu.cpp's; the table layout is ops/vlb_terms.py's.
#pragma once
#include <cuda_runtime.h>

#include "kernel_args.h"

namespace ddpm_fast {

// Variance codes (ops/vlb_terms.py VAR_CODES) and the table's columns per timestep.
enum VlbVarCode : int { kVlbVarFixed = 0, kVlbVarLearnedRange = 1, kVlbVarLearned = 2 };
constexpr int kVlbTableCols = 8;

struct VlbTermsArgs {
  View3 mo, x0, xt;               // (N, C or 2C, S), (N, C, S), (N, C, S)
  View3 grad;                     // backward: shaped like mo
  int64_t mo_var = 0;             // element offset of mo's variance channels (C * mo's channel stride)
  int64_t grad_var = 0;           // the same in grad
  const int64_t* t = nullptr;     // (N,) timesteps, clamped to [0, T) in the kernels
  Table table;                    // (T, 8) row-major: c1, c2, lvq, lvp, D, a, b, dfix
  const double* g = nullptr;      // backward: (N,) float64 d loss / d terms
  double per = 0.0;               // 1 / (C S log 2): nats summed over a sample -> bits per dimension
  int64_t T = 0, N = 0, C = 0, S = 0;
  int var = kVlbVarFixed;
  bool clip = false, mean_grad = true;
};

// The forward's float64 workspace: one partial sum per (row, tile) of 1024 elements (kTile).
inline int64_t vlb_terms_partials(const VlbTermsArgs& a) { return a.N * a.C * ((a.S + 1023) / 1024); }

// terms[n] (float32, or float64 when terms_f64) = the sample's summed terms x per; partial: a device
// buffer of vlb_terms_partials(a) doubles.
cudaError_t launch_vlb_terms_fwd_cuda(const VlbTermsArgs& a, DType dtype, double* partial, void* terms, bool terms_f64,
                                      cudaStream_t stream);
// grad (dtype, shaped like mo) = g[n] x per x d term / d mo; the mean channels 0 where !mean_grad.
cudaError_t launch_vlb_terms_bwd_cuda(const VlbTermsArgs& a, DType dtype, cudaStream_t stream);

}  // namespace ddpm_fast
