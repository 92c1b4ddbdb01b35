// vae_fast._C: the op registrations (glue/schemas.cpp and the files it names, loaded with this module) and build information.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/python.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <atomic>
#include <cstdlib>

#include "cpu/kernels.h"
#include "glue/cuda_launch.h"
#include "glue/table_ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "vae_fast compiled kernels; the ops are registered as torch.ops.vae_fast.*";
  m.def(
      "check_op",
      [](const std::string& op, const py::list& args) {
        HANDLE_TH_ERRORS  // c10::ValueError / TypeError reach Python as ValueError / TypeError
        // The arguments as the op's schema types them (defaults where the list stops short).
        const auto& schema =
            c10::Dispatcher::singleton().findSchemaOrThrow(("vae_fast::" + op).c_str(), "").schema();
        std::vector<c10::IValue> values;
        for (size_t i = 0; i < schema.arguments().size(); ++i) {
          const auto& a = schema.arguments()[i];
          if (i < args.size()) {
            values.push_back(torch::jit::toIValue(args[i], a.type()));
          } else {
            TORCH_CHECK(a.default_value().has_value(), "vae_fast.check_op: ", op, " needs argument ", a.name());
            values.push_back(*a.default_value());
          }
        }
        vae_fast::check_op(op, values);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      "The checks an op's eager call makes, without running it (fake kernels): args in its schema's order.",
      py::arg("op"), py::arg("args"));
  m.def(
      "op_table",
      []() {
        py::list ops;
        for (int i = 0; i < vae_fast::kNumOps; ++i) {
          const auto& info = vae_fast::op_info(i);
          py::dict d;
          d["name"] = std::string(info.spec->name);
          d["api"] = std::string(info.spec->api);
          d["family"] = info.spec->family == vae_fast::Family::Rows ? "rows" : "dmol";
          d["tensors"] = std::vector<std::string>(info.tensor_names.begin(), info.tensor_names.end());
          d["params"] = std::vector<std::string>(info.param_names.begin(), info.param_names.end());
          d["clamps"] = std::vector<std::string>(info.clamp_names.begin(), info.clamp_names.end());
          d["pair"] = static_cast<int>(info.spec->pair);
          ops.append(d);
        }
        return ops;
      },
      "The ops of csrc/core/op_table.h: name, family, tensor / parameter / clamp argument names, gradient pair.");
  m.def(
      "any_negative",
      [](const at::Tensor& t) {
        HANDLE_TH_ERRORS  // gaussian_nll_loss's eager negative-var check on the CPU: a plain loop, no op
        TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_floating_point() && t.is_contiguous(),
                          "any_negative: a contiguous floating CPU tensor");
        std::atomic<bool> negative{false};
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "any_negative", [&] {
          const scalar_t* p = t.const_data_ptr<scalar_t>();
          // 64K elements per task (a compare is ~0.1 ns: smaller tasks do not pay for the fork)
          at::parallel_for(0, t.numel(), int64_t{1} << 16, [&](int64_t b, int64_t e) {
            int64_t negatives = 0;  // an integer count: the loop vectorises (NaN < 0 is false: not negative)
            for (int64_t i = b; i < e; ++i) negatives += static_cast<float>(p[i]) < 0.0f;
            if (negatives > 0) negative = true;
          });
        });
        return negative.load();
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
