// The torch-facing side: op schemas, argument checks, the broadcast layout every kernel reads
// through, and the CPU and CUDA registrations. Autograd lives in autograd.cpp, the fake kernels and the
// double-backward formulas in vae_fast/ops.py (docs/architecture.md: one op's path).
#include "glue/ops.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ExpandUtils.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <sstream>

#include "cpu/kernels.h"
#include "glue/dmol_ops.h"

namespace vae_fast {

// ------------------------------------------------------------------------------------------------
// Checks: every one runs before a kernel, and names the argument and what was expected.
// ------------------------------------------------------------------------------------------------
std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "vae_fast: `", name, "` must be a tensor, got None");
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "vae_fast: `", name, "` must be float32, float64, float16 or bfloat16, got ", st);
}

}  // namespace

DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: return DType::Float32;
  }
}

at::ScalarType check_args(c10::ArrayRef<NamedTensor> args) {
  bool any64 = false, all64 = true;
  for (const auto& a : args) {
    check_float(a.tensor, a.name);
    bool is64 = a.tensor.scalar_type() == at::kDouble;
    any64 |= is64;
    all64 &= is64;
  }
  if (any64 && !all64) {
    std::ostringstream os;
    for (size_t i = 0; i < args.size(); ++i)
      os << (i ? ", " : "") << args[i].name << "=" << args[i].tensor.scalar_type();
    TORCH_CHECK_TYPE(false, "vae_fast: float64 cannot be mixed with other dtypes (got ", os.str(),
                     "); cast all arguments to float64, or none");
  }
  const auto device = args[0].tensor.device();
  for (const auto& a : args) {
    TORCH_CHECK_VALUE(a.tensor.device() == device, "vae_fast: all arguments must be on one device, but `",
                      args[0].name, "` is on ", device, " and `", a.name, "` is on ", a.tensor.device());
  }
  if (device.is_meta()) return any64 ? at::kDouble : at::kFloat;  // shapes only (torch.compile's fake tensors)
  if (device.is_cuda()) {
    TORCH_CHECK(cuda_available(), "vae_fast: `", args[0].name,
                "` is a CUDA tensor but this build of vae_fast has no CUDA kernels (rebuild with a CUDA "
                "build of torch and nvcc on the PATH)");
  } else {
    TORCH_CHECK(device.is_cpu(), "vae_fast: `", args[0].name, "` is on ", device, "; only CPU and CUDA are supported");
  }
  return any64 ? at::kDouble : at::kFloat;
}

Dims broadcast_shape(c10::ArrayRef<NamedTensor> args) {
  Dims shape;
  for (const auto& a : args) {
    auto s = a.tensor.sizes();
    Dims out(std::max(shape.size(), s.size()), 1);
    for (size_t i = 0; i < out.size(); ++i) {
      int64_t x = i < out.size() - shape.size() ? 1 : shape[i - (out.size() - shape.size())];
      int64_t y = i < out.size() - s.size() ? 1 : s[i - (out.size() - s.size())];
      if (x != y && x != 1 && y != 1) {
        std::ostringstream os;
        for (size_t j = 0; j < args.size(); ++j)
          os << (j ? ", " : "") << args[j].name << " " << shape_str(args[j].tensor.sizes());
        TORCH_CHECK_VALUE(false, "vae_fast: the shapes of ", os.str(), " do not broadcast (`", a.name,
                          "` disagrees in dimension ", static_cast<int64_t>(i) - static_cast<int64_t>(out.size()),
                          ")");
      }
      out[i] = x == 1 ? y : x;
    }
    shape = out;
  }
  return shape;
}

void check_event_dims(int64_t event_dims, int64_t ndim, const char* what) {
  TORCH_CHECK_VALUE(event_dims >= 0 && event_dims <= ndim, "vae_fast: event_dims must be in [0, ", ndim,
                    "] for ", what, " with ", ndim, " dimensions, got ", event_dims);
}

// ------------------------------------------------------------------------------------------------
// Layout: split the broadcast shape into row and event dims, give each operand its strides.
// ------------------------------------------------------------------------------------------------
namespace {

// A view of `t` with every stride-0 (expanded) dimension narrowed to size 1: broadcasting reads it
// the same, and .contiguous() of it never materialises an expansion the caller made.
at::Tensor unexpand(const at::Tensor& t) {
  at::Tensor v = t;
  for (int64_t d = 0; d < v.dim(); ++d)
    if (v.stride(d) == 0 && v.size(d) > 1) v = v.narrow(d, 0, 1);
  return v;
}

// Strides (elements) of a tensor of shape `own` (contiguous) read as if broadcast to `full`.
Dims broadcast_strides(at::IntArrayRef own, at::IntArrayRef full) {
  const size_t n = full.size(), off = n - own.size();
  Dims st(n, 0);
  int64_t running = 1;
  for (size_t i = n; i-- > off;) {
    int64_t size = own[i - off];
    st[i] = (size == 1 && full[i] != 1) ? 0 : running;
    running *= size;
  }
  return st;
}

// Strides of tensor `t` as it lies in memory, read as if broadcast to `full` (0 where it is broadcast):
// chunks, slices and transposes are read in place.
Dims strides_in_place(const at::Tensor& t, at::IntArrayRef full) {
  const size_t n = full.size(), off = n - static_cast<size_t>(t.dim());
  Dims st(n, 0);
  for (size_t i = off; i < n; ++i) {
    const int64_t d = static_cast<int64_t>(i - off);
    st[i] = (t.size(d) == 1 && full[i] != 1) ? 0 : t.stride(d);
  }
  return st;
}

struct Group {
  Dims sizes;
  DimsList strides;  // per operand
};

// Drops size-1 dims and merges neighbours that every operand walks as one; `ok` false when more
// than kMaxDims dims remain.
Group coalesce(at::IntArrayRef sizes, const DimsList& strides) {
  Group g;
  g.strides.resize(strides.size());
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 1) continue;
    bool merge = !g.sizes.empty();
    for (size_t j = 0; merge && j < strides.size(); ++j)
      merge = g.strides[j].back() == strides[j][d] * sizes[d];
    if (merge) {
      g.sizes.back() *= sizes[d];
      for (size_t j = 0; j < strides.size(); ++j) g.strides[j].back() = strides[j][d];
    } else {
      g.sizes.push_back(sizes[d]);
      for (size_t j = 0; j < strides.size(); ++j) g.strides[j].push_back(strides[j][d]);
    }
  }
  return g;
}

// Walks the row dims along which inputs are broadcast innermost, so a broadcast input's row is
// reused from cache by the rows that share it (the (K, B, D) decoder output against (B, D) data
// then reads the data once, not K times). A stable reordering: a function of the strides only.
void reuse_broadcast_rows(Group& rows, size_t n_inputs) {
  const size_t nd = rows.sizes.size();
  c10::SmallVector<int, kMaxDims> broadcast_count(nd, 0);
  for (size_t d = 0; d < nd; ++d)
    for (size_t j = 0; j < n_inputs; ++j) broadcast_count[d] += rows.strides[j][d] == 0;
  c10::SmallVector<size_t, kMaxDims> order;
  for (size_t d = 0; d < nd; ++d) {  // a stable insertion sort by broadcast count (std::stable_sort allocates)
    size_t at = order.size();
    while (at > 0 && broadcast_count[order[at - 1]] > broadcast_count[d]) --at;
    order.insert(order.begin() + at, d);
  }
  Group out;
  out.strides.resize(rows.strides.size());
  for (size_t d : order) {
    out.sizes.push_back(rows.sizes[d]);
    for (size_t j = 0; j < rows.strides.size(); ++j) out.strides[j].push_back(rows.strides[j][d]);
  }
  rows = out;
}

}  // namespace

// The clamp's bounds rounded to the dtype of the input they apply to, as torch.clamp compares them: a
// bfloat16 logvar of 0.69921875 lies inside (0.7, hi), since 0.7 is 0.69921875 in bfloat16.
Clamp in_dtype(Clamp c, at::ScalarType t) {
  auto round = [t](double v) {
    switch (t) {
      case at::kFloat: return static_cast<double>(static_cast<float>(v));
      case at::kHalf: return static_cast<double>(static_cast<float>(c10::Half(static_cast<float>(v))));
      case at::kBFloat16: return static_cast<double>(static_cast<float>(c10::BFloat16(static_cast<float>(v))));
      default: return v;
    }
  };
  if (c.on) c.lo = round(c.lo), c.hi = round(c.hi);
  return c;
}

RowProblem::RowProblem(c10::ArrayRef<NamedTensor> inputs, int64_t event_dims, bool grad_is_first)
    : event_dims(event_dims) {
  const c10::ArrayRef<NamedTensor> shaped = inputs.slice(grad_is_first ? 1 : 0);
  acc_dtype = check_args(inputs);
  shape = broadcast_shape(shaped);
  check_event_dims(event_dims, static_cast<int64_t>(shape.size()), "arguments");
  const int64_t n = static_cast<int64_t>(shape.size());
  out_shape.assign(shape.begin(), shape.end() - event_dims);
  elementwise = event_dims == 0;
  split = elementwise ? std::max<int64_t>(n - 1, 0) : n - event_dims;
  for (const auto& a : inputs) in.push_back({unexpand(a.tensor), a.name});  // read in place, never copied
  clamps.resize(in.size());
  numel = 1;
  for (auto s : shape) numel *= s;
  event_numel = 1;
  for (int64_t d = split; d < n; ++d) event_numel *= shape[d];
}

// Strides over `shape` of a tensor shaped like the output (g, or the output itself): its own
// (possibly narrowed) strides over the leading out_shape dims, 0 over the summed event dims.
Dims RowProblem::out_strides(const at::Tensor& t) const {
  Dims st = strides_in_place(t, out_shape);
  st.resize(shape.size(), 0);
  return st;
}

DimsList RowProblem::input_strides(bool first_is_grad) const {
  DimsList st;
  for (size_t j = 0; j < in.size(); ++j)
    st.push_back(first_is_grad && j == 0 ? out_strides(in[0].tensor) : strides_in_place(in[j].tensor, shape));
  return st;
}

bool RowProblem::make_args(const DimsList& in_strides, const DimsList& out_strides, int64_t n_blocks,
                           RowArgs& args) const {
  DimsList all(in_strides);
  all.insert(all.end(), out_strides.begin(), out_strides.end());
  Dims row_sizes(shape.begin(), shape.begin() + split), event_sizes(shape.begin() + split, shape.end());
  if (shape.empty()) event_sizes = {1};  // a 0-dim problem is one row of one element
  DimsList row_st(all.size()), ev_st(all.size());
  for (size_t j = 0; j < all.size(); ++j) {
    row_st[j].assign(all[j].begin(), all[j].begin() + split);
    ev_st[j].assign(all[j].begin() + split, all[j].end());
    if (shape.empty()) ev_st[j] = {0};
  }
  Group rows = coalesce(row_sizes, row_st), events = coalesce(event_sizes, ev_st);
  if (rows.sizes.size() > static_cast<size_t>(kMaxDims) || events.sizes.size() > static_cast<size_t>(kMaxDims))
    return false;
  reuse_broadcast_rows(rows, in_strides.size());
  RowLayout& L = args.layout;
  L.n_row_dims = static_cast<int>(rows.sizes.size());
  L.rows = 1;
  for (int d = 0; d < L.n_row_dims; ++d) L.row_sizes[d] = rows.sizes[d], L.rows *= rows.sizes[d];
  L.n_event_dims = static_cast<int>(events.sizes.size());
  L.event_numel = 1;
  for (int d = 0; d < L.n_event_dims; ++d) L.event_sizes[d] = events.sizes[d], L.event_numel *= events.sizes[d];
  if (L.n_event_dims == 0) {  // every event dim had size 1: one event line of one element
    L.n_event_dims = 1;
    L.event_sizes[0] = 1;
    for (auto& s : events.strides) s = {0};
  }
  L.elementwise = elementwise;
  L.n_blocks = n_blocks;
  auto fill = [&](Operand& op, size_t j) {
    for (int d = 0; d < L.n_row_dims; ++d) op.row_strides[d] = rows.strides[j][d];
    for (int d = 0; d < L.n_event_dims; ++d) op.event_strides[d] = events.strides[j][d];
  };
  for (size_t j = 0; j < in_strides.size(); ++j) fill(args.in[j], j);
  for (size_t j = 0; j < out_strides.size(); ++j) fill(args.out[j], in_strides.size() + j);
  return true;
}

// The launch description with every input read in place; when the strides leave more than kMaxDims
// dims that cannot be merged, the inputs are copied to contiguous memory (the only copy ever made).
RowArgs RowProblem::layout(const DimsList& out_strides, int64_t n_blocks, bool first_is_grad) {
  RowArgs args;
  if (make_args(input_strides(first_is_grad), out_strides, n_blocks, args)) return args;
  for (auto& a : in) a.tensor = a.tensor.contiguous();
  TORCH_CHECK(make_args(input_strides(first_is_grad), out_strides, n_blocks, args), "vae_fast: at most ", kMaxDims,
              " non-mergeable dimensions are supported (after broadcasting) in the row and in the event dims");
  return args;
}

void RowProblem::bind_inputs(RowArgs& args) const {
  for (size_t j = 0; j < in.size(); ++j) {
    args.in[j].data = in[j].tensor.data_ptr();
    args.in[j].dtype = to_dtype(in[j].tensor.scalar_type());
    args.in[j].clamp = in_dtype(clamps[j], in[j].tensor.scalar_type());
  }
}

// Runs a forward row op: out has shape out_shape (or shape when elementwise), in the accumulation type.
at::Tensor RowProblem::forward(OpKind op) {
  auto out = at::empty(out_shape, in[0].tensor.options().dtype(acc_dtype));
  if (numel == 0 || out.is_meta()) {
    if (out.numel() > 0 && !out.is_meta()) out.zero_();  // a sum over an empty event is 0
    return out;
  }
  RowArgs args = layout({out_strides(out)}, 1, false);
  bind_inputs(args);
  args.out[0].data = out.data_ptr();
  args.out[0].dtype = to_dtype(acc_dtype);
  launch(op, args, in[0].tensor.device());
  return out;
}

// Runs a backward row op; in[0] is the incoming gradient (shape out_shape). Returns one gradient per
// original argument: its own shape and dtype when `needs`, else an empty tensor.
std::vector<at::Tensor> RowProblem::backward(OpKind op, c10::ArrayRef<bool> needs, c10::ArrayRef<at::Tensor> originals,
                                             std::optional<int64_t> concat_dim,
                                             size_t concat_first) {
  const size_t n_args = originals.size();
  std::vector<at::Tensor> grads(n_args);  // the op's Tensor[] result
  c10::SmallVector<at::Tensor, kMaxOperands> partials(n_args);
  const auto device = in[0].tensor.device();
  at::Tensor joint;                     // with concat_dim: the one buffer of both gradients
  c10::SmallVector<at::Tensor, kMaxOperands> halves(n_args);  // ... and the two views of it they are written to
  if (concat_dim) {
    TORCH_CHECK_VALUE(concat_first + 1 < n_args && needs[concat_first] && needs[concat_first + 1],
                      "vae_fast: concat_dim needs both gradients it concatenates");
    const at::Tensor &a = originals[concat_first], &b = originals[concat_first + 1];
    joint = concat_buffer(a, b, *concat_dim);
    const int64_t d = c10::maybe_wrap_dim(*concat_dim, a.dim()), h = a.size(d);
    halves[concat_first] = joint.narrow(d, 0, h);
    halves[concat_first + 1] = joint.narrow(d, h, h);
  }
  const auto gs = in[0].tensor.sizes();  // narrowed where the caller expanded it
  bool grad_ok = gs.size() <= out_shape.size();
  for (size_t i = 0; grad_ok && i < gs.size(); ++i) {
    int64_t want = out_shape[out_shape.size() - gs.size() + i];
    grad_ok = gs[i] == want || gs[i] == 1;
  }
  TORCH_CHECK_VALUE(grad_ok, "vae_fast: grad must have the output's shape ", shape_str(out_shape), ", got ",
                    shape_str(gs));
  Flags accumulate(n_args, false);
  DimsList out_st;
  for (size_t j = 0; j < n_args; ++j) {
    const at::Tensor& orig = originals[j];
    out_st.push_back(broadcast_strides(orig.sizes(), shape));
    if (!needs[j]) {
      grads[j] = at::empty({0}, orig.options());
      continue;
    }
    if (orig.numel() == numel && numel > 0) {
      if (halves[j].defined()) {  // written in place into its half of the joint buffer
        grads[j] = halves[j];
        out_st.back() = strides_in_place(halves[j], shape);
      } else {
        grads[j] = at::empty(orig.sizes(), orig.options().memory_format(at::MemoryFormat::Contiguous));
      }
    } else {
      accumulate[j] = true;
    }
  }
  // CPU partial sums are kept in double (long sums of broadcast gradients keep their digits); the
  // CUDA kernels keep them in the accumulation type.
  const auto partial_dtype = device.is_cuda() ? acc_dtype : at::kDouble;
  std::optional<RowArgs> launch_args;
  if (numel > 0 && !device.is_meta()) {
    launch_args = layout(out_st, 1, true);
    RowArgs& args = *launch_args;
    bind_inputs(args);
    for (size_t j = 0; j < n_args; ++j) {
      if (!needs[j]) continue;
      Operand& o = args.out[j];
      o.accumulate = accumulate[j];
      o.dtype = to_dtype(accumulate[j] ? partial_dtype : grads[j].scalar_type());
      if (!accumulate[j]) o.data = grads[j].data_ptr();
    }
  }
  // Row blocks for broadcast arguments' partial sums: a function of the shapes alone.
  int64_t rows = 1;
  for (int64_t d = 0; d < split; ++d) rows *= shape[d];
  int64_t max_partial = 1;
  for (size_t j = 0; j < n_args; ++j)  // only broadcast arguments get partial sums
    if (accumulate[j]) max_partial = std::max<int64_t>(max_partial, originals[j].numel());
  int64_t n_blocks = 1;
  if (device.is_cuda()) {
    if (launch_args) n_blocks = suggest_n_blocks_cuda(op, *launch_args, max_partial, device);
  } else {  // a summation block per 4K elements (a function of the shape: the sums do not depend on the
            // threads, which take blocks in tasks of 64K elements, kernels.cpp), up to 64, at most one per
            // row; partial sums capped at 16M elements
    n_blocks = std::clamp<int64_t>(std::min(rows * event_numel >> 12, rows), 1, 64);
    n_blocks = std::max<int64_t>(1, std::min<int64_t>(n_blocks, (int64_t{1} << 24) / max_partial));
  }
  for (size_t j = 0; j < n_args; ++j) {
    if (!accumulate[j]) continue;
    // One slice per row block; one for all when the CPU engine's blocks write disjoint elements of it (a
    // (B, D) argument against K samples: each block owns its data rows), so no block sums a mostly-zero slice.
    const bool shared = launch_args && !device.is_cuda() &&
                        outer_rows_disjoint(*launch_args, launch_args->out[j], static_cast<int>(in.size()));
    partials[j] = at::zeros({shared ? 1 : n_blocks, originals[j].numel()}, originals[j].options().dtype(partial_dtype));
  }
  if (launch_args) {
    RowArgs& args = *launch_args;
    args.layout.n_blocks = n_blocks;
    for (size_t j = 0; j < n_args; ++j) {
      if (!accumulate[j]) continue;
      args.out[j].data = partials[j].data_ptr();
      args.out[j].block_stride = partials[j].size(0) == 1 ? 0 : originals[j].numel();
    }
    launch(op, args, device);
  }
  for (size_t j = 0; j < n_args; ++j) {
    if (!accumulate[j]) continue;
    // Block partial sums added in block order: deterministic.
    grads[j] = (partials[j].size(0) == 1 ? partials[j].view(originals[j].sizes())
                                          : partials[j].sum(0).view(originals[j].sizes()))
                   .to(originals[j].scalar_type());
    if (halves[j].defined()) grads[j] = halves[j].copy_(grads[j]);  // a broadcast argument: its sum, copied in
  }
  if (joint.defined()) {
    grads[concat_first] = joint;
    grads[concat_first + 1] = at::empty({0}, originals[concat_first].options());
  }
  return grads;
}

Clamp parse_clamp(const std::optional<c10::ArrayRef<double>>& clamp, const char* name) {
  Clamp c;
  if (!clamp) return c;
  TORCH_CHECK_VALUE(clamp->size() == 2, "vae_fast: `", name, "` must be (low, high), got ", clamp->size(), " values");
  c.on = true;
  c.lo = (*clamp)[0];
  c.hi = (*clamp)[1];
  TORCH_CHECK_VALUE(c.lo <= c.hi, "vae_fast: `", name, "` must be (low, high) with low <= high, got (", c.lo, ", ",
                    c.hi, ")");
  return c;
}

at::Tensor concat_buffer(const at::Tensor& a, const at::Tensor& b, int64_t dim) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "vae_fast: concat_dim needs two arguments of one shape, got ",
                    shape_str(a.sizes()), " and ", shape_str(b.sizes()));
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "vae_fast: concat_dim needs two arguments of one dtype, got ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.dim() > 0 && dim >= -a.dim() && dim < a.dim(), "vae_fast: concat_dim ", dim,
                    " is out of range for arguments of shape ", shape_str(a.sizes()));
  Dims sizes(a.sizes().begin(), a.sizes().end());
  sizes[c10::maybe_wrap_dim(dim, a.dim())] *= 2;
  return at::empty(sizes, a.options().memory_format(at::MemoryFormat::Contiguous));
}

void RowProblem::launch(OpKind op, const RowArgs& args, const at::Device& device) const {
  if (device.is_cuda()) {
    launch_rows_cuda(op, args, device);
  } else {
    cpu::kernels().run_rows(op, args);
  }
}

// ------------------------------------------------------------------------------------------------
// The ops.
// ------------------------------------------------------------------------------------------------
// ------------------------------------------------------------------------------------------------
// The table's ops (op_table.h): their schemas, and one boxed kernel that reads any of them off the
// dispatcher's stack, checks its arguments and runs its family's kernels.
// ------------------------------------------------------------------------------------------------
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

bool any_nan(const at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble));
  const int64_t n = out.numel();
  bool nan = false;
  if (out.scalar_type() == at::kFloat) {
    const float* p = out.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) nan |= std::isnan(p[i]);
  } else {
    const double* p = out.const_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) nan |= std::isnan(p[i]);
  }
  return nan;
}

std::string data_range_report(const at::Tensor& x, double low, double high) {
  const at::Tensor v = x.detach().to(at::kDouble);
  const at::Tensor finite = at::isfinite(v);
  const int64_t outside = (at::logical_not(finite) | (v < low) | (v > high)).sum().item<int64_t>();
  if (outside == 0) return "";
  std::ostringstream os;
  os.precision(9);
  const at::Tensor kept = v.masked_select(at::logical_not(at::isnan(v)));
  os << "got values in [";
  if (kept.numel() > 0) {
    os << kept.min().item<double>() << ", " << kept.max().item<double>();
  } else {
    os << "nan, nan";
  }
  os << "] (" << outside << " of " << v.numel() << " outside [" << low << ", " << high << "] or not finite)";
  return os.str();
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

// ---- sampling ----------------------------------------------------------------------------------

// (run, run_stride) with logical flat element m of `t` at (m / run) * run_stride + m % run (layout.h),
// or (0, 0) when its strides are not of that form.
std::pair<int64_t, int64_t> runs_of(const at::Tensor& t) {
  int64_t run = 1;
  int64_t d = t.dim() - 1;
  for (; d >= 0; --d) {  // trailing dims that are contiguous form the run
    if (t.size(d) == 1) continue;
    if (t.stride(d) != run) break;
    run *= t.size(d);
  }
  if (d < 0) return {run, run};  // contiguous: any run dividing numel, run_stride == run
  const int64_t run_stride = t.stride(d);
  int64_t expect = t.stride(d) * t.size(d);
  for (int64_t e = d - 1; e >= 0; --e) {  // the leading dims must step uniformly by run_stride
    if (t.size(e) == 1) continue;
    if (t.stride(e) != expect) return {0, 0};
    expect *= t.size(e);
  }
  return {run, run_stride};
}

struct SampleProblem {
  at::Tensor mu, logvar, seed;  // seed undefined: the key is seed_value
  uint64_t seed_value = 0;
  Dims shape, reduced_shape;
  int64_t rows = 1, event_numel = 1, num_samples = 1;
  int64_t run = 1, mu_run_stride = 1, logvar_run_stride = 1;
  bool sample_dim = false;
  at::ScalarType acc_dtype = at::kFloat;
  Clamp clamp;

  SampleProblem(const at::Tensor& mu_, const at::Tensor& logvar_, const std::optional<at::Tensor>& seed_,
                std::optional<int64_t> seed_value_, int64_t k, bool sample_dim_, int64_t event_dims,
                const OptClamp& logvar_clamp = std::nullopt)
      : num_samples(k), sample_dim(sample_dim_) {
    acc_dtype = check_args({{mu_, "mu"}, {logvar_, "logvar"}});
    clamp = parse_clamp(logvar_clamp, "logvar_clamp");
    TORCH_CHECK_TYPE(mu_.scalar_type() == logvar_.scalar_type(), "vae_fast: mu and logvar must have one dtype, got ",
                     mu_.scalar_type(), " and ", logvar_.scalar_type());
    TORCH_CHECK_VALUE(mu_.sizes() == logvar_.sizes(), "vae_fast: mu and logvar must have the same shape, got mu ",
                      shape_str(mu_.sizes()), " and logvar ", shape_str(logvar_.sizes()));
    TORCH_CHECK_VALUE(k >= 1, "vae_fast: num_samples must be >= 1, got ", k);
    TORCH_CHECK_VALUE(sample_dim || k == 1, "vae_fast: num_samples > 1 needs a sample dimension");
    check_event_dims(event_dims, mu_.dim(), "mu");
    at::Tensor drawn = seed_.value_or(at::Tensor());
    draw_seed_if_none(mu_, drawn, seed_value_);
    const std::optional<at::Tensor> seed_in = opt(drawn);
    if (seed_in && seed_in->defined()) {
      TORCH_CHECK_TYPE(seed_in->scalar_type() == at::kLong && seed_in->numel() == 1,
                       "vae_fast: seed must be a 1-element int64 tensor, got ", seed_in->scalar_type(), " of shape ",
                       shape_str(seed_in->sizes()));
      TORCH_CHECK_VALUE(seed_in->device() == mu_.device(), "vae_fast: seed must be on mu's device (", mu_.device(),
                        "), got ", seed_in->device());
      seed = seed_in->reshape({1}).contiguous();
    } else if (seed_value_) {
      seed_value = static_cast<uint64_t>(*seed_value_);
    }
    mu = mu_;
    logvar = logvar_;
    shape.assign(mu.sizes().begin(), mu.sizes().end());
    reduced_shape.assign(shape.begin(), shape.end() - event_dims);
    for (auto s : reduced_shape) rows *= s;
    for (size_t d = reduced_shape.size(); d < shape.size(); ++d) event_numel *= shape[d];
    layout_runs();
  }

  // mu and logvar read in place when both are runs of one length (chunks of an encoder output, channel
  // halves); otherwise the one that is not gets copied to contiguous memory.
  void layout_runs() {
    const int64_t numel = rows * event_numel;
    if (numel == 0) return;
    auto [ru, su] = runs_of(mu);
    auto [rl, sl] = runs_of(logvar);
    if (ru == 0) {
      mu = mu.contiguous();
      ru = su = numel;
    }
    if (rl == 0) {
      logvar = logvar.contiguous();
      rl = sl = numel;
    }
    if (ru != rl) {
      if (ru == numel) {  // contiguous mu: any run works for it
        ru = su = rl;
      } else if (rl == numel) {
        rl = sl = ru;
      } else {
        logvar = logvar.contiguous();
        rl = sl = ru;
      }
    }
    run = ru;
    mu_run_stride = su;
    logvar_run_stride = sl;
  }

  Dims with_samples(Dims s) const {
    if (sample_dim) s.insert(s.begin(), num_samples);
    return s;
  }

  SampleArgs args() const {
    SampleArgs a;
    a.mu = mu.data_ptr();
    a.logvar = logvar.data_ptr();
    a.dtype = to_dtype(mu.scalar_type());
    a.rows = rows;
    a.event_numel = event_numel;
    a.num_samples = num_samples;
    a.run = run;
    a.mu_run_stride = mu_run_stride;
    a.logvar_run_stride = logvar_run_stride;
    a.seed = seed.defined() ? seed.data_ptr<int64_t>() : nullptr;
    a.seed_value = seed_value;
    a.logvar_clamp = in_dtype(clamp, logvar.scalar_type());
    a.grad_run = a.grad_mu_run_stride = a.grad_logvar_run_stride = std::max<int64_t>(rows * event_numel, 1);
    return a;
  }
  bool skip() const { return rows * event_numel == 0 || mu.is_meta(); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_gaussian(
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& seed,
    std::optional<int64_t> seed_value, int64_t num_samples, bool sample_dim, int64_t event_dims, bool want_log_q,
    bool want_kl, bool log_q_path_only, OptClamp logvar_clamp) {
  (void)log_q_path_only;  // a backward option: the forward values are the same
  SampleProblem p(mu, logvar, seed, seed_value, num_samples, sample_dim, event_dims, logvar_clamp);
  auto acc = p.mu.options().dtype(p.acc_dtype);
  at::Tensor z = at::empty(p.with_samples(p.shape), p.mu.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor log_q = want_log_q ? at::empty(p.with_samples(p.reduced_shape), acc) : at::empty({0}, acc);
  at::Tensor kl = want_kl ? at::empty(p.reduced_shape, acc) : at::empty({0}, acc);
  if (p.skip()) {
    if (!mu.is_meta()) {
      log_q.zero_();
      kl.zero_();
    }
    return {z, log_q, kl};
  }
  SampleArgs a = p.args();
  a.z = z.data_ptr();
  a.log_q = want_log_q ? log_q.data_ptr() : nullptr;
  a.kl = want_kl ? kl.data_ptr() : nullptr;
  if (mu.is_cuda()) {
    sample_forward_cuda(a, mu.device());
  } else {
    cpu::kernels().sample_forward(a);
  }
  return {z, log_q, kl};
}

std::tuple<at::Tensor, at::Tensor> sample_gaussian_backward(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_log_q,
    const std::optional<at::Tensor>& grad_kl, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& seed, std::optional<int64_t> seed_value, int64_t num_samples, bool sample_dim,
    int64_t event_dims, bool log_q_path_only, bool need_mu, bool need_logvar, OptClamp logvar_clamp,
    std::optional<int64_t> concat_dim) {
  TORCH_CHECK_VALUE((seed && seed->defined()) || seed_value,
                    "vae_fast: sample_gaussian_backward needs the forward's seed (seed or seed_value)");
  TORCH_CHECK_VALUE(!concat_dim || (need_mu && need_logvar), "vae_fast: concat_dim needs both gradients");
  SampleProblem p(mu, logvar, seed, seed_value, num_samples, sample_dim, event_dims, logvar_clamp);
  auto expect = [&](const std::optional<at::Tensor>& t, at::IntArrayRef shape, at::ScalarType dt,
                    const char* name) {
    if (!t || !t->defined()) return at::Tensor();
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(shape), "vae_fast: ", name, " must have shape ",
                      shape_str(shape), ", got ", shape_str(t->sizes()));
    TORCH_CHECK_VALUE(t->device() == mu.device(), "vae_fast: ", name, " must be on mu's device (", mu.device(),
                      "), got ", t->device());
    return t->to(dt).contiguous();
  };
  at::Tensor gz = expect(grad_z, p.with_samples(p.shape), p.mu.scalar_type(), "grad_z");
  at::Tensor glq = expect(grad_log_q, p.with_samples(p.reduced_shape), p.acc_dtype, "grad_log_q");
  at::Tensor gkl = expect(grad_kl, p.reduced_shape, p.acc_dtype, "grad_kl");
  auto opts = p.mu.options().memory_format(at::MemoryFormat::Contiguous);
  // With concat_dim, both gradients are written in place into the halves of one buffer, returned first.
  at::Tensor joint = concat_dim ? concat_buffer(mu, logvar, *concat_dim) : at::Tensor();
  const int64_t cd = concat_dim ? c10::maybe_wrap_dim(*concat_dim, mu.dim()) : 0;
  at::Tensor dmu = joint.defined() ? joint.narrow(cd, 0, mu.size(cd)) : need_mu ? at::empty(p.shape, opts) : at::empty({0}, opts);
  at::Tensor dlv = joint.defined() ? joint.narrow(cd, mu.size(cd), mu.size(cd))
                   : need_logvar  ? at::empty(p.shape, opts)
                                  : at::empty({0}, opts);
  auto result = [&]() -> std::tuple<at::Tensor, at::Tensor> {
    if (joint.defined()) return {joint, at::empty({0}, opts)};
    return {dmu, dlv};
  };
  if (p.skip() || !(need_mu || need_logvar)) return result();
  if (!gz.defined() && !glq.defined() && !gkl.defined()) {  // nothing flows back: zero gradients
    dmu.zero_();
    dlv.zero_();
    return result();
  }
  SampleArgs a = p.args();
  if (joint.defined()) {  // halves of a contiguous buffer: runs of one length at one stride
    auto [run, stride] = runs_of(dmu);
    a.grad_run = run;
    a.grad_mu_run_stride = a.grad_logvar_run_stride = stride;
  }
  a.log_q_path_only = log_q_path_only;
  a.grad_z = gz.defined() ? gz.data_ptr() : nullptr;
  a.grad_log_q = glq.defined() ? glq.data_ptr() : nullptr;
  a.grad_kl = gkl.defined() ? gkl.data_ptr() : nullptr;
  a.grad_mu = need_mu ? dmu.data_ptr() : nullptr;
  a.grad_logvar = need_logvar ? dlv.data_ptr() : nullptr;
  if (mu.is_cuda()) {
    sample_backward_cuda(a, mu.device());
  } else {
    cpu::kernels().sample_backward(a);
  }
  return result();
}

}  // namespace

// The key of a sampling call that was given none. CPU: a value drawn from torch's default generator as
// torch.randint(0, 2**62, (1,)) draws it (so torch.compile's traced randint, under Inductor's
// fallback_random, gives the same samples), no tensor made. Elsewhere: a device tensor from
// torch.randint (no host sync).
void draw_seed(const at::Device& device, at::Tensor& seed, std::optional<int64_t>& seed_value) {
  if (device.is_cpu()) {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    seed_value = static_cast<int64_t>(gen.get<at::CPUGeneratorImpl>()->random64() % (uint64_t{1} << 62));
  } else {
    seed = at::randint(0, int64_t{1} << 62, {1}, at::TensorOptions().dtype(at::kLong).device(device));
  }
}

// The one place that decides whether a sampling call draws its key: given neither a seed tensor nor a
// value, on real tensors. Not on meta tensors, nor while tracing (fake tensors carry the Python key): a
// key drawn then would be baked into the graph; vae_fast/ops.py passes a draw_seed tensor under
// torch.compile instead. The autograd kernel calls it before the forward (the backward regenerates eps
// from the same key); a call below autograd (inference mode) reaches it in the op itself.
void draw_seed_if_none(const at::Tensor& like, at::Tensor& seed, std::optional<int64_t>& seed_value) {
  if (!seed.defined() && !seed_value && !like.is_meta() && !like.key_set().has(c10::DispatchKey::Python))
    draw_seed(like.device(), seed, seed_value);
}

// A 1-element int64 seed on like's device, drawn as a sampling call given no seed draws it.
at::Tensor draw_seed_op(const at::Tensor& like) {
  at::Tensor seed;
  std::optional<int64_t> value;
  draw_seed(like.device(), seed, value);
  return value ? at::full({1}, *value, at::TensorOptions().dtype(at::kLong)) : seed;
}

TORCH_LIBRARY(vae_fast, m) {
  // The table's ops (op_table.h). logvar_clamp (and prior_logvar_clamp): [lo, hi], that input read as
  // clamp(x, lo, hi), its gradient torch.clamp's (layout.h's Clamp). concat_dim (backward ops): the
  // gradients of the mean and the logvar come back as one contiguous tensor, their concatenation along
  // it, in the mean's slot (the logvar's slot empty), so the two halves of one encoder output get
  // their gradient in one buffer, no cat.
  for (const OpSpec& s : kOps) {
    m.def(schema_text(s, false).c_str());
    m.def(schema_text(s, true).c_str());
  }
  // seed: a 1-element int64 tensor on mu's device (read there: graph-capture safe), or seed_value by
  // value, or neither: drawn from torch's generator for mu's device. Tagged nondeterministic_seeded so
  // no compiler merges two calls.
  m.def("sample_gaussian(Tensor mu, Tensor logvar, Tensor? seed, int? seed_value, int num_samples, bool sample_dim, "
        "int event_dims, bool want_log_q, bool want_kl, bool log_q_path_only, float[]? logvar_clamp=None) "
        "-> (Tensor, Tensor, Tensor)",
        {at::Tag::nondeterministic_seeded});
  // The seed draw_seed gives the sampler when it is called with none (for torch.compile and CUDA: an
  // opaque op, so compiled code draws from torch's generator exactly as eager code does).
  m.def("draw_seed(Tensor like) -> Tensor", {at::Tag::nondeterministic_seeded});
  m.def("sample_gaussian_backward(Tensor? grad_z, Tensor? grad_log_q, Tensor? grad_kl, Tensor mu, Tensor logvar, "
        "Tensor? seed, int? seed_value, int num_samples, bool sample_dim, int event_dims, bool log_q_path_only, "
        "bool need_mu, bool need_logvar, float[]? logvar_clamp=None, int? concat_dim=None) -> (Tensor, Tensor)");
}

// One implementation serves both devices: the glue branches on the device inside, after the checks.
void register_kernels(torch::Library& m) {
  for (int i = 0; i < kNumOps; ++i) {
    m.impl(kOps[i].name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<TableKernel>(i, false)));
    m.impl((std::string(kOps[i].name) + "_backward").c_str(),
           torch::CppFunction::makeFromBoxedFunctor(std::make_unique<TableKernel>(i, true)));
  }
  m.impl("sample_gaussian", &sample_gaussian);
  m.impl("sample_gaussian_backward", &sample_gaussian_backward);
  m.impl("draw_seed", &draw_seed_op);
}
TORCH_LIBRARY_IMPL(vae_fast, CPU, m) { register_kernels(m); }
TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) { register_kernels(m); }

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
  } else if (op == "sample_gaussian") {  // a seed value stands in for a missing seed: nothing is drawn
    TORCH_CHECK(args.size() == 11, "vae_fast.check_op: sample_gaussian takes 11 arguments");
    std::optional<std::vector<double>> clamp;
    if (!args[10].isNone()) clamp = args[10].toDoubleVector();
    const std::optional<at::Tensor> seed = args[2].isNone() ? std::nullopt : std::optional<at::Tensor>(args[2].toTensor());
    SampleProblem p(args[0].toTensor(), args[1].toTensor(), seed, int64_t{0}, args[4].toInt(), args[5].toBool(),
                    args[6].toInt(), clamp ? OptClamp(*clamp) : OptClamp());
    return;
  } else if (op == "sample_dmol") {  // (params, seed, seed_value, channels, num_bits, layout)
    TORCH_CHECK(args.size() == 6, "vae_fast.check_op: sample_dmol takes 6 arguments");
    check_dmol("sample_dmol", std::nullopt, args[0].toTensor(), args[4].toInt(), args[5].toInt(), 3, args[3].toInt());
    return;
  }
  TORCH_CHECK(false, "vae_fast.check_op: unknown op ", op);
}

}  // namespace vae_fast
