// CPU kernels of the discretized mixture of logistics (core/launch_args.h: DmolArgs; the maths:
// core/dmol_math.h). Compiled once per ISA, like rows.cpp (CMake adds it to the per-ISA object
// libraries), so everything lives in vae_fast::<ISA>::.
//
// Work unit: one line (row r, image row h) of W pixels, taken in chunks of kPix pixels. A chunk's x
// and params are gathered into [channel][pixel] / [P][pixel] buffers in the accumulation type (any
// dtype, any strides: channels_first, channels_last and PixelCNN++'s (B, H, W, P) read in place), the
// pixels are computed a SIMD vector at a time (padding lanes hold benign zeros and are dropped), and
// each line's log-probabilities are summed in double in w order. Rows (PerRow) sum their lines in
// h order after the parallel loop: every sum's order is fixed by the shape, never by the threads.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "core/isa.h"
#include "cpu/vec_math.h"

#include "core/dmol_math.h"
#include "core/launch_args.h"
#include "core/philox.h"
#include "cpu/kernels.h"
#include "cpu/typed_io.h"

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace cpu {
namespace {

using namespace elbo;

template <class T>
using Vec = at::vec::Vectorized<T>;

constexpr int kPix = 16;  // pixels per chunk (a multiple of every Vec<float / double>::size())

// n values at base[off + i * stride] into dst[0, n), dst[n, kPix) = 0 (typed_io.h).
template <class acc_t>
void gather(DType dt, const void* base, int64_t off, int64_t stride, int n, acc_t* dst) {
  gather_padded(dt, base, off, stride, n, kPix, dst);
}

inline int64_t params_count(const DmolArgs& a) {
  const int64_t C = a.channels;
  return a.mixtures * (1 + 2 * C + C * (C - 1) / 2);
}

struct Line {
  int64_t row, h, x_off, p_off;
};

inline Line line_of(const DmolArgs& a, int64_t unit) {
  const int64_t row = unit / a.height, h = unit % a.height;
  const int64_t o = row / a.inner, i = row % a.inner;
  return {row, h, o * a.xs.outer + i * a.xs.inner + h * a.xs.h, o * a.ps.outer + i * a.ps.inner + h * a.ps.h};
}

inline int64_t at_pixel(const DmolStrides& s, const DmolArgs& a, int64_t row, int64_t h, int64_t w) {
  return (row / a.inner) * s.outer + (row % a.inner) * s.inner + h * s.h + w * s.w;
}

// One chunk's x ([C][kPix]) and params ([P][kPix]).
template <class acc_t>
void load_chunk(const DmolArgs& a, const Line& L, int64_t w0, int n, int64_t P, acc_t* xbuf, acc_t* pbuf) {
  for (int c = 0; c < a.channels; ++c)
    gather(a.x_dtype, a.x, L.x_off + c * a.xs.c + w0 * a.xs.w, a.xs.w, n, xbuf + c * kPix);
  if (a.ps.c == 1 && a.ps.w != 1) {  // P contiguous per pixel (PixelCNN++'s (B, H, W, P)): a transpose
    acc_t tmp[kDmolMaxMixtures * 10 + kPix];
    for (int j = 0; j < n; ++j) {
      gather(a.params_dtype, a.params, L.p_off + (w0 + j) * a.ps.w, 1, static_cast<int>(P), tmp);
      for (int64_t p = 0; p < P; ++p) pbuf[p * kPix + j] = tmp[p];
    }
    for (int64_t p = 0; p < P; ++p)
      for (int j = n; j < kPix; ++j) pbuf[p * kPix + j] = acc_t(0);
  } else {
    for (int64_t p = 0; p < P; ++p)
      gather(a.params_dtype, a.params, L.p_off + p * a.ps.c + w0 * a.ps.w, a.ps.w, n, pbuf + p * kPix);
  }
}

template <class acc_t>
struct VecReader {
  const acc_t* base;  // pbuf + lane offset
  Vec<acc_t> operator()(int p) const { return Vec<acc_t>::loadu(base + p * kPix); }
};
template <class acc_t>
struct VecWriter {
  acc_t* base;
  void operator()(int p, const Vec<acc_t>& v) const { v.store(base + p * kPix); }
};

inline int64_t line_grain(const DmolArgs& a) {  // lines per task: ~64 pixels at least
  return std::max<int64_t>(1, 64 / std::max<int64_t>(1, a.width));
}

template <class acc_t, int C>
void forward_typed(const DmolArgs& a) {
  using V = Vec<acc_t>;
  const int64_t P = params_count(a), units = a.outer * a.inner * a.height;
  const int M = a.mixtures;
  const DmolBits<V> bits = dmol_bits<V>(a.num_bits, a.grid_tol);
  std::vector<double> line_sums(a.reduce == DmolReduce::PerRow ? static_cast<size_t>(units) : 0);
  acc_t* out = static_cast<acc_t*>(a.out);
  at::parallel_for(0, units, line_grain(a), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> pbuf_v(static_cast<size_t>(P * kPix) + V::size());
    acc_t* pbuf = pbuf_v.data();
    alignas(64) acc_t xbuf[C * kPix];
    alignas(64) acc_t lp[kPix];
    for (int64_t u = u0; u < u1; ++u) {
      const Line L = line_of(a, u);
      double sum = 0.0;
      for (int64_t w0 = 0; w0 < a.width; w0 += kPix) {
        const int n = static_cast<int>(std::min<int64_t>(kPix, a.width - w0));
        load_chunk(a, L, w0, n, P, xbuf, pbuf);
        for (int v = 0; v < n; v += V::size()) {
          V x[C];
          for (int c = 0; c < C; ++c) x[c] = V::loadu(xbuf + c * kPix + v);
          dmol_log_prob_pixel<C>(x, M, a, bits, VecReader<acc_t>{pbuf + v}).store(lp + v);
        }
        if (a.reduce == DmolReduce::PerPixel) {
          for (int j = 0; j < n; ++j) out[at_pixel(a.os, a, L.row, L.h, w0 + j)] = lp[j];
        } else {
          for (int j = 0; j < n; ++j) sum += static_cast<double>(lp[j]);
        }
      }
      if (a.reduce == DmolReduce::PerLine) out[at_pixel(a.os, a, L.row, L.h, 0)] = static_cast<acc_t>(sum);
      else if (a.reduce == DmolReduce::PerRow) line_sums[static_cast<size_t>(u)] = sum;
    }
  });
  if (a.reduce == DmolReduce::PerRow) {
    const int64_t rows = a.outer * a.inner;
    at::parallel_for(0, rows, 1024, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        double s = 0.0;
        for (int64_t h = 0; h < a.height; ++h) s += line_sums[static_cast<size_t>(r * a.height + h)];
        out[at_pixel(a.os, a, r, 0, 0)] = static_cast<acc_t>(s);
      }
    });
  }
}

template <class acc_t, int C>
void backward_typed(const DmolArgs& a) {
  using V = Vec<acc_t>;
  const int64_t P = params_count(a), units = a.outer * a.inner * a.height;
  const int M = a.mixtures;
  const DmolBits<V> bits = dmol_bits<V>(a.num_bits, a.grid_tol);
  const acc_t* grad = static_cast<const acc_t*>(a.grad);
  at::parallel_for(0, units, line_grain(a), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> buf(static_cast<size_t>(2 * P * kPix) + V::size());
    acc_t* pbuf = buf.data();
    acc_t* dpbuf = pbuf + P * kPix;
    alignas(64) acc_t xbuf[C * kPix];
    alignas(64) acc_t dxbuf[C * kPix];
    alignas(64) acc_t gbuf[kPix];
    for (int64_t u = u0; u < u1; ++u) {
      const Line L = line_of(a, u);
      for (int64_t w0 = 0; w0 < a.width; w0 += kPix) {
        const int n = static_cast<int>(std::min<int64_t>(kPix, a.width - w0));
        load_chunk(a, L, w0, n, P, xbuf, pbuf);
        for (int j = 0; j < kPix; ++j) gbuf[j] = j < n ? grad[at_pixel(a.gs, a, L.row, L.h, w0 + j)] : acc_t(0);
        for (int v = 0; v < n; v += V::size()) {
          V x[C], dx[C];
          for (int c = 0; c < C; ++c) x[c] = V::loadu(xbuf + c * kPix + v);
          dmol_log_prob_pixel_grad<C>(x, M, a, bits, V::loadu(gbuf + v), VecReader<acc_t>{pbuf + v},
                                      VecWriter<acc_t>{dpbuf + v}, dx);
          for (int c = 0; c < C; ++c) dx[c].store(dxbuf + c * kPix + v);
        }
        if (a.dx) {
          for (int c = 0; c < C; ++c)
            scatter(dxbuf + c * kPix, n, a.dx_dtype, a.dx, at_pixel(a.dxs, a, L.row, L.h, w0) + c * a.dxs.c, a.dxs.w);
        }
        if (a.dparams) {
          const int64_t base = at_pixel(a.dps, a, L.row, L.h, w0);
          if (a.dps.c == 1 && a.dps.w != 1) {  // P contiguous per pixel: transpose back
            for (int j = 0; j < n; ++j)
              for (int64_t p = 0; p < P; ++p)
                write_at(a.dparams_dtype, a.dparams, base + j * a.dps.w + p, dpbuf[p * kPix + j]);
          } else {
            for (int64_t p = 0; p < P; ++p) scatter(dpbuf + p * kPix, n, a.dparams_dtype, a.dparams, base + p * a.dps.c, a.dps.w);
          }
        }
      }
    }
  });
}

// Scalar parameter reader of one pixel (the sampler).
template <class T>
struct PixelReader {
  const DmolArgs* a;
  int64_t off;
  T operator()(int p) const { return read_at<T>(a->params_dtype, a->params, off + p * a->ps.c); }
};

struct PixelUniforms {
  uint64_t seed, n;
  mutable uint32_t block[4];
  mutable int64_t cached = -1;
  float operator()(int i) const {
    const int64_t j = i / 4;
    if (j != cached) {
      block[0] = static_cast<uint32_t>(n);
      block[1] = static_cast<uint32_t>(n >> 32);
      block[2] = static_cast<uint32_t>(j);
      block[3] = kDmolCounterTag;
      philox::philox4x32_10(block, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      cached = j;
    }
    return dmol_uniform(block[i % 4]);
  }
};

template <class T, int C>
void sample_typed(const DmolArgs& a) {
  const int64_t units = a.outer * a.inner * a.height;
  const uint64_t seed = a.seed ? static_cast<uint64_t>(*a.seed) : a.seed_value;
  at::parallel_for(0, units, line_grain(a), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const Line L = line_of(a, u);
      for (int64_t w = 0; w < a.width; ++w) {
        const uint64_t n = static_cast<uint64_t>((L.row * a.height + L.h) * a.width + w);
        T out[C];
        dmol_sample_pixel<C, T>(a.mixtures, a, a.num_bits, PixelReader<T>{&a, L.p_off + w * a.ps.w},
                                PixelUniforms{seed, n, {}, -1}, out);
        const int64_t so = at_pixel(a.ss, a, L.row, L.h, w);
        for (int c = 0; c < C; ++c) write_at<T>(a.params_dtype, a.sample, so + c * a.ss.c, out[c]);
      }
    }
  });
}

}  // namespace

void dmol_forward(const DmolArgs& a) {
  const bool f64 = a.acc_dtype == DType::Float64;
  if (a.channels == 3) f64 ? forward_typed<double, 3>(a) : forward_typed<float, 3>(a);
  else f64 ? forward_typed<double, 1>(a) : forward_typed<float, 1>(a);
}

void dmol_backward(const DmolArgs& a) {
  const bool f64 = a.acc_dtype == DType::Float64;
  if (a.channels == 3) f64 ? backward_typed<double, 3>(a) : backward_typed<float, 3>(a);
  else f64 ? backward_typed<double, 1>(a) : backward_typed<float, 1>(a);
}

void dmol_sample(const DmolArgs& a) {
  const bool f64 = a.acc_dtype == DType::Float64;
  if (a.channels == 3) f64 ? sample_typed<double, 3>(a) : sample_typed<float, 3>(a);
  else f64 ? sample_typed<double, 1>(a) : sample_typed<float, 1>(a);
}

}  // namespace cpu
VF_ISA_NS_END
}  // namespace vae_fast
