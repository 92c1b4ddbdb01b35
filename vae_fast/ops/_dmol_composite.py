"""The discretized mixture of logistics in plain PyTorch: the exact composite formula (the tests' float64
oracle and the double backward's formula) and PixelCNN++'s eager formula as its users run it (the benchmark baseline).

Layouts (see vae_fast.ops.dmol): "channels_first": x (..., C, H, W), params (..., P, H, W) with the P axis
[logits (M) | means (C x M) | log-scales (C x M) | coeffs (C(C-1)/2 x M)]; "pixelcnn++": x (..., H, W, C),
params (..., H, W, P) with the P axis [logits (M) | per channel: means (M), log-scales (M), coeffs (M)].
P = M * (1 + 2C + C(C-1)/2).
"""

from __future__ import annotations

import math

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
# PixelCNN++'s loss as its users run it (Salimans et al. 2017; VDVAE and most PixelCNN++ ports compute the
# same operations), written here from the paper's formula: the benchmarks' eager baseline. What makes it the
# baseline is kept: x repeated over the M components into a (B, H, W, C, M) tensor, every intermediate of that
# size materialised, the edge levels and the 1e-5 switch (below it the bin-centre density stands in for the
# bin probability) as float masks, and the max-shifted log-softmax and log-sum-exp spelled out.
# Inputs: x (B, C, H, W) in [-1, 1], params (B, P, H, W) with the P axis in PixelCNN++'s order; C = 1 or 3.
# ------------------------------------------------------------------------------------------------
def pixelcnn_pp_log_prob(x, params, num_bits: int = 8):
    """log p(x) per example, (B,), by PixelCNN++'s eager formula (its 1- and 3-channel losses in one)."""
    half_levels = (2 ** num_bits - 1) / 2.0  # the bin half-width is 1 / (2 half_levels)
    x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    p = params.permute(0, 2, 3, 1)  # (B, H, W, P)
    B, H, W, C = x.shape
    M = p.shape[-1] // params_per_mixture(C)
    logits = p[..., :M]
    per_channel = p[..., M:].contiguous().view(B, H, W, C, -1)  # channel c: [means | log-scales | coeffs] (M each)
    means = per_channel[..., :M]
    log_scales = torch.clamp(per_channel[..., M:2 * M], min=LOG_SCALE_MIN)
    x = x.contiguous().unsqueeze(-1) + torch.zeros(B, H, W, C, M, dtype=x.dtype, device=x.device)
    if C == 3:  # green's and blue's means move with the channels before them
        coeffs = torch.tanh(per_channel[..., 2 * M:3 * M])
        green = means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]
        blue = means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]
        means = torch.stack((means[..., 0, :], green, blue), dim=3)

    centred = x - means
    inv_scale = torch.exp(-log_scales)
    upper = inv_scale * (centred + 1.0 / (2 * half_levels))  # the bin's edges, standardised
    lower = inv_scale * (centred - 1.0 / (2 * half_levels))
    bin_prob = torch.sigmoid(upper) - torch.sigmoid(lower)
    log_below_upper = upper - F.softplus(upper)  # log sigmoid(upper): the lowest level's bin reaches -inf
    log_above_lower = -F.softplus(lower)  # log (1 - sigmoid(lower)): the highest level's reaches +inf
    mid = inv_scale * centred
    log_density_mid = mid - log_scales - 2.0 * F.softplus(mid)
    wide = (bin_prob > 1e-5).float()
    log_bin = wide * torch.log(torch.clamp(bin_prob, min=1e-12)) + (1.0 - wide) * (log_density_mid - math.log(half_levels))
    top = (x > 0.999).float()
    log_bin = top * log_above_lower + (1.0 - top) * log_bin
    bottom = (x < -0.999).float()
    log_bin = bottom * log_below_upper + (1.0 - bottom) * log_bin

    top_logit = logits.amax(-1, keepdim=True)
    log_weights = logits - top_logit - torch.log(torch.exp(logits - top_logit).sum(-1, keepdim=True))
    log_joint = log_bin.sum(3) + log_weights  # (B, H, W, M)
    top_joint = log_joint.amax(-1, keepdim=True)
    return (top_joint.squeeze(-1) + torch.log(torch.exp(log_joint - top_joint).sum(-1))).sum((1, 2))
