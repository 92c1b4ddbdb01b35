// The CPU kernels' entry points, one set per ISA variant (each per-ISA build of rows.cpp, sample.cpp and dmol.cpp defines one).
#pragma once
#include "core/launch_args.h"
#include "core/op_table.h"

#define VF_DECLARE_CPU_KERNELS(ISA)                                   \
  namespace vae_fast {                                                \
  namespace ISA {                                                     \
  namespace cpu {                                                     \
  void run_rows(OpKind op, const RowArgs& args);                      \
  void sample_forward(const SampleArgs& args);                        \
  void sample_backward(const SampleArgs& args);                       \
  void dmol_forward(const DmolArgs& args);                            \
  void dmol_backward(const DmolArgs& args);                           \
  void dmol_sample(const DmolArgs& args);                             \
  }                                                                   \
  }                                                                   \
  }

namespace vae_fast {
namespace cpu {
// The variant chosen at run time: the best the CPU supports, or lower if VAE_FAST_CPU_ISA says so.
struct Kernels {
  const char* isa;
  void (*run_rows)(OpKind, const RowArgs&);
  void (*sample_forward)(const SampleArgs&);
  void (*sample_backward)(const SampleArgs&);
  // The discretized mixture of logistics (cpu/dmol.cpp): forward, backward, sampler.
  void (*dmol_forward)(const DmolArgs&);
  void (*dmol_backward)(const DmolArgs&);
  void (*dmol_sample)(const DmolArgs&);
};
Kernels kernels();
const char* built_isas();  // e.g. "baseline,avx2,avx512"
}  // namespace cpu
}  // namespace vae_fast
