// The torch-facing side: op schemas, argument checks, the broadcast layout every kernel reads
// through, and the CPU registrations. Autograd and fake kernels live in vae_fast/ops.py.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>

#include "cpu/kernels.h"

namespace vae_fast {

// ------------------------------------------------------------------------------------------------
// Checks: every one runs before a kernel, and names the argument and what was expected.
// ------------------------------------------------------------------------------------------------
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

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

at::ScalarType check_args(const std::vector<NamedTensor>& args) {
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
  if (device.is_cuda()) {
    TORCH_CHECK(cuda_available(), "vae_fast: `", args[0].name,
                "` is a CUDA tensor but this build of vae_fast has no CUDA kernels (rebuild with a CUDA "
                "build of torch and nvcc on the PATH)");
  } else {
    TORCH_CHECK(device.is_cpu(), "vae_fast: `", args[0].name, "` is on ", device, "; only CPU and CUDA are supported");
  }
  return any64 ? at::kDouble : at::kFloat;
}

std::vector<int64_t> broadcast_shape(const std::vector<NamedTensor>& args) {
  std::vector<int64_t> shape;
  for (const auto& a : args) {
    auto s = a.tensor.sizes();
    std::vector<int64_t> out(std::max(shape.size(), s.size()), 1);
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
std::vector<int64_t> broadcast_strides(at::IntArrayRef own, const std::vector<int64_t>& full) {
  const size_t n = full.size(), off = n - own.size();
  std::vector<int64_t> st(n, 0);
  int64_t running = 1;
  for (size_t i = n; i-- > off;) {
    int64_t size = own[i - off];
    st[i] = (size == 1 && full[i] != 1) ? 0 : running;
    running *= size;
  }
  return st;
}

struct Group {
  std::vector<int64_t> sizes;
  std::vector<std::vector<int64_t>> strides;  // per operand
};

// Drops size-1 dims and merges neighbours that every operand walks as one.
Group coalesce(const std::vector<int64_t>& sizes, const std::vector<std::vector<int64_t>>& strides) {
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
  TORCH_CHECK(static_cast<int>(g.sizes.size()) <= kMaxDims, "vae_fast: at most ", kMaxDims,
              " non-mergeable dimensions are supported, got ", g.sizes.size());
  return g;
}

// Walks the row dims along which inputs are broadcast innermost, so a broadcast input's row is
// reused from cache by the rows that share it (the (K, B, D) decoder output against (B, D) data
// then reads the data once, not K times). A stable reordering: a function of the strides only.
void reuse_broadcast_rows(Group& rows, size_t n_inputs) {
  const size_t nd = rows.sizes.size();
  std::vector<int> broadcast_count(nd, 0);
  for (size_t d = 0; d < nd; ++d)
    for (size_t j = 0; j < n_inputs; ++j) broadcast_count[d] += rows.strides[j][d] == 0;
  std::vector<size_t> order(nd);
  for (size_t d = 0; d < nd; ++d) order[d] = d;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return broadcast_count[a] < broadcast_count[b]; });
  Group out;
  out.strides.resize(rows.strides.size());
  for (size_t d : order) {
    out.sizes.push_back(rows.sizes[d]);
    for (size_t j = 0; j < rows.strides.size(); ++j) out.strides[j].push_back(rows.strides[j][d]);
  }
  rows = out;
}

}  // namespace

RowProblem::RowProblem(const std::vector<NamedTensor>& inputs, int64_t event_dims, bool grad_is_first)
    : event_dims(event_dims) {
  std::vector<NamedTensor> shaped(inputs.begin() + (grad_is_first ? 1 : 0), inputs.end());
  acc_dtype = check_args(inputs);
  shape = broadcast_shape(shaped);
  check_event_dims(event_dims, static_cast<int64_t>(shape.size()), "arguments");
  const int64_t n = static_cast<int64_t>(shape.size());
  out_shape.assign(shape.begin(), shape.end() - event_dims);
  elementwise = event_dims == 0;
  split = elementwise ? std::max<int64_t>(n - 1, 0) : n - event_dims;
  for (const auto& a : inputs) {
    NamedTensor c{unexpand(a.tensor).contiguous(), a.name};
    in.push_back(c);
  }
  numel = 1;
  for (auto s : shape) numel *= s;
  event_numel = 1;
  for (int64_t d = split; d < n; ++d) event_numel *= shape[d];
}

// Strides over `shape` of a tensor shaped like the output (g, or the output itself): its own
// (possibly narrowed) strides over the leading out_shape dims, 0 over the summed event dims.
std::vector<int64_t> RowProblem::out_strides(at::IntArrayRef own) const {
  std::vector<int64_t> st = broadcast_strides(own, out_shape);
  st.resize(shape.size(), 0);
  return st;
}

RowArgs RowProblem::make_args(const std::vector<std::vector<int64_t>>& in_strides,
                              const std::vector<std::vector<int64_t>>& out_strides, int64_t n_blocks) const {
  std::vector<std::vector<int64_t>> all(in_strides);
  all.insert(all.end(), out_strides.begin(), out_strides.end());
  std::vector<int64_t> row_sizes(shape.begin(), shape.begin() + split), event_sizes(shape.begin() + split, shape.end());
  if (shape.empty()) event_sizes = {1};  // a 0-dim problem is one row of one element
  std::vector<std::vector<int64_t>> row_st(all.size()), ev_st(all.size());
  for (size_t j = 0; j < all.size(); ++j) {
    row_st[j].assign(all[j].begin(), all[j].begin() + split);
    ev_st[j].assign(all[j].begin() + split, all[j].end());
    if (shape.empty()) ev_st[j] = {0};
  }
  Group rows = coalesce(row_sizes, row_st), events = coalesce(event_sizes, ev_st);
  reuse_broadcast_rows(rows, in_strides.size());
  RowArgs args;
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
  return args;
}

// Runs a forward row op: out has shape out_shape (or shape when elementwise), in the accumulation type.
at::Tensor RowProblem::forward(OpKind op) const {
  auto out = at::empty(out_shape, in[0].tensor.options().dtype(acc_dtype));
  if (numel == 0) {
    if (out.numel() > 0) out.zero_();  // a sum over an empty event is 0
    return out;
  }
  std::vector<std::vector<int64_t>> in_st;
  for (const auto& a : in) in_st.push_back(broadcast_strides(a.tensor.sizes(), shape));
  std::vector<int64_t> out_st = out_strides(at::IntArrayRef(out_shape));
  RowArgs args = make_args(in_st, {out_st}, 1);
  for (size_t j = 0; j < in.size(); ++j) {
    args.in[j].data = in[j].tensor.data_ptr();
    args.in[j].dtype = to_dtype(in[j].tensor.scalar_type());
  }
  args.out[0].data = out.data_ptr();
  args.out[0].dtype = to_dtype(acc_dtype);
  launch(op, args, in[0].tensor.device());
  return out;
}

// Runs a backward row op; in[0] is the incoming gradient (shape out_shape). Returns one gradient per
// other input: its own shape and dtype when `needs`, else an empty tensor.
std::vector<at::Tensor> RowProblem::backward(OpKind op, const std::vector<bool>& needs,
                                             const std::vector<at::Tensor>& originals) const {
  const size_t n_args = in.size() - 1;
  std::vector<at::Tensor> grads(n_args), partials(n_args);
  const bool on_cuda = in[0].tensor.device().is_cuda();
  std::vector<std::vector<int64_t>> in_st, out_st;
  const auto gs = in[0].tensor.sizes();  // narrowed where the caller expanded it
  bool grad_ok = originals.size() + 1 == in.size() && gs.size() <= out_shape.size();
  for (size_t i = 0; grad_ok && i < gs.size(); ++i) {
    int64_t want = out_shape[out_shape.size() - gs.size() + i];
    grad_ok = gs[i] == want || gs[i] == 1;
  }
  TORCH_CHECK_VALUE(grad_ok, "vae_fast: grad must have the output's shape ", shape_str(out_shape), ", got ",
                    shape_str(gs));
  in_st.push_back(out_strides(in[0].tensor.sizes()));
  for (size_t j = 1; j < in.size(); ++j) in_st.push_back(broadcast_strides(in[j].tensor.sizes(), shape));
  // Row blocks for broadcast arguments' partial sums: a function of the shapes alone.
  int64_t rows = 1;
  for (int64_t d = 0; d < split; ++d) rows *= shape[d];
  int64_t max_partial = 1;
  for (size_t j = 0; j < n_args; ++j)  // only broadcast arguments get partial sums
    if (needs[j] && originals[j].numel() != numel) max_partial = std::max<int64_t>(max_partial, originals[j].numel());
  int64_t n_blocks = 1;
  if (on_cuda) {
    n_blocks = suggest_n_blocks_cuda(rows, event_numel, max_partial);
  } else {  // 64 blocks balance 2..64 threads; partial sums capped at 16M elements
    n_blocks = std::min<int64_t>(std::max<int64_t>(rows, 1), 64);
    n_blocks = std::max<int64_t>(1, std::min<int64_t>(n_blocks, (int64_t{1} << 24) / max_partial));
  }

  std::vector<bool> accumulate(n_args, false);
  for (size_t j = 0; j < n_args; ++j) {
    const at::Tensor& orig = originals[j];
    std::vector<int64_t> st = broadcast_strides(orig.sizes(), shape);
    out_st.push_back(st);
    if (!needs[j]) {
      grads[j] = at::empty({0}, orig.options());
      continue;
    }
    if (orig.numel() == numel && numel > 0) {
      grads[j] = at::empty(orig.sizes(), orig.options().memory_format(at::MemoryFormat::Contiguous));
    } else {
      accumulate[j] = true;
      partials[j] = at::zeros({n_blocks, orig.numel()}, orig.options().dtype(acc_dtype));
    }
  }
  if (numel > 0) {
    RowArgs args = make_args(in_st, out_st, n_blocks);
    for (size_t j = 0; j < in.size(); ++j) {
      args.in[j].data = in[j].tensor.data_ptr();
      args.in[j].dtype = to_dtype(in[j].tensor.scalar_type());
    }
    for (size_t j = 0; j < n_args; ++j) {
      if (!needs[j]) continue;
      Operand& o = args.out[j];
      o.accumulate = accumulate[j];
      if (accumulate[j]) {
        o.data = partials[j].data_ptr();
        o.dtype = to_dtype(acc_dtype);
        o.block_stride = originals[j].numel();
      } else {
        o.data = grads[j].data_ptr();
        o.dtype = to_dtype(grads[j].scalar_type());
      }
    }
    launch(op, args, in[0].tensor.device());
  }
  for (size_t j = 0; j < n_args; ++j) {
    if (!accumulate[j]) continue;
    // Block partial sums added in block order: deterministic.
    grads[j] = partials[j].sum(0).view(originals[j].sizes()).to(originals[j].scalar_type());
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

// ------------------------------------------------------------------------------------------------
// The ops.
// ------------------------------------------------------------------------------------------------
namespace {

std::vector<NamedTensor> kl_args(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& pmu,
                                 const std::optional<at::Tensor>& plogvar) {
  TORCH_CHECK_VALUE(pmu.has_value() == plogvar.has_value(),
                    "vae_fast.gaussian_kl: prior_mu and prior_logvar must be given together or not at all");
  std::vector<NamedTensor> args{{mu, "mu"}, {logvar, "logvar"}};
  if (pmu) {
    args.push_back({*pmu, "prior_mu"});
    args.push_back({*plogvar, "prior_logvar"});
  }
  return args;
}

at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& pmu,
                       const std::optional<at::Tensor>& plogvar, int64_t event_dims) {
  RowProblem p(kl_args(mu, logvar, pmu, plogvar), event_dims, false);
  return p.forward(pmu ? OpKind::KlFwd : OpKind::KlStdFwd);
}

std::vector<at::Tensor> gaussian_kl_backward(const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar,
                                             const std::optional<at::Tensor>& pmu,
                                             const std::optional<at::Tensor>& plogvar, int64_t event_dims,
                                             c10::List<bool> needs_list) {
  std::vector<bool> needs(needs_list.begin(), needs_list.end());
  auto args = kl_args(mu, logvar, pmu, plogvar);
  std::vector<at::Tensor> originals;
  for (const auto& a : args) originals.push_back(a.tensor);
  args.insert(args.begin(), NamedTensor{grad, "grad"});
  needs.resize(originals.size());
  RowProblem p(args, event_dims, true);
  auto grads = p.backward(pmu ? OpKind::KlBwd : OpKind::KlStdBwd, needs, originals);
  while (grads.size() < 4) grads.push_back(at::empty({0}, mu.options()));
  return grads;
}

at::Tensor gaussian_log_prob(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logvar, int64_t event_dims) {
  RowProblem p({{x, "x"}, {mean, "mean"}, {logvar, "logvar"}}, event_dims, false);
  return p.forward(OpKind::GaussLpFwd);
}

std::vector<at::Tensor> gaussian_log_prob_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                                   const at::Tensor& logvar, int64_t event_dims,
                                                   c10::List<bool> needs_list) {
  std::vector<bool> needs(needs_list.begin(), needs_list.end());
  RowProblem p({{grad, "grad"}, {x, "x"}, {mean, "mean"}, {logvar, "logvar"}}, event_dims, true);
  needs.resize(3);
  return p.backward(OpKind::GaussLpBwd, needs, {x, mean, logvar});
}

at::Tensor bernoulli_log_prob(const at::Tensor& x, const at::Tensor& logits, int64_t event_dims) {
  RowProblem p({{x, "x"}, {logits, "logits"}}, event_dims, false);
  return p.forward(OpKind::BernLpFwd);
}

std::vector<at::Tensor> bernoulli_log_prob_backward(const at::Tensor& grad, const at::Tensor& x,
                                                    const at::Tensor& logits, int64_t event_dims,
                                                    c10::List<bool> needs_list) {
  std::vector<bool> needs(needs_list.begin(), needs_list.end());
  RowProblem p({{grad, "grad"}, {x, "x"}, {logits, "logits"}}, event_dims, true);
  needs.resize(2);
  return p.backward(OpKind::BernLpBwd, needs, {x, logits});
}

// ---- sampling ----------------------------------------------------------------------------------

struct SampleProblem {
  at::Tensor mu, logvar, seed;
  std::vector<int64_t> shape, reduced_shape;
  int64_t rows = 1, event_numel = 1, num_samples = 1;
  bool sample_dim = false;
  at::ScalarType acc_dtype = at::kFloat;

  SampleProblem(const at::Tensor& mu_, const at::Tensor& logvar_, const at::Tensor& seed_, int64_t k,
                bool sample_dim_, int64_t event_dims)
      : num_samples(k), sample_dim(sample_dim_) {
    acc_dtype = check_args({{mu_, "mu"}, {logvar_, "logvar"}});
    TORCH_CHECK_TYPE(mu_.scalar_type() == logvar_.scalar_type(), "vae_fast: mu and logvar must have one dtype, got ",
                     mu_.scalar_type(), " and ", logvar_.scalar_type());
    TORCH_CHECK_VALUE(mu_.sizes() == logvar_.sizes(), "vae_fast: mu and logvar must have the same shape, got mu ",
                      shape_str(mu_.sizes()), " and logvar ", shape_str(logvar_.sizes()));
    TORCH_CHECK_VALUE(k >= 1, "vae_fast: num_samples must be >= 1, got ", k);
    TORCH_CHECK_VALUE(sample_dim || k == 1, "vae_fast: num_samples > 1 needs a sample dimension");
    TORCH_CHECK_TYPE(seed_.scalar_type() == at::kLong && seed_.numel() == 1,
                     "vae_fast: seed must be a 1-element int64 tensor, got ", seed_.scalar_type(), " of shape ",
                     shape_str(seed_.sizes()));
    TORCH_CHECK_VALUE(seed_.device() == mu_.device(), "vae_fast: seed must be on mu's device (", mu_.device(),
                      "), got ", seed_.device());
    check_event_dims(event_dims, mu_.dim(), "mu");
    mu = mu_.contiguous();
    logvar = logvar_.contiguous();
    seed = seed_.reshape({1}).contiguous();
    shape.assign(mu.sizes().begin(), mu.sizes().end());
    reduced_shape.assign(shape.begin(), shape.end() - event_dims);
    for (auto s : reduced_shape) rows *= s;
    for (size_t d = reduced_shape.size(); d < shape.size(); ++d) event_numel *= shape[d];
  }

  std::vector<int64_t> with_samples(std::vector<int64_t> s) const {
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
    a.seed = seed.data_ptr<int64_t>();
    a.run = std::max<int64_t>(rows * event_numel, 1);  // contiguous for now
    a.mu_run_stride = a.logvar_run_stride = a.run;
    return a;
  }
  bool empty() const { return rows * event_numel == 0; }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_gaussian(const at::Tensor& mu, const at::Tensor& logvar,
                                                               const at::Tensor& seed, int64_t num_samples,
                                                               bool sample_dim, int64_t event_dims, bool want_log_q,
                                                               bool want_kl) {
  SampleProblem p(mu, logvar, seed, num_samples, sample_dim, event_dims);
  auto acc = p.mu.options().dtype(p.acc_dtype);
  at::Tensor z = at::empty(p.with_samples(p.shape), p.mu.options());
  at::Tensor log_q = want_log_q ? at::empty(p.with_samples(p.reduced_shape), acc) : at::empty({0}, acc);
  at::Tensor kl = want_kl ? at::empty(p.reduced_shape, acc) : at::empty({0}, acc);
  if (p.empty()) {
    log_q.zero_();
    kl.zero_();
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

std::tuple<at::Tensor, at::Tensor> sample_gaussian_backward(const std::optional<at::Tensor>& grad_z,
                                                            const std::optional<at::Tensor>& grad_log_q,
                                                            const std::optional<at::Tensor>& grad_kl,
                                                            const at::Tensor& mu, const at::Tensor& logvar,
                                                            const at::Tensor& seed, int64_t num_samples,
                                                            bool sample_dim, int64_t event_dims, bool need_mu,
                                                            bool need_logvar) {
  SampleProblem p(mu, logvar, seed, num_samples, sample_dim, event_dims);
  at::Tensor gz, glq, gkl;
  auto expect = [&](const std::optional<at::Tensor>& t, const std::vector<int64_t>& shape, at::ScalarType dt,
                    const char* name) {
    if (!t || !t->defined()) return at::Tensor();
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(shape), "vae_fast: ", name, " must have shape ",
                      shape_str(shape), ", got ", shape_str(t->sizes()));
    return t->to(dt).contiguous();
  };
  gz = expect(grad_z, p.with_samples(p.shape), p.mu.scalar_type(), "grad_z");
  glq = expect(grad_log_q, p.with_samples(p.reduced_shape), p.acc_dtype, "grad_log_q");
  gkl = expect(grad_kl, p.reduced_shape, p.acc_dtype, "grad_kl");
  at::Tensor dmu = need_mu ? at::empty(p.shape, p.mu.options()) : at::empty({0}, p.mu.options());
  at::Tensor dlv = need_logvar ? at::empty(p.shape, p.mu.options()) : at::empty({0}, p.mu.options());
  if (p.empty() || !(need_mu || need_logvar)) return {dmu, dlv};
  SampleArgs a = p.args();
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
  return {dmu, dlv};
}

}  // namespace

TORCH_LIBRARY(vae_fast, m) {
  m.def("gaussian_kl(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, int event_dims) -> Tensor");
  m.def("gaussian_kl_backward(Tensor grad, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, "
        "int event_dims, bool[] needs) -> Tensor[]");
  m.def("gaussian_log_prob(Tensor x, Tensor mean, Tensor logvar, int event_dims) -> Tensor");
  m.def("gaussian_log_prob_backward(Tensor grad, Tensor x, Tensor mean, Tensor logvar, int event_dims, "
        "bool[] needs) -> Tensor[]");
  m.def("bernoulli_log_prob(Tensor x, Tensor logits, int event_dims) -> Tensor");
  m.def("bernoulli_log_prob_backward(Tensor grad, Tensor x, Tensor logits, int event_dims, bool[] needs) -> Tensor[]");
  m.def("sample_gaussian(Tensor mu, Tensor logvar, Tensor seed, int num_samples, bool sample_dim, int event_dims, "
        "bool want_log_q, bool want_kl) -> (Tensor, Tensor, Tensor)");
  m.def("sample_gaussian_backward(Tensor? grad_z, Tensor? grad_log_q, Tensor? grad_kl, Tensor mu, Tensor logvar, "
        "Tensor seed, int num_samples, bool sample_dim, int event_dims, bool need_mu, bool need_logvar) "
        "-> (Tensor, Tensor)");
}

// One implementation serves both devices: the glue branches on the device inside, after the checks.
#define VF_REGISTER(KEY)                                                     \
  TORCH_LIBRARY_IMPL(vae_fast, KEY, m) {                                     \
    m.impl("gaussian_kl", &gaussian_kl);                                     \
    m.impl("gaussian_kl_backward", &gaussian_kl_backward);                   \
    m.impl("gaussian_log_prob", &gaussian_log_prob);                         \
    m.impl("gaussian_log_prob_backward", &gaussian_log_prob_backward);       \
    m.impl("bernoulli_log_prob", &bernoulli_log_prob);                       \
    m.impl("bernoulli_log_prob_backward", &bernoulli_log_prob_backward);     \
    m.impl("sample_gaussian", &sample_gaussian);                             \
    m.impl("sample_gaussian_backward", &sample_gaussian_backward);           \
  }
VF_REGISTER(CPU)
VF_REGISTER(CUDA)

}  // namespace vae_fast
