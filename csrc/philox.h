// Philox4x32-10 and the normal draw, bit-compatible with Triton's tl.randn(seed, offset):
// the counter is (offset_lo, offset_hi, 0, 0), the key (seed_lo, seed_hi), and the normal is
// Box-Muller of the first two words. So the C++, CUDA and Triton backends draw the same
// noise for the same seed (up to the rounding of log/cos in each math library).
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace ddpm_fast {

DDPM_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

DDPM_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = umulhi32(kRoundB, a2) ^ c1 ^ k0;
    c2 = umulhi32(kRoundA, a0) ^ c3 ^ k1;
    c1 = kRoundB * a2;
    c3 = kRoundA * a0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// Triton's uint_to_uniform_float: fold the sign bit away, scale to [0, 1).
DDPM_HD float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// One standard normal for element `offset` of the stream `seed`.
DDPM_HD float philox_randn(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  float u1 = uint_to_uniform(c0);
  const float u2 = uint_to_uniform(c1);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float theta = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(theta);
}

}  // namespace ddpm_fast
