// The discretized mixture of logistics' formulas (PixelCNN++'s likelihood and its sampler), apart from
// the row ops' (elbo_math.h, whose vmath functions and conventions they use): inline templates over a
// value type V, run by the CPU kernels (cpu/dmol.cpp, SIMD vectors) and the CUDA kernels (cuda/dmol.cu).
#pragma once
#include <cstdint>

#include "core/elbo_math.h"

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace elbo {

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

// Where each parameter of component k lies on the P axis (launch_args.h's DmolArgs offsets): Off has
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
