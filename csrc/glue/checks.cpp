// The argument checks every op runs before a kernel (glue/checks.h), the clamps' parsing and rounding,
// and the data-off-support report.
#include "glue/checks.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "glue/cuda_launch.h"

namespace vae_fast {

// ------------------------------------------------------------------------------------------------
// Checks: every one runs before a kernel, and names the argument and what was expected.
// ------------------------------------------------------------------------------------------------
std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "vae_fast: `", name, "` must be a tensor, got None");
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "vae_fast: `", name, "` must be float32, float64, float16 or bfloat16, got ", st);
}

}  // namespace

DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: return DType::Float32;
  }
}

at::ScalarType check_args(c10::ArrayRef<NamedTensor> args) {
  bool any64 = false, all64 = true;
  for (const auto& a : args) {
    check_float(a.tensor, a.name);
    bool is64 = a.tensor.scalar_type() == at::kDouble;
    any64 |= is64;
    all64 &= is64;
  }
  if (any64 && !all64) {
    std::ostringstream os;
    for (size_t i = 0; i < args.size(); ++i)
      os << (i ? ", " : "") << args[i].name << "=" << args[i].tensor.scalar_type();
    TORCH_CHECK_TYPE(false, "vae_fast: float64 cannot be mixed with other dtypes (got ", os.str(),
                     "); cast all arguments to float64, or none");
  }
  const auto device = args[0].tensor.device();
  for (const auto& a : args) {
    TORCH_CHECK_VALUE(a.tensor.device() == device, "vae_fast: all arguments must be on one device, but `",
                      args[0].name, "` is on ", device, " and `", a.name, "` is on ", a.tensor.device());
  }
  if (device.is_meta()) return any64 ? at::kDouble : at::kFloat;  // shapes only (torch.compile's fake tensors)
  if (device.is_cuda()) {
    TORCH_CHECK(cuda_available(), "vae_fast: `", args[0].name,
                "` is a CUDA tensor but this build of vae_fast has no CUDA kernels (rebuild with a CUDA "
                "build of torch and nvcc on the PATH)");
  } else {
    TORCH_CHECK(device.is_cpu(), "vae_fast: `", args[0].name, "` is on ", device, "; only CPU and CUDA are supported");
  }
  return any64 ? at::kDouble : at::kFloat;
}

Dims broadcast_shape(c10::ArrayRef<NamedTensor> args) {
  Dims shape;
  for (const auto& a : args) {
    auto s = a.tensor.sizes();
    Dims out(std::max(shape.size(), s.size()), 1);
    for (size_t i = 0; i < out.size(); ++i) {
      int64_t x = i < out.size() - shape.size() ? 1 : shape[i - (out.size() - shape.size())];
      int64_t y = i < out.size() - s.size() ? 1 : s[i - (out.size() - s.size())];
      if (x != y && x != 1 && y != 1) {
        std::ostringstream os;
        for (size_t j = 0; j < args.size(); ++j)
          os << (j ? ", " : "") << args[j].name << " " << shape_str(args[j].tensor.sizes());
        TORCH_CHECK_VALUE(false, "vae_fast: the shapes of ", os.str(), " do not broadcast (`", a.name,
                          "` disagrees in dimension ", static_cast<int64_t>(i) - static_cast<int64_t>(out.size()),
                          ")");
      }
      out[i] = x == 1 ? y : x;
    }
    shape = out;
  }
  return shape;
}

void check_event_dims(int64_t event_dims, int64_t ndim, const char* what) {
  TORCH_CHECK_VALUE(event_dims >= 0 && event_dims <= ndim, "vae_fast: event_dims must be in [0, ", ndim,
                    "] for ", what, " with ", ndim, " dimensions, got ", event_dims);
}

// The clamp's bounds rounded to the dtype of the input they apply to, as torch.clamp compares them: a
// bfloat16 logvar of 0.69921875 lies inside (0.7, hi), since 0.7 is 0.69921875 in bfloat16.
Clamp in_dtype(Clamp c, at::ScalarType t) {
  auto round = [t](double v) {
    switch (t) {
      case at::kFloat: return static_cast<double>(static_cast<float>(v));
      case at::kHalf: return static_cast<double>(static_cast<float>(c10::Half(static_cast<float>(v))));
      case at::kBFloat16: return static_cast<double>(static_cast<float>(c10::BFloat16(static_cast<float>(v))));
      default: return v;
    }
  };
  if (c.on) c.lo = round(c.lo), c.hi = round(c.hi);
  return c;
}

Clamp parse_clamp(const std::optional<c10::ArrayRef<double>>& clamp, const char* name) {
  Clamp c;
  if (!clamp) return c;
  TORCH_CHECK_VALUE(clamp->size() == 2, "vae_fast: `", name, "` must be (low, high), got ", clamp->size(), " values");
  c.on = true;
  c.lo = (*clamp)[0];
  c.hi = (*clamp)[1];
  TORCH_CHECK_VALUE(c.lo <= c.hi, "vae_fast: `", name, "` must be (low, high) with low <= high, got (", c.lo, ", ",
                    c.hi, ")");
  return c;
}

at::Tensor concat_buffer(const at::Tensor& a, const at::Tensor& b, int64_t dim) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "vae_fast: concat_dim needs two arguments of one shape, got ",
                    shape_str(a.sizes()), " and ", shape_str(b.sizes()));
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "vae_fast: concat_dim needs two arguments of one dtype, got ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.dim() > 0 && dim >= -a.dim() && dim < a.dim(), "vae_fast: concat_dim ", dim,
                    " is out of range for arguments of shape ", shape_str(a.sizes()));
  Dims sizes(a.sizes().begin(), a.sizes().end());
  sizes[c10::maybe_wrap_dim(dim, a.dim())] *= 2;
  return at::empty(sizes, a.options().memory_format(at::MemoryFormat::Contiguous));
}

bool any_nan(const at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble));
  const int64_t n = out.numel();
  bool nan = false;
  if (out.scalar_type() == at::kFloat) {
    const float* p = out.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) nan |= std::isnan(p[i]);
  } else {
    const double* p = out.const_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) nan |= std::isnan(p[i]);
  }
  return nan;
}

std::string data_range_report(const at::Tensor& x, double low, double high) {
  const at::Tensor v = x.detach().to(at::kDouble);
  const at::Tensor finite = at::isfinite(v);
  const int64_t outside = (at::logical_not(finite) | (v < low) | (v > high)).sum().item<int64_t>();
  if (outside == 0) return "";
  std::ostringstream os;
  os.precision(9);
  const at::Tensor kept = v.masked_select(at::logical_not(at::isnan(v)));
  os << "got values in [";
  if (kept.numel() > 0) {
    os << kept.min().item<double>() << ", " << kept.max().item<double>();
  } else {
    os << "nan, nan";
  }
  os << "] (" << outside << " of " << v.numel() << " outside [" << low << ", " << high << "] or not finite)";
  return os.str();
}

}  // namespace vae_fast
