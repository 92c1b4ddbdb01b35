// Constants of elbo_math.h's formulas that the SIMD backends' vmath functions also need (they are
// declared before elbo_math.h is included).
#pragma once

namespace vae_fast::elbo {
// Above this argument e^x is formed as e^(x/2) * e^(x/2), each factor multiplied into its scale
// first, so that s * e^x overflows only where the result does (e^x overflows float32 from 88.7 on,
// 0.5 * e^x only from 89.4 on).
constexpr float kHalveExpAbove = 64.0f;
// The linear term of e^x - 1 - x is capped here, so that x = +inf gives inf - finite = inf.
constexpr float kLinearCap = 1.0e4f;
}  // namespace vae_fast::elbo
