// Reparameterised sampling (vae_fast::sample_gaussian, its backward) and the key of a sampling call
// (vae_fast::draw_seed): ops of their own, not table rows (schemas.cpp says why).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <optional>
#include <vector>

namespace vae_fast {

// The key of a sampling call given none: seed_value on the CPU, a device `seed` tensor elsewhere.
void draw_seed(const at::Device& device, at::Tensor& seed, std::optional<int64_t>& seed_value);
// Draws the key (draw_seed) when a sampling call was given none, on real tensors only (sample_ops.cpp says when).
void draw_seed_if_none(const at::Tensor& like, at::Tensor& seed, std::optional<int64_t>& seed_value);

// check_op's sample_gaussian: the eager call's checks, `args` in its schema's order (nothing is drawn).
void check_sample_gaussian(const std::vector<c10::IValue>& args);

}  // namespace vae_fast
