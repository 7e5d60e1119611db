#include "cpu_isa.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace ddpm_fast {
namespace {

CpuIsa detect() {
#if DDPM_HAVE_ISA_TARGETS
  // libgcc's model also checks that the OS saves the wider registers (XGETBV).
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBase;
}

// The cap from DDPM_FAST_CPU_ISA (an unknown value is reported once and ignored).
CpuIsa env_cap() {
  const char* value = std::getenv("DDPM_FAST_CPU_ISA");
  CpuIsa cap = CpuIsa::kAvx512;
  if (value && *value && !parse_cpu_isa(value, &cap)) {
    std::fprintf(stderr, "ddpm_fast: ignoring DDPM_FAST_CPU_ISA=%s (expected avx512, avx2 or base)\n", value);
    cap = CpuIsa::kAvx512;
  }
  return cap;
}

std::atomic<int>& cap_slot() {
  static std::atomic<int> cap{static_cast<int>(env_cap())};
  return cap;
}

}  // namespace

CpuIsa cpu_isa_detected() {
  static const CpuIsa detected = detect();
  return detected;
}

CpuIsa cpu_isa() { return std::min(cpu_isa_detected(), cpu_isa_cap()); }

CpuIsa cpu_isa_cap() { return static_cast<CpuIsa>(cap_slot().load(std::memory_order_relaxed)); }

void set_cpu_isa_cap(CpuIsa cap) { cap_slot().store(static_cast<int>(cap), std::memory_order_relaxed); }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "base";
  }
}

bool parse_cpu_isa(const std::string& name, CpuIsa* out) {
  for (CpuIsa isa : {CpuIsa::kBase, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (name == cpu_isa_name(isa)) {
      *out = isa;
      return true;
    }
  }
  return false;
}

}  // namespace ddpm_fast
