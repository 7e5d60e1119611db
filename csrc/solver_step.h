// One planned linear solver step (ddpm_fast/solvers/base.py: apply_step), shared by the C++ and
// CUDA kernels: the plain-data arguments, the step's coefficients read from the plan's float64
// device tensors, and the per-element arithmetic in the reference's order:
//   D_0 = limit(p x + q out);  v = [x, out, D_0, z, H_0..H_{R-1}]
//   x_next = mix[s, 0, :] . v;  H[write_slot[s, k]] = mix[s, 1 + k, :] . v  (all reads first)
// Each row is summed as apply_step sums it: ((m0 x + m1 out) + m2 D_0) (+ m3 z), then + the
// history terms summed on their own (m4 H_0 + m5 H_1 + ...). A slot whose coefficients are zero in
// every row of the step is not read (its terms, 0 * H, drop out of the sums: the same value unless
// the slot holds inf or NaN), so a step moves only the slots it uses. No torch or CUDA headers.
#pragma once
#include <cstdint>

#include "hd.h"
#include "kernel_args.h"
#include "step_math.h"

#if defined(__CUDACC__)
#define DDPM_UNROLL _Pragma("unroll")
#else
#define DDPM_UNROLL _Pragma("GCC unroll 8")
#endif

namespace ddpm_fast {

constexpr int kSolverMaxSlots = 4;   // R: history slots a step may read
constexpr int kSolverMaxWrites = 2;  // W: history writes per step
constexpr int kSolverCols = 4 + kSolverMaxSlots;
enum SolverColumn : int { kColX = 0, kColOut = 1, kColD0 = 2, kColNoise = 3, kColHist = 4 };
enum SolverLimit : int { kLimitNone = 0, kLimitClip = 1, kLimitDynamic = 2 };

struct SolverStepArgs {
  View3 model_output;  // (N or 2N, C or 2C, S): the first C channels; [uncond, cond] halves when guided
  View3 x, noise, x_next;
  View3 history;        // slot 0 of the (R + 1, N, C, S) history; slot r lies r * hist_slot elements on
  View3 abs_d0;         // set: phase 1 of dynamic thresholding (writes |D_0| before the limit, nothing else)
  View3 guide;          // guidance gradient g (x's dtype), or ptr null (solver_element)
  int64_t hist_slot = 0;
  int64_t mo_half = 0;  // element offset of the conditional half (guidance)
  const int64_t* step_ptr = nullptr;  // the step index on the device, or null: `step`
  int64_t step = 0, num_steps = 0;
  const double* to_d_x = nullptr;      // (S,)
  const double* to_d_out = nullptr;    // (S,)
  const double* mix = nullptr;         // (S, 1 + W, 4 + R)
  const int64_t* write_slot = nullptr; // (S, W), R = the scratch slot (not written)
  const double* guide_coef = nullptr;  // (S,) with a guide (SolverPlan.guide_coef)
  const void* thresh_scale = nullptr;  // (N,) dynamic threshold s (float, double for F = double)
  const int64_t* seed = nullptr;       // Philox key: draw z in-kernel (when noise.ptr is null)
  int64_t N = 0, C = 0, S = 0;
  int R = 0, W = 0;
  double guidance_scale = 1.0, clip_range = 1.0;
  int limit = kLimitNone;
  bool guidance = false;
};

// The step's coefficients in the compute type F (rounded from float64 as apply_step's .to(F));
// rows beyond W and columns beyond 4 + R are 0; slots clamped to [0, R].
template <typename F>
struct SolverCoefs {
  F to_d_x, to_d_out;
  F guide_coef;  // 0 without a guide
  F mix[1 + kSolverMaxWrites][kSolverCols];
  int slot[kSolverMaxWrites];
  bool reads[kSolverMaxSlots];  // slot r has a nonzero coefficient in some row (r < R)
};

DDPM_HD int64_t solver_step_index(const SolverStepArgs& a) {
  const int64_t s = a.step_ptr ? *a.step_ptr : a.step;  // kernels clamp: never read out of bounds
  return s < 0 ? 0 : (s >= a.num_steps ? a.num_steps - 1 : s);
}

template <typename F>
DDPM_HD SolverCoefs<F> solver_coefs(const SolverStepArgs& a) {
  SolverCoefs<F> k;
  const int64_t s = solver_step_index(a);
  k.to_d_x = F(a.to_d_x[s]);
  k.to_d_out = F(a.to_d_out[s]);
  k.guide_coef = a.guide.ptr && a.guide_coef ? F(a.guide_coef[s]) : F(0);
  const int cols = 4 + a.R;
  const double* m = a.mix + s * (1 + a.W) * cols;
  DDPM_UNROLL
  for (int row = 0; row < 1 + kSolverMaxWrites; ++row) {
    DDPM_UNROLL
    for (int c = 0; c < kSolverCols; ++c) k.mix[row][c] = (row <= a.W && c < cols) ? F(m[row * cols + c]) : F(0);
  }
  DDPM_UNROLL
  for (int r = 0; r < kSolverMaxSlots; ++r) {
    bool used = false;
    DDPM_UNROLL
    for (int row = 0; row < 1 + kSolverMaxWrites; ++row) used = used || k.mix[row][kColHist + r] != F(0);
    k.reads[r] = used;  // 0 beyond R (mix columns past 4 + R are 0)
  }
  DDPM_UNROLL
  for (int w = 0; w < kSolverMaxWrites; ++w) {
    const int64_t slot = w < a.W ? a.write_slot[s * a.W + w] : a.R;
    k.slot[w] = slot < 0 ? 0 : (slot > a.R ? a.R : static_cast<int>(slot));
  }
  return k;
}

// D_0 = to_d_x x + to_d_out out, before the limit.
template <typename F>
DDPM_HD F solver_d0(const SolverCoefs<F>& k, F x, F out) {
  return k.to_d_x * x + k.to_d_out * out;
}

template <typename F>
DDPM_HD F solver_limit(const SolverStepArgs& a, F d0, F thresh_s) {
  if (a.limit == kLimitClip) return clamp_value(d0, F(-a.clip_range), F(a.clip_range));
  if (a.limit == kLimitDynamic) return clamp_value(d0, -thresh_s, thresh_s) / thresh_s;
  return d0;
}

// One row of the mix over v = [x, out, d0, z (if has_z), h[0..R-1]].
template <typename F>
DDPM_HD F solver_row(const F* m, F x, F out, F d0, F z, bool has_z, const F* h, int R) {
  F acc = m[kColX] * x + m[kColOut] * out;
  acc = acc + m[kColD0] * d0;
  if (has_z) acc = acc + m[kColNoise] * z;
  if (R > 0) {
    F hs = m[kColHist] * h[0];
    DDPM_UNROLL
    for (int r = 1; r < kSolverMaxSlots; ++r) {
      if (r < R) hs = hs + m[kColHist + r] * h[r];
    }
    acc = acc + hs;
  }
  return acc;
}

// One element: returns x_next and the W values to write (written[w] for w < W). g: the guide's
// element (unread without a guide): after the limit, out + c g and D_0 + to_d_out c g, c the step's
// guide_coef (solvers.base.apply_step).
template <typename F>
DDPM_HD F solver_element(const SolverStepArgs& a, const SolverCoefs<F>& k, F x, F out, F z, bool has_z, const F* h,
                         F thresh_s, F* written, F g = F(0)) {
  F d0 = solver_limit(a, solver_d0(k, x, out), thresh_s);
  if (a.guide.ptr) {
    const F shift = k.guide_coef * g;
    out = out + shift;
    d0 = d0 + k.to_d_out * shift;
  }
  DDPM_UNROLL
  for (int w = 0; w < kSolverMaxWrites; ++w) {
    if (w < a.W) written[w] = solver_row(k.mix[1 + w], x, out, d0, z, has_z, h, a.R);
  }
  return solver_row(k.mix[0], x, out, d0, z, has_z, h, a.R);
}

}  // namespace ddpm_fast
