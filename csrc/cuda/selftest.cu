// Standalone test of the CUDA kernels (no torch): runs every launcher on small random inputs and
// compares with a float64 host computation that uses elbo_math.h and philox.h. Prints
// "N passed, N failed" and exits non-zero when something failed.
//
// On a GPU machine (from the repository root):
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_80,code=sm_80
//        -gencode arch=compute_90,code=sm_90 csrc/cuda/selftest.cu csrc/cuda/rows.cu
//        csrc/cuda/sample.cu -o vf_cuda_selftest && ./vf_cuda_selftest
// Anywhere, on the CPU emulator of emu.h (the same kernels, strict about races, bounds, barriers):
//   for f in selftest rows sample; do
//     g++ -std=c++17 -O1 -DVF_EMULATE -x c++ -I/usr/local/cuda/include -c csrc/cuda/$f.cu -o $f.o
//   done && g++ selftest.o rows.o sample.o -o vf_emu_selftest && ./vf_emu_selftest
#include "kernels.h"
#include "common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace vae_fast;
namespace vc = vae_fast::cuda;

namespace {

int g_pass = 0, g_fail = 0;
std::mt19937_64 g_rng(12345);

void report(bool ok, const std::string& name, const std::string& detail = "") {
  if (ok) {
    ++g_pass;
  } else {
    ++g_fail;
    std::printf("FAIL %s %s\n", name.c_str(), detail.c_str());
  }
}

#define CK(call)                                                                           \
  do {                                                                                     \
    cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

const char* dname(DType d) {
  switch (d) {
    case DType::Float32: return "f32";
    case DType::Float64: return "f64";
    case DType::Float16: return "f16";
    case DType::BFloat16: return "bf16";
  }
  return "?";
}
size_t dsize(DType d) { return d == DType::Float64 ? 8 : d == DType::Float32 ? 4 : 2; }

// Value as stored in dtype d (bits into dst), returns the stored value exactly.
double put(void* dst, DType d, double v) {
  switch (d) {
    case DType::Float64: std::memcpy(dst, &v, 8); return v;
    case DType::Float32: { float f = static_cast<float>(v); std::memcpy(dst, &f, 4); return f; }
    case DType::Float16: {
      __half h = __float2half_rn(static_cast<float>(v));
      std::memcpy(dst, &h, 2);
      return __half2float(h);
    }
    case DType::BFloat16: {
      __nv_bfloat16 b = __float2bfloat16_rn(static_cast<float>(v));
      std::memcpy(dst, &b, 2);
      return __bfloat162float(b);
    }
  }
  return 0;
}
double get(const void* src, DType d) {
  switch (d) {
    case DType::Float64: { double v; std::memcpy(&v, src, 8); return v; }
    case DType::Float32: { float v; std::memcpy(&v, src, 4); return v; }
    case DType::Float16: { __half h; std::memcpy(&h, src, 2); return __half2float(h); }
    case DType::BFloat16: { __nv_bfloat16 b; std::memcpy(&b, src, 2); return __bfloat162float(b); }
  }
  return 0;
}

// A device buffer of n elements of dtype d (plus `pad` leading elements to misalign the data).
struct DevBuf {
  void* base = nullptr;
  void* data = nullptr;
  DType dt = DType::Float32;
  int64_t n = 0;
  DevBuf() = default;
  DevBuf(DType d, int64_t n_, int64_t pad = 0) : dt(d), n(n_) {
    CK(cudaMalloc(&base, static_cast<size_t>(std::max<int64_t>(n + pad, 1)) * dsize(d)));
    data = static_cast<char*>(base) + pad * dsize(d);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept { *this = std::move(o); }
  DevBuf& operator=(DevBuf&& o) noexcept {
    std::swap(base, o.base); std::swap(data, o.data); dt = o.dt; n = o.n;
    return *this;
  }
  ~DevBuf() { if (base) cudaFree(base); }
  void upload(const std::vector<unsigned char>& bytes) {
    if (n) CK(cudaMemcpy(data, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  }
  std::vector<double> download() const {
    std::vector<unsigned char> b(static_cast<size_t>(n) * dsize(dt));
    if (n) CK(cudaMemcpy(b.data(), data, b.size(), cudaMemcpyDeviceToHost));
    std::vector<double> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v[i] = get(b.data() + i * dsize(dt), dt);
    return v;
  }
  std::vector<unsigned char> raw() const {
    std::vector<unsigned char> b(static_cast<size_t>(n) * dsize(dt));
    if (n) CK(cudaMemcpy(b.data(), data, b.size(), cudaMemcpyDeviceToHost));
    return b;
  }
  void zero() { if (n) CK(cudaMemset(data, 0, static_cast<size_t>(n) * dsize(dt))); }
};

// Uploads random values (rounded to d) and returns them.
std::vector<double> fill(DevBuf& b, const std::function<double()>& gen) {
  std::vector<unsigned char> bytes(static_cast<size_t>(b.n) * dsize(b.dt));
  std::vector<double> v(static_cast<size_t>(b.n));
  for (int64_t i = 0; i < b.n; ++i) v[i] = put(bytes.data() + i * dsize(b.dt), b.dt, gen());
  b.upload(bytes);
  return v;
}

std::function<double()> normal(double s) {
  return [s] { return std::normal_distribution<double>(0.0, s)(g_rng); };
}
std::function<double()> uniform(double lo, double hi) {
  return [lo, hi] { return std::uniform_real_distribution<double>(lo, hi)(g_rng); };
}

bool close(double got, double ref, double mag, double rtol, double atol) {
  if (std::isnan(ref)) return std::isnan(got);
  return std::fabs(got - ref) <= rtol * mag + atol;
}

double out_rtol(DType d) {
  switch (d) {
    case DType::Float64: return 1e-11;
    case DType::Float32: return 2e-5;
    case DType::Float16: return 2e-3;
    case DType::BFloat16: return 1.2e-2;
  }
  return 0;
}

// ---- row ops ----------------------------------------------------------------------------------
enum Role { kMu, kLv, kX01, kLogit, kNormal };

struct ArgSpec {
  std::vector<int64_t> shape;  // rank of the full shape; 1 where broadcast
  DType dt = DType::Float32;
  Role role = kNormal;
  bool transposed = false;  // memory layout with the dims in reverse order
  int64_t pad = 0;          // leading elements: misaligns the data pointer
  bool grad = true;
};

struct RowCase {
  std::string name;
  OpKind fwd, bwd;
  std::vector<int64_t> full;
  int event_dims = 1;
  std::vector<ArgSpec> args;
  int64_t n_blocks = 1;
  bool elementwise = false;
};

int64_t prod(const std::vector<int64_t>& v) {
  int64_t p = 1;
  for (int64_t x : v) p *= x;
  return p;
}

// Memory strides of a tensor of `shape`, C-contiguous or with the dims reversed.
std::vector<int64_t> mem_strides(const std::vector<int64_t>& shape, bool transposed) {
  const int r = static_cast<int>(shape.size());
  std::vector<int64_t> st(r);
  int64_t s = 1;
  if (!transposed) {
    for (int d = r - 1; d >= 0; --d) { st[d] = s; s *= shape[d]; }
  } else {
    for (int d = 0; d < r; ++d) { st[d] = s; s *= shape[d]; }
  }
  return st;
}

void set_operand(Operand& op, const RowLayout& L, const std::vector<int64_t>& full,
                 const std::vector<int64_t>& shape, const std::vector<int64_t>& st, void* data,
                 DType dt) {
  op.data = data;
  op.dtype = dt;
  const int nr = L.n_row_dims;
  for (int d = 0; d < static_cast<int>(full.size()); ++d) {
    const int64_t s = (shape[d] == 1 && full[d] != 1) ? 0 : st[d];
    if (d < nr) op.row_strides[d] = s;
    else op.event_strides[d - nr] = s;
  }
}

// Flat index over `full` -> element offset in a tensor of `shape` with strides st.
int64_t offset_of(int64_t flat, const std::vector<int64_t>& full, const std::vector<int64_t>& shape,
                  const std::vector<int64_t>& st) {
  int64_t off = 0;
  for (int d = static_cast<int>(full.size()) - 1; d >= 0; --d) {
    const int64_t c = flat % full[d];
    flat /= full[d];
    if (shape[d] != 1) off += c * st[d];
  }
  return off;
}

// float64 reference of one element.
double ref_fwd(OpKind op, const double* x) {
  switch (op) {
    case OpKind::KlStdFwd: return elbo::kl_std(x[0], x[1]);
    case OpKind::KlFwd: return elbo::kl(x[0], x[1], x[2], x[3]);
    case OpKind::GaussLpFwd: return elbo::gaussian_log_prob(x[0], x[1], x[2]);
    case OpKind::BernLpFwd: return elbo::bernoulli_log_prob(x[0], x[1]);
    default: return 0;
  }
}
void ref_bwd(OpKind op, double g, const double* x, double* y) {
  switch (op) {
    case OpKind::KlStdBwd: elbo::kl_std_grad(g, x[0], x[1], y[0], y[1]); break;
    case OpKind::KlBwd: elbo::kl_grad(g, x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3]); break;
    case OpKind::GaussLpBwd: elbo::gaussian_log_prob_grad(g, x[0], x[1], x[2], y[0], y[1], y[2]); break;
    case OpKind::BernLpBwd: elbo::bernoulli_log_prob_grad(g, x[0], x[1], y[0], y[1]); break;
    default: break;
  }
}

// Bounds on the magnitude of the intermediates of each formula (sums of the absolute values of
// the terms that get added, including the rounding of differences of inputs), so that the
// tolerance of a float computation is rtol * bound even where the result cancels to ~0.
double fwd_scale(OpKind op, const double* x) {
  using std::exp; using std::fabs; using std::expm1;
  switch (op) {
    case OpKind::KlStdFwd: return 0.5 * (x[0] * x[0] + fabs(expm1(x[1])) + fabs(x[1]));
    case OpKind::KlFwd: {
      const double d = x[1] - x[3], dd = fabs(x[1]) + fabs(x[3]), m = fabs(x[0]) + fabs(x[2]);
      return 0.5 * (fabs(expm1(d)) + fabs(d) + (exp(d) + 1) * dd + m * m * exp(-x[3]) * (1 + fabs(x[3])));
    }
    case OpKind::GaussLpFwd: {
      const double m = fabs(x[0]) + fabs(x[1]);
      return 0.5 * (elbo::kLog2Pi + fabs(x[2]) + m * m * exp(-x[2]) * (1 + fabs(x[2])));
    }
    case OpKind::BernLpFwd: return fabs(x[0] * x[1]) + fabs(x[1]) + 1.0;
    default: return 0;
  }
}
void bwd_scale(OpKind op, double g, const double* x, double* y) {
  using std::exp; using std::fabs; using std::expm1;
  g = fabs(g);
  switch (op) {
    case OpKind::KlStdBwd:
      y[0] = g * fabs(x[0]);
      y[1] = g * 0.5 * fabs(expm1(x[1])) * (1 + fabs(x[1]));
      break;
    case OpKind::KlBwd: {
      const double d = x[1] - x[3], dd = fabs(x[1]) + fabs(x[3]), m = fabs(x[0]) + fabs(x[2]);
      const double sc = m * exp(-x[3]) * (1 + fabs(x[3])), em = fabs(expm1(d)) + exp(d) * dd;
      y[0] = y[2] = g * sc;
      y[1] = g * 0.5 * em;
      y[3] = g * 0.5 * (em + m * sc);
      break;
    }
    case OpKind::GaussLpBwd: {
      const double m = fabs(x[0]) + fabs(x[1]), sc = m * exp(-x[2]) * (1 + fabs(x[2]));
      y[0] = y[1] = g * sc;
      y[2] = g * 0.5 * (m * sc + 1);
      break;
    }
    case OpKind::BernLpBwd:
      y[0] = g * fabs(x[1]);
      y[1] = g * (fabs(x[0]) + 1);
      break;
    default: break;
  }
}
// Rounding of the stored result.
double store_rtol(DType d) {
  switch (d) {
    case DType::Float64: return 2.3e-16;
    case DType::Float32: return 1.2e-7;
    case DType::Float16: return 9.8e-4;
    case DType::BFloat16: return 7.9e-3;
  }
  return 0;
}

struct RowRun {
  std::vector<std::vector<unsigned char>> raw;  // every output, for bitwise comparisons
};

// Runs forward and backward of one case; checks against the float64 reference.
RowRun run_row_case(const RowCase& c, bool check = true) {
  RowRun run;
  const int rank = static_cast<int>(c.full.size());
  const int ne = c.event_dims, nr = rank - ne;
  RowLayout L;
  L.n_row_dims = nr;
  L.n_event_dims = ne;
  L.rows = 1;
  L.event_numel = 1;
  for (int d = 0; d < nr; ++d) { L.row_sizes[d] = c.full[d]; L.rows *= c.full[d]; }
  for (int d = 0; d < ne; ++d) { L.event_sizes[d] = c.full[nr + d]; L.event_numel *= c.full[nr + d]; }
  L.elementwise = c.elementwise;
  L.n_blocks = c.n_blocks;
  const int64_t numel = L.rows * L.event_numel;
  const int nargs = static_cast<int>(c.args.size());
  bool f64 = false;
  for (auto& a : c.args) f64 |= a.dt == DType::Float64;
  const DType acc = f64 ? DType::Float64 : DType::Float32;

  std::vector<DevBuf> in;
  std::vector<std::vector<double>> vals;
  std::vector<std::vector<int64_t>> strides;
  for (auto& a : c.args) {
    const int64_t n = prod(a.shape);
    in.emplace_back(a.dt, n, a.pad);
    std::function<double()> gen = a.role == kMu ? normal(1.0)
                                : a.role == kLv ? uniform(-2.0, 2.0)
                                : a.role == kX01 ? uniform(0.0, 1.0)
                                : a.role == kLogit ? normal(3.0)
                                : normal(1.0);
    vals.push_back(fill(in.back(), gen));
    strides.push_back(mem_strides(a.shape, a.transposed));
  }
  auto elem = [&](int64_t flat, double* x) {
    for (int i = 0; i < nargs; ++i)
      x[i] = vals[i][offset_of(flat, c.full, c.args[i].shape, strides[i])];
  };

  // ---- forward
  {
    RowArgs ra;
    ra.layout = L;
    for (int i = 0; i < nargs; ++i)
      set_operand(ra.in[i], L, c.full, c.args[i].shape, strides[i], in[i].data, c.args[i].dt);
    const std::vector<int64_t> oshape = c.elementwise ? c.full
        : std::vector<int64_t>(c.full.begin(), c.full.begin() + nr);
    std::vector<int64_t> ofull_shape = c.full;
    if (!c.elementwise)
      for (int d = nr; d < rank; ++d) ofull_shape[d] = 1;
    DevBuf out(acc, prod(oshape));
    set_operand(ra.out[0], L, c.full, ofull_shape, mem_strides(ofull_shape, false), out.data, acc);
    const cudaError_t err = vc::launch_rows(c.fwd, ra, nullptr);
    CK(cudaDeviceSynchronize());
    report(err == cudaSuccess, c.name + " fwd launch", cudaGetErrorString(err));
    const std::vector<double> got = out.download();
    run.raw.push_back(out.raw());
    if (check) {
      std::vector<double> ref(got.size(), 0.0), mag(got.size(), 0.0);
      double x[5];
      for (int64_t f = 0; f < numel; ++f) {
        elem(f, x);
        const double t = ref_fwd(c.fwd, x);
        const int64_t o = c.elementwise ? f : f / L.event_numel;
        ref[o] += t;
        mag[o] += fwd_scale(c.fwd, x);
      }
      int bad = 0;
      std::string first;
      for (size_t o = 0; o < got.size(); ++o)
        if (!close(got[o], ref[o], mag[o], f64 ? 1e-13 : 1e-5, 1e-300)) {
          if (!bad++) first = "at " + std::to_string(o) + ": got " + std::to_string(got[o]) +
                              " want " + std::to_string(ref[o]);
        }
      report(bad == 0, c.name + " fwd", first);
    }
  }

  // ---- backward
  {
    RowArgs ra;
    ra.layout = L;
    const std::vector<int64_t> gshape = c.elementwise ? c.full
        : std::vector<int64_t>(c.full.begin(), c.full.begin() + nr);
    std::vector<int64_t> gfull = c.full;
    if (!c.elementwise)
      for (int d = nr; d < rank; ++d) gfull[d] = 1;
    DevBuf g(acc, prod(gshape));
    const std::vector<double> gv = fill(g, normal(1.0));
    const std::vector<int64_t> gst = mem_strides(gfull, false);
    set_operand(ra.in[0], L, c.full, gfull, gst, g.data, acc);
    for (int i = 0; i < nargs; ++i)
      set_operand(ra.in[i + 1], L, c.full, c.args[i].shape, strides[i], in[i].data, c.args[i].dt);
    std::vector<DevBuf> outs;
    std::vector<bool> accum(nargs, false);
    for (int i = 0; i < nargs; ++i) {
      const ArgSpec& a = c.args[i];
      bool bcast = false;
      for (int d = 0; d < rank; ++d) bcast |= a.shape[d] == 1 && c.full[d] != 1;
      accum[i] = bcast;
      if (!a.grad) {
        outs.emplace_back();
        continue;
      }
      if (bcast) {
        const int64_t n = prod(a.shape);
        outs.emplace_back(acc, n * c.n_blocks);
        outs.back().zero();
        set_operand(ra.out[i], L, c.full, a.shape, mem_strides(a.shape, false), outs.back().data, acc);
        ra.out[i].accumulate = true;
        ra.out[i].block_stride = n;
      } else {
        outs.emplace_back(a.dt, prod(a.shape), a.pad);
        set_operand(ra.out[i], L, c.full, a.shape, strides[i], outs.back().data, a.dt);
      }
    }
    const cudaError_t err = vc::launch_rows(c.bwd, ra, nullptr);
    CK(cudaDeviceSynchronize());
    report(err == cudaSuccess, c.name + " bwd launch", cudaGetErrorString(err));
    // reference
    std::vector<std::vector<double>> ref(nargs), mag(nargs);
    for (int i = 0; i < nargs; ++i) {
      ref[i].assign(static_cast<size_t>(prod(c.args[i].shape)), 0.0);
      mag[i] = ref[i];
    }
    double x[5], y[4], ys[4];
    for (int64_t f = 0; f < numel; ++f) {
      elem(f, x);
      const double gg = gv[offset_of(f, c.full, gfull, gst)];
      ref_bwd(c.bwd, gg, x, y);
      bwd_scale(c.bwd, gg, x, ys);
      for (int i = 0; i < nargs; ++i) {
        // gradients in the argument's own logical (C-contiguous) order
        const int64_t o = offset_of(f, c.full, c.args[i].shape, mem_strides(c.args[i].shape, false));
        ref[i][o] += y[i];
        mag[i][o] += ys[i];
      }
    }
    for (int i = 0; i < nargs; ++i) {
      if (!c.args[i].grad) continue;
      std::vector<double> got = outs[i].download();
      run.raw.push_back(outs[i].raw());
      if (!check) continue;
      const int64_t n = prod(c.args[i].shape);
      std::vector<double> logical(static_cast<size_t>(n), 0.0);
      if (accum[i]) {
        // the glue's job: sum the slices in order, in the accumulation type
        for (int64_t e = 0; e < n; ++e) {
          if (f64) {
            double s = 0;
            for (int64_t b = 0; b < c.n_blocks; ++b) s += got[b * n + e];
            logical[e] = s;
          } else {
            float s = 0;
            for (int64_t b = 0; b < c.n_blocks; ++b) s += static_cast<float>(got[b * n + e]);
            logical[e] = s;
          }
        }
      } else {
        // memory order -> logical order
        const std::vector<int64_t> lst = mem_strides(c.args[i].shape, false);
        for (int64_t e = 0; e < n; ++e) {
          const int64_t mo = offset_of(e, c.args[i].shape, c.args[i].shape, strides[i]);
          logical[e] = got[mo];
          (void)lst;
        }
      }
      const DType od = accum[i] ? acc : c.args[i].dt;
      int bad = 0;
      std::string first;
      for (int64_t e = 0; e < n; ++e) {
        // compute error (bounded by the intermediates) + the rounding of the stored value
        const double tol = (f64 ? 1e-13 : 1e-5) * mag[i][e] + 2 * store_rtol(od) * std::fabs(ref[i][e]) +
                           (od == DType::Float16 ? 6e-8 : 0.0);  // half subnormal spacing 2^-24
        if (!close(logical[e], ref[i][e], 0.0, 0.0, tol + 1e-300)) {
          if (!bad++) {
            char buf[200];
            std::snprintf(buf, sizeof buf, "arg %d (%s) at %lld: got %.9g want %.9g (scale %.3g)", i,
                          dname(od), static_cast<long long>(e), logical[e], ref[i][e], mag[i][e]);
            first = buf;
          }
        }
      }
      report(bad == 0, c.name + " bwd grad" + std::to_string(i) + (accum[i] ? "(acc)" : ""), first);
    }
  }
  return run;
}

ArgSpec arg(std::vector<int64_t> shape, Role role, DType dt = DType::Float32) {
  ArgSpec a;
  a.shape = std::move(shape);
  a.role = role;
  a.dt = dt;
  return a;
}

void row_tests() {
  const DType F = DType::Float32, D = DType::Float64, H = DType::Float16, B = DType::BFloat16;
  std::vector<RowCase> cases;
  auto add = [&](RowCase c) { cases.push_back(std::move(c)); };

  add({"klstd contiguous", OpKind::KlStdFwd, OpKind::KlStdBwd, {37, 101}, 1,
       {arg({37, 101}, kMu), arg({37, 101}, kLv)}, 1});
  {
    RowCase c{"klstd 2 event dims, bf16/f16, transposed", OpKind::KlStdFwd, OpKind::KlStdBwd,
              {5, 3, 33}, 2, {arg({5, 3, 33}, kMu, B), arg({5, 3, 33}, kLv, H)}, 1};
    c.args[0].transposed = true;
    add(c);
  }
  for (int64_t nb : {1, 7, 200}) {
    add({"kl prior (D,) nb=" + std::to_string(nb), OpKind::KlFwd, OpKind::KlBwd, {64, 16}, 1,
         {arg({64, 16}, kMu), arg({64, 16}, kLv), arg({1, 16}, kMu), arg({1, 16}, kLv)}, nb});
  }
  for (int64_t nb : {1, 4, 13}) {
    RowCase c{"gauss x(B,D) vs mean(K,B,D), scalar logvar nb=" + std::to_string(nb),
              OpKind::GaussLpFwd, OpKind::GaussLpBwd, {3, 20, 50}, 1,
              {arg({1, 20, 50}, kNormal), arg({3, 20, 50}, kMu), arg({1, 1, 1}, kLv)}, nb};
    add(c);
  }
  for (int64_t nb : {1, 5}) {
    add({"gauss var (B,1) nb=" + std::to_string(nb), OpKind::GaussLpFwd, OpKind::GaussLpBwd,
         {40, 30}, 1, {arg({40, 30}, kNormal), arg({40, 30}, kMu), arg({40, 1}, kLv)}, nb});
  }
  for (int64_t nb : {1, 3}) {
    add({"gauss per-channel logvar (C,1) ev=2 nb=" + std::to_string(nb), OpKind::GaussLpFwd,
         OpKind::GaussLpBwd, {6, 4, 25}, 2,
         {arg({6, 4, 25}, kNormal), arg({6, 4, 25}, kMu), arg({1, 4, 1}, kLv)}, nb});
  }
  {
    RowCase c{"bern f32 x(B,D) vs bf16 logits (K,B,D)", OpKind::BernLpFwd, OpKind::BernLpBwd,
              {2, 10, 70}, 1, {arg({1, 10, 70}, kX01, F), arg({2, 10, 70}, kLogit, B)}, 3};
    add(c);
    c.name = "bern no dx";
    c.args[0].grad = false;
    c.n_blocks = 1;
    add(c);
  }
  add({"klstd elementwise", OpKind::KlStdFwd, OpKind::KlStdBwd, {7, 13}, 0,
       {arg({7, 13}, kMu), arg({7, 13}, kLv)}, 1, true});
  add({"kl elementwise, broadcast prior", OpKind::KlFwd, OpKind::KlBwd, {9, 13}, 0,
       {arg({9, 13}, kMu, H), arg({9, 13}, kLv), arg({1, 13}, kMu), arg({1, 13}, kLv)}, 3, true});
  // the glue's elementwise layout: the last dim stays an event dim, elementwise = true
  add({"gauss elementwise (glue layout)", OpKind::GaussLpFwd, OpKind::GaussLpBwd, {5, 3, 11}, 1,
       {arg({5, 3, 11}, kNormal, B), arg({1, 3, 11}, kMu), arg({1, 1, 1}, kLv)}, 4, true});
  add({"bern elementwise (glue layout) reorder", OpKind::BernLpFwd, OpKind::BernLpBwd, {6, 9}, 1,
       {arg({6, 1}, kX01), arg({6, 9}, kLogit, H)}, 1, true});
  add({"klstd long rows (block groups), scalar logvar", OpKind::KlStdFwd, OpKind::KlStdBwd,
       {3, 20000}, 1, {arg({3, 20000}, kMu), arg({1, 1}, kLv)}, 2});
  add({"klstd long single row reorder", OpKind::KlStdFwd, OpKind::KlStdBwd, {2, 9000}, 1,
       {arg({2, 9000}, kMu), arg({1, 1}, kLv)}, 1});
  add({"gauss f64 broadcast", OpKind::GaussLpFwd, OpKind::GaussLpBwd, {4, 6, 19}, 1,
       {arg({1, 6, 19}, kNormal, D), arg({4, 6, 19}, kMu, D), arg({1, 1, 19}, kLv, D)}, 3});
  add({"kl f64 mixed-pattern prior ev=2", OpKind::KlFwd, OpKind::KlBwd, {5, 3, 7}, 2,
       {arg({5, 3, 7}, kMu, D), arg({5, 3, 7}, kLv, D), arg({1, 3, 1}, kMu, D),
        arg({1, 1, 7}, kLv, D)}, 2});
  add({"many short rows", OpKind::KlStdFwd, OpKind::KlStdBwd, {3000, 3}, 1,
       {arg({3000, 3}, kMu, B), arg({1, 3}, kLv)}, 50});
  add({"event 0 dims (one elem per row)", OpKind::BernLpFwd, OpKind::BernLpBwd, {17}, 0,
       {arg({17}, kX01), arg({17}, kLogit)}, 1});
  add({"empty event", OpKind::KlStdFwd, OpKind::KlStdBwd, {4, 0}, 1,
       {arg({4, 0}, kMu), arg({1, 0}, kLv)}, 2});
  add({"empty rows", OpKind::KlStdFwd, OpKind::KlStdBwd, {0, 5}, 1,
       {arg({0, 5}, kMu), arg({0, 5}, kLv)}, 1});
  add({"3 row dims, 3 event dims", OpKind::GaussLpFwd, OpKind::GaussLpBwd, {2, 3, 2, 3, 5, 2}, 3,
       {arg({2, 3, 2, 3, 5, 2}, kNormal), arg({1, 3, 1, 3, 5, 2}, kMu), arg({2, 1, 2, 3, 1, 2}, kLv)},
       4});

  for (auto& c : cases) run_row_case(c);

  // Random problems: rank, event dims, broadcast pattern, dtypes, layouts, misalignment, n_blocks.
  std::mt19937_64 r(2024);
  auto pick = [&](int64_t n) { return static_cast<int64_t>(r() % static_cast<uint64_t>(n)); };
  const OpKind fwds[] = {OpKind::KlStdFwd, OpKind::KlFwd, OpKind::GaussLpFwd, OpKind::BernLpFwd};
  const OpKind bwds[] = {OpKind::KlStdBwd, OpKind::KlBwd, OpKind::GaussLpBwd, OpKind::BernLpBwd};
  const std::vector<Role> roles[] = {{kMu, kLv}, {kMu, kLv, kMu, kLv}, {kNormal, kMu, kLv}, {kX01, kLogit}};
  const char* n_env = std::getenv("VF_SELFTEST_RANDOM");
  const int n_random = n_env ? std::atoi(n_env) : 60;
  for (int t = 0; t < n_random; ++t) {
    const int which = static_cast<int>(pick(4));
    const int rank = 1 + static_cast<int>(pick(4));
    std::vector<int64_t> full(rank);
    for (auto& d : full) d = 1 + pick(pick(3) == 0 ? 40 : 7);
    const int ev = static_cast<int>(pick(rank + 1));
    const bool f64 = pick(5) == 0;
    RowCase c{"random " + std::to_string(t), fwds[which], bwds[which], full, ev, {},
              1 + pick(3) * pick(9), ev == 0 ? pick(2) == 0 : pick(4) == 0};
    if (ev > 0 && c.elementwise && pick(2) == 0) c.event_dims = ev;  // glue-like elementwise
    for (Role role : roles[which]) {
      ArgSpec a;
      a.shape = full;
      for (auto& d : a.shape)
        if (pick(3) == 0) d = 1;
      a.role = role;
      const DType lowp[] = {F, F, H, B};
      a.dt = f64 ? D : lowp[pick(4)];
      a.transposed = pick(3) == 0;
      a.pad = pick(3) == 0 ? 1 : 0;
      a.grad = pick(4) != 0;
      c.args.push_back(a);
    }
    run_row_case(c);
  }

  // Alignment must not change a single bit (the summation order is fixed by the chunks).
  {
    RowCase c{"align", OpKind::GaussLpFwd, OpKind::GaussLpBwd, {6, 43}, 1,
              {arg({6, 43}, kNormal), arg({6, 43}, kMu), arg({1, 43}, kLv)}, 3};
    const auto seed = g_rng();
    g_rng.seed(seed);
    RowRun a = run_row_case(c);
    for (auto& x : c.args) x.pad = 1;
    g_rng.seed(seed);
    RowRun b = run_row_case(c, false);
    report(a.raw == b.raw, "misaligned inputs give bitwise equal results");
    g_rng.seed(seed);
    RowRun d = run_row_case(c, false);
    report(b.raw == d.raw, "two runs give bitwise equal results");
  }
  // Bad descriptions are refused, not run.
  {
    RowArgs ra;
    ra.layout.n_row_dims = 9;
    report(vc::launch_rows(OpKind::KlStdFwd, ra, nullptr) == cudaErrorInvalidValue,
           "too many dims refused");
    DevBuf a(DType::Float64, 4), b(DType::Float32, 4), o(DType::Float64, 4);
    RowArgs rb;
    rb.layout.n_row_dims = 1;
    rb.layout.row_sizes[0] = 4;
    rb.layout.rows = 4;
    rb.in[0].data = a.data; rb.in[0].dtype = DType::Float64; rb.in[0].row_strides[0] = 1;
    rb.in[1].data = b.data; rb.in[1].dtype = DType::Float32; rb.in[1].row_strides[0] = 1;
    rb.out[0].data = o.data; rb.out[0].dtype = DType::Float64; rb.out[0].row_strides[0] = 1;
    report(vc::launch_rows(OpKind::KlStdFwd, rb, nullptr) == cudaErrorInvalidValue,
           "float64 mixed with float32 refused");
  }
}

// ---- sampling ---------------------------------------------------------------------------------
float host_eps(uint64_t seed, uint64_t i) {
  uint32_t x[4];
  philox::block(seed, i / 4, x);
  float n[4];
  elbo::box_muller(philox::uniform(x[0]), philox::uniform(x[1]), n[0], n[1]);
  elbo::box_muller(philox::uniform(x[2]), philox::uniform(x[3]), n[2], n[3]);
  return n[i % 4];
}

// The arguments every sampling launch shares: mu, logvar (R x E of dt), the seed, K samples.
SampleArgs sample_args(const DevBuf& mu, const DevBuf& lv, const DevBuf& sd, DType dt, int64_t R,
                       int64_t E, int64_t K) {
  SampleArgs sa;
  sa.mu = mu.data;
  sa.logvar = lv.data;
  sa.dtype = dt;
  sa.rows = R;
  sa.event_numel = E;
  sa.num_samples = K;
  sa.seed = static_cast<const int64_t*>(sd.data);
  return sa;
}

void sample_case(DType dt, int64_t R, int64_t E, int64_t K, int64_t seed, bool want_z,
                 bool want_lq, bool want_kl) {
  const std::string name = std::string("sample ") + dname(dt) + " R=" + std::to_string(R) +
                           " E=" + std::to_string(E) + " K=" + std::to_string(K) +
                           (want_z ? " z" : "") + (want_lq ? " log_q" : "") + (want_kl ? " kl" : "");
  const bool f64 = dt == DType::Float64;
  const DType acc = f64 ? DType::Float64 : DType::Float32;
  const int64_t RE = R * E;
  DevBuf mu(dt, RE), lv(dt, RE), sd(DType::Float64, 1);
  const std::vector<double> muv = fill(mu, normal(1.0)), lvv = fill(lv, uniform(-3.0, 3.0));
  CK(cudaMemcpy(sd.data, &seed, 8, cudaMemcpyHostToDevice));
  DevBuf z(dt, K * RE), lq(acc, K * R), kl(acc, R);
  SampleArgs sa = sample_args(mu, lv, sd, dt, R, E, K);
  sa.z = want_z ? z.data : nullptr;
  sa.log_q = want_lq ? lq.data : nullptr;
  sa.kl = want_kl ? kl.data : nullptr;
  const cudaError_t err = vc::launch_sample_forward(sa, nullptr);
  CK(cudaDeviceSynchronize());
  report(err == cudaSuccess, name + " launch", cudaGetErrorString(err));
  const uint64_t s = static_cast<uint64_t>(seed);
  if (want_z) {
    const std::vector<double> got = z.download();
    int bad = 0;
    std::string first;
    for (int64_t i = 0; i < K * RE; ++i) {
      const int64_t m = i % RE;
      const double eps = host_eps(s, static_cast<uint64_t>(i));
      const double sig = std::exp(0.5 * lvv[m]);
      const double ref = muv[m] + sig * eps;
      const double mag = std::fabs(muv[m]) + sig * std::fabs(eps);
      if (!close(got[i], ref, mag, std::max(out_rtol(dt), 1e-5), 0)) {
        if (!bad++) first = "at " + std::to_string(i) + ": got " + std::to_string(got[i]) +
                            " want " + std::to_string(ref);
      }
    }
    report(bad == 0, name + " z", first);
  }
  if (want_lq) {
    const std::vector<double> got = lq.download();
    int bad = 0;
    std::string first;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < R; ++r) {
        double ref = 0, mag = 0;
        for (int64_t j = 0; j < E; ++j) {
          const double eps = host_eps(s, static_cast<uint64_t>(k * RE + r * E + j));
          const double t = elbo::log_q_from_eps(lvv[r * E + j], eps);
          ref += t;
          mag += 0.5 * (elbo::kLog2Pi + std::fabs(lvv[r * E + j]) + eps * eps);
        }
        if (!close(got[k * R + r], ref, mag, f64 ? 1e-6 : 2e-5, 1e-12)) {
          if (!bad++) first = "at " + std::to_string(k * R + r) + ": got " +
                              std::to_string(got[k * R + r]) + " want " + std::to_string(ref);
        }
      }
    report(bad == 0, name + " log_q", first);
  }
  if (want_kl) {
    const std::vector<double> got = kl.download();
    int bad = 0;
    for (int64_t r = 0; r < R; ++r) {
      double ref = 0, mag = 0;
      for (int64_t j = 0; j < E; ++j) {
        const double t = elbo::kl_std(muv[r * E + j], lvv[r * E + j]);
        const double xs[2] = {muv[r * E + j], lvv[r * E + j]};
        ref += t;
        mag += fwd_scale(OpKind::KlStdFwd, xs);
      }
      bad += !close(got[r], ref, mag, f64 ? 1e-12 : 2e-5, 1e-30);
    }
    report(bad == 0, name + " kl");
  }
}

void sample_bwd_case(DType dt, int64_t R, int64_t E, int64_t K, int64_t seed, bool has_gz,
                     bool has_gq, bool has_gkl, bool want_mu, bool want_lv) {
  const std::string name = std::string("sample bwd ") + dname(dt) + " R=" + std::to_string(R) +
                           " E=" + std::to_string(E) + " K=" + std::to_string(K) +
                           (has_gz ? " gz" : "") + (has_gq ? " gq" : "") + (has_gkl ? " gkl" : "") +
                           (want_mu ? " ->mu" : "") + (want_lv ? " ->lv" : "");
  const bool f64 = dt == DType::Float64;
  const DType acc = f64 ? DType::Float64 : DType::Float32;
  const int64_t RE = R * E;
  DevBuf mu(dt, RE), lv(dt, RE), sd(DType::Float64, 1), gz(dt, K * RE), gq(acc, K * R), gkl(acc, R);
  DevBuf gmu(dt, RE), glv(dt, RE);
  const std::vector<double> muv = fill(mu, normal(1.0)), lvv = fill(lv, uniform(-3.0, 3.0));
  const std::vector<double> gzv = fill(gz, normal(1.0)), gqv = fill(gq, normal(1.0));
  const std::vector<double> gklv = fill(gkl, normal(1.0));
  CK(cudaMemcpy(sd.data, &seed, 8, cudaMemcpyHostToDevice));
  SampleArgs sa = sample_args(mu, lv, sd, dt, R, E, K);
  sa.grad_z = has_gz ? gz.data : nullptr;
  sa.grad_log_q = has_gq ? gq.data : nullptr;
  sa.grad_kl = has_gkl ? gkl.data : nullptr;
  sa.grad_mu = want_mu ? gmu.data : nullptr;
  sa.grad_logvar = want_lv ? glv.data : nullptr;
  const cudaError_t err = vc::launch_sample_backward(sa, nullptr);
  CK(cudaDeviceSynchronize());
  report(err == cudaSuccess, name + " launch", cudaGetErrorString(err));
  const uint64_t s = static_cast<uint64_t>(seed);
  std::vector<double> rmu(RE, 0), rlv(RE, 0), mmu(RE, 0), mlv(RE, 0);
  for (int64_t m = 0; m < RE; ++m) {
    const int64_t r = m / E;
    const double sig = std::exp(0.5 * lvv[m]);
    double sg = 0, sge = 0, sgq = 0, ag = 0, age = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (has_gz) {
        const double g = gzv[k * RE + m];
        const double eps = host_eps(s, static_cast<uint64_t>(k * RE + m));
        sg += g; sge += g * eps; ag += std::fabs(g); age += std::fabs(g * eps);
      }
      if (has_gq) sgq += gqv[k * R + r];
    }
    rmu[m] = sg;
    mmu[m] = ag;
    rlv[m] = elbo::reparameterize_dlogvar(sig, sge) + sgq * elbo::kLogQDlogvar;
    mlv[m] = 0.5 * sig * age + 0.5 * K * 4.0;
    if (has_gkl) {
      double a, b;
      elbo::kl_std_grad(gklv[r], muv[m], lvv[m], a, b);
      rmu[m] += a;
      rlv[m] += b;
      const double xs[2] = {muv[m], lvv[m]};
      double ys[2];
      bwd_scale(OpKind::KlStdBwd, gklv[r], xs, ys);
      mmu[m] += ys[0];
      mlv[m] += ys[1];
    }
  }
  auto tol = [&](double ref, double mag) {
    return (f64 ? 1e-6 : 2e-5) * (mag + std::fabs(ref)) + 2 * store_rtol(dt) * std::fabs(ref) +
           (dt == DType::Float16 ? 6e-8 : 0.0) + 1e-300;
  };
  if (want_mu) {
    const std::vector<double> got = gmu.download();
    int bad = 0;
    for (int64_t m = 0; m < RE; ++m) bad += !close(got[m], rmu[m], 0, 0, tol(rmu[m], mmu[m]));
    report(bad == 0, name + " grad_mu");
  }
  if (want_lv) {
    const std::vector<double> got = glv.download();
    int bad = 0;
    std::string first;
    for (int64_t m = 0; m < RE; ++m)
      if (!close(got[m], rlv[m], 0, 0, tol(rlv[m], mlv[m]))) {
        if (!bad++) first = "at " + std::to_string(m) + ": got " + std::to_string(got[m]) +
                            " want " + std::to_string(rlv[m]);
      }
    report(bad == 0, name + " grad_logvar", first);
  }
}

void sample_tests() {
  const DType F = DType::Float32, D = DType::Float64, H = DType::Float16, B = DType::BFloat16;
  const int64_t big_seed = static_cast<int64_t>(0x9e3779b97f4a7c15ull);  // negative, both halves used
  for (DType dt : {F, B, H, D}) {
    sample_case(dt, 5, 37, 3, 42, true, true, true);
    sample_case(dt, 5, 37, 3, big_seed, true, false, false);
  }
  for (int64_t E : {1, 2, 3, 4, 5, 8}) {
    sample_case(F, 7, E, 3, 7, true, true, true);
    sample_case(F, 7, E, 2, 7, true, false, false);
  }
  sample_case(F, 3, 3000, 2, 11, true, true, true);  // block-wide groups
  sample_case(F, 6, 10, 1, 3, false, false, true);   // kl alone: no eps
  sample_case(F, 6, 10, 2, 3, false, true, false);   // log_q alone
  sample_case(F, 4, 0, 2, 3, true, true, true);      // empty event: zeros
  sample_case(D, 2, 1, 9, 5, true, false, false);    // RE < 4: blocks wrap around mu
  for (int mask = 0; mask < 8; ++mask)
    sample_bwd_case(F, 5, 13, 3, 99, mask & 1, mask & 2, mask & 4, true, true);
  sample_bwd_case(F, 5, 13, 3, 99, true, true, true, false, true);
  sample_bwd_case(F, 5, 13, 3, 99, true, true, true, true, false);
  for (DType dt : {B, H, D}) sample_bwd_case(dt, 4, 9, 2, big_seed, true, true, true, true, true);
  for (int64_t E : {1, 2, 3, 6}) sample_bwd_case(F, 5, E, 3, 1234, true, true, true, true, true);
  {
    std::mt19937_64 r(777);
    auto pick = [&](int64_t n) { return static_cast<int64_t>(r() % static_cast<uint64_t>(n)); };
    const char* n_env = std::getenv("VF_SELFTEST_RANDOM");
    const int n_random = (n_env ? std::atoi(n_env) : 60) / 2;
    const DType dts[] = {F, B, H, D};
    for (int t = 0; t < n_random; ++t) {
      const DType dt = dts[pick(4)];
      const int64_t R = 1 + pick(9), E = pick(6) == 0 ? 0 : 1 + pick(pick(2) ? 70 : 9), K = 1 + pick(4);
      const int64_t seed = static_cast<int64_t>(r());
      const int f = static_cast<int>(pick(8));
      if (f) sample_case(dt, R, E, K, seed, f & 1, f & 2, f & 4);
      const int b = static_cast<int>(pick(32));
      if (E > 0 && (b & 24)) sample_bwd_case(dt, R, E, K, seed, b & 1, b & 2, b & 4, b & 8, b & 16);
    }
  }
  // z must equal the same elements whether or not the reductions are asked for
  {
    DevBuf mu(F, 60), lv(F, 60), sd(D, 1), z1(F, 180), z2(F, 180), lq(F, 18);
    fill(mu, normal(1.0));
    fill(lv, uniform(-1, 1));
    const int64_t seed = 77;
    CK(cudaMemcpy(sd.data, &seed, 8, cudaMemcpyHostToDevice));
    SampleArgs sa;
    sa.mu = mu.data; sa.logvar = lv.data; sa.rows = 6; sa.event_numel = 10; sa.num_samples = 3;
    sa.seed = static_cast<const int64_t*>(sd.data);
    sa.z = z1.data;
    CK(vc::launch_sample_forward(sa, nullptr));
    sa.z = z2.data;
    sa.log_q = lq.data;
    CK(vc::launch_sample_forward(sa, nullptr));
    CK(cudaDeviceSynchronize());
    const auto a = z1.download(), b = z2.download();
    double worst = 0;
    for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
    report(worst <= 1e-6, "z the same with and without log_q");
  }
}

// ---- the index arithmetic ---------------------------------------------------------------------
VF_GLOBAL void fastdiv_kernel(const int64_t* n, const vc::detail::FastDiv* f, int64_t* q, int count) {
  const int i = static_cast<int>(vc::detail::bid_x() * vc::detail::bdim_x() + vc::detail::tid_x());
  if (i < count) vc::detail::st(q + i, vc::detail::fdiv(f[i], vc::detail::ldg(n + i)));
}

void fastdiv_tests() {
  std::vector<int64_t> ns, ds;
  const int64_t edge_d[] = {1, 2, 3, 5, 7, 100, 641, 65535, 65536, 65537, (1ll << 31) - 1,
                            1ll << 31, (1ll << 31) + 1, 6700417, (1ll << 40) + 3, (1ll << 62) + 1};
  const int64_t edge_n[] = {0, 1, 2, (1ll << 31) - 2, (1ll << 31) - 1, 1ll << 31, (1ll << 32) - 1,
                            1ll << 32, (1ll << 62), INT64_MAX - 1, INT64_MAX};
  for (int64_t d : edge_d)
    for (int64_t n : edge_n) { ns.push_back(n); ds.push_back(d); }
  for (int t = 0; t < 4000; ++t) {
    const int bits_d = 1 + static_cast<int>(g_rng() % 62), bits_n = 1 + static_cast<int>(g_rng() % 63);
    int64_t d = static_cast<int64_t>(g_rng() >> (64 - bits_d));
    int64_t n = static_cast<int64_t>(g_rng() >> (64 - bits_n));
    if (d < 1) d = 1;
    if (n < 0) n = 0;
    ns.push_back(n);
    ds.push_back(d);
  }
  const int count = static_cast<int>(ns.size());
  std::vector<vc::detail::FastDiv> fs(count);
  for (int i = 0; i < count; ++i) fs[i] = vc::detail::make_fastdiv(ds[i]);
  int64_t *dn, *dq;
  vc::detail::FastDiv* df;
  CK(cudaMalloc(&dn, count * sizeof(int64_t)));
  CK(cudaMalloc(&dq, count * sizeof(int64_t)));
  CK(cudaMalloc(&df, count * sizeof(vc::detail::FastDiv)));
  CK(cudaMemcpy(dn, ns.data(), count * sizeof(int64_t), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(df, fs.data(), count * sizeof(vc::detail::FastDiv), cudaMemcpyHostToDevice));
  const int block = 256;
  CK(vc::detail::launch_kernel(&fastdiv_kernel, (count + block - 1) / block, block, nullptr,
                               static_cast<const int64_t*>(dn)
                               , static_cast<const vc::detail::FastDiv*>(df), dq, count));
  CK(cudaDeviceSynchronize());
  std::vector<int64_t> q(count);
  CK(cudaMemcpy(q.data(), dq, count * sizeof(int64_t), cudaMemcpyDeviceToHost));
  int bad = 0;
  std::string first;
  for (int i = 0; i < count; ++i)
    if (q[i] != ns[i] / ds[i] && !bad++)
      first = std::to_string(ns[i]) + " / " + std::to_string(ds[i]) + " gave " + std::to_string(q[i]);
  report(bad == 0, "fast division", first);
  cudaFree(dn);
  cudaFree(dq);
  cudaFree(df);
}

}  // namespace

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("no CUDA device: nothing run\n0 passed, 0 failed, 1 skipped\n");
    return 0;
  }
  fastdiv_tests();
  row_tests();
  sample_tests();
  {
    const int64_t a = vc::suggest_n_blocks(4096, 784, 1);
    const int64_t b = vc::suggest_n_blocks(4096, 784, 4096);
    const int64_t c = vc::suggest_n_blocks(1, 10, 1);
    report(a > 1 && a <= 4096 && b == 1 && c == 1, "suggest_n_blocks");
  }
#if defined(VF_EMULATE)
  std::printf("(emulated: %lld kernel launches on the CPU)\n", static_cast<long long>(emu::S().launches));
#endif
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
