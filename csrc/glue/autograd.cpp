// The ops' autograd, at the Autograd dispatch key: what each forward saves and which fused backward
// kernel runs. In C++ so that a call at training-loop sizes pays no Python (a Python autograd
// formula costs ~13 us a forward and ~8 us a backward, more than the kernels at 128 x 20).
//
// A first-order backward calls the backward op below autograd (no graph, no Python). With
// create_graph=True it goes through the backward op's own autograd (composite formulas in
// vae_fast/ops.py), so double backward works for every op.
//
// Forward-mode AD and torch.func transforms (vmap, grad, jvp) raise a RuntimeError naming the op:
// never a silently zero tangent.
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "glue/checks.h"
#include "glue/sample_ops.h"
#include "glue/table_ops.h"

namespace vae_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

bool any_requires_grad(c10::ArrayRef<Tensor> ts) {
  for (const auto& t : ts)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// Raises for what this autograd cannot do, instead of returning a tangent of zeros.
void check_ad_mode(const char* op, c10::ArrayRef<Tensor> ts) {
  bool in_transform = false;  // inside vmap / grad / jvp: functorch's own check says so (its layer stack)
  if (const auto& tls = at::functorch::functorchTLSAccessor()) {
    try {
      tls->checkSupportsCppAutogradFunction();
    } catch (const c10::Error&) {
      in_transform = true;
    }
  }
  TORCH_CHECK(!in_transform, "vae_fast.", op,
              ": torch.func transforms (vmap, grad, vjp, jvp, jacrev, jacfwd) are not supported: the op's autograd "
              "is a C++ function. Use torch.autograd.grad / .backward(), or loop over the batch.");
  for (const auto& t : ts)
    TORCH_CHECK(!(t.defined() && t._fw_grad(/*level=*/0).defined()), "vae_fast.", op,
                ": forward-mode AD (torch.autograd.forward_ad, jvp) is not supported; use reverse mode "
                "(torch.autograd.grad / .backward()).");
}

// A clamp argument as saved (empty: none) and as passed to an op.
OptClamp clamp_arg(const std::vector<double>& c) { return c.empty() ? OptClamp() : OptClamp(c); }
std::vector<double> clamp_saved(const OptClamp& c) { return c ? c->vec() : std::vector<double>(); }
// In an autograd node's saved_data: None when there is no clamp (no list allocated on the common path).
c10::IValue clamp_to_ivalue(const std::vector<double>& c) { return c.empty() ? c10::IValue() : c10::IValue(c); }
std::vector<double> clamp_from_ivalue(const c10::IValue& v) {
  return v.isNone() ? std::vector<double>() : v.toDoubleVector();
}

// The dim along which `b` follows `a` in memory when the two are the halves of one tensor (one storage, one
// shape and one set of strides, b starting where a ends along that dim): a backward then writes both
// gradients into one buffer (the ops' concat_dim), which DiagonalGaussianDistribution hands on as the
// parameters' gradient with no cat. First-order backward only (create_graph keeps the plain gradients).
std::optional<int64_t> halves_dim(const Tensor& a, const Tensor& b) {
  if (at::GradMode::is_enabled() || !a.is_alias_of(b) || a.sizes() != b.sizes() ||
      a.strides() != b.strides() || a.scalar_type() != b.scalar_type())
    return std::nullopt;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 0 && b.storage_offset() - a.storage_offset() == a.size(d) * a.stride(d)) return d;
  return std::nullopt;
}

// The two gradients of a backward that ran with concat_dim, as views of its one buffer.
void split_halves(Tensor joint, int64_t dim, Tensor& first, Tensor& second) {  // joint by value: may be `first`
  const int64_t h = joint.size(dim) / 2;
  first = joint.narrow(dim, 0, h);
  second = joint.narrow(dim, h, h);
}

// A backward that runs below autograd unless the caller builds a graph of it (create_graph=True).
struct BackwardMode {
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  BackwardMode() {
    if (!at::GradMode::is_enabled()) below.emplace();
  }
};

// ---- the table's ops (op_table.h): one boxed kernel for all -------------------------------------
// A node of a table op: saves its tensor arguments (nothing of the output's size) and its other
// arguments; backward calls vae_fast::<name>_backward with them.
struct TableFn : public torch::autograd::Function<TableFn> {
  // tensors: the op's tensor arguments given, in schema order (the optional ones, last, are given together
  // or not at all; a TensorList, so that each is an input of the node); rest: the other arguments.
  static Tensor forward(AutogradContext* ctx, at::TensorList tensors, int64_t index, c10::impl::GenericList rest,
                        const c10::OperatorHandle& op) {
    ctx->save_for_backward(tensors.vec());
    ctx->saved_data["index"] = index;
    ctx->saved_data["rest"] = rest;
    torch::jit::Stack stack(tensors.begin(), tensors.end());
    stack.resize(op_info(static_cast<int>(index)).n_tensors);  // None for the ones not given
    for (const auto& v : rest) stack.push_back(v);
    op.callBoxed(stack);
    return stack.back().toTensor();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int index = static_cast<int>(ctx->saved_data["index"].toInt());
    const OpInfo& info = op_info(index);
    const auto rest = ctx->saved_data["rest"].toList();
    c10::List<bool> needs;
    bool any = false;
    const int given = static_cast<int>(saved.size());
    for (int i = 0; i < given; ++i) {
      needs.push_back(ctx->needs_input_grad(i));
      any |= needs.get(i);
    }
    variable_list out(given + 3);  // one per forward argument
    if (!any) return out;
    // The (mean, logvar) pair: halves of one tensor get their gradients in one buffer.
    const int pair = info.spec->pair;
    std::optional<int64_t> concat;
    if (pair >= 0 && pair + 1 < given && needs.get(pair) && needs.get(pair + 1)) concat = halves_dim(saved[pair], saved[pair + 1]);
    torch::jit::Stack stack{grads[0]};
    for (int i = 0; i < info.n_tensors; ++i) stack.emplace_back(i < given ? c10::IValue(saved[i]) : c10::IValue());
    const size_t event_dims_at = info.param_names.size();  // rest: params, event_dims, clamps
    for (size_t j = 0; j < rest.size(); ++j) {
      stack.push_back(rest.get(j));
      if (j == event_dims_at) stack.emplace_back(needs);
    }
    if (pair >= 0) stack.emplace_back(concat ? c10::IValue(*concat) : c10::IValue());
    BackwardMode mode;
    backward_handle(index).callBoxed(stack);
    auto g = stack.back().toTensorVector();
    if (concat) split_halves(g[pair], *concat, g[pair], g[pair + 1]);
    for (int i = 0; i < given; ++i)
      if (needs.get(i)) out[i] = g[i];
    return out;
  }

  static const c10::OperatorHandle& backward_handle(int index) {
    static const std::vector<c10::OperatorHandle> handles = [] {
      std::vector<c10::OperatorHandle> h;
      for (const OpSpec& s : kOps)
        h.push_back(c10::Dispatcher::singleton().findSchemaOrThrow(
            (std::string("vae_fast::") + s.name + "_backward").c_str(), ""));
      return h;
    }();
    return handles[index];
  }
};

struct TableAutograd final : c10::OperatorKernel {
  explicit TableAutograd(int index) : index(index) {}
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
    const OpInfo& info = op_info(index);
    auto args = torch::jit::last(*stack, info.n_fwd_args);
    variable_list tensors;  // the given ones (optional tensors come last)
    for (int i = 0; i < info.n_tensors && !args[i].isNone(); ++i) tensors.push_back(args[i].toTensor());
    check_ad_mode(info.spec->api, tensors);
    if (!at::GradMode::is_enabled() || !any_requires_grad(tensors)) {
      at::AutoDispatchBelowADInplaceOrView below;  // nothing to record: no node, no saved tensors
      op.callBoxed(stack);
      return;
    }
    c10::impl::GenericList rest(c10::AnyType::get());
    for (size_t j = info.n_tensors; j < args.size(); ++j) rest.push_back(args[j]);
    torch::jit::drop(*stack, info.n_fwd_args);
    stack->emplace_back(TableFn::apply(at::TensorList(tensors), static_cast<int64_t>(index), rest, op));
  }
  int index;
};

// ---- reparameterised sampling --------------------------------------------------------------------
struct SampleCall {
  std::optional<int64_t> seed_value;
  int64_t num_samples, event_dims;
  bool sample_dim, want_log_q, want_kl, log_q_path_only;
  std::vector<double> clamp;  // logvar_clamp (empty: none)
};

using SampleSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                      std::optional<int64_t>, int64_t, bool, int64_t, bool, bool, bool,
                                                      OptClamp);

std::tuple<Tensor, Tensor, Tensor> sample_call(const SampleCall& c, const Tensor& mu, const Tensor& logvar,
                                               const Tensor& seed) {
  static auto op = handle<SampleSig>("vae_fast::sample_gaussian");
  return op.call(mu, logvar, opt(seed), c.seed_value, c.num_samples, c.sample_dim, c.event_dims, c.want_log_q,
                 c.want_kl, c.log_q_path_only, clamp_arg(c.clamp));
}

struct SampleFn : public torch::autograd::Function<SampleFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar,
                               const std::optional<Tensor>& seed_opt, SampleCall c) {
    // Nothing of size K x B x D is saved: the backward regenerates eps from the seed.
    const Tensor seed = seed_opt.value_or(Tensor());
    ctx->save_for_backward({mu, logvar, seed});
    ctx->saved_data["seed_value"] = c.seed_value ? c10::IValue(*c.seed_value) : c10::IValue();
    ctx->saved_data["num_samples"] = c.num_samples;
    ctx->saved_data["event_dims"] = c.event_dims;
    ctx->saved_data["flags"] = static_cast<int64_t>(c.sample_dim | c.want_log_q << 1 | c.want_kl << 2 |
                                                    c.log_q_path_only << 3);
    ctx->saved_data["clamp"] = clamp_to_ivalue(c.clamp);
    ctx->set_materialize_grads(false);
    auto [z, log_q, kl] = sample_call(c, mu, logvar, seed);
    // An output not asked for is an empty (0,) tensor that no caller uses; it is not marked non-differentiable:
    // compiled autograd (torch._dynamo) refuses a C++ node with non-differentiable outputs.
    return {z, log_q, kl};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &mu = saved[0], &logvar = saved[1], &seed = saved[2];
    const auto sv = ctx->saved_data["seed_value"];
    const std::optional<int64_t> seed_value = sv.isNone() ? std::nullopt : std::optional<int64_t>(sv.toInt());
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool sample_dim = flags & 1, want_log_q = flags & 2, want_kl = flags & 4, path_only = flags & 8;
    const int64_t num_samples = ctx->saved_data["num_samples"].toInt(), event_dims = ctx->saved_data["event_dims"].toInt();
    const Tensor& gz = grads[0];
    const Tensor glq = want_log_q ? grads[1] : Tensor(), gkl = want_kl ? grads[2] : Tensor();
    bool need_mu = ctx->needs_input_grad(0), need_logvar = ctx->needs_input_grad(1);
    const std::vector<double> clamp = clamp_from_ivalue(ctx->saved_data["clamp"]);
    variable_list out(4);
    // Halves of one tensor: both gradients written into one buffer (dmu too, rather than g itself).
    const std::optional<int64_t> concat = need_mu && need_logvar ? halves_dim(mu, logvar) : std::nullopt;
    if (!concat && need_mu && gz.defined() && !glq.defined() && !gkl.defined() && !sample_dim) {
      out[0] = gz;  // dz/dmu = 1: the gradient is g itself, no kernel
      need_mu = false;
    }
    if (need_mu || need_logvar) {
      static auto op = handle<std::tuple<Tensor, Tensor>(
          const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
          const Tensor&, const std::optional<Tensor>&, std::optional<int64_t>, int64_t, bool, int64_t, bool, bool, bool,
          OptClamp, std::optional<int64_t>)>("vae_fast::sample_gaussian_backward");
      BackwardMode mode;
      auto [dmu, dlogvar] = op.call(opt(gz), opt(glq), opt(gkl), mu, logvar, opt(seed), seed_value, num_samples,
                                    sample_dim, event_dims, path_only, need_mu, need_logvar, clamp_arg(clamp), concat);
      if (concat) split_halves(dmu, *concat, dmu, dlogvar);
      if (need_mu) out[0] = dmu;
      if (need_logvar) out[1] = dlogvar;
    }
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> sample_gaussian_autograd(const Tensor& mu, const Tensor& logvar,
                                                            const std::optional<Tensor>& seed,
                                                            std::optional<int64_t> seed_value, int64_t num_samples,
                                                            bool sample_dim, int64_t event_dims, bool want_log_q,
                                                            bool want_kl, bool log_q_path_only, OptClamp logvar_clamp) {
  check_ad_mode("reparameterize", {mu, logvar});
  Tensor seed_t = seed.value_or(Tensor());
  draw_seed_if_none(mu, seed_t, seed_value);  // fixed before the forward: the backward regenerates eps
  const SampleCall c{seed_value, num_samples, event_dims, sample_dim, want_log_q, want_kl, log_q_path_only,
                     clamp_saved(logvar_clamp)};
  if (!at::GradMode::is_enabled() || !any_requires_grad({mu, logvar})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return sample_call(c, mu, logvar, seed_t);
  }
  auto out = SampleFn::apply(mu, logvar, opt(seed_t), c);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) {
  for (int i = 0; i < kNumOps; ++i)
    m.impl(kOps[i].name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<TableAutograd>(i)));
  m.impl("sample_gaussian", &sample_gaussian_autograd);
}

}  // namespace vae_fast
