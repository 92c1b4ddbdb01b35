// The argument checks every op runs before a kernel (each names the argument and what was expected),
// the glue's small shared types, and the data-off-support report (docs/architecture.md: numerics).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>

#include <optional>
#include <string>

#include "core/launch_args.h"

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
void check_event_dims(int64_t event_dims, int64_t ndim, const char* what);

// An optional tensor or clamp argument as the schemas take it.
using OptClamp = std::optional<c10::ArrayRef<double>>;
inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// A logvar clamp argument (`float[]?`: none, or [lo, hi] with lo <= hi) as launch_args.h's Clamp; `name`
// names it in errors.
Clamp parse_clamp(const std::optional<c10::ArrayRef<double>>& clamp, const char* name);
// The clamp's bounds rounded to the dtype of the input they apply to (torch.clamp's comparison).
Clamp in_dtype(Clamp c, at::ScalarType t);
// The buffer that holds the gradients of `a` and of `b` (same shape) concatenated along `dim` (contiguous).
at::Tensor concat_buffer(const at::Tensor& a, const at::Tensor& b, int64_t dim);

// Data outside an op's support (Bernoulli targets outside [0, 1], the mixture of logistics' x off its
// grid in [-1, 1]) give NaN in the kernels' forward formula (core/elbo_math.h, core/dmol_math.h): free,
// and the same under torch.compile and CUDA graphs. On the CPU the glue then scans the output for a NaN
// (no pass over the data) and, if one is there, checks the data and raises a ValueError saying what is
// wrong and how to convert it; a NaN that came from a NaN parameter stays, as torch's ops give it. On
// CUDA the NaN stays (a check there would be a host sync per call).
bool any_nan(const at::Tensor& out);  // a contiguous float32 / float64 output
// x's values out of [low, high] or not finite, said as "`x` ... got values in [min, max] (N of M ...)".
std::string data_range_report(const at::Tensor& x, double low, double high);

}  // namespace vae_fast
