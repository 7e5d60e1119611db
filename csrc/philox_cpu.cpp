// Bulk Philox normals for the CPU kernels. This file alone is built with -ffast-math so that
// the loop vectorises (glibc's libmvec logf/cosf) for whichever of AVX-512/AVX2/SSE the CPU
// has: ~3x faster than the scalar draw, within 1e-6 of it.
#include "philox_cpu.h"

#include "philox.h"

namespace ddpm_fast {

__attribute__((target_clones("avx512f", "avx2", "default")))
void philox_randn_fill(uint64_t seed, uint64_t offset, int64_t count, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = philox_randn(seed, offset + static_cast<uint64_t>(i));
}

}  // namespace ddpm_fast
