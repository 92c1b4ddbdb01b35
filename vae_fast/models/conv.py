"""Convolutional VAEs for (C, H, W) images: :func:`conv_vae` builds the same :class:`~vae_fast.model.VAE` as
``mlp_vae``, so the ELBO, IWAE, log-likelihood, ``evaluate`` and active units work unchanged."""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from . import likelihoods
from .vae import VAE


class _ExpectImages(nn.Module):
    """Identity on ``(B, C, H, W)`` images of the model's shape; a ValueError naming ``x`` otherwise (instead of
    a convolution's shape error deep inside the encoder)."""

    def __init__(self, image_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = tuple(image_shape)

    def forward(self, x):
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            raise ValueError(f"x must be a batch of images of shape (B, {c}, {h}, {w}) for this model, "
                             f"got {tuple(x.shape)}")
        return x

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}"


def _check_image_shape(image_shape, stride: int) -> tuple[int, int, int]:
    ok = (isinstance(image_shape, (tuple, list)) and len(image_shape) == 3
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in image_shape))
    if not ok:
        raise ValueError(f"image_shape must be (C, H, W), three positive ints, got {image_shape!r}")
    c, h, w = image_shape
    if h % stride or w % stride:
        raise ValueError(f"image_shape {tuple(image_shape)}: H and W must be multiples of {stride} (the encoder "
                         f"halves them {int(math.log2(stride))} times), got H={h}, W={w}")
    return c, h, w


def conv_vae(
    image_shape: Sequence[int],
    latent_dim: int | None = None,
    *,
    latent_channels: int | None = None,
    likelihood: str = "bernoulli",
    channels: Sequence[int] = (32, 64),
    **kwargs,
) -> VAE:
    """A small convolutional VAE for ``(C, H, W)`` images (1x28x28, 3x32x32, 1x8x8, ...).

    The encoder halves H and W once per entry of ``channels`` (4x4 convolutions of stride 2, SiLU); the decoder
    mirrors it with transposed convolutions. The latent is either

    - ``latent_dim``: a flat vector (a linear layer from and to the last feature map), or
    - ``latent_channels``: a spatial latent ``(latent_channels, H / 2**n, W / 2**n)`` (3x3 convolutions from and
      to the last feature map; n = ``len(channels)``, so ``(C_z, H/4, W/4)`` by default), scored with
      ``event_dims=3`` by the fused ops.

    H and W must be multiples of ``2**len(channels)``. The decoder's last layer outputs what the likelihood
    needs per pixel (``likelihoods.py``): logits or a Gaussian mean, with ``obs_logvar="decoder"`` the
    log-variance too, stacked after the mean on the channel dimension. Further keyword arguments
    (``obs_logvar``, ``min_obs_logvar``) go to :class:`VAE`.
    """
    channels = tuple(channels)
    if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels):
        raise ValueError(f"channels must be one or more positive ints, got {channels!r}")
    c, h, w = _check_image_shape(image_shape, 2 ** len(channels))
    if (latent_dim is None) == (latent_channels is None):
        raise ValueError("conv_vae needs exactly one of latent_dim (a flat latent vector) and latent_channels "
                         f"(a spatial latent), got latent_dim={latent_dim!r}, latent_channels={latent_channels!r}")
    for name, v in (("latent_dim", latent_dim), ("latent_channels", latent_channels)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    lik = likelihoods.get(likelihood)
    out_shape = lik.decoder_shape((c, h, w), -3, kwargs.get("obs_logvar"))
    out_channels = out_shape[0]
    if tuple(out_shape[1:]) != (h, w):  # a likelihood whose parameters are not per pixel
        raise ValueError(f"likelihood {likelihood!r} asks the decoder for {out_shape}, not (channels, {h}, {w})")

    sh, sw = h >> len(channels), w >> len(channels)  # the last feature map's size
    top = channels[-1]
    down: list[nn.Module] = [_ExpectImages((c, h, w))]
    for c_in, c_out in zip((c, *channels[:-1]), channels):
        down += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
    up: list[nn.Module] = []
    for c_in, c_out in zip(channels[::-1], (*channels[::-1][1:], out_channels)):
        up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
    up.pop()  # no activation after the last layer: it outputs the likelihood's parameters

    if latent_channels is not None:
        latent = (latent_channels, sh, sw)
        encoder = nn.Sequential(*down, nn.Conv2d(top, 2 * latent_channels, 3, padding=1))
        decoder = nn.Sequential(nn.Conv2d(latent_channels, top, 3, padding=1), nn.SiLU(), *up)
    else:
        latent = latent_dim
        encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(top * sh * sw, 2 * latent_dim))
        decoder = nn.Sequential(nn.Linear(latent_dim, top * sh * sw), nn.SiLU(), nn.Unflatten(1, (top, sh, sw)), *up)
    return VAE(encoder, decoder, latent, likelihood=likelihood, event_dims=3, param_dim=-3, **kwargs)
