// The discretized mixture of logistics' glue (dmol_ops.cpp): the op functions the schemas bind and the
// checks the fake kernels run (its CUDA launch wrappers: glue/cuda_launch.h).
#pragma once
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "core/launch_args.h"

namespace vae_fast {

// layout argument of the DMOL ops
constexpr int64_t kDmolChannelsFirst = 0;  // x (..., C, H, W), params (..., P, H, W)
constexpr int64_t kDmolPixelCnn = 1;       // x (..., H, W, C), params (..., H, W, P) (PixelCNN++ / VDVAE)

// dmol_log_prob(Tensor x, Tensor params, int num_bits, int layout, int event_dims) -> Tensor
at::Tensor dmol_log_prob(const at::Tensor& x, const at::Tensor& params, int64_t num_bits, int64_t layout,
                         int64_t event_dims);
// dmol_log_prob_backward(Tensor grad, Tensor x, Tensor params, int num_bits, int layout, int event_dims,
//                        bool[] needs) -> Tensor[]   ([dx, dparams], an empty tensor where not needed)
std::vector<at::Tensor> dmol_log_prob_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& params,
                                               int64_t num_bits, int64_t layout, int64_t event_dims,
                                               c10::List<bool> needs);
// sample_dmol(Tensor params, Tensor? seed, int? seed_value, int channels, int num_bits, int layout) -> Tensor
at::Tensor sample_dmol(const at::Tensor& params, const std::optional<at::Tensor>& seed,
                       std::optional<int64_t> seed_value, int64_t channels, int64_t num_bits, int64_t layout);
// The Autograd key of sample_dmol (no gradient; dmol_log_prob's is the op table's).
at::Tensor sample_dmol_autograd(const at::Tensor& params, const std::optional<at::Tensor>& seed,
                                std::optional<int64_t> seed_value, int64_t channels, int64_t num_bits, int64_t layout);

// The checks of an eager call, without running it (the fake kernels): op "dmol_log_prob" (x, params,
// num_bits, layout, event_dims) or "sample_dmol" (params, num_bits, layout, channels).
void check_dmol(const std::string& op, const std::optional<at::Tensor>& x, const at::Tensor& params,
                int64_t num_bits, int64_t layout, int64_t event_dims, int64_t channels);

}  // namespace vae_fast
