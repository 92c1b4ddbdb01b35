// The op table's ops (core/op_table.h): each op's arguments as its schema has them, the schema text,
// and check_op (the checks of an eager call, for torch.compile's fake kernels). The boxed CPU / CUDA
// kernel is table_ops.cpp's TableKernel, the Autograd one autograd.cpp's TableAutograd.
#pragma once
#include <ATen/core/ivalue.h>
#include <c10/util/SmallVector.h>

#include <string>
#include <string_view>
#include <vector>

#include "core/launch_args.h"
#include "core/op_table.h"

namespace vae_fast {

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
// in the order of the op's schema. Any op of the library: the table's, sample_gaussian, sample_dmol.
void check_op(const std::string& op, const std::vector<c10::IValue>& args);

}  // namespace vae_fast
