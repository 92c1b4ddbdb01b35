// The discretized mixture of logistics on the GPU (core/launch_args.h's DmolArgs; the maths: core/dmol_math.h,
// the same templates the CPU kernels run). Framework-free; no atomics.
//
// Kernels (grid-stride, one thread per pixel n = (r * H + h) * W + w, r the logical row):
//  * dmol_fwd_kernel: the pixel's log-probability, into out (PerPixel) or into args.scratch
//    (contiguous (rows, H, W), acc type) for
//  * dmol_sum_kernel: one group of tpr threads per output (a line of W pixels, or a row of H * W):
//    lane l adds pixels l, l + tpr, ... in order (compensated, common.cuh's CSum), then the group's fixed
//    butterfly; lane 0 stores. The order is fixed by the shapes: bitwise reproducible.
//  * dmol_bwd_kernel: the pixel's gradients: every dparams entry and dx entry of the pixel, once.
//  * dmol_sample_kernel: the pixel's sample, its uniforms from Philox blocks
//    (n, j, kDmolCounterTag) under the seed (read on the device, or by value): CPU == CUDA.
// Computed in float (double for float64); x and params may have different 16/32-bit dtypes.
#include "cuda/kernels.h"
#include "cuda/common.cuh"
#include "core/dmol_math.h"

#include <algorithm>

namespace vae_fast::cuda {
namespace detail {

struct DParams {
  DmolArgs a;
  int64_t n_pix = 0;
  FastDiv w_div, h_div, inner_div;
  // dmol_sum_kernel
  int32_t tpr = 1;
  int64_t n_out = 0, len = 1;
  FastDiv lines_div;  // PerLine: j = row * H + h
};

template <class A>
struct DevReader {
  const void* base;
  DType dt;
  int64_t off, stride;
  VF_DEV A operator()(int p) const { return Mem<A>::load1(base, dt, off + p * stride); }
};

template <class A>
struct DevWriter {
  void* base;
  DType dt;
  int64_t off, stride;
  VF_DEV void operator()(int p, A v) const { Mem<A>::store1(base, dt, off + p * stride, v); }
};

struct Pixel {
  int64_t row, o, i, h, w;
};

VF_DEV Pixel pixel_of(const DParams& p, int64_t n) {
  Pixel px;
  const int64_t t = fdiv(p.w_div, n);
  px.w = n - t * p.a.width;
  px.row = fdiv(p.h_div, t);
  px.h = t - px.row * p.a.height;
  px.o = fdiv(p.inner_div, px.row);
  px.i = px.row - px.o * p.a.inner;
  return px;
}

VF_DEV int64_t at(const DmolStrides& s, const Pixel& px) {
  return px.o * s.outer + px.i * s.inner + px.h * s.h + px.w * s.w;
}

template <class A, int C>
VF_DEV void load_x(const DParams& p, const Pixel& px, A (&x)[C]) {
  const int64_t off = at(p.a.xs, px);
  VF_UNROLL
  for (int c = 0; c < C; ++c) x[c] = Mem<A>::load1(p.a.x, p.a.x_dtype, off + c * p.a.xs.c);
}

template <class A, int C>
VF_GLOBAL void VF_LAUNCH_BOUNDS(128) dmol_fwd_kernel(const VF_GRID_CONST DParams p) {
  const elbo::DmolBits<A> bits = elbo::dmol_bits<A>(p.a.num_bits, p.a.grid_tol);
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t n = bid_x() * bdim_x() + tid_x(); n < p.n_pix; n += stride) {
    const Pixel px = pixel_of(p, n);
    A x[C];
    load_x<A, C>(p, px, x);
    const DevReader<A> rd{p.a.params, p.a.params_dtype, at(p.a.ps, px), p.a.ps.c};
    const A lp = elbo::dmol_log_prob_pixel<C>(x, p.a.mixtures, p.a, bits, rd);
    if (p.a.reduce == DmolReduce::PerPixel) Mem<A>::store1(p.a.out, p.a.acc_dtype, at(p.a.os, px), lp);
    else Mem<A>::store1(p.a.scratch, p.a.acc_dtype, n, lp);
  }
}

template <class A>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256) dmol_sum_kernel(const VF_GRID_CONST DParams p) {
  VF_SHARED_ARRAY(SumPair<A>, smem, 32);
  const ThreadGroup g(p.tpr);
  VF_NO_UNROLL
  for (int64_t j = g.first(); j < p.n_out; j += g.ngroups) {  // group-uniform
    CSum<A> s;
    VF_NO_UNROLL
    for (int64_t e = g.lane; e < p.len; e += g.tpr) s.add(Mem<A>::load1(p.a.scratch, p.a.acc_dtype, j * p.len + e));
    const A v = g.sum(s, smem);
    if (g.lane == 0) {
      Pixel px{};
      if (p.a.reduce == DmolReduce::PerLine) {
        px.row = fdiv(p.lines_div, j);
        px.h = j - px.row * p.a.height;
      } else {
        px.row = j;
      }
      px.o = fdiv(p.inner_div, px.row);
      px.i = px.row - px.o * p.a.inner;
      Mem<A>::store1(p.a.out, p.a.acc_dtype, at(p.a.os, px), v);
    }
  }
}

template <class A, int C>
VF_GLOBAL void VF_LAUNCH_BOUNDS(128) dmol_bwd_kernel(const VF_GRID_CONST DParams p) {
  const elbo::DmolBits<A> bits = elbo::dmol_bits<A>(p.a.num_bits, p.a.grid_tol);
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t n = bid_x() * bdim_x() + tid_x(); n < p.n_pix; n += stride) {
    const Pixel px = pixel_of(p, n);
    A x[C], dx[C];
    load_x<A, C>(p, px, x);
    const A g = Mem<A>::load1(p.a.grad, p.a.acc_dtype, at(p.a.gs, px));
    const DevReader<A> rd{p.a.params, p.a.params_dtype, at(p.a.ps, px), p.a.ps.c};
    if (p.a.dparams) {
      const DevWriter<A> wr{p.a.dparams, p.a.dparams_dtype, at(p.a.dps, px), p.a.dps.c};
      elbo::dmol_log_prob_pixel_grad<C>(x, p.a.mixtures, p.a, bits, g, rd, wr, dx);
    } else {
      struct Drop {
        VF_DEV void operator()(int, A) const {}
      };
      elbo::dmol_log_prob_pixel_grad<C>(x, p.a.mixtures, p.a, bits, g, rd, Drop{}, dx);
    }
    if (p.a.dx) {
      const int64_t off = at(p.a.dxs, px);
      VF_UNROLL
      for (int c = 0; c < C; ++c) Mem<A>::store1(p.a.dx, p.a.dx_dtype, off + c * p.a.dxs.c, dx[c]);
    }
  }
}

// The uniforms of one pixel (DmolArgs' counter layout), one Philox block per 4.
struct PixelUniforms {
  uint64_t seed, n;
  VF_DEV float operator()(int i) const {
    uint32_t c[4] = {static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), static_cast<uint32_t>(i / 4),
                     kDmolCounterTag};
    philox::philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const int e = i & 3;
    return elbo::dmol_uniform(e == 0 ? c[0] : e == 1 ? c[1] : e == 2 ? c[2] : c[3]);
  }
};

template <class A, int C>
VF_GLOBAL void VF_LAUNCH_BOUNDS(128) dmol_sample_kernel(const VF_GRID_CONST DParams p) {
  const uint64_t seed = p.a.seed ? static_cast<uint64_t>(ldg(p.a.seed)) : p.a.seed_value;
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t n = bid_x() * bdim_x() + tid_x(); n < p.n_pix; n += stride) {
    const Pixel px = pixel_of(p, n);
    const DevReader<A> rd{p.a.params, p.a.params_dtype, at(p.a.ps, px), p.a.ps.c};
    A out[C];
    elbo::dmol_sample_pixel<C, A>(p.a.mixtures, p.a, p.a.num_bits, rd, PixelUniforms{seed, static_cast<uint64_t>(n)},
                                   out);
    const int64_t off = at(p.a.ss, px);
    VF_UNROLL
    for (int c = 0; c < C; ++c) Mem<A>::store1(p.a.sample, p.a.params_dtype, off + c * p.a.ss.c, out[c]);
  }
}

inline bool make_params(const DmolArgs& a, DParams& p) {
  if (a.channels != 1 && a.channels != 3) return false;
  if (a.mixtures < 1 || a.mixtures > elbo::kDmolMaxMixtures) return false;
  const bool f64 = a.acc_dtype == DType::Float64;
  if (f64 && ((a.x && a.x_dtype != DType::Float64) || a.params_dtype != DType::Float64)) return false;
  if (!f64 && ((a.x && a.x_dtype == DType::Float64) || a.params_dtype == DType::Float64)) return false;
  p.a = a;
  p.n_pix = a.outer * a.inner * a.height * a.width;
  p.w_div = make_fastdiv(a.width);
  p.h_div = make_fastdiv(a.height);
  p.inner_div = make_fastdiv(a.inner);
  return true;
}

}  // namespace detail

using namespace detail;

cudaError_t launch_dmol_forward(const DmolArgs& a, cudaStream_t stream) {
  DParams p;
  if (!make_params(a, p) || !a.out) return cudaErrorInvalidValue;
  if (a.reduce != DmolReduce::PerPixel && !a.scratch) return cudaErrorInvalidValue;
  const bool f64 = a.acc_dtype == DType::Float64;
  const int block = 128;
  const int64_t grid = flat_grid(p.n_pix, block);
  cudaError_t err;
  if (f64) err = a.channels == 3 ? launch_kernel(dmol_fwd_kernel<double, 3>, grid, block, stream, p)
                                 : launch_kernel(dmol_fwd_kernel<double, 1>, grid, block, stream, p);
  else err = a.channels == 3 ? launch_kernel(dmol_fwd_kernel<float, 3>, grid, block, stream, p)
                             : launch_kernel(dmol_fwd_kernel<float, 1>, grid, block, stream, p);
  if (err != cudaSuccess || a.reduce == DmolReduce::PerPixel) return err;
  const int64_t rows = a.outer * a.inner;
  p.len = a.reduce == DmolReduce::PerLine ? a.width : a.height * a.width;
  p.n_out = a.reduce == DmolReduce::PerLine ? rows * a.height : rows;
  p.lines_div = make_fastdiv(a.height);
  p.tpr = pick_tpr(p.len, p.n_out, 256);
  int64_t sgrid;
  int sblock;
  group_grid(p.tpr, p.n_out, sgrid, sblock);
  return f64 ? launch_kernel(dmol_sum_kernel<double>, sgrid, sblock, stream, p)
             : launch_kernel(dmol_sum_kernel<float>, sgrid, sblock, stream, p);
}

cudaError_t launch_dmol_backward(const DmolArgs& a, cudaStream_t stream) {
  DParams p;
  if (!make_params(a, p) || !a.grad) return cudaErrorInvalidValue;
  if (!a.dx && !a.dparams) return cudaSuccess;
  const bool f64 = a.acc_dtype == DType::Float64;
  const int block = 128;
  const int64_t grid = flat_grid(p.n_pix, block);
  if (f64) return a.channels == 3 ? launch_kernel(dmol_bwd_kernel<double, 3>, grid, block, stream, p)
                                  : launch_kernel(dmol_bwd_kernel<double, 1>, grid, block, stream, p);
  return a.channels == 3 ? launch_kernel(dmol_bwd_kernel<float, 3>, grid, block, stream, p)
                         : launch_kernel(dmol_bwd_kernel<float, 1>, grid, block, stream, p);
}

cudaError_t launch_dmol_sample(const DmolArgs& a, cudaStream_t stream) {
  DParams p;
  if (!make_params(a, p) || !a.sample) return cudaErrorInvalidValue;
  const bool f64 = a.acc_dtype == DType::Float64;
  const int block = 128;
  const int64_t grid = flat_grid(p.n_pix, block);
  if (f64) return a.channels == 3 ? launch_kernel(dmol_sample_kernel<double, 3>, grid, block, stream, p)
                                  : launch_kernel(dmol_sample_kernel<double, 1>, grid, block, stream, p);
  return a.channels == 3 ? launch_kernel(dmol_sample_kernel<float, 3>, grid, block, stream, p)
                         : launch_kernel(dmol_sample_kernel<float, 1>, grid, block, stream, p);
}

}  // namespace vae_fast::cuda
