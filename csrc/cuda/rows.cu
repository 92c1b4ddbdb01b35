// Row ops: "elementwise terms over a broadcast shape, summed over the trailing event dims"
// (core/launch_args.h), forward and backward, for float32/float16/bfloat16 (float accumulation, any mix)
// and float64 (double accumulation).
//
// Kernels (all grid-stride, no atomics, every sum in a fixed order):
//  * reduce_kernel (forward, reduce mode): one group of tpr threads per unit, tpr a power of two
//    from 1 to 256 picked from the shape (an aligned slice of a warp for short rows, a block for
//    long rows when rows are few). A unit is a row, or a segment of a long row (more than
//    kSegChunks chunks: 4096, fixed, so the order never depends on the GPU). Lane l owns the
//    4-element chunks l, l + tpr, ... of the unit and sums its terms in order; then a fixed
//    butterfly (warp shuffles, and across warps a shared-memory step) gives the unit's sum, which
//    lane 0 stores: the row's output, or the segment's partial in a stream-ordered scratch
//    buffer that segment_sum_kernel then sums per row, segments in order. So a loss summed to one
//    number over many elements runs on every SM.
//  * reduce_vec_kernel: reduce_kernel's fast path for what users pass most: one event dim, every
//    input with event stride 1 (all of one dtype, a template parameter) or 0 (one value per row).
//    Chunks are one 16-byte vector per input (4 float32 or 8 16-bit values), loaded before any
//    arithmetic; a chunk's terms are summed in a fixed tree and enter the compensated sum once.
//    Rows that are not 16-byte aligned load element by element into the same registers: the same
//    arithmetic, so alignment never changes a bit. Same units and segments as reduce_kernel.
//  * map_kernel (forward elementwise mode; backward when no output accumulates): one thread per
//    4-element chunk of the coalesced element space; map_vec_kernel its fast path (the same
//    conditions; outputs of any dtype with stride 1), 16-byte chunks loaded and stored whole.
//  * bcast_vec_kernel (backward with accumulated, i.e. broadcast, gradients; the fast path): one
//    pass, the broadcast dim innermost, per-thread register sums over a fixed segment of it (see
//    there). Taken when every accumulated output is broadcast along the same row dims and kept
//    along the event, and the inputs meet map_vec_kernel's conditions.
//  * bcast_row_vec_kernel: the same when every accumulated output is one value per kept row, and
//    scalar_acc_vec_kernel when every one is a single value (see there).
//  * acc_kernel (the general backward with accumulated gradients): one group per "unit".
//    Row-block mode: a unit is the glue's row block b (rows [b*rows/n, (b+1)*rows/n)), reduced by
//    one group, rows in order, into slice b. Each lane owns fixed event chunks; per output it keeps
//    a register partial for the current target and adds it into the slice when the target
//    changes (event-kept targets: per lane; event-reduced targets: after a group butterfly).
//    Reorder mode (n_blocks == 1): a unit is one target of one output; the kept dims are the rows,
//    the broadcast dims the event, so every target is reduced by one group in one pass.
// General path: loads are 16-byte vectors when a chunk is unit-stride and aligned (8 bytes for
// 16-bit types); the summation order never depends on that. An input with a Clamp (launch_args.h) is clamped on load;
// in a backward op the gradient of that input is masked as torch.clamp's. Every sum is compensated (common.cuh's CSum): per
// lane, then a fixed butterfly over (sum, error) pairs. An accumulated slice slot receives one
// addition per run of consecutive rows that share its target (the glue's slices then add in
// order); within a run the sum is compensated.
#include "cuda/kernels.h"
#include "cuda/common.cuh"
#include "core/coalesce.h"
#include "core/row_ops.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace vae_fast::cuda {
namespace detail {

// ---- the ops (one element: inputs -> outputs) are core/row_ops.h's RowOp<K> ---------------------

// ---- kernel parameters -------------------------------------------------------------------------
constexpr int kMaxRowDims = 2 * kMaxDims;  // reorder mode may move event dims to the rows
// Reorder mode makes every broadcast dim of an output (row or event, up to 2 * kMaxDims of them)
// an event dim: all but the innermost are "outer" event dims.
constexpr int kMaxEvDims = 2 * kMaxDims - 1;
constexpr int kMaxOps = 9;                 // at most 5 inputs + 4 outputs (KlBwd)

enum Cls : int32_t {
  kUnused = 0,   // not written in this launch
  kDirect = 1,   // written through its strides, one element per (row, event) index
  kAccRow = 2,   // accumulated; target independent of the event index (one per row)
  kAccElem = 3,  // accumulated; every event index has its own target
};

struct KOp {
  void* data = nullptr;
  DType dtype = DType::Float32;
  int32_t cls = kUnused;
  int64_t block_stride = 0;             // slice stride of an accumulated output, per unit
  int64_t rs[kMaxRowDims] = {};         // over the row dims
  int64_t es[kMaxEvDims] = {};          // over the outer event dims
  int64_t inner = 0;                    // stride of the innermost event dim
  bool clamp = false;                   // inputs: clamped on load (launch_args.h's Clamp)
  double clo = 0.0, chi = 0.0;
  float flo = 0.0f, fhi = 0.0f;         // the same bounds in float (the float kernels' type)
  int64_t vr0 = 0, vr1 = 0;             // the fast paths: strides over the (at most 2) row dims
  int64_t vr2 = 0;                      // bcast_vec_kernel: stride over a second reduced dim
  int32_t slot = 0;                     // bcast_vec_kernel: the accumulator set of a kAccElem output
};

// Ops 0 .. kIn-1 are the inputs, kIn .. kIn+kOut-1 the outputs.
struct KParams {
  int32_t nr = 0, ne = 0;  // row dims, outer event dims
  int32_t tpr = 1, pad = 0;
  FastDiv rdiv[kMaxRowDims];
  FastDiv ediv[kMaxEvDims];
  FastDiv cdiv;                // by cpi
  int64_t rows = 0;            // product of the row dims
  int64_t inner = 1;           // size of the innermost event dim
  int64_t cpi = 0;             // chunks per innermost line: ceil(inner / 4)
  int64_t n_chunks = 0;        // chunks per row: cpi * product of the outer event dims
  int64_t n_units = 0, row_mult = 1;  // acc_kernel's units (see the top); the reduce kernels': rows * nseg
  Split usplit;                       // unit u owns rows [split_point(u), split_point(u + 1)) * row_mult
  // Reduce mode, long rows: row r is nseg segments of seg_chunks chunks; unit u = r * nseg + s sums
  // segment s into part[u] (accumulation type), then segment_sum_kernel sums each row's segments
  // in order. nseg == 1: a unit is a row, its sum goes to the output directly.
  int64_t nseg = 1, seg_chunks = 0;
  FastDiv segdiv;  // by nseg
  void* part = nullptr;
  int32_t out_op = 0;  // segment_sum_kernel: the output's op index
  FastDiv vdiv;        // the fast paths: by the size of the inner row dim (see Row2)
  FastDiv qdiv;        // bcast_vec_kernel: by the size of the inner reduced dim (1 if one)
  KOp op[kMaxOps];
};

// Element offsets of a row for every op.
template <int N>
VF_DEV void row_offsets(const KParams& p, int64_t row, int64_t (&off)[N]) {
  VF_UNROLL
  for (int o = 0; o < N; ++o) off[o] = 0;
  add_dim_offsets(p.rdiv, p.nr, row, off, [&p](int o, int d) { return p.op[o].rs[d]; });
}

// Event offsets of element 0 of chunk c (c < n_chunks) for every op; returns the number of valid
// elements of the chunk (1..4).
template <int N>
VF_DEV int chunk_offsets(const KParams& p, int64_t c, int64_t (&off)[N]) {
  int64_t eo = 0, ci = c;
  if (p.ne > 0) {
    eo = fdiv(p.cdiv, c);
    ci = c - eo * p.cpi;
  }
  const int64_t j0 = ci * 4;
  VF_UNROLL
  for (int o = 0; o < N; ++o) off[o] = j0 * p.op[o].inner;
  add_dim_offsets(p.ediv, p.ne, eo, off, [&p](int o, int d) { return p.op[o].es[d]; });
  const int64_t left = p.inner - j0;
  return left < 4 ? static_cast<int>(left) : 4;
}

// The inputs of a chunk, the clamped ones clamped; keep[o][e]: the clamp's gradient mask (true for
// unclamped inputs).
template <class D, class A>
VF_DEV void load_inputs(const KParams& p, const int64_t* roff, const int64_t* eoff, int valid,
                        A (&v)[D::kIn][4], bool (&keep)[D::kIn][4]) {
  VF_UNROLL
  for (int o = 0; o < D::kIn; ++o) {
    Mem<A>::load4(p.op[o].data, p.op[o].dtype, roff[o] + eoff[o], p.op[o].inner, 0, valid, v[o]);
    VF_UNROLL
    for (int e = 0; e < 4; ++e)
      keep[o][e] = p.op[o].clamp ? clamp_keep(v[o][e], A(p.op[o].clo), A(p.op[o].chi)) : true;
  }
}

template <class D, class A>
VF_DEV void apply4(const A (&v)[D::kIn][4], A (&y)[D::kOut][4]) {
  VF_UNROLL
  for (int e = 0; e < 4; ++e) {
    A x[D::kIn], r[D::kOut];
    VF_UNROLL
    for (int o = 0; o < D::kIn; ++o) x[o] = v[o][e];
    D::apply(x, r);
    VF_UNROLL
    for (int o = 0; o < D::kOut; ++o) y[o][e] = r[o];
  }
}

// Row coordinates on the fast paths (at most 2 row dims): row = q * vdiv.d + r. An op's offsets
// are recomputed from them where needed (KOp::vr0, vr1), not held in registers for every op.
// bcast_vec_kernel's reduced index may span two dims: q and q2 (KOp::vr2), else q2 = 0.
struct Row2 {
  int64_t q, r, q2 = 0;
};
VF_DEV Row2 row2(const KParams& p, int64_t row) {
  const int64_t q = fdiv(p.vdiv, row);
  return {q, row - q * p.vdiv.d};
}
VF_DEV int64_t off2(const KOp& o, Row2 rr) { return rr.q * o.vr0 + rr.r * o.vr1 + rr.q2 * o.vr2; }

// ---- forward, reduce mode --------------------------------------------------------------------
// Blocks of at most 256 threads; float kernels held to 64 registers (4 blocks of 256 per SM).
template <class A>
constexpr int kMinBlocks = sizeof(A) == 4 ? 4 : 2;

// The row and chunk range [c0, c1) of reduce unit u (see KParams::nseg).
VF_DEV void unit_range(const KParams& p, int64_t u, int64_t& row, int64_t& c0, int64_t& c1) {
  row = u;
  c0 = 0;
  c1 = p.n_chunks;
  if (p.nseg > 1) {
    row = fdiv(p.segdiv, u);
    c0 = (u - row * p.nseg) * p.seg_chunks;
    c1 = c0 + p.seg_chunks < p.n_chunks ? c0 + p.seg_chunks : p.n_chunks;
  }
}

// Lane 0's store of unit u's sum: the row's output, or the segment's partial.
template <class A>
VF_DEV void store_unit(const KParams& p, int64_t u, int64_t out_off, A total) {
  if (p.nseg > 1) {
    st(static_cast<A*>(p.part) + u, total);
  } else {
    Mem<A>::store1(p.op[p.out_op].data, p.op[p.out_op].dtype, out_off, total);
  }
}

template <OpKind K, class A>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, kMinBlocks<A>) reduce_kernel(const VF_GRID_CONST KParams p) {
  using D = RowOp<K>;
  constexpr int NI = D::kIn, N = D::kIn + 1;
  VF_SHARED_ARRAY(SumPair<A>, smem, 32);
  const ThreadGroup g(p.tpr);
  VF_NO_UNROLL
  for (int64_t u = g.first(); u < p.n_units; u += g.ngroups) {
    int64_t row, c0, c1;
    unit_range(p, u, row, c0, c1);
    int64_t roff[N];
    row_offsets(p, row, roff);
    CSum<A> acc;
    VF_NO_UNROLL
    for (int64_t c = c0 + g.lane; c < c1; c += g.tpr) {
      int64_t eoff[N];
      const int valid = chunk_offsets(p, c, eoff);
      A v[NI][4], y[D::kOut][4];
      bool keep[NI][4];
      load_inputs<D, A>(p, roff, eoff, valid, v, keep);
      apply4<D, A>(v, y);
      VF_UNROLL
      for (int e = 0; e < 4; ++e)
        if (e < valid) acc.add(y[0][e]);
    }
    const A total = g.sum(acc, smem);
    if (g.lane == 0) store_unit(p, u, roff[NI], total);
  }
}

// The fast path of reduce_kernel: every input read with event stride 1 (one storage type DT for
// all of them) or 0 (one value per row, any dtype), the event one dim (p.ne == 0), chunks of one
// 16-byte vector (p.cpi = ceil(inner / kVec<R>)). A lane takes chunks lane, lane + tpr, ... of
// its unit with every input's load issued before any arithmetic; each chunk's terms are summed in
// a fixed tree and enter the compensated sum once. 16-byte loads when every stride-1 input of the
// row starts 16-byte aligned, else one load per element: the same values, the same arithmetic,
// so alignment never changes a bit. A row-constant input of a hoisting op (a scalar or per-row
// log-variance) has its transcendental computed once per row.
template <class D, class R, DType DT, bool kHoistRow>
VF_DEV float chunk_terms(const KParams& p, const R (&raw)[D::kIn][kVec<R>], const float* sc, float h,
                         int valid) {
  constexpr int NI = D::kIn, W = kVec<R>;
  float t[W];
  VF_UNROLL
  for (int e = 0; e < W; ++e) {
    float x[NI], y[D::kOut];
    VF_UNROLL
    for (int o = 0; o < NI; ++o) {
      x[o] = p.op[o].inner == 0 ? sc[o] : Stor<DT>::get(raw[o][e]);
      if (p.op[o].clamp && p.op[o].inner != 0) clamp_keep(x[o], p.op[o].flo, p.op[o].fhi);
    }
    if constexpr (kHoistRow) {
      D::apply_hoisted(x, h, y);
    } else {
      (void)h;
      D::apply(x, y);
    }
    t[e] = e < valid ? y[0] : 0.0f;
  }
  if constexpr (W == 8) return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  return (t[0] + t[1]) + (t[2] + t[3]);
}

// Row-constant state of the fast paths: the stride-0 inputs' values (clamped), whether every
// stride-1 input of the row starts 16-byte aligned, and the hoisted transcendental when the
// hoisted input is row-constant.
template <class D>
struct RowConst {
  float sc[D::kIn];
  bool vec = true, hrow = false;
  float h = 0.0f;
};
template <class D, class R>
VF_DEV void row_const(const KParams& p, Row2 rr, RowConst<D>& rc) {
  VF_UNROLL
  for (int o = 0; o < D::kIn; ++o) {
    rc.sc[o] = 0.0f;
    if (p.op[o].inner == 0) {
      rc.sc[o] = Mem<float>::load1(p.op[o].data, p.op[o].dtype, off2(p.op[o], rr));
      if (p.op[o].clamp) clamp_keep(rc.sc[o], p.op[o].flo, p.op[o].fhi);
    } else {
      rc.vec = rc.vec && aligned<16>(static_cast<const R*>(p.op[o].data) + off2(p.op[o], rr));
    }
  }
  if constexpr (D::kHoisted >= 0) {
    if (p.op[D::kHoisted].inner == 0) {
      rc.hrow = true;
      rc.h = D::hoist(rc.sc[D::kHoisted]);
    }
  }
}

// Registers: 64 (4 blocks of 256 per SM), but 80 for the ops of 4 inputs (3 blocks), which
// spill at 64.
template <OpKind K>
constexpr int kReduceVecMinBlocks = RowOp<K>::kIn >= 4 ? 3 : 4;

template <OpKind K, DType DT>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, kReduceVecMinBlocks<K>) reduce_vec_kernel(const VF_GRID_CONST KParams p) {
  using D = RowOp<K>;
  using R = typename Stor<DT>::raw;
  constexpr int NI = D::kIn, W = kVec<R>;
  // Chunks per lane per step, every load issued first: 2 for the ops of 2 inputs (4 vectors in
  // flight), 1 above (2 spill at 64 registers), and 1 for the float16 Bernoulli forward, whose support
  // check spilled 8 B at 2 (still 32 KB in flight per SM at 4 blocks: several times what hides the
  // memory latency of an H100).
  constexpr int kU = NI <= 2 && !(K == OpKind::BernLpFwd && DT == DType::Float16) ? 2 : 1;
  VF_SHARED_ARRAY(SumPair<float>, smem, 32);
  const ThreadGroup g(p.tpr);
  VF_NO_UNROLL
  for (int64_t u = g.first(); u < p.n_units; u += g.ngroups) {
    int64_t row, c0, c1;
    unit_range(p, u, row, c0, c1);
    const Row2 rr = row2(p, row);
    RowConst<D> rc;
    row_const<D, R>(p, rr, rc);
    CSum<float> acc;
    VF_NO_UNROLL
    for (int64_t c = c0 + g.lane; c < c1; c += kU * g.tpr) {
      R raw[kU][NI][W];
      int valid[kU];
      VF_UNROLL
      for (int k = 0; k < kU; ++k) {
        const int64_t ck = c + k * g.tpr;
        const int64_t left = ck < c1 ? p.inner - ck * W : 0;
        valid[k] = left < W ? static_cast<int>(left) : W;
        VF_UNROLL
        for (int o = 0; o < NI; ++o) {
          if (p.op[o].inner == 0 || valid[k] == 0) continue;
          load_raw(static_cast<const R*>(p.op[o].data) + (off2(p.op[o], rr) + ck * W),
                   rc.vec && valid[k] == W, valid[k], raw[k][o]);
        }
      }
      VF_UNROLL
      for (int k = 0; k < kU; ++k) {
        if (valid[k] == 0) continue;
        if constexpr (D::kHoisted >= 0) {
          if (rc.hrow) {
            acc.add(chunk_terms<D, R, DT, true>(p, raw[k], rc.sc, rc.h, valid[k]));
            continue;
          }
        }
        acc.add(chunk_terms<D, R, DT, false>(p, raw[k], rc.sc, rc.h, valid[k]));
      }
    }
    const float total = g.sum(acc, smem);
    if (g.lane == 0) store_unit(p, u, off2(p.op[NI], rr), total);
  }
}

// Stage 2 of long rows: row r's sum is its nseg partials part[r * nseg ..] summed in order
// (compensated), by one group per row.
template <class A>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, 4) segment_sum_kernel(const VF_GRID_CONST KParams p) {
  VF_SHARED_ARRAY(SumPair<A>, smem, 32);
  const ThreadGroup g(p.tpr);
  const KOp& q = p.op[p.out_op];
  const A* part = static_cast<const A*>(p.part);
  VF_NO_UNROLL
  for (int64_t row = g.first(); row < p.rows; row += g.ngroups) {
    CSum<A> acc;
    VF_NO_UNROLL
    for (int64_t s = g.lane; s < p.nseg; s += g.tpr) acc.add(ldg(part + (row * p.nseg + s)));
    const A total = g.sum(acc, smem);
    if (g.lane == 0) {
      int64_t off[1] = {0};
      add_dim_offsets(p.rdiv, p.nr, row, off, [&q](int, int d) { return q.rs[d]; });
      Mem<A>::store1(q.data, q.dtype, off[0], total);
    }
  }
}

// One 4-element chunk: load the inputs, apply the op, store the outputs written in place (kDirect);
// y returns every output for the callers that accumulate the others.
template <class D, class A>
VF_DEV void compute_chunk(const KParams& p, const int64_t* roff, const int64_t* eoff, int valid,
                          A (&y)[D::kOut][4]) {
  constexpr int NI = D::kIn;
  A v[NI][4];
  bool keep[NI][4];
  load_inputs<D, A>(p, roff, eoff, valid, v, keep);
  apply4<D, A>(v, y);
  if constexpr (D::kBackward) {  // gradient out[j - 1] of a clamped input in[j]: torch.clamp's mask
    VF_UNROLL
    for (int j = 1; j < NI; ++j) {
      if (j - 1 >= D::kOut || !p.op[j].clamp) continue;
      VF_UNROLL
      for (int e = 0; e < 4; ++e) y[j - 1][e] = keep[j][e] ? y[j - 1][e] : A(0);
    }
  }
  VF_UNROLL
  for (int o = 0; o < D::kOut; ++o) {
    const KOp& q = p.op[NI + o];
    if (q.cls == kDirect) Mem<A>::store4(q.data, q.dtype, roff[NI + o] + eoff[NI + o], q.inner, 0, valid, y[o]);
  }
}

// ---- elementwise: forward elementwise mode, backward without accumulation ---------------------
// Here the rows are every dim but the innermost (ne == 0), and a chunk is 4 elements of a line.
template <OpKind K, class A>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, 2) map_kernel(const VF_GRID_CONST KParams p) {
  using D = RowOp<K>;
  constexpr int NI = D::kIn, NO = D::kOut, N = NI + NO;
  const int64_t total = p.rows * p.cpi;
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t c = bid_x() * bdim_x() + tid_x(); c < total; c += stride) {
    const int64_t row = fdiv(p.cdiv, c);
    const int64_t j0 = (c - row * p.cpi) * 4;
    const int valid = p.inner - j0 < 4 ? static_cast<int>(p.inner - j0) : 4;
    int64_t roff[N], eoff[N];
    row_offsets(p, row, roff);
    VF_UNROLL
    for (int o = 0; o < N; ++o) eoff[o] = j0 * p.op[o].inner;
    A y[NO][4];
    compute_chunk<D, A>(p, roff, eoff, valid, y);
  }
}

// One fast-path chunk (map_vec_kernel, bcast_vec_kernel): elements [j0, j0 + W) of row rr of
// every stride-1 input (storage type DT; one 16- or 8-byte load where the chunk is full and
// aligned, else per element: the same values) and the row's value of every stride-0 input, all
// loaded before any arithmetic; then the op per element, on clamped inputs, with torch.clamp's
// gradient mask in a backward op. y: every output's W values (those past `valid` are not data).
template <class D, class R, DType DT, int W>
VF_DEV void vec_chunk(const KParams& p, Row2 rr, int64_t j0, int valid, float (&y)[D::kOut][W]) {
  constexpr int NI = D::kIn, NO = D::kOut;
  R raw[NI][W];
  float sc[NI];
  VF_UNROLL
  for (int o = 0; o < NI; ++o) {
    sc[o] = 0.0f;
    if (p.op[o].inner == 0) {
      sc[o] = Mem<float>::load1(p.op[o].data, p.op[o].dtype, off2(p.op[o], rr));
      continue;
    }
    const R* q = static_cast<const R*>(p.op[o].data) + (off2(p.op[o], rr) + j0);
    load_raw(q, valid == W && aligned<W * sizeof(R)>(q), valid, raw[o]);
  }
  VF_UNROLL
  for (int e = 0; e < W; ++e) {
    float x[NI], r[NO];
    bool keep[NI];
    VF_UNROLL
    for (int o = 0; o < NI; ++o) {
      x[o] = p.op[o].inner == 0 ? sc[o] : Stor<DT>::get(raw[o][e]);
      keep[o] = p.op[o].clamp ? clamp_keep(x[o], p.op[o].flo, p.op[o].fhi) : true;
    }
    D::apply(x, r);
    if constexpr (D::kBackward) {  // gradient out[j - 1] of a clamped input in[j]: torch.clamp's mask
      VF_UNROLL
      for (int j = 1; j < NI; ++j)
        if (j - 1 < NO && !keep[j]) r[j - 1] = 0.0f;
    }
    VF_UNROLL
    for (int o = 0; o < NO; ++o) y[o][e] = r[o];
  }
}

// The fast path of map_kernel: every input read with inner stride 1 (storage type DT) or 0 (one
// value per line, any dtype), every output written with inner stride 1 (any dtype); chunks of one
// 16-byte input vector of a line (p.cpi = ceil(inner / kVec<R>)), each input's chunk loaded
// before any arithmetic, 16-byte loads and stores where the chunk is full and aligned.
// Registers: 64 (4 blocks of 256 per SM), but 80 for the backward ops of 7 or more operands
// (3 blocks), which spill at 64.
template <OpKind K>
constexpr int kMapVecMinBlocks = RowOp<K>::kIn + RowOp<K>::kOut >= 7 ? 3 : 4;

template <OpKind K, DType DT>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, kMapVecMinBlocks<K>) map_vec_kernel(const VF_GRID_CONST KParams p) {
  using D = RowOp<K>;
  using R = typename Stor<DT>::raw;
  constexpr int NI = D::kIn, NO = D::kOut, W = kVec<R>;
  const int64_t total = p.rows * p.cpi;
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t c = bid_x() * bdim_x() + tid_x(); c < total; c += stride) {
    const int64_t row = fdiv(p.cdiv, c);
    const int64_t j0 = (c - row * p.cpi) * W;
    const int valid = p.inner - j0 < W ? static_cast<int>(p.inner - j0) : W;
    const Row2 rr = row2(p, row);
    float y[NO][W];
    vec_chunk<D, R, DT, W>(p, rr, j0, valid, y);
    VF_UNROLL
    for (int o = 0; o < NO; ++o) {
      const KOp& q = p.op[NI + o];
      if (q.cls == kDirect) store_chunk(q.data, q.dtype, off2(q, rr) + j0, valid, y[o]);
    }
  }
}

// The fast backward kernels' chunk epilogue: stores the written (kDirect) outputs' values and
// hands each accumulated output's to add(slot, values).
template <class D, int W, class Add>
VF_DEV void store_or_add(const KParams& p, Row2 rr, int64_t j0, int valid, const float (&y)[D::kOut][W], Add add) {
  VF_UNROLL
  for (int o = 0; o < D::kOut; ++o) {
    const KOp& out = p.op[D::kIn + o];
    if (out.cls == kDirect) {
      store_chunk(out.data, out.dtype, off2(out, rr) + j0, valid, y[o]);
    } else if (out.cls == kAccElem) {
      add(out.slot, y[o]);
    }
  }
}

// The scalar-sum kernels' chunk (bcast_row_vec_kernel, scalar_acc_vec_kernel): the written outputs
// stored, each accumulated output's valid values added in order to its slot's sum (acc0 or acc1).
template <class D, class R, DType DT, int W>
VF_DEV void chunk_into_sums(const KParams& p, Row2 rr, int64_t j0, int valid, CSum<float>& acc0, CSum<float>& acc1) {
  float y[D::kOut][W];
  vec_chunk<D, R, DT, W>(p, rr, j0, valid, y);
  store_or_add<D, W>(p, rr, j0, valid, y, [&](int slot, const float (&v)[W]) {
    VF_UNROLL
    for (int e = 0; e < W; ++e) {
      if (e >= valid) continue;
      if (slot == 0) {
        acc0.add(v[e]);
      } else {
        acc1.add(v[e]);
      }
    }
  });
}

// Their end: each accumulated output's slot summed over group g (a fixed butterfly; every lane
// calls it alike, the classes being uniform), lane 0 storing it at element at(out) of the output.
template <class D, class Smem, class At>
VF_DEV void store_group_sums(const KParams& p, const ThreadGroup& g, const CSum<float>& acc0, const CSum<float>& acc1,
                             Smem& smem, At at) {
  VF_UNROLL
  for (int o = 0; o < D::kOut; ++o) {
    const KOp& out = p.op[D::kIn + o];
    if (out.cls != kAccElem) continue;
    const float total = g.sum(out.slot == 0 ? acc0 : acc1, smem);
    if (g.lane == 0) st(static_cast<float*>(out.data) + at(out), total);
  }
}

// bcast_vec_kernel's counterpart for accumulated outputs of one value per kept row (a per-row
// log-variance (B, 1) against (B, D), or against (K, B, D) with the K samples reduced): a group of
// tpr threads (pick_tpr, from the shape) per (segment, kept row r) walks the segment's reduced rows
// in order and, per row, the chunks lane, lane + tpr, ... (one 16-byte vector of each input, as
// map_vec_kernel), writing the full-size gradients and summing the accumulated ones per lane; a
// fixed butterfly then gives the unit's sums, which lane 0 stores in slice `segment` at r's target.
template <OpKind K, DType DT>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, 2) bcast_row_vec_kernel(const VF_GRID_CONST KParams p) {
  using D = RowOp<K>;
  using R = typename Stor<DT>::raw;
  constexpr int W = kVec<R>;
  VF_SHARED_ARRAY(SumPair<float>, smem, 32);
  const ThreadGroup g(p.tpr);
  VF_NO_UNROLL
  for (int64_t u = g.first(); u < p.n_units; u += g.ngroups) {  // group-uniform
    const int64_t seg = fdiv(p.vdiv, u);
    const int64_t r = u - seg * p.vdiv.d;
    const int64_t q0 = split_point(p.usplit, seg), q1 = split_point(p.usplit, seg + 1);
    CSum<float> acc0, acc1;
    VF_NO_UNROLL
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t qa = fdiv(p.qdiv, q);
      const Row2 rr{qa, r, q - qa * p.qdiv.d};
      VF_NO_UNROLL
      for (int64_t c = g.lane; c < p.cpi; c += g.tpr) {
        const int64_t j0 = c * W;
        const int valid = p.inner - j0 < W ? static_cast<int>(p.inner - j0) : W;
        chunk_into_sums<D, R, DT, W>(p, rr, j0, valid, acc0, acc1);
      }
    }
    store_group_sums<D>(p, g, acc0, acc1, smem,
                        [&](const KOp& out) { return seg * out.block_stride + off2(out, Row2{0, r}); });
  }
}

// The backward whose accumulated outputs are all one value (a scalar log-variance's gradient,
// summed over every element), on map_vec_kernel's fast path: block b of a grid of exactly
// n_blocks takes the fixed unit range [split_point(b), split_point(b + 1)) of (row, chunk) units,
// writes the full-size gradients, and sums the scalar ones per thread in order, then in a fixed
// block-wide butterfly into slice b (the glue sums the slices in order). The ranges depend on the
// shape and n_blocks only (suggest_n_blocks: from the shape), so results are bitwise the same on
// every GPU. At most 2 accumulated outputs. 2 blocks of 256 per SM: at map_vec_kernel's 3 or 4, the
// 16-bit instances spill.
template <OpKind K, DType DT>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, 2) scalar_acc_vec_kernel(const VF_GRID_CONST KParams p) {
  using D = RowOp<K>;
  using R = typename Stor<DT>::raw;
  constexpr int W = kVec<R>;
  VF_SHARED_ARRAY(SumPair<float>, smem, 32);
  const int64_t u0 = split_point(p.usplit, bid_x()), u1 = split_point(p.usplit, bid_x() + 1);
  CSum<float> acc0, acc1;
  VF_NO_UNROLL
  for (int64_t c = u0 + tid_x(); c < u1; c += bdim_x()) {
    const int64_t row = fdiv(p.cdiv, c);
    const int64_t j0 = (c - row * p.cpi) * W;
    const int valid = p.inner - j0 < W ? static_cast<int>(p.inner - j0) : W;
    chunk_into_sums<D, R, DT, W>(p, row2(p, row), j0, valid, acc0, acc1);
  }
  const ThreadGroup g(bdim_x());  // the whole block
  store_group_sums<D>(p, g, acc0, acc1, smem, [](const KOp& out) { return bid_x() * out.block_stride; });
}

// ---- backward with accumulated outputs, fast path ----------------------------------------------
// bcast_vec_kernel: map_vec_kernel's conditions (one event dim, inputs of inner stride 0 or 1 and
// one storage dtype, written outputs of inner stride 1), every accumulated output kept along the
// event (inner stride 1) and along one "kept" row dim (coordinate Row2::r, of size I = vdiv.d),
// broadcast along the "reduced" row dims (one or two: Row2::q and q2, O rows in all; the glue's
// (K, B, D) samples against (B, D) data: q = k; a per-feature (D,) argument against (K, B, D):
// (q, q2) = (k, b)). The reduced rows are cut into n_units / (I * cpi) fixed segments (usplit); a
// thread owns one (segment, r, chunk) and walks the segment's rows q in order, the reduced dim
// innermost: per row it loads every input's vector, writes the full-size gradients and adds the
// accumulated ones into compensated register sums, so the broadcast data is read once per
// segment. At the end it stores its W sums into slice s of each accumulated output, once per slot;
// the glue then sums the slices in order. Segments depend on the shape only (suggest_n_blocks), so
// results are bitwise the same on every GPU. At most 2 accumulated outputs (two register sets).
// Chunks of 4 elements for every dtype (16-byte float32 vectors, 8-byte 16-bit ones): the
// accumulators, 4 compensated sums per output, fit 2 blocks of 256 per SM without spills, where
// 8-element chunks spill.
constexpr int kBcastMaxAcc = 2;
constexpr int kBcastVec = 4;

template <OpKind K, DType DT>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, 2) bcast_vec_kernel(const VF_GRID_CONST KParams p) {
  using D = RowOp<K>;
  using R = typename Stor<DT>::raw;
  constexpr int NI = D::kIn, NO = D::kOut, W = kBcastVec;
  const int64_t stride = gdim_x() * bdim_x();
  VF_NO_UNROLL
  for (int64_t u = bid_x() * bdim_x() + tid_x(); u < p.n_units; u += stride) {
    const int64_t t = fdiv(p.cdiv, u);
    const int64_t j0 = (u - t * p.cpi) * W;
    const int64_t seg = fdiv(p.vdiv, t);
    const int64_t r = t - seg * p.vdiv.d;
    const int valid = p.inner - j0 < W ? static_cast<int>(p.inner - j0) : W;
    const int64_t q0 = split_point(p.usplit, seg), q1 = split_point(p.usplit, seg + 1);
    CSum<float> acc0[W], acc1[W];
    VF_NO_UNROLL
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t qa = fdiv(p.qdiv, q);
      const Row2 rr{qa, r, q - qa * p.qdiv.d};
      float y[NO][W];
      vec_chunk<D, R, DT, W>(p, rr, j0, valid, y);
      store_or_add<D, W>(p, rr, j0, valid, y, [&](int slot, const float (&v)[W]) {
        VF_UNROLL
        for (int e = 0; e < W; ++e) {
          if (slot == 0) {
            acc0[e].add(v[e]);
          } else {
            acc1[e].add(v[e]);
          }
        }
      });
    }
    VF_UNROLL
    for (int o = 0; o < NO; ++o) {
      const KOp& out = p.op[NI + o];
      if (out.cls != kAccElem) continue;
      float v[W];
      VF_UNROLL
      for (int e = 0; e < W; ++e) v[e] = out.slot == 0 ? acc0[e].value() : acc1[e].value();
      store_chunk(out.data, DType::Float32, seg * out.block_stride + off2(out, Row2{0, r}) + j0, valid, v);
    }
  }
}

// ---- backward with accumulated outputs, general ----------------------------------------------------------
// 2 blocks of 256 per SM (128 registers) where that does not spill: the float ops of 5 operands;
// the others spill at 128 and keep 1.
template <OpKind K, class A>
constexpr int kAccMinBlocks = sizeof(A) == 4 && RowOp<K>::kIn + RowOp<K>::kOut <= 5 ? 2 : 1;

template <OpKind K, class A>
VF_GLOBAL void VF_LAUNCH_BOUNDS(256, kAccMinBlocks<K, A>) acc_kernel(const VF_GRID_CONST KParams p) {
  using D = RowOp<K>;
  constexpr int NI = D::kIn, NO = D::kOut, N = NI + NO;
  VF_SHARED_ARRAY(SumPair<A>, smem, 32);
  const ThreadGroup g(p.tpr);
  VF_NO_UNROLL
  for (int64_t u = g.first(); u < p.n_units; u += g.ngroups) {  // group-uniform
    const int64_t r0 = split_point(p.usplit, u) * p.row_mult;
    const int64_t r1 = split_point(p.usplit, u + 1) * p.row_mult;
    A* slice[NO];
    VF_UNROLL
    for (int o = 0; o < NO; ++o) {
      const KOp& q = p.op[NI + o];
      slice[o] = q.cls >= kAccRow ? static_cast<A*>(q.data) + u * q.block_stride : nullptr;
    }
    // kAccRow state: the group's partial for target rprev[o] (carried across chunk passes).
    CSum<A> racc[NO];
    int64_t rprev[NO];
    bool rhas[NO];
    VF_UNROLL
    for (int o = 0; o < NO; ++o) { rprev[o] = 0; rhas[o] = false; }

    VF_NO_UNROLL
    for (int64_t cb = 0; cb < p.n_chunks; cb += g.tpr) {  // group-uniform trip count
      const int64_t c = cb + g.lane;
      int64_t eoff[N];
      int valid = 0;
      if (c < p.n_chunks) {
        valid = chunk_offsets(p, c, eoff);
      } else {
        VF_UNROLL
        for (int o = 0; o < N; ++o) eoff[o] = 0;
      }
      // kAccElem state: this lane's partials for its chunk's targets at row part eprev[o].
      CSum<A> eacc[NO][4];
      int64_t eprev[NO];
      bool ehas[NO];
      VF_UNROLL
      for (int o = 0; o < NO; ++o) {
        eprev[o] = 0;
        ehas[o] = false;
      }
      VF_NO_UNROLL
      for (int64_t r = r0; r < r1; ++r) {
        int64_t roff[N];
        row_offsets(p, r, roff);
        VF_UNROLL
        for (int o = 0; o < NO; ++o) {
          const KOp& q = p.op[NI + o];
          const int64_t t = roff[NI + o];
          if (q.cls == kAccRow) {
            if (rhas[o] && t != rprev[o]) {  // uniform: depends on the row only
              const A total = g.sum(racc[o], smem);
              if (g.lane == 0) acc_add(slice[o] + rprev[o], total);
              racc[o] = CSum<A>();
            }
            rprev[o] = t;
            rhas[o] = true;
          } else if (q.cls == kAccElem) {
            if (ehas[o] && t != eprev[o]) {
              VF_UNROLL
              for (int e = 0; e < 4; ++e) {
                if (e < valid) acc_add(slice[o] + (eprev[o] + eoff[NI + o] + e * q.inner), eacc[o][e].value());
                eacc[o][e] = CSum<A>();
              }
            }
            eprev[o] = t;
            ehas[o] = true;
          }
        }
        if (valid > 0) {
          A y[NO][4];
          compute_chunk<D, A>(p, roff, eoff, valid, y);
          VF_UNROLL
          for (int o = 0; o < NO; ++o) {
            const KOp& q = p.op[NI + o];
            if (q.cls == kAccRow) {
              VF_UNROLL
              for (int e = 0; e < 4; ++e)
                if (e < valid) racc[o].add(y[o][e]);
            } else if (q.cls == kAccElem) {
              VF_UNROLL
              for (int e = 0; e < 4; ++e) eacc[o][e].add(y[o][e]);
            }
          }
        }
      }
      VF_UNROLL
      for (int o = 0; o < NO; ++o) {
        const KOp& q = p.op[NI + o];
        if (q.cls == kAccElem && ehas[o]) {
          VF_UNROLL
          for (int e = 0; e < 4; ++e)
            if (e < valid) acc_add(slice[o] + (eprev[o] + eoff[NI + o] + e * q.inner), eacc[o][e].value());
        }
      }
    }
    VF_UNROLL
    for (int o = 0; o < NO; ++o) {
      if (p.op[NI + o].cls == kAccRow && rhas[o]) {
        const A total = g.sum(racc[o], smem);
        if (g.lane == 0) acc_add(slice[o] + rprev[o], total);
      }
    }
  }
}

// ---- host side: planning ------------------------------------------------------------------------
namespace {

using HDim = StridedDim<kMaxOps>;
using Dims = std::vector<HDim>;

// core/coalesce.h over a vector of dims, ops outside `active` ignored.
Dims coalesce(Dims dims, const bool* active, int nops) {
  dims.resize(static_cast<size_t>(vae_fast::coalesce(dims.data(), static_cast<int>(dims.size()), nops, active)));
  return dims;
}

int64_t numel(const Dims& d) {
  int64_t n = 1;
  for (const HDim& x : d) n *= x.size;
  return n;
}

// Fills the geometry of p from row dims and event dims (both already coalesced).
bool set_geometry(KParams& p, const Dims& rows, const Dims& ev, int nops) {
  if (static_cast<int>(rows.size()) > kMaxRowDims) return false;
  if (!ev.empty() && static_cast<int>(ev.size()) - 1 > kMaxEvDims) return false;
  p.nr = static_cast<int32_t>(rows.size());
  for (int d = 0; d < p.nr; ++d) {
    p.rdiv[d] = make_fastdiv(rows[d].size);
    for (int o = 0; o < nops; ++o) p.op[o].rs[d] = rows[d].st[o];
  }
  p.rows = numel(rows);
  int64_t outer = 1;
  if (ev.empty()) {
    p.ne = 0;
    p.inner = 1;
    for (int o = 0; o < nops; ++o) p.op[o].inner = 0;
  } else {
    const HDim& last = ev.back();
    p.ne = static_cast<int32_t>(ev.size()) - 1;
    p.inner = last.size;
    for (int o = 0; o < nops; ++o) p.op[o].inner = last.st[o];
    for (int d = 0; d < p.ne; ++d) {
      p.ediv[d] = make_fastdiv(ev[d].size);
      for (int o = 0; o < nops; ++o) p.op[o].es[d] = ev[d].st[o];
      outer *= ev[d].size;
    }
  }
  p.cpi = (p.inner + 3) / 4;
  p.n_chunks = p.cpi * outer;
  p.cdiv = make_fastdiv(p.cpi);
  return true;
}

struct Plan {
  int nin = 0, nout = 0;
  bool active[kMaxOps] = {};
  Dims rows, ev;  // the glue's row and event dims with every op's strides
};

bool base_plan(const RowArgs& a, int nin, int nout, Plan& pl) {
  const RowLayout& L = a.layout;
  if (L.n_row_dims < 0 || L.n_row_dims > kMaxDims || L.n_event_dims < 0 ||
      L.n_event_dims > kMaxDims)
    return false;
  pl.nin = nin;
  pl.nout = nout;
  // Appends n dims of the given sizes with every op's strides (member `st` of Operand) to out;
  // false for a negative size or a product other than numel.
  auto add_dims = [&](int n, const int64_t* sizes, int64_t (Operand::*st)[kMaxDims], int64_t numel,
                      Dims& out) {
    int64_t prod = 1;
    for (int d = 0; d < n; ++d) {
      if (sizes[d] < 0) return false;
      HDim h;
      h.size = sizes[d];
      for (int o = 0; o < nin; ++o) h.st[o] = (a.in[o].*st)[d];
      for (int o = 0; o < nout; ++o) h.st[nin + o] = (a.out[o].*st)[d];
      out.push_back(h);
      prod *= h.size;
    }
    return prod == numel;
  };
  if (!add_dims(L.n_row_dims, L.row_sizes, &Operand::row_strides, L.rows, pl.rows) ||
      !add_dims(L.n_event_dims, L.event_sizes, &Operand::event_strides, L.event_numel, pl.ev))
    return false;
  for (int o = 0; o < nin; ++o) {
    if (a.in[o].data == nullptr) return false;
    pl.active[o] = true;
  }
  // (an accumulated output counts before its slices are bound: suggest_n_blocks plans with it)
  for (int o = 0; o < nout; ++o) pl.active[nin + o] = a.out[o].data != nullptr || a.out[o].accumulate;
  return true;
}

void set_ops(KParams& p, const RowArgs& a, const Plan& pl) {
  for (int o = 0; o < pl.nin; ++o) {
    p.op[o].data = a.in[o].data;
    p.op[o].dtype = a.in[o].dtype;
    p.op[o].clamp = a.in[o].clamp.on;
    p.op[o].clo = a.in[o].clamp.lo;
    p.op[o].chi = a.in[o].clamp.hi;
    p.op[o].flo = static_cast<float>(a.in[o].clamp.lo);
    p.op[o].fhi = static_cast<float>(a.in[o].clamp.hi);
  }
  for (int o = 0; o < pl.nout; ++o) {
    KOp& q = p.op[pl.nin + o];
    q.data = a.out[o].data;
    q.dtype = a.out[o].dtype;
    q.block_stride = a.out[o].block_stride;
    q.cls = kUnused;
  }
}

// Event-dim pattern of output o over (coalesced) event dims: 0 all broadcast (or no event),
// 1 none broadcast, 2 mixed.
int event_pattern(const Dims& ev, int oi) {
  bool zero = false, nonzero = false;
  for (const HDim& d : ev) {
    if (d.size <= 1) continue;
    (d.st[oi] == 0 ? zero : nonzero) = true;
  }
  if (zero && nonzero) return 2;
  return nonzero ? 1 : 0;
}

// The storage dtype of the fast paths for p (after set_geometry), or -1 for the general path: one
// event dim (ne == 0) of at least one vector, at most 2 row dims (vec_dtype), every input's inner
// stride 0 or 1, the stride-1 ones all float32, all float16 or all bfloat16 (at least one of them);
// with `outputs`, every written (kDirect) output's inner stride 1 (vec_dtype_of_ops: the operands'
// conditions alone).
int vec_dtype_of_ops(const KParams& p, int nin, int nops, bool outputs) {
  int dt = -1;
  for (int o = 0; o < nin; ++o) {
    const KOp& q = p.op[o];
    if (q.inner == 0) continue;
    if (q.inner != 1 || q.dtype == DType::Float64) return -1;
    if (dt >= 0 && dt != static_cast<int>(q.dtype)) return -1;
    dt = static_cast<int>(q.dtype);
  }
  if (outputs)
    for (int o = nin; o < nops; ++o)
      if (p.op[o].cls == kDirect && p.op[o].inner != 1) return -1;
  const int w = dt == static_cast<int>(DType::Float32) ? kVec<float> : kVec<unsigned short>;
  return dt >= 0 && p.inner >= w ? dt : -1;
}

int vec_dtype(const KParams& p, int nin, int nops, bool outputs) {
  return p.ne != 0 || p.nr > 2 ? -1 : vec_dtype_of_ops(p, nin, nops, outputs);
}

// Chunks of one 16-byte vector of a stride-1 input of dtype vdt, the row dims as Row2 (the fast
// paths; ne == 0, nr <= 2).
void set_vec_geometry(KParams& p, int vdt, int nops) {
  p.vdiv = make_fastdiv(p.nr == 2 ? p.rdiv[1].d : std::max<int64_t>(p.rows, 1));
  for (int o = 0; o < nops; ++o) {
    KOp& q = p.op[o];
    q.vr0 = p.nr == 2 ? q.rs[0] : 0;
    q.vr1 = p.nr == 2 ? q.rs[1] : (p.nr == 1 ? q.rs[0] : 0);
  }
  const int w = vdt == static_cast<int>(DType::Float32) ? kVec<float> : kVec<unsigned short>;
  p.cpi = (p.inner + w - 1) / w;
  p.n_chunks = p.cpi;
  p.cdiv = make_fastdiv(p.cpi);
}

// Launches the fast-path kernel of storage dtype vdt: kernel(tag) gives it for a DTypeTag (one
// instance per dtype); cudaErrorInvalidValue for a dtype with no fast path (the callers check first).
template <DType DT>
using DTypeTag = std::integral_constant<DType, DT>;
template <class PickKernel>
cudaError_t launch_vec(int vdt, PickKernel kernel, int64_t grid, int block, cudaStream_t stream, const KParams& p) {
  switch (vdt) {
    case static_cast<int>(DType::Float32): return launch_kernel(kernel(DTypeTag<DType::Float32>{}), grid, block, stream, p);
    case static_cast<int>(DType::Float16): return launch_kernel(kernel(DTypeTag<DType::Float16>{}), grid, block, stream, p);
    case static_cast<int>(DType::BFloat16): return launch_kernel(kernel(DTypeTag<DType::BFloat16>{}), grid, block, stream, p);
    default: return cudaErrorInvalidValue;
  }
}

// Chunks per segment of a long row (reduce mode): 16K elements (float32), 32K (16-bit) on the fast
// path, 16K on the general one.
// Fixed, so that a row's summation order depends on its shape only, never on the GPU.
constexpr int64_t kSegChunks = 4096;

template <OpKind K, class A>
cudaError_t launch_reduce(KParams& p, int vdt, cudaStream_t stream) {
  p.out_op = RowOp<K>::kIn;
  p.nseg = p.n_chunks > kSegChunks ? (p.n_chunks + kSegChunks - 1) / kSegChunks : 1;
  p.seg_chunks = kSegChunks;
  p.segdiv = make_fastdiv(p.nseg);
  p.n_units = p.rows * p.nseg;
  p.tpr = p.nseg > 1 ? 256 : pick_tpr(p.n_chunks, p.rows, 256);
  int64_t grid;
  int block;
  group_grid(p.tpr, p.n_units, grid, block);
  auto stage1 = [&]() -> cudaError_t {
    if constexpr (std::is_same_v<A, float>) {
      if (vdt >= 0)
        return launch_vec(vdt, [](auto dt) { return &reduce_vec_kernel<K, decltype(dt)::value>; }, grid, block,
                          stream, p);
    }
    return launch_kernel(&reduce_kernel<K, A>, grid, block, stream, p);
  };
  if (p.nseg == 1) return stage1();
  // Long rows: the segments' partial sums in a stream-ordered scratch buffer (capture safe).
  cudaError_t err = cudaMallocAsync(&p.part, static_cast<size_t>(p.n_units) * sizeof(A), stream);
  if (err != cudaSuccess) return err;
  err = stage1();
  if (err == cudaSuccess) {
    p.tpr = pick_tpr(p.nseg, p.rows, 256);
    group_grid(p.tpr, p.rows, grid, block);
    err = launch_kernel(&segment_sum_kernel<A>, grid, block, stream, p);
  }
  const cudaError_t ferr = cudaFreeAsync(p.part, stream);
  return err != cudaSuccess ? err : ferr;
}

template <OpKind K, class A>
cudaError_t launch_map(KParams& p, const Plan& pl, cudaStream_t stream) {
  bool act[kMaxOps];
  for (int o = 0; o < kMaxOps; ++o) act[o] = pl.active[o] && (o < pl.nin || p.op[o].cls == kDirect);
  Dims all = pl.rows;
  all.insert(all.end(), pl.ev.begin(), pl.ev.end());
  Dims c = coalesce(all, act, pl.nin + pl.nout);
  Dims rows, ev;
  if (!c.empty()) {
    ev.push_back(c.back());
    rows.assign(c.begin(), c.end() - 1);
  }
  if (!set_geometry(p, rows, ev, pl.nin + pl.nout)) return cudaErrorInvalidValue;
  if (p.rows * p.cpi == 0) return cudaSuccess;
  if constexpr (std::is_same_v<A, float>) {
    const int vdt = vec_dtype(p, pl.nin, pl.nin + pl.nout, true);
    if (vdt >= 0) {
      set_vec_geometry(p, vdt, pl.nin + pl.nout);
      return launch_vec(vdt, [](auto dt) { return &map_vec_kernel<K, decltype(dt)::value>; },
                        flat_grid(p.rows * p.cpi, 256), 256, stream, p);
    }
  }
  return launch_kernel(&map_kernel<K, A>, flat_grid(p.rows * p.cpi, 256), 256, stream, p);
}

// The one-pass kernels' operands: p's ops set, each wanted output written (kDirect) or accumulated
// (kAccElem, with its slot); returns how many are accumulated, or -1 past kBcastMaxAcc.
int set_fast_outputs(KParams& p, const RowArgs& a, const Plan& pl) {
  set_ops(p, a, pl);
  int n_acc = 0;
  for (int o = 0; o < pl.nout; ++o) {
    if (!pl.active[pl.nin + o]) continue;
    KOp& q = p.op[pl.nin + o];
    if (!a.out[o].accumulate) {
      q.cls = kDirect;
      continue;
    }
    if (n_acc == kBcastMaxAcc) return -1;
    q.cls = kAccElem;
    q.slot = n_acc++;
  }
  return n_acc;
}

// The one-pass backward with accumulated outputs kept along the event (bcast_vec_kernel) or one
// value per kept row (per_row: bcast_row_vec_kernel), or false: fills p's operands, classes, slots
// and geometry, vdt, and the number of reduced rows.
template <OpKind K>
bool plan_bcast(const RowArgs& a, const Plan& pl, KParams& p, int& vdt, int64_t& reduced, bool& per_row) {
  using D = RowOp<K>;
  const int nin = D::kIn, nout = D::kOut, nops = nin + nout;
  if constexpr (!D::kBackward) {
    return false;
  } else {
    const int n_acc = set_fast_outputs(p, a, pl);
    if (n_acc <= 0) return false;
    // The innermost event dim (after coalescing) is the event; the outer event dims join the rows
    // (in a backward op the split only matters to the upstream gradient, read through its strides):
    // a per-channel (C, 1, 1) argument against (B, C, H, W) is then one value per (b, c) row.
    Dims ev = coalesce(pl.ev, pl.active, nops), all_rows = pl.rows;
    if (ev.empty()) return false;
    all_rows.insert(all_rows.end(), ev.begin(), ev.end() - 1);
    ev.erase(ev.begin(), ev.end() - 1);
    // Row dims along which every accumulated output is broadcast are reduced; along which none
    // is, kept; one of each at most after coalescing.
    Dims red, kept;
    for (const HDim& d : all_rows) {
      if (d.size == 1) continue;
      int zero = 0;
      for (int o = nin; o < nops; ++o) zero += p.op[o].cls == kAccElem && d.st[o] == 0;
      if (zero == n_acc) {
        red.push_back(d);
      } else if (zero == 0) {
        kept.push_back(d);
      } else {
        return false;
      }
    }
    red = coalesce(red, pl.active, nops);
    kept = coalesce(kept, pl.active, nops);
    // reduced dims (at most 2: the K samples and the batch against a per-feature argument), then
    // the kept one
    if (red.size() > 2 || kept.size() > 1 || ev.size() != 1) return false;
    const int n_red = static_cast<int>(red.size());
    Dims rows = red;
    rows.insert(rows.end(), kept.begin(), kept.end());
    if (!set_geometry(p, rows, ev, nops) || p.ne != 0) return false;
    vdt = vec_dtype_of_ops(p, nin, nops, true);
    if (vdt < 0) return false;
    int along_event = 0;  // accumulated outputs kept along the event; the others are one per row
    for (int o = nin; o < nops; ++o) along_event += p.op[o].cls == kAccElem && p.op[o].inner == 1;
    if (along_event != 0 && along_event != n_acc) return false;
    per_row = along_event == 0;
    // kept along the event: broadcast along some rows; one per row: kept along some (a scalar is
    // scalar_acc_vec_kernel's)
    if (per_row ? kept.empty() : red.empty()) return false;
    const int64_t n_kept = kept.empty() ? 1 : kept[0].size;
    p.vdiv = make_fastdiv(n_kept);
    p.qdiv = make_fastdiv(n_red == 2 ? red[1].size : 1);
    for (int o = 0; o < nops; ++o) {
      p.op[o].vr0 = n_red >= 1 ? p.op[o].rs[0] : 0;
      p.op[o].vr2 = n_red == 2 ? p.op[o].rs[1] : 0;
      p.op[o].vr1 = kept.empty() ? 0 : p.op[o].rs[n_red];
    }
    // bcast_vec_kernel: chunks of kBcastVec; bcast_row_vec_kernel: one 16-byte vector
    const int w = !per_row ? kBcastVec : vdt == static_cast<int>(DType::Float32) ? kVec<float> : kVec<unsigned short>;
    p.cpi = (p.inner + w - 1) / w;
    p.n_chunks = p.cpi;
    p.cdiv = make_fastdiv(p.cpi);
    reduced = numel(red);
    return true;
  }
}

// Segments of the reduced rows for bcast_vec_kernel and bcast_row_vec_kernel: enough threads (of
// threads_per_segment each) to fill a large GPU, but at least kBcastMinRows rows per segment, so the
// slices the glue sums stay small beside the gradients themselves. A function of the shape only.
constexpr int64_t kBcastMinRows = 16;
int64_t bcast_segments(int64_t reduced, int64_t threads_per_segment) {
  const int64_t want = (kTargetThreads + threads_per_segment - 1) / std::max<int64_t>(threads_per_segment, 1);
  return std::clamp<int64_t>(want, 1, std::max<int64_t>(reduced / kBcastMinRows, 1));
}

// Threads per segment of the one-pass kernels (bcast_segments): one per (kept row, chunk), or a
// group of at most 32 per kept row.
int64_t bcast_segment_threads(const KParams& p, bool per_row) {
  return p.vdiv.d * (per_row ? std::min<int64_t>(p.cpi, 32) : p.cpi);
}

template <OpKind K>
cudaError_t launch_bcast(KParams& p, int vdt, int64_t reduced, bool per_row, int64_t n_seg, cudaStream_t stream) {
  if (!make_split(reduced, n_seg, p.usplit)) return cudaErrorInvalidValue;
  if (per_row) {  // a group per (segment, kept row)
    p.n_units = n_seg * p.vdiv.d;
    p.tpr = pick_tpr(p.cpi, p.n_units, 256);
    int64_t grid;
    int block;
    group_grid(p.tpr, p.n_units, grid, block);
    return launch_vec(vdt, [](auto dt) { return &bcast_row_vec_kernel<K, decltype(dt)::value>; }, grid, block,
                      stream, p);
  }
  p.n_units = n_seg * p.vdiv.d * p.cpi;
  return launch_vec(vdt, [](auto dt) { return &bcast_vec_kernel<K, decltype(dt)::value>; },
                    flat_grid(p.n_units, 256), 256, stream, p);
}

// The fast path of the backward whose accumulated outputs are all scalars (scalar_acc_vec_kernel),
// or false: fills p as launch_map's fast path would (every dim coalesced, the last the event) and
// vdt.
template <OpKind K>
bool plan_scalar_acc(const RowArgs& a, const Plan& pl, KParams& p, int& vdt) {
  using D = RowOp<K>;
  const int nin = D::kIn, nout = D::kOut, nops = nin + nout;
  if constexpr (!D::kBackward) {
    return false;
  } else {
    if (set_fast_outputs(p, a, pl) <= 0) return false;
    bool act[kMaxOps] = {};  // the inputs and the written outputs shape the coalescing
    for (int o = 0; o < nops; ++o) {
      act[o] = o < nin || p.op[o].cls == kDirect;
      if (p.op[o].cls != kAccElem) continue;
      for (const Dims* g : {&pl.rows, &pl.ev})
        for (const HDim& d : *g)
          if (d.size > 1 && d.st[o] != 0) return false;  // not one value
    }
    Dims all = pl.rows;
    all.insert(all.end(), pl.ev.begin(), pl.ev.end());
    const Dims c = coalesce(all, act, nops);
    if (c.empty()) return false;
    const Dims rows(c.begin(), c.end() - 1), ev(1, c.back());
    if (!set_geometry(p, rows, ev, nops)) return false;
    vdt = vec_dtype(p, nin, nops, true);
    if (vdt < 0) return false;
    set_vec_geometry(p, vdt, nops);
    return true;
  }
}

// Blocks of scalar_acc_vec_kernel: about 8 units per thread, at most 2048 (a few waves of a large
// GPU, and a slice sum the glue does not notice). A function of the shape only.
int64_t scalar_acc_blocks(int64_t units) {
  return std::clamp<int64_t>((units + 256 * 8 - 1) / (256 * 8), 1, 2048);
}

template <OpKind K>
cudaError_t launch_scalar_acc(KParams& p, int vdt, int64_t n_blocks, cudaStream_t stream) {
  const int64_t units = p.rows * p.cpi;
  if (!make_split(units, n_blocks, p.usplit)) return cudaErrorInvalidValue;
  // exactly n_blocks blocks: each owns its unit range
  return launch_vec(vdt, [](auto dt) { return &scalar_acc_vec_kernel<K, decltype(dt)::value>; }, n_blocks, 256,
                    stream, p);
}

// RowLayout::n_blocks for the fast paths of op K's backward, or 0 where neither applies.
template <OpKind K>
int64_t bcast_blocks(const RowArgs& a) {
  using D = RowOp<K>;
  Plan pl;
  if (a.layout.rows == 0 || a.layout.event_numel == 0 || !base_plan(a, D::kIn, D::kOut, pl)) return 0;
  KParams p;
  int vdt = -1;
  int64_t reduced = 0;
  bool per_row = false;
  if (plan_bcast<K>(a, pl, p, vdt, reduced, per_row))
    return bcast_segments(reduced, bcast_segment_threads(p, per_row));
  KParams ps;
  if (plan_scalar_acc<K>(a, pl, ps, vdt)) return scalar_acc_blocks(ps.rows * ps.cpi);
  return 0;
}

template <OpKind K, class A>
cudaError_t launch_acc(KParams& p, const Dims& rows, const Dims& ev, int nops, int64_t n_units,
                       int64_t unit_rows, int64_t row_mult, cudaStream_t stream) {
  if (!set_geometry(p, rows, ev, nops)) return cudaErrorInvalidValue;
  if (n_units <= 0 || p.n_chunks == 0) return cudaSuccess;
  p.n_units = n_units;
  p.row_mult = row_mult;
  if (!make_split(unit_rows, n_units, p.usplit)) return cudaErrorInvalidValue;
  p.tpr = pick_tpr(p.n_chunks, n_units, 256);
  int64_t grid;
  int block;
  group_grid(p.tpr, n_units, grid, block);
  return launch_kernel(&acc_kernel<K, A>, grid, block, stream, p);
}

template <OpKind K, class A>
cudaError_t run_backward(const RowArgs& a, const Plan& pl, cudaStream_t stream);

template <OpKind K, class A>
cudaError_t run_typed(const RowArgs& a, const Plan& pl, cudaStream_t stream) {
  using D = RowOp<K>;
  const RowLayout& L = a.layout;
  const int nin = D::kIn, nout = D::kOut, nops = nin + nout;
  if (L.rows == 0) return cudaSuccess;

  if constexpr (!D::kBackward) {
    KParams p;
    set_ops(p, a, pl);
    if (!pl.active[nin]) return cudaSuccess;  // forward output not wanted
    p.op[nin].cls = kDirect;
    if (L.elementwise) return launch_map<K, A>(p, pl, stream);
    Dims rows = coalesce(pl.rows, pl.active, nops);
    Dims ev = coalesce(pl.ev, pl.active, nops);
    if (!set_geometry(p, rows, ev, nops)) return cudaErrorInvalidValue;
    int vdt = -1;
    if (L.event_numel == 0) {
      p.n_chunks = 0;  // every row sums to 0
    } else {
      vdt = vec_dtype(p, nin, nops, false);
      if (vdt >= 0) set_vec_geometry(p, vdt, nops);
    }
    return launch_reduce<K, A>(p, vdt, stream);
  } else {
    return run_backward<K, A>(a, pl, stream);
  }
}

template <OpKind K, class A>
cudaError_t run_backward(const RowArgs& a, const Plan& pl, cudaStream_t stream) {
  using D = RowOp<K>;
  const RowLayout& L = a.layout;
  const int nin = D::kIn, nout = D::kOut, nops = nin + nout;
  bool any_direct = false, any_acc = false;
  for (int o = 0; o < nout; ++o) {
    if (!pl.active[nin + o]) continue;
    (a.out[o].accumulate ? any_acc : any_direct) = true;
  }
  if (L.event_numel == 0 || (!any_direct && !any_acc)) return cudaSuccess;
  if (any_acc && L.n_blocks < 1) return cudaErrorInvalidValue;
  if constexpr (std::is_same_v<A, float>) {
    if (any_acc) {  // the fast path, with the glue's n_blocks as its segments (any count is exact)
      KParams p;
      int vdt = -1;
      int64_t reduced = 0;
      bool per_row = false;
      if (plan_bcast<K>(a, pl, p, vdt, reduced, per_row))
        return launch_bcast<K>(p, vdt, reduced, per_row, L.n_blocks, stream);
      KParams ps;
      if (plan_scalar_acc<K>(a, pl, ps, vdt)) return launch_scalar_acc<K>(ps, vdt, L.n_blocks, stream);
    }
  }

  if (!any_acc || L.n_blocks == 1) {
    cudaError_t err = cudaSuccess;
    if (any_direct) {
      KParams p;
      set_ops(p, a, pl);
      for (int o = 0; o < nout; ++o)
        if (pl.active[nin + o] && !a.out[o].accumulate) p.op[nin + o].cls = kDirect;
      err = launch_map<K, A>(p, pl, stream);
      if (err != cudaSuccess) return err;
    }
    // Reorder mode: per accumulated output, its kept dims are the rows (one target each), its
    // broadcast dims the event.
    for (int o = 0; o < nout && any_acc; ++o) {
      if (!pl.active[nin + o] || !a.out[o].accumulate) continue;
      const int oi = nin + o;
      KParams p;
      set_ops(p, a, pl);
      for (int x = 0; x < nout; ++x)
        if (x != o) p.op[nin + x].data = nullptr;
      p.op[oi].cls = kAccRow;
      p.op[oi].block_stride = 0;
      bool act[kMaxOps] = {};
      for (int x = 0; x < nin; ++x) act[x] = true;
      act[oi] = true;
      Dims kept, red;
      for (const Dims* g : {&pl.rows, &pl.ev})
        for (const HDim& d : *g) {
          if (d.size == 1) continue;
          (d.st[oi] != 0 ? kept : red).push_back(d);
        }
      kept = coalesce(kept, act, nops);
      red = coalesce(red, act, nops);
      const int64_t targets = numel(kept);
      err = launch_acc<K, A>(p, kept, red, nops, targets, targets, 1, stream);
      if (err != cudaSuccess) return err;
    }
    return err;
  }

  // Row-block mode.
  Dims rows = coalesce(pl.rows, pl.active, nops);
  Dims ev = coalesce(pl.ev, pl.active, nops);
  KParams p;
  set_ops(p, a, pl);
  bool mixed[4] = {};
  for (int o = 0; o < nout; ++o) {
    if (!pl.active[nin + o]) continue;
    KOp& q = p.op[nin + o];
    if (!a.out[o].accumulate) {
      q.cls = kDirect;
      continue;
    }
    const int pat = event_pattern(ev, nin + o);
    if (pat == 2) {
      mixed[o] = true;
      q.data = nullptr;
      q.cls = kUnused;
    } else {
      q.cls = pat == 0 ? kAccRow : kAccElem;
    }
  }
  bool any_main = false;
  for (int o = 0; o < nout; ++o) any_main |= p.op[nin + o].cls != kUnused;
  cudaError_t err = cudaSuccess;
  if (any_main) {
    err = launch_acc<K, A>(p, rows, ev, nops, L.n_blocks, L.rows, 1, stream);
    if (err != cudaSuccess) return err;
  }
  // Mixed event pattern: the output's kept event dims join the rows (innermost), so row r of
  // the glue becomes rows [r*Q, (r+1)*Q) and row block b keeps its rows, times Q.
  for (int o = 0; o < nout; ++o) {
    if (!mixed[o]) continue;
    const int oi = nin + o;
    KParams q;
    set_ops(q, a, pl);
    for (int x = 0; x < nout; ++x)
      if (x != o) q.op[nin + x].data = nullptr;
    q.op[oi].cls = kAccRow;
    bool act[kMaxOps] = {};
    for (int x = 0; x < nin; ++x) act[x] = true;
    act[oi] = true;
    Dims r2 = pl.rows, red;
    int64_t qn = 1;
    for (const HDim& d : pl.ev) {
      if (d.size == 1) continue;
      if (d.st[oi] != 0) {
        r2.push_back(d);
        qn *= d.size;
      } else {
        red.push_back(d);
      }
    }
    r2 = coalesce(r2, act, nops);
    red = coalesce(red, act, nops);
    err = launch_acc<K, A>(q, r2, red, nops, L.n_blocks, L.rows, qn, stream);
    if (err != cudaSuccess) return err;
  }
  return err;
}

template <OpKind K>
cudaError_t run_op(const RowArgs& a, cudaStream_t stream) {
  using D = RowOp<K>;
  Plan pl;
  if (!base_plan(a, D::kIn, D::kOut, pl)) return cudaErrorInvalidValue;
  bool f64 = false, other = false;
  for (int o = 0; o < D::kIn; ++o) (a.in[o].dtype == DType::Float64 ? f64 : other) = true;
  if (f64 && other) return cudaErrorInvalidValue;
  for (int o = 0; o < D::kOut; ++o) {
    if (!pl.active[D::kIn + o]) continue;
    const Operand& q = a.out[o];
    const bool acc_out = q.accumulate && D::kBackward;
    if (acc_out) {
      if (q.dtype != (f64 ? DType::Float64 : DType::Float32)) return cudaErrorInvalidValue;
      if (q.block_stride < 0) return cudaErrorInvalidValue;
    } else if (f64 && q.dtype != DType::Float64) {
      return cudaErrorInvalidValue;
    } else if (!f64 && q.dtype == DType::Float64 && D::kBackward) {
      return cudaErrorInvalidValue;
    }
    if (static_cast<int>(q.dtype) < 0 || static_cast<int>(q.dtype) > 3) return cudaErrorInvalidValue;
  }
  for (int o = 0; o < D::kIn; ++o) {
    if (static_cast<int>(a.in[o].dtype) < 0 || static_cast<int>(a.in[o].dtype) > 3)
      return cudaErrorInvalidValue;
    if (a.in[o].clamp.on && !(a.in[o].clamp.lo <= a.in[o].clamp.hi)) return cudaErrorInvalidValue;
  }
  return f64 ? run_typed<K, double>(a, pl, stream) : run_typed<K, float>(a, pl, stream);
}

}  // namespace
}  // namespace detail

cudaError_t launch_rows(OpKind op, const RowArgs& args, cudaStream_t stream) {
  using namespace detail;
  switch (op) {
#define VF_KIND_CASE(kind, ...) \
  case OpKind::kind: return run_op<OpKind::kind>(args, stream);
    VF_ROW_KINDS(VF_KIND_CASE)
#undef VF_KIND_CASE
  }
  return cudaErrorInvalidValue;
}

int64_t suggest_n_blocks(int device, OpKind op, const RowArgs& args, int64_t slice_numel) {
  using namespace detail;
  int64_t fast = 0;
  switch (op) {
#define VF_KIND_CASE(kind, ...) \
  case OpKind::kind: fast = bcast_blocks<OpKind::kind>(args); break;
    VF_ROW_KINDS(VF_KIND_CASE)
#undef VF_KIND_CASE
  }
  if (fast > 0) return fast;
  const int64_t rows = args.layout.rows, event_numel = args.layout.event_numel;
  if (rows <= 1) return 1;
  // A slice at least as large as the rows means the targets (mostly) follow the rows: the
  // reorder mode (n_blocks == 1) is then fully parallel over the targets and needs no slices.
  if (slice_numel >= rows) return 1;
  int64_t n = std::min<int64_t>(rows, static_cast<int64_t>(detail::num_sms(device)) * 32);
  const int64_t budget = std::max<int64_t>(rows * std::max<int64_t>(event_numel, 1) / 4, 1 << 20);
  if (slice_numel > 0) n = std::min(n, std::max<int64_t>(budget / slice_numel, 1));
  return std::max<int64_t>(n, 1);
}

}  // namespace vae_fast::cuda
