// Host stand-ins for the CUDA runtime pieces that csrc/'s kernels use, so that
// test_cuda_emulation.py can compile those kernels with g++ and run them on the CPU: a kernel
// is a plain function, threadIdx/blockIdx are globals that emulate.h steps through. __shared__
// arrays are static (one copy, blocks run one after another); __syncthreads switches between the
// threads of a block (emulate.h's emulate_launch_synced).
#pragma once
#include <cmath>
#include <cstdint>

struct EmulatedIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline EmulatedIndex threadIdx, blockIdx;

typedef int cudaError_t;
constexpr int cudaSuccess = 0;
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads();  // emulate.h

inline void sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline uint32_t __umulhi(uint32_t a, uint32_t b) { return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32); }
