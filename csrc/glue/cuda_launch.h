// The CUDA launch wrappers (cuda_launch.cpp when built with CUDA, else cuda_launch_stub.cpp, whose
// versions raise): device guard, current stream, the launch of cuda/kernels.h's framework-free entry
// points, and every CUDA error turned into a Python exception.
#pragma once
#include <c10/core/Device.h>

#include <cstdint>
#include <string>

#include "core/launch_args.h"
#include "core/op_table.h"

namespace vae_fast {

bool cuda_available();
std::string cuda_build_info();
// Row blocks for accumulated gradients on the GPU (a function of the shapes and the device only).
int64_t suggest_n_blocks_cuda(OpKind op, const RowArgs& args, int64_t slice_numel, const at::Device& device);
void launch_rows_cuda(OpKind op, const RowArgs& args, const at::Device& device);
void sample_forward_cuda(const SampleArgs& args, const at::Device& device);
void sample_backward_cuda(const SampleArgs& args, const at::Device& device);
void dmol_forward_cuda(const DmolArgs& args, const at::Device& device);
void dmol_backward_cuda(const DmolArgs& args, const at::Device& device);
void dmol_sample_cuda(const DmolArgs& args, const at::Device& device);

}  // namespace vae_fast
