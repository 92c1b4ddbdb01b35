// Counter-based RNG: Philox4x32-10 (Salmon et al., SC'11) and a Box-Muller normal transform,
// host and device code with one counter layout, so CPU and CUDA draw the same eps for a seed.
//
// Counter layout (fixed, part of the API): the normal for flat element index i of the sampled
// tensor (z of shape (K, *mu.shape), C order) comes from Philox block b = i / 4 with
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (b & 0xffffffff, b >> 32, 0, 0)
// whose four outputs (x0, x1, x2, x3) give the normals of elements 4b .. 4b+3:
//   n0 = r(x0) cos(t(x1)), n1 = r(x0) sin(t(x1)), n2 = r(x2) cos(t(x3)), n3 = r(x2) sin(t(x3)),
//   r(x) = sqrt(-2 log u(x)), t(x) = 2 pi u(x), u(x) = x * 2^-32 + 2^-33 in (0, 1], all in float32,
//   the angle's sine and cosine taken as sincospi(2 u(x)) (2 u exact: no rounding of 2 pi u).
#pragma once
#include <cstdint>

#include "core/isa.h"

#if defined(__CUDACC__)
#define VF_PHILOX_HD __host__ __device__ __forceinline__
#else
#define VF_PHILOX_HD inline
#endif

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;

VF_PHILOX_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// One Philox round on counter (c0..c3) under key (k0, k1); written on scalars so that the CPU can
// run it over arrays of counters (auto-vectorised) and CUDA per thread.
VF_PHILOX_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo(kMul0, c0, hi0, lo0);
  mulhilo(kMul1, c2, hi1, lo1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}
constexpr int kRounds = 10;
VF_PHILOX_HD uint32_t key_for_round(uint32_t k, uint32_t weyl, int r) { return k + weyl * static_cast<uint32_t>(r); }

// Philox4x32-10 of counter c under key (k0, k1), in place.
VF_PHILOX_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r)
    philox_round(c[0], c[1], c[2], c[3], key_for_round(k0, kWeyl0, r), key_for_round(k1, kWeyl1, r));
}

// The four raw outputs of block b for `seed`.
VF_PHILOX_HD void block(uint64_t seed, uint64_t b, uint32_t out[4]) {
  out[0] = static_cast<uint32_t>(b);
  out[1] = static_cast<uint32_t>(b >> 32);
  out[2] = 0u;
  out[3] = 0u;
  philox4x32_10(out, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// u(x) in (0, 1]: never 0, so log(u) is finite (|eps| <= 6.66).
VF_PHILOX_HD float uniform(uint32_t x) {
  return static_cast<float>(x) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
}

}  // namespace philox
VF_ISA_NS_END
}  // namespace vae_fast
