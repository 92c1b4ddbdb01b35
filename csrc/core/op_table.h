// The table of the ops: each op's identity, once. Everything else is generated from it:
//  * VF_ROW_KINDS: the row engine's kernel kinds: the OpKind enum (below), the element ops
//    (row_ops.h) and the dispatch switches of the CPU and CUDA engines (cpu/rows.cpp, cuda/rows.cu);
//  * kOps: the schemas (glue/schemas.cpp), the CPU / CUDA / Autograd registrations, the argument checks
//    and check_op (glue/table_ops.cpp, glue/autograd.cpp), and in Python the fake kernels and double
//    backward (vae_fast/ops.py).
// Torch-free (the CUDA kernels include it). docs/architecture.md: how to add an op.
#pragma once
#include <cstdint>

namespace vae_fast {

// X(kind, inputs, outputs, is_backward, hoisted input (-1: none), the element formula).
// The formula reads the inputs x[], writes the outputs y[] and may use h, the hoisted value
// elbo::inv_std_quarter(x[hoisted]) (row_ops.h computes it once per row or per call when that input
// is per row or a scalar). A backward kind's x[0] is the upstream gradient, then the forward's inputs;
// y[] are the inputs' gradients in order.
#define VF_ROW_KINDS(X)                                                                                  \
  X(KlStdFwd, 2, 1, false, -1, y[0] = elbo::kl_std(x[0], x[1]))                                          \
  X(KlStdBwd, 3, 2, true, -1, elbo::kl_std_grad(x[0], x[1], x[2], y[0], y[1]))                           \
  X(KlFwd, 4, 1, false, 3, y[0] = elbo::kl(x[0], x[1], x[2], x[3], h))                                   \
  X(KlBwd, 5, 4, true, 4, elbo::kl_grad(x[0], x[1], x[2], x[3], x[4], h, y[0], y[1], y[2], y[3]))        \
  X(GaussLpFwd, 3, 1, false, 2, y[0] = elbo::gaussian_log_prob(x[0], x[1], x[2], h))                     \
  X(GaussLpBwd, 4, 3, true, 3, elbo::gaussian_log_prob_grad(x[0], x[1], x[2], x[3], h, y[0], y[1], y[2])) \
  X(BernLpFwd, 2, 1, false, -1, y[0] = elbo::bernoulli_log_prob(x[0], x[1]))                             \
  X(BernLpBwd, 3, 2, true, -1, elbo::bernoulli_log_prob_grad(x[0], x[1], x[2], y[0], y[1]))              \
  X(GaussNllFwd, 4, 1, false, -1, y[0] = elbo::gaussian_nll(x[0], x[1], x[2], x[3]))                     \
  X(GaussNllBwd, 5, 3, true, -1, elbo::gaussian_nll_grad(x[0], x[1], x[2], x[3], x[4], y[0], y[1], y[2]))

enum class OpKind : int32_t {
#define VF_KIND_ENUM(kind, ...) kind,
  VF_ROW_KINDS(VF_KIND_ENUM)
#undef VF_KIND_ENUM
};

// How an op's kernels are reached: the row engine (elementwise terms over a broadcast shape, summed
// over trailing event dims), or an op with its own launch.
enum class Family : int8_t { Rows, Dmol };

// One op: vae_fast::<name>(<tensors>, <params>, int event_dims, <clamps>) -> Tensor and its backward
// vae_fast::<name>_backward(Tensor grad, <tensors>, <params>, int event_dims, bool[] needs, <clamps>
// [, int? concat_dim=None]) -> Tensor[] (one gradient per tensor argument, empty where not needed).
// kOps is written with C++20 designated initialisers (each field named, the defaults left out). Only the
// glue (C++20) reads it; the CUDA kernels and the emulated self-test, compiled as C++17, need only
// OpKind and VF_ROW_KINDS above, so they do not see it.
#if __cplusplus >= 202002L
struct OpSpec {
  const char* name = "";
  const char* api = "";      // the Python function users call (named in messages)
  const char* tensors = "";  // schema text; optional tensors (Tensor?) are given together or not at all
  const char* params = "";   // schema text of the arguments before event_dims ("": none); a float one enters
                             // a row kernel as a scalar operand after the tensors
  const char* clamps = "";   // schema text: "float[]? <name>=None" each (launch_args.h's Clamp), after event_dims
  int8_t clamped[2] = {-1, -1};  // the tensor argument each clamp applies to
  int8_t pair = -1;  // the first of two arguments (a mean, a log-variance) whose gradients may come
                     // back as one buffer (the backward's concat_dim); -1: none
  Family family = Family::Rows;
  OpKind fwd{}, bwd{};              // Family::Rows: the row kernels with every tensor argument given
  OpKind fwd_short{}, bwd_short{};  // ... with the optional ones left out
};

inline constexpr OpSpec kOps[] = {
    {.name = "gaussian_kl",
     .api = "gaussian_kl",
     .tensors = "Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar",
     .clamps = "float[]? logvar_clamp=None, float[]? prior_logvar_clamp=None",
     .clamped = {1, 3},
     .pair = 0,
     .fwd = OpKind::KlFwd,
     .bwd = OpKind::KlBwd,
     .fwd_short = OpKind::KlStdFwd,
     .bwd_short = OpKind::KlStdBwd},
    {.name = "gaussian_log_prob",
     .api = "gaussian_log_prob",
     .tensors = "Tensor x, Tensor mean, Tensor logvar",
     .clamps = "float[]? logvar_clamp=None",
     .clamped = {2, -1},
     .pair = 1,
     .fwd = OpKind::GaussLpFwd,
     .bwd = OpKind::GaussLpBwd,
     .fwd_short = OpKind::GaussLpFwd,
     .bwd_short = OpKind::GaussLpBwd},
    {.name = "bernoulli_log_prob",
     .api = "bernoulli_log_prob",
     .tensors = "Tensor x, Tensor logits",
     .fwd = OpKind::BernLpFwd,
     .bwd = OpKind::BernLpBwd,
     .fwd_short = OpKind::BernLpFwd,
     .bwd_short = OpKind::BernLpBwd},
    {.name = "gaussian_nll",
     .api = "gaussian_nll_loss",
     .tensors = "Tensor input, Tensor target, Tensor var",
     .params = "float eps",
     .fwd = OpKind::GaussNllFwd,
     .bwd = OpKind::GaussNllBwd,
     .fwd_short = OpKind::GaussNllFwd,
     .bwd_short = OpKind::GaussNllBwd},
    // layout: 0 channels_first (x (..., C, H, W), params (..., P, H, W)), 1 pixelcnn++ (x (..., H, W, C),
    // params (..., H, W, P)); P = M (1 + 2C + C(C-1)/2). Kernels: glue/dmol_ops.cpp (no row kinds).
    {.name = "dmol_log_prob",
     .api = "discretized_mix_logistic_log_prob",
     .tensors = "Tensor x, Tensor params",
     .params = "int num_bits, int layout",
     .family = Family::Dmol},
};
inline constexpr int kNumOps = sizeof(kOps) / sizeof(kOps[0]);
#endif  // C++20

}  // namespace vae_fast
