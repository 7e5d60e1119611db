// Which x86 vector ISA the CPU kernels run. Every kernel with ISA-specific builds is compiled for
// baseline x86-64 and, as extra functions with a target attribute, for AVX2+FMA and AVX-512
// (never -march=native: one binary runs on any x86-64 CPU). cpu_isa() picks the best the CPU
// has, capped by the DDPM_FAST_CPU_ISA environment variable (avx512 | avx2 | base, read once)
// or by set_cpu_isa_cap (tests run every path the machine supports).
#pragma once
#include <string>

namespace ddpm_fast {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa cpu_isa();           // the one the kernels run: min(detected, cap)
CpuIsa cpu_isa_detected();  // the best this CPU (and OS) supports
CpuIsa cpu_isa_cap();
void set_cpu_isa_cap(CpuIsa cap);

const char* cpu_isa_name(CpuIsa isa);
bool parse_cpu_isa(const std::string& name, CpuIsa* out);  // false for an unknown name

#if defined(__x86_64__) && defined(__GNUC__)
#define DDPM_HAVE_ISA_TARGETS 1
#define DDPM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DDPM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#else
#define DDPM_HAVE_ISA_TARGETS 0
#define DDPM_TARGET_AVX2
#define DDPM_TARGET_AVX512
#endif

// The build of a function for the active ISA.
template <typename Fn>
Fn pick_isa(Fn avx512, Fn avx2, Fn base) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return avx512;
    case CpuIsa::kAvx2: return avx2;
    default: return base;
  }
}

}  // namespace ddpm_fast

// NAME(PARAMS) runs NAME##_body(ARGS), an always-inline function, built three times (AVX-512,
// AVX2+FMA, baseline) and chosen per call by cpu_isa(). Where the compiler contracts a * b + c
// into an FMA (not in files built with -ffp-contract=off), the baseline build's results differ
// from the others' in the last bits.
#define DDPM_ISA_VARIANTS(NAME, PARAMS, ARGS)                                       \
  DDPM_TARGET_AVX512 __attribute__((noinline)) void NAME##_avx512 PARAMS { NAME##_body ARGS; } \
  DDPM_TARGET_AVX2 __attribute__((noinline)) void NAME##_avx2 PARAMS { NAME##_body ARGS; }     \
  __attribute__((noinline)) void NAME##_base PARAMS { NAME##_body ARGS; }                      \
  void NAME PARAMS { ::ddpm_fast::pick_isa(NAME##_avx512, NAME##_avx2, NAME##_base) ARGS; }
