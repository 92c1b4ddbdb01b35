"""The discretized mixture of logistics in plain PyTorch: the exact composite formula (the tests' float64
oracle and the double backward's formula) and PixelCNN++'s original eager formula (the benchmark baseline).

Layouts (see vae_fast.dmol): "channels_first": x (..., C, H, W), params (..., P, H, W) with the P axis
[logits (M) | means (C x M) | log-scales (C x M) | coeffs (C(C-1)/2 x M)]; "pixelcnn++": x (..., H, W, C),
params (..., H, W, P) with the P axis [logits (M) | per channel: means (M), log-scales (M), coeffs (M)].
P = M * (1 + 2C + C(C-1)/2).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LOG_SCALE_MIN = -7.0
_LN2 = math.log(2.0)
_SMALL_D = 2.0 ** -20

LAYOUTS = ("channels_first", "pixelcnn++")


def params_per_mixture(channels: int) -> int:
    return 1 + 2 * channels + channels * (channels - 1) // 2


def split_params(params: torch.Tensor, channels: int, layout: str):
    """(logits (..., H, W, M), means (..., H, W, C, M), raw log-scales (..., H, W, C, M), raw coeffs
    (..., H, W, 3, M) for C = 3 else None), the coefficient j of channel-major index j (c0, c1, c2)."""
    C = channels
    p = params.movedim(-3, -1) if layout == "channels_first" else params
    M = p.shape[-1] // params_per_mixture(C)
    logits = p[..., :M]
    if layout == "channels_first":
        means = p[..., M:M + C * M].unflatten(-1, (C, M))
        log_scales = p[..., M + C * M:M + 2 * C * M].unflatten(-1, (C, M))
        coeffs = p[..., M + 2 * C * M:].unflatten(-1, (3, M)) if C == 3 else None
    else:
        rest = p[..., M:].unflatten(-1, (C, (3 if C == 3 else 2) * M))
        means, log_scales = rest[..., :M], rest[..., M:2 * M]
        coeffs = rest[..., 2 * M:] if C == 3 else None
    return logits, means, log_scales, coeffs


def pixels_last(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x as (..., H, W, C)."""
    return x.movedim(-3, -1) if layout == "channels_first" else x


def _log1mexp(d: torch.Tensor, log_d: torch.Tensor) -> torch.Tensor:
    """log(1 - e^-d) for d > 0 given log d, exact in every regime; each branch's argument kept where it is
    finite (so no NaN gradient leaks through torch.where)."""
    small = d < _SMALL_D
    below_ln2 = d < _LN2
    d_mid = torch.where(small, torch.ones_like(d), d)
    d_big = torch.where(below_ln2, torch.ones_like(d), d)
    return torch.where(small, log_d - 0.5 * d,
                       torch.where(below_ln2, torch.log(-torch.expm1(-d_mid)), torch.log1p(-torch.exp(-d_big))))


def channel_terms(x, params, num_bits: int, layout: str):
    """Per pixel, channel and component: (f (..., H, W, C, M), logits (..., H, W, M)) -- f the log-probability
    of x's bin under that channel's logistic (coupled means for C = 3), exact in every regime."""
    xl = pixels_last(x, layout)
    C = xl.shape[-1]
    logits, means, log_scales, coeffs = split_params(params, C, layout)
    xc = xl.unsqueeze(-1)  # (..., H, W, C, 1)
    if C == 3:
        t = torch.tanh(coeffs)
        x0, x1 = xc[..., 0, :], xc[..., 1, :]
        means = torch.stack(torch.broadcast_tensors(means[..., 0, :], means[..., 1, :] + t[..., 0, :] * x0,
                                                    means[..., 2, :] + t[..., 1, :] * x0 + t[..., 2, :] * x1), dim=-2)
    ls = torch.clamp(log_scales, min=LOG_SCALE_MIN)
    hw = 1.0 / (2 ** num_bits - 1)
    u = xc - means
    inv_s = torch.exp(-ls)
    a, b = (u + hw) * inv_s, (u - hw) * inv_s
    d = (2.0 * hw) * inv_s
    la, lnb = F.logsigmoid(a), F.logsigmoid(-b)
    mid = _log1mexp(d, math.log(2.0 * hw) - ls) + la + lnb
    f = torch.where(xc < -1.0 + hw, la, torch.where(xc > 1.0 - hw, lnb, mid))
    return f, logits


def log_prob_pixels(x, params, num_bits: int = 8, layout: str = "channels_first") -> torch.Tensor:
    """log p(x) per pixel, (..., H, W) (x broadcast against params' leading dims)."""
    f, logits = channel_terms(x, params, num_bits, layout)
    return torch.logsumexp(torch.log_softmax(logits, dim=-1) + f.sum(-2), dim=-1)


def dmol_log_prob(x, params, num_bits: int = 8, layout: str = "channels_first", event_dims: int = 3):
    """The fused op's value: log p(x) summed over x's trailing `event_dims` (3 for channels_first; 1, 2 or 3 for
    pixelcnn++ -- the channels are always summed)."""
    if isinstance(layout, int):
        layout = LAYOUTS[layout]
    lp = log_prob_pixels(x, params, num_bits, layout)
    if event_dims == 1:
        return lp
    if event_dims == 2:
        return lp.sum(-1)
    return lp.sum((-2, -1))


def mixture_bin_probs(params, num_bits: int, layout: str = "channels_first") -> torch.Tensor:
    """C = 1: the exact probability of each of the 2^bits levels per pixel, (..., H, W, 2^bits) (float64)."""
    levels = 2 ** num_bits
    p = params.double()
    xs = torch.linspace(-1.0, 1.0, levels, dtype=torch.float64).view(levels, *([1] * p.dim()))
    lp = log_prob_pixels(xs, p.unsqueeze(0), num_bits, layout)  # (levels, ..., H, W)
    return lp.exp().movedim(0, -1)


# ------------------------------------------------------------------------------------------------
# PixelCNN++'s formula as published (Salimans et al.'s TensorFlow code, in the widely used PyTorch port
# pytorch-pixelcnn/utils.py), with the bin width made a parameter (it hard-codes 8 bits: 1/255 and 127.5).
# Inputs as there: x (B, C, H, W) in [-1, 1], l (B, P, H, W) with the P axis in PixelCNN++'s order; both
# permuted to (B, H, W, .) inside. Returns log p(x) per example (the port returns -sum over the batch).
# Its switch: where the bin probability is below 1e-5 it takes the bin-centre density instead.
# ------------------------------------------------------------------------------------------------
def _log_sum_exp(x):
    axis = len(x.size()) - 1
    m, _ = torch.max(x, dim=axis)
    m2, _ = torch.max(x, dim=axis, keepdim=True)
    return m + torch.log(torch.sum(torch.exp(x - m2), dim=axis))


def _log_prob_from_logits(x):
    axis = len(x.size()) - 1
    m, _ = torch.max(x, dim=axis, keepdim=True)
    return x - m - torch.log(torch.sum(torch.exp(x - m), dim=axis, keepdim=True))


def _pixelcnn_pp_mixture(x, means, log_scales, logit_probs, half_levels):
    """The part PixelCNN++'s two losses share: each channel's bin log-probability (its 1e-5 switch to the
    bin-centre density included), summed over channels, mixed over components, summed over pixels: (B,)."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1. / (2 * half_levels))
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - 1. / (2 * half_levels))
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2. * F.softplus(mid_in)
    inner_inner_cond = (cdf_delta > 1e-5).float()
    inner_inner_out = inner_inner_cond * torch.log(torch.clamp(cdf_delta, min=1e-12)) + \
        (1. - inner_inner_cond) * (log_pdf_mid - np.log(half_levels))
    inner_cond = (x > 0.999).float()
    inner_out = inner_cond * log_one_minus_cdf_min + (1. - inner_cond) * inner_inner_out
    cond = (x < -0.999).float()
    log_probs = cond * log_cdf_plus + (1. - cond) * inner_out
    log_probs = torch.sum(log_probs, dim=3) + _log_prob_from_logits(logit_probs)
    return _log_sum_exp(log_probs).sum((1, 2))


def pixelcnn_pp_log_prob(x, l, num_bits: int = 8):
    """PixelCNN++'s discretized_mix_logistic_loss (3 channels), per example: (B,)."""
    half_levels = (2 ** num_bits - 1) / 2.0
    x = x.permute(0, 2, 3, 1)
    l = l.permute(0, 2, 3, 1)
    xs = [int(y) for y in x.size()]
    ls = [int(y) for y in l.size()]
    nr_mix = int(ls[-1] / 10)
    logit_probs = l[:, :, :, :nr_mix]
    l = l[:, :, :, nr_mix:].contiguous().view(xs + [nr_mix * 3])
    means = l[:, :, :, :, :nr_mix]
    log_scales = torch.clamp(l[:, :, :, :, nr_mix:2 * nr_mix], min=-7.)
    coeffs = torch.tanh(l[:, :, :, :, 2 * nr_mix:3 * nr_mix])
    x = x.contiguous()
    x = x.unsqueeze(-1) + torch.zeros(xs + [nr_mix], device=x.device, dtype=x.dtype)
    m2 = (means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * x[:, :, :, 0, :]).view(xs[0], xs[1], xs[2], 1, nr_mix)
    m3 = (means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * x[:, :, :, 0, :] +
          coeffs[:, :, :, 2, :] * x[:, :, :, 1, :]).view(xs[0], xs[1], xs[2], 1, nr_mix)
    means = torch.cat((means[:, :, :, 0, :].unsqueeze(3), m2, m3), dim=3)
    return _pixelcnn_pp_mixture(x, means, log_scales, logit_probs, half_levels)


def pixelcnn_pp_log_prob_1d(x, l, num_bits: int = 8):
    """PixelCNN++'s 1-channel discretized_mix_logistic_loss_1d, per example: (B,)."""
    half_levels = (2 ** num_bits - 1) / 2.0
    x = x.permute(0, 2, 3, 1)
    l = l.permute(0, 2, 3, 1)
    xs = [int(y) for y in x.size()]
    ls = [int(y) for y in l.size()]
    nr_mix = int(ls[-1] / 3)
    logit_probs = l[:, :, :, :nr_mix]
    l = l[:, :, :, nr_mix:].contiguous().view(xs + [nr_mix * 2])
    means = l[:, :, :, :, :nr_mix]
    log_scales = torch.clamp(l[:, :, :, :, nr_mix:2 * nr_mix], min=-7.)
    x = x.contiguous()
    x = x.unsqueeze(-1) + torch.zeros(xs + [nr_mix], device=x.device, dtype=x.dtype)
    return _pixelcnn_pp_mixture(x, means, log_scales, logit_probs, half_levels)
