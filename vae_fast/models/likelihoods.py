"""Observation models p(x|z): every likelihood the VAE knows, each defined once, here.

A likelihood says what the decoder outputs for one example, how that output becomes the distribution's
parameters, how data are scored (a fused op, summed over the example's ``event_dims``), the distribution's mean
and a draw from it, and how it reads image data: in which range (``data_range``) and what 8-bit data become
(``eight_bit``: binarised for the Bernoulli, dequantised for a continuous density, or read as levels by a
discrete distribution over the 256 values). The models (``mlp_vae``, ``conv_vae``), the trainer's data
preparation, ``evaluate``'s bits per dimension and the figures all read it from :data:`LIKELIHOODS`.

A new likelihood is one class here and its entry in :data:`LIKELIHOODS` (as the discretized mixture of
logistics, ``DiscretizedMixLogistic``); nothing outside this file names a likelihood's internals.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import bernoulli_log_prob, discretized_mix_logistic_log_prob, gaussian_log_prob, sample_discretized_mix_logistic

OBS_LOGVAR_MODES = ("scalar", "per_feature", "decoder")
EIGHT_BIT = ("binarize", "dequantize", "levels")
DATA_RANGES = {"unit": (0.0, 1.0), "signed": (-1.0, 1.0)}  # the ranges a likelihood can read data in


def bits_per_dim(log_px, num_dims: int, bin_width: float | None = None):
    """Bits per dimension of a log-likelihood ``log_px`` (nats, per example) of ``num_dims``-dimensional data.

    The convention of Theis, van den Oord & Bethge (2016, "A note on the evaluation of generative models"),
    used by PixelCNN, Real NVP, Glow and NVAE:

    - a discrete likelihood (``bin_width=None``: a Bernoulli on binary data, a distribution over the 8-bit
      levels), whose ``log_px`` is already the log-probability of the data's value:
      ``bits/dim = -log p(x) / (D ln 2)``;
    - a continuous density on quantised data, evaluated at uniformly dequantised points (each value spread
      uniformly over its bin, of width ``bin_width`` in the data's units: ``1/256`` for 8-bit data scaled to
      [0, 1]): the density times the bin's volume bounds the probability of the bin, so
      ``bits/dim = -(log p(x) + D log(bin_width)) / (D ln 2)``; for 8-bit data on [0, 1] that is
      ``8 - log p(x) / (D ln 2)``, and the uniform density on [0, 1]^D (log p = 0) scores exactly 8.

    Works on floats and tensors alike (elementwise).
    """
    if not isinstance(num_dims, int) or isinstance(num_dims, bool) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
    if bin_width is not None and not (isinstance(bin_width, (int, float)) and 0 < bin_width < math.inf):
        raise ValueError(f"bin_width must be a positive number or None (a discrete likelihood), got {bin_width!r}")
    log_bin = 0.0 if bin_width is None else math.log(bin_width)
    return -(log_px + num_dims * log_bin) / (num_dims * math.log(2.0))


class Likelihood:
    """The interface; see the module's docstring."""

    name = ""
    data_range = "unit"  # the range the model reads data in: a key of DATA_RANGES
    eight_bit = "dequantize"  # what 8-bit data become for it: one of EIGHT_BIT

    def setup(self, vae, obs_logvar) -> None:
        """Register this likelihood's parameters and buffers on ``vae`` (their names are in saved runs)."""

    def decoder_shape(self, event_shape: tuple, param_dim: int, obs_logvar=None) -> tuple:
        """The decoder's output for one example, whose data have shape ``event_shape``; several parameter
        tensors are stacked on dimension ``param_dim`` (negative, counted from the end)."""
        return tuple(event_shape)

    def params(self, vae, out):
        """The decoder's output as the distribution's parameters."""
        return out

    def log_prob(self, x, params, event_dims: int) -> torch.Tensor:
        raise NotImplementedError

    def output(self, params, mean: bool) -> torch.Tensor:
        """The distribution's mean, or a draw from it, shaped like the data."""
        raise NotImplementedError

    def bin_width(self, levels: int | None, binarized: bool) -> tuple[bool, float | None]:
        """``(applies, bin_width)`` for :func:`bits_per_dim` on data with ``levels`` values per dimension (256
        for 8-bit images; None for data that are not quantised that way) that were binarised or not."""
        return False, None


class Bernoulli(Likelihood):
    """p(x|z) = prod Bernoulli(x; sigmoid(logits)); the decoder outputs logits shaped like the data."""

    name = "bernoulli"
    eight_bit = "binarize"

    def log_prob(self, x, params, event_dims):
        return bernoulli_log_prob(x, params, event_dims=event_dims)

    def output(self, params, mean):
        probs = torch.sigmoid(params)
        return probs if mean else torch.bernoulli(probs)

    def bin_width(self, levels, binarized):
        # A log-probability of binary data; of grey values (not binarised) the "log-likelihood" is no probability.
        return binarized, None


class Gaussian(Likelihood):
    """p(x|z) = N(x; mean, diag(exp(logvar))): the decoder outputs the mean, and with ``obs_logvar="decoder"``
    the log-variance too (stacked after the mean on the VAE's ``param_dim``); otherwise the log-variance is
    one learned value (``"scalar"``), learned per feature (``"per_feature"``) or a fixed number. Learned and
    predicted ones are floored smoothly at the VAE's ``min_obs_logvar``."""

    name = "gaussian"
    eight_bit = "dequantize"

    def setup(self, vae, obs_logvar):
        vae.obs_logvar_mode = "fixed" if isinstance(obs_logvar, (int, float)) else obs_logvar
        if vae.obs_logvar_mode == "fixed":
            vae.register_buffer("obs_logvar_fixed", torch.tensor(float(obs_logvar)))
        elif vae.obs_logvar_mode in ("scalar", "per_feature"):
            shape = () if vae.obs_logvar_mode == "scalar" else vae._example_shape()
            # The inverse of the smooth floor at 0, so the learned log-variance starts at exactly 0.
            start = vae.min_obs_logvar + math.log(math.expm1(-vae.min_obs_logvar))
            vae.obs_logvar_raw = torch.nn.Parameter(torch.full(shape, start))

    def decoder_shape(self, event_shape, param_dim, obs_logvar=None):
        shape = list(event_shape)
        if obs_logvar == "decoder":
            shape[param_dim] *= 2  # mean, then logvar
        return tuple(shape)

    def params(self, vae, out):
        if vae.obs_logvar_mode == "decoder":
            mean, raw = out.chunk(2, dim=vae.param_dim)
            return mean, floor_logvar(raw, vae.min_obs_logvar)
        return out, vae.observation_logvar()

    def log_prob(self, x, params, event_dims):
        mean, logvar = params
        return gaussian_log_prob(x, mean, logvar, event_dims=event_dims)

    def output(self, params, mean):
        loc, logvar = params
        return loc if mean else loc + torch.exp(0.5 * logvar) * torch.randn_like(loc)

    def bin_width(self, levels, binarized):
        if levels is None:
            return False, None
        low, high = DATA_RANGES[self.data_range]
        return True, (high - low) / levels


class DiscretizedMixLogistic(Likelihood):
    """PixelCNN++'s discretized mixture of logistics (Salimans et al. 2017) over the 256 levels of 8-bit images
    read in [-1, 1], with C = 1 or 3 channels (the colour channels' means autoregressive): the likelihood of
    PixelCNN++, VDVAE and NVAE, fused (``vf.discretized_mix_logistic_log_prob``). The decoder outputs
    ``M (1 + 2C + C(C-1)/2)`` maps per pixel in the op's ``channels_first`` order, M = ``components`` (10, as
    PixelCNN++ and VDVAE). A discrete distribution: its log-likelihood is a log-probability of the 8-bit values,
    so no dequantisation and no bin width in bits per dimension."""

    name = "dmol"
    data_range = "signed"
    eight_bit = "levels"
    components = 10

    def decoder_shape(self, event_shape, param_dim, obs_logvar=None):
        if len(event_shape) != 3 or param_dim != -3 or event_shape[0] not in (1, 3):
            raise ValueError(f"likelihood 'dmol' models images (C, H, W) with C = 1 or 3 (a conv model), got data "
                             f"of shape {tuple(event_shape)}")
        c, h, w = event_shape
        return (self.components * (1 + 2 * c + c * (c - 1) // 2), h, w)

    def log_prob(self, x, params, event_dims):
        return discretized_mix_logistic_log_prob(x, params, event_dims=event_dims)

    @staticmethod
    def _channels(params) -> int:
        per_component = params.shape[-3] // DiscretizedMixLogistic.components
        return 1 if per_component == 3 else 3

    def output(self, params, mean):
        channels = self._channels(params)
        if not mean:
            return sample_discretized_mix_logistic(params, channels=channels)
        # The mixture's mean, each component's channel means coupled through the means of the channels before
        # (clamped to [-1, 1]; the discretisation's effect on the mean is left out: a figure's reconstruction).
        m = self.components
        logits, rest = params[..., :m, :, :], params[..., m:, :, :]
        means = rest[..., :channels * m, :, :].unflatten(-3, (channels, m))
        weights = torch.softmax(logits, dim=-3)
        if channels == 3:
            c = torch.tanh(rest[..., 2 * channels * m:, :, :]).unflatten(-3, (3, m))
            r = means[..., 0, :, :, :]
            g = means[..., 1, :, :, :] + c[..., 0, :, :, :] * r
            b = means[..., 2, :, :, :] + c[..., 1, :, :, :] * r + c[..., 2, :, :, :] * g
            means = torch.stack((r, g, b), dim=-4)
        return (weights.unsqueeze(-4) * means).sum(-3).clamp(-1.0, 1.0)

    def bin_width(self, levels, binarized):
        return levels == 256, None


def floor_logvar(raw: torch.Tensor, floor: float) -> torch.Tensor:
    """``floor + softplus(raw - floor)``: smooth, so the gradient never vanishes and a value pushed to the
    floor can come back up."""
    return floor + F.softplus(raw - floor)


# The one table of likelihoods: the CLI's --likelihood choices, the models' and the trainer's.
LIKELIHOODS: dict[str, Likelihood] = {lik.name: lik for lik in (Bernoulli(), Gaussian(), DiscretizedMixLogistic())}


def get(name) -> Likelihood:
    """The likelihood called ``name``; ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {tuple(LIKELIHOODS)}, got {name!r}")
    return LIKELIHOODS[name]
