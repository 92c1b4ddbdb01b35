// CPU reparameterised sampler (z = mu + sigma * eps with log q and the KL, forward and backward) and
// its normals (core/philox.h's counter layout, Box-Muller on SIMD vectors). Compiled once per ISA, like
// rows.cpp, so everything lives in vae_fast::<ISA>:: (see core/isa.h).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "core/elbo_constants.h"
#include "core/isa.h"

#include "cpu/vec_math.h"

#include "core/elbo_math.h"
#include "core/launch_args.h"
#include "core/philox.h"
#include "cpu/common.h"
#include "cpu/typed_io.h"

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Normals: Philox over arrays of counters (auto-vectorised), Box-Muller on SIMD vectors.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kMaxBlocks = kChunk / 4 + 2;

void normals_impl(uint64_t seed, uint64_t start, int64_t n, float* out) {
  using V = Vec<float>;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  while (n > 0) {
    const int64_t take = std::min<int64_t>(n, kChunk);
    const uint64_t b0 = start >> 2;
    const int64_t nb = static_cast<int64_t>(((start + take + 3) >> 2) - b0);
    alignas(64) uint32_t c0[kMaxBlocks], c1[kMaxBlocks], c2[kMaxBlocks], c3[kMaxBlocks];
    for (int64_t j = 0; j < nb; ++j) {
      const uint64_t b = b0 + static_cast<uint64_t>(j);
      c0[j] = static_cast<uint32_t>(b);
      c1[j] = static_cast<uint32_t>(b >> 32);
      c2[j] = 0;
      c3[j] = 0;
    }
    for (int r = 0; r < philox::kRounds; ++r) {
      const uint32_t rk0 = philox::key_for_round(k0, philox::kWeyl0, r);
      const uint32_t rk1 = philox::key_for_round(k1, philox::kWeyl1, r);
      for (int64_t j = 0; j < nb; ++j) philox::philox_round(c0[j], c1[j], c2[j], c3[j], rk0, rk1);
    }
    // Pair p = 2j + h takes radius from output 2h and angle from output 2h+1 of block j.
    alignas(64) float ur[2 * kMaxBlocks + V::size()], ut[2 * kMaxBlocks + V::size()];
    for (int64_t j = 0; j < nb; ++j) {
      ur[2 * j] = philox::uniform(c0[j]);
      ut[2 * j] = philox::uniform(c1[j]);
      ur[2 * j + 1] = philox::uniform(c2[j]);
      ut[2 * j + 1] = philox::uniform(c3[j]);
    }
    // Pad the last vector with valid uniforms: Sleef picks its argument-reduction path from all
    // lanes at once, so garbage in unused lanes could change the used lanes' last bit.
    const int64_t np = 2 * nb;
    for (int64_t p = np; p < np + V::size(); ++p) ur[p] = ut[p] = 0.5f;
    alignas(64) float pairs[4 * kMaxBlocks + 2 * V::size()];
    for (int64_t p = 0; p < np; p += V::size()) {
      V n0, n1;
      elbo::box_muller(V::loadu(ur + p), V::loadu(ut + p), n0, n1);
      V lo, hi;
      std::tie(lo, hi) = at::vec::interleave2(n0, n1);  // n0[p], n1[p], n0[p+1], ...
      lo.store(pairs + 2 * p);
      hi.store(pairs + 2 * p + V::size());
    }
    std::memcpy(out, pairs + (start - 4 * b0), sizeof(float) * static_cast<size_t>(take));
    out += take;
    start += static_cast<uint64_t>(take);
    n -= take;
  }
}

// ---------------------------------------------------------------------------------------------
// Reparameterised sampling (with log q and the KL), forward and backward. mu and logvar are walked
// as one flat array in chunks whose boundaries sit at global multiples of kChunk (so every sum is
// taken in the same order whatever the thread count); per-row sums (KL, log q) are segment sums
// over the chunk. Short rows (event_dims=0, a 2-D latent) thus cost no per-row overhead.
// ---------------------------------------------------------------------------------------------

// Eps for flat indices [start, start + n) in acc_t (float: straight from the generator).
template <class acc_t>
const acc_t* eps_chunk(uint64_t seed, uint64_t start, int64_t n, float* eps_f, acc_t* buf) {
  normals_impl(seed, start, n, eps_f);
  if constexpr (std::is_same_v<acc_t, float>) {
    return eps_f;
  } else {
    at::vec::convert(eps_f, buf, n);
    return buf;
  }
}

inline int64_t sample_grain(const SampleArgs& a) {  // rows per task
  return task_grain(a.event_numel * a.num_samples);
}

// The n logvar values at lv clamped into `out` (may be lv itself); `keep` (unless null) gets clamp_keep's mask.
template <class acc_t>
const acc_t* clamp_chunk(const acc_t* lv, int64_t n, const Clamp& clamp, acc_t* out, acc_t* keep) {
  using V = Vec<acc_t>;
  const acc_t lo = static_cast<acc_t>(clamp.lo), hi = static_cast<acc_t>(clamp.hi);
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t cnt = std::min<int64_t>(V::size(), n - i);
    V l = V::loadu(lv + i, cnt);
    const V k = clamp_keep(l, lo, hi);
    l.store(out + i, cnt);
    if (keep) k.store(keep + i, cnt);
  }
  return out;
}

// out[i] = sum_k per_row[k * k_stride + row(c + i)] for the n elements from flat index c, row = index / E:
// per-row upstream gradients (of kl, of log_q) spread over their rows' elements.
template <class acc_t>
void spread_rows(const acc_t* per_row, int64_t K, int64_t k_stride, int64_t c, int64_t n, int64_t E, acc_t* out) {
  for_each_row_piece(c, n, E, [&](int64_t row, int64_t i, int64_t len) {
    acc_t v = 0;
    for (int64_t k = 0; k < K; ++k) v += per_row[k * k_stride + row];
    std::fill(out + i, out + i + len, v);
  });
}

inline uint64_t sample_seed(const SampleArgs& a) {
  return a.seed ? static_cast<uint64_t>(*a.seed) : a.seed_value;
}

template <class acc_t>
void sample_forward_typed(const SampleArgs& a) {
  using V = Vec<acc_t>;
  constexpr int64_t VS = V::size();
  const int64_t E = a.event_numel, R = a.rows, K = a.num_samples, N = R * E;
  const uint64_t seed = sample_seed(a);
  at::parallel_for(0, R, sample_grain(a), [&](int64_t r0, int64_t r1) {
    alignas(64) acc_t mu_buf[kChunk], lv_buf[kChunk], sigma[kChunk], z_buf[kChunk], eps_buf[kChunk], terms[kChunk];
    alignas(64) float eps_f[kChunk];
    // Row carries per log_q sample and the KL's (on the stack unless K is large: no heap on small calls).
    double carry_stack[64] = {};
    std::vector<double> carry_heap(K + 1 > 64 ? static_cast<size_t>(K) + 1 : 0, 0.0);
    double* carry = K + 1 > 64 ? carry_heap.data() : carry_stack;
    for_each_chunk(r0 * E, r1 * E, [&](int64_t c, int64_t n) {
      const acc_t* mu = load_logical<acc_t>(a.dtype, a.mu, a.run, a.mu_run_stride, c, n, mu_buf);
      const acc_t* lv = load_logical<acc_t>(a.dtype, a.logvar, a.run, a.logvar_run_stride, c, n, lv_buf);
      if (a.logvar_clamp.on) lv = clamp_chunk<acc_t>(lv, n, a.logvar_clamp, lv_buf, nullptr);
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t cnt = std::min(VS, n - i);
        V m = V::loadu(mu + i, cnt), l = V::loadu(lv + i, cnt);
        elbo::sigma_from_logvar(l).store(sigma + i, cnt);
        if (a.kl) elbo::kl_std(m, l).store(terms + i, cnt);
      }
      if (a.kl) add_segments(terms, c, n, E, typed<acc_t>(a.kl), carry[K]);
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* eps = eps_chunk<acc_t>(seed, static_cast<uint64_t>(k * N + c), n, eps_f, eps_buf);
        acc_t* z = contiguous_target<acc_t>(a.dtype, a.z, k * N + c, z_buf);
        for (int64_t i = 0; i < n; i += VS) {
          const int64_t cnt = std::min(VS, n - i);
          V e = V::loadu(eps + i, cnt);
          elbo::reparameterize(V::loadu(mu + i, cnt), V::loadu(sigma + i, cnt), e).store(z + i, cnt);
          if (a.log_q) elbo::log_q_from_eps(V::loadu(lv + i, cnt), e).store(terms + i, cnt);
        }
        store_contiguous<acc_t>(a.dtype, a.z, k * N + c, n, z);
        if (a.log_q) add_segments(terms, c, n, E, typed<acc_t>(a.log_q) + k * R, carry[k]);
      }
    });
  });
}

template <class acc_t>
void sample_backward_typed(const SampleArgs& a) {
  using V = Vec<acc_t>;
  constexpr int64_t VS = V::size();
  const int64_t E = a.event_numel, R = a.rows, K = a.num_samples, N = R * E;
  const uint64_t seed = sample_seed(a);
  const acc_t* grad_kl = static_cast<const acc_t*>(a.grad_kl);
  const acc_t* grad_log_q = static_cast<const acc_t*>(a.grad_log_q);
  // log_q's gradient through z (per sample, needs eps) or at fixed eps (a constant per row).
  const bool log_q_path = grad_log_q && a.log_q_path_only;
  const bool need_eps = (a.grad_z && a.grad_logvar) || log_q_path;
  const bool clamp = a.logvar_clamp.on;
  at::parallel_for(0, R, sample_grain(a), [&](int64_t r0, int64_t r1) {
    alignas(64) acc_t mu_buf[kChunk], lv_buf[kChunk], g_buf[kChunk], eps_buf[kChunk], sum_g[kChunk], sum_ge[kChunk];
    alignas(64) acc_t g_kl[kChunk], g_lq[kChunk], path_mu[kChunk], path_lv[kChunk], dmu_buf[kChunk], dlv_buf[kChunk];
    alignas(64) acc_t keep_lv[kChunk];  // the clamp's gradient mask
    alignas(64) float eps_f[kChunk];
    for_each_chunk(r0 * E, r1 * E, [&](int64_t c, int64_t n) {
      const acc_t* lv = load_logical<acc_t>(a.dtype, a.logvar, a.run, a.logvar_run_stride, c, n, lv_buf);
      if (clamp) lv = clamp_chunk<acc_t>(lv, n, a.logvar_clamp, lv_buf, keep_lv);
      // Only the KL's gradient reads mu.
      const acc_t* mu = grad_kl ? load_logical<acc_t>(a.dtype, a.mu, a.run, a.mu_run_stride, c, n, mu_buf) : nullptr;
      if (grad_kl) spread_rows(grad_kl, 1, 0, c, n, E, g_kl);
      if (grad_log_q && !log_q_path) spread_rows(grad_log_q, K, R, c, n, E, g_lq);
      // sum_k g_k, sum_k g_k * eps_k and log_q's path gradients, the eps regenerated from the seed.
      std::fill(sum_g, sum_g + n, acc_t(0));
      std::fill(sum_ge, sum_ge + n, acc_t(0));
      if (log_q_path) {
        std::fill(path_mu, path_mu + n, acc_t(0));
        std::fill(path_lv, path_lv + n, acc_t(0));
      }
      for (int64_t k = 0; (a.grad_z || log_q_path) && k < K; ++k) {
        const acc_t* g = a.grad_z ? load_contiguous<acc_t>(a.dtype, a.grad_z, k * N + c, n, g_buf) : nullptr;
        const acc_t* eps = need_eps ? eps_chunk<acc_t>(seed, static_cast<uint64_t>(k * N + c), n, eps_f, eps_buf)
                                    : nullptr;
        if (log_q_path) spread_rows(grad_log_q + k * R, 1, 0, c, n, E, g_lq);
        for (int64_t i = 0; i < n; i += VS) {
          const int64_t cnt = std::min(VS, n - i);
          if (g) {
            V gv = V::loadu(g + i, cnt);
            if (a.grad_mu) (V::loadu(sum_g + i, cnt) + gv).store(sum_g + i, cnt);
            if (eps && a.grad_logvar) (V::loadu(sum_ge + i, cnt) + gv * V::loadu(eps + i, cnt)).store(sum_ge + i, cnt);
          }
          if (log_q_path) {
            V dm, dl;
            elbo::log_q_path_grad(V::loadu(g_lq + i, cnt), V::loadu(eps + i, cnt), V::loadu(lv + i, cnt), dm, dl);
            (V::loadu(path_mu + i, cnt) + dm).store(path_mu + i, cnt);
            (V::loadu(path_lv + i, cnt) + dl).store(path_lv + i, cnt);
          }
        }
      }
      acc_t* dmu = a.grad_mu ? logical_target<acc_t>(a.dtype, a.grad_mu, a.grad_run, a.grad_mu_run_stride, c, n, dmu_buf)
                             : nullptr;
      acc_t* dlv = a.grad_logvar
                       ? logical_target<acc_t>(a.dtype, a.grad_logvar, a.grad_run, a.grad_logvar_run_stride, c, n, dlv_buf)
                       : nullptr;
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t cnt = std::min(VS, n - i);
        V l = V::loadu(lv + i, cnt);
        V kl_dmu(acc_t(0)), kl_dlv(acc_t(0));
        if (grad_kl) elbo::kl_std_grad(V::loadu(g_kl + i, cnt), V::loadu(mu + i, cnt), l, kl_dmu, kl_dlv);
        if (dmu) {
          V d = V::loadu(sum_g + i, cnt) + kl_dmu;
          if (log_q_path) d = d + V::loadu(path_mu + i, cnt);
          d.store(dmu + i, cnt);
        }
        if (dlv) {
          V d = elbo::reparameterize_dlogvar(elbo::sigma_from_logvar(l), V::loadu(sum_ge + i, cnt)) + kl_dlv;
          if (log_q_path) d = d + V::loadu(path_lv + i, cnt);
          else if (grad_log_q) d = d + V::loadu(g_lq + i, cnt) * V(acc_t(elbo::kLogQDlogvar));
          if (clamp) d = d & V::loadu(keep_lv + i, cnt);  // every term flows through the clamped logvar
          d.store(dlv + i, cnt);
        }
      }
      if (dmu) store_logical<acc_t>(a.dtype, a.grad_mu, a.grad_run, a.grad_mu_run_stride, c, n, dmu);
      if (dlv) store_logical<acc_t>(a.dtype, a.grad_logvar, a.grad_run, a.grad_logvar_run_stride, c, n, dlv);
    });
  });
}

}  // namespace

void sample_forward(const SampleArgs& args) {
  if (args.dtype == DType::Float64) sample_forward_typed<double>(args);
  else sample_forward_typed<float>(args);
}

void sample_backward(const SampleArgs& args) {
  if (args.dtype == DType::Float64) sample_backward_typed<double>(args);
  else sample_backward_typed<float>(args);
}

}  // namespace cpu
VF_ISA_NS_END
}  // namespace vae_fast
