// The element ops of op_table.h's row kinds, once for every backend: how many inputs and outputs each has
// and which elbo_math.h formula maps one element's inputs to its outputs. The CPU kernels apply
// them to SIMD vectors, the CUDA kernels to scalars (arrays decay to the pointers taken here).
#pragma once
#include "core/elbo_math.h"
#include "core/launch_args.h"
#include "core/op_table.h"

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
  template <class V>
  static VF_HD V hoist(V lv) { return lv; }  // never called (apply's if constexpr)
};
template <int J>
struct HoistInvStdQuarter {  // e4 = e^(-lv/4) of the log-variance x[J] (see elbo::times_inv_std)
  static constexpr int kHoisted = J;
  template <class V>
  static VF_HD V hoist(V lv) { return elbo::inv_std_quarter(lv); }
};

// The element op of each kind of op_table.h's VF_ROW_KINDS.
template <int J>
struct Hoist : HoistInvStdQuarter<J> {};
template <>
struct Hoist<-1> : NoHoist {};

#define VF_ROW_OP(KIND, IN, OUT, BACKWARD, HOISTED, FORMULA)                        \
  template <>                                                                        \
  struct RowOp<OpKind::KIND> : Hoist<HOISTED> {                                      \
    static constexpr int kIn = IN, kOut = OUT;                                       \
    static constexpr bool kBackward = BACKWARD;                                      \
    template <class V>                                                               \
    static VF_HD void apply_hoisted(const V* x, [[maybe_unused]] V h, V* y) {        \
      FORMULA;                                                                       \
    }                                                                                \
    template <class V>                                                               \
    static VF_HD void apply(const V* x, V* y) {                                      \
      if constexpr (HOISTED >= 0) apply_hoisted(x, Hoist<HOISTED>::hoist(x[HOISTED < 0 ? 0 : HOISTED]), y); \
      else apply_hoisted(x, V(), y);                                                 \
    }                                                                                \
  };
VF_ROW_KINDS(VF_ROW_OP)
#undef VF_ROW_OP

VF_ISA_NS_END
}  // namespace vae_fast
