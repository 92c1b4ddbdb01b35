// The CUDA side of the glue (built only with a CUDA build of torch): device guard, current stream,
// launch, and every CUDA error turned into a Python exception. The kernels are in cuda/*.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <string>

#include "cuda/kernels.h"
#include "glue/cuda_launch.h"

namespace vae_fast {
namespace {
void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "vae_fast: CUDA ", what, " failed: ", cudaGetErrorString(err));
}
}  // namespace

bool cuda_available() { return true; }

std::string cuda_build_info() {
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  return "CUDA runtime " + std::to_string(runtime / 1000) + "." + std::to_string((runtime % 1000) / 10);
}

int64_t suggest_n_blocks_cuda(OpKind op, const RowArgs& args, int64_t slice_numel, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);  // the SM count of the tensors' device, not the current one
  return cuda::suggest_n_blocks(c10::cuda::current_device(), op, args, slice_numel);
}

void launch_rows_cuda(OpKind op, const RowArgs& args, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  check(cuda::launch_rows(op, args, c10::cuda::getCurrentCUDAStream(device.index()).stream()), "row kernel");
}

void sample_forward_cuda(const SampleArgs& args, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  check(cuda::launch_sample_forward(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
        "sampling kernel");
}

void sample_backward_cuda(const SampleArgs& args, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  check(cuda::launch_sample_backward(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
        "sampling backward kernel");
}

void dmol_forward_cuda(const DmolArgs& args, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  check(cuda::launch_dmol_forward(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()), "DMOL kernel");
}

void dmol_backward_cuda(const DmolArgs& args, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  check(cuda::launch_dmol_backward(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
        "DMOL backward kernel");
}

void dmol_sample_cuda(const DmolArgs& args, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  check(cuda::launch_dmol_sample(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
        "DMOL sampling kernel");
}

}  // namespace vae_fast
