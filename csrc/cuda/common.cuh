// Device helpers shared by rows.cu and sample.cu: typed loads/stores over the four dtypes, fast
// integer division for index decomposition, deterministic group reductions, the kernel parameter
// block. Internal to csrc/cuda/.
//
// The same source also compiles as plain C++ (g++ -x c++ -DVF_EMULATE -Itests/cuda) against
// tests/cuda/emu.h, a small CPU emulator of the CUDA features used here (threads as fibers,
// __syncthreads, warp shuffles, bounds-checked "device" memory, a check that no two threads write
// the same address in one launch). tests/cuda/selftest.cu runs that way on machines without a GPU.
// Nothing below may depend on it.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "core/launch_args.h"
#include "core/elbo_math.h"
#include "core/philox.h"

#if defined(VF_EMULATE)
#include "emu.h"
#define VF_DEV inline
#define VF_GLOBAL
#define VF_GRID_CONST
#define VF_SHARED_ARRAY(T, name, n) static ::emu::SharedArray<T, n> name
#define VF_LAUNCH_BOUNDS(...)
#define VF_UNROLL
#define VF_NO_UNROLL
#else
#define VF_DEV __device__ __forceinline__
#define VF_GLOBAL __global__
#define VF_GRID_CONST __grid_constant__
#define VF_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define VF_LAUNCH_BOUNDS(...) __launch_bounds__(__VA_ARGS__)
#define VF_UNROLL _Pragma("unroll")
#define VF_NO_UNROLL _Pragma("unroll 1")
#endif

namespace vae_fast::cuda::detail {

// ---- thread geometry, memory access, warp/block primitives (real or emulated) ---------------
#if defined(VF_EMULATE)
VF_DEV int tid_x() { return emu::tid(); }
VF_DEV int64_t bid_x() { return emu::bid(); }
VF_DEV int64_t bdim_x() { return emu::bdim(); }
VF_DEV int64_t gdim_x() { return emu::gdim(); }
template <class T>
VF_DEV T ldg(const T* p) { emu::check_read(p, sizeof(T)); return *p; }
template <class T>
VF_DEV void st(T* p, T v) { emu::note_write(p, sizeof(T)); *p = v; }
template <class T>
VF_DEV T shfl_xor(unsigned mask, T v, int off) { return emu::shfl_xor(mask, v, off); }
VF_DEV void sync_block() { emu::syncthreads(); }
VF_DEV uint32_t umulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}
VF_DEV uint64_t umul64hi(uint64_t a, uint64_t b) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
}
VF_DEV float bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
VF_DEV int ilog2_pow2(int x) { return __builtin_ctz(static_cast<unsigned>(x)); }
#else
VF_DEV int tid_x() { return static_cast<int>(threadIdx.x); }
VF_DEV int64_t bid_x() { return static_cast<int64_t>(blockIdx.x); }
VF_DEV int64_t bdim_x() { return static_cast<int64_t>(blockDim.x); }
VF_DEV int64_t gdim_x() { return static_cast<int64_t>(gridDim.x); }
template <class T>
VF_DEV T ldg(const T* p) { return __ldg(p); }
template <class T>
VF_DEV void st(T* p, T v) { *p = v; }
template <class T>
VF_DEV T shfl_xor(unsigned mask, T v, int off) { return __shfl_xor_sync(mask, v, off); }
VF_DEV void sync_block() { __syncthreads(); }
VF_DEV uint32_t umulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
VF_DEV uint64_t umul64hi(uint64_t a, uint64_t b) { return __umul64hi(a, b); }
VF_DEV float bits_to_float(uint32_t b) { return __uint_as_float(b); }
VF_DEV int ilog2_pow2(int x) { return __ffs(x) - 1; }
#endif

// Read-modify-write of an accumulation slot that only the calling thread touches in this launch.
template <class T>
VF_DEV void acc_add(T* p, T v) {
#if defined(VF_EMULATE)
  emu::check_read(p, sizeof(T));
#endif
  st(p, static_cast<T>(*p + v));
}

// ---- fast division by a runtime constant (index decomposition) ------------------------------
// q = n / d for 0 <= n < 2^63, 1 <= d < 2^63, without a division instruction (a 64-bit integer
// division is a subroutine call on the GPU, whose calling convention spills registers):
// Granlund-Montgomery round-up magic, as in ATen's IntDivider, with a 32-bit multiply-high when
// n and d are below 2^31 and a 64-bit one otherwise. q = (mulhi(n, m) + n) >> s with
// s = ceil(log2 d), m = floor(2^N (2^s - d) / d) + 1 (N = 32 or 64); exact for n < 2^(N-1).
struct FastDiv {
  int64_t d = 1;
  uint64_t m64 = 1;
  uint32_t m32 = 1;
  uint32_t s = 0;
};

inline FastDiv make_fastdiv(int64_t d) {
  FastDiv f;
  f.d = d < 1 ? 1 : d;
  const uint64_t ud = static_cast<uint64_t>(f.d);
  uint32_t s = 0;
  while (s < 63 && (uint64_t{1} << s) < ud) ++s;
  f.s = s;
  const unsigned __int128 two64 = static_cast<unsigned __int128>(1) << 64;
  f.m64 = static_cast<uint64_t>(two64 * ((uint64_t{1} << s) - ud) / ud + 1);
  if (f.d <= INT32_MAX) {
    const uint64_t two32 = uint64_t{1} << 32;
    f.m32 = static_cast<uint32_t>(two32 * ((uint64_t{1} << s) - ud) / ud + 1);
  } else {
    f.m32 = 0;  // never used: the 32-bit path needs n < 2^31 <= d, answered below
  }
  return f;
}

VF_DEV int64_t fdiv(const FastDiv& f, int64_t n) {
  if (n <= INT32_MAX && f.d <= INT32_MAX) {
    const uint32_t nn = static_cast<uint32_t>(n);
    const uint32_t t = umulhi(nn, f.m32);
    return static_cast<int64_t>((t + nn) >> f.s);
  }
  if (n < f.d) return 0;
  const uint64_t nn = static_cast<uint64_t>(n);
  const uint64_t t = umul64hi(nn, f.m64);
  return static_cast<int64_t>((t + nn) >> f.s);
}

// floor(u * total / n) for 0 <= u <= n, with total = q * n + r (0 <= r < n) and div dividing by n:
// u * q + floor(u * r / n), never forming u * total, which overflows int64 once both pass ~3e9
// (a per-target unit of the reorder mode has total == n: then r == 0). The caller guarantees
// n * r < 2^63 (make_split refuses otherwise).
struct Split {
  int64_t q = 0, r = 0;
  FastDiv div;
};
inline bool make_split(int64_t total, int64_t n, Split& s) {
  if (n < 1 || total < 0) return false;
  s.q = total / n;
  s.r = total % n;
  s.div = make_fastdiv(n);
  return s.r == 0 || n <= (INT64_MAX / s.r);
}
VF_DEV int64_t split_point(const Split& s, int64_t u) { return u * s.q + fdiv(s.div, u * s.r); }

// Adds the coordinates of flat index idx over n dims (C order: dim n-1 varies fastest; div[d]
// divides by the size of dim d) times per-operand strides: off[o] += c_d * stride(o, d), innermost
// dim first.
template <int N, class Stride>
VF_DEV void add_dim_offsets(const FastDiv* div, int n, int64_t idx, int64_t (&off)[N],
                            Stride stride) {
  VF_NO_UNROLL
  for (int d = n - 1; d > 0; --d) {
    const int64_t q = fdiv(div[d], idx);
    const int64_t c = idx - q * div[d].d;
    idx = q;
    VF_UNROLL
    for (int o = 0; o < N; ++o) off[o] += c * stride(o, d);
  }
  if (n > 0) {
    VF_UNROLL
    for (int o = 0; o < N; ++o) off[o] += idx * stride(o, 0);
  }
}

// ---- dtype conversion and 4-wide loads/stores ----------------------------------------------
VF_DEV float from16(unsigned short b, DType dt) {
  if (dt == DType::BFloat16) return bits_to_float(static_cast<uint32_t>(b) << 16);
  return __half2float(__ushort_as_half(b));
}
VF_DEV unsigned short to16(float v, DType dt) {
  if (dt == DType::BFloat16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  return __half_as_ushort(__float2half_rn(v));
}
template <int kAlign, class T>
VF_DEV bool aligned(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & (kAlign - 1)) == 0;
}

// Element e of a 4-element chunk lives at element offset off + e * s; only lanes lo <= e < hi are
// touched (others read as 0). s == 0 (broadcast) loads once. A full, unit-stride, aligned chunk
// is one 16-byte (float32, float64: two) or 8-byte (16-bit types) access; otherwise scalar. The
// accumulation order never depends on which path ran.
template <class A>
struct Mem;

template <>
struct Mem<float> {
  static VF_DEV float load1(const void* base, DType dt, int64_t off) {
    if (dt == DType::Float32) return ldg(static_cast<const float*>(base) + off);
    return from16(ldg(static_cast<const unsigned short*>(base) + off), dt);
  }
  static VF_DEV void store1(void* base, DType dt, int64_t off, float v) {
    if (dt == DType::Float32) {
      st(static_cast<float*>(base) + off, v);
    } else if (dt == DType::Float64) {
      st(static_cast<double*>(base) + off, static_cast<double>(v));
    } else {
      st(static_cast<unsigned short*>(base) + off, to16(v, dt));
    }
  }
  static VF_DEV void load4(const void* base, DType dt, int64_t off, int64_t s, int lo, int hi,
                           float (&v)[4]) {
    VF_UNROLL
    for (int e = 0; e < 4; ++e) v[e] = 0.0f;
    if (hi <= lo) return;
    if (s == 0) {
      const float x = load1(base, dt, off);
      VF_UNROLL
      for (int e = 0; e < 4; ++e) v[e] = x;
      return;
    }
    if (dt == DType::Float32) {
      const float* p = static_cast<const float*>(base);
      if (s == 1 && lo == 0 && hi == 4 && aligned<16>(p + off)) {
        const float4 t = ldg(reinterpret_cast<const float4*>(p + off));
        v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
        return;
      }
      VF_UNROLL
      for (int e = 0; e < 4; ++e)
        if (e >= lo && e < hi) v[e] = ldg(p + (off + e * s));
      return;
    }
    const unsigned short* p = static_cast<const unsigned short*>(base);
    unsigned short b[4] = {0, 0, 0, 0};
    if (s == 1 && lo == 0 && hi == 4 && aligned<8>(p + off)) {
      const uint2 t = ldg(reinterpret_cast<const uint2*>(p + off));
      b[0] = static_cast<unsigned short>(t.x & 0xffffu);
      b[1] = static_cast<unsigned short>(t.x >> 16);
      b[2] = static_cast<unsigned short>(t.y & 0xffffu);
      b[3] = static_cast<unsigned short>(t.y >> 16);
    } else {
      VF_UNROLL
      for (int e = 0; e < 4; ++e)
        if (e >= lo && e < hi) b[e] = ldg(p + (off + e * s));
    }
    VF_UNROLL
    for (int e = 0; e < 4; ++e)
      if (e >= lo && e < hi) v[e] = from16(b[e], dt);
  }
  static VF_DEV void store4(void* base, DType dt, int64_t off, int64_t s, int lo, int hi,
                            const float (&v)[4]) {
    if (hi <= lo) return;
    if (dt == DType::Float32) {
      float* p = static_cast<float*>(base);
      if (s == 1 && lo == 0 && hi == 4 && aligned<16>(p + off)) {
        st(reinterpret_cast<float4*>(p + off), make_float4(v[0], v[1], v[2], v[3]));
        return;
      }
      VF_UNROLL
      for (int e = 0; e < 4; ++e)
        if (e >= lo && e < hi) st(p + (off + e * s), v[e]);
      return;
    }
    if (dt == DType::Float64) {  // only reached for a float64 forward output of float inputs
      VF_UNROLL
      for (int e = 0; e < 4; ++e)
        if (e >= lo && e < hi) store1(base, dt, off + e * s, v[e]);
      return;
    }
    unsigned short* p = static_cast<unsigned short*>(base);
    unsigned short b[4];
    VF_UNROLL
    for (int e = 0; e < 4; ++e) b[e] = to16(v[e], dt);
    if (s == 1 && lo == 0 && hi == 4 && aligned<8>(p + off)) {
      st(reinterpret_cast<uint2*>(p + off),
         make_uint2(static_cast<uint32_t>(b[0]) | (static_cast<uint32_t>(b[1]) << 16),
                    static_cast<uint32_t>(b[2]) | (static_cast<uint32_t>(b[3]) << 16)));
      return;
    }
    VF_UNROLL
    for (int e = 0; e < 4; ++e)
      if (e >= lo && e < hi) st(p + (off + e * s), b[e]);
  }
};

template <>
struct Mem<double> {  // every operand is float64 in a float64 launch
  static VF_DEV double load1(const void* base, DType, int64_t off) {
    return ldg(static_cast<const double*>(base) + off);
  }
  static VF_DEV void store1(void* base, DType, int64_t off, double v) {
    st(static_cast<double*>(base) + off, v);
  }
  static VF_DEV void load4(const void* base, DType dt, int64_t off, int64_t s, int lo, int hi,
                           double (&v)[4]) {
    VF_UNROLL
    for (int e = 0; e < 4; ++e) v[e] = 0.0;
    if (hi <= lo) return;
    const double* p = static_cast<const double*>(base);
    if (s == 0) {
      const double x = load1(base, dt, off);
      VF_UNROLL
      for (int e = 0; e < 4; ++e) v[e] = x;
      return;
    }
    if (s == 1 && lo == 0 && hi == 4 && aligned<16>(p + off)) {
      const double2 a = ldg(reinterpret_cast<const double2*>(p + off));
      const double2 b = ldg(reinterpret_cast<const double2*>(p + off) + 1);
      v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
      return;
    }
    VF_UNROLL
    for (int e = 0; e < 4; ++e)
      if (e >= lo && e < hi) v[e] = ldg(p + (off + e * s));
  }
  static VF_DEV void store4(void* base, DType, int64_t off, int64_t s, int lo, int hi,
                            const double (&v)[4]) {
    if (hi <= lo) return;
    double* p = static_cast<double*>(base);
    if (s == 1 && lo == 0 && hi == 4 && aligned<16>(p + off)) {
      st(reinterpret_cast<double2*>(p + off), make_double2(v[0], v[1]));
      st(reinterpret_cast<double2*>(p + off) + 1, make_double2(v[2], v[3]));
      return;
    }
    VF_UNROLL
    for (int e = 0; e < 4; ++e)
      if (e >= lo && e < hi) st(p + (off + e * s), v[e]);
  }
};

// ---- the fast paths: the storage type a template parameter, 16-byte accesses -------------------
// A fast-path chunk is one 16-byte vector of each input: kVec<R> consecutive elements of raw type
// R (8 for the 16-bit types, 4 for float32). Stor<DT>: the raw element type of dtype DT (float
// accumulation) and its conversion to float.
template <class R>
constexpr int kVec = 16 / static_cast<int>(sizeof(R));

template <DType DT>
struct Stor;
template <>
struct Stor<DType::Float32> {
  using raw = float;
  static VF_DEV float get(float x) { return x; }
};
template <>
struct Stor<DType::Float16> {
  using raw = unsigned short;
  static VF_DEV float get(unsigned short b) { return __half2float(__ushort_as_half(b)); }
};
template <>
struct Stor<DType::BFloat16> {
  using raw = unsigned short;
  static VF_DEV float get(unsigned short b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }
};

// The raw elements [0, valid) of a chunk of N (kVec<R>, or 4) at p (zeros past valid): one 16-byte
// (or 8-byte) load when vec (the caller checked that the chunk is full and p aligned to its size),
// else one load per element.
template <class R, int N>
VF_DEV void load_raw(const R* p, bool vec, int valid, R (&r)[N]) {
  static_assert(N * sizeof(R) == 16 || N * sizeof(R) == 8, "a chunk is one 16- or 8-byte vector");
  if (vec) {
    using V = std::conditional_t<N * sizeof(R) == 16, uint4, uint2>;
    const V u = ldg(reinterpret_cast<const V*>(p));
    std::memcpy(&r, &u, sizeof r);
    return;
  }
  VF_UNROLL
  for (int e = 0; e < N; ++e) r[e] = e < valid ? ldg(p + e) : R(0);
}

// Stores y[0, valid) (W = 4 or 8 values) at element offset off of an output of dtype dt (uniform
// per launch): 16-byte stores (8-byte for 4 16-bit values) when the chunk is full and aligned,
// else one store per element.
template <int W>
VF_DEV void store_chunk(void* base, DType dt, int64_t off, int valid, const float (&y)[W]) {
  static_assert(W == 4 || W == 8, "chunks of 4 or 8 elements");
  if (dt == DType::Float32) {
    float* p = static_cast<float*>(base) + off;
    if (valid == W && aligned<16>(p)) {
      VF_UNROLL
      for (int i = 0; i < W / 4; ++i)
        st(reinterpret_cast<float4*>(p) + i, make_float4(y[4 * i], y[4 * i + 1], y[4 * i + 2], y[4 * i + 3]));
      return;
    }
    VF_UNROLL
    for (int e = 0; e < W; ++e)
      if (e < valid) st(p + e, y[e]);
    return;
  }
  if (dt == DType::Float64) {  // a float64 forward output of float inputs
    double* p = static_cast<double*>(base) + off;
    VF_UNROLL
    for (int e = 0; e < W; ++e)
      if (e < valid) st(p + e, static_cast<double>(y[e]));
    return;
  }
  unsigned short* p = static_cast<unsigned short*>(base) + off;
  unsigned short b[W];
  VF_UNROLL
  for (int e = 0; e < W; ++e) b[e] = to16(y[e], dt);
  if (valid == W && aligned<2 * W>(p)) {
    if constexpr (W == 8) {
      uint4 u;
      std::memcpy(&u, &b, sizeof u);
      st(reinterpret_cast<uint4*>(p), u);
    } else {
      uint2 u;
      std::memcpy(&u, &b, sizeof u);
      st(reinterpret_cast<uint2*>(p), u);
    }
    return;
  }
  VF_UNROLL
  for (int e = 0; e < W; ++e)
    if (e < valid) st(p + e, b[e]);
}

// ---- compensated summation ------------------------------------------------------------------
// Every sum in these kernels is a CSum: the running sum s and the exact rounding error of each
// addition accumulated in c (Knuth's TwoSum: branch-free, exact in IEEE arithmetic with
// round-to-nearest), so a float sum of n terms is off by about eps + n * eps^2 relative instead of
// n * eps: float32 sums of 1e8 terms agree with float64 to ~1e-7. The value is s + c. merge is
// symmetric (TwoSum's error is exact, so it is the same whichever operand comes first), which the
// butterfly below needs: both partners must compute bitwise the same pair.
template <class A>
struct CSum {
  A s, c;
  VF_DEV CSum() : s(A(0)), c(A(0)) {}
  VF_DEV void add(A x) {
    const A t = s + x;
    const A bp = t - s;
    c += (s - (t - bp)) + (x - bp);
    s = t;
  }
  VF_DEV void merge(const CSum& o) {
    const A c2 = c + o.c;
    c = A(0);
    add(o.s);
    c += c2;
  }
  // An infinite or NaN s makes TwoSum's error NaN (inf - inf): the sum is then s itself (inf stays inf).
  VF_DEV A value() const { return s - s == A(0) ? s + c : s; }
};
// A loop of one term (the sampler's K = 1): CSum's add and value with no error term. One add from
// zero leaves a CSum at (x, 0) for finite x, so as_csum gives the pair a CSum would have held.
template <class A>
struct Plain {
  A s = A(0);
  VF_DEV void add(A x) { s += x; }
  VF_DEV A value() const { return s; }
};
template <class A>
VF_DEV CSum<A> as_csum(const CSum<A>& v) { return v; }
template <class A>
VF_DEV CSum<A> as_csum(const Plain<A>& v) {
  CSum<A> r;
  r.s = v.s;
  return r;
}
// CSum as stored in shared memory (a trivial type: __shared__ variables take no constructor).
template <class A>
struct SumPair {
  A s, c;
};

// ---- deterministic group reduction -----------------------------------------------------------
// A group is tpr threads (a power of two): an aligned slice of a warp when tpr <= 32 (mask names
// its lanes), or the whole block when tpr > 32 (then every thread of the block must call it the
// same number of times). Fixed butterfly over (sum, error) pairs: every lane of the group returns
// the same, bitwise reproducible sum. smem: VF_SHARED_ARRAY(SumPair<A>, name, 32).
VF_DEV unsigned group_mask(int tpr, int tid) {
  if (tpr >= 32) return 0xffffffffu;
  const unsigned m = (1u << tpr) - 1u;
  return m << ((tid & 31) & ~(tpr - 1));
}

template <class A>
VF_DEV void shfl_merge(unsigned mask, CSum<A>& v, int off) {
  CSum<A> o;
  o.s = shfl_xor(mask, v.s, off);
  o.c = shfl_xor(mask, v.c, off);
  v.merge(o);
}

#ifndef VF_DROP_BARRIER  // test-only: 1 or 2 drops that barrier of group_sum (see tests/cuda/race_check.cu)
#define VF_DROP_BARRIER 0
#endif

template <class A, class Smem>
VF_DEV A group_sum(CSum<A> v, int tpr, unsigned mask, Smem& smem) {
  if (tpr <= 32) {
    for (int off = tpr >> 1; off > 0; off >>= 1) shfl_merge(mask, v, off);
    return v.value();
  }
  VF_UNROLL
  for (int off = 16; off > 0; off >>= 1) shfl_merge(0xffffffffu, v, off);
  const int tid = tid_x();
  const int lane = tid & 31, warp = tid >> 5, nw = tpr >> 5;
  if (VF_DROP_BARRIER != 1) sync_block();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = SumPair<A>{v.s, v.c};
  if (VF_DROP_BARRIER != 2) sync_block();
  v = CSum<A>();
  if (lane < nw) {
    const SumPair<A> t = smem[lane];
    v.s = t.s;
    v.c = t.c;
  }
  VF_UNROLL
  for (int off = 16; off > 0; off >>= 1) shfl_merge(0xffffffffu, v, off);
  return v.value();
}

// The calling thread's place among groups of tpr threads (a power of two) that each take one item
// (row, unit) of a grid-stride loop: for (i = g.first(); i < n; i += g.ngroups) is group-uniform.
struct ThreadGroup {
  int tpr, tid, lane;
  unsigned mask;    // the group's lanes (see group_mask)
  int lg;           // log2(tpr)
  int64_t gpb;      // groups per block
  int64_t ngroups;  // groups in the grid
  VF_DEV explicit ThreadGroup(int t)
      : tpr(t), tid(tid_x()), lane(tid & (t - 1)), mask(group_mask(t, tid)), lg(ilog2_pow2(t)),
        gpb(bdim_x() >> lg), ngroups(gdim_x() * gpb) {}
  VF_DEV int64_t first() const { return bid_x() * gpb + (tid >> lg); }
  // group_sum over this group (smem: VF_SHARED_ARRAY(SumPair<A>, name, 32)).
  template <class A, class Smem>
  VF_DEV A sum(const CSum<A>& v, Smem& smem) const { return group_sum(v, tpr, mask, smem); }
};

// ---- torch.clamp on load (launch_args.h's Clamp) ------------------------------------------------------
// x clamped into [lo, hi] in place, a NaN staying NaN; returns whether lo <= x <= hi (false for a
// NaN): torch.clamp's gradient passes there and is 0 elsewhere.
template <class A>
VF_DEV bool clamp_keep(A& x, A lo, A hi) {
  const bool keep = x >= lo && x <= hi;
  x = x < lo ? lo : (x > hi ? hi : x);
  return keep;
}

// ---- random normals ---------------------------------------------------------------------------
// The four normals of Philox block b (elements 4b .. 4b+3 of the flat index space), core/philox.h's
// layout: what every sampling kernel draws.
VF_DEV void normals4(uint64_t seed, uint64_t b, float (&n)[4]) {
  uint32_t x[4];
  philox::block(seed, b, x);
  elbo::box_muller(philox::uniform(x[0]), philox::uniform(x[1]), n[0], n[1]);
  elbo::box_muller(philox::uniform(x[2]), philox::uniform(x[3]), n[2], n[3]);
}

// ---- launch helper -------------------------------------------------------------------------
template <class... P, class... Args>
inline cudaError_t launch_kernel(void (*kernel)(P...), int64_t grid, int block, cudaStream_t stream,
                                 const Args&... args) {
  if (grid <= 0) return cudaSuccess;
#if defined(VF_EMULATE)
  (void)stream;
  emu::launch(static_cast<unsigned>(grid), static_cast<unsigned>(block), [&] { kernel(args...); });
  return cudaSuccess;
#else
  kernel<<<static_cast<unsigned>(grid), static_cast<unsigned>(block), 0, stream>>>(args...);
  return cudaGetLastError();
#endif
}

// SM count of `device` (cached per device; -1: the current device). Only ever sizes grids, never
// changes a result. A failed query falls back to 132 (H100 SXM) and clears its error, so that the
// cudaGetLastError after the next launch reports that launch only.
inline int num_sms(int device = -1) {
#if defined(VF_EMULATE)
  return emu::sms(device);
#else
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int dev = device;
  if (dev < 0 && cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 132;
  }
  if (dev < 0 || dev >= kMaxDevices) return 132;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n > 0) return n;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 132;
  }
  cache[dev].store(n, std::memory_order_relaxed);
  return n;
#endif
}

// ---- launch geometry (host) ------------------------------------------------------------------
constexpr int64_t kTargetThreads = int64_t{1} << 17;  // ~ resident threads of a large GPU

// Grid of `block`-thread blocks for n one-item-per-thread work items, capped at a few resident
// waves (the kernels are grid-stride).
inline int64_t flat_grid(int64_t n, int block) {
  return std::min((n + block - 1) / block, static_cast<int64_t>(num_sms()) * 16);
}

// Threads per group (a power of two <= max_tpr) for n_work items of n_chunks units each.
inline int pick_tpr(int64_t n_chunks, int64_t n_work, int max_tpr) {
  int t = 1;
  while (t < 32 && 2 * t <= n_chunks) t *= 2;
  while (t < max_tpr && 4 * t <= n_chunks && n_work * t < kTargetThreads) t *= 2;
  return t;
}

// Grid for groups of tpr threads: 256-thread blocks of 256 / tpr warp-slice groups (tpr <= 32),
// or one group of tpr threads per block (tpr > 32: group_sum then works block-wide); capped at a
// few resident waves (the kernels are grid-stride).
inline void group_grid(int tpr, int64_t n_work, int64_t& grid, int& block) {
  block = tpr > 32 ? tpr : 256;
  const int64_t gpb = block / tpr;
  const int64_t cap = static_cast<int64_t>(num_sms()) * (4096 / block);
  grid = std::min((n_work + gpb - 1) / gpb, cap);
}

}  // namespace vae_fast::cuda::detail
