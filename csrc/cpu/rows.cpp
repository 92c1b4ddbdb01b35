// CPU row engines (core/op_table.h's row kinds): the strided and tiled broadcast walks and the flat
// engine. This file is compiled once per ISA (CMake: baseline, AVX2+FMA, AVX512) with
// -DCPU_CAPABILITY=<NAME> -DCPU_CAPABILITY_<NAME>, so at::vec::Vectorized is as wide as the ISA and
// everything here lives in vae_fast::<NAME>:: (see core/isa.h). The maths comes from core/elbo_math.h
// through core/row_ops.h.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "core/elbo_constants.h"
#include "core/isa.h"

#include "cpu/vec_math.h"

#include "core/elbo_math.h"
#include "core/launch_args.h"
#include "core/row_ops.h"
#include "cpu/common.h"
#include "cpu/typed_io.h"

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace cpu {
namespace {

// Rows longer than this are summed in segments of this many elements (run_flat): a function of the shape
// alone, so the sums do not depend on the thread count; segments are then grouped into tasks.
constexpr int64_t kSegment = int64_t{1} << 13;

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

// Adds one value into an accumulated partial-sum slice (kept in double on the CPU: see glue/row_problem.cpp).
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

// The rows in tiles of outer rows (launch_args.h's RowTiling): every i over one tile before the next, so a
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

}  // namespace cpu
VF_ISA_NS_END
}  // namespace vae_fast
