// Stand-in __nv_bfloat16 (stores a float: the emulation checks indexing, not bf16 rounding).
#pragma once
#include "cuda_runtime.h"
struct __nv_bfloat16 {
  float v;
};
inline float __bfloat162float(__nv_bfloat16 h) { return h.v; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{f}; }
