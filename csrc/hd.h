// DDPM_HD marks functions that compile for both the host and (under nvcc) the device.
#pragma once
#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#else
#define DDPM_HD inline
#endif
