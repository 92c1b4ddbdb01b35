// Built when vae_fast has no CUDA kernels: a CUDA tensor gets a clear error (glue/checks.cpp: check_args checks first).
#include <c10/util/Exception.h>

#include "glue/cuda_launch.h"

namespace vae_fast {
bool cuda_available() { return false; }
std::string cuda_build_info() { return "not built"; }
int64_t suggest_n_blocks_cuda(OpKind, const RowArgs&, int64_t, const at::Device&) { return 1; }
void launch_rows_cuda(OpKind, const RowArgs&, const at::Device&) { TORCH_CHECK(false, "vae_fast was built without CUDA"); }
void sample_forward_cuda(const SampleArgs&, const at::Device&) { TORCH_CHECK(false, "vae_fast was built without CUDA"); }
void sample_backward_cuda(const SampleArgs&, const at::Device&) { TORCH_CHECK(false, "vae_fast was built without CUDA"); }
void dmol_forward_cuda(const DmolArgs&, const at::Device&) { TORCH_CHECK(false, "vae_fast was built without CUDA"); }
void dmol_backward_cuda(const DmolArgs&, const at::Device&) { TORCH_CHECK(false, "vae_fast was built without CUDA"); }
void dmol_sample_cuda(const DmolArgs&, const at::Device&) { TORCH_CHECK(false, "vae_fast was built without CUDA"); }
}  // namespace vae_fast
