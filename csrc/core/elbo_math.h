// Every formula of the VAE objective, once. Inline templates over a value type V: float, double,
// at::vec::Vectorized<float/double> (CPU SIMD) and CUDA float/double. A backend that adds a value
// type declares its overloads of the vmath functions (exp, log, half_expm1_minus_x, scaled_half_expm1,
// log1p_exp_neg, log1p_unit, expm1, floor, abs, max, min, sqrt, sincospi, inf_or, zero_where_zero, clamp_min,
// where_lt, where_gt, where_eq)
// in namespace vae_fast::vmath *before* including this header (qualified calls bind at definition).
//
// Numerics (each formula is right wherever the maths is finite; none forms 0 * inf):
//  * KL terms use expm1(d) - d, never exp(d) - d - 1: the latter rounds below zero in float32 for
//    small |d|, the former is >= 0 for every d, so each per-element KL term is >= 0.
//  * (x - m)^2 / v is formed as s * s with s = (x - m) * e^(-lv/2) = ((x - m) * e^(-lv/4)) * e^(-lv/4),
//    and x == m gives 0 for any lv (zero_where_zero: never 0 * inf = NaN, e.g. lv = -89 in float32).
//  * No intermediate overflows where the result is finite, up to the type's largest value: halves are
//    taken before squares and sums (0.5 * s^2 as (0.5 * s) * s), e^x above kHalveExpAbove is formed as
//    e^(x/2) * e^(x/2), and an upstream gradient g is multiplied in before the large factors, so
//    g * 0.5 * e^lv stays finite for a small g where e^lv alone would not.
//  * Infinite log-variances give the maths' limits, not inf - inf: KL with lv = +inf or a prior
//    lv = -inf is +inf; log N(x; m, e^-inf) is -inf for x != m (+inf at x == m).
//  * Bernoulli uses x * l - softplus(l), written as (x - 1) * max(l, 0) + x * min(l, 0)
//    - log1p(exp(-|l|)) with each product 0 when its data factor is 0: finite for any finite l,
//    and l = +-inf gives -inf or 0 as the maths does (x = 0, l = +inf: -inf; x = 0, l = -inf: 0).
//    Never log(sigmoid(l)). x outside [0, 1] gives NaN (data off the support, never a number).
//  * The Gaussian NLL loss clamps var with clamp_min (NaN stays NaN, as torch.clamp), never fmax.
#pragma once
#include <cmath>

#include "core/elbo_constants.h"
#include "core/isa.h"

#if defined(__CUDACC__)
#define VF_HD __host__ __device__ __forceinline__
#else
#define VF_HD inline
#endif

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace vmath {
VF_HD float exp(float x) { return ::expf(x); }
VF_HD float log(float x) { return ::logf(x); }
VF_HD float log1p(float x) { return ::log1pf(x); }
VF_HD float abs(float x) { return ::fabsf(x); }
VF_HD float max(float a, float b) { return ::fmaxf(a, b); }
VF_HD double exp(double x) { return ::exp(x); }
VF_HD double log(double x) { return ::log(x); }
VF_HD double log1p(double x) { return ::log1p(x); }
VF_HD double abs(double x) { return ::fabs(x); }
VF_HD double max(double a, double b) { return ::fmax(a, b); }
VF_HD float min(float a, float b) { return ::fminf(a, b); }
VF_HD double min(double a, double b) { return ::fmin(a, b); }
VF_HD float sqrt(float x) { return ::sqrtf(x); }
VF_HD double sqrt(double x) { return ::sqrt(x); }
// v where a != 0, else 0 (a product whose data factor is exactly 0 is 0, even against inf).
VF_HD float zero_where_zero(float a, float v) { return a == 0.0f ? 0.0f : v; }
VF_HD double zero_where_zero(double a, double v) { return a == 0.0 ? 0.0 : v; }
// max(x, lo) that keeps a NaN x (torch.clamp(min=lo)); fmax would turn it into lo.
VF_HD float clamp_min(float x, float lo) { return x < lo ? lo : x; }
VF_HD double clamp_min(double x, double lo) { return x < lo ? lo : x; }
// log1p(exp(-a)) for a >= 0: softplus(l) - max(l, 0) at a = |l|.
VF_HD float log1p_exp_neg(float a) { return ::log1pf(::expf(-a)); }
VF_HD double log1p_exp_neg(double a) { return ::log1p(::exp(-a)); }
// q where q is +inf, else v: an infinite term that dominates a sum it would meet -inf in.
VF_HD float inf_or(float q, float v) { return q == INFINITY ? q : v; }
VF_HD double inf_or(double q, double v) { return q == static_cast<double>(INFINITY) ? q : v; }
// 0.5 * (expm1(x) - x), the KL's log-variance term: >= 0 for every x (expm1 is rounded monotonically;
// never exp(x) - 1 - x near 0), finite wherever the result is.
VF_HD float half_expm1_minus_x(float x) {
  if (!(x > ::vae_fast::elbo::kHalveExpAbove)) return 0.5f * (::expm1f(x) - x);
  const float e = ::expf(0.5f * x);
  return (0.5f * e) * e - 0.5f * (1.0f + ::fminf(x, ::vae_fast::elbo::kLinearCap));
}
VF_HD double half_expm1_minus_x(double x) {
  if (!(x > ::vae_fast::elbo::kHalveExpAbove)) return 0.5 * (::expm1(x) - x);
  const double e = ::exp(0.5 * x);
  return (0.5 * e) * e - 0.5 * (1.0 + ::fmin(x, double{::vae_fast::elbo::kLinearCap}));
}
// g * 0.5 * expm1(x) (the KL's log-variance gradient), finite wherever the result is.
VF_HD float scaled_half_expm1(float g, float x) {
  if (!(x > ::vae_fast::elbo::kHalveExpAbove)) return g * 0.5f * ::expm1f(x);
  const float e = ::expf(0.5f * x);
  return (g * 0.5f * e) * e - 0.5f * g;
}
VF_HD double scaled_half_expm1(double g, double x) {
  if (!(x > ::vae_fast::elbo::kHalveExpAbove)) return g * 0.5 * ::expm1(x);
  const double e = ::exp(0.5 * x);
  return (g * 0.5 * e) * e - 0.5 * g;
}
VF_HD float expm1(float x) { return ::expm1f(x); }
VF_HD float floor(float x) { return ::floorf(x); }
// log1p(t) for t in [-1/2, 1] (the vector backends use a short series there, cheaper than a general log1p).
VF_HD float log1p_unit(float t) { return ::log1pf(t); }
VF_HD double log1p_unit(double t) { return ::log1p(t); }
VF_HD double floor(double x) { return ::floor(x); }
VF_HD double expm1(double x) { return ::expm1(x); }
// a < b ? x : y and a > b ? x : y (the vector backends blend lanes; scalars choose).
VF_HD float where_lt(float a, float b, float x, float y) { return a < b ? x : y; }
VF_HD double where_lt(double a, double b, double x, double y) { return a < b ? x : y; }
VF_HD float where_gt(float a, float b, float x, float y) { return a > b ? x : y; }
VF_HD double where_gt(double a, double b, double x, double y) { return a > b ? x : y; }
VF_HD float where_eq(float a, float b, float x, float y) { return a == b ? x : y; }
VF_HD double where_eq(double a, double b, double x, double y) { return a == b ? x : y; }
// sin(pi x) and cos(pi x): CUDA's sincospif (a few instructions: the argument needs no reduction by
// an inexact pi); on the host, in double and rounded once (the CPU SIMD backend has Sleef's).
VF_HD void sincospi(float x, float& s, float& c) {
#if defined(__CUDA_ARCH__)
  ::sincospif(x, &s, &c);
#else
  elbo::host_sincospi(x, s, c);
#endif
}
}  // namespace vmath

namespace elbo {
constexpr double kLog2Pi = 1.8378770664093453;  // log(2 pi)

// ---- KL(N(mu, e^lv) || N(0, 1)) per element, and its gradient --------------------------------
template <class V>
VF_HD V kl_std(V mu, V lv) {
  return (V(0.5f) * mu) * mu + vmath::half_expm1_minus_x(lv);
}
template <class V>
VF_HD void kl_std_grad(V g, V mu, V lv, V& dmu, V& dlv) {
  dmu = g * mu;
  dlv = vmath::scaled_half_expm1(g, lv);
}

// ---- a * e^(-lv/2), the data scaled by the inverse standard deviation ---------------------
// e4 = e^(-lv/4), applied twice so the product overflows only where the result does; exactly 0
// when a == 0 (x == m) whatever lv.
template <class V>
VF_HD V inv_std_quarter(V lv) {
  return vmath::exp(V(-0.25f) * lv);
}
template <class V>
VF_HD V times_inv_std(V a, V e4) {
  return vmath::zero_where_zero(a, (a * e4) * e4);
}

// ---- KL(N(m1, e^lv1) || N(m2, e^lv2)) per element, and its gradient ---------------------------
// = 0.5 * (lv2 - lv1 + (e^lv1 + (m1 - m2)^2) / e^lv2 - 1) = 0.5 * (expm1(d) - d + s^2),
// d = lv1 - lv2, s = (m1 - m2) e^(-lv2/2).
// The forms taking e4 = inv_std_quarter(lv2) let a caller compute it once for a broadcast lv2.
template <class V>
VF_HD V kl(V m1, V lv1, V m2, V lv2, V e4) {
  V s = times_inv_std(m1 - m2, e4);
  return vmath::half_expm1_minus_x(lv1 - lv2) + (V(0.5f) * s) * s;
}
template <class V>
VF_HD void kl_grad(V g, V m1, V lv1, V m2, V lv2, V e4, V& dm1, V& dlv1, V& dm2, V& dlv2) {
  V s = times_inv_std(m1 - m2, e4);
  dm1 = times_inv_std(g * s, e4);  // g (m1 - m2) / v2
  dm2 = V(0.0f) - dm1;
  dlv1 = vmath::scaled_half_expm1(g, lv1 - lv2);
  dlv2 = V(0.0f) - dlv1 - (V(0.5f) * g * s) * s;  // -g/2 (expm1(d) + s^2)
}

// ---- log N(x; m, e^lv) per element, and its gradient ------------------------------------------
// The forms taking e4 = inv_std_quarter(lv) let a caller compute it once for a broadcast lv.
template <class V>
VF_HD V gaussian_log_prob(V x, V m, V lv, V e4) {
  V s = times_inv_std(x - m, e4);
  V half_s2 = (V(0.5f) * s) * s;
  return V(-0.5 * kLog2Pi) - vmath::inf_or(half_s2, V(0.5f) * lv + half_s2);
}
template <class V>
VF_HD void gaussian_log_prob_grad(V g, V x, V m, V lv, V e4, V& dx, V& dm, V& dlv) {
  V s = times_inv_std(x - m, e4);
  V half_g = V(0.5f) * g;
  dm = times_inv_std(g * s, e4);  // g (x - m) / v
  dx = V(0.0f) - dm;
  dlv = (half_g * s) * s - half_g;  // g/2 (s^2 - 1)
}

// ---- F.gaussian_nll_loss's per-element term, and its gradient ---------------------------------
// 0.5 * (log vc + (x - t)^2 / vc), vc = clamp_min(v, eps); the gradient passes straight through the
// clamp (torch clamps var under no_grad): d/dv = 0.5 * (1 / vc - (x - t)^2 / vc^2).
// No intermediate overflows where the result is finite: 0.5 (x - t)^2 / vc = (0.5 s) s with
// s = (x - t) / sqrt(vc) (neither (x - t) / vc nor (x - t)^2 overflows or underflows early).
// (x - t) / r, finite wherever the quotient is: from d = x - t, or where d overflowed (x and t near the
// largest value, opposite signs) as 2 (x/2 - t/2) / r (not always: halving a subnormal rounds it).
template <class V>
VF_HD V nll_diff_over(V x, V t, V r) {
  const V d = x - t;
  return vmath::where_eq(vmath::abs(d), V(INFINITY), V(2.0f) * ((V(0.5f) * x - V(0.5f) * t) / r), d / r);
}
template <class V>
VF_HD V gaussian_nll(V x, V t, V v, V eps) {
  V vc = vmath::clamp_min(v, eps);
  const V s = nll_diff_over(x, t, vmath::sqrt(vc));
  return V(0.5f) * vmath::log(vc) + (V(0.5f) * s) * s;
}
template <class V>
VF_HD void gaussian_nll_grad(V g, V x, V t, V v, V eps, V& dx, V& dt, V& dv) {
  V vc = vmath::clamp_min(v, eps);
  V scaled = nll_diff_over(x, t, vc);  // (x - t) / vc
  V half_g = V(0.5f) * g;
  dx = g * scaled;
  dt = V(0.0f) - dx;
  dv = half_g / vc - (half_g * scaled) * scaled;  // g/2 (1 / vc - (x - t)^2 / vc^2)
}

// ---- log Bernoulli(x; sigmoid(l)) per element, and its gradient -------------------------------
// x * l - softplus(l) = (x - 1) * max(l, 0) + x * min(l, 0) - log1p(exp(-|l|)).
// x outside [0, 1] (infinities included) is off the support: NaN (ops.h: the CPU glue then raises), from
// the sign of x (x - 1) (exact: > 0 just where x < 0 or x > 1). The check comes first and replaces x, so
// nothing more stays live (the 16-bit CUDA forward spilled when the NaN was chosen at the end).
template <class V>
VF_HD V bernoulli_log_prob(V x_in, V l) {
  const V x = vmath::where_gt(x_in * (x_in - V(1.0f)), V(0.0f), V(NAN), x_in);
  V pos = vmath::max(l, V(0.0f)), neg = vmath::min(l, V(0.0f));
  V xm1 = x - V(1.0f);
  return vmath::zero_where_zero(xm1, xm1 * pos) + vmath::zero_where_zero(x, x * neg) -
         vmath::log1p_exp_neg(vmath::abs(l));
}
template <class V>
VF_HD void bernoulli_log_prob_grad(V g, V x, V l, V& dx, V& dl) {
  V sigmoid = V(1.0f) / (V(1.0f) + vmath::exp(V(0.0f) - l));  // 0 or 1 at the extremes, never NaN
  dx = g * l;
  dl = g * (x - sigmoid);
}

// ---- reparameterisation z = mu + sigma * eps, sigma = exp(lv / 2) -----------------------------
template <class V>
VF_HD V sigma_from_logvar(V lv) {
  return vmath::exp(V(0.5f) * lv);
}
template <class V>
VF_HD V reparameterize(V mu, V sigma, V eps) {
  return mu + sigma * eps;
}
// d z / d lv = 0.5 * sigma * eps, so dlv = 0.5 * sigma * sum_k g_k * eps_k (eps regenerated, exact).
template <class V>
VF_HD V reparameterize_dlogvar(V sigma, V sum_g_eps) {
  return V(0.5f) * sigma * sum_g_eps;
}
// log q(z | x) per element from the exact eps: -0.5 * (log 2 pi + lv + eps^2). As a function of
// (mu, lv) at fixed eps its gradient is d/dmu = 0, d/dlv = -0.5.
template <class V>
VF_HD V log_q_from_eps(V lv, V eps) {
  return V(-0.5f) * (V(kLog2Pi) + lv + eps * eps);
}
constexpr float kLogQDlogvar = -0.5f;
// log q(z; stop_grad(mu, lv)) with z = mu + sigma * eps: the gradient reaches (mu, lv) only through
// z, d log q / d z = -eps / sigma, so with upstream g: dmu = -g * eps * e^(-lv/2), dlv = -0.5 * g * eps^2
// (dz/dlv = 0.5 * sigma * eps; written without sigma / sigma so a vanishing sigma gives no 0 * inf).
template <class V>
VF_HD void log_q_path_grad(V g, V eps, V lv, V& dmu, V& dlv) {
  dmu = (V(0.0f) - g) * eps * vmath::exp(V(-0.5f) * lv);
  dlv = V(-0.5f) * g * eps * eps;
}

// ---- Box-Muller: two uniforms in (0, 1] -> two independent N(0, 1) (float32; see philox.h) -----
template <class V>
VF_HD void box_muller(V u_radius, V u_angle, V& n0, V& n1) {
  V r = vmath::sqrt(V(-2.0f) * vmath::log(u_radius));
  // angle 2 pi u as sincospi(2 u): 2 u is exact, so only sin and cos round
  V s, c;
  vmath::sincospi(V(2.0f) * u_angle, s, c);
  n0 = r * c;
  n1 = r * s;
}

// ---- discretized mixture of logistics (PixelCNN++, Salimans et al. 2017) -----------------------
// Per pixel: M components over C channels (1 or 3). Channel c of component k is a logistic of mean
// m_ck and scale s_ck = e^ls_ck (ls clamped below at kDmolLogScaleMin, torch.clamp's gradient);
// for C = 3 the means are autoregressive in the data: m_1k += t0 x_0, m_2k += t1 x_0 + t2 x_1 with
// t_j = tanh(raw coefficient j of component k). x lies on 2^bits levels in [-1, 1], bin half-width
// hw = 1 / (2^bits - 1). Per channel, with u = x - m, a = (u + hw) / s, b = (u - hw) / s:
//   bottom bin (x < -1 + hw): log sigma(a); top bin (x > 1 - hw): log sigma(-b);
//   otherwise log(sigma(a) - sigma(b)) = log1mexp(a - b) + log sigma(a) + log sigma(-b)
// (sigma(a) - sigma(b) = (1 - e^(b - a)) sigma(a) sigma(-b)), exact in every regime: no switch to the
// bin-centre density as PixelCNN++ has below 1e-5. a - b = d = 2 hw / s is formed as 2 hw e^-ls and
// its log as log(2 hw) - ls, so a vanishing d (a huge scale) still gives its exact log.
// Per pixel: log p(x) = logsumexp_k(logit_k + sum_c f_ck) - logsumexp_k(logit_k), both by an online
// logsumexp (one exp per component, nothing stored in the forward).
// Gradients (analytic): d f / d u and d f / d ls per channel, joined with the responsibilities
// r_k = softmax_k(logit_k + sum_c f_ck): d/dlogit_k = r_k - softmax(logit)_k, d/dm_ck = -r_k df/du,
// d/dls_ck = r_k df/dls (0 below the clamp), the coupling through the chain rule, tanh' = sech^2
// as 4 e / (1 + e)^2 with e = e^(-2|r|) (never 1 - tanh^2, which cancels for large |r|).
// Infinite parameters give the maths' limits: a logit of -inf, a mean of +-inf or a log-scale of
// +inf is a component of weight 0 where it puts no mass on x's bin (it adds nothing to the sums, and
// its gradients are 0, not 0 * inf); a NaN parameter gives NaN.
// Data off the support (outside [-1, 1], not finite, or more than DmolBits::grid_tol levels from
// the 2^bits grid) give NaN in the forward (the glue then says which values, on the CPU).
constexpr int kDmolMaxMixtures = 32;
constexpr double kDmolLogScaleMin = -7.0;
constexpr double kLn2 = 0.6931471805599453;
constexpr double kDmolSmallD = 9.5367431640625e-07;  // 2^-20: below it log1mexp(d) = log d - d/2 (+ O(d^2))

// log sigma(y) and sigma(-y) from one exp: e = e^-|y|, log sigma(y) = min(y, 0) - log1p(e),
// sigma(-y) = 1 / (1 + e) for y < 0, e / (1 + e) otherwise. Finite for every finite y.
template <class V>
VF_HD void log_sigmoid_parts(V y, V& log_sig, V& sig_neg) {
  const V e = vmath::exp(V(0.0f) - vmath::abs(y));
  log_sig = vmath::min(y, V(0.0f)) - vmath::log1p_unit(e);
  const V r = V(1.0f) / (V(1.0f) + e);
  sig_neg = vmath::where_lt(y, V(0.0f), r, e * r);
}

// log(1 - e^-d) for d > 0, given log_d = log(d) (exact even where d underflows).
template <class V>
VF_HD V log1mexp(V d, V log_d) {
  const V small = log_d - V(0.5f) * d;
  const V mid = vmath::log(V(0.0f) - vmath::expm1(V(0.0f) - d));
  const V big = vmath::log1p_unit(V(0.0f) - vmath::exp(V(0.0f) - d));  // e^-d <= 1/2 where it is taken
  return vmath::where_lt(d, V(kDmolSmallD), small, vmath::where_lt(d, V(kLn2), mid, big));
}
template <class T>
VF_HD T log1mexp_scalar(T d, T log_d) {
  if (d < T(kDmolSmallD)) return log_d - T(0.5) * d;
  if (d < T(kLn2)) return vmath::log(-vmath::expm1(-d));
  return vmath::log1p(-vmath::exp(-d));
}
VF_HD float log1mexp(float d, float log_d) { return log1mexp_scalar(d, log_d); }
VF_HD double log1mexp(double d, double log_d) { return log1mexp_scalar(d, log_d); }

// d / expm1(d) for d >= 0 (-d/dd of log1mexp(d), times d): 1 at d = 0, 0 for large d.
template <class V>
VF_HD V d_over_expm1(V d) {
  return vmath::where_lt(d, V(kDmolSmallD), V(1.0f) - V(0.5f) * d, d / vmath::expm1(d));
}

// tanh(r) from q = expm1(-2|r|) in (-1, 0]: tanh|r| = -q / (2 + q), exact near 0.
template <class V>
VF_HD V dmol_tanh(V r) {
  const V q = vmath::expm1(V(-2.0f) * vmath::abs(r));
  const V ta = (V(0.0f) - q) / (V(2.0f) + q);
  return vmath::where_lt(r, V(0.0f), V(0.0f) - ta, ta);
}
// tanh(r) and sech^2(r) = 4 e / (1 + e)^2 with e = e^(-2|r|): exact for every r (4 (1 + q) / (2 + q)^2
// would cancel in 1 + q as 1 - tanh^2 does: 0 for |r| >= 20 in double).
template <class V>
VF_HD void tanh_sech2(V r, V& t, V& sech2) {
  t = dmol_tanh(r);
  const V e = vmath::exp(V(-2.0f) * vmath::abs(r));
  const V inv = V(1.0f) / (V(1.0f) + e);
  sech2 = (V(4.0f) * e) * inv * inv;
}

// Online logsumexp: state (m, s) with lse = m + log(s); start m = -inf, s = 0. One exp per value.
// v = -inf (a term e^-inf = 0) leaves the state as it is, also at m = -inf where v - m is NaN.
template <class V>
VF_HD void lse_add(V& m, V& s, V v) {
  const V e = vmath::exp(V(0.0f) - vmath::abs(v - m));
  s = vmath::where_eq(v, V(-INFINITY), s, vmath::where_gt(v, m, s * e + V(1.0f), s + e));
  m = vmath::max(m, v);
}

// The constants of one bit depth: hw, log(2 hw), the edge thresholds, (2^bits - 1) / 2 (x's level
// is (x + 1) * half_levels) and the distance from the grid, in levels, that x may have.
template <class V>
struct DmolBits {
  V hw, log_2hw, lo, hi, half_levels, grid_tol;
};
template <class V>
VF_HD DmolBits<V> dmol_bits(int num_bits, double grid_tol) {
  const double levels = static_cast<double>((int64_t{1} << num_bits) - 1);
  const double hw = 1.0 / levels;
  return {V(hw), V(::log(2.0 * hw)), V(-1.0 + hw), V(1.0 - hw), V(0.5 * levels), V(grid_tol)};
}

// v, or NaN where x is off the support: outside [-1, 1] (infinities included) or farther than
// grid_tol levels from the nearest of the 2^bits levels. A NaN x gives NaN through v already.
template <class V>
VF_HD V nan_off_support(V x, const DmolBits<V>& k, V v) {
  const V y = (x + V(1.0f)) * k.half_levels;
  const V off_grid = vmath::abs(y - vmath::floor(y + V(0.5f)));
  const V nan(NAN);
  return vmath::where_gt(vmath::abs(x), V(1.0f), nan, vmath::where_gt(off_grid, k.grid_tol, nan, v));
}

// One channel of one component: f = log P(bin of x) (ls already clamped), and with kGrad
// gu = df/du (u = x - m) and gls = df/dls.
template <bool kGrad, class V>
VF_HD V dmol_bin(V x, V u, V ls, const DmolBits<V>& k, V& gu, V& gls) {
  const V inv_s = vmath::exp(V(0.0f) - ls);
  const V a = (u + k.hw) * inv_s, b = (u - k.hw) * inv_s;
  const V d = (k.hw + k.hw) * inv_s;
  V la, sna, lnb, sb;
  log_sigmoid_parts(a, la, sna);              // log sigma(a), sigma(-a)
  log_sigmoid_parts(V(0.0f) - b, lnb, sb);    // log sigma(-b), sigma(b)
  const V mid = log1mexp(d, k.log_2hw - ls) + la + lnb;
  if constexpr (kGrad) {
    // a sigma(-a) and b sigma(b) are 0 where the sigmoid is (a = +inf, b = -inf: an infinite mean)
    const V a_sna = vmath::zero_where_zero(sna, a * sna), b_sb = vmath::zero_where_zero(sb, b * sb);
    const V gu_mid = inv_s * (sna - sb);
    const V gls_mid = b_sb - a_sna - d_over_expm1(d);
    gu = vmath::where_lt(x, k.lo, inv_s * sna, vmath::where_gt(x, k.hi, V(0.0f) - inv_s * sb, gu_mid));
    gls = vmath::where_lt(x, k.lo, V(0.0f) - a_sna, vmath::where_gt(x, k.hi, b_sb, gls_mid));
  }
  return vmath::where_lt(x, k.lo, la, vmath::where_gt(x, k.hi, lnb, mid));
}

// Where each parameter of component k lies on the P axis (layout.h's DmolArgs offsets): Off has
// logit_base, mean_base, mean_channel_step, log_scale_base, log_scale_channel_step, coeff_base,
// coeff_step, component_step. R: rd(p) -> the parameter at P index p (V).
template <class Off>
VF_HD int dmol_mean(const Off& o, int c, int k) {
  return static_cast<int>(o.mean_base + c * o.mean_channel_step + k * o.component_step);
}
template <class Off>
VF_HD int dmol_log_scale(const Off& o, int c, int k) {
  return static_cast<int>(o.log_scale_base + c * o.log_scale_channel_step + k * o.component_step);
}
template <class Off>
VF_HD int dmol_coeff(const Off& o, int j, int k) {
  return static_cast<int>(o.coeff_base + j * o.coeff_step + k * o.component_step);
}
template <class Off>
VF_HD int dmol_logit(const Off& o, int k) {
  return static_cast<int>(o.logit_base + k * o.component_step);
}

// log p(x) of one pixel (C = 1 or 3).
template <class V, class Off, class R>
VF_HD V dmol_max_logit(int M, const Off& o, const R& rd) {
  V lmax = rd(dmol_logit(o, 0));
  for (int k = 1; k < M; ++k) lmax = vmath::max(lmax, rd(dmol_logit(o, k)));
  return lmax;
}

// Logits enter shifted by their max (l_k - max_j l_j, as log_softmax): huge logits lose no precision
// in the sum with the channel terms.
template <int C, class V, class Off, class R>
VF_HD V dmol_log_prob_pixel(const V* x, int M, const Off& o, const DmolBits<V>& bits, const R& rd) {
  const V lmax = dmol_max_logit<V>(M, o, rd);
  V sl(0.0f), mw(-INFINITY), sw(0.0f), unused;
  for (int k = 0; k < M; ++k) {
    const V logit = rd(dmol_logit(o, k)) - lmax;
    V w = logit;
    V m[C];
    for (int c = 0; c < C; ++c) m[c] = rd(dmol_mean(o, c, k));
    if constexpr (C == 3) {
      V t[3];
      for (int j = 0; j < 3; ++j) t[j] = dmol_tanh(rd(dmol_coeff(o, j, k)));
      m[1] = m[1] + t[0] * x[0];
      m[2] = m[2] + t[1] * x[0] + t[2] * x[1];
    }
    for (int c = 0; c < C; ++c) {
      const V ls = vmath::clamp_min(rd(dmol_log_scale(o, c, k)), V(kDmolLogScaleMin));
      w = w + dmol_bin<false>(x[c], x[c] - m[c], ls, bits, unused, unused);
    }
    sl = sl + vmath::exp(logit);
    lse_add(mw, sw, w);
  }
  V lp = (mw + vmath::log(sw)) - vmath::log(sl);
  for (int c = 0; c < C; ++c) lp = nan_off_support(x[c], bits, lp);
  return lp;
}

// log p(x) of one pixel and its gradients: wr(p, v) receives g * d log p / d param_p for every P
// index of the pixel (each once), dx[c] = g * d log p / d x_c. Two passes over the components; the
// per-component quantities live in arrays of kDmolMaxMixtures (M <= kDmolMaxMixtures).
template <int C, class V, class Off, class R, class Wr>
VF_HD V dmol_log_prob_pixel_grad(const V* x, int M, const Off& o, const DmolBits<V>& bits, V g, const R& rd,
                                 const Wr& wr, V* dx) {
  V logit[kDmolMaxMixtures], w[kDmolMaxMixtures];
  V gu[kDmolMaxMixtures][C], gls[kDmolMaxMixtures][C];
  V t[kDmolMaxMixtures][C == 3 ? 3 : 1], s2[kDmolMaxMixtures][C == 3 ? 3 : 1];
  const V lmax = dmol_max_logit<V>(M, o, rd);
  V sl(0.0f), mw(-INFINITY), sw(0.0f);
  const V lo_clamp(kDmolLogScaleMin);
  for (int k = 0; k < M; ++k) {
    logit[k] = rd(dmol_logit(o, k)) - lmax;
    V wk = logit[k];
    V m[C];
    for (int c = 0; c < C; ++c) m[c] = rd(dmol_mean(o, c, k));
    if constexpr (C == 3) {
      for (int j = 0; j < 3; ++j) tanh_sech2(rd(dmol_coeff(o, j, k)), t[k][j], s2[k][j]);
      m[1] = m[1] + t[k][0] * x[0];
      m[2] = m[2] + t[k][1] * x[0] + t[k][2] * x[1];
    }
    for (int c = 0; c < C; ++c) {
      const V raw = rd(dmol_log_scale(o, c, k));
      const V ls = vmath::clamp_min(raw, lo_clamp);
      V gl;
      wk = wk + dmol_bin<true>(x[c], x[c] - m[c], ls, bits, gu[k][c], gl);
      gls[k][c] = vmath::where_lt(raw, lo_clamp, V(0.0f), gl);  // torch.clamp's gradient: 0 below the bound
    }
    w[k] = wk;
    sl = sl + vmath::exp(logit[k]);
    lse_add(mw, sw, wk);
  }
  const V lse_w = mw + vmath::log(sw), lse_l = vmath::log(sl);
  for (int c = 0; c < C; ++c) dx[c] = V(0.0f);
  for (int k = 0; k < M; ++k) {
    const V r = vmath::exp(w[k] - lse_w), pi = vmath::exp(logit[k] - lse_l);
    wr(dmol_logit(o, k), g * (r - pi));
    // a component of weight r = 0 (an infinite parameter) has gradient 0, never 0 * inf
    const V gr = g * r;
    V gu_r[C];
    for (int c = 0; c < C; ++c) {
      gu_r[c] = vmath::zero_where_zero(r, gr * gu[k][c]);
      wr(dmol_mean(o, c, k), V(0.0f) - gu_r[c]);
      wr(dmol_log_scale(o, c, k), vmath::zero_where_zero(r, gr * gls[k][c]));
    }
    if constexpr (C == 3) {
      const V gu0 = gu_r[0], gu1 = gu_r[1], gu2 = gu_r[2];
      wr(dmol_coeff(o, 0, k), V(0.0f) - gu1 * x[0] * s2[k][0]);
      wr(dmol_coeff(o, 1, k), V(0.0f) - gu2 * x[0] * s2[k][1]);
      wr(dmol_coeff(o, 2, k), V(0.0f) - gu2 * x[1] * s2[k][2]);
      dx[0] = dx[0] + (gu0 - gu1 * t[k][0] - gu2 * t[k][1]);
      dx[1] = dx[1] + (gu1 - gu2 * t[k][2]);
      dx[2] = dx[2] + gu2;
    } else {
      dx[0] = dx[0] + gu_r[0];
    }
  }
  return lse_w - lse_l;
}

// The sampler's uniform from one 32-bit Philox output: the top 24 bits, centred, in (0, 1) exactly
// (never 0 or 1: log u and log(1 - u) are finite), the same in float on every device.
VF_HD float dmol_uniform(uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f;
}

// One pixel's sample (T: float, or double for float64 parameters). uni(i) -> the pixel's uniform i
// (float): i < M the Gumbel noise of component i, M + c the logistic draw of channel c. The component
// is argmax_k(logit_k - log(-log u_k)) (first on ties); channel c, in order, is
// m + s (log u - log(1 - u)) with the mean coupled to the channels already drawn (clamped and
// quantised), clamped to [-1, 1] and rounded to the nearest of the 2^bits levels.
template <int C, class T, class Off, class R, class U>
VF_HD void dmol_sample_pixel(int M, const Off& o, int num_bits, const R& rd, const U& uni, T* out) {
  int best_k = 0;
  T best = T(-INFINITY);
  for (int k = 0; k < M; ++k) {
    const T u = static_cast<T>(uni(k));
    const T v = rd(dmol_logit(o, k)) - vmath::log(-vmath::log(u));
    if (v > best || k == 0) {
      best = v;
      best_k = k;
    }
  }
  const T levels = static_cast<T>((int64_t{1} << num_bits) - 1);
  for (int c = 0; c < C; ++c) {
    T m = rd(dmol_mean(o, c, best_k));
    if constexpr (C == 3) {
      T t, s2;
      if (c == 1) {
        tanh_sech2(rd(dmol_coeff(o, 0, best_k)), t, s2);
        m = m + t * out[0];
      } else if (c == 2) {
        tanh_sech2(rd(dmol_coeff(o, 1, best_k)), t, s2);
        m = m + t * out[0];
        tanh_sech2(rd(dmol_coeff(o, 2, best_k)), t, s2);
        m = m + t * out[1];
      }
    }
    const T ls = vmath::clamp_min(rd(dmol_log_scale(o, c, best_k)), T(kDmolLogScaleMin));
    const T u = static_cast<T>(uni(M + c));
    T y = m + vmath::exp(ls) * (vmath::log(u) - vmath::log1p(-u));
    y = y < T(-1) ? T(-1) : y > T(1) ? T(1) : y;  // (a NaN stays NaN)
    const T level = vmath::floor((y + T(1)) * T(0.5) * levels + T(0.5));
    out[c] = (T(2) * level - levels) / levels;
  }
}

}  // namespace elbo
VF_ISA_NS_END
}  // namespace vae_fast
