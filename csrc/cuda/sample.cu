// Reparameterised sampling z = mu + exp(logvar / 2) * eps with eps from philox.h's counter layout
// (the normal of flat element i of z comes from Philox block i / 4), forward and backward. The seed
// is read on the device (CUDA-graph capture safe). eps is float32 (Box-Muller in float32 with the
// accurate logf/sqrtf/sinf/cosf, no fast math), so the CPU and this code draw the same eps to float
// rounding; everything else is computed in float (double for float64).
//
// Kernels (grid-stride, no atomics):
//  * sample_z_kernel: z only. One thread per Philox block: 4 consecutive elements of z.
//  * sample_rows_kernel: z with kl[r] and/or log_q[k, r]. One group of tpr threads per row
//    (k, r) of z; lane l takes the row's Philox blocks l, l + tpr, ... (a block that straddles two
//    rows is drawn by both), sums its terms in order, then a fixed butterfly; lane 0 stores.
//  * sample_bwd_kernel: one thread per 4 consecutive (r, j) positions, looping k = 0 .. K-1 in
//    order (sum_k g and sum_k g * eps in registers), eps regenerated from the seed.
#include "kernels.h"
#include "common.cuh"

#include <algorithm>

namespace vae_fast::cuda {
namespace detail {

struct SParams {
  const void* mu = nullptr;
  const void* lv = nullptr;
  DType dt = DType::Float32;
  int32_t tpr = 1;
  int64_t R = 0, E = 0, K = 1, RE = 0;
  FastDiv re_div, e_div, r_div;
  const int64_t* seed = nullptr;
  void* z = nullptr;
  void* log_q = nullptr;
  void* kl = nullptr;
  int64_t n_rows = 0;  // sample_rows_kernel: rows of z processed (K * R, or R for kl alone)
  bool need_eps = false;
  const void* gz = nullptr;
  const void* gq = nullptr;
  const void* gkl = nullptr;
  void* gmu = nullptr;
  void* glv = nullptr;
};

VF_DEV uint64_t read_seed(const int64_t* seed) {
  return static_cast<uint64_t>(ldg(reinterpret_cast<const long long*>(seed)));
}

// The four normals of Philox block b (elements 4b .. 4b+3 of the flat index space).
VF_DEV void normals4(uint64_t seed, uint64_t b, float (&n)[4]) {
  uint32_t x[4];
  philox::block(seed, b, x);
  elbo::box_muller(philox::uniform(x[0]), philox::uniform(x[1]), n[0], n[1]);
  elbo::box_muller(philox::uniform(x[2]), philox::uniform(x[3]), n[2], n[3]);
}

// n0[t] for t < 4, n1[t - 4] otherwise, without a dynamically indexed (local-memory) array.
VF_DEV float pick8(const float (&n0)[4], const float (&n1)[4], int t) {
  float v = n1[3];
  v = t == 6 ? n1[2] : v;
  v = t == 5 ? n1[1] : v;
  v = t == 4 ? n1[0] : v;
  v = t == 3 ? n0[3] : v;
  v = t == 2 ? n0[2] : v;
  v = t == 1 ? n0[1] : v;
  v = t == 0 ? n0[0] : v;
  return v;
}

template <class A>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, 2) sample_z_kernel(const VF_GRID_CONST SParams p) {
  const uint64_t seed = read_seed(p.seed);
  const int64_t total = p.K * p.RE;
  const int64_t nb = (total + 3) / 4;
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t b = bid_x() * bdim_x() + tid_x(); b < nb; b += stride) {
    const int64_t i0 = 4 * b;
    const int valid = total - i0 < 4 ? static_cast<int>(total - i0) : 4;
    float n[4];
    normals4(seed, static_cast<uint64_t>(b), n);
    const int64_t m0 = i0 - fdiv(p.re_div, i0) * p.RE;  // i0 mod RE
    A mu[4], lv[4];
    if (m0 + valid <= p.RE) {
      Mem<A>::load4(p.mu, p.dt, m0, 1, 0, valid, mu);
      Mem<A>::load4(p.lv, p.dt, m0, 1, 0, valid, lv);
    } else {  // wraps around the end of mu: a new sample k starts inside this block
      VF_UNROLL
      for (int e = 0; e < 4; ++e) {
        mu[e] = A(0);
        lv[e] = A(0);
        if (e < valid) {
          const int64_t me = m0 + e;
          const int64_t m = me - fdiv(p.re_div, me) * p.RE;
          mu[e] = Mem<A>::load1(p.mu, p.dt, m);
          lv[e] = Mem<A>::load1(p.lv, p.dt, m);
        }
      }
    }
    A z[4];
    VF_UNROLL
    for (int e = 0; e < 4; ++e)
      z[e] = elbo::reparameterize(mu[e], elbo::sigma_from_logvar(lv[e]), static_cast<A>(n[e]));
    Mem<A>::store4(p.z, p.dt, i0, 1, 0, valid, z);
  }
}

template <class A>
VF_GLOBAL void VF_LAUNCH_BOUNDS(512, 1) sample_rows_kernel(const VF_GRID_CONST SParams p) {
  VF_SHARED A smem[32];
  const ThreadGroup g(p.tpr);
  const uint64_t seed = p.need_eps ? read_seed(p.seed) : 0;
  VF_NO_UNROLL
  for (int64_t q = g.first(); q < p.n_rows; q += g.ngroups) {  // group-uniform
    const int64_t k = fdiv(p.r_div, q);
    const int64_t r = q - k * p.R;
    const bool do_kl = p.kl != nullptr && k == 0;
    const int64_t i0 = q * p.E;  // flat index of z[k, r, 0]
    A lq = A(0), kl = A(0);
    if (p.E > 0) {
      const int64_t b_first = i0 / 4, b_last = (i0 + p.E - 1) / 4;
      VF_NO_UNROLL
      for (int64_t b = b_first + g.lane; b <= b_last; b += g.tpr) {
        const int64_t base = 4 * b;
        const int lo = i0 > base ? static_cast<int>(i0 - base) : 0;
        const int hi = i0 + p.E - base < 4 ? static_cast<int>(i0 + p.E - base) : 4;
        const int64_t m = r * p.E + (base - i0);  // mu offset of element e = 0 (used for e >= lo)
        A mu[4], lv[4];
        Mem<A>::load4(p.mu, p.dt, m, 1, lo, hi, mu);
        Mem<A>::load4(p.lv, p.dt, m, 1, lo, hi, lv);
        float n[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (p.need_eps) normals4(seed, static_cast<uint64_t>(b), n);
        A z[4];
        VF_UNROLL
        for (int e = 0; e < 4; ++e) {
          const A eps = static_cast<A>(n[e]);
          z[e] = elbo::reparameterize(mu[e], elbo::sigma_from_logvar(lv[e]), eps);
          if (e >= lo && e < hi) {
            if (p.log_q) lq += elbo::log_q_from_eps(lv[e], eps);
            if (do_kl) kl += elbo::kl_std(mu[e], lv[e]);
          }
        }
        if (p.z) Mem<A>::store4(p.z, p.dt, base, 1, lo, hi, z);
      }
    }
    if (p.log_q) {
      lq = g.sum(lq, smem);
      if (g.lane == 0) st(static_cast<A*>(p.log_q) + q, lq);
    }
    if (do_kl) {  // group-uniform (k is the group's)
      kl = g.sum(kl, smem);
      if (g.lane == 0) st(static_cast<A*>(p.kl) + r, kl);
    }
  }
}

template <class A>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, 2) sample_bwd_kernel(const VF_GRID_CONST SParams p) {
  const bool need_eps = p.gz != nullptr && p.glv != nullptr;
  const bool need_mu = p.gkl != nullptr && p.gmu != nullptr;
  const bool need_lv = p.glv != nullptr && (p.gz != nullptr || p.gkl != nullptr);
  const uint64_t seed = need_eps ? read_seed(p.seed) : 0;
  const int64_t nc = (p.RE + 3) / 4;
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t c = bid_x() * bdim_x() + tid_x(); c < nc; c += stride) {
    const int64_t m0 = 4 * c;
    const int valid = p.RE - m0 < 4 ? static_cast<int>(p.RE - m0) : 4;
    int64_t row[4];
    VF_UNROLL
    for (int e = 0; e < 4; ++e) row[e] = e < valid ? fdiv(p.e_div, m0 + e) : 0;
    A mu[4], lv[4];
    Mem<A>::load4(p.mu, p.dt, m0, 1, 0, need_mu ? valid : 0, mu);
    Mem<A>::load4(p.lv, p.dt, m0, 1, 0, need_lv ? valid : 0, lv);
    A sg[4], sge[4], sgq[4];
    VF_UNROLL
    for (int e = 0; e < 4; ++e) { sg[e] = A(0); sge[e] = A(0); sgq[e] = A(0); }
    VF_NO_UNROLL
    for (int64_t k = 0; k < p.K; ++k) {
      if (p.gz) {
        const int64_t base = k * p.RE + m0;
        A g[4];
        Mem<A>::load4(p.gz, p.dt, base, 1, 0, valid, g);
        if (need_eps) {
          const int sh = static_cast<int>(base & 3);
          const uint64_t b0 = static_cast<uint64_t>(base >> 2);
          float n0[4], n1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          normals4(seed, b0, n0);
          if (sh + valid > 4) normals4(seed, b0 + 1, n1);
          VF_UNROLL
          for (int e = 0; e < 4; ++e) sge[e] += g[e] * static_cast<A>(pick8(n0, n1, sh + e));
        }
        VF_UNROLL
        for (int e = 0; e < 4; ++e) sg[e] += g[e];
      }
      if (p.gq) {
        const A* gq = static_cast<const A*>(p.gq) + k * p.R;
        VF_UNROLL
        for (int e = 0; e < 4; ++e)
          if (e < valid) sgq[e] += ldg(gq + row[e]);
      }
    }
    A dmu[4], dlv[4];
    VF_UNROLL
    for (int e = 0; e < 4; ++e) {
      dmu[e] = sg[e];
      dlv[e] = sgq[e] * static_cast<A>(elbo::kLogQDlogvar);
      if (need_eps) dlv[e] += elbo::reparameterize_dlogvar(elbo::sigma_from_logvar(lv[e]), sge[e]);
    }
    if (p.gkl) {
      const A* gkl = static_cast<const A*>(p.gkl);
      VF_UNROLL
      for (int e = 0; e < 4; ++e) {
        if (e < valid) {
          A a, b;
          elbo::kl_std_grad(ldg(gkl + row[e]), mu[e], lv[e], a, b);
          dmu[e] += a;
          dlv[e] += b;
        }
      }
    }
    if (p.gmu) Mem<A>::store4(p.gmu, p.dt, m0, 1, 0, valid, dmu);
    if (p.glv) Mem<A>::store4(p.glv, p.dt, m0, 1, 0, valid, dlv);
  }
}

namespace {

bool common_checks(const SParams& p) {
  const int dt = static_cast<int>(p.dt);
  return dt >= 0 && dt <= 3 && p.R >= 0 && p.E >= 0 && p.K >= 1 && p.mu && p.lv;
}

SParams base_params(const SampleArgs& a) {
  SParams p;
  p.mu = a.mu;
  p.lv = a.logvar;
  p.dt = a.dtype;
  p.R = a.rows;
  p.E = a.event_numel;
  p.K = a.num_samples;
  p.RE = a.rows * a.event_numel;
  p.re_div = make_fastdiv(p.RE);
  p.e_div = make_fastdiv(p.E);
  p.r_div = make_fastdiv(p.R);
  p.seed = a.seed;
  return p;
}

template <class A>
cudaError_t forward_typed(SParams& p, cudaStream_t stream) {
  if (p.log_q == nullptr && p.kl == nullptr) {
    if (p.z == nullptr || p.RE == 0) return cudaSuccess;
    const int64_t nb = (p.K * p.RE + 3) / 4;
    return launch_kernel(&sample_z_kernel<A>, flat_grid(nb, 256), 256, stream, p);
  }
  p.need_eps = p.z != nullptr || p.log_q != nullptr;
  p.n_rows = p.need_eps ? p.K * p.R : p.R;  // kl alone needs sample 0's rows only
  if (p.n_rows == 0) return cudaSuccess;
  const int64_t nb = p.E == 0 ? 0 : (p.E + 3) / 4 + 1;  // Philox blocks per row, at most
  p.tpr = pick_tpr(nb, p.n_rows, 512);
  int64_t grid = 0;
  int block = 0;
  group_grid(p.tpr, p.n_rows, grid, block);
  return launch_kernel(&sample_rows_kernel<A>, grid, block, stream, p);
}

}  // namespace
}  // namespace detail

cudaError_t launch_sample_forward(const SampleArgs& args, cudaStream_t stream) {
  using namespace detail;
  SParams p = base_params(args);
  if (!common_checks(p)) return cudaErrorInvalidValue;
  p.z = args.z;
  p.log_q = args.log_q;
  p.kl = args.kl;
  if ((p.z || p.log_q) && !p.seed) return cudaErrorInvalidValue;
  if (p.R == 0) return cudaSuccess;
  return p.dt == DType::Float64 ? forward_typed<double>(p, stream) : forward_typed<float>(p, stream);
}

cudaError_t launch_sample_backward(const SampleArgs& args, cudaStream_t stream) {
  using namespace detail;
  SParams p = base_params(args);
  if (!common_checks(p)) return cudaErrorInvalidValue;
  p.gz = args.grad_z;
  p.gq = args.grad_log_q;
  p.gkl = args.grad_kl;
  p.gmu = args.grad_mu;
  p.glv = args.grad_logvar;
  if (p.gz && p.glv && !p.seed) return cudaErrorInvalidValue;
  if ((!p.gmu && !p.glv) || p.RE == 0) return cudaSuccess;
  const int64_t nc = (p.RE + 3) / 4;
  const int64_t grid = flat_grid(nc, 256);
  return p.dt == DType::Float64
             ? launch_kernel(&sample_bwd_kernel<double>, grid, 256, stream, p)
             : launch_kernel(&sample_bwd_kernel<float>, grid, 256, stream, p);
}

}  // namespace vae_fast::cuda
