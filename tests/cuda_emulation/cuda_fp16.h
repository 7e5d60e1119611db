// Stand-in __half (stores a float: the emulation checks indexing, not fp16 rounding).
#pragma once
#include "cuda_runtime.h"
struct __half {
  float v;
};
inline float __half2float(__half h) { return h.v; }
inline __half __float2half_rn(float f) { return __half{f}; }
