// Bulk Philox normals for the CPU kernels. This file alone is built with -ffast-math so that
// the generic loop vectorises (glibc's libmvec logf/cosf). On AVX2 CPUs a hand-written
// 8-lane Philox runs instead: the compiler widened the generic loop's 32x32->64 products to
// 4 lanes of 64 bits and spent ~36 cycles a normal; the intrinsics keep 8 lanes of 32 bits.
// Both give the same bits as philox.h's scalar Philox; the normals agree within libmvec's
// few-ulp log/cos error.
#include "philox_cpu.h"

#include <immintrin.h>

#include "philox.h"

// libmvec's AVX2 logf / cosf (glibc >= 2.22, linked with -lmvec).
extern "C" __m256 _ZGVdN8v_logf(__m256 x);
extern "C" __m256 _ZGVdN8v_cosf(__m256 x);

namespace ddpm_fast {
namespace {

__attribute__((target_clones("avx512f", "avx2", "default")))
void fill_generic(uint64_t seed, uint64_t offset, int64_t count, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = philox_randn(seed, offset + static_cast<uint64_t>(i));
}

// High and low 32 bits of a * b per 32-bit lane; b_odd holds b's odd lanes moved to the even.
__attribute__((target("avx2"))) inline void mul_hi_lo(__m256i a, __m256i b, __m256i b_odd, __m256i* hi,
                                                       __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, b);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b_odd);  // lanes 1, 3, 5, 7
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// philox.h's uint_to_uniform on 8 lanes: fold the sign bit away, scale to [0, 1).
__attribute__((target("avx2"))) inline __m256 to_uniform(__m256i bits) {
  const __m256i folded = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(4.6566127342e-10f));
}

// Eight normals for counters (lo + 0..7, hi): lo + 7 must not wrap.
__attribute__((target("avx2"))) inline __m256 randn8(const __m256i* keys0, const __m256i* keys1, uint32_t lo,
                                                     uint32_t hi) {
  const __m256i kA = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i kB = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i kA_odd = _mm256_srli_epi64(kA, 32), kB_odd = _mm256_srli_epi64(kB, 32);
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(hi));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  for (int round = 0; round < 10; ++round) {
    __m256i hi_b, lo_b, hi_a, lo_a;
    mul_hi_lo(c2, kB, kB_odd, &hi_b, &lo_b);
    mul_hi_lo(c0, kA, kA_odd, &hi_a, &lo_a);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), keys0[round]);
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), keys1[round]);
    c1 = lo_b;
    c3 = lo_a;
  }
  const __m256 u1 = _mm256_max_ps(to_uniform(c0), _mm256_set1_ps(1.0e-7f));
  const __m256 theta = _mm256_mul_ps(_mm256_set1_ps(6.283185307179586f), to_uniform(c1));
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _ZGVdN8v_logf(u1)));
  return _mm256_mul_ps(r, _ZGVdN8v_cosf(theta));
}

__attribute__((target("avx2"))) void fill_avx2(uint64_t seed, uint64_t offset, int64_t count, float* out) {
  __m256i keys0[10], keys1[10];  // the round keys, the same for every counter
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    keys0[round] = _mm256_set1_epi32(static_cast<int>(k0));
    keys1[round] = _mm256_set1_epi32(static_cast<int>(k1));
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const uint64_t off = offset + static_cast<uint64_t>(i);
    const uint32_t lo = static_cast<uint32_t>(off);
    if (lo > 0xFFFFFFF8u) {  // the low word wraps inside these 8: let the generic loop carry
      fill_generic(seed, off, 8, out + i);
      continue;
    }
    _mm256_storeu_ps(out + i, randn8(keys0, keys1, lo, static_cast<uint32_t>(off >> 32)));
  }
  if (i < count) fill_generic(seed, offset + static_cast<uint64_t>(i), count - i, out + i);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

}  // namespace

void philox_randn_fill(uint64_t seed, uint64_t offset, int64_t count, float* out) {
  if (has_avx2()) fill_avx2(seed, offset, count, out);
  else fill_generic(seed, offset, count, out);
}

}  // namespace ddpm_fast
