// Every formula of the VAE objective, once. Inline templates over a value type V: float, double,
// at::vec::Vectorized<float/double> (CPU SIMD) and CUDA float/double. A backend that adds a value
// type declares its overloads of the vmath functions (exp, log, expm1, expm1_minus_x, log1p, abs, max,
// sqrt, sincos)
// in namespace vae_fast::vmath *before* including this header (qualified calls bind at definition).
//
// Numerics:
//  * KL terms use expm1(d) - d, never exp(d) - d - 1: the latter rounds below zero in float32 for
//    small |d|, the former is >= 0 for every d, so each per-element KL term is >= 0.
//  * Bernoulli uses x * l - softplus(l) with softplus(l) = max(l, 0) + log1p(exp(-|l|)): finite for
//    any |l|, never log(sigmoid(l)).
#pragma once
#include <cmath>

#include "isa.h"

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
VF_HD float expm1(float x) { return ::expm1f(x); }
VF_HD float log1p(float x) { return ::log1pf(x); }
VF_HD float abs(float x) { return ::fabsf(x); }
VF_HD float max(float a, float b) { return ::fmaxf(a, b); }
VF_HD double exp(double x) { return ::exp(x); }
VF_HD double log(double x) { return ::log(x); }
VF_HD double expm1(double x) { return ::expm1(x); }
VF_HD double log1p(double x) { return ::log1p(x); }
VF_HD double abs(double x) { return ::fabs(x); }
VF_HD double max(double a, double b) { return ::fmax(a, b); }
VF_HD float sqrt(float x) { return ::sqrtf(x); }
// expm1(x) - x, the KL's d-term: >= 0 for every x (expm1 is rounded monotonically), no exp(x) - 1 - x.
VF_HD float expm1_minus_x(float x) { return ::expm1f(x) - x; }
VF_HD double expm1_minus_x(double x) { return ::expm1(x) - x; }
VF_HD void sincos(float x, float& s, float& c) {
  s = ::sinf(x);
  c = ::cosf(x);
}
}  // namespace vmath

namespace elbo {
constexpr double kLog2Pi = 1.8378770664093453;  // log(2 pi)

// ---- KL(N(mu, e^lv) || N(0, 1)) per element, and its gradient --------------------------------
template <class V>
VF_HD V kl_std(V mu, V lv) {
  return V(0.5f) * (mu * mu + vmath::expm1_minus_x(lv));
}
template <class V>
VF_HD void kl_std_grad(V g, V mu, V lv, V& dmu, V& dlv) {
  dmu = g * mu;
  dlv = g * V(0.5f) * vmath::expm1(lv);
}

// ---- KL(N(m1, e^lv1) || N(m2, e^lv2)) per element, and its gradient ---------------------------
// = 0.5 * (lv2 - lv1 + (e^lv1 + (m1 - m2)^2) / e^lv2 - 1) = 0.5 * (expm1(d) - d + (m1 - m2)^2 e^-lv2),
// d = lv1 - lv2.
template <class V>
VF_HD V kl(V m1, V lv1, V m2, V lv2) {
  V d = lv1 - lv2;
  V diff = m1 - m2;
  return V(0.5f) * (vmath::expm1_minus_x(d) + diff * diff * vmath::exp(lv2 * V(-1.0f)));
}
template <class V>
VF_HD void kl_grad(V g, V m1, V lv1, V m2, V lv2, V& dm1, V& dlv1, V& dm2, V& dlv2) {
  V d = lv1 - lv2;
  V diff = m1 - m2;
  V scaled = diff * vmath::exp(lv2 * V(-1.0f));  // (m1 - m2) / v2
  V em1 = vmath::expm1(d);
  dm1 = g * scaled;
  dm2 = V(0.0f) - dm1;
  dlv1 = g * V(0.5f) * em1;
  dlv2 = g * V(-0.5f) * (em1 + diff * scaled);
}

// ---- log N(x; m, e^lv) per element, and its gradient ------------------------------------------
template <class V>
VF_HD V gaussian_log_prob(V x, V m, V lv) {
  V diff = x - m;
  return V(-0.5f) * (V(kLog2Pi) + lv + diff * diff * vmath::exp(lv * V(-1.0f)));
}
template <class V>
VF_HD void gaussian_log_prob_grad(V g, V x, V m, V lv, V& dx, V& dm, V& dlv) {
  V diff = x - m;
  V scaled = diff * vmath::exp(lv * V(-1.0f));  // (x - m) / v
  dm = g * scaled;
  dx = V(0.0f) - dm;
  dlv = g * V(0.5f) * (diff * scaled - V(1.0f));
}

// ---- log Bernoulli(x; sigmoid(l)) per element, and its gradient -------------------------------
template <class V>
VF_HD V softplus(V l) {
  return vmath::max(l, V(0.0f)) + vmath::log1p(vmath::exp(V(0.0f) - vmath::abs(l)));
}
template <class V>
VF_HD V bernoulli_log_prob(V x, V l) {
  return x * l - softplus(l);
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
  V t = V(6.283185307179586f) * u_angle;
  V s, c;
  vmath::sincos(t, s, c);
  n0 = r * c;
  n1 = r * s;
}

}  // namespace elbo
VF_ISA_NS_END
}  // namespace vae_fast
