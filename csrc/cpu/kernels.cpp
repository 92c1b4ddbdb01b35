// CPU kernels. This file is compiled once per ISA (CMake: baseline, AVX2+FMA, AVX512) with
// -DCPU_CAPABILITY=<NAME> -DCPU_CAPABILITY_<NAME>, so at::vec::Vectorized is as wide as the ISA and
// everything here lives in vae_fast::<NAME>:: (see isa.h). The maths comes from elbo_math.h.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "core/elbo_constants.h"
#include "core/isa.h"

#include "cpu/vec_math.h"

#include "core/elbo_math.h"
#include "core/launch_args.h"
#include "core/philox.h"
#include "core/row_ops.h"

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace cpu {
namespace {

template <class T>
using Vec = at::vec::Vectorized<T>;

// Elements per inner chunk: every operand's chunk (converted to the accumulation type when it is
// stored in another) stays in L1.
constexpr int64_t kChunk = 512;

// Elements per parallel task, at least (at::parallel_for runs a call of at most this many on the calling
// thread). Measured on a 2-core machine, rows x 1024 float32, mean per call, 1 thread against 2 (README,
// "Threads"): on a quiet machine 2 threads take 0.55-0.8 of one's time from 16K elements on; with one other
// process spinning on a core they take 2.5-4x one's time up to 256K elements (a worker that is descheduled
// holds the whole region for a scheduler slice, ~4 ms: p50 stays, the mean and the tail do not) and come
// within 2x of it from ~1M. 64K per task keeps a 64 x 1024 call on one thread (busy: 1.0x its quiet time
// against 4x parallel) and forks from 128K elements (quiet: 0.5-0.7 of one thread's time there).
constexpr int64_t kMinTaskElements = int64_t{1} << 16;
// Rows longer than this are summed in segments of this many elements (run_flat): a function of the shape
// alone, so the sums do not depend on the thread count; segments are then grouped into tasks.
constexpr int64_t kSegment = int64_t{1} << 13;

// at::parallel_for's grain for units of `unit_elements` elements each: tasks of kMinTaskElements at least.
inline int64_t task_grain(int64_t unit_elements) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, unit_elements));
}

// ---------------------------------------------------------------------------------------------
// Reading and writing operands of any dtype in the accumulation type acc_t (float or double).
// ---------------------------------------------------------------------------------------------
template <class acc_t>
struct Loaded {
  const acc_t* ptr;  // n contiguous values, unless scalar
  bool scalar;       // inner stride 0: one value for the whole chunk
  acc_t value;
};

template <class acc_t>
acc_t read_one(const Operand& op, int64_t off) {
  switch (op.dtype) {
    case DType::Float64: return static_cast<acc_t>(static_cast<const double*>(op.data)[off]);
    case DType::Float32: return static_cast<acc_t>(static_cast<const float*>(op.data)[off]);
    case DType::Float16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(op.data)[off]));
    case DType::BFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(op.data)[off]));
  }
  return acc_t(0);
}

template <class acc_t, class src_t>
const acc_t* load_typed(const src_t* p, int64_t stride, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<src_t, acc_t>) {
    if (stride == 1) return p;
  }
  if (stride == 1) {
    at::vec::convert(p, buf, n);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_floating_point_v<src_t>) buf[i] = static_cast<acc_t>(p[i * stride]);
      else buf[i] = static_cast<acc_t>(static_cast<float>(p[i * stride]));  // Half / BFloat16 via float
    }
  }
  return buf;
}

template <class acc_t>
Loaded<acc_t> load(const Operand& op, int64_t off, int64_t stride, int64_t n, acc_t* buf) {
  if (stride == 0) return {nullptr, true, read_one<acc_t>(op, off)};
  switch (op.dtype) {
    case DType::Float64:
      if constexpr (std::is_same_v<acc_t, double>)
        return {load_typed<acc_t>(static_cast<const double*>(op.data) + off, stride, n, buf), false, 0};
      break;
    case DType::Float32:
      return {load_typed<acc_t>(static_cast<const float*>(op.data) + off, stride, n, buf), false, 0};
    case DType::Float16:
      return {load_typed<acc_t>(static_cast<const c10::Half*>(op.data) + off, stride, n, buf), false, 0};
    case DType::BFloat16:
      return {load_typed<acc_t>(static_cast<const c10::BFloat16*>(op.data) + off, stride, n, buf), false, 0};
  }
  return {nullptr, true, 0};
}

template <class acc_t, class dst_t>
void store_typed(const acc_t* v, dst_t* p, int64_t stride, int64_t n, bool accumulate) {
  if (accumulate && stride == 1) {  // partial sums (double on the CPU): a per-feature gradient, vectorised
    dst_t* __restrict out = p;
    const acc_t* __restrict in = v;
    for (int64_t i = 0; i < n; ++i) out[i] += static_cast<dst_t>(in[i]);
  } else if (accumulate) {
    for (int64_t i = 0; i < n; ++i) p[i * stride] += static_cast<dst_t>(v[i]);
  } else if (stride == 1) {
    if (static_cast<const void*>(v) != static_cast<const void*>(p)) at::vec::convert(v, p, n);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i * stride] = static_cast<dst_t>(v[i]);
  }
}

template <class acc_t>
void store(const Operand& op, int64_t off, int64_t stride, int64_t n, const acc_t* v) {
  switch (op.dtype) {
    case DType::Float64: store_typed(v, static_cast<double*>(op.data) + off, stride, n, op.accumulate); break;
    case DType::Float32: store_typed(v, static_cast<float*>(op.data) + off, stride, n, op.accumulate); break;
    case DType::Float16: store_typed(v, static_cast<c10::Half*>(op.data) + off, stride, n, op.accumulate); break;
    case DType::BFloat16:
      store_typed(v, static_cast<c10::BFloat16*>(op.data) + off, stride, n, op.accumulate);
      break;
  }
}

// Where a chunk of an output should be computed: straight into the tensor when it is contiguous,
// in acc_t and not accumulated, else into the scratch buffer (then stored by `store`).
template <class acc_t>
acc_t* output_target(const Operand& op, int64_t off, int64_t stride, acc_t* buf) {
  bool same = (std::is_same_v<acc_t, float> && op.dtype == DType::Float32) ||
              (std::is_same_v<acc_t, double> && op.dtype == DType::Float64);
  if (same && stride == 1 && !op.accumulate) return static_cast<acc_t*>(op.data) + off;
  return buf;
}

// Horizontal sum of a vector's lanes, pairwise in a fixed order (4 dependent adds for 16 lanes, not 15).
template <class acc_t>
acc_t hsum(const Vec<acc_t>& v) {
  constexpr int64_t VS = Vec<acc_t>::size();
  alignas(64) acc_t lanes[VS];
  v.store(lanes);
  for (int64_t w = VS / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}

// The sum of n values: per lane over full vectors, then the lanes and the tail in a fixed order.
template <class acc_t>
acc_t sum_range(const acc_t* v, int64_t n) {
  using V = Vec<acc_t>;
  int64_t i = 0;
  acc_t s = 0;
  if (n >= V::size()) {
    V acc = V::loadu(v);
    for (i = V::size(); i + V::size() <= n; i += V::size()) acc = acc + V::loadu(v + i);
    s = hsum(acc);
  }
  for (; i < n; ++i) s += v[i];
  return s;
}

// torch.clamp(x, lo, hi) in place (a NaN stays NaN), returning the mask (all bits set) of the lanes where
// lo <= x <= hi: torch.clamp's gradient passes there and is 0 elsewhere, NaN included (layout.h's Clamp).
template <class acc_t>
Vec<acc_t> clamp_keep(Vec<acc_t>& x, acc_t lo, acc_t hi) {
  using V = Vec<acc_t>;
  const V vlo(lo), vhi(hi);
  const V keep = (x >= vlo) & (x <= vhi);
  x = V::blendv(V::blendv(x, vlo, x < vlo), vhi, x > vhi);
  return keep;
}

// The per-input clamps of a row op, read once per launch.
template <class acc_t, int N>
struct Clamps {
  bool any = false, on[N] = {};
  acc_t lo[N] = {}, hi[N] = {};
  explicit Clamps(const Operand* in) {
    for (int j = 0; j < N; ++j) {
      on[j] = in[j].clamp.on;
      lo[j] = static_cast<acc_t>(in[j].clamp.lo);
      hi[j] = static_cast<acc_t>(in[j].clamp.hi);
      any |= on[j];
    }
  }
  // Op::apply on one vector of inputs, the clamped ones clamped; a backward op's gradient of a clamped
  // input (out[j] for in[j + 1]) masked to where it lies in [lo, hi].
  // h: Op's hoisted value computed beforehand (row_ops.h), or null.
  template <class Op>
  void apply(Vec<acc_t>* a, Vec<acc_t>* o, const Vec<acc_t>* h = nullptr) const {
    if (!any) return call<Op>(a, o, h);
    Vec<acc_t> keep[N];
    for (int j = 0; j < N; ++j)
      if (on[j]) keep[j] = clamp_keep(a[j], lo[j], hi[j]);
    call<Op>(a, o, h);
    if constexpr (Op::kBackward) {
      for (int j = 0; j + 1 < N; ++j)
        if (on[j + 1]) o[j] = o[j] & keep[j + 1];
    }
  }
  template <class Op>
  static void call(Vec<acc_t>* a, Vec<acc_t>* o, const Vec<acc_t>* h) {
    if constexpr (Op::kHoisted >= 0) {
      if (h) return Op::apply_hoisted(a, *h, o);
    }
    Op::apply(a, o);
  }
};

// Op's hoisted value (row_ops.h) computed once per launch when its input is the same for every row:
// one value (a scalar input) or one per element of a row, in event order (a per-feature input).
template <class acc_t>
struct Hoisted {
  bool scalar = false;
  acc_t value = 0;
  std::vector<acc_t> per_event;  // empty unless per-feature
  bool on() const { return scalar || !per_event.empty(); }
};

// Op::hoist over n raw values of its hoisted input, clamped as the input is; in place allowed.
template <class acc_t, class Op>
void hoist_values(const acc_t* raw, int64_t n, const Clamps<acc_t, Op::kIn>& clamps, acc_t* out) {
  using V = Vec<acc_t>;
  constexpr int j = Op::kHoisted;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t cnt = std::min<int64_t>(V::size(), n - i);
    V v = V::loadu(raw + i, cnt);
    if (clamps.on[j]) clamp_keep(v, clamps.lo[j], clamps.hi[j]);
    Op::hoist(v).store(out + i, cnt);
  }
}

// A scalar hoisted input; `gather_row(raw)` fills raw with one row's E values (event order) of a
// hoisted input that is the same for every one of the R > 1 rows.
template <class acc_t, class Op, class GatherRow>
Hoisted<acc_t> hoist_broadcast(const Operand& op, bool is_scalar, bool same_every_row, int64_t R, int64_t E,
                               const Clamps<acc_t, Op::kIn>& clamps, GatherRow gather_row) {
  Hoisted<acc_t> h;
  if (is_scalar) {
    const acc_t raw = read_one<acc_t>(op, 0);
    hoist_values<acc_t, Op>(&raw, 1, clamps, &h.value);
    h.scalar = true;
  } else if (same_every_row && R > 1 && E > 0) {
    h.per_event.resize(static_cast<size_t>(E));
    gather_row(h.per_event.data());
    hoist_values<acc_t, Op>(h.per_event.data(), E, clamps, h.per_event.data());
  }
  return h;
}

// Adds one value into an accumulated partial-sum slice (kept in double on the CPU: see ops.cpp).
template <class acc_t>
void add_to(const Operand& op, int64_t off, double value) {
  if (op.dtype == DType::Float64) static_cast<double*>(op.data)[off] += value;
  else static_cast<acc_t*>(op.data)[off] += static_cast<acc_t>(value);
}

// Op over n elements, branch-free: input j at in[j] + i * in_step[j] (step 0: a broadcast value, stored
// as one full vector), Op's hoisted value likewise at h (null: computed per vector), every output
// stored at out[j] + i (an unwanted or summed output into scratch). Full vectors, then one partial.
template <class acc_t, class Op>
void apply_chunk(const Clamps<acc_t, Op::kIn>& clamps, const acc_t* const* in, const int64_t* in_step, const acc_t* h,
                 int64_t h_step, acc_t* const* out, int64_t n) {
  using V = Vec<acc_t>;
  constexpr int64_t VS = V::size();
  auto step = [&](int64_t i, int64_t cnt) __attribute__((always_inline)) {
    V a[Op::kIn], o[Op::kOut];
    for (int j = 0; j < Op::kIn; ++j) a[j] = cnt == VS ? V::loadu(in[j] + i * in_step[j]) : V::loadu(in[j] + i * in_step[j], cnt);
    if (h) {
      const V hv = cnt == VS ? V::loadu(h + i * h_step) : V::loadu(h + i * h_step, cnt);
      clamps.template apply<Op>(a, o, &hv);
    } else {
      clamps.template apply<Op>(a, o);
    }
    for (int j = 0; j < Op::kOut; ++j) {
      if (cnt == VS) o[j].store(out[j] + i); else o[j].store(out[j] + i, cnt);
    }
  };
  int64_t i = 0;
  for (; i + 2 * VS <= n; i += 2 * VS) {  // two independent vectors per iteration: their latencies overlap
    step(i, VS);
    step(i + VS, VS);
  }
  for (; i + VS <= n; i += VS) step(i, VS);
  if (i < n) step(i, n - i);
}

// ---------------------------------------------------------------------------------------------
// The row engine: for each row and each innermost event line, in chunks, load the inputs, apply
// the op on vectors, and for each output either store the values (its inner stride is not 0) or
// sum them (inner stride 0: a row reduction, or the gradient of an argument broadcast along it).
// ---------------------------------------------------------------------------------------------
// Rows first, first + step, ... (count of them); `block` picks the accumulated outputs' partial-sum slice.
template <class acc_t, class Op>
void run_rows_strided(const RowArgs& args, const Hoisted<acc_t>& hoisted, int64_t first, int64_t count, int64_t step,
                      int64_t block) {
  using V = Vec<acc_t>;
  constexpr int64_t VS = V::size();
  const RowLayout& L = args.layout;
  const int ne = L.n_event_dims;
  const int64_t inner = ne > 0 ? L.event_sizes[ne - 1] : 1;
  const int64_t lines = inner > 0 ? L.event_numel / inner : 0;

  const Clamps<acc_t, Op::kIn> clamps(args.in);
  alignas(64) acc_t in_buf[Op::kIn][kChunk];
  alignas(64) acc_t out_buf[Op::kOut][kChunk];
  alignas(64) acc_t hoisted_value[V::size()];
  V(hoisted.value).store(hoisted_value);
  int64_t in_row[Op::kIn], out_row[Op::kOut];
  bool out_is_row_sum[Op::kOut];  // all event strides 0 and not accumulated: zero it per row
  for (int j = 0; j < Op::kOut; ++j) {
    bool all_zero = true;
    for (int d = 0; d < ne; ++d) all_zero &= args.out[j].event_strides[d] == 0;
    out_is_row_sum[j] = args.out[j].data != nullptr && all_zero && !args.out[j].accumulate;
  }

  for (int64_t n_done = 0, r = first; n_done < count; ++n_done, r += step) {
    // Row offsets of every operand (row index decomposed over the row dims, innermost last).
    for (int j = 0; j < Op::kIn; ++j) in_row[j] = 0;
    for (int j = 0; j < Op::kOut; ++j) out_row[j] = args.out[j].accumulate ? block * args.out[j].block_stride : 0;
    int64_t rem = r;
    for (int d = L.n_row_dims - 1; d >= 0; --d) {
      int64_t idx = rem % L.row_sizes[d];
      rem /= L.row_sizes[d];
      for (int j = 0; j < Op::kIn; ++j) in_row[j] += idx * args.in[j].row_strides[d];
      for (int j = 0; j < Op::kOut; ++j) out_row[j] += idx * args.out[j].row_strides[d];
    }

    // Sums keep their digits: terms are summed per chunk (<= kChunk / lanes terms per lane), and
    // chunk sums are added in double in a fixed order (error ~ 1e-7 relative over 1e8 float terms).
    double row_sum[Op::kOut] = {};
    for (int64_t line = 0; line < lines; ++line) {
      int64_t in_off[Op::kIn], out_off[Op::kOut];
      for (int j = 0; j < Op::kIn; ++j) in_off[j] = in_row[j];
      for (int j = 0; j < Op::kOut; ++j) out_off[j] = out_row[j];
      int64_t lrem = line;
      for (int d = ne - 2; d >= 0; --d) {
        int64_t idx = lrem % L.event_sizes[d];
        lrem /= L.event_sizes[d];
        for (int j = 0; j < Op::kIn; ++j) in_off[j] += idx * args.in[j].event_strides[d];
        for (int j = 0; j < Op::kOut; ++j) out_off[j] += idx * args.out[j].event_strides[d];
      }
      int64_t in_st[Op::kIn], out_st[Op::kOut];
      for (int j = 0; j < Op::kIn; ++j) in_st[j] = ne > 0 ? args.in[j].event_strides[ne - 1] : 0;
      for (int j = 0; j < Op::kOut; ++j) out_st[j] = ne > 0 ? args.out[j].event_strides[ne - 1] : 0;

      double line_sum[Op::kOut] = {};
      for (int64_t c0 = 0; c0 < inner; c0 += kChunk) {
        const int64_t n = std::min(kChunk, inner - c0);
        const acc_t* src[Op::kIn];
        int64_t src_step[Op::kIn];
        for (int j = 0; j < Op::kIn; ++j) {
          const Loaded<acc_t> l = load<acc_t>(args.in[j], in_off[j] + c0 * in_st[j], in_st[j], n, in_buf[j]);
          if (l.scalar) V(l.value).store(in_buf[j]);
          src[j] = l.scalar ? in_buf[j] : l.ptr;
          src_step[j] = l.scalar ? 0 : 1;
        }
        acc_t* dst[Op::kOut];
        for (int j = 0; j < Op::kOut; ++j)
          dst[j] = (args.out[j].data && out_st[j] != 0)
                       ? output_target<acc_t>(args.out[j], out_off[j] + c0 * out_st[j], out_st[j], out_buf[j])
                       : out_buf[j];
        const acc_t* h = hoisted.scalar ? hoisted_value : hoisted.per_event.empty() ? nullptr
                                                                                  : hoisted.per_event.data() + line * inner + c0;
        apply_chunk<acc_t, Op>(clamps, src, src_step, h, hoisted.scalar ? 0 : 1, dst, n);
        for (int j = 0; j < Op::kOut; ++j) {
          if (!args.out[j].data) continue;
          if (out_st[j] == 0) line_sum[j] += static_cast<double>(sum_range(out_buf[j], n));
          else if (dst[j] == out_buf[j]) store<acc_t>(args.out[j], out_off[j] + c0 * out_st[j], out_st[j], n, out_buf[j]);
        }
      }
      for (int j = 0; j < Op::kOut; ++j) {
        if (!args.out[j].data || out_st[j] != 0) continue;
        if (out_is_row_sum[j]) {
          row_sum[j] += line_sum[j];
        } else {
          add_to<acc_t>(args.out[j], out_off[j], line_sum[j]);  // accumulated partial
        }
      }
    }
    for (int j = 0; j < Op::kOut; ++j) {
      if (!out_is_row_sum[j]) continue;
      const acc_t total = static_cast<acc_t>(row_sum[j]);
      store<acc_t>(args.out[j], out_row[j], 1, 1, &total);
    }
  }
}

// The rows in tiles of outer rows (layout.h's RowTiling): every i over one tile before the next, so a
// broadcast operand's tile stays in L2 while the K samples pass over it and the other operands are
// read in long runs (one row of each sample at a time jumps a whole (B, D) slab between rows, which
// the prefetchers do not follow: 2.7x slower at (8, 2048, 1024); 64 KiB tiles: 1.5x slower).
// Outer rows [o0, o1) of every i, tile by tile.
template <class acc_t, class Op>
void run_outer_range(const RowArgs& args, const Hoisted<acc_t>& h, const RowTiling& t, int64_t o0, int64_t o1,
                     int64_t block) {
  if (t.inner == 1) return run_rows_strided<acc_t, Op>(args, h, o0, o1 - o0, 1, block);
  for (int64_t a = o0; a < o1; a += t.tile) {
    const int64_t b = std::min(o1, a + t.tile);
    for (int64_t i = 0; i < t.inner; ++i) run_rows_strided<acc_t, Op>(args, h, a * t.inner + i, b - a, t.inner, block);
  }
}

// The row engine's Hoisted: the hoisted input's values over one row, gathered line by line.
template <class acc_t, class Op>
Hoisted<acc_t> hoist_rows(const RowArgs& args) {
  if constexpr (Op::kHoisted < 0) {
    return {};
  } else {
    const RowLayout& L = args.layout;
    const Operand& op = args.in[Op::kHoisted];
    bool same_every_row = true, is_scalar = true;
    for (int d = 0; d < L.n_row_dims; ++d) same_every_row &= op.row_strides[d] == 0;
    for (int d = 0; d < L.n_event_dims; ++d) is_scalar &= op.event_strides[d] == 0;
    const int ne = L.n_event_dims;
    const int64_t inner = L.event_sizes[ne - 1], st = op.event_strides[ne - 1];
    return hoist_broadcast<acc_t, Op>(op, same_every_row && is_scalar, same_every_row, L.rows, L.event_numel,
                                      Clamps<acc_t, Op::kIn>(args.in), [&](acc_t* raw) {
      alignas(64) acc_t buf[kChunk];
      for (int64_t line = 0; line * inner < L.event_numel; ++line) {
        int64_t off = 0, rem = line;
        for (int d = ne - 2; d >= 0; --d) off += (rem % L.event_sizes[d]) * op.event_strides[d], rem /= L.event_sizes[d];
        for (int64_t c0 = 0; c0 < inner; c0 += kChunk) {
          const int64_t n = std::min(kChunk, inner - c0);
          const Loaded<acc_t> src = load<acc_t>(op, off + c0 * st, st, n, buf);
          acc_t* out = raw + line * inner + c0;
          if (src.scalar) std::fill(out, out + n, src.value);
          else std::copy(src.ptr, src.ptr + n, out);
        }
      }
    });
  }
}

template <class acc_t, class Op>
void run_rows_typed(const RowArgs& args) {
  const RowLayout& L = args.layout;
  const RowTiling t = row_tiling(args, Op::kIn);
  const Hoisted<acc_t> h = hoist_rows<acc_t, Op>(args);
  bool any_accumulate = false;
  for (int j = 0; j < Op::kOut; ++j) any_accumulate |= args.out[j].data && args.out[j].accumulate;
  if (any_accumulate) {
    // Fixed blocks of outer rows (chosen from the shapes alone), each with its own partial sums: the
    // same result whatever the thread count.
    const int64_t block_elements = t.outer * L.event_numel * t.inner / std::max<int64_t>(1, L.n_blocks);
    at::parallel_for(0, L.n_blocks, task_grain(block_elements), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        run_outer_range<acc_t, Op>(args, h, t, b * t.outer / L.n_blocks, (b + 1) * t.outer / L.n_blocks, b);
    });
  } else {
    at::parallel_for(0, t.outer, task_grain(L.event_numel * t.inner), [&](int64_t o0, int64_t o1) { run_outer_range<acc_t, Op>(args, h, t, o0, o1, 0); });
  }
}

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
template <class T>
T* typed(void* p) { return static_cast<T*>(p); }

// n contiguous values of a sampler tensor in acc_t: the tensor itself when it is stored in acc_t,
// else converted into `buf`.
template <class acc_t>
const acc_t* load_contiguous(DType dtype, const void* base, int64_t off, int64_t n, acc_t* buf) {
  Operand op;
  op.data = const_cast<void*>(base);
  op.dtype = dtype;
  return load<acc_t>(op, off, 1, n, buf).ptr;
}
// Where to compute n contiguous output values: the tensor itself when stored in acc_t, else `buf`
// (then store_contiguous converts).
template <class acc_t>
acc_t* contiguous_target(DType dtype, void* base, int64_t off, acc_t* buf) {
  Operand op;
  op.data = base;
  op.dtype = dtype;
  return output_target<acc_t>(op, off, 1, buf);
}
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
template <class acc_t>
void store_contiguous(DType dtype, void* base, int64_t off, int64_t n, const acc_t* src) {
  Operand op;
  op.data = base;
  op.dtype = dtype;
  if (output_target<acc_t>(op, off, 1, nullptr) != src) store<acc_t>(op, off, 1, n, src);
}


// Calls body(row, i, len) for the pieces [i, i + len) of the n flat elements from `flat` that lie in one
// row of E elements each, in order (one division per call, none per row: rows can be 8 elements long).
template <class Body>
void for_each_row_piece(int64_t flat, int64_t n, int64_t E, Body body) {
  int64_t row = flat / E, pos = flat - row * E;
  for (int64_t i = 0; i < n; i += E - pos, pos = 0, ++row) body(row, i, std::min(n - i, E - pos));
}

// Writes the per-row sums of the terms of flat elements [flat, flat + n) into out[row], row = element
// / E. The caller walks whole rows in order; a row that spans chunks is carried in `carry` (double,
// so long sums keep their digits) and written when it ends: `out` needs no zeroing.
template <class acc_t>
void add_segments(const acc_t* terms, int64_t flat, int64_t n, int64_t E, acc_t* out, double& carry) {
  if (E == 1) {  // event_dims = 0: every element is its own row
    std::memcpy(out + flat, terms, sizeof(acc_t) * static_cast<size_t>(n));
    return;
  }
  for_each_row_piece(flat, n, E, [&](int64_t row, int64_t i, int64_t len) {
    const double s = static_cast<double>(sum_range(terms + i, len));
    const bool first = i > 0 || flat % E == 0, last = i + len < n || (flat + n) % E == 0;
    carry = first ? s : carry + s;
    if (last) out[row] = static_cast<acc_t>(carry);
  });
}

// Calls body(c, n) for chunks [c, c + n) of [begin, end) cut at global multiples of kChunk.
template <class Body>
void for_each_chunk(int64_t begin, int64_t end, Body body) {
  for (int64_t c = begin; c < end;) {
    const int64_t next = std::min(end, (c / kChunk + 1) * kChunk);
    body(c, next - c);
    c = next;
  }
}

inline int64_t sample_grain(const SampleArgs& a) {  // rows per task
  return task_grain(a.event_numel * a.num_samples);
}

// n logical elements [c, c + n) of a sampler input (mu or logvar, read in place through its runs,
// see layout.h) in acc_t: the tensor itself when they lie in one run stored in acc_t, else gathered
// run by run into `buf`.
template <class acc_t>
const acc_t* load_logical(DType dtype, const void* base, int64_t run, int64_t run_stride, int64_t c, int64_t n,
                          acc_t* buf) {
  const int64_t r0 = c / run, j0 = c - r0 * run;
  if (j0 + n <= run) return load_contiguous<acc_t>(dtype, base, r0 * run_stride + j0, n, buf);
  for (int64_t i = 0; i < n;) {
    const int64_t pos = c + i, r = pos / run, j = pos - r * run, len = std::min(n - i, run - j);
    const acc_t* src = load_contiguous<acc_t>(dtype, base, r * run_stride + j, len, buf + i);
    if (src != buf + i) std::memcpy(buf + i, src, sizeof(acc_t) * static_cast<size_t>(len));
    i += len;
  }
  return buf;
}

// Where to compute n logical output elements [c, c + n) laid out in runs as load_logical reads them: the
// tensor itself when they lie in one run stored in acc_t, else `buf` (then store_logical scatters them).
template <class acc_t>
acc_t* logical_target(DType dtype, void* base, int64_t run, int64_t run_stride, int64_t c, int64_t n, acc_t* buf) {
  const int64_t r0 = c / run, j0 = c - r0 * run;
  return j0 + n <= run ? contiguous_target<acc_t>(dtype, base, r0 * run_stride + j0, buf) : buf;
}
template <class acc_t>
void store_logical(DType dtype, void* base, int64_t run, int64_t run_stride, int64_t c, int64_t n, const acc_t* src) {
  for (int64_t i = 0; i < n;) {
    const int64_t pos = c + i, r = pos / run, j = pos - r * run, len = std::min(n - i, run - j);
    store_contiguous<acc_t>(dtype, base, r * run_stride + j, len, src + i);  // nothing when computed in place
    i += len;
  }
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

// ---------------------------------------------------------------------------------------------
// The flat row engine, for the layouts users pass most (a (B, D) batch, contiguous or a chunk of an
// encoder output): every operand is rows of E contiguous elements at a uniform row stride, one value
// per row, or one value. The rows are walked as one flat index space in chunks at global multiples
// of kChunk: full SIMD vectors however short the rows (no per-row loop overhead), per-row values
// spread over their elements, per-row sums taken by segments (the same sums for any thread count).
// ---------------------------------------------------------------------------------------------
enum class FlatKind { Run, PerRow, Scalar };

bool flat_kind(const Operand& op, const RowLayout& L, FlatKind& kind) {
  const int64_t rs = L.n_row_dims == 1 ? op.row_strides[0] : 0, es = op.event_strides[0];
  if (es == 1) kind = FlatKind::Run;
  else if (es == 0 && (rs == 1 || L.rows == 1)) kind = FlatKind::PerRow;
  else if (es == 0 && rs == 0) kind = FlatKind::Scalar;
  else return false;
  return true;
}

template <class acc_t, class Op>
bool run_flat(const RowArgs& args) {
  using V = Vec<acc_t>;
  constexpr int64_t VS = V::size();
  const RowLayout& L = args.layout;
  const int64_t E = L.event_numel, R = L.rows;
  if (L.n_row_dims > 1 || L.n_event_dims != 1) return false;
  FlatKind in_kind[Op::kIn], out_kind[Op::kOut];
  int64_t in_rs[Op::kIn];
  for (int j = 0; j < Op::kIn; ++j) {
    if (!flat_kind(args.in[j], L, in_kind[j])) return false;
    in_rs[j] = L.n_row_dims == 1 ? args.in[j].row_strides[0] : E;
  }
  const DType acc_dtype = std::is_same_v<acc_t, double> ? DType::Float64 : DType::Float32;
  int64_t out_rs[Op::kOut];
  for (int j = 0; j < Op::kOut; ++j) {
    const Operand& o = args.out[j];
    if (!o.data) continue;
    if (o.accumulate || !flat_kind(o, L, out_kind[j]) || out_kind[j] == FlatKind::Scalar) return false;
    if (out_kind[j] == FlatKind::PerRow && o.dtype != acc_dtype) return false;
    out_rs[j] = L.n_row_dims == 1 ? o.row_strides[0] : E;  // a Run output: rows of E at this stride
  }
  // A Run operand as load_logical's runs: rows of E at its row stride, or (contiguous rows) one run of all
  // R * E elements, so a chunk spanning rows is still read and written in place.
  const int64_t whole = std::max<int64_t>(R * E, 1);
  auto run_of = [&](int64_t rs) { return rs == E ? whole : E; };
  auto stride_of = [&](int64_t rs) { return rs == E ? whole : rs; };
  const Clamps<acc_t, Op::kIn> clamps(args.in);
  Hoisted<acc_t> hoisted;
  if constexpr (Op::kHoisted >= 0) {
    constexpr int jh = Op::kHoisted;
    const Operand& op = args.in[jh];
    hoisted = hoist_broadcast<acc_t, Op>(op, in_kind[jh] == FlatKind::Scalar,
                                         in_kind[jh] == FlatKind::Run && in_rs[jh] == 0, R, E, clamps, [&](acc_t* raw) {
      alignas(64) acc_t buf[kChunk];
      for_each_chunk(0, E, [&](int64_t c, int64_t n) {
        const acc_t* v = load_logical<acc_t>(op.dtype, op.data, E, 0, c, n, buf);
        std::copy(v, v + n, raw + c);
      });
    });
  }
  // Tasks walk whole rows; rows longer than kSegment are cut into segments of kSegment elements (a function
  // of the shape alone, so the same sums for any thread count): a loss reduced to one number, and its
  // gradient, are then computed by every thread. A segment's pieces of the row sums cut by its ends are kept
  // in double and added in segment order afterwards.
  const int64_t N = R * E;
  const bool segmented = E > kSegment;
  struct Edges {
    double lead[Op::kOut] = {};   // the piece of the row begun before the segment
    double trail[Op::kOut] = {};  // the piece of a row begun in it that goes on after it
  };
  std::vector<Edges> edges(segmented ? static_cast<size_t>((N + kSegment - 1) / kSegment) : 0);
  const int64_t units = segmented ? static_cast<int64_t>(edges.size()) : R;
  const int64_t grain = task_grain(segmented ? kSegment : E);
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    alignas(64) acc_t in_buf[Op::kIn][kChunk];
    alignas(64) acc_t out_buf[Op::kOut][kChunk];
    alignas(64) acc_t hoisted_buf[kChunk];
    alignas(64) acc_t hoisted_value[V::size()];
    V(hoisted.value).store(hoisted_value);
    double carry[Op::kOut] = {};
    const int64_t begin = segmented ? u0 * kSegment : u0 * E;
    const int64_t end = segmented ? std::min(N, u1 * kSegment) : u1 * E;
    for_each_chunk(begin, end, [&](int64_t c, int64_t n) {
      const acc_t* src[Op::kIn];
      int64_t src_step[Op::kIn];
      for (int j = 0; j < Op::kIn; ++j) {
        const Operand& op = args.in[j];
        src_step[j] = in_kind[j] == FlatKind::Scalar ? 0 : 1;
        if (in_kind[j] == FlatKind::Run) {
          src[j] = load_logical<acc_t>(op.dtype, op.data, run_of(in_rs[j]), stride_of(in_rs[j]), c, n, in_buf[j]);
        } else if (in_kind[j] == FlatKind::Scalar) {
          Vec<acc_t>(read_one<acc_t>(op, 0)).store(in_buf[j]);
          src[j] = in_buf[j];
        } else {  // one value per row, spread over the row's elements
          for_each_row_piece(c, n, E, [&](int64_t row, int64_t i, int64_t len) {
            std::fill(in_buf[j] + i, in_buf[j] + i + len, read_one<acc_t>(op, row * (R > 1 ? in_rs[j] : 0)));
          });
          src[j] = in_buf[j];
        }
      }
      acc_t* dst[Op::kOut];
      for (int j = 0; j < Op::kOut; ++j) {
        const Operand& o = args.out[j];
        dst[j] = o.data && out_kind[j] == FlatKind::Run
                     ? logical_target<acc_t>(o.dtype, o.data, run_of(out_rs[j]), stride_of(out_rs[j]), c, n, out_buf[j])
                     : out_buf[j];
      }
      const acc_t* h = hoisted.scalar ? hoisted_value
                       : hoisted.per_event.empty()
                           ? nullptr
                           : load_logical<acc_t>(acc_dtype, hoisted.per_event.data(), E, 0, c, n, hoisted_buf);
      apply_chunk<acc_t, Op>(clamps, src, src_step, h, hoisted.scalar ? 0 : 1, dst, n);
      for (int j = 0; j < Op::kOut; ++j) {
        const Operand& o = args.out[j];
        if (!o.data) continue;
        if (out_kind[j] == FlatKind::Run)
          store_logical<acc_t>(o.dtype, o.data, run_of(out_rs[j]), stride_of(out_rs[j]), c, n, dst[j]);
        else if (!segmented) add_segments(dst[j], c, n, E, typed<acc_t>(o.data), carry[j]);
      }
      if (!segmented) return;
      for_each_row_piece(c, n, E, [&](int64_t r, int64_t i, int64_t len) {
        const int64_t p = c + i, seg = p / kSegment, seg_begin = seg * kSegment;
        const bool fresh = p == r * E || p == seg_begin;  // a row's sum restarts in every segment
        const bool started_here = r * E >= seg_begin, ends_here = p + len == (r + 1) * E;
        const bool seg_ends = p + len == std::min(N, seg_begin + kSegment);
        for (int j = 0; j < Op::kOut; ++j) {
          if (!args.out[j].data || out_kind[j] != FlatKind::PerRow) continue;
          const double piece = static_cast<double>(sum_range(dst[j] + i, len));
          carry[j] = fresh ? piece : carry[j] + piece;
          if (ends_here && started_here) typed<acc_t>(args.out[j].data)[r] = static_cast<acc_t>(carry[j]);
          else if (!started_here && (ends_here || seg_ends)) edges[seg].lead[j] = carry[j];
          else if (started_here && seg_ends) edges[seg].trail[j] = carry[j];
        }
      });
    });
  });
  // The rows cut by segment ends: their pieces added in segment order.
  double carry[Op::kOut] = {};
  for (size_t seg = 0; seg < edges.size(); ++seg) {
    const int64_t s0 = static_cast<int64_t>(seg) * kSegment, s1 = std::min(N, s0 + kSegment);
    for (int j = 0; j < Op::kOut; ++j) {
      if (!args.out[j].data || out_kind[j] != FlatKind::PerRow) continue;
      if (s0 % E != 0) {
        carry[j] += edges[seg].lead[j];
        if ((s0 / E + 1) * E <= s1) typed<acc_t>(args.out[j].data)[s0 / E] = static_cast<acc_t>(carry[j]);
      }
      if (s1 % E != 0 && (s1 - 1) / E * E >= s0) carry[j] = edges[seg].trail[j];
    }
  }
  return true;
}

template <class Op>
void dispatch_acc(const RowArgs& args) {
  if (args.in[0].dtype == DType::Float64) {
    if (!run_flat<double, Op>(args)) run_rows_typed<double, Op>(args);
  } else {
    if (!run_flat<float, Op>(args)) run_rows_typed<float, Op>(args);
  }
}

}  // namespace

void run_rows(OpKind op, const RowArgs& args) {
  switch (op) {
#define VF_KIND_CASE(kind, ...) \
  case OpKind::kind: return dispatch_acc<RowOp<OpKind::kind>>(args);
    VF_ROW_KINDS(VF_KIND_CASE)
#undef VF_KIND_CASE
  }
}

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
