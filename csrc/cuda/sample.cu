// Reparameterised sampling z = mu + exp(logvar / 2) * eps with eps from core/philox.h's counter layout
// (the normal of flat element i of z comes from Philox block i / 4), forward and backward. The seed
// is read on the device (CUDA-graph capture safe) or passed by value (SampleArgs::seed_value). mu and
// logvar are read in place through launch_args.h's (run, run stride) description, so chunks of an
// encoder output need no copy. eps is float32 (Box-Muller in float32 with the
// accurate logf/sqrtf and sincospif, no fast math), so the CPU and this code draw the same eps to float
// rounding; everything else is computed in float (double for float64). Every kernel issues its
// loads before the Philox draw, which hides their latency.
//
// Kernels (grid-stride, no atomics):
//  * sample_z_kernel: z only. One thread per Philox block: 4 consecutive elements of z.
//  * sample_rows_kernel: z with kl[r] and/or log_q[k, r]. One group of tpr (<= 256) threads per row
//    (k, r) of z; lane l takes the row's Philox blocks l, l + tpr, ... (a block that straddles two
//    rows is drawn by both), sums its terms in order, then a fixed butterfly; lane 0 stores.
//  * sample_bwd_kernel: one thread per 4 consecutive (r, j) positions, looping k = 0 .. K-1 in
//    order (sum_k g and sum_k g * eps in registers), eps regenerated from the seed. With
//    log_q_path_only, log_q's gradient reaches mu and logvar through z only (elbo::log_q_path_grad
//    per sample) instead of the constant d log_q / d logvar = -1/2. grad_mu and grad_logvar are
//    written in their runs (the two halves of one parameters-shaped buffer, or contiguous). K = 1
//    has its own instance: single terms, no compensated sums (the same values).
// logvar_clamp: logvar is clamped on load in every kernel; grad_logvar gets torch.clamp's mask.
// Every sum is compensated (common.cuh's CSum) and taken in a fixed order.
#include "cuda/kernels.h"
#include "cuda/common.cuh"

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
  // memory of mu / logvar: logical element m at (m / run) * stride + m % run (launch_args.h)
  bool contig = true;  // run strides equal to run: element m at m
  int64_t run = 1, mu_rs = 1, lv_rs = 1;
  FastDiv run_div;
  // the same for grad_mu / grad_logvar (SampleArgs::grad_run ...)
  bool gcontig = true;
  int64_t grun = 1, gmu_rs = 1, glv_rs = 1;
  FastDiv grun_div;
  bool clamp = false;  // logvar clamped on load (launch_args.h's Clamp); grad_logvar masked
  double clo = 0.0, chi = 0.0;
  const int64_t* seed = nullptr;  // nullptr: seed_value
  uint64_t seed_value = 0;
  bool path_only = false;
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

VF_DEV uint64_t read_seed(const SParams& p) {
  if (p.seed == nullptr) return p.seed_value;
  return static_cast<uint64_t>(ldg(reinterpret_cast<const long long*>(p.seed)));
}

// Memory offset of logical element m of a tensor with run stride rs.
VF_DEV int64_t run_offset(const SParams& p, int64_t m, int64_t rs) {
  if (p.contig) return m;
  const int64_t q = fdiv(p.run_div, m);
  return q * rs + (m - q * p.run);
}

// Stores logical elements m0 .. m0 + valid - 1 of grad_mu or grad_logvar (run stride rs of the
// gradients' runs): one vector access inside a run, else per element.
template <class A>
VF_DEV void store_grad4(const SParams& p, void* base, int64_t rs, int64_t m0, int valid, const A (&v)[4]) {
  if (p.gcontig) {
    Mem<A>::store4(base, p.dt, m0, 1, 0, valid, v);
    return;
  }
  const int64_t q = fdiv(p.grun_div, m0);
  const int64_t w = m0 - q * p.grun;
  if (w + valid <= p.grun) {
    Mem<A>::store4(base, p.dt, q * rs + w, 1, 0, valid, v);
    return;
  }
  VF_UNROLL
  for (int e = 0; e < 4; ++e) {
    if (e >= valid) continue;
    const int64_t qe = fdiv(p.grun_div, m0 + e);
    Mem<A>::store1(base, p.dt, qe * rs + (m0 + e - qe * p.grun), v[e]);
  }
}

// logvar as the kernels use it: clamped when SampleArgs::logvar_clamp is on; keep[e]: the clamp's
// gradient mask.
template <class A>
VF_DEV void clamp_lv4(const SParams& p, A (&lv)[4], bool (&keep)[4]) {
  VF_UNROLL
  for (int e = 0; e < 4; ++e) keep[e] = p.clamp ? clamp_keep(lv[e], A(p.clo), A(p.chi)) : true;
}

// Logical elements m0 + e (lo <= e < hi, m0 + lo >= 0) of mu or logvar (base, run stride rs); the
// other lanes read as 0. One vector access when the chunk lies inside one run, else per element.
template <class A>
VF_DEV void load_logical4(const SParams& p, const void* base, int64_t rs, int64_t m0, int lo, int hi,
                          A (&v)[4]) {
  if (p.contig || hi <= lo) {
    Mem<A>::load4(base, p.dt, m0, 1, lo, hi, v);
    return;
  }
  const int64_t first = m0 + lo;
  const int64_t q = fdiv(p.run_div, first);
  const int64_t w = first - q * p.run;  // position of the first element in its run
  if (w + (hi - lo) <= p.run) {
    Mem<A>::load4(base, p.dt, q * rs + w - lo, 1, lo, hi, v);
    return;
  }
  VF_UNROLL
  for (int e = 0; e < 4; ++e)
    v[e] = (e >= lo && e < hi) ? Mem<A>::load1(base, p.dt, run_offset(p, m0 + e, rs)) : A(0);
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
  const uint64_t seed = read_seed(p);
  const int64_t total = p.K * p.RE;
  const int64_t nb = (total + 3) / 4;
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t b = bid_x() * bdim_x() + tid_x(); b < nb; b += stride) {
    const int64_t i0 = 4 * b;
    const int valid = total - i0 < 4 ? static_cast<int>(total - i0) : 4;
    const int64_t m0 = i0 - fdiv(p.re_div, i0) * p.RE;  // i0 mod RE
    A mu[4], lv[4];
    if (m0 + valid <= p.RE) {
      load_logical4(p, p.mu, p.mu_rs, m0, 0, valid, mu);
      load_logical4(p, p.lv, p.lv_rs, m0, 0, valid, lv);
    } else {  // wraps around the end of mu: a new sample k starts inside this block
      VF_UNROLL
      for (int e = 0; e < 4; ++e) {
        mu[e] = A(0);
        lv[e] = A(0);
        if (e < valid) {
          const int64_t me = m0 + e;
          const int64_t m = me - fdiv(p.re_div, me) * p.RE;
          mu[e] = Mem<A>::load1(p.mu, p.dt, run_offset(p, m, p.mu_rs));
          lv[e] = Mem<A>::load1(p.lv, p.dt, run_offset(p, m, p.lv_rs));
        }
      }
    }
    float n[4];  // drawn after the loads are issued: the draw hides their latency
    normals4(seed, static_cast<uint64_t>(b), n);
    bool keep[4];
    clamp_lv4(p, lv, keep);
    A z[4];
    VF_UNROLL
    for (int e = 0; e < 4; ++e)
      z[e] = elbo::reparameterize(mu[e], elbo::sigma_from_logvar(lv[e]), static_cast<A>(n[e]));
    Mem<A>::store4(p.z, p.dt, i0, 1, 0, valid, z);
  }
}

template <class A>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, sizeof(A) == 4 ? 4 : 2) sample_rows_kernel(const VF_GRID_CONST SParams p) {
  VF_SHARED_ARRAY(SumPair<A>, smem, 32);
  const ThreadGroup g(p.tpr);
  const uint64_t seed = p.need_eps ? read_seed(p) : 0;
  VF_NO_UNROLL
  for (int64_t q = g.first(); q < p.n_rows; q += g.ngroups) {  // group-uniform
    const int64_t k = fdiv(p.r_div, q);
    const int64_t r = q - k * p.R;
    const bool do_kl = p.kl != nullptr && k == 0;
    const int64_t i0 = q * p.E;  // flat index of z[k, r, 0]
    CSum<A> lq, kl;
    if (p.E > 0) {
      const int64_t b_first = i0 / 4, b_last = (i0 + p.E - 1) / 4;
      VF_NO_UNROLL
      for (int64_t b = b_first + g.lane; b <= b_last; b += g.tpr) {
        const int64_t base = 4 * b;
        const int lo = i0 > base ? static_cast<int>(i0 - base) : 0;
        const int hi = i0 + p.E - base < 4 ? static_cast<int>(i0 + p.E - base) : 4;
        const int64_t m = r * p.E + (base - i0);  // logical mu index of element e = 0 (used for e >= lo)
        A mu[4], lv[4];
        load_logical4(p, p.mu, p.mu_rs, m, lo, hi, mu);
        load_logical4(p, p.lv, p.lv_rs, m, lo, hi, lv);
        bool keep[4];
        clamp_lv4(p, lv, keep);
        float n[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (p.need_eps) normals4(seed, static_cast<uint64_t>(b), n);
        A z[4];
        VF_UNROLL
        for (int e = 0; e < 4; ++e) {
          const A eps = static_cast<A>(n[e]);
          z[e] = elbo::reparameterize(mu[e], elbo::sigma_from_logvar(lv[e]), eps);
          if (e >= lo && e < hi) {
            if (p.log_q) lq.add(elbo::log_q_from_eps(lv[e], eps));
            if (do_kl) kl.add(elbo::kl_std(mu[e], lv[e]));
          }
        }
        if (p.z) Mem<A>::store4(p.z, p.dt, base, 1, lo, hi, z);
      }
    }
    if (p.log_q) {
      const A total = g.sum(lq, smem);
      if (g.lane == 0) st(static_cast<A*>(p.log_q) + q, total);
    }
    if (do_kl) {  // group-uniform (k is the group's)
      const A total = g.sum(kl, smem);
      if (g.lane == 0) st(static_cast<A*>(p.kl) + r, total);
    }
  }
}

// kOne: K == 1, the sums over k single terms (Plain: no compensation registers, the same values).
// 2 blocks of 256 per SM, but 1 for float64 with K > 1 (its four compensated arrays spill at 128).
template <class A, bool kOne>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, kOne || sizeof(A) == 4 ? 2 : 1) sample_bwd_kernel(const VF_GRID_CONST SParams p) {
  using Acc = std::conditional_t<kOne, Plain<A>, CSum<A>>;
  const bool path = p.path_only && p.gq != nullptr;      // log_q's gradient through z only
  const bool eps_z = p.gz != nullptr && p.glv != nullptr;  // dlogvar from grad_z needs eps
  const bool need_eps = eps_z || path;
  const bool need_mu = p.gkl != nullptr && p.gmu != nullptr;
  const bool need_lv = p.glv != nullptr || path;
  const bool need_row = p.gq != nullptr || p.gkl != nullptr;  // per-row gradients: row of each element
  const uint64_t seed = need_eps ? read_seed(p) : 0;
  const int64_t K = kOne ? 1 : p.K;
  const int64_t nc = (p.RE + 3) / 4;
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t c = bid_x() * bdim_x() + tid_x(); c < nc; c += stride) {
    const int64_t m0 = 4 * c;
    const int valid = p.RE - m0 < 4 ? static_cast<int>(p.RE - m0) : 4;
    int64_t row[4];
    VF_UNROLL
    for (int e = 0; e < 4; ++e) row[e] = need_row && e < valid ? fdiv(p.e_div, m0 + e) : 0;
    A mu[4], lv[4];
    load_logical4(p, p.mu, p.mu_rs, m0, 0, need_mu ? valid : 0, mu);
    load_logical4(p, p.lv, p.lv_rs, m0, 0, need_lv ? valid : 0, lv);
    bool keep[4];
    clamp_lv4(p, lv, keep);
    // sums over k: g, g * eps (grad_z); grad_log_q, or (path) its terms of dmu and dlogvar in
    // sgq and plv
    Acc sg[4], sge[4], sgq[4], plv[4];
    VF_NO_UNROLL
    for (int64_t k = 0; k < K; ++k) {
      const int64_t base = k * p.RE + m0;
      // the loads first, then the draw that hides their latency
      A g[4] = {A(0), A(0), A(0), A(0)}, gq[4] = {A(0), A(0), A(0), A(0)};
      if (p.gz) Mem<A>::load4(p.gz, p.dt, base, 1, 0, valid, g);
      if (p.gq) {
        const A* gqk = static_cast<const A*>(p.gq) + k * p.R;
        VF_UNROLL
        for (int e = 0; e < 4; ++e)
          if (e < valid) gq[e] = ldg(gqk + row[e]);
      }
      float n0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, n1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const int sh = static_cast<int>(base & 3);
      if (need_eps) {
        const uint64_t b0 = static_cast<uint64_t>(base >> 2);
        normals4(seed, b0, n0);
        if (sh + valid > 4) normals4(seed, b0 + 1, n1);
      }
      if (p.gz) {
        VF_UNROLL
        for (int e = 0; e < 4; ++e) {
          sg[e].add(g[e]);
          if (eps_z) sge[e].add(g[e] * static_cast<A>(pick8(n0, n1, sh + e)));
        }
      }
      if (p.gq) {
        VF_UNROLL
        for (int e = 0; e < 4; ++e) {
          if (e >= valid) continue;
          if (path) {
            A dmu, dlv;
            elbo::log_q_path_grad(gq[e], static_cast<A>(pick8(n0, n1, sh + e)), lv[e], dmu, dlv);
            sgq[e].add(dmu);
            plv[e].add(dlv);
          } else {
            sgq[e].add(gq[e]);
          }
        }
      }
    }
    A dmu[4], dlv[4];
    VF_UNROLL
    for (int e = 0; e < 4; ++e) {
      CSum<A> m = as_csum(sg[e]), l;
      if (path) {
        m.merge(as_csum(sgq[e]));
        l = as_csum(plv[e]);
      } else {
        l.add(sgq[e].value() * static_cast<A>(elbo::kLogQDlogvar));
      }
      if (eps_z) l.add(elbo::reparameterize_dlogvar(elbo::sigma_from_logvar(lv[e]), sge[e].value()));
      if (p.gkl && e < valid) {
        A a, b;
        elbo::kl_std_grad(ldg(static_cast<const A*>(p.gkl) + row[e]), mu[e], lv[e], a, b);
        m.add(a);
        l.add(b);
      }
      dmu[e] = m.value();
      dlv[e] = keep[e] ? l.value() : A(0);  // torch.clamp's gradient (0 outside, NaN included)
    }
    if (p.gmu) store_grad4(p, p.gmu, p.gmu_rs, m0, valid, dmu);
    if (p.glv) store_grad4(p, p.glv, p.glv_rs, m0, valid, dlv);
  }
}

namespace {

bool common_checks(const SParams& p) {
  const int dt = static_cast<int>(p.dt);
  return dt >= 0 && dt <= 3 && p.R >= 0 && p.E >= 0 && p.K >= 1 && p.mu && p.lv && p.run >= 1 &&
         p.mu_rs >= 0 && p.lv_rs >= 0 && (!p.clamp || p.clo <= p.chi);
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
  p.run = a.run;
  p.mu_rs = a.mu_run_stride;
  p.lv_rs = a.logvar_run_stride;
  p.contig = a.run == a.mu_run_stride && a.run == a.logvar_run_stride;
  p.run_div = make_fastdiv(a.run);
  p.grun = a.grad_run;
  p.gmu_rs = a.grad_mu_run_stride;
  p.glv_rs = a.grad_logvar_run_stride;
  p.gcontig = a.grad_run == a.grad_mu_run_stride && a.grad_run == a.grad_logvar_run_stride;
  p.grun_div = make_fastdiv(a.grad_run);
  p.clamp = a.logvar_clamp.on;
  p.clo = a.logvar_clamp.lo;
  p.chi = a.logvar_clamp.hi;
  p.seed = a.seed;
  p.seed_value = a.seed_value;
  p.path_only = a.log_q_path_only;
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
  p.tpr = pick_tpr(nb, p.n_rows, 256);
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
  if (p.grun < 1 || p.gmu_rs < 0 || p.glv_rs < 0) return cudaErrorInvalidValue;
  if ((!p.gmu && !p.glv) || p.RE == 0) return cudaSuccess;
  const int64_t nc = (p.RE + 3) / 4;
  const int64_t grid = flat_grid(nc, 256);
  if (p.dt == DType::Float64)
    return p.K == 1 ? launch_kernel(&sample_bwd_kernel<double, true>, grid, 256, stream, p)
                    : launch_kernel(&sample_bwd_kernel<double, false>, grid, 256, stream, p);
  return p.K == 1 ? launch_kernel(&sample_bwd_kernel<float, true>, grid, 256, stream, p)
                  : launch_kernel(&sample_bwd_kernel<float, false>, grid, 256, stream, p);
}

}  // namespace vae_fast::cuda
