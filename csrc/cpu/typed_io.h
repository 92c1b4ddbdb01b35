// Reading and writing tensors of any of the four dtypes in the accumulation type acc_t (float or
// double), once for every CPU kernel: the row engines and the sampler (through an Operand: load,
// store, output_target) and the mixture of logistics (gather_padded, scatter, read_at, write_at). The one
// switch over DType is for_dtype; the one strided conversion loop each way is convert_in / convert_out.
// Included by the per-ISA kernel files only (cpu/rows.cpp, sample.cpp, dmol.cpp): everything lives in
// vae_fast::<ISA>::cpu (core/isa.h).
#pragma once
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/isa.h"
#include "core/launch_args.h"

namespace vae_fast {
VF_ISA_NS_BEGIN
namespace cpu {

template <class T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) with T the C++ type of dt (c10::Half, c10::BFloat16 for the 16-bit dtypes).
template <class F>
inline void for_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::Float64: return f(TypeTag<double>{});
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float16: return f(TypeTag<c10::Half>{});
    case DType::BFloat16: return f(TypeTag<c10::BFloat16>{});
  }
}

// One value between a stored type T and acc_t; Half / BFloat16 go through float.
template <class acc_t, class T>
inline acc_t to_acc(T v) {
  if constexpr (std::is_floating_point_v<T>) return static_cast<acc_t>(v);
  else return static_cast<acc_t>(static_cast<float>(v));
}
template <class T, class acc_t>
inline T from_acc(acc_t v) {
  if constexpr (std::is_floating_point_v<T>) return static_cast<T>(v);
  else return T(static_cast<float>(v));
}

// n values p[i * stride] into buf[0, n) in acc_t, and back.
template <class acc_t, class T>
void convert_in(const T* p, int64_t stride, int64_t n, acc_t* buf) {
  if (stride == 1) {
    at::vec::convert(p, buf, n);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = to_acc<acc_t>(p[i * stride]);
  }
}
template <class acc_t, class T>
void convert_out(const acc_t* v, int64_t n, T* p, int64_t stride) {
  if (stride == 1) {
    at::vec::convert(v, p, n);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i * stride] = from_acc<T>(v[i]);
  }
}

// One element of a tensor of dtype dt at base[off].
template <class acc_t>
acc_t read_at(DType dt, const void* base, int64_t off) {
  acc_t v(0);
  for_dtype(dt, [&](auto t) {
    using T = typename decltype(t)::type;
    v = to_acc<acc_t>(static_cast<const T*>(base)[off]);
  });
  return v;
}
template <class acc_t>
void write_at(DType dt, void* base, int64_t off, acc_t v) {
  for_dtype(dt, [&](auto t) {
    using T = typename decltype(t)::type;
    static_cast<T*>(base)[off] = from_acc<T>(v);
  });
}

// ---- through an Operand (the row engines, the sampler) ------------------------------------------
template <class acc_t>
struct Loaded {
  const acc_t* ptr;  // n contiguous values, unless scalar
  bool scalar;       // inner stride 0: one value for the whole chunk
  acc_t value;
};

template <class acc_t>
acc_t read_one(const Operand& op, int64_t off) {
  return read_at<acc_t>(op.dtype, op.data, off);
}

// n values from op.data + off at `stride`: the tensor itself when it is contiguous and stored in acc_t,
// else converted into buf. (float64 is never read into float: the glue refuses that mix.)
template <class acc_t>
Loaded<acc_t> load(const Operand& op, int64_t off, int64_t stride, int64_t n, acc_t* buf) {
  if (stride == 0) return {nullptr, true, read_one<acc_t>(op, off)};
  Loaded<acc_t> out{nullptr, true, 0};
  for_dtype(op.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    if constexpr (!std::is_same_v<T, double> || std::is_same_v<acc_t, double>) {
      const T* p = static_cast<const T*>(op.data) + off;
      if constexpr (std::is_same_v<T, acc_t>) {
        if (stride == 1) {
          out = {p, false, 0};
          return;
        }
      }
      convert_in(p, stride, n, buf);
      out = {buf, false, 0};
    }
  });
  return out;
}

template <class acc_t, class dst_t>
void store_typed(const acc_t* v, dst_t* p, int64_t stride, int64_t n, bool accumulate) {
  if (accumulate && stride == 1) {  // partial sums (double on the CPU): a per-feature gradient, vectorised
    dst_t* __restrict out = p;
    const acc_t* __restrict in = v;
    for (int64_t i = 0; i < n; ++i) out[i] += static_cast<dst_t>(in[i]);
  } else if (accumulate) {
    for (int64_t i = 0; i < n; ++i) p[i * stride] += static_cast<dst_t>(v[i]);
  } else if (stride != 1 || static_cast<const void*>(v) != static_cast<const void*>(p)) {
    convert_out(v, n, p, stride);  // (nothing when the values were computed in place)
  }
}

template <class acc_t>
void store(const Operand& op, int64_t off, int64_t stride, int64_t n, const acc_t* v) {
  for_dtype(op.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    store_typed(v, static_cast<T*>(op.data) + off, stride, n, op.accumulate);
  });
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

// ---- contiguous, and in runs (the sampler's inputs and gradients, the flat row engine) ---------------
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
template <class acc_t>
void store_contiguous(DType dtype, void* base, int64_t off, int64_t n, const acc_t* src) {
  Operand op;
  op.data = base;
  op.dtype = dtype;
  if (output_target<acc_t>(op, off, 1, nullptr) != src) store<acc_t>(op, off, 1, n, src);
}

// n logical elements [c, c + n) of a tensor read in place through its runs (a sampler input, mu or
// logvar: core/launch_args.h's SampleArgs) in acc_t: the tensor itself when they lie in one run stored
// in acc_t, else gathered run by run into `buf`.
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

// ---- by dtype and base pointer (the mixture of logistics' fixed-size pixel chunks) --------------
// n values at base[off + i * stride] into dst[0, n), dst[n, width) = 0 (benign padding lanes).
template <class acc_t>
void gather_padded(DType dt, const void* base, int64_t off, int64_t stride, int n, int width, acc_t* dst) {
  for_dtype(dt, [&](auto t) {
    using T = typename decltype(t)::type;
    convert_in(static_cast<const T*>(base) + off, stride, n, dst);
  });
  for (int i = n; i < width; ++i) dst[i] = acc_t(0);
}
template <class acc_t>
void scatter(const acc_t* src, int n, DType dt, void* base, int64_t off, int64_t stride) {
  for_dtype(dt, [&](auto t) {
    using T = typename decltype(t)::type;
    convert_out(src, n, static_cast<T*>(base) + off, stride);
  });
}

}  // namespace cpu
VF_ISA_NS_END
}  // namespace vae_fast
