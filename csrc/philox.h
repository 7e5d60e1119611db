// Philox4x32-10 and the normal draw, bit-compatible with Triton's tl.randn4x(seed, block):
// element L of a draw is lane L % 4 of block L / 4, whose counter is (block_lo, block_hi, 0, 0)
// and key (seed_lo, seed_hi); Box-Muller turns words (0, 1) into lanes 0 (cos) and 1 (sin),
// words (2, 3) into lanes 2 (cos) and 3 (sin). So the C++, CUDA and Triton backends draw the
// same noise for the same seed (up to the rounding of log/cos/sin in each math library).
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

// Box-Muller's radius sqrt(-2 ln u) and angle 2 pi u' (Triton's pair_uniform_to_normal).
DDPM_HD float box_muller_radius(uint32_t bits) {
  float u = uint_to_uniform(bits);
  u = u > 1.0e-7f ? u : 1.0e-7f;
  return sqrtf(-2.0f * logf(u));
}

DDPM_HD float box_muller_angle(uint32_t bits) { return 6.283185307179586f * uint_to_uniform(bits); }

// Block `block` of the stream `seed`: the four normals of elements 4 * block + 0..3.
DDPM_HD void philox_randn4(uint64_t seed, uint64_t block, float out[4]) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = 0, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float r01 = box_muller_radius(c0), theta01 = box_muller_angle(c1);
  const float r23 = box_muller_radius(c2), theta23 = box_muller_angle(c3);
#if defined(__CUDA_ARCH__)
  float s01, c01, s23, c23;  // sincosf, as philox_randn: the same bits from either
  sincosf(theta01, &s01, &c01);
  sincosf(theta23, &s23, &c23);
  out[0] = r01 * c01;
  out[1] = r01 * s01;
  out[2] = r23 * c23;
  out[3] = r23 * s23;
#else
  out[0] = r01 * cosf(theta01);
  out[1] = r01 * sinf(theta01);
  out[2] = r23 * cosf(theta23);
  out[3] = r23 * sinf(theta23);
#endif
}

// One standard normal: element `element` of the stream `seed` (one thread per element on CUDA:
// only the lane's word pair and its cos or sin are turned into a normal).
DDPM_HD float philox_randn(uint64_t seed, uint64_t element) {
  const uint64_t block = element >> 2;
  const unsigned lane = static_cast<unsigned>(element & 3);
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = 0, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float r = box_muller_radius(lane < 2 ? c0 : c2);
  const float theta = box_muller_angle(lane < 2 ? c1 : c3);
#if defined(__CUDA_ARCH__)
  float s, c;
  sincosf(theta, &s, &c);  // neighbouring threads want cos and sin: one call, no divergence
  return r * ((lane & 1) ? s : c);
#else
  return r * ((lane & 1) ? sinf(theta) : cosf(theta));
#endif
}

}  // namespace ddpm_fast
