// vae_fast._C: the op registrations (ops.cpp, loaded with this module) and build information.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/python.h>
#include <ATen/Dispatch.h>
#include <torch/version.h>

#include <cstdlib>

#include "cpu/kernels.h"
#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "vae_fast compiled kernels; the ops are registered as torch.ops.vae_fast.*";
  m.def(
      "check_op",
      [](const std::string& op, const std::vector<std::optional<at::Tensor>>& tensors, int64_t event_dims,
         int64_t num_samples, bool sample_dim) {
        HANDLE_TH_ERRORS  // c10::ValueError / TypeError reach Python as ValueError / TypeError
        vae_fast::check_op(op, tensors, event_dims, num_samples, sample_dim);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      "The checks an op's eager call makes, without running it (fake kernels).",
        py::arg("op"), py::arg("tensors"), py::arg("event_dims"), py::arg("num_samples") = 1,
        py::arg("sample_dim") = false);
  m.def(
      "any_negative",
      [](const at::Tensor& t) {
        HANDLE_TH_ERRORS  // gaussian_nll_loss's eager negative-var check on the CPU: a plain loop, no op
        TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_floating_point(), "any_negative: a floating CPU tensor");
        const at::Tensor c = t.contiguous();
        int64_t negatives = 0;  // an integer count: the loop vectorises (NaN < 0 is false: not negative)
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "any_negative", [&] {
          const scalar_t* p = c.const_data_ptr<scalar_t>();
          for (int64_t i = 0, n = c.numel(); i < n; ++i) negatives += static_cast<float>(p[i]) < 0.0f;
        });
        return negatives > 0;
        END_HANDLE_TH_ERRORS_PYBIND
      },
      "True if a floating CPU tensor has a negative entry (NaN entries are not negative).");
  m.def(
      "build_info",
      []() {
        py::dict info;
        info["cpu_isas_built"] = std::string(vae_fast::cpu::built_isas());
        info["cpu_isa"] = std::string(vae_fast::cpu::kernels().isa);
        info["cuda"] = vae_fast::cuda_available();
        info["cuda_info"] = vae_fast::cuda_build_info();
        info["torch"] = std::string(TORCH_VERSION);
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        return info;
      },
      "What this build contains: CPU ISA variants, the variant in use (VAE_FAST_CPU_ISA may lower it), CUDA, "
      "the torch version it was built against.");
}
