// The row ops of layout.h's OpKind, once for every backend: how many inputs and outputs each has
// and which elbo_math.h formula maps one element's inputs to its outputs. The CPU kernels apply
// them to SIMD vectors, the CUDA kernels to scalars (arrays decay to the pointers taken here).
#pragma once
#include "elbo_math.h"
#include "layout.h"

namespace vae_fast {
VF_ISA_NS_BEGIN

template <OpKind K>
struct RowOp;

// Hoisting. An op whose formula spends its time on a transcendental function of one input only
// (kHoisted; -1: none) splits apply into h = hoist(x[kHoisted]) and apply_hoisted(x, h, y). The CPU
// engines compute h once when that input is the same for every element (a scalar log-variance) or
// for every row (a per-feature one); apply is the two in one step.
struct NoHoist {
  static constexpr int kHoisted = -1;
};
template <int J>
struct HoistInvStdQuarter {  // e4 = e^(-lv/4) of the log-variance x[J] (see elbo::times_inv_std)
  static constexpr int kHoisted = J;
  template <class V>
  static VF_HD V hoist(V lv) { return elbo::inv_std_quarter(lv); }
};

template <>
struct RowOp<OpKind::KlStdFwd> : NoHoist {
  static constexpr int kIn = 2, kOut = 1;
  static constexpr bool kBackward = false;
  template <class V>
  static VF_HD void apply(const V* x, V* y) { y[0] = elbo::kl_std(x[0], x[1]); }
};
template <>
struct RowOp<OpKind::KlFwd> : HoistInvStdQuarter<3> {
  static constexpr int kIn = 4, kOut = 1;
  static constexpr bool kBackward = false;
  template <class V>
  static VF_HD void apply_hoisted(const V* x, V e4, V* y) { y[0] = elbo::kl(x[0], x[1], x[2], x[3], e4); }
  template <class V>
  static VF_HD void apply(const V* x, V* y) { apply_hoisted(x, hoist(x[3]), y); }
};
template <>
struct RowOp<OpKind::GaussLpFwd> : HoistInvStdQuarter<2> {
  static constexpr int kIn = 3, kOut = 1;
  static constexpr bool kBackward = false;
  template <class V>
  static VF_HD void apply_hoisted(const V* x, V e4, V* y) { y[0] = elbo::gaussian_log_prob(x[0], x[1], x[2], e4); }
  template <class V>
  static VF_HD void apply(const V* x, V* y) { apply_hoisted(x, hoist(x[2]), y); }
};
template <>
struct RowOp<OpKind::BernLpFwd> : NoHoist {
  static constexpr int kIn = 2, kOut = 1;
  static constexpr bool kBackward = false;
  template <class V>
  static VF_HD void apply(const V* x, V* y) { y[0] = elbo::bernoulli_log_prob(x[0], x[1]); }
};
// Backward: x[0] is the upstream gradient g, then the forward's inputs; y the gradients in order.
template <>
struct RowOp<OpKind::KlStdBwd> : NoHoist {
  static constexpr int kIn = 3, kOut = 2;
  static constexpr bool kBackward = true;
  template <class V>
  static VF_HD void apply(const V* x, V* y) { elbo::kl_std_grad(x[0], x[1], x[2], y[0], y[1]); }
};
template <>
struct RowOp<OpKind::KlBwd> : HoistInvStdQuarter<4> {
  static constexpr int kIn = 5, kOut = 4;
  static constexpr bool kBackward = true;
  template <class V>
  static VF_HD void apply_hoisted(const V* x, V e4, V* y) {
    elbo::kl_grad(x[0], x[1], x[2], x[3], x[4], e4, y[0], y[1], y[2], y[3]);
  }
  template <class V>
  static VF_HD void apply(const V* x, V* y) { apply_hoisted(x, hoist(x[4]), y); }
};
template <>
struct RowOp<OpKind::GaussLpBwd> : HoistInvStdQuarter<3> {
  static constexpr int kIn = 4, kOut = 3;
  static constexpr bool kBackward = true;
  template <class V>
  static VF_HD void apply_hoisted(const V* x, V e4, V* y) {
    elbo::gaussian_log_prob_grad(x[0], x[1], x[2], x[3], e4, y[0], y[1], y[2]);
  }
  template <class V>
  static VF_HD void apply(const V* x, V* y) { apply_hoisted(x, hoist(x[3]), y); }
};
template <>
struct RowOp<OpKind::BernLpBwd> : NoHoist {
  static constexpr int kIn = 3, kOut = 2;
  static constexpr bool kBackward = true;
  template <class V>
  static VF_HD void apply(const V* x, V* y) { elbo::bernoulli_log_prob_grad(x[0], x[1], x[2], y[0], y[1]); }
};

template <>
struct RowOp<OpKind::GaussNllFwd> : NoHoist {
  static constexpr int kIn = 4, kOut = 1;
  static constexpr bool kBackward = false;
  template <class V>
  static VF_HD void apply(const V* x, V* y) { y[0] = elbo::gaussian_nll(x[0], x[1], x[2], x[3]); }
};
template <>
struct RowOp<OpKind::GaussNllBwd> : NoHoist {
  static constexpr int kIn = 5, kOut = 3;
  static constexpr bool kBackward = true;
  template <class V>
  static VF_HD void apply(const V* x, V* y) { elbo::gaussian_nll_grad(x[0], x[1], x[2], x[3], x[4], y[0], y[1], y[2]); }
};

VF_ISA_NS_END
}  // namespace vae_fast
