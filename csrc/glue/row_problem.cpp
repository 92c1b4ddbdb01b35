// The row problem (glue/row_problem.h): layout, launch, and the reduction of broadcast gradients.
#include "glue/row_problem.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

#include <algorithm>

#include "core/coalesce.h"
#include "cpu/kernels.h"
#include "glue/cuda_launch.h"

namespace vae_fast {

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

// A group of dims (the row dims, or the event dims) with every operand's strides over them: a
// backward's inputs and outputs, 2 * kMaxOperands at most.
constexpr int kGroupOperands = 2 * kMaxOperands;
using Group = c10::SmallVector<StridedDim<kGroupOperands>, kMaxDims>;

// Dims [begin, end) of `sizes` with each operand's strides over them, coalesced (core/coalesce.h).
Group coalesced(at::IntArrayRef sizes, const DimsList& strides, size_t begin, size_t end) {
  TORCH_INTERNAL_ASSERT(strides.size() <= static_cast<size_t>(kGroupOperands));
  const int nops = static_cast<int>(strides.size());
  Group g(end - begin);
  for (size_t d = begin; d < end; ++d) {
    g[d - begin].size = sizes[d];
    for (int j = 0; j < nops; ++j) g[d - begin].st[j] = strides[j][d];
  }
  g.resize(static_cast<size_t>(coalesce(g.data(), static_cast<int>(g.size()), nops)));
  return g;
}

// Walks the row dims along which inputs are broadcast innermost, so a broadcast input's row is
// reused from cache by the rows that share it (the (K, B, D) decoder output against (B, D) data
// then reads the data once, not K times). A stable reordering: a function of the strides only.
void reuse_broadcast_rows(Group& rows, size_t n_inputs) {
  const size_t nd = rows.size();
  c10::SmallVector<int, kMaxDims> broadcast_count(nd, 0);
  for (size_t d = 0; d < nd; ++d)
    for (size_t j = 0; j < n_inputs; ++j) broadcast_count[d] += rows[d].st[j] == 0;
  c10::SmallVector<size_t, kMaxDims> order;
  for (size_t d = 0; d < nd; ++d) {  // a stable insertion sort by broadcast count (std::stable_sort allocates)
    size_t at = order.size();
    while (at > 0 && broadcast_count[order[at - 1]] > broadcast_count[d]) --at;
    order.insert(order.begin() + at, d);
  }
  Group out;
  for (size_t d : order) out.push_back(rows[d]);
  rows = out;
}

}  // namespace

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
  Group rows = coalesced(shape, all, 0, static_cast<size_t>(split));
  // a 0-dim problem is one row of one element
  Group events = shape.empty() ? Group() : coalesced(shape, all, static_cast<size_t>(split), shape.size());
  if (rows.size() > static_cast<size_t>(kMaxDims) || events.size() > static_cast<size_t>(kMaxDims))
    return false;
  reuse_broadcast_rows(rows, in_strides.size());
  RowLayout& L = args.layout;
  L.n_row_dims = static_cast<int>(rows.size());
  L.rows = 1;
  for (int d = 0; d < L.n_row_dims; ++d) L.row_sizes[d] = rows[d].size, L.rows *= rows[d].size;
  L.n_event_dims = static_cast<int>(events.size());
  L.event_numel = 1;
  for (int d = 0; d < L.n_event_dims; ++d) L.event_sizes[d] = events[d].size, L.event_numel *= events[d].size;
  if (L.n_event_dims == 0) {  // every event dim had size 1: one event line of one element
    L.n_event_dims = 1;
    L.event_sizes[0] = 1;
    events.assign(1, StridedDim<kGroupOperands>());  // strides 0
  }
  L.elementwise = elementwise;
  L.n_blocks = n_blocks;
  auto fill = [&](Operand& op, size_t j) {
    for (int d = 0; d < L.n_row_dims; ++d) op.row_strides[d] = rows[d].st[j];
    for (int d = 0; d < L.n_event_dims; ++d) op.event_strides[d] = events[d].st[j];
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
            // threads, which take blocks in tasks of 64K elements, cpu/rows.cpp), up to 64, at most one per
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

void RowProblem::launch(OpKind op, const RowArgs& args, const at::Device& device) const {
  if (device.is_cuda()) {
    launch_rows_cuda(op, args, device);
  } else {
    cpu::kernels().run_rows(op, args);
  }
}

}  // namespace vae_fast
