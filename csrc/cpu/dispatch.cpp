// Run-time choice among the per-ISA builds of rows.cpp, sample.cpp and dmol.cpp (as ATen's DispatchStub does).
#include "cpu/kernels.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

VF_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef VAE_FAST_HAVE_AVX2
VF_DECLARE_CPU_KERNELS(AVX2)
#endif
#ifdef VAE_FAST_HAVE_AVX512
VF_DECLARE_CPU_KERNELS(AVX512)
#endif

namespace vae_fast {
namespace cpu {
namespace {

#define VF_KERNELS(ISA, NAME)                                                                              \
  Kernels{NAME, &ISA::cpu::run_rows, &ISA::cpu::sample_forward, &ISA::cpu::sample_backward, &ISA::cpu::dmol_forward, \
          &ISA::cpu::dmol_backward, &ISA::cpu::dmol_sample}

int rank(const std::string& name) {
  if (name == "baseline") return 0;
  if (name == "avx2") return 1;
  if (name == "avx512") return 2;
  throw std::invalid_argument("VAE_FAST_CPU_ISA must be baseline, avx2 or avx512, got '" + name + "'");
}

int hardware_best() {
  int best = 0;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = 2;
#endif
  return best;
}

}  // namespace

// Read on every call (a getenv is ~100 ns), so a test can switch variants within one process.
Kernels kernels() {
  static const int hardware = hardware_best();
  int best = hardware;
  if (const char* forced = std::getenv("VAE_FAST_CPU_ISA")) {
    if (*forced) best = std::min(best, rank(forced));  // only ever lower: a higher one would crash
  }
#ifdef VAE_FAST_HAVE_AVX512
  if (best >= 2) return VF_KERNELS(AVX512, "avx512");
#endif
#ifdef VAE_FAST_HAVE_AVX2
  if (best >= 1) return VF_KERNELS(AVX2, "avx2");
#endif
  return VF_KERNELS(DEFAULT, "baseline");
}

const char* built_isas() {
  return "baseline"
#ifdef VAE_FAST_HAVE_AVX2
         ",avx2"
#endif
#ifdef VAE_FAST_HAVE_AVX512
         ",avx512"
#endif
      ;
}

}  // namespace cpu
}  // namespace vae_fast
