// The table's ops (core/op_table.h): their arguments read off the schemas, and one boxed kernel that
// reads any of them off the dispatcher's stack, checks its arguments and runs its family's kernels
// (CPU and CUDA: the glue branches on the device after the checks); check_op. Their schemas are
// schemas.cpp's, their autograd autograd.cpp's, the fake kernels and double backward vae_fast/ops.py's
// (docs/architecture.md: one op's path).
#include "glue/table_ops.h"

#include <ATen/ATen.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "glue/checks.h"
#include "glue/dmol_ops.h"
#include "glue/row_problem.h"
#include "glue/sample_ops.h"

namespace vae_fast {

std::string schema_text(const OpSpec& s, bool backward) {
  std::string t = std::string(s.name) + (backward ? "_backward(Tensor grad, " : "(") + s.tensors;
  if (*s.params) t += std::string(", ") + s.params;
  t += ", int event_dims";
  if (backward) t += ", bool[] needs";
  if (*s.clamps) t += std::string(", ") + s.clamps;
  if (backward && s.pair >= 0) t += ", int? concat_dim=None";
  return t + (backward ? ") -> Tensor[]" : ") -> Tensor");
}

const OpInfo& op_info(int index) {
  static const std::vector<OpInfo> infos = [] {
    std::vector<OpInfo> all(kNumOps);
    for (int i = 0; i < kNumOps; ++i) {
      OpInfo& info = all[i];
      info.spec = &kOps[i];
      const c10::FunctionSchema schema = torch::schema(schema_text(kOps[i], false).c_str());
      for (const auto& a : schema.arguments()) {
        const auto& type = a.type();
        const bool is_tensor = type->kind() == c10::TypeKind::TensorType ||
                               (type->kind() == c10::TypeKind::OptionalType &&
                                type->containedType(0)->kind() == c10::TypeKind::TensorType);
        if (is_tensor) {
          info.optional[info.tensor_names.size()] = type->kind() == c10::TypeKind::OptionalType;
          info.tensor_names.push_back(a.name());
        } else if (a.name() == "event_dims") {
          continue;
        } else if (type->kind() == c10::TypeKind::OptionalType) {  // float[]? <clamp>
          info.clamp_names.push_back(a.name());
        } else {
          info.param_names.push_back(a.name());
          info.param_is_float.push_back(type->kind() == c10::TypeKind::FloatType);
        }
      }
      info.n_tensors = static_cast<int>(info.tensor_names.size());
      info.n_fwd_args = schema.arguments().size();
      info.n_bwd_args = info.n_fwd_args + 2 + (kOps[i].pair >= 0);  // grad, needs, concat_dim
    }
    return all;
  }();
  return infos[index];
}

int op_index(std::string_view name) {
  for (int i = 0; i < kNumOps; ++i)
    if (name == kOps[i].name) return i;
  return -1;
}

namespace {

// One call of a table op, read off the stack (its arguments the last n of it), checked.
struct OpCall {
  const OpInfo* info;
  at::Tensor grad;                           // backward only
  std::array<at::Tensor, kMaxOperands> tensors;  // in schema order, undefined where not given
  bool all_given = true;
  c10::SmallVector<c10::IValue, 2> params;
  int64_t event_dims = 0;
  Flags needs;                               // backward only
  std::array<Clamp, 2> clamps;
  std::optional<int64_t> concat_dim;         // backward only

  OpCall(const OpInfo& op, c10::ArrayRef<c10::IValue> args, bool backward) : info(&op) {
    const OpSpec& s = *op.spec;
    size_t i = 0;
    if (backward) grad = args[i++].toTensor();
    int optional_given = 0, optional_count = 0;
    for (int t = 0; t < op.n_tensors; ++t, ++i) {
      if (!args[i].isNone()) tensors[t] = args[i].toTensor();
      optional_count += op.optional[t];
      optional_given += op.optional[t] && tensors[t].defined();
    }
    if (optional_given != 0 && optional_given != optional_count) {
      std::string names;
      for (int t = 0; t < op.n_tensors; ++t)
        if (op.optional[t]) names += (names.empty() ? "" : " and ") + op.tensor_names[t];
      TORCH_CHECK_VALUE(false, "vae_fast.", s.api, ": ", names, " must be given together or not at all");
    }
    all_given = optional_given == optional_count;
    for (size_t p = 0; p < op.param_names.size(); ++p) params.push_back(args[i++]);
    event_dims = args[i++].toInt();
    if (backward) {
      for (bool b : args[i++].toBoolList()) needs.push_back(b);
    }
    for (size_t k = 0; k < op.clamp_names.size(); ++k, ++i) {
      if (args[i].isNone()) continue;
      const std::vector<double> bounds = args[i].toDoubleVector();
      const char* name = op.clamp_names[k].c_str();
      clamps[k] = parse_clamp(c10::ArrayRef<double>(bounds), name);
      TORCH_CHECK_VALUE(tensors[s.clamped[k]].defined(), "vae_fast.", s.api, ": ", name, " needs ",
                        op.tensor_names[s.clamped[k]]);
    }
    if (backward && s.pair >= 0 && !args[i].isNone()) concat_dim = args[i].toInt();
  }

  // The given tensors, named; after them, the float parameters as scalar operands of the accumulation
  // type (broadcast: stride 0), unless only checking.
  NamedTensors row_inputs(bool with_grad, bool check_only) const {
    NamedTensors in;
    if (with_grad) in.push_back({grad, "grad"});
    for (int t = 0; t < info->n_tensors; ++t)
      if (tensors[t].defined()) in.push_back({tensors[t], info->tensor_names[t].c_str()});
    bool any_float = false;
    for (bool f : info->param_is_float) any_float |= f;
    if (any_float && !check_only) {
      const auto acc = check_args(in);
      for (size_t p = 0; p < params.size(); ++p)
        if (info->param_is_float[p])
          in.push_back({at::scalar_tensor(params[p].toDouble(), in[0].tensor.options().dtype(acc)),
                        info->param_names[p].c_str()});
    }
    return in;
  }

  void set_clamps(RowProblem& p, size_t offset) const {
    for (size_t k = 0; k < info->clamp_names.size(); ++k)
      if (clamps[k].on) p.clamps[offset + info->spec->clamped[k]] = clamps[k];
  }
};

at::Tensor rows_forward(const OpCall& c) {
  RowProblem p(c.row_inputs(false, false), c.event_dims, false);
  c.set_clamps(p, 0);
  const OpSpec& s = *c.info->spec;
  at::Tensor out = p.forward(c.all_given ? s.fwd : s.fwd_short);
  if (s.fwd == OpKind::BernLpFwd && out.device().is_cpu() && any_nan(out)) {
    const at::Tensor& x = c.tensors[0];
    const std::string bad = data_range_report(x, 0.0, 1.0);
    TORCH_CHECK_VALUE(bad.empty(), "vae_fast.bernoulli_log_prob: `x` must be data in [0, 1] (binary, or the "
                      "probabilities of 1), ", bad, ": 8-bit images are vf.data.from_levels(x, \"unit\") (k / 255), "
                      "binarised ones (x > 0.5).float()");
  }
  return out;
}

std::vector<at::Tensor> rows_backward(OpCall& c) {
  c10::SmallVector<at::Tensor, kMaxOperands> originals;
  for (int t = 0; t < c.info->n_tensors; ++t)
    if (c.tensors[t].defined()) originals.push_back(c.tensors[t]);
  c.needs.resize(originals.size(), false);
  RowProblem p(c.row_inputs(true, false), c.event_dims, true);
  c.set_clamps(p, 1);
  const OpSpec& s = *c.info->spec;
  auto grads = p.backward(c.all_given ? s.bwd : s.bwd_short, c.needs, originals, c.concat_dim,
                          static_cast<size_t>(std::max<int>(s.pair, 0)));
  while (grads.size() < static_cast<size_t>(c.info->n_tensors)) grads.push_back(at::empty({0}, originals[0].options()));
  return grads;
}

// The CPU and CUDA kernel of a table op (the glue branches on the device after the checks).
struct TableKernel final : c10::OperatorKernel {
  TableKernel(int index, bool backward) : index(index), backward(backward) {}
  void operator()(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) {
    const OpInfo& info = op_info(index);
    const size_t n = backward ? info.n_bwd_args : info.n_fwd_args;
    OpCall call(info, torch::jit::last(*stack, n), backward);
    torch::jit::drop(*stack, n);
    switch (info.spec->family) {
      case Family::Rows:
        if (backward) {
          stack->emplace_back(rows_backward(call));
        } else {
          stack->emplace_back(rows_forward(call));
        }
        return;
      case Family::Dmol: {
        const int64_t num_bits = call.params[0].toInt(), layout = call.params[1].toInt();
        if (backward) {
          c10::List<bool> needs;
          for (bool b : call.needs) needs.push_back(b);
          stack->emplace_back(dmol_log_prob_backward(call.grad, call.tensors[0], call.tensors[1], num_bits, layout,
                                                     call.event_dims, std::move(needs)));
        } else {
          stack->emplace_back(dmol_log_prob(call.tensors[0], call.tensors[1], num_bits, layout, call.event_dims));
        }
        return;
      }
    }
  }
  int index;
  bool backward;
};

// One boxed kernel per table op and direction; one implementation serves both devices.
void register_table_kernels(torch::Library& m) {
  for (int i = 0; i < kNumOps; ++i) {
    m.impl(kOps[i].name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<TableKernel>(i, false)));
    m.impl((std::string(kOps[i].name) + "_backward").c_str(),
           torch::CppFunction::makeFromBoxedFunctor(std::make_unique<TableKernel>(i, true)));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) { register_table_kernels(m); }
TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) { register_table_kernels(m); }

// The checks an op's eager call makes, without running it: `args` as its schema has them. torch.compile's
// fake kernels (vae_fast/ops.py) call this with their fake tensors, so compiled code raises what eager
// code raises.
void check_op(const std::string& op, const std::vector<c10::IValue>& args) {
  const int index = op_index(op);
  if (index >= 0) {
    const OpInfo& info = op_info(index);
    TORCH_CHECK(args.size() == info.n_fwd_args, "vae_fast.check_op: ", op, " takes ", info.n_fwd_args, " arguments");
    OpCall call(info, args, false);
    switch (info.spec->family) {
      case Family::Rows: {
        RowProblem p(call.row_inputs(false, true), call.event_dims, false);
        return;
      }
      case Family::Dmol:
        check_dmol("dmol_log_prob", call.tensors[0], call.tensors[1], call.params[0].toInt(), call.params[1].toInt(),
                   call.event_dims, 3);
        return;
    }
  } else if (op == "sample_gaussian") {
    check_sample_gaussian(args);
    return;
  } else if (op == "sample_dmol") {  // (params, seed, seed_value, channels, num_bits, layout)
    TORCH_CHECK(args.size() == 6, "vae_fast.check_op: sample_dmol takes 6 arguments");
    check_dmol("sample_dmol", std::nullopt, args[0].toTensor(), args[4].toInt(), args[5].toInt(), 3, args[3].toInt());
    return;
  }
  TORCH_CHECK(false, "vae_fast.check_op: unknown op ", op);
}

}  // namespace vae_fast
