// Reparameterised sampling: vae_fast::sample_gaussian (z = mu + sigma * eps with log q and the KL),
// its backward (eps regenerated from the seed: nothing of size K x B x D saved) and draw_seed (the key
// of a sampling call given none). Schemas in schemas.cpp, autograd in autograd.cpp.
#include "glue/sample_ops.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

#include "core/launch_args.h"
#include "cpu/kernels.h"
#include "glue/checks.h"
#include "glue/cuda_launch.h"

namespace vae_fast {
namespace {

// (run, run_stride) with logical flat element m of `t` at (m / run) * run_stride + m % run (launch_args.h),
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

// check_op's sample_gaussian: a seed value stands in for a missing seed, so nothing is drawn.
void check_sample_gaussian(const std::vector<c10::IValue>& args) {
  TORCH_CHECK(args.size() == 11, "vae_fast.check_op: sample_gaussian takes 11 arguments");
  std::optional<std::vector<double>> clamp;
  if (!args[10].isNone()) clamp = args[10].toDoubleVector();
  const std::optional<at::Tensor> seed = args[2].isNone() ? std::nullopt : std::optional<at::Tensor>(args[2].toTensor());
  SampleProblem p(args[0].toTensor(), args[1].toTensor(), seed, int64_t{0}, args[4].toInt(), args[5].toBool(),
                  args[6].toInt(), clamp ? OptClamp(*clamp) : OptClamp());
}

// One implementation serves both devices: the glue branches on the device inside, after the checks.
TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("sample_gaussian", &sample_gaussian);
  m.impl("sample_gaussian_backward", &sample_gaussian_backward);
  m.impl("draw_seed", &draw_seed_op);
}
TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("sample_gaussian", &sample_gaussian);
  m.impl("sample_gaussian_backward", &sample_gaussian_backward);
  m.impl("draw_seed", &draw_seed_op);
}

}  // namespace vae_fast
