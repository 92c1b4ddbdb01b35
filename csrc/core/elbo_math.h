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
// x outside [0, 1] (infinities included) is off the support: NaN (glue/checks.h: the CPU glue then raises), from
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

}  // namespace elbo
VF_ISA_NS_END
}  // namespace vae_fast
