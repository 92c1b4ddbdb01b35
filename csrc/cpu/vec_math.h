// The SIMD backend of elbo_math.h's vmath functions (at::vec::Vectorized, Sleef), for the per-ISA
// CPU kernel files (rows.cpp, sample.cpp, dmol.cpp): included before elbo_math.h (and dmol_math.h), inside the per-ISA namespace.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "core/elbo_constants.h"
#include "core/isa.h"

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace vmath {
// The SIMD backend of elbo_math.h (Sleef through at::vec, ~1 ulp).
template <class T> inline at::vec::Vectorized<T> exp(const at::vec::Vectorized<T>& x) { return x.exp(); }
template <class T> inline at::vec::Vectorized<T> log(const at::vec::Vectorized<T>& x) { return x.log(); }
template <class T> inline at::vec::Vectorized<T> abs(const at::vec::Vectorized<T>& x) { return x.abs(); }
template <class T> inline at::vec::Vectorized<T> sqrt(const at::vec::Vectorized<T>& x) { return x.sqrt(); }
// sin(pi x) and cos(pi x) in one Sleef call where the ISA has it (3.5 ulp, u35; no reduction by an
// inexact pi, so cheaper than sincos); the Box-Muller angle's 2 u is in (0, 2], where they agree with
// CUDA's sincospif to a few ulps. Other ISAs: elbo_constants.h's host form per lane.
inline void sincospi(const at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& s, at::vec::Vectorized<float>& c) {
#if defined(CPU_CAPABILITY_AVX512)
  Sleef___m512_2 sc = Sleef_sincospif16_u35(x);
  s = sc.x;
  c = sc.y;
#elif defined(CPU_CAPABILITY_AVX2)
  Sleef___m256_2 sc = Sleef_sincospif8_u35(x);
  s = sc.x;
  c = sc.y;
#else
  constexpr int n = at::vec::Vectorized<float>::size();
  alignas(64) float xs[n], ss[n], cs[n];
  x.store(xs);
  for (int i = 0; i < n; ++i) ::vae_fast::elbo::host_sincospi(xs[i], ss[i], cs[i]);
  s = at::vec::Vectorized<float>::loadu(ss);
  c = at::vec::Vectorized<float>::loadu(cs);
#endif
}
// expm1 without Sleef's expm1 (3x the cost of exp here, which made the KL compute-bound): for
// |x| < 1 the Taylor series of expm1(x) - x (to x^11 in float, x^17 in double: relative error below
// the type's epsilon), else from exp(x). expm1(x) - x stays >= 0 for every x, as the KL needs.
template <int N>
struct InverseFactorials {  // 1/n! for n = 0..N, computed at compile time
  double v[N + 1] = {};
  constexpr InverseFactorials() {
    v[0] = 1.0;
    for (int n = 1; n <= N; ++n) v[n] = v[n - 1] / n;
  }
};
template <class T>
inline at::vec::Vectorized<T> expm1_taylor_minus_x(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  constexpr int kLast = std::is_same_v<T, float> ? 11 : 17;  // highest power kept
  static constexpr InverseFactorials<kLast> inv_factorial{};
  V h(static_cast<T>(inv_factorial.v[kLast]));
  for (int n = kLast - 1; n >= 2; --n) h = at::vec::fmadd(h, x, V(static_cast<T>(inv_factorial.v[n])));
  return x * x * h;
}
// e^x, or e^(x/2) in the lanes where x > kHalveExpAbove (`big`; the caller multiplies it in twice, so
// that a scaled e^x overflows only where the result does).
template <class T>
inline at::vec::Vectorized<T> exp_or_half(const at::vec::Vectorized<T>& x, at::vec::Vectorized<T>& big) {
  using V = at::vec::Vectorized<T>;
  big = x > V(static_cast<T>(::vae_fast::elbo::kHalveExpAbove));
  return V::blendv(x, x * V(T(0.5)), big).exp();
}
// 0.5 * (expm1(x) - x), finite wherever the result is; x = +inf gives inf (elbo_math.h's scalar form).
template <class T>
inline at::vec::Vectorized<T> half_expm1_minus_x(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  V big;
  const V e = exp_or_half(x, big), half = V(T(0.5));
  const V half_exp = V::blendv(half * e, (half * e) * e, big);
  const V linear = half * (V(T(1)) + at::vec::minimum(x, V(static_cast<T>(::vae_fast::elbo::kLinearCap))));
  return V::blendv(half_exp - linear, half * expm1_taylor_minus_x(x), x.abs() < V(T(1)));
}
// g * 0.5 * expm1(x), finite wherever the result is.
template <class T>
inline at::vec::Vectorized<T> scaled_half_expm1(const at::vec::Vectorized<T>& g, const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  V big;
  const V e = exp_or_half(x, big), half_g = V(T(0.5)) * g;
  const V scaled = half_g * e;
  return V::blendv(V::blendv(scaled, scaled * e, big) - half_g, half_g * (expm1_taylor_minus_x(x) + x),
                   x.abs() < V(T(1)));
}
template <class T>
inline at::vec::Vectorized<T> inf_or(const at::vec::Vectorized<T>& q, const at::vec::Vectorized<T>& v) {
  using V = at::vec::Vectorized<T>;
  return V::blendv(v, q, q == V(std::numeric_limits<T>::infinity()));
}
// log1p(exp(-a)) for a >= 0 (softplus(l) = max(l, 0) + this at a = |l|) without Sleef's log1p (as costly
// as exp here, which made the Bernoulli likelihood compute-bound): with t = exp(-a) in (0, 1] and
// u = t / (2 + t) in (0, 1/3], log1p(t) = 2 atanh(u) = 2u (1 + w/3 + w^2/5 + ...), w = u^2 <= 1/9, the series
// to w^7 in float (the next term is below 2e-9 relative), w^15 in double (below 2e-17). a = +inf gives 0.
template <class T>
inline at::vec::Vectorized<T> log1p_exp_neg(const at::vec::Vectorized<T>& a) {
  using V = at::vec::Vectorized<T>;
  constexpr int kLast = std::is_same_v<T, float> ? 7 : 15;  // highest power of w kept
  const V t = (V(T(0)) - a).exp();
  const V u = t / (V(T(2)) + t);
  const V w = u * u;
  V p(static_cast<T>(1.0 / (2 * kLast + 1)));
  for (int n = kLast - 1; n >= 0; --n) p = at::vec::fmadd(p, w, V(static_cast<T>(1.0 / (2 * n + 1))));
  return V(T(2)) * u * p;
}
template <class T>
inline at::vec::Vectorized<T> max(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}
template <class T>
inline at::vec::Vectorized<T> min(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::minimum(a, b);
}
template <class T>
inline at::vec::Vectorized<T> zero_where_zero(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& v) {
  using V = at::vec::Vectorized<T>;
  return V::blendv(v, V(T(0)), a == V(T(0)));
}
template <class T>
inline at::vec::Vectorized<T> clamp_min(const at::vec::Vectorized<T>& x, const at::vec::Vectorized<T>& lo) {
  using V = at::vec::Vectorized<T>;
  return V::blendv(x, lo, x < lo);  // a NaN x compares false and stays NaN
}
template <class T> inline at::vec::Vectorized<T> log1p(const at::vec::Vectorized<T>& x) { return x.log1p(); }
// log1p(t) for t in [-1/2, 1] without Sleef's log1p: log1p(t) = 2 atanh(u), u = t / (2 + t) in [-1/3, 1/3], the
// series 2u (1 + w/3 + w^2/5 + ...), w = u^2 <= 1/9, to w^7 in float (next term below 2e-9 relative), w^15 in
// double (below 2e-17), as log1p_exp_neg below.
template <class T>
inline at::vec::Vectorized<T> log1p_unit(const at::vec::Vectorized<T>& t) {
  using V = at::vec::Vectorized<T>;
  constexpr int kLast = std::is_same_v<T, float> ? 7 : 15;
  const V u = t / (V(T(2)) + t);
  const V w = u * u;
  V p(static_cast<T>(1.0 / (2 * kLast + 1)));
  for (int n = kLast - 1; n >= 0; --n) p = at::vec::fmadd(p, w, V(static_cast<T>(1.0 / (2 * n + 1))));
  return V(T(2)) * u * p;
}
template <class T> inline at::vec::Vectorized<T> expm1(const at::vec::Vectorized<T>& x) { return x.expm1(); }
template <class T> inline at::vec::Vectorized<T> floor(const at::vec::Vectorized<T>& x) { return x.floor(); }
// a < b ? x : y, a > b ? x : y and a == b ? x : y, lane by lane (elbo_math.h's scalar forms choose).
template <class T>
inline at::vec::Vectorized<T> where_lt(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                       const at::vec::Vectorized<T>& x, const at::vec::Vectorized<T>& y) {
  return at::vec::Vectorized<T>::blendv(y, x, a < b);
}
template <class T>
inline at::vec::Vectorized<T> where_gt(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                       const at::vec::Vectorized<T>& x, const at::vec::Vectorized<T>& y) {
  return at::vec::Vectorized<T>::blendv(y, x, a > b);
}
template <class T>
inline at::vec::Vectorized<T> where_eq(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                       const at::vec::Vectorized<T>& x, const at::vec::Vectorized<T>& y) {
  return at::vec::Vectorized<T>::blendv(y, x, a == b);
}
}  // namespace vmath
VF_ISA_NS_END
}  // namespace vae_fast
