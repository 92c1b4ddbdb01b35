// Declarations shared by the glue files (ops.cpp, ops_cuda.cpp / ops_nocuda.cpp, module.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/launch_args.h"
#include "core/op_table.h"

namespace vae_fast {

struct NamedTensor {
  at::Tensor tensor;
  const char* name;
};

// Inline storage for the glue's small lists: a small call makes no heap allocation of its own.
using Dims = c10::SmallVector<int64_t, kMaxDims>;                  // a shape, or strides over one
using DimsList = c10::SmallVector<Dims, 2 * kMaxOperands + 1>;     // strides per operand
using NamedTensors = c10::SmallVector<NamedTensor, kMaxOperands + 1>;
using Flags = c10::SmallVector<bool, kMaxOperands>;

DType to_dtype(at::ScalarType st);
std::string shape_str(at::IntArrayRef shape);  // "(2, 3)", "(4,)": shapes in messages
// Floating dtypes, no float64 mix, one device (CUDA only when built with it); returns the accumulation type.
at::ScalarType check_args(c10::ArrayRef<NamedTensor> args);
Dims broadcast_shape(c10::ArrayRef<NamedTensor> args);

// One row op's problem: the arguments broadcast to `shape`, the trailing `event_dims` summed.
struct RowProblem {
  RowProblem(c10::ArrayRef<NamedTensor> inputs, int64_t event_dims, bool grad_is_first);
  at::Tensor forward(OpKind op);
  // One gradient per original argument. With concat_dim, the gradients of originals[concat_first] and
  // originals[concat_first + 1] come back as one contiguous tensor, their concatenation along concat_dim, in
  // slot concat_first (slot concat_first + 1 empty): the kernels write both halves of it in place.
  std::vector<at::Tensor> backward(OpKind op, c10::ArrayRef<bool> needs, c10::ArrayRef<at::Tensor> originals,
                                   std::optional<int64_t> concat_dim = std::nullopt, size_t concat_first = 0);

  NamedTensors in;  // unexpanded, read in place through their strides
  c10::SmallVector<Clamp, kMaxOperands + 1> clamps;  // per input (layout.h): set by the op before forward / backward
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

// An optional tensor or clamp argument as the schemas take it.
using OptClamp = std::optional<c10::ArrayRef<double>>;
inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// A logvar clamp argument (`float[]?`: none, or [lo, hi] with lo <= hi) as layout.h's Clamp; `name` names it in errors.
Clamp parse_clamp(const std::optional<c10::ArrayRef<double>>& clamp, const char* name);
// The buffer that holds the gradients of `a` and of `b` (same shape) concatenated along `dim` (contiguous).
at::Tensor concat_buffer(const at::Tensor& a, const at::Tensor& b, int64_t dim);

// A table op's arguments as its schema has them (op_table.h), derived once from the schema.
struct OpInfo {
  const OpSpec* spec = nullptr;
  int n_tensors = 0;
  bool optional[kMaxOperands] = {};
  c10::SmallVector<std::string, kMaxOperands> tensor_names;
  c10::SmallVector<std::string, 2> param_names, clamp_names;
  c10::SmallVector<bool, 2> param_is_float;
  size_t n_fwd_args = 0, n_bwd_args = 0;  // the forward's and the backward's schema arguments
};
const OpInfo& op_info(int index);
int op_index(std::string_view name);  // -1: not a table op
std::string schema_text(const OpSpec& spec, bool backward);

// The checks an op's eager call makes, without running it (for torch.compile's fake kernels): `args`
// in the order of the op's schema.
void check_op(const std::string& op, const std::vector<c10::IValue>& args);

// Data outside an op's support (Bernoulli targets outside [0, 1], the mixture of logistics' x off its
// grid in [-1, 1]) give NaN in the kernels' forward formula (elbo_math.h): free, and the same under
// torch.compile and CUDA graphs. On the CPU the glue then scans the output for a NaN (no pass over the
// data) and, if one is there, checks the data and raises a ValueError saying what is wrong and how to
// convert it; a NaN that came from a NaN parameter stays, as torch's ops give it. On CUDA the NaN
// stays (a check there would be a host sync per call).
bool any_nan(const at::Tensor& out);  // a contiguous float32 / float64 output
// x's values out of [low, high] or not finite, said as "`x` ... got values in [min, max] (N of M ...)".
std::string data_range_report(const at::Tensor& x, double low, double high);

// The key of a sampling call given none: seed_value on the CPU, a device `seed` tensor elsewhere (ops.cpp).
void draw_seed(const at::Device& device, at::Tensor& seed, std::optional<int64_t>& seed_value);
// Draws the key (draw_seed) when a sampling call was given none, on real tensors only (ops.cpp says when).
void draw_seed_if_none(const at::Tensor& like, at::Tensor& seed, std::optional<int64_t>& seed_value);

// CUDA side (ops_cuda.cpp when built with CUDA, else ops_nocuda.cpp, whose versions raise).
bool cuda_available();
std::string cuda_build_info();
// Row blocks for accumulated gradients on the GPU (a function of the shapes and the device only).
int64_t suggest_n_blocks_cuda(OpKind op, const RowArgs& args, int64_t slice_numel, const at::Device& device);
void launch_rows_cuda(OpKind op, const RowArgs& args, const at::Device& device);
void sample_forward_cuda(const SampleArgs& args, const at::Device& device);
void sample_backward_cuda(const SampleArgs& args, const at::Device& device);

}  // namespace vae_fast
