"""The discretized mixture of logistics (PixelCNN++'s likelihood, Salimans et al. 2017), fused.

``discretized_mix_logistic_log_prob(x, params)`` is log p(x) of 2^num_bits-level data x in [-1, 1] under a
mixture of M discretized logistics per pixel (C = 1 or 3 channels, the 3 channels' means autoregressive),
computed exactly in every regime (no switch to the bin-centre density), with analytic gradients fused with
the mixture responsibilities: one pass over x and params forward, one backward, nothing of size
(B, H, W, C, M) stored. ``sample_discretized_mix_logistic(params)`` draws data from it (in-kernel Philox).

Layouts (P = M * (1 + 2C + C(C-1)/2)):
  * ``"channels_first"``: x (..., C, H, W), params (..., P, H, W), the P axis
    [logits (M) | means (C x M, channel-major) | log-scales (C x M) | coeffs (C(C-1)/2 x M)];
  * ``"pixelcnn++"``: x (..., H, W, C), params (..., H, W, P) exactly as PixelCNN++ / VDVAE: M logits, then
    per channel [means (M), log-scales (M), raw coeffs (M)].
Any strides are read in place (channels_last, chunks, permuted views). x may broadcast against params'
leading dims (x (B, C, H, W) against params (K, B, P, H, W) for K samples).
"""

from __future__ import annotations

import torch

from ._args import OPS, require_int, require_tensor, seed_args

_LAYOUT_IDS = {"channels_first": 0, "pixelcnn++": 1}


def _layout_id(fn: str, layout) -> int:
    if not isinstance(layout, str):
        raise TypeError(f"vae_fast.{fn}: layout must be 'channels_first' or 'pixelcnn++', got {type(layout).__name__}")
    if layout not in _LAYOUT_IDS:
        raise ValueError(f"vae_fast.{fn}: layout must be 'channels_first' or 'pixelcnn++', got {layout!r}")
    return _LAYOUT_IDS[layout]


def discretized_mix_logistic_log_prob(x, params, *, num_bits: int = 8, layout: str = "channels_first",
                                      event_dims: int = 3) -> torch.Tensor:
    """log p(x) under the discretized mixture of logistics with parameters `params`, summed over x's trailing
    `event_dims` dims.

    The channels are coupled, so they are always summed: layout "channels_first" takes event_dims=3 (per
    example, shape x.shape[:-3] broadcast with params'); "pixelcnn++" takes 1 (per pixel, (..., H, W)), 2 (per
    image row) or 3. For per-pixel values of channels-first tensors, pass x.permute(0, 2, 3, 1) with
    layout="pixelcnn++" (a view, read in place) and params in PixelCNN++'s order.

    Computed in float32 for float32/float16/bfloat16 inputs (float64 for float64); the result is float32
    (float64). Log-scales are clamped below at -7 (torch.clamp's gradient); mixtures of up to 32 components.
    """
    require_tensor("discretized_mix_logistic_log_prob", x=x, params=params)
    require_int("discretized_mix_logistic_log_prob", "num_bits", num_bits)
    require_int("discretized_mix_logistic_log_prob", "event_dims", event_dims)
    lid = _layout_id("discretized_mix_logistic_log_prob", layout)
    return OPS.dmol_log_prob(x, params, num_bits, lid, event_dims)


def sample_discretized_mix_logistic(params, *, channels: int = 3, layout: str = "channels_first", num_bits: int = 8,
                                    seed=None, generator=None) -> torch.Tensor:
    """Data drawn from the mixture: per pixel a component by Gumbel-max of the logits, then per channel in
    order a logistic draw m + s (log u - log(1 - u)) with the means coupled to the channels already drawn,
    clamped to [-1, 1] and rounded to the 2^num_bits levels. Shape x's for `layout` ((..., C, H, W) or
    (..., H, W, C)), params' dtype. `seed` (int or 1-element int64 tensor) or `generator` as in
    vae_fast.reparameterize; the uniforms come from the in-kernel Philox stream (the counter layout of
    csrc/core/launch_args.h's DmolArgs), so a seed gives the same samples on CPU and CUDA. No gradient."""
    require_tensor("sample_discretized_mix_logistic", params=params)
    require_int("sample_discretized_mix_logistic", "channels", channels)
    require_int("sample_discretized_mix_logistic", "num_bits", num_bits)
    lid = _layout_id("sample_discretized_mix_logistic", layout)
    seed_t, seed_v = seed_args("sample_discretized_mix_logistic", seed, generator, params)
    return OPS.sample_dmol(params, seed_t, seed_v, channels, num_bits, lid)

