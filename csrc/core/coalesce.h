// The stride coalescer, once for the glue (glue/row_problem.cpp: a row op's row and event dims;
// glue/dmol_ops.cpp: the mixture of logistics' leading dims) and the CUDA planner (cuda/rows.cu):
// torch-free, host only, over plain int64 arrays.
#pragma once
#include <cstdint>

namespace vae_fast {

// One dim of an index space walked by up to N operands: its size and each operand's stride (elements).
template <int N>
struct StridedDim {
  int64_t size = 1;
  int64_t st[N] = {};
};

// Drops size-1 dims and merges each dim into the one before it where every operand in `active`
// (nullptr: all nops) walks the two as one (outer stride == inner stride * inner size), in place over
// dims[0, n); returns how many remain. Keeps the C-order flattening of the index space, so row numbers
// and row blocks are unchanged. A dim of size 0 is never merged (only the CUDA planner meets one: the
// glue returns before laying out an empty problem).
template <int N>
int coalesce(StridedDim<N>* dims, int n, int nops, const bool* active = nullptr) {
  int out = 0;
  for (int i = 0; i < n; ++i) {
    const StridedDim<N> d = dims[i];
    if (d.size == 1) continue;
    if (out > 0 && d.size != 0 && dims[out - 1].size != 0) {
      StridedDim<N>& b = dims[out - 1];
      bool ok = true;
      for (int o = 0; o < nops; ++o)
        if ((!active || active[o]) && b.st[o] != d.st[o] * d.size) ok = false;
      if (ok) {
        b.size *= d.size;
        for (int o = 0; o < nops; ++o) b.st[o] = d.st[o];
        continue;
      }
    }
    dims[out++] = d;
  }
  return out;
}

}  // namespace vae_fast
