// DDPM_HD marks functions that compile for both the host and (under nvcc) the device.
// DDPM_HD_ALWAYS_INLINE: the same, always inlined on the host too (per-element maths called in CPU
// loops that must vectorise: a call left in the loop keeps it scalar).
#pragma once
#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#define DDPM_HD_ALWAYS_INLINE __host__ __device__ __forceinline__
#else
#define DDPM_HD inline
#define DDPM_HD_ALWAYS_INLINE inline __attribute__((always_inline))
#endif
