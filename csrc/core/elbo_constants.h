// Constants (and one host function) of elbo_math.h's formulas that the SIMD backends' vmath
// functions also need (they are declared before elbo_math.h is included).
#pragma once
#include <cmath>

namespace vae_fast::elbo {
// Above this argument e^x is formed as e^(x/2) * e^(x/2), each factor multiplied into its scale
// first, so that s * e^x overflows only where the result does (e^x overflows float32 from 88.7 on,
// 0.5 * e^x only from 89.4 on).
constexpr float kHalveExpAbove = 64.0f;
// The linear term of e^x - 1 - x is capped here, so that x = +inf gives inf - finite = inf.
constexpr float kLinearCap = 1.0e4f;
// sin(pi x) and cos(pi x) on the host: in double, rounded once to float (within half an ulp and a
// hair: the double product and sin/cos are good to ~1e-16).
inline void host_sincospi(float x, float& s, float& c) {
  const double t = 3.14159265358979323846 * static_cast<double>(x);
  s = static_cast<float>(std::sin(t));
  c = static_cast<float>(std::cos(t));
}
}  // namespace vae_fast::elbo
