// What the CPU row engines (rows.cpp) and the sampler (sample.cpp) share: the chunk and task sizes,
// the fixed-order sums, torch.clamp on vectors, and the walk of a flat index space in chunks at global
// multiples of kChunk with per-row sums by segments (the same sums for any thread count). Included by
// the per-ISA kernel files only: everything lives in vae_fast::<ISA>::cpu (core/isa.h).
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/isa.h"

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace cpu {

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

// at::parallel_for's grain for units of `unit_elements` elements each: tasks of kMinTaskElements at least.
inline int64_t task_grain(int64_t unit_elements) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, unit_elements));
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
// lo <= x <= hi: torch.clamp's gradient passes there and is 0 elsewhere, NaN included (launch_args.h's Clamp).
template <class acc_t>
Vec<acc_t> clamp_keep(Vec<acc_t>& x, acc_t lo, acc_t hi) {
  using V = Vec<acc_t>;
  const V vlo(lo), vhi(hi);
  const V keep = (x >= vlo) & (x <= vhi);
  x = V::blendv(V::blendv(x, vlo, x < vlo), vhi, x > vhi);
  return keep;
}

template <class T>
T* typed(void* p) { return static_cast<T*>(p); }

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

}  // namespace cpu
VF_ISA_NS_END
}  // namespace vae_fast
