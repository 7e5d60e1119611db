// Plain-data kernel arguments shared by the C++ (CPU) and CUDA kernels. Every tensor is seen
// as a 3-D (N, C, S) view with element strides, so NCHW, channels_last and sliced inputs are
// read in place. Pointers are raw: this header needs neither torch nor CUDA.
#pragma once
#include <cstdint>

#include "hd.h"

namespace ddpm_fast {

struct View3 {
  void* ptr = nullptr;
  int64_t sn = 0, sc = 0, ss = 0;
  // Element offset of (n, c, s); int64 so that tensors past 2^31 elements index correctly.
  DDPM_HD int64_t at(int64_t n, int64_t c, int64_t s) const { return n * sn + c * sc + s * ss; }
};

enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// A coefficient table indexed by timestep: float32, or float64 for float64 inputs.
struct Table {
  const void* ptr = nullptr;
  bool f64 = false;
  template <typename F>
  DDPM_HD F get(int64_t i) const {
    return f64 ? F(static_cast<const double*>(ptr)[i]) : F(static_cast<const float*>(ptr)[i]);
  }
};

enum TargetKind : int { kTargetNone = 0, kTargetEps = 1, kTargetX0 = 2, kTargetV = 3 };

struct QSampleArgs {
  View3 x0, noise, x_t, noise_out, target;  // noise.ptr == nullptr: draw in-kernel from seed
  const int64_t* t = nullptr;               // (N,)
  Table sqrt_ab;                            // (T,) sqrt(alpha_bar)
  Table sqrt_1mab;                          // (T,) sqrt(1 - alpha_bar)
  const int64_t* seed = nullptr;            // (1,) Philox key, device-resident
  int64_t T = 0, N = 0, C = 0, S = 0;
  int target_kind = kTargetNone;
};

enum SamplerKind : int { kDDPM = 0, kDDIM = 1 };
enum PredictionType : int { kPredEps = 0, kPredSample = 1, kPredV = 2 };
enum VarianceType : int { kFixedSmall = 0, kFixedSmallLog = 1, kFixedLarge = 2, kLearned = 3, kLearnedRange = 4 };
enum ClipMode : int { kClipNone = 0, kClip = 1, kThreshold = 2 };

struct PosteriorArgs {
  View3 model_output;  // (N or 2N, C or 2C, S); halves [uncond, cond] when guided
  View3 sample, noise, prev, pred_x0, abs_x0;
  View3 guide;          // guidance gradient g (sample's dtype); ptr == nullptr: none (step_math.h)
  int64_t mo_half = 0;  // element offset of the conditional half (guidance)
  int64_t mo_var = 0;   // element offset of the variance channels (learned variance)
  const int64_t* t = nullptr;
  const int64_t* prev_t = nullptr;   // < 0: last step
  Table alphas_cumprod;
  const void* thresh_scale = nullptr;  // (N,) dynamic-threshold s (float, double for F = double)
  const int64_t* seed = nullptr;
  int64_t T = 0, N = 0, C = 0, S = 0;
  double final_alpha_cumprod = 1.0, guidance_scale = 1.0, clip_range = 1.0, eta = 0.0;  // cast to F in kernels
  int kind = kDDPM, pred = kPredEps, var = kFixedSmall, clip = kClipNone;
  bool guidance = false, has_variance = false, use_clipped_model_output = false;
};

}  // namespace ddpm_fast
