// The discretized mixture of logistics (PixelCNN++'s likelihood), fused: schemas, checks, the
// layout the kernels read through (core/launch_args.h's DmolArgs), CPU/CUDA registrations and the
// sampler's autograd (its schema: schemas.cpp).
//
// x and params are read in place through their strides (channels_first, channels_last, PixelCNN++'s
// (B, H, W, P), chunks); x may broadcast against params' leading dims (x (B, C, H, W) against params
// (K, B, P, H, W) for K samples) through a two-level row walk, with a copy only when the leading dims
// do not fold into two levels. Nothing of size (B, H, W, C, M) is allocated or saved: autograd saves x
// and params, the backward recomputes.
//
// event_dims counts x's trailing dims summed. The channels are coupled, so they are always summed:
// layout pixelcnn++ (x (..., H, W, C)) takes 1 (per pixel: (..., H, W)), 2 (per image row) or 3 (per
// example); layout channels_first (x (..., C, H, W)) takes 3 only: per-pixel values of
// channels-first tensors come from layout pixelcnn++ on x.permute(0, 2, 3, 1) and
// params.permute(0, 2, 3, 1) (views, read in place, no copy) -- with the parameters then in
// PixelCNN++'s order along P.
#include "glue/dmol_ops.h"

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <sstream>

#include "core/coalesce.h"
#include "core/dmol_math.h"
#include "cpu/kernels.h"
#include "glue/checks.h"
#include "glue/cuda_launch.h"
#include "glue/sample_ops.h"

namespace vae_fast {
namespace {

const char* layout_name(int64_t layout) { return layout == kDmolPixelCnn ? "pixelcnn++" : "channels_first"; }

int64_t params_per_mixture(int64_t C) { return 1 + 2 * C + C * (C - 1) / 2; }

void check_layout_bits(const char* op, int64_t layout, int64_t num_bits) {
  TORCH_CHECK_VALUE(layout == kDmolChannelsFirst || layout == kDmolPixelCnn, "vae_fast.", op,
                    ": layout must be 0 (channels_first) or 1 (pixelcnn++), got ", layout);
  TORCH_CHECK_VALUE(num_bits >= 1 && num_bits <= 16, "vae_fast.", op, ": num_bits must be in [1, 16], got ",
                    num_bits);
}

// Bits of precision of a floating dtype (x's levels are rounded to it).
int precision_bits(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 53;
    case at::kHalf: return 11;
    case at::kBFloat16: return 8;
    default: return 24;
  }
}

// How far (in levels) x of this dtype may lie from the 2^bits grid: 0.1 of a level, plus what rounding a
// level k / half_levels - 1 to the dtype can move it (up to one ulp of [1, 2) before the subtraction).
// More than 1/4 of a level (bfloat16 beyond 6 bits, float16 beyond 9): the dtype cannot hold the levels.
double grid_slack(at::ScalarType t, int64_t num_bits) {
  const double half_levels = 0.5 * static_cast<double>((int64_t{1} << num_bits) - 1);
  return std::ldexp(1.0, 1 - precision_bits(t)) * half_levels;
}
constexpr double kGridTol = 0.1, kMaxGridSlack = 0.25;

// Axes of the three event dims of x / params / sample: (channel or P axis, h, w), counted from the end.
struct Axes {
  int64_t c, h, w;
};
Axes axes_of(int64_t layout) { return layout == kDmolPixelCnn ? Axes{-1, -3, -2} : Axes{-3, -2, -1}; }

// Strides of a tensor's leading dims (all but the last 3) read as broadcast to `lead` (0 where broadcast).
Dims lead_strides(const at::Tensor& t, at::IntArrayRef lead) {
  const int64_t n = static_cast<int64_t>(lead.size()), own = t.dim() - 3, off = n - own;
  Dims st(static_cast<size_t>(n), 0);
  for (int64_t i = off; i < n; ++i) st[i] = (t.size(i - off) == 1 && lead[i] != 1) ? 0 : t.stride(i - off);
  return st;
}

// Folds the leading dims into (outer, inner) for every operand at once: size-1 dims dropped, neighbours
// merged where every operand walks them as one (core/coalesce.h). False when more than two dims remain.
constexpr int kWalkOperands = 5;  // x, params, grad, dx, dparams
bool fold_rows(at::IntArrayRef lead, const c10::SmallVector<Dims, 6>& strides, int64_t& outer, int64_t& inner,
               c10::SmallVector<std::pair<int64_t, int64_t>, 6>& walk) {
  TORCH_INTERNAL_ASSERT(strides.size() <= static_cast<size_t>(kWalkOperands));
  const int nops = static_cast<int>(strides.size());
  c10::SmallVector<StridedDim<kWalkOperands>, kMaxDims> dims(lead.size());
  for (size_t d = 0; d < lead.size(); ++d) {
    dims[d].size = lead[d];
    for (int j = 0; j < nops; ++j) dims[d].st[j] = strides[j][d];
  }
  const int n = coalesce(dims.data(), static_cast<int>(dims.size()), nops);
  if (n > 2) return false;
  walk.assign(strides.size(), {0, 0});
  outer = inner = 1;
  if (n == 2) {
    outer = dims[0].size;
    inner = dims[1].size;
    for (int j = 0; j < nops; ++j) walk[j] = {dims[0].st[j], dims[1].st[j]};
  } else if (n == 1) {
    inner = dims[0].size;
    for (int j = 0; j < nops; ++j) walk[j] = {0, dims[0].st[j]};
  }
  return true;
}

// One call's problem: the checks, the shapes, the parameter offsets.
struct DmolProblem {
  at::Tensor x, params;  // x undefined for the sampler
  int64_t layout = 0, num_bits = 8, event_dims = 3, C = 3, M = 1, P = 10, H = 1, W = 1;
  double grid_tol = kGridTol;
  Dims lead, out_shape, x_shape_full, p_shape_full;
  DmolReduce reduce = DmolReduce::PerRow;
  at::ScalarType acc = at::kFloat;
  bool x_broadcast = false, p_broadcast = false;

  // The log-likelihood ops (x defined) or the sampler (x undefined, channels given).
  DmolProblem(const char* op, const at::Tensor* x_, const at::Tensor& params_, int64_t num_bits_, int64_t layout_,
              int64_t event_dims_, int64_t channels)
      : layout(layout_), num_bits(num_bits_), event_dims(event_dims_) {
    if (x_) {
      acc = check_args({{*x_, "x"}, {params_, "params"}});
      x = *x_;
    } else {
      acc = check_args({{params_, "params"}});
    }
    params = params_;
    check_layout_bits(op, layout, num_bits);
    const Axes ax = axes_of(layout);
    const char* xs = layout == kDmolPixelCnn ? "(..., H, W, C)" : "(..., C, H, W)";
    const char* ps = layout == kDmolPixelCnn ? "(..., H, W, P)" : "(..., P, H, W)";
    if (x.defined()) {
      const double slack = grid_slack(x.scalar_type(), num_bits);
      TORCH_CHECK_VALUE(slack <= kMaxGridSlack, "vae_fast.discretized_mix_logistic_log_prob: `x` in ", x.scalar_type(),
                        " cannot hold the ", int64_t{1} << num_bits, " levels of ", num_bits,
                        "-bit data in [-1, 1] (its rounding moves a level by up to ", slack,
                        " of the spacing between levels); pass x as float32 (params may stay ", params_.scalar_type(),
                        ")");
      grid_tol = kGridTol + slack;
      TORCH_CHECK_VALUE(x.dim() >= 3, "vae_fast.", op, ": `x` must have shape ", xs, " for layout ", layout_name(layout),
                        ", got ", shape_str(x.sizes()));
      C = x.size(ax.c);
      TORCH_CHECK_VALUE(C == 1 || C == 3, "vae_fast.", op, ": `x` must have 1 or 3 channels (shape ", xs,
                        " for layout ", layout_name(layout), "), got ", C, " in shape ", shape_str(x.sizes()));
    } else {
      C = channels;
      TORCH_CHECK_VALUE(C == 1 || C == 3, "vae_fast.", op, ": channels must be 1 or 3, got ", C);
    }
    TORCH_CHECK_VALUE(params.dim() >= 3, "vae_fast.", op, ": `params` must have shape ", ps, " for layout ",
                      layout_name(layout), ", got ", shape_str(params.sizes()));
    H = params.size(ax.h);
    W = params.size(ax.w);
    P = params.size(ax.c);
    const int64_t per = params_per_mixture(C);
    TORCH_CHECK_VALUE(P % per == 0 && P / per >= 1 && P / per <= elbo::kDmolMaxMixtures, "vae_fast.", op,
                      ": `params` must have M * ", per, " entries along its P axis (M mixture components in [1, ",
                      elbo::kDmolMaxMixtures, "] for C = ", C, ": shape ", ps, " for layout ", layout_name(layout),
                      "), got ", P, " in shape ", shape_str(params.sizes()));
    M = P / per;
    if (x.defined()) {
      TORCH_CHECK_VALUE(x.size(ax.h) == H && x.size(ax.w) == W, "vae_fast.", op, ": `x` ", shape_str(x.sizes()),
                        " and `params` ", shape_str(params.sizes()), " must have the same H and W (shapes ", xs,
                        " and ", ps, " for layout ", layout_name(layout), ")");
      // leading dims broadcast
      const int64_t nx = x.dim() - 3, np = params.dim() - 3, n = std::max(nx, np);
      lead.assign(static_cast<size_t>(n), 1);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t a = i - (n - nx) >= 0 ? x.size(i - (n - nx)) : 1;
        const int64_t b = i - (n - np) >= 0 ? params.size(i - (n - np)) : 1;
        TORCH_CHECK_VALUE(a == b || a == 1 || b == 1, "vae_fast.", op, ": the leading (batch) dims of `x` ",
                          shape_str(x.sizes()), " and `params` ", shape_str(params.sizes()), " do not broadcast");
        lead[i] = a == 1 ? b : a;
        x_broadcast |= a != lead[i];
        p_broadcast |= b != lead[i];
      }
      x_broadcast |= nx < n;
      p_broadcast |= np < n;
      if (layout == kDmolChannelsFirst) {
        TORCH_CHECK_VALUE(event_dims == 3, "vae_fast.", op,
                          ": event_dims must be 3 for layout channels_first (the channels are coupled, so they are "
                          "always summed; per-pixel or per-row values: layout pixelcnn++ with x.permute(0, 2, 3, 1) and "
                          "params in PixelCNN++'s order, read in place), got ",
                          event_dims);
      } else {
        TORCH_CHECK_VALUE(event_dims >= 1 && event_dims <= 3, "vae_fast.", op,
                          ": event_dims must be 1 (per pixel), 2 (per image row) or 3 (per example) for layout "
                          "pixelcnn++ (the channels are coupled, so they are always summed), got ",
                          event_dims);
      }
      reduce = event_dims == 3 ? DmolReduce::PerRow : event_dims == 2 ? DmolReduce::PerLine : DmolReduce::PerPixel;
      out_shape = lead;
      if (event_dims <= 2) out_shape.push_back(H);
      if (event_dims == 1) out_shape.push_back(W);
      x_shape_full = lead;
      p_shape_full = lead;
      for (int64_t d = x.dim() - 3; d < x.dim(); ++d) x_shape_full.push_back(x.size(d));
      for (int64_t d = params.dim() - 3; d < params.dim(); ++d) p_shape_full.push_back(params.size(d));
    } else {
      lead.assign(params.sizes().begin(), params.sizes().end() - 3);
      out_shape = lead;
      if (layout == kDmolPixelCnn) out_shape.append({H, W, C});
      else out_shape.append({C, H, W});
    }
  }

  int64_t rows() const {
    int64_t r = 1;
    for (auto s : lead) r *= s;
    return r;
  }
  bool empty() const { return rows() * H * W == 0; }

  // The event strides (c, h, w) of a tensor laid out as x / params / sample.
  DmolStrides event_strides(const at::Tensor& t) const {
    const Axes ax = axes_of(layout);
    DmolStrides s;
    s.c = t.stride(ax.c);
    s.h = t.stride(ax.h);
    s.w = t.stride(ax.w);
    return s;
  }

  DmolArgs base_args() const {
    DmolArgs a;
    a.channels = static_cast<int32_t>(C);
    a.mixtures = static_cast<int32_t>(M);
    a.num_bits = static_cast<int32_t>(num_bits);
    a.grid_tol = grid_tol;
    a.height = H;
    a.width = W;
    a.acc_dtype = acc == at::kDouble ? DType::Float64 : DType::Float32;
    a.params = params.data_ptr();
    a.params_dtype = to_dtype(params.scalar_type());
    a.ps = event_strides(params);
    if (x.defined()) {
      a.x = x.data_ptr();
      a.x_dtype = to_dtype(x.scalar_type());
      a.xs = event_strides(x);
    }
    a.reduce = reduce;
    // P-axis offsets
    const int64_t Mi = M;
    a.logit_base = 0;
    a.component_step = 1;
    if (layout == kDmolPixelCnn) {
      a.mean_base = Mi;
      a.log_scale_base = 2 * Mi;
      a.coeff_base = 3 * Mi;
      a.mean_channel_step = a.log_scale_channel_step = a.coeff_step = 3 * Mi;
    } else {
      a.mean_base = Mi;
      a.mean_channel_step = Mi;
      a.log_scale_base = Mi + C * Mi;
      a.log_scale_channel_step = Mi;
      a.coeff_base = Mi + 2 * C * Mi;
      a.coeff_step = Mi;
    }
    return a;
  }

  // Fills the (outer, inner) walk of args for the operands in `ts` (each with `lead` as its leading dims
  // after broadcasting), in the order given; false when they do not fold into two levels.
  bool walk(DmolArgs& a, c10::ArrayRef<at::Tensor> ts, c10::ArrayRef<DmolStrides*> targets) const {
    c10::SmallVector<Dims, 6> st;
    for (const auto& t : ts) st.push_back(lead_strides(t, lead));
    c10::SmallVector<std::pair<int64_t, int64_t>, 6> w;
    if (!fold_rows(lead, st, a.outer, a.inner, w)) return false;
    for (size_t j = 0; j < targets.size(); ++j) {
      targets[j]->outer = w[j].first;
      targets[j]->inner = w[j].second;
    }
    return true;
  }

  // x and params expanded to the full leading shape and made contiguous (the rare fallback).
  void materialize() {
    x = x.expand(x_shape_full).contiguous();
    params = params.expand(p_shape_full).contiguous();
  }
};

// Output (or upstream gradient) strides over (outer, inner, -, h, w): its event dims per reduce.
DmolStrides out_event_strides(const at::Tensor& t, DmolReduce reduce) {
  DmolStrides s;
  if (reduce == DmolReduce::PerPixel) {
    s.h = t.stride(-2);
    s.w = t.stride(-1);
  } else if (reduce == DmolReduce::PerLine) {
    s.h = t.stride(-1);
  }
  return s;
}

// The grad tensor as a tensor of the output's leading dims + its event dims (for lead_strides: a
// tensor whose last 3 dims are events). Pads the event dims with size-1 dims.
at::Tensor as_event3(const at::Tensor& t, int64_t n_event) {
  at::Tensor v = t;
  for (int64_t i = n_event; i < 3; ++i) v = v.unsqueeze(-1);
  return v;
}

// After a forward that gave NaN (glue/checks.h: data off the support give NaN): a ValueError if x is off its support,
// saying where x lies and how 8-bit data are converted; nothing if x is on it (the NaN came from params).
// The distance from the grid is measured as the kernel measures it (dmol_math.h's nan_off_support, in the
// accumulation type `acc`), so the two agree on every value.
void check_data(const at::Tensor& x_in, int64_t num_bits, double grid_tol, at::ScalarType acc) {
  const char* fix = "8-bit images k = 0..255 are vf.data.from_levels(k, \"signed\") (k / 127.5 - 1), data in [0, 1] "
                    "are x * 2 - 1";
  const std::string outside = data_range_report(x_in, -1.0, 1.0);
  TORCH_CHECK_VALUE(outside.empty(), "vae_fast.discretized_mix_logistic_log_prob: `x` must be ", num_bits,
                    "-bit data in [-1, 1], ", outside, ": ", fix);
  const int64_t levels = (int64_t{1} << num_bits) - 1;
  const at::Tensor y = (x_in.detach().to(acc) + 1.0) * (0.5 * static_cast<double>(levels));
  const at::Tensor off = (y - (y + 0.5).floor()).abs();
  const at::Tensor bad = off > grid_tol;
  const int64_t n_bad = bad.sum().item<int64_t>();
  if (n_bad == 0) return;
  const int64_t first = bad.flatten().nonzero()[0].item<int64_t>();
  std::ostringstream example;
  example.precision(9);
  example << x_in.detach().flatten()[first].to(at::kDouble).item<double>();
  TORCH_CHECK_VALUE(false, "vae_fast.discretized_mix_logistic_log_prob: `x` must lie on the ", levels + 1,
                    " levels k / ", 0.5 * static_cast<double>(levels), " - 1 of ", num_bits, "-bit data in [-1, 1]; ",
                    n_bad, " of ", x_in.numel(), " values are off it (e.g. ", example.str(), ", ",
                    off.flatten()[first].to(at::kDouble).item<double>(), " of a level from the nearest; data in [0, 1]?): ", fix);
}

}  // namespace

at::Tensor dmol_log_prob(const at::Tensor& x_in, const at::Tensor& params_in, int64_t num_bits, int64_t layout,
                         int64_t event_dims) {
  DmolProblem p("dmol_log_prob", &x_in, params_in, num_bits, layout, event_dims, 0);
  at::Tensor out = at::empty(p.out_shape, p.params.options().dtype(p.acc));
  if (p.x.is_meta()) return out;
  if (p.empty()) return out.zero_();
  const int64_t n_event = static_cast<int64_t>(p.out_shape.size() - p.lead.size());
  DmolArgs a = p.base_args();
  if (!p.walk(a, {p.x, p.params, as_event3(out, n_event)}, {&a.xs, &a.ps, &a.os})) {
    p.materialize();
    a = p.base_args();
    TORCH_INTERNAL_ASSERT(p.walk(a, {p.x, p.params, as_event3(out, n_event)}, {&a.xs, &a.ps, &a.os}));
  }
  const DmolStrides ev = out_event_strides(out, p.reduce);
  a.os.h = ev.h;
  a.os.w = ev.w;
  a.out = out.data_ptr();
  if (out.is_cuda()) {
    at::Tensor scratch;
    if (p.reduce != DmolReduce::PerPixel) {
      scratch = at::empty({p.rows(), p.H, p.W}, out.options());
      a.scratch = scratch.data_ptr();
    }
    dmol_forward_cuda(a, out.device());
  } else {
    cpu::kernels().dmol_forward(a);
    if (any_nan(out)) check_data(x_in, num_bits, p.grid_tol, p.acc);
  }
  return out;
}

std::vector<at::Tensor> dmol_log_prob_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                               const at::Tensor& params_in, int64_t num_bits, int64_t layout,
                                               int64_t event_dims, c10::List<bool> needs) {
  DmolProblem p("dmol_log_prob_backward", &x_in, params_in, num_bits, layout, event_dims, 0);
  TORCH_CHECK_VALUE(needs.size() == 2, "vae_fast.dmol_log_prob_backward: needs must have 2 entries (x, params), got ",
                    needs.size());
  TORCH_CHECK_TYPE(grad_in.defined(), "vae_fast.dmol_log_prob_backward: `grad` must be a tensor, got None");
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef(p.out_shape), "vae_fast.dmol_log_prob_backward: `grad` must have shape ",
                    shape_str(p.out_shape), ", got ", shape_str(grad_in.sizes()));
  TORCH_CHECK_VALUE(grad_in.device() == x_in.device(), "vae_fast.dmol_log_prob_backward: `grad` must be on x's device (",
                    x_in.device(), "), got ", grad_in.device());
  const bool need_x = needs.get(0), need_p = needs.get(1);
  // Gradients of broadcast inputs: written at the full shape in the accumulation type (float32 for half
  // inputs), then summed to the input's shape and rounded once to its dtype.
  auto grad_buffer = [&](bool need, bool broadcast, const at::Tensor& t, const Dims& full) {
    if (!need) return at::empty({0}, t.options());
    if (broadcast) return at::empty(full, t.options().dtype(p.acc).memory_format(at::MemoryFormat::Contiguous));
    return at::empty_like(t);
  };
  at::Tensor dx = grad_buffer(need_x, p.x_broadcast, p.x, p.x_shape_full);
  at::Tensor dp = grad_buffer(need_p, p.p_broadcast, p.params, p.p_shape_full);
  auto summed = [](const at::Tensor& full, const at::Tensor& in) {
    return full.sum_to_size(in.sizes()).to(in.scalar_type());
  };
  auto result = [&]() -> std::vector<at::Tensor> {
    at::Tensor rx = need_x && p.x_broadcast ? summed(dx, x_in) : dx;
    at::Tensor rp = need_p && p.p_broadcast ? summed(dp, params_in) : dp;
    return {rx, rp};
  };
  if (p.x.is_meta() || !(need_x || need_p)) return result();
  if (p.empty()) {
    dx.zero_();
    dp.zero_();
    return result();
  }
  at::Tensor g = grad_in.scalar_type() == p.acc ? grad_in : grad_in.to(p.acc);
  const int64_t n_event = static_cast<int64_t>(p.out_shape.size() - p.lead.size());
  // stand-ins with the full leading shape for gradients that are not wanted (their strides do not matter)
  auto full_or = [&](const at::Tensor& t, const at::Tensor& like) { return t.numel() > 0 || t.dim() > 1 ? t : like; };
  DmolArgs a = p.base_args();
  auto bind = [&]() {
    return p.walk(a, {p.x, p.params, as_event3(g, n_event), full_or(dx, p.x), full_or(dp, p.params)},
                  {&a.xs, &a.ps, &a.gs, &a.dxs, &a.dps});
  };
  if (!bind()) {
    p.materialize();
    g = g.contiguous();
    a = p.base_args();
    if (need_x && !p.x_broadcast) dx = at::empty_like(p.x);
    if (need_p && !p.p_broadcast) dp = at::empty_like(p.params);
    TORCH_INTERNAL_ASSERT(bind());
  }
  const DmolStrides ev = out_event_strides(g, p.reduce);
  a.gs.h = ev.h;
  a.gs.w = ev.w;
  a.grad = g.data_ptr();
  // A wanted gradient's pointer, dtype and event strides (its row strides are bind()'s).
  auto bind_grad = [&](const at::Tensor& t, void*& ptr, DType& dtype, DmolStrides& s) {
    const DmolStrides e = p.event_strides(t);
    ptr = t.data_ptr();
    dtype = to_dtype(t.scalar_type());
    s.c = e.c;
    s.h = e.h;
    s.w = e.w;
  };
  if (need_x) bind_grad(dx, a.dx, a.dx_dtype, a.dxs);
  if (need_p) bind_grad(dp, a.dparams, a.dparams_dtype, a.dps);
  if (p.x.is_cuda()) {
    dmol_backward_cuda(a, p.x.device());
  } else {
    cpu::kernels().dmol_backward(a);
  }
  return result();
}

at::Tensor sample_dmol(const at::Tensor& params_in, const std::optional<at::Tensor>& seed_in,
                       std::optional<int64_t> seed_value, int64_t channels, int64_t num_bits, int64_t layout) {
  DmolProblem p("sample_dmol", nullptr, params_in, num_bits, layout, 3, channels);
  at::Tensor out = at::empty(p.out_shape, p.params.options().memory_format(at::MemoryFormat::Contiguous));
  if (p.params.is_meta() || p.empty()) return out;
  at::Tensor seed = seed_in && seed_in->defined() ? *seed_in : at::Tensor();
  if (!seed.defined() && !seed_value) draw_seed(p.params.device(), seed, seed_value);
  if (seed.defined()) {
    TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                     "vae_fast.sample_dmol: seed must be a 1-element int64 tensor, got ", seed.scalar_type(),
                     " of shape ", shape_str(seed.sizes()));
    TORCH_CHECK_VALUE(seed.device() == p.params.device(), "vae_fast.sample_dmol: seed must be on params' device (",
                      p.params.device(), "), got ", seed.device());
    seed = seed.reshape({1}).contiguous();
  }
  DmolArgs a = p.base_args();
  const Axes ax = axes_of(layout);
  // out's leading dims are params'; as_event-style: out has the same leading shape.
  if (!p.walk(a, {p.params, out}, {&a.ps, &a.ss})) {
    p.params = p.params.contiguous();
    a = p.base_args();
    TORCH_INTERNAL_ASSERT(p.walk(a, {p.params, out}, {&a.ps, &a.ss}));
  }
  a.ss.c = out.stride(ax.c);
  a.ss.h = out.stride(ax.h);
  a.ss.w = out.stride(ax.w);
  a.sample = out.data_ptr();
  a.seed = seed.defined() ? seed.data_ptr<int64_t>() : nullptr;
  a.seed_value = seed_value ? static_cast<uint64_t>(*seed_value) : 0;
  if (out.is_cuda()) {
    dmol_sample_cuda(a, out.device());
  } else {
    cpu::kernels().dmol_sample(a);
  }
  return out;
}

void check_dmol(const std::string& op, const std::optional<at::Tensor>& x, const at::Tensor& params, int64_t num_bits,
                int64_t layout, int64_t event_dims, int64_t channels) {
  if (op == "dmol_log_prob") {
    TORCH_CHECK_TYPE(x && x->defined(), "vae_fast.dmol_log_prob: `x` must be a tensor, got None");
    DmolProblem p("dmol_log_prob", &*x, params, num_bits, layout, event_dims, 0);
  } else if (op == "sample_dmol") {
    DmolProblem p("sample_dmol", nullptr, params, num_bits, layout, 3, channels);
  } else {
    TORCH_CHECK(false, "vae_fast.check_dmol: unknown op ", op);
  }
}

// ---- the sampler below autograd (dmol_log_prob's autograd is the op table's, glue/autograd.cpp) ----------
at::Tensor sample_dmol_autograd(const at::Tensor& params, const std::optional<at::Tensor>& seed,
                                std::optional<int64_t> seed_value, int64_t channels, int64_t num_bits, int64_t layout) {
  // Samples are data: no gradient flows through them.
  at::AutoDispatchBelowADInplaceOrView below;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vae_fast::sample_dmol", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, std::optional<int64_t>,
                                         int64_t, int64_t, int64_t)>();
  return op.call(params, seed, seed_value, channels, num_bits, layout);
}

// The sampler's kernels (its schema: schemas.cpp; dmol_log_prob and its backward are table ops).
TORCH_LIBRARY_IMPL(vae_fast, CPU, m) { m.impl("sample_dmol", &sample_dmol); }
TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) { m.impl("sample_dmol", &sample_dmol); }
TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) { m.impl("sample_dmol", &sample_dmol_autograd); }

}  // namespace vae_fast
