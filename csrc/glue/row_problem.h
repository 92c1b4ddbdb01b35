// One row op's problem (core/op_table.h's Family::Rows): the arguments checked and broadcast, the
// shape split into row and event dims, each operand's strides (broadcast arguments read in place with
// stride 0, never expanded), the launch description (core/launch_args.h's RowArgs) and the launch on
// the CPU or CUDA. Backward: full-size gradients written in place, broadcast ones summed into row-block
// partial slices added in slice order (deterministic, no atomics).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>

#include <optional>
#include <vector>

#include "core/launch_args.h"
#include "core/op_table.h"
#include "glue/checks.h"

namespace vae_fast {

// The arguments broadcast to `shape`, the trailing `event_dims` summed.
struct RowProblem {
  RowProblem(c10::ArrayRef<NamedTensor> inputs, int64_t event_dims, bool grad_is_first);
  at::Tensor forward(OpKind op);
  // One gradient per original argument. With concat_dim, the gradients of originals[concat_first] and
  // originals[concat_first + 1] come back as one contiguous tensor, their concatenation along concat_dim, in
  // slot concat_first (slot concat_first + 1 empty): the kernels write both halves of it in place.
  std::vector<at::Tensor> backward(OpKind op, c10::ArrayRef<bool> needs, c10::ArrayRef<at::Tensor> originals,
                                   std::optional<int64_t> concat_dim = std::nullopt, size_t concat_first = 0);

  NamedTensors in;  // unexpanded, read in place through their strides
  c10::SmallVector<Clamp, kMaxOperands + 1> clamps;  // per input (launch_args.h): set by the op before forward / backward
  Dims shape, out_shape;
  int64_t event_dims = 1, split = 0, numel = 1, event_numel = 1;
  bool elementwise = false;
  at::ScalarType acc_dtype = at::kFloat;

 private:
  Dims out_strides(const at::Tensor& t) const;
  DimsList input_strides(bool first_is_grad) const;
  bool make_args(const DimsList& in_strides, const DimsList& out_strides, int64_t n_blocks, RowArgs& args) const;
  RowArgs layout(const DimsList& out_strides, int64_t n_blocks, bool first_is_grad);
  void bind_inputs(RowArgs& args) const;
  void launch(OpKind op, const RowArgs& args, const at::Device& device) const;
};

}  // namespace vae_fast
