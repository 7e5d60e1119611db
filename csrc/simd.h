// Float lanes for the CPU kernels' hand-vectorised loops, written once for every width: Lanes<W>
// is a GCC vector of W floats (Lanes<1> a plain float), so one generic body compiles to AVX-512
// (W = 16), AVX2 (W = 8) or SSE2/NEON (W = 4) code inside a function built for that target
// (cpu_isa.h), and to scalar code for the tail of a row (W = 1). Multiply-adds are written out
// (fma<W, kFused>: one rounding in the AVX2 and AVX-512 builds, two in the baseline one) and the
// files using this header are built with -ffp-contract=off, so that the compiler fuses nothing on
// its own (GCC fused a * b + c in 256-bit code but not in the scalar tail): every lane and every
// width does the same arithmetic, and an element's result does not depend on W. Sums go through
// sum32: 32 float partials, lane l holding the elements l mod 32, reduced by one fixed tree,
// whatever W is. With both, the AVX2 and AVX-512 builds of a kernel give the same bits.
// bfloat16 tensors go through the same float lanes (load_bf16 / store_bf16).
//
// Use only from always-inline code that ends up inside a function with a target attribute
// (or in baseline code with W = 4): the vector types follow the enclosing function's ISA.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>  // also declares the __builtin_ia32_vfmadd* used by fma() below
#endif

#define DDPM_SIMD_INLINE inline __attribute__((always_inline))

namespace ddpm_fast::simd {

template <int W>
struct LaneTypes {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef uint32_t I __attribute__((vector_size(4 * W)));
  typedef uint16_t H __attribute__((vector_size(2 * W)));
};
template <>
struct LaneTypes<1> {
  using F = float;
  using I = uint32_t;
  using H = uint16_t;
};

template <int W>
using Lanes = typename LaneTypes<W>::F;
template <int W>
using IntLanes = typename LaneTypes<W>::I;

template <int W>
using HalfLanes = typename LaneTypes<W>::H;

template <int W>
using Width = std::integral_constant<int, W>;

template <int W>
DDPM_SIMD_INLINE Lanes<W> splat(float s) {
  return Lanes<W>{} + s;
}

// A vector (Vec: Lanes, IntLanes, ...) from p, unaligned.
template <typename Vec, typename T>
DDPM_SIMD_INLINE Vec load_as(const T* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
DDPM_SIMD_INLINE Lanes<W> load(const float* p) {
  return load_as<Lanes<W>>(p);
}

template <int W>
DDPM_SIMD_INLINE void store(float* p, Lanes<W> v) {
  std::memcpy(p, &v, sizeof(v));
}

// a < b ? a : b, and a > b ? a : b: with a NaN, b (x86's minps/maxps, one instruction where the
// generic vector code would compare and blend).
template <int W>
DDPM_SIMD_INLINE Lanes<W> vmin(Lanes<W> a, Lanes<W> b) {
#if defined(__x86_64__)
  if constexpr (W == 8) return __builtin_ia32_minps256(a, b);
  if constexpr (W == 16) return __builtin_ia32_minps512_mask(a, b, a, static_cast<unsigned short>(-1), 4);
#endif
  return a < b ? a : b;
}

template <int W>
DDPM_SIMD_INLINE Lanes<W> vmax(Lanes<W> a, Lanes<W> b) {
#if defined(__x86_64__)
  if constexpr (W == 8) return __builtin_ia32_maxps256(a, b);
  if constexpr (W == 16) return __builtin_ia32_maxps512_mask(a, b, a, static_cast<unsigned short>(-1), 4);
#endif
  return a > b ? a : b;
}

template <int W>
DDPM_SIMD_INLINE IntLanes<W> to_bits(Lanes<W> v) {
  IntLanes<W> i;
  std::memcpy(&i, &v, sizeof(v));
  return i;
}

template <int W>
DDPM_SIMD_INLINE IntLanes<W> load_u32(const uint32_t* p) {
  return load_as<IntLanes<W>>(p);
}

// table[idx[l]] in each lane l (every idx[l] < W): one vpermps in the AVX2 and AVX-512 builds
// (the baseline one goes through memory). W = 1: the table's one value.
template <int W>
DDPM_SIMD_INLINE Lanes<W> lookup(Lanes<W> table, IntLanes<W> idx) {
  if constexpr (W == 1) {
    return table;
  } else {
    return __builtin_shuffle(table, idx);
  }
}

template <int W>
DDPM_SIMD_INLINE Lanes<W> from_bits(IntLanes<W> i) {
  Lanes<W> v;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}

// bfloat16 (the upper 16 bits of a float) in and out: widening is exact; narrowing rounds to
// nearest even with NaN -> 0x7FC0, c10::BFloat16's own rounding, so a vector store writes the bits
// that static_cast<c10::BFloat16>(float) would.
template <int W>
DDPM_SIMD_INLINE Lanes<W> load_bf16(const uint16_t* p) {
  if constexpr (W == 1) {
    return from_bits<1>(static_cast<uint32_t>(*p) << 16);
  } else {
    HalfLanes<W> h;
    std::memcpy(&h, p, sizeof(h));
    return from_bits<W>(__builtin_convertvector(h, IntLanes<W>) << 16);
  }
}

template <int W>
DDPM_SIMD_INLINE void store_bf16(uint16_t* p, Lanes<W> v) {
  const IntLanes<W> bits = to_bits<W>(v);
  const IntLanes<W> rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  if constexpr (W == 1) {
    *p = v != v ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  } else {
    const IntLanes<W> nan = reinterpret_cast<IntLanes<W>>(v != v);  // all ones where v is NaN
    const HalfLanes<W> h = __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), HalfLanes<W>);
    std::memcpy(p, &h, sizeof(h));
  }
}

// a * b + c, fused (one rounding) or not. kFused needs FMA: the AVX2 and AVX-512 builds.
template <int W, bool kFused>
DDPM_SIMD_INLINE Lanes<W> fma(Lanes<W> a, Lanes<W> b, Lanes<W> c) {
  if constexpr (!kFused) {
    return a * b + c;
#if defined(__x86_64__)
  } else if constexpr (W == 1) {
    return __builtin_fmaf(a, b, c);
  } else if constexpr (W == 4) {
    return __builtin_ia32_vfmaddps(a, b, c);
  } else if constexpr (W == 8) {
    return __builtin_ia32_vfmaddps256(a, b, c);
  } else {
    static_assert(W == 16, "fused multiply-add for 1, 4, 8 or 16 lanes");
    return __builtin_ia32_vfmaddps512_mask(a, b, c, static_cast<unsigned short>(-1), 4 /* current rounding */);
#else
  } else {
    static_assert(!kFused, "fused multiply-add builds are x86 only");
#endif
  }
}

// e^r ~ 1 + r + r^2 P(r) on |r| <= ln2 / 2, P of degree 4 (highest coefficient first): a
// relative-error minimax fit (3.1e-9, far below float's 6e-8 half ulp; Cephes' expf uses degree 5,
// one multiply-add more, for no gain in float). Checked in float32 arithmetic over [-87, 87]:
// within 1.01 ulp of exp, as Cephes' polynomial.
constexpr float kExpP[5] = {1.3814596459269524e-3f, 8.3687175065279e-3f, 4.166838899254799e-2f,
                            1.666652113199234e-1f, 4.999999403953552e-1f};

// e^x: x = k ln2 + r, k rounded to nearest by adding 1.5 * 2^23 (whose low mantissa bits then
// hold k, so 2^k is built from them with integer adds and a shift, no conversion), e^r by kExpP.
// x is clamped to [-87, 87] (e^-87 ~ 1.6e-38 stays normal), which moves SiLU and its derivative
// by < 1e-36. NaN stays NaN.
//
// exp, sigmoid and SiLU work on U vectors at once, each step applied to all U before the next: exp's
// ~20-operation dependency chain then runs U-wide in the scheduler's window (one vector at a time,
// the chains of consecutive vectors barely overlapped: ~10% off the GroupNorm+SiLU loops on Zen 4).
// An element's arithmetic does not depend on U, so neither do its bits. DDPM_EACH(u) is the unrolled loop
// over the U vectors (U a constant in scope), for callers that work U vectors at a time too.
#define DDPM_EACH(u) _Pragma("GCC unroll 8") for (int u = 0; u < U; ++u)
template <int W, bool kFused, int U>
DDPM_SIMD_INLINE void exp_n(Lanes<W> (&x)[U]) {
  Lanes<W> t[U], k[U], r[U], p[U];
  DDPM_EACH(u) x[u] = vmax<W>(splat<W>(-87.0f), vmin<W>(splat<W>(87.0f), x[u]));
  DDPM_EACH(u) t[u] = fma<W, kFused>(x[u], splat<W>(1.44269504088896341f), splat<W>(12582912.0f));
  DDPM_EACH(u) k[u] = t[u] - 12582912.0f;
  DDPM_EACH(u) r[u] = fma<W, kFused>(k[u], splat<W>(-0.693359375f), x[u]);
  DDPM_EACH(u) r[u] = fma<W, kFused>(k[u], splat<W>(2.12194440e-4f), r[u]);
  DDPM_EACH(u) p[u] = fma<W, kFused>(splat<W>(kExpP[0]), r[u], splat<W>(kExpP[1]));
  DDPM_EACH(u) p[u] = fma<W, kFused>(p[u], r[u], splat<W>(kExpP[2]));
  DDPM_EACH(u) p[u] = fma<W, kFused>(p[u], r[u], splat<W>(kExpP[3]));
  DDPM_EACH(u) p[u] = fma<W, kFused>(p[u], r[u], splat<W>(kExpP[4]));
  DDPM_EACH(u) p[u] = fma<W, kFused>(p[u] * r[u], r[u], r[u]) + 1.0f;
  DDPM_EACH(u) x[u] = p[u] * from_bits<W>((to_bits<W>(t[u]) + (127u - 0x4B400000u)) << 23);
}

// z[u] = SiLU(z[u]) = z / (1 + e^-z): one rounding fewer than z sigmoid(z), and one multiply.
template <int W, bool kFused, int U>
DDPM_SIMD_INLINE void silu_n(Lanes<W> (&z)[U]) {
  Lanes<W> e[U];
  DDPM_EACH(u) e[u] = -z[u];
  exp_n<W, kFused, U>(e);
  DDPM_EACH(u) z[u] = z[u] / (1.0f + e[u]);
}

// s[u] = sigmoid(z[u]) = 1 / (1 + e^-z).
template <int W, bool kFused, int U>
DDPM_SIMD_INLINE void sigmoid_n(const Lanes<W> (&z)[U], Lanes<W> (&s)[U]) {
  DDPM_EACH(u) s[u] = -z[u];
  exp_n<W, kFused, U>(s);
  DDPM_EACH(u) s[u] = 1.0f / (1.0f + s[u]);
}

// One vector: the U = 1 forms.
template <int W, bool kFused>
DDPM_SIMD_INLINE Lanes<W> exp(Lanes<W> x) {
  Lanes<W> v[1] = {x};
  exp_n<W, kFused, 1>(v);
  return v[0];
}

template <int W, bool kFused>
DDPM_SIMD_INLINE Lanes<W> sigmoid(Lanes<W> z) {
  const Lanes<W> v[1] = {z};
  Lanes<W> s[1];
  sigmoid_n<W, kFused, 1>(v, s);
  return s[0];
}

template <int W, bool kFused>
DDPM_SIMD_INLINE Lanes<W> silu(Lanes<W> z) {
  Lanes<W> v[1] = {z};
  silu_n<W, kFused, 1>(v);
  return v[0];
}

// The last elements i .. n - 1 (fewer than 2 V): at most one vector of V lanes, of V / 2, ... of 4,
// then body(Width<1>, i) one at a time.
template <int V, typename Body>
DDPM_SIMD_INLINE void for_tail(int64_t n, int64_t i, const Body& body) {
  if constexpr (V >= 4) {
    if (i + V <= n) {
      body(Width<V>{}, i);
      i += V;
    }
    for_tail<V / 2>(n, i, body);
  } else {
    for (; i < n; ++i) body(Width<1>{}, i);
  }
}

// body(Width<W>, i) for i = 0, W, 2W, ... then the last n % W elements in narrower vectors (W / 2,
// ..., 4 lanes) and one at a time: a row's tail of up to 15 elements takes at most 3 scalar steps
// (each a whole exp in the SiLU loops) rather than 15. An element's arithmetic does not depend on
// the width (above), so neither do its bits.
template <int W, typename Body>
DDPM_SIMD_INLINE void for_lanes(int64_t n, const Body& body) {
  int64_t i = 0;
  for (; i + W <= n; i += W) body(Width<W>{}, i);
  for_tail<W / 2>(n, i, body);
}

// Partial sums per reduction: 32 lanes, so that two sums at once fit AVX2's 16 registers
// (2 x 4 vectors; 64 lanes spilled there) and AVX-512 keeps 2 vectors per sum.
constexpr int64_t kSumLanes = 32;

// Lanes l + H .. of v in lanes l .. (the upper H lanes are v's own: unused).
template <int W, int H>
DDPM_SIMD_INLINE Lanes<W> shift_down(Lanes<W> v) {
  IntLanes<W> mask;
  for (int l = 0; l < W; ++l) mask[l] = static_cast<uint32_t>((l + H) % W);
  return __builtin_shuffle(v, mask);
}

// The float partials of a sum, lane L (= u W + l: lane l of vector u) holding the elements L mod 32.
template <int W>
struct Partials {
  static_assert(W > 1 && kSumLanes % W == 0, "W must divide kSumLanes");
  static constexpr int kVecs = kSumLanes / W;
  Lanes<W> v[kVecs];

  DDPM_SIMD_INLINE Partials() {
    for (int u = 0; u < kVecs; ++u) v[u] = splat<W>(0.0f);
  }

  // The elements of a block of 32 (or fewer, zero-padded: adding 0 leaves a lane as it was).
  DDPM_SIMD_INLINE void add(int u, Lanes<W> x) { v[u] += x; }
  DDPM_SIMD_INLINE void add_padded(const float* block) {
    for (int u = 0; u < kVecs; ++u) v[u] += load<W>(block + u * W);
  }

  // The total by a fixed pairwise tree over the 32 lanes (lane L + lane L + 16, then + 8, ... + 1),
  // whole vectors first, then within one: the same additions, in the same order, for every W.
  DDPM_SIMD_INLINE float reduce() {
    for (int n = kVecs / 2; n >= 1; n /= 2) {
      for (int u = 0; u < n; ++u) v[u] += v[u + n];
    }
    Lanes<W> r = v[0];
    if constexpr (W >= 16) r += shift_down<W, 8>(r);
    if constexpr (W >= 8) r += shift_down<W, 4>(r);
    r += shift_down<W, 2>(r);
    r += shift_down<W, 1>(r);
    return r[0];
  }
};

// Sum over i < n of value(Width<w>, i), the values of elements i .. i + w - 1 (value may also
// store them), in Partials<W>, added in double every `chunk` elements (a multiple of 32) to bound
// the rounding of long float sums. The last n % 32 elements go into a zero-padded block, whole
// vectors first (value(Width<W>, i)), then narrower ones and single elements (for_lanes): the
// same values.
template <int W, typename Value>
DDPM_SIMD_INLINE double sum32(int64_t n, int64_t chunk, const Value& value) {
  double total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t end = i0 + chunk < n ? i0 + chunk : n;
    const int64_t full = i0 + ((end - i0) & ~(kSumLanes - 1));
    Partials<W> acc;
    for (int64_t i = i0; i < full; i += kSumLanes) {
      for (int u = 0; u < acc.kVecs; ++u) acc.add(u, value(Width<W>{}, i + u * W));
    }
    if (full < end) {  // whole vectors, narrower ones, then single elements, into the padded block
      alignas(64) float tail[kSumLanes] = {};
      for_lanes<W>(end - full, [&](auto w, int64_t j) __attribute__((always_inline)) {
        store<decltype(w)::value>(tail + j, value(w, full + j));
      });
      acc.add_padded(tail);
    }
    total += acc.reduce();
  }
  return total;
}

// Two sums in one pass: values(Width<V>{}, i, a, b) fills the arrays a[U], b[U] of Lanes<V> with
// both addends of the U V elements from i: U = B * 32 / W vectors (B blocks of 32) at once, so that
// values can interleave their work (silu_n); the last n % 32 elements come into zero-padded blocks,
// a vector (U = 1) at a time, narrower ones, then elements (V = U = 1: for_lanes). The additions
// into the partials are in element order whatever B is.
template <int W, int B, typename Values>
DDPM_SIMD_INLINE void sum32x2(int64_t n, int64_t chunk, const Values& values, double* total_a, double* total_b) {
  constexpr int K = Partials<W>::kVecs;
  double ta = 0, tb = 0;
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t end = i0 + chunk < n ? i0 + chunk : n;
    const int64_t full = i0 + ((end - i0) & ~(kSumLanes - 1));
    Partials<W> acc_a, acc_b;
    auto blocks = [&](int64_t i, auto count) __attribute__((always_inline)) {
      constexpr int U = decltype(count)::value * K;
      Lanes<W> a[U], b[U];
      values(Width<W>{}, i, a, b);
      for (int u = 0; u < U; ++u) acc_a.add(u % K, a[u]), acc_b.add(u % K, b[u]);
    };
    int64_t i = i0;
    for (; i + B * kSumLanes <= full; i += B * kSumLanes) blocks(i, std::integral_constant<int, B>{});
    for (; i < full; i += kSumLanes) blocks(i, std::integral_constant<int, 1>{});
    if (full < end) {  // whole vectors, narrower ones, then single elements, into the padded blocks
      alignas(64) float tail_a[kSumLanes] = {}, tail_b[kSumLanes] = {};
      for_lanes<W>(end - full, [&](auto w, int64_t j) __attribute__((always_inline)) {
        constexpr int V = decltype(w)::value;
        Lanes<V> a[1], b[1];
        values(w, full + j, a, b);
        store<V>(tail_a + j, a[0]), store<V>(tail_b + j, b[0]);
      });
      acc_a.add_padded(tail_a);
      acc_b.add_padded(tail_b);
    }
    ta += acc_a.reduce();
    tb += acc_b.reduce();
  }
  *total_a = ta, *total_b = tb;
}

}  // namespace ddpm_fast::simd
