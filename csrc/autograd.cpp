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
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"

namespace vae_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

bool any_requires_grad(std::initializer_list<Tensor> ts) {
  for (const auto& t : ts)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// Raises for what this autograd cannot do, instead of returning a tangent of zeros.
void check_ad_mode(const char* op, std::initializer_list<Tensor> ts) {
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

// ---- row ops: KL, Gaussian and Bernoulli log-likelihoods, the Gaussian NLL loss -----------------
enum class RowOpId : int64_t { Kl, GaussLp, BernLp, GaussNll };

struct RowCall {  // a row op's non-tensor arguments
  RowOpId id;
  int64_t event_dims;
  double eps;                                  // GaussNll only
  std::vector<double> clamp = {}, prior_clamp = {};  // Kl and GaussLp: logvar_clamp; Kl: prior_logvar_clamp
};

Tensor row_forward(const RowCall& c, const Tensor& a, const Tensor& b, const Tensor& x, const Tensor& y) {
  switch (c.id) {
    case RowOpId::Kl: {
      static auto op = handle<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     const std::optional<Tensor>&, int64_t, OptClamp, OptClamp)>("vae_fast::gaussian_kl");
      return op.call(a, b, opt(x), opt(y), c.event_dims, clamp_arg(c.clamp), clamp_arg(c.prior_clamp));
    }
    case RowOpId::GaussLp: {
      static auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, OptClamp)>(
          "vae_fast::gaussian_log_prob");
      return op.call(a, b, x, c.event_dims, clamp_arg(c.clamp));
    }
    case RowOpId::BernLp: {
      static auto op = handle<Tensor(const Tensor&, const Tensor&, int64_t)>("vae_fast::bernoulli_log_prob");
      return op.call(a, b, c.event_dims);
    }
    case RowOpId::GaussNll: {
      static auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&, double, int64_t)>("vae_fast::gaussian_nll");
      return op.call(a, b, x, c.eps, c.event_dims);
    }
  }
  TORCH_CHECK(false, "vae_fast: unknown row op");
}

std::vector<Tensor> row_backward(const RowCall& c, const Tensor& g, const Tensor& a, const Tensor& b, const Tensor& x,
                                 const Tensor& y, const c10::List<bool>& needs, std::optional<int64_t> concat_dim) {
  using List = c10::List<bool>;
  using OptInt = std::optional<int64_t>;
  switch (c.id) {
    case RowOpId::Kl: {
      static auto op = handle<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                  const std::optional<Tensor>&, int64_t, List, OptClamp, OptClamp, OptInt)>(
          "vae_fast::gaussian_kl_backward");
      return op.call(g, a, b, opt(x), opt(y), c.event_dims, needs, clamp_arg(c.clamp), clamp_arg(c.prior_clamp),
                     concat_dim);
    }
    case RowOpId::GaussLp: {
      static auto op = handle<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, List,
                                                  OptClamp, OptInt)>("vae_fast::gaussian_log_prob_backward");
      return op.call(g, a, b, x, c.event_dims, needs, clamp_arg(c.clamp), concat_dim);
    }
    case RowOpId::BernLp: {
      static auto op = handle<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, List)>(
          "vae_fast::bernoulli_log_prob_backward");
      return op.call(g, a, b, c.event_dims, needs);
    }
    case RowOpId::GaussNll: {
      static auto op = handle<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                                  int64_t, List)>("vae_fast::gaussian_nll_backward");
      return op.call(g, a, b, x, c.eps, c.event_dims, needs);
    }
  }
  TORCH_CHECK(false, "vae_fast: unknown row op");
}

struct RowFn : public torch::autograd::Function<RowFn> {
  // a, b, x, y: the op's tensor arguments in schema order (undefined where absent).
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, const std::optional<Tensor>& x,
                        const std::optional<Tensor>& y, RowCall call) {
    ctx->save_for_backward({a, b, x.value_or(Tensor()), y.value_or(Tensor())});
    ctx->saved_data["id"] = static_cast<int64_t>(call.id);
    ctx->saved_data["event_dims"] = call.event_dims;
    ctx->saved_data["eps"] = call.eps;
    ctx->saved_data["clamp"] = clamp_to_ivalue(call.clamp);
    ctx->saved_data["prior_clamp"] = clamp_to_ivalue(call.prior_clamp);
    return row_forward(call, a, b, x.value_or(Tensor()), y.value_or(Tensor()));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const RowCall call{static_cast<RowOpId>(ctx->saved_data["id"].toInt()), ctx->saved_data["event_dims"].toInt(),
                       ctx->saved_data["eps"].toDouble(), clamp_from_ivalue(ctx->saved_data["clamp"]),
                       clamp_from_ivalue(ctx->saved_data["prior_clamp"])};
    c10::List<bool> needs;
    bool any = false;
    for (size_t i = 0, edge = 0; i < 4; ++i) {  // needs_input_grad counts the tensor arguments given
      needs.push_back(saved[i].defined() && ctx->needs_input_grad(edge));
      edge += saved[i].defined();
      any |= needs.get(i);
    }
    variable_list out(5);
    if (!any) return out;
    // The (mean, logvar) pair: halves of one tensor get their gradients in one buffer.
    const int pair = call.id == RowOpId::Kl ? 0 : call.id == RowOpId::GaussLp ? 1 : -1;
    std::optional<int64_t> concat;
    if (pair >= 0 && needs.get(static_cast<size_t>(pair)) && needs.get(static_cast<size_t>(pair) + 1)) concat = halves_dim(saved[pair], saved[pair + 1]);
    BackwardMode mode;
    auto g = row_backward(call, grads[0], saved[0], saved[1], saved[2], saved[3], needs, concat);
    if (concat) split_halves(g[pair], *concat, g[pair], g[pair + 1]);
    for (size_t i = 0; i < 4 && i < g.size(); ++i)
      if (needs.get(i)) out[i] = g[i];
    return out;
  }
};

Tensor row_autograd(const char* name, const RowCall& call, const Tensor& a, const Tensor& b, const Tensor& x,
                    const Tensor& y) {
  check_ad_mode(name, {a, b, x, y});
  if (!at::GradMode::is_enabled() || !any_requires_grad({a, b, x, y})) {
    at::AutoDispatchBelowADInplaceOrView below;  // nothing to record: no node, no saved tensors
    return row_forward(call, a, b, x, y);
  }
  return RowFn::apply(a, b, opt(x), opt(y), call);
}

Tensor gaussian_kl_autograd(const Tensor& mu, const Tensor& logvar, const std::optional<Tensor>& pmu,
                            const std::optional<Tensor>& plogvar, int64_t event_dims, OptClamp logvar_clamp,
                            OptClamp prior_logvar_clamp) {
  return row_autograd("gaussian_kl",
                      {RowOpId::Kl, event_dims, 0.0, clamp_saved(logvar_clamp), clamp_saved(prior_logvar_clamp)}, mu,
                      logvar, pmu.value_or(Tensor()), plogvar.value_or(Tensor()));
}

Tensor gaussian_log_prob_autograd(const Tensor& x, const Tensor& mean, const Tensor& logvar, int64_t event_dims,
                                  OptClamp logvar_clamp) {
  return row_autograd("gaussian_log_prob", {RowOpId::GaussLp, event_dims, 0.0, clamp_saved(logvar_clamp)}, x, mean,
                      logvar, Tensor());
}

Tensor bernoulli_log_prob_autograd(const Tensor& x, const Tensor& logits, int64_t event_dims) {
  return row_autograd("bernoulli_log_prob", {RowOpId::BernLp, event_dims, 0.0}, x, logits, Tensor(), Tensor());
}

Tensor gaussian_nll_autograd(const Tensor& input, const Tensor& target, const Tensor& var, double eps,
                             int64_t event_dims) {
  return row_autograd("gaussian_nll_loss", {RowOpId::GaussNll, event_dims, eps}, input, target, var, Tensor());
}

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
    if (!c.want_log_q) ctx->mark_non_differentiable({log_q});
    if (!c.want_kl) ctx->mark_non_differentiable({kl});
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
  // The key is fixed here, before the forward, so that the backward regenerates the same eps.
  // Not while tracing (fake tensors carry the Python key): a key drawn then would be baked into the graph;
  // vae_fast/ops.py passes a draw_seed tensor under torch.compile instead.
  if (!seed_t.defined() && !seed_value && !mu.is_meta() && !mu.key_set().has(c10::DispatchKey::Python))
    draw_seed(mu.device(), seed_t, seed_value);
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
  m.impl("gaussian_kl", &gaussian_kl_autograd);
  m.impl("gaussian_log_prob", &gaussian_log_prob_autograd);
  m.impl("bernoulli_log_prob", &bernoulli_log_prob_autograd);
  m.impl("gaussian_nll", &gaussian_nll_autograd);
  m.impl("sample_gaussian", &sample_gaussian_autograd);
}

}  // namespace vae_fast
