// out[i] = philox_randn(seed, offset + i) for i < count (CPU, vectorised).
#pragma once
#include <cstdint>

namespace ddpm_fast {

// Elements per chunk that the CPU kernels draw at once into a stack buffer.
constexpr int64_t kNoiseChunk = 1024;

void philox_randn_fill(uint64_t seed, uint64_t offset, int64_t count, float* out);

// The portable loop that CPUs without AVX2 run, in the active ISA's build (exposed so that tests
// can check it anywhere).
void philox_randn_fill_portable(uint64_t seed, uint64_t offset, int64_t count, float* out);

}  // namespace ddpm_fast
