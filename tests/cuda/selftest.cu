// Standalone test of the CUDA kernels (no torch): runs every launcher on small random inputs and
// compares with a float64 host computation that uses core/elbo_math.h and core/philox.h. Prints
// "N passed, N failed" and exits non-zero when something failed. Test-only: it lives in tests/cuda/,
// beside the emulator, and includes the shipped kernels' headers through -Icsrc.
//
// Built by CMake as the target vf_cuda_selftest (nvcc, sm_80 and sm_90, linked with the shipped
// kernels' objects; scripts/check_cuda_compile.sh builds it). By hand on a GPU machine (from the
// repository root; scripts/gpu_check.sh does this for sm_90):
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_80,code=sm_80
//        -gencode arch=compute_90,code=sm_90 -Icsrc tests/cuda/selftest.cu csrc/cuda/rows.cu
//        csrc/cuda/sample.cu -o vf_cuda_selftest && ./vf_cuda_selftest
// Anywhere, on the CPU emulator of emu.h (the same kernels, strict about races, bounds, barriers;
// -Itests/cuda lets common.cuh find emu.h; scripts/check_cuda_compile.sh does this):
//   for f in tests/cuda/selftest csrc/cuda/rows csrc/cuda/sample; do
//     g++ -std=c++17 -O1 -DVF_EMULATE -x c++ -I/usr/local/cuda/include -Icsrc -Itests/cuda
//         -c $f.cu -o $(basename $f).o
//   done && g++ selftest.o rows.o sample.o -o vf_emu_selftest && ./vf_emu_selftest
#include "cuda/kernels.h"
#include "cuda/common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <initializer_list>
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
enum Role { kMu, kLv, kX01, kLogit, kNormal, kVar };

struct ArgSpec {
  std::vector<int64_t> shape;  // rank of the full shape; 1 where broadcast
  DType dt = DType::Float32;
  Role role = kNormal;
  bool transposed = false;  // memory layout with the dims in reverse order
  int64_t pad = 0;          // leading elements: misaligns the data pointer
  bool grad = true;
  std::function<double(int64_t)> value;  // when set: the value of element i (memory order), not `role`
  bool clamp = false;  // clamped on load into [lo, hi] (launch_args.h's Clamp)
  double lo = 0.0, hi = 0.0;
};

struct RowCase {
  std::string name;
  OpKind fwd, bwd;
  std::vector<int64_t> full;
  int event_dims = 1;
  std::vector<ArgSpec> args;
  int64_t n_blocks = 1;
  bool elementwise = false;
  double rtol32 = 1e-5;  // float32/16 compute tolerance, relative to the sum of the terms' magnitudes
  bool suggested = false;  // n_blocks from suggest_n_blocks on the backward launch, as the glue picks it
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

// float64 reference of one element: the textbook formulas (the densities and KLs as written in the
// comments of csrc/core/elbo_math.h, torch's F.gaussian_nll_loss; docs/architecture.md's numerics
// contract), written out here in double, sharing no code with elbo_math.h, so that a
// wrong formula there fails this test. Inputs are moderate (|logvar| <= 3), where the plain forms
// are accurate in double.
constexpr double kLog2PiRef = 1.8378770664093454836;  // log(2 pi)
double ref_fwd(OpKind op, const double* x) {
  using std::exp; using std::log; using std::log1p; using std::fabs;
  switch (op) {
    case OpKind::KlStdFwd: return 0.5 * (x[0] * x[0] + std::expm1(x[1]) - x[1]);
    case OpKind::KlFwd: {  // KL(N(m1, e^lv1) || N(m2, e^lv2))
      const double d = x[0] - x[2];
      return 0.5 * (x[3] - x[1] + (exp(x[1]) + d * d) / exp(x[3]) - 1.0);
    }
    case OpKind::GaussLpFwd: {
      const double d = x[0] - x[1];
      return -0.5 * (kLog2PiRef + x[2] + d * d / exp(x[2]));
    }
    case OpKind::BernLpFwd: return x[0] * x[1] - (std::max(x[1], 0.0) + log1p(exp(-fabs(x[1]))));
    case OpKind::GaussNllFwd: {  // input, target, var, eps
      const double vc = std::max(x[2], x[3]), d = x[0] - x[1];
      return 0.5 * (log(vc) + d * d / vc);
    }
    default: return 0;
  }
}
void ref_bwd(OpKind op, double g, const double* x, double* y) {
  using std::exp;
  switch (op) {
    case OpKind::KlStdBwd:
      y[0] = g * x[0];
      y[1] = g * 0.5 * (exp(x[1]) - 1.0);
      break;
    case OpKind::KlBwd: {
      const double d = x[0] - x[2], v2 = exp(x[3]);
      y[0] = g * d / v2;
      y[1] = g * 0.5 * (exp(x[1]) / v2 - 1.0);
      y[2] = -g * d / v2;
      y[3] = g * 0.5 * (1.0 - (exp(x[1]) + d * d) / v2);
      break;
    }
    case OpKind::GaussLpBwd: {
      const double d = x[0] - x[1], v = exp(x[2]);
      y[0] = -g * d / v;
      y[1] = g * d / v;
      y[2] = g * 0.5 * (d * d / v - 1.0);
      break;
    }
    case OpKind::BernLpBwd:
      y[0] = g * x[1];
      y[1] = g * (x[0] - 1.0 / (1.0 + exp(-x[1])));
      break;
    case OpKind::GaussNllBwd: {  // the gradient passes straight through the clamp (torch's)
      const double vc = std::max(x[2], x[3]), d = x[0] - x[1];
      y[0] = g * d / vc;
      y[1] = -g * d / vc;
      y[2] = g * 0.5 * (1.0 / vc - d * d / (vc * vc));
      break;
    }
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
      return 0.5 * (kLog2PiRef + fabs(x[2]) + m * m * exp(-x[2]) * (1 + fabs(x[2])));
    }
    case OpKind::BernLpFwd: return fabs(x[0] * x[1]) + fabs(x[1]) + 1.0;
    case OpKind::GaussNllFwd: {
      const double vc = std::max(x[2], x[3]), m = fabs(x[0]) + fabs(x[1]);
      return 0.5 * (fabs(std::log(vc)) + m * m / vc + 1.0);
    }
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
    case OpKind::GaussNllBwd: {
      const double vc = std::max(x[2], x[3]), m = fabs(x[0]) + fabs(x[1]);
      y[0] = y[1] = g * m / vc;
      y[2] = g * 0.5 * (1.0 / vc + m * m / (vc * vc));
      break;
    }
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
  int64_t n_blocks = 0;                         // the backward's
  int64_t bwd_launches = -1;                    // kernels the backward launched (emulator only)
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
                                : a.role == kVar ? uniform(0.02, 3.0)
                                : normal(1.0);
    if (a.value) gen = [f = a.value, i = int64_t{0}]() mutable { return f(i++); };
    vals.push_back(fill(in.back(), gen));
    strides.push_back(mem_strides(a.shape, a.transposed));
  }
  // The inputs of element `flat`, clamped where the case says; keep[i]: torch.clamp's gradient mask.
  bool keep[5] = {true, true, true, true, true};
  auto elem = [&](int64_t flat, double* x) {
    for (int i = 0; i < nargs; ++i) {
      x[i] = vals[i][offset_of(flat, c.full, c.args[i].shape, strides[i])];
      keep[i] = true;
      if (c.args[i].clamp) {
        keep[i] = x[i] >= c.args[i].lo && x[i] <= c.args[i].hi;
        x[i] = std::min(std::max(x[i], c.args[i].lo), c.args[i].hi);
      }
    }
  };
  auto set_clamp = [&](Operand& op, int i) {
    op.clamp.on = c.args[i].clamp;
    op.clamp.lo = c.args[i].lo;
    op.clamp.hi = c.args[i].hi;
  };

  // ---- forward
  {
    RowArgs ra;
    ra.layout = L;
    for (int i = 0; i < nargs; ++i) {
      set_operand(ra.in[i], L, c.full, c.args[i].shape, strides[i], in[i].data, c.args[i].dt);
      set_clamp(ra.in[i], i);
    }
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
        if (!close(got[o], ref[o], mag[o], f64 ? 1e-13 : c.rtol32, 1e-300)) {
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
    for (int i = 0; i < nargs; ++i) {
      set_operand(ra.in[i + 1], L, c.full, c.args[i].shape, strides[i], in[i].data, c.args[i].dt);
      set_clamp(ra.in[i + 1], i);
    }
    std::vector<DevBuf> outs(nargs);
    std::vector<bool> accum(nargs, false);
    for (int i = 0; i < nargs; ++i) {
      const ArgSpec& a = c.args[i];
      bool bcast = false;
      for (int d = 0; d < rank; ++d) bcast |= a.shape[d] == 1 && c.full[d] != 1;
      accum[i] = bcast;
      if (!a.grad) continue;
      if (bcast) {  // slices bound below, once n_blocks is known
        set_operand(ra.out[i], L, c.full, a.shape, mem_strides(a.shape, false), nullptr, acc);
        ra.out[i].accumulate = true;
      } else {
        outs[i] = DevBuf(a.dt, prod(a.shape), a.pad);
        set_operand(ra.out[i], L, c.full, a.shape, strides[i], outs[i].data, a.dt);
      }
    }
    int64_t nb = c.n_blocks;
    if (c.suggested) {
      int64_t slice = 1;
      for (int i = 0; i < nargs; ++i)
        if (accum[i] && c.args[i].grad) slice = std::max(slice, prod(c.args[i].shape));
      nb = vc::suggest_n_blocks(0, c.bwd, ra, slice);
      ra.layout.n_blocks = nb;
    }
    run.n_blocks = nb;
    for (int i = 0; i < nargs; ++i) {
      if (!accum[i] || !c.args[i].grad) continue;
      const int64_t n = prod(c.args[i].shape);
      outs[i] = DevBuf(acc, n * nb);
      outs[i].zero();
      ra.out[i].data = outs[i].data;
      ra.out[i].block_stride = n;
    }
#if defined(VF_EMULATE)
    const int64_t launches0 = emu::S().launches;
#endif
    const cudaError_t err = vc::launch_rows(c.bwd, ra, nullptr);
    CK(cudaDeviceSynchronize());
#if defined(VF_EMULATE)
    run.bwd_launches = emu::S().launches - launches0;
#endif
    report(err == cudaSuccess, c.name + " bwd launch", cudaGetErrorString(err));
    // reference
    std::vector<std::vector<double>> ref(nargs), mag(nargs);
    for (int i = 0; i < nargs; ++i) {
      ref[i].assign(static_cast<size_t>(prod(c.args[i].shape)), 0.0);
      mag[i] = ref[i];
    }
    double x[5], y[4] = {0, 0, 0, 0}, ys[4] = {0, 0, 0, 0};
    for (int64_t f = 0; f < numel; ++f) {
      elem(f, x);
      const double gg = gv[offset_of(f, c.full, gfull, gst)];
      ref_bwd(c.bwd, gg, x, y);
      bwd_scale(c.bwd, gg, x, ys);
      for (int i = 0; i < nargs; ++i)
        if (!keep[i]) y[i] = ys[i] = 0.0;
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
            for (int64_t b = 0; b < nb; ++b) s += got[b * n + e];
            logical[e] = s;
          } else {
            float s = 0;
            for (int64_t b = 0; b < nb; ++b) s += static_cast<float>(got[b * n + e]);
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
        const double tol = (f64 ? 1e-13 : c.rtol32) * mag[i][e] + 2 * store_rtol(od) * std::fabs(ref[i][e]) +
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

// The case run again (inputs redrawn from `seed`) on emulated GPUs of each SM count must give `a`'s bits:
// the launch shapes may follow the SM count, the order of the sums may not. (Emulator only: a real GPU
// has one SM count.)
void check_same_across_sms(const RowCase& c, uint64_t seed, const RowRun& a, std::initializer_list<int> sm_counts) {
#if defined(VF_EMULATE)
  bool same = true;
  std::string counts;
  for (int sms : sm_counts) {
    emu::sms_override() = sms;
    g_rng.seed(seed);
    same = same && run_row_case(c, false).raw == a.raw;
    counts += (counts.empty() ? "" : ", ") + std::to_string(sms);
  }
  emu::sms_override() = 0;
  report(same, c.name + ": bitwise equal for " + counts + " SMs");
#else
  (void)c, (void)seed, (void)a, (void)sm_counts;
#endif
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

  // gaussian_nll_loss's terms: var clamped at a scalar eps operand (0.3, so some of var falls below
  // it), var per row (B, 1) and full, reduced over the event or elementwise.
  for (int64_t nb : {1, 4}) {
    RowCase c{"gauss nll var (B,1), eps 0.3 nb=" + std::to_string(nb), OpKind::GaussNllFwd, OpKind::GaussNllBwd,
              {30, 17}, 1, {arg({30, 17}, kNormal), arg({30, 17}, kMu), arg({30, 1}, kVar), arg({1, 1}, kVar)}, nb};
    c.args[3].value = [](int64_t) { return 0.3; };
    c.args[3].grad = false;
    add(c);
  }
  {
    RowCase c{"gauss nll elementwise bf16 input", OpKind::GaussNllFwd, OpKind::GaussNllBwd, {9, 13}, 1,
              {arg({9, 13}, kNormal, B), arg({9, 13}, kMu), arg({9, 13}, kVar), arg({1, 1}, kVar)}, 1, true};
    c.args[3].value = [](int64_t) { return 1e-6; };
    c.args[3].grad = false;
    add(c);
  }
  // Clamped inputs (logvar clamped on load, torch.clamp's gradient): full, broadcast, reduced.
  for (int64_t nb : {1, 3}) {
    RowCase c{"klstd clamped logvar nb=" + std::to_string(nb), OpKind::KlStdFwd, OpKind::KlStdBwd, {20, 33}, 1,
              {arg({20, 33}, kMu), arg({20, 33}, kLv)}, nb};
    c.args[1].clamp = true;
    c.args[1].lo = -1.0;
    c.args[1].hi = 0.75;
    add(c);
    RowCase g{"gauss clamped per-feature logvar nb=" + std::to_string(nb), OpKind::GaussLpFwd, OpKind::GaussLpBwd,
              {4, 10, 33}, 1, {arg({1, 10, 33}, kNormal), arg({4, 10, 33}, kMu), arg({1, 1, 33}, kLv)}, nb};
    g.args[2].clamp = true;
    g.args[2].lo = -0.5;
    g.args[2].hi = 1.0;
    add(g);
  }
  {
    RowCase c{"kl both logvars clamped, broadcast prior", OpKind::KlFwd, OpKind::KlBwd, {12, 21}, 1,
              {arg({12, 21}, kMu), arg({12, 21}, kLv), arg({1, 21}, kMu), arg({1, 21}, kLv)}, 2};
    c.args[1].clamp = c.args[3].clamp = true;
    c.args[1].lo = c.args[3].lo = -1.0;
    c.args[1].hi = c.args[3].hi = 1.0;
    add(c);
  }
  // More reduced (broadcast) dims than a forward has event dims: a scalar logvar against 10 dims
  // that cannot be coalesced (x is stored transposed), in reorder mode and in row-block mode.
  for (int64_t nb : {1, 3}) {
    RowCase c{"gauss scalar logvar over 10 uncoalescable dims nb=" + std::to_string(nb), OpKind::GaussLpFwd,
              OpKind::GaussLpBwd, {2, 3, 2, 3, 2, 3, 2, 3, 2, 3}, 5,
              {arg({2, 3, 2, 3, 2, 3, 2, 3, 2, 3}, kNormal), arg({2, 3, 2, 3, 2, 3, 2, 3, 2, 3}, kMu),
               arg({1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, kLv)}, nb};
    c.args[0].transposed = true;
    add(c);
  }
  // Long rows: compensated sums. The first 2048 elements of each row (the first chunk of every
  // lane) have KL terms of 5000, the other 2^20 - 2048 terms of 5e-5: a plain float32 running sum
  // drops every small term (half an ulp of 2e4 is 1e-3) and is off by 5e-6 relative; the
  // compensated one keeps them. The scalar logvar's gradient reduces all 2^21 elements.
  {
    const int64_t n = int64_t{1} << 20;
    RowCase c{"klstd 2 rows of 2^20, compensated sums", OpKind::KlStdFwd, OpKind::KlStdBwd, {2, n}, 1,
              {arg({2, n}, kMu), arg({1, 1}, kLv)}, 1};
    c.args[0].value = [n](int64_t i) { return (i % n) < 2048 ? 100.0 : 0.01; };
    c.args[1].value = [](int64_t) { return 0.0; };
    c.rtol32 = 5e-7;
    add(c);
  }
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
  // The fast paths (every input with event stride 1 or 0, one storage dtype): every dtype, ragged
  // tails (rows of w - 1 .. 5w - 1 elements, w elements per 16-byte vector), data pointers offset
  // by 1 .. w - 1 elements (rows then start at every alignment, some aligned and some not, in one
  // launch): results checked against the reference, and bitwise equal whatever the offset
  // (forward sums, elementwise forward, full-size gradients).
  for (DType dt : {F, H, B}) {
    const int64_t w = dt == F ? 4 : 8;
    for (int64_t n : {w - 1, w, w + 1, 2 * w + 3, 5 * w - 1}) {
      for (bool ew : {false, true}) {
        RowCase c{std::string("fast path ") + dname(dt) + " n=" + std::to_string(n) + (ew ? " elementwise" : ""),
                  OpKind::GaussLpFwd, OpKind::GaussLpBwd, {7, n}, 1,
                  {arg({7, n}, kNormal, dt), arg({7, n}, kMu, dt), arg({7, 1}, kLv, F)}, 1, ew};
        const auto seed = g_rng();
        g_rng.seed(seed);
        const RowRun a = run_row_case(c);
        bool same = true;
        for (int64_t pad = 1; pad < w; ++pad) {
          for (auto& x : c.args) x.pad = pad;
          c.args[2].pad = 0;
          g_rng.seed(seed);
          same = same && run_row_case(c, pad == 1).raw == a.raw;
        }
        report(same, c.name + ": offsets 1.." + std::to_string(w - 1) + " elements give bitwise equal results");
      }
    }
    // Clamped inputs, a stride-0 (per-row) clamped logvar, hoisted (KL against a per-row prior).
    RowCase k{std::string("fast path ") + dname(dt) + " kl, per-row prior, clamps", OpKind::KlFwd, OpKind::KlBwd,
              {6, 45}, 1, {arg({6, 45}, kMu, dt), arg({6, 45}, kLv, dt), arg({6, 1}, kMu, F), arg({6, 1}, kLv, F)}, 2};
    k.args[1].clamp = k.args[3].clamp = true;
    k.args[1].lo = k.args[3].lo = -1.0;
    k.args[1].hi = k.args[3].hi = 0.5;
    k.args[0].pad = 3;
    run_row_case(k);
  }

  // Long rows split into segments (32K elements of 16-bit data, 16K of float32 on the fast path,
  // 16K on the general path) summed in a second, ordered pass: segment edges, a ragged last
  // segment, one row of many segments; the same bits twice and for every grid size (the emulated
  // SM count changes the grids the launchers pick).
  {
    struct Long {
      const char* name;
      DType dt;
      std::vector<int64_t> full;
      bool transposed;
    };
    const Long longs[] = {
        {"f32 2 rows, 4097 chunks", F, {2, 4096 * 4 + 3}, false},
        {"f32 2 rows, exactly one segment", F, {2, 4096 * 4}, false},
        {"bf16 3 rows, 3 segments", B, {3, 4096 * 8 * 2 + 5}, false},
        {"f16 1 row of 20 segments", H, {1, 4096 * 8 * 20 - 1}, false},
        {"f32 general path (strided), 2 segments", F, {2, 20000}, true},
    };
    for (const Long& l : longs) {
      // Gaussian log-likelihood terms of both signs that nearly cancel (x - mean uniform in
      // +-0.4, logvar -2.5: the mean term is ~0), so that the sum's last bits depend on the order
      // in which segments are formed and joined.
      RowCase c{std::string("long rows ") + l.name, OpKind::GaussLpFwd, OpKind::GaussLpBwd, l.full, 1,
                {arg(l.full, kNormal, l.dt), arg(l.full, kMu, l.dt), arg({l.full[0], 1}, kLv, F)}, 1};
      c.args[0].value = [](int64_t i) {
        return 0.8 * (static_cast<double>((static_cast<uint64_t>(i) * 2654435761u) % 1000003u) / 1000003.0 - 0.5);
      };
      c.args[1].value = [](int64_t) { return 0.0; };
      c.args[2].value = [](int64_t) { return -2.5; };
      c.args[0].transposed = c.args[1].transposed = l.transposed;
      c.args[2].grad = false;
      const auto seed = g_rng();
      g_rng.seed(seed);
      const RowRun a = run_row_case(c);
      g_rng.seed(seed);
      report(run_row_case(c, false).raw == a.raw, c.name + ": two runs give bitwise equal results");
      check_same_across_sms(c, seed, a, {1, 3, 8});
    }
    // Many short rows: grid-stride loops over more rows than the grid has groups.
    RowCase c{"fast path f32 600 short rows", OpKind::BernLpFwd, OpKind::BernLpBwd, {600, 37}, 1,
              {arg({600, 37}, kX01), arg({600, 37}, kLogit)}, 1};
    const auto seed = g_rng();
    g_rng.seed(seed);
    const RowRun a = run_row_case(c);
    check_same_across_sms(c, seed, a, {1, 3});
  }

  // The backward with broadcast gradients on its fast path (bcast_vec_kernel): one launch writes the
  // full-size gradients and the broadcast ones' segment sums, the reduced dim walked innermost.
  // n_blocks as the glue picks it (suggest_n_blocks: segments of the reduced dim, from the shape
  // only), and forced counts: one segment, uneven ones, more segments than reduced rows (empty
  // ones write zeros). Ragged tails (D not a multiple of the vector), misaligned rows (pad), the
  // reduced dim outer or inner, clamps, 16-bit types; bitwise the same for every SM count.
  {
    struct Fast {
      std::string name;
      RowCase c;
      int64_t want_nb;  // the suggested n_blocks (0: forced, c.n_blocks)
    };
    std::vector<Fast> fast;
    {
      RowCase c{"fast bcast gauss x(B,D) vs mean, logvar (K,B,D) f32", OpKind::GaussLpFwd, OpKind::GaussLpBwd,
                {5, 7, 37}, 1, {arg({1, 7, 37}, kNormal), arg({5, 7, 37}, kMu), arg({5, 7, 37}, kLv)}, 1};
      c.suggested = true;
      fast.push_back({c.name, c, 1});
    }
    {
      RowCase c{"fast bcast gauss bf16 x, logvar (B,D) vs mean (K,B,D), misaligned", OpKind::GaussLpFwd,
                OpKind::GaussLpBwd, {3, 6, 45}, 1,
                {arg({1, 6, 45}, kNormal, B), arg({3, 6, 45}, kMu, B), arg({1, 6, 45}, kLv, B)}, 1};
      c.args[1].pad = 3;
      c.suggested = true;
      fast.push_back({c.name, c, 1});
    }
    {
      RowCase c{"fast bcast bern f16, reduced dim inner (B,K,D)", OpKind::BernLpFwd, OpKind::BernLpBwd,
                {6, 4, 40}, 1, {arg({6, 1, 40}, kX01, H), arg({6, 4, 40}, kLogit, H)}, 1};
      c.suggested = true;
      fast.push_back({c.name, c, 1});
    }
    {
      RowCase c{"fast bcast kl prior (1,D) vs (B,D), suggested segments", OpKind::KlFwd, OpKind::KlBwd,
                {100, 20}, 1, {arg({100, 20}, kMu), arg({100, 20}, kLv), arg({1, 20}, kMu), arg({1, 20}, kLv)}, 1};
      c.suggested = true;
      fast.push_back({c.name, c, 100 / 16});
      c.suggested = false;
      c.n_blocks = 150;
      c.name = "fast bcast kl prior, 150 segments over 100 rows";
      fast.push_back({c.name, c, 0});
      c.n_blocks = 7;
      c.name = "fast bcast kl prior, 7 uneven segments";
      fast.push_back({c.name, c, 0});
    }
    {
      RowCase c{"fast bcast gauss clamped logvar (1,B,D), f16", OpKind::GaussLpFwd, OpKind::GaussLpBwd,
                {4, 5, 33}, 1, {arg({1, 5, 33}, kNormal, H), arg({4, 5, 33}, kMu, H), arg({1, 5, 33}, kLv, H)}, 1};
      c.args[2].clamp = true;
      c.args[2].lo = -0.5;
      c.args[2].hi = 1.0;
      c.suggested = true;
      fast.push_back({c.name, c, 1});
    }
    {
      RowCase c{"fast bcast kl prior, elementwise grad", OpKind::KlFwd, OpKind::KlBwd, {40, 24}, 1,
                {arg({40, 24}, kMu), arg({40, 24}, kLv), arg({1, 24}, kMu), arg({1, 24}, kLv)}, 1, true};
      c.suggested = true;
      fast.push_back({c.name, c, 40 / 16});
    }
    // Two reduced dims: a per-feature log-variance (1, 1, D) against the (K, B, D) mean and (B, D)
    // data (the data's strides keep K and B apart); also with the reduced dims in the other order.
    {
      RowCase c{"fast bcast two reduced dims: gauss per-feature logvar vs (K,B,D)", OpKind::GaussLpFwd,
                OpKind::GaussLpBwd, {4, 30, 41}, 1,
                {arg({1, 30, 41}, kNormal), arg({4, 30, 41}, kMu), arg({1, 1, 41}, kLv)}, 1};
      c.args[0].grad = false;
      c.suggested = true;
      fast.push_back({c.name, c, 120 / 16});
      RowCase b{"fast bcast two reduced dims, bf16, (B,K,D) order, 3 forced segments", OpKind::GaussLpFwd,
                OpKind::GaussLpBwd, {30, 4, 41}, 1,
                {arg({30, 1, 41}, kNormal, B), arg({30, 4, 41}, kMu, B), arg({1, 1, 41}, kLv, B)}, 3};
      b.args[0].grad = false;
      fast.push_back({b.name, b, 0});
    }
    // One value per kept row (a per-row log-variance): bcast_row_vec_kernel, a group per (segment,
    // row); no reduced row dim, the K samples reduced, and gaussian_nll_loss's per-row var with a
    // clamped eps operand.
    {
      RowCase c{"fast bcast per-row: gauss logvar (B,1) vs (B,D) f32", OpKind::GaussLpFwd, OpKind::GaussLpBwd,
                {50, 70}, 1, {arg({50, 70}, kNormal), arg({50, 70}, kMu), arg({50, 1}, kLv)}, 1};
      c.suggested = true;
      fast.push_back({c.name, c, 1});
      RowCase k{"fast bcast per-row: bf16 logvar (B,1) vs mean (K,B,D), misaligned", OpKind::GaussLpFwd,
                OpKind::GaussLpBwd, {40, 6, 45}, 1,
                {arg({1, 6, 45}, kNormal, B), arg({40, 6, 45}, kMu, B), arg({1, 6, 1}, kLv, B)}, 1};
      k.args[0].grad = false;
      k.args[1].pad = 3;
      k.suggested = true;
      fast.push_back({k.name, k, 40 / 16});
      k.suggested = false;
      k.n_blocks = 5;
      k.name = "fast bcast per-row: bf16, 5 forced segments";
      fast.push_back({k.name, k, 0});
      RowCase n{"fast bcast per-row: gauss nll var (B,1), eps 0.3, long rows", OpKind::GaussNllFwd,
                OpKind::GaussNllBwd, {9, 3000}, 1,
                {arg({9, 3000}, kNormal), arg({9, 3000}, kMu), arg({9, 1}, kVar), arg({1, 1}, kVar)}, 1};
      n.args[3].value = [](int64_t) { return 0.3; };
      n.args[3].grad = false;
      n.suggested = true;
      fast.push_back({n.name, n, 1});
    }
    // Images: a per-channel log-variance (1, C, 1, 1) against (B, C, H, W), 3 event dims: the outer
    // event dim (C) joins the rows, so the log-variance is one value per (b, c) row, b reduced.
    {
      RowCase c{"fast bcast per-channel logvar (1,C,1,1) vs (B,C,H,W) f32", OpKind::GaussLpFwd, OpKind::GaussLpBwd,
                {20, 3, 5, 7}, 3,
                {arg({20, 3, 5, 7}, kNormal), arg({20, 3, 5, 7}, kMu), arg({1, 3, 1, 1}, kLv)}, 1};
      c.suggested = true;
      fast.push_back({c.name, c, 1});
      RowCase b = c;
      b.name = "fast bcast per-channel logvar bf16, clamped, (K,B,C,H,W) with data (B,C,H,W)";
      b.full = {2, 20, 3, 4, 8};
      b.args = {arg({1, 20, 3, 4, 8}, kNormal, B), arg({2, 20, 3, 4, 8}, kMu, B), arg({1, 1, 3, 1, 1}, kLv, B)};
      b.args[0].grad = false;
      b.args[2].clamp = true;
      b.args[2].lo = -0.5;
      b.args[2].hi = 1.0;
      fast.push_back({b.name, b, 40 / 16});
    }
    // A scalar log-variance (its gradient summed over every element): scalar_acc_vec_kernel, a
    // fixed block count from the shape (about 8 chunks per thread, suggested) or forced.
    {
      RowCase c{"fast scalar acc gauss mean (K,B,D) vs x (B,D), scalar logvar f32", OpKind::GaussLpFwd,
                OpKind::GaussLpBwd, {3, 40, 37}, 1,
                {arg({1, 40, 37}, kNormal), arg({3, 40, 37}, kMu), arg({1, 1, 1}, kLv)}, 1};
      c.args[0].grad = false;
      c.suggested = true;
      fast.push_back({c.name, c, 1});  // 3 * 40 * 10 chunks: one block
      RowCase b = c;
      b.name = "fast scalar acc gauss bf16, misaligned, 2048 blocks";
      b.full = {8, 300, 45};
      b.args = {arg({1, 300, 45}, kNormal, B), arg({8, 300, 45}, kMu, B), arg({1, 1, 1}, kLv, B)};
      b.args[0].grad = false;
      b.args[1].pad = 5;
      fast.push_back({b.name, b, 8});  // 8 * 300 * 6 chunks of 8, 2048 per block
      b.suggested = false;
      b.n_blocks = 9;
      b.name = "fast scalar acc gauss bf16, 9 forced blocks";
      fast.push_back({b.name, b, 0});
      RowCase k{"fast scalar acc klstd, scalar logvar clamped, f16", OpKind::KlStdFwd, OpKind::KlStdBwd, {64, 50}, 1,
                {arg({64, 50}, kMu, H), arg({1, 1}, kLv)}, 1};
      k.args[1].clamp = true;
      k.args[1].lo = -1.0;
      k.args[1].hi = 0.5;
      k.suggested = true;
      fast.push_back({k.name, k, 1});
    }
    for (Fast& f : fast) {
      const auto seed = g_rng();
      g_rng.seed(seed);
      const RowRun a = run_row_case(f.c);
      if (f.want_nb > 0)
        report(a.n_blocks == f.want_nb, f.name + ": suggested n_blocks",
               std::to_string(a.n_blocks) + " want " + std::to_string(f.want_nb));
#if defined(VF_EMULATE)
      report(a.bwd_launches == 1, f.name + ": one backward launch", std::to_string(a.bwd_launches));
#endif
      check_same_across_sms(f.c, seed, a, {1, 3, 8});
    }
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
// eps of flat index i by philox.h's documented layout: Philox4x32-10 (checked against the
// published known answers in philox_known_answers) of block i / 4, then Box-Muller written out
// here in double (u = x * 2^-32 + 2^-33 rounded to float32, as documented).
double host_eps(uint64_t seed, uint64_t i) {
  uint32_t x[4];
  philox::block(seed, i / 4, x);
  const int lane = static_cast<int>(i % 4), pair = lane / 2;
  auto u = [](uint32_t w) {
    return static_cast<double>(static_cast<float>(w) * 2.3283064365386963e-10f + 1.1641532182693481e-10f);
  };
  const double r = std::sqrt(-2.0 * std::log(u(x[2 * pair])));
  const double t = 6.283185307179586476925 * u(x[2 * pair + 1]);  // 2 pi u, unrounded (sincospi(2u))
  return lane % 2 == 0 ? r * std::cos(t) : r * std::sin(t);
}

// How a sampling case hands mu and logvar to the kernels.
struct SampleOpts {
  bool strided = false;        // mu, logvar = the two halves of each row of a (R, 2E) tensor
  bool seed_by_value = false;  // SampleArgs::seed_value instead of a device seed
  bool path_only = false;      // backward: log_q_path_only
  bool clamp = false;          // logvar clamped on load into [-1, 1.5] (launch_args.h's Clamp)
  bool grad_strided = false;   // grad_mu, grad_logvar = the two halves of each row of one (R, 2E) buffer
};

// mu and logvar (R x E logical, of dt) in device memory as opts say, with their logical values.
struct SampleInputs {
  DevBuf mu, lv, par, sd;
  std::vector<double> muv, lvv;  // lvv: logvar as the kernels use it (clamped when asked)
  std::vector<bool> keep;        // torch.clamp's gradient mask of logvar
  SampleArgs sa;
  SampleInputs(DType dt, int64_t R, int64_t E, int64_t K, int64_t seed, const SampleOpts& o) : sd(DType::Float64, 1) {
    const int64_t RE = R * E;
    if (o.strided) {
      // one (R, 2E) buffer: logical element m of mu at (m / E) * 2E + m % E, of logvar E later
      par = DevBuf(dt, 2 * RE);
      std::vector<double> pv = fill(par, [&, i = int64_t{0}]() mutable {
        const bool is_lv = E > 0 && (i++ / E) % 2 == 1;
        return is_lv ? uniform(-3.0, 3.0)() : normal(1.0)();
      });
      for (int64_t m = 0; m < RE; ++m) {
        muv.push_back(pv[(m / E) * 2 * E + m % E]);
        lvv.push_back(pv[(m / E) * 2 * E + E + m % E]);
      }
      sa.mu = par.data;
      sa.logvar = static_cast<char*>(par.data) + E * dsize(dt);
      sa.run = std::max<int64_t>(E, 1);
      sa.mu_run_stride = sa.logvar_run_stride = 2 * E;
    } else {
      mu = DevBuf(dt, RE);
      lv = DevBuf(dt, RE);
      muv = fill(mu, normal(1.0));
      lvv = fill(lv, uniform(-3.0, 3.0));
      sa.mu = mu.data;
      sa.logvar = lv.data;
      sa.run = sa.mu_run_stride = sa.logvar_run_stride = std::max<int64_t>(RE, 1);
    }
    keep.assign(lvv.size(), true);
    if (o.clamp) {
      sa.logvar_clamp.on = true;
      sa.logvar_clamp.lo = -1.0;
      sa.logvar_clamp.hi = 1.5;
      for (size_t m = 0; m < lvv.size(); ++m) {
        keep[m] = lvv[m] >= -1.0 && lvv[m] <= 1.5;
        lvv[m] = std::min(std::max(lvv[m], -1.0), 1.5);
      }
    }
    sa.grad_run = sa.grad_mu_run_stride = sa.grad_logvar_run_stride = std::max<int64_t>(RE, 1);
    sa.dtype = dt;
    sa.rows = R;
    sa.event_numel = E;
    sa.num_samples = K;
    if (o.seed_by_value) {
      sa.seed_value = static_cast<uint64_t>(seed);
    } else {
      CK(cudaMemcpy(sd.data, &seed, 8, cudaMemcpyHostToDevice));
      sa.seed = static_cast<const int64_t*>(sd.data);
    }
    sa.log_q_path_only = o.path_only;
  }
};

std::string opts_name(const SampleOpts& o) {
  return std::string(o.strided ? " strided" : "") + (o.seed_by_value ? " seed-by-value" : "") +
         (o.path_only ? " path-only" : "") + (o.clamp ? " clamped" : "") + (o.grad_strided ? " grad-strided" : "");
}

void sample_case(DType dt, int64_t R, int64_t E, int64_t K, int64_t seed, bool want_z,
                 bool want_lq, bool want_kl, const SampleOpts& opts = {}) {
  const std::string name = std::string("sample ") + dname(dt) + " R=" + std::to_string(R) +
                           " E=" + std::to_string(E) + " K=" + std::to_string(K) +
                           (want_z ? " z" : "") + (want_lq ? " log_q" : "") + (want_kl ? " kl" : "") +
                           opts_name(opts);
  const bool f64 = dt == DType::Float64;
  const DType acc = f64 ? DType::Float64 : DType::Float32;
  const int64_t RE = R * E;
  SampleInputs in(dt, R, E, K, seed, opts);
  const std::vector<double>& muv = in.muv;
  const std::vector<double>& lvv = in.lvv;
  DevBuf z(dt, K * RE), lq(acc, K * R), kl(acc, R);
  SampleArgs sa = in.sa;
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
          const double t = -0.5 * (kLog2PiRef + lvv[r * E + j] + eps * eps);
          ref += t;
          mag += 0.5 * (kLog2PiRef + std::fabs(lvv[r * E + j]) + eps * eps);
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
        const double xs[2] = {muv[r * E + j], lvv[r * E + j]};
        const double t = ref_fwd(OpKind::KlStdFwd, xs);
        ref += t;
        mag += fwd_scale(OpKind::KlStdFwd, xs);
      }
      bad += !close(got[r], ref, mag, f64 ? 1e-12 : 2e-5, 1e-30);
    }
    report(bad == 0, name + " kl");
  }
}

void sample_bwd_case(DType dt, int64_t R, int64_t E, int64_t K, int64_t seed, bool has_gz,
                     bool has_gq, bool has_gkl, bool want_mu, bool want_lv, const SampleOpts& opts = {}) {
  const std::string name = std::string("sample bwd ") + dname(dt) + " R=" + std::to_string(R) +
                           " E=" + std::to_string(E) + " K=" + std::to_string(K) +
                           (has_gz ? " gz" : "") + (has_gq ? " gq" : "") + (has_gkl ? " gkl" : "") +
                           (want_mu ? " ->mu" : "") + (want_lv ? " ->lv" : "") + opts_name(opts);
  const bool f64 = dt == DType::Float64;
  const DType acc = f64 ? DType::Float64 : DType::Float32;
  const int64_t RE = R * E;
  SampleInputs in(dt, R, E, K, seed, opts);
  const std::vector<double>& muv = in.muv;
  const std::vector<double>& lvv = in.lvv;
  DevBuf gz(dt, K * RE), gq(acc, K * R), gkl(acc, R);
  // gradients: contiguous, or the two halves of each row of one (R, 2E) buffer
  DevBuf gmu(dt, opts.grad_strided ? 2 * RE : RE), glv(dt, opts.grad_strided ? 0 : RE);
  const std::vector<double> gzv = fill(gz, normal(1.0)), gqv = fill(gq, normal(1.0));
  const std::vector<double> gklv = fill(gkl, normal(1.0));
  SampleArgs sa = in.sa;
  sa.grad_z = has_gz ? gz.data : nullptr;
  sa.grad_log_q = has_gq ? gq.data : nullptr;
  sa.grad_kl = has_gkl ? gkl.data : nullptr;
  sa.grad_mu = want_mu ? gmu.data : nullptr;
  sa.grad_logvar = want_lv ? glv.data : nullptr;
  if (opts.grad_strided) {
    CK(cudaMemset(gmu.data, 0x7f, static_cast<size_t>(2 * RE) * dsize(dt)));  // a huge value: unwritten shows
    sa.grad_logvar = want_lv ? static_cast<char*>(gmu.data) + E * dsize(dt) : nullptr;
    sa.grad_run = E;
    sa.grad_mu_run_stride = sa.grad_logvar_run_stride = 2 * E;
  }
  // logical gradient element m of the mu (half 0) or logvar (half 1) gradient
  auto grad_of = [&](const std::vector<double>& mu_buf, const std::vector<double>& lv_buf, int half, int64_t m) {
    if (!opts.grad_strided) return (half == 0 ? mu_buf : lv_buf)[m];
    return mu_buf[(m / E) * 2 * E + half * E + m % E];
  };
  const cudaError_t err = vc::launch_sample_backward(sa, nullptr);
  CK(cudaDeviceSynchronize());
  report(err == cudaSuccess, name + " launch", cudaGetErrorString(err));
  const uint64_t s = static_cast<uint64_t>(seed);
  std::vector<double> rmu(RE, 0), rlv(RE, 0), mmu(RE, 0), mlv(RE, 0);
  for (int64_t m = 0; m < RE; ++m) {
    const int64_t r = m / E;
    const double sig = std::exp(0.5 * lvv[m]);
    double sg = 0, sge = 0, sgq = 0, ag = 0, age = 0;
    double qmu = 0, qlv = 0, aqmu = 0, aqlv = 0;  // log_q's path terms (written out here, not elbo_math.h)
    for (int64_t k = 0; k < K; ++k) {
      const double eps = host_eps(s, static_cast<uint64_t>(k * RE + m));
      if (has_gz) {
        const double g = gzv[k * RE + m];
        sg += g; sge += g * eps; ag += std::fabs(g); age += std::fabs(g * eps);
      }
      if (has_gq && opts.path_only) {
        // log q(z; stop_grad(mu, lv)) = -0.5 * (log 2 pi + lv + (z - mu)^2 / sigma^2) with
        // z = mu + sigma * eps: d/dz = -eps / sigma, dz/dmu = 1, dz/dlv = sigma * eps / 2.
        const double g = gqv[k * R + r];
        qmu += -g * eps / sig;
        qlv += -g * eps / sig * (0.5 * sig * eps);
        aqmu += std::fabs(g * eps / sig);
        aqlv += 0.5 * std::fabs(g) * eps * eps;
      } else if (has_gq) {
        sgq += gqv[k * R + r];
      }
    }
    rmu[m] = sg + qmu;
    mmu[m] = ag + aqmu;
    rlv[m] = 0.5 * sig * sge - 0.5 * sgq + qlv;  // d/dlv of z (0.5 sigma eps per sample) and of log q at fixed eps (-1/2)
    mlv[m] = 0.5 * sig * age + 0.5 * K * 4.0 + aqlv;
    if (has_gkl) {
      double a, b;
      const double xk[2] = {muv[m], lvv[m]};
      double yk[2];
      ref_bwd(OpKind::KlStdBwd, gklv[r], xk, yk);
      a = yk[0];
      b = yk[1];
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
  for (int64_t m = 0; m < RE; ++m)  // the clamp's gradient: 0 where logvar was clamped
    if (!in.keep[m]) rlv[m] = mlv[m] = 0.0;
  const std::vector<double> gmu_all = gmu.download(), glv_all = glv.download();
  if (want_mu) {
    int bad = 0;
    for (int64_t m = 0; m < RE; ++m) bad += !close(grad_of(gmu_all, glv_all, 0, m), rmu[m], 0, 0, tol(rmu[m], mmu[m]));
    report(bad == 0, name + " grad_mu");
  }
  if (want_lv) {
    std::vector<double> got(static_cast<size_t>(RE));
    for (int64_t m = 0; m < RE; ++m) got[m] = grad_of(gmu_all, glv_all, 1, m);
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
  // K = 1: the backward's own instance (single terms, no compensated sums), every gradient mix.
  for (int mask = 0; mask < 8; ++mask) {
    sample_bwd_case(F, 5, 13, 1, 99, mask & 1, mask & 2, mask & 4, true, true);
    sample_bwd_case(D, 3, 7, 1, 99, mask & 1, mask & 2, mask & 4, true, mask & 1);
  }
  // Strided mu/logvar (halves of a (R, 2E) encoder output), seed by value, log_q path only.
  SampleOpts strided, by_value, path, all3;
  strided.strided = true;
  by_value.seed_by_value = true;
  path.path_only = true;
  all3.strided = all3.seed_by_value = all3.path_only = true;
  for (DType dt : {F, B, D}) {
    for (int64_t E : {1, 3, 4, 37}) {
      sample_case(dt, 5, E, 3, 42, true, true, true, strided);
      sample_bwd_case(dt, 5, E, 3, 42, true, true, true, true, true, strided);
    }
    sample_case(dt, 5, 37, 3, big_seed, true, true, false, by_value);
    sample_bwd_case(dt, 5, 37, 3, big_seed, true, false, false, false, true, by_value);
    for (int mask = 0; mask < 8; ++mask)
      sample_bwd_case(dt, 4, 13, 3, 5, mask & 1, true, mask & 2, true, mask & 4, path);
    sample_bwd_case(dt, 6, 11, 2, big_seed, true, true, true, true, true, all3);
    SampleOpts cl, gs, every;
    cl.clamp = true;
    gs.grad_strided = true;
    every.strided = every.seed_by_value = every.path_only = every.clamp = every.grad_strided = true;
    for (int64_t E : {1, 5, 37}) {
      sample_case(dt, 4, E, 2, 9, true, true, true, cl);
      sample_bwd_case(dt, 4, E, 2, 9, true, true, true, true, true, cl);
      sample_bwd_case(dt, 4, E, 2, 9, true, true, true, true, true, gs);
      sample_bwd_case(dt, 4, E, 3, big_seed, true, true, true, true, true, every);
    }
  }
  sample_case(F, 3, 3000, 2, 11, true, true, true, strided);  // block-wide groups, runs inside chunks
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
      SampleOpts o;
      o.strided = pick(2) == 0;
      o.seed_by_value = pick(2) == 0;
      o.path_only = pick(2) == 0;
      o.clamp = pick(3) == 0;
      o.grad_strided = pick(3) == 0;
      if (f) sample_case(dt, R, E, K, seed, f & 1, f & 2, f & 4, o);
      const int b = static_cast<int>(pick(32));
      if (E > 0 && (b & 24)) sample_bwd_case(dt, R, E, K, seed, b & 1, b & 2, b & 4, b & 8, b & 16, o);
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
    sa.run = sa.mu_run_stride = sa.logvar_run_stride = 60;
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

// floor(u * total / n) without overflow (acc_kernel's unit ranges): targets past 3e9 in reorder
// mode made u * total wrap around int64 (those gradients stayed 0).
VF_GLOBAL void split_kernel(const vc::detail::Split* sp, const int64_t* u, int64_t* out, int count) {
  const int i = static_cast<int>(vc::detail::bid_x() * vc::detail::bdim_x() + vc::detail::tid_x());
  if (i < count) vc::detail::st(out + i, vc::detail::split_point(sp[i], vc::detail::ldg(u + i)));
}

void split_tests() {
  struct T { int64_t total, n, u; };
  std::vector<T> ts;
  const int64_t big = 4000000007ll;  // > 3.04e9 = sqrt(2^63): u * total overflows
  for (int64_t u : {int64_t{0}, int64_t{1}, int64_t{3037000500}, big - 1, big}) ts.push_back({big, big, u});
  for (int64_t u : {0, 1, 77, 4095, 4096}) ts.push_back({(int64_t{1} << 62) + 12345, 4096, u});
  for (int64_t u : {0, 1, 500, 999, 1000}) ts.push_back({5000000007ll, 1000, u});
  for (int t = 0; t < 200; ++t) {
    const int64_t n = 1 + static_cast<int64_t>(g_rng() % 100000);
    const int64_t total = static_cast<int64_t>(g_rng() >> 2);
    ts.push_back({total, n, static_cast<int64_t>(g_rng() % static_cast<uint64_t>(n + 1))});
  }
  const int count = static_cast<int>(ts.size());
  std::vector<vc::detail::Split> sp(count);
  std::vector<int64_t> us(count);
  bool made = true;
  for (int i = 0; i < count; ++i) {
    made &= vc::detail::make_split(ts[i].total, ts[i].n, sp[i]);
    us[i] = ts[i].u;
  }
  report(made, "make_split accepts every case");
  vc::detail::Split* dsp;
  int64_t *du, *dout;
  CK(cudaMalloc(&dsp, count * sizeof(vc::detail::Split)));
  CK(cudaMalloc(&du, count * sizeof(int64_t)));
  CK(cudaMalloc(&dout, count * sizeof(int64_t)));
  CK(cudaMemcpy(dsp, sp.data(), count * sizeof(vc::detail::Split), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(du, us.data(), count * sizeof(int64_t), cudaMemcpyHostToDevice));
  CK(vc::detail::launch_kernel(&split_kernel, (count + 255) / 256, 256, nullptr,
                               static_cast<const vc::detail::Split*>(dsp), static_cast<const int64_t*>(du),
                               dout, count));
  CK(cudaDeviceSynchronize());
  std::vector<int64_t> got(count);
  CK(cudaMemcpy(got.data(), dout, count * sizeof(int64_t), cudaMemcpyDeviceToHost));
  int bad = 0;
  std::string first;
  for (int i = 0; i < count; ++i) {
    const int64_t want = static_cast<int64_t>(static_cast<__int128>(ts[i].u) * ts[i].total / ts[i].n);
    if (got[i] != want && !bad++)
      first = std::to_string(ts[i].u) + " * " + std::to_string(ts[i].total) + " / " + std::to_string(ts[i].n) +
              " gave " + std::to_string(got[i]);
  }
  report(bad == 0, "unit ranges past 3e9 targets (no int64 overflow)", first);
  cudaFree(dsp);
  cudaFree(du);
  cudaFree(dout);
}

// Philox4x32-10 of philox.h (the host-callable code the kernels run) against Random123's published
// known-answer vectors (examples/kat_vectors: counter, key, expected output).
void philox_known_answers() {
  struct V { uint32_t ctr[4], key[2], out[4]; };
  const V vs[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const V& v : vs) {
    uint32_t c[4] = {v.ctr[0], v.ctr[1], v.ctr[2], v.ctr[3]};
    philox::philox4x32_10(c, v.key[0], v.key[1]);
    char buf[160];
    std::snprintf(buf, sizeof buf, "key %08x %08x: got %08x %08x %08x %08x", v.key[0], v.key[1], c[0], c[1], c[2], c[3]);
    report(c[0] == v.out[0] && c[1] == v.out[1] && c[2] == v.out[2] && c[3] == v.out[3],
           "Philox4x32-10 known answer", buf);
  }
  // philox::block puts block b in counter words 0 (low) and 1 (high) and the seed in the key.
  uint32_t x[4];
  philox::block(0x299f31d0a4093822ull, 0x85a308d3243f6a88ull, x);
  uint32_t c[4] = {0x243f6a88u, 0x85a308d3u, 0, 0};
  philox::philox4x32_10(c, 0xa4093822u, 0x299f31d0u);
  report(x[0] == c[0] && x[1] == c[1] && x[2] == c[2] && x[3] == c[3], "philox::block counter and key layout");
}

// --dump-eps SEED START N: the eps of flat indices START .. START+N-1 as the sampling kernels draw
// them, one per line (9 significant digits). Small ranges run the real forward kernel with mu = 0,
// logvar = 0 (z = eps exactly), seed by value; ranges past 2^22 (no buffer that large) run
// normals4, the function every sampling kernel draws with, for the blocks that cover the range.
VF_GLOBAL void eps_kernel(uint64_t seed, int64_t start, int64_t n, float* out) {
  const int64_t i = vc::detail::bid_x() * vc::detail::bdim_x() + vc::detail::tid_x();
  if (i >= n) return;
  float v[4];
  const int64_t flat = start + i;
  vc::detail::normals4(seed, static_cast<uint64_t>(flat >> 2), v);
  vc::detail::st(out + i, v[flat & 3]);
}

int dump_eps(uint64_t seed, int64_t start, int64_t n) {
  if (start < 0 || n < 0) return 2;
  std::vector<double> eps;
  if (start + n <= (int64_t{1} << 22)) {
    const int64_t total = std::max<int64_t>(start + n, 1);
    DevBuf mu(DType::Float32, total), lv(DType::Float32, total), z(DType::Float32, total);
    mu.zero();
    lv.zero();
    SampleArgs sa;
    sa.mu = mu.data;
    sa.logvar = lv.data;
    sa.rows = 1;
    sa.event_numel = total;
    sa.run = sa.mu_run_stride = sa.logvar_run_stride = total;
    sa.seed_value = seed;
    sa.z = z.data;
    CK(vc::launch_sample_forward(sa, nullptr));
    CK(cudaDeviceSynchronize());
    const std::vector<double> all = z.download();
    eps.assign(all.begin() + start, all.begin() + start + n);
  } else {
    DevBuf out(DType::Float32, std::max<int64_t>(n, 1));
    CK(vc::detail::launch_kernel(&eps_kernel, (n + 255) / 256, 256, nullptr, seed, start, n,
                                 static_cast<float*>(out.data)));
    CK(cudaDeviceSynchronize());
    eps = out.download();
    eps.resize(static_cast<size_t>(n));
  }
  for (double e : eps) std::printf("%.9g\n", e);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("no CUDA device: nothing run\n0 passed, 0 failed, 1 skipped\n");
    return 0;
  }
  if (argc == 5 && std::string(argv[1]) == "--dump-eps")
    return dump_eps(std::strtoull(argv[2], nullptr, 0), std::strtoll(argv[3], nullptr, 0),
                    std::strtoll(argv[4], nullptr, 0));
  if (argc > 1) {
    std::fprintf(stderr, "usage: %s [--dump-eps SEED START N]\n", argv[0]);
    return 2;
  }
  philox_known_answers();
  fastdiv_tests();
  split_tests();
  row_tests();
  sample_tests();
  {
    // The general path's row blocks: KlStdBwd over (rows, 784) in float64 (no fast path), its logvar
    // one value (scalar) or one per row, so its gradient is reduced over the event too. Host
    // planning only.
    static float dummy[4];
    auto kl_args = [](int64_t rows, bool per_row, DType dt) {
      RowArgs ra;
      ra.layout.n_row_dims = ra.layout.n_event_dims = 1;
      ra.layout.row_sizes[0] = ra.layout.rows = rows;
      ra.layout.event_sizes[0] = ra.layout.event_numel = 784;
      for (int i = 0; i < 3; ++i) {
        ra.in[i].data = dummy;
        ra.in[i].dtype = dt;
      }
      ra.in[0].row_strides[0] = 1;                                 // g: one per row
      ra.in[1].row_strides[0] = ra.out[0].row_strides[0] = 784;  // mu and its gradient
      ra.in[1].event_strides[0] = ra.out[0].event_strides[0] = 1;
      ra.out[0].data = dummy;
      ra.out[0].dtype = dt;
      ra.in[2].row_strides[0] = ra.out[1].row_strides[0] = per_row ? 1 : 0;
      ra.out[1].accumulate = true;
      ra.out[1].dtype = dt;
      return ra;
    };
    const DType F64 = DType::Float64, F32 = DType::Float32;
    const int64_t a = vc::suggest_n_blocks(0, OpKind::KlStdBwd, kl_args(4096, false, F64), 1);
    const int64_t b = vc::suggest_n_blocks(0, OpKind::KlStdBwd, kl_args(4096, true, F64), 4096);
    const int64_t c = vc::suggest_n_blocks(0, OpKind::KlStdBwd, kl_args(1, false, F64), 1);
    report(a > 1 && a <= 4096 && b == 1 && c == 1, "suggest_n_blocks");
    // float32 with a scalar logvar: the scalar-accumulation fast path, blocks from the shape alone
    const int64_t s0 = vc::suggest_n_blocks(0, OpKind::KlStdBwd, kl_args(4096, false, F32), 1);
    const int64_t s1 = vc::suggest_n_blocks(1, OpKind::KlStdBwd, kl_args(4096, false, F32), 1);
    report(s0 == (4096 * 196 + 2047) / 2048 && s1 == s0, "suggest_n_blocks: scalar fast path from the shape only",
           std::to_string(s0) + " " + std::to_string(s1));
#if defined(VF_EMULATE)
    // emulated devices 0 and 1 have 2 and 8 SMs: the count is the named device's, not the current one's
    const int64_t d1 = vc::suggest_n_blocks(1, OpKind::KlStdBwd, kl_args(4096, false, F64), 1);
    report(a == 2 * 32 && d1 == 8 * 32, "suggest_n_blocks uses the named device's SM count",
           std::to_string(a) + " " + std::to_string(d1));
#endif
  }
#if defined(VF_EMULATE)
  {  // an infinite running sum stays inf: TwoSum's error is then inf - inf = NaN, which value() must not add
    vc::detail::CSum<float> s, t, u;
    s.add(1.0f);
    s.add(INFINITY);
    s.add(2.0f);
    t.add(3e38f);  // finite terms whose sum overflows
    t.add(3e38f);
    u.merge(s);
    report(std::isinf(s.value()) && s.value() > 0 && std::isinf(t.value()) && std::isinf(u.value()),
           "compensated sum with an infinite term is inf, not NaN");
  }
  std::printf("(emulated: %lld kernel launches on the CPU)\n", static_cast<long long>(emu::S().launches));
#endif
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
