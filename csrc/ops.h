// Declarations shared by the glue files (ops.cpp, ops_cuda.cpp / ops_nocuda.cpp, module.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "layout.h"

namespace vae_fast {

struct NamedTensor {
  at::Tensor tensor;
  const char* name;
};

DType to_dtype(at::ScalarType st);
// Floating dtypes, no float64 mix, one device (CUDA only when built with it); returns the accumulation type.
at::ScalarType check_args(const std::vector<NamedTensor>& args);
std::vector<int64_t> broadcast_shape(const std::vector<NamedTensor>& args);

// One row op's problem: the arguments broadcast to `shape`, the trailing `event_dims` summed.
struct RowProblem {
  RowProblem(const std::vector<NamedTensor>& inputs, int64_t event_dims, bool grad_is_first);
  at::Tensor forward(OpKind op) const;
  std::vector<at::Tensor> backward(OpKind op, const std::vector<bool>& needs,
                                   const std::vector<at::Tensor>& originals) const;

  std::vector<NamedTensor> in;  // unexpanded, contiguous in their own shapes
  std::vector<int64_t> shape, out_shape;
  int64_t event_dims = 1, split = 0, numel = 1, event_numel = 1;
  bool elementwise = false;
  at::ScalarType acc_dtype = at::kFloat;

 private:
  std::vector<int64_t> out_strides(at::IntArrayRef own) const;
  RowArgs make_args(const std::vector<std::vector<int64_t>>& in_strides,
                    const std::vector<std::vector<int64_t>>& out_strides, int64_t n_blocks) const;
  void launch(OpKind op, const RowArgs& args, const at::Device& device) const;
};

// CUDA side (ops_cuda.cpp when built with CUDA, else ops_nocuda.cpp, whose versions raise).
bool cuda_available();
std::string cuda_build_info();
// Row blocks for accumulated gradients on the GPU (a function of the shapes and the device only).
int64_t suggest_n_blocks_cuda(int64_t rows, int64_t event_numel, int64_t slice_numel);
void launch_rows_cuda(OpKind op, const RowArgs& args, const at::Device& device);
void sample_forward_cuda(const SampleArgs& args, const at::Device& device);
void sample_backward_cuda(const SampleArgs& args, const at::Device& device);

}  // namespace vae_fast
