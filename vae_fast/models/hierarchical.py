"""A hierarchical VAE for images in VDVAE's design (Child 2021), its probability maths on the fused ops.

A bottom-up encoder of residual bottleneck blocks runs over resolutions (32, 16, 8, 4, 1 for 32x32 images) and
keeps its activation at each. A top-down decoder then starts from a learned map at the lowest resolution; each
of its blocks gives a prior p(z_l | z_<l) and, from the encoder's activation at its resolution too, a posterior
q(z_l | z_<l, x): diagonal Gaussians at every position of that resolution. z_l is drawn with the fused sampler,
the layer's KL(q || p) is the fused ``gaussian_kl`` with a prior, and the IWAE weights' log p(z_l | z_<l) and
log q(z_l | ...) come from ``gaussian_log_prob`` and the sampler. The last activation becomes the likelihood's
parameters (``likelihoods.py``: the mixture of logistics for 8-bit images, Bernoulli, Gaussian).

The architecture is given as VDVAE writes it: encoder blocks ``"32x11,32d2,16x6,..."`` (``RxN``: N blocks at
resolution R; ``RdF``: a block, then down by F) and decoder blocks ``"1x1,4m1,4x2,8m4,..."`` (``RxN``: N blocks;
``RmS``: the first block at R, mixing in the activation from resolution S, upsampled). Named configurations:
:data:`CONFIGS`.

Samples lead, as in :class:`~vae_fast.models.vae.VAE`: with K samples the decoder runs on K * B examples, and
the data ``(B, C, H, W)`` are scored as they are (the ops broadcast).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gaussian_kl, gaussian_log_prob, reparameterize
from . import likelihoods
from .vae import VAE, check_num_samples


@dataclass(frozen=True)
class HierarchicalConfig:
    """A hierarchical VAE's shape: block width, z channels per layer, the block strings, the bottleneck ratio."""

    width: int
    z_channels: int
    encoder_blocks: str
    decoder_blocks: str
    bottleneck: float = 0.25
    image_size: int = 32


CONFIGS = {
    # Learns the embedded 32x32 `patches` on a CPU in minutes: one block per resolution.
    "small": HierarchicalConfig(32, 4, "32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1",
                                "1x1,4m1,4x1,8m4,8x1,16m8,16x1,32m16,32x1"),
    # VDVAE's published CIFAR-10 and ImageNet-32 models (for GPUs).
    "vdvae-cifar10": HierarchicalConfig(384, 16, "32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
                                        "1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21"),
    "vdvae-imagenet32": HierarchicalConfig(512, 16, "32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
                                           "1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40"),
}


def parse_blocks(spec: str, what: str) -> list[tuple[int, str, int]]:
    """``"32x2,32d2,16m8"`` as ``[(32, "x", 2), (32, "d", 2), (16, "m", 8)]``; a ValueError naming ``what``."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)([xdm])(\d+)", part.strip())
        if not m or int(m.group(1)) < 1 or int(m.group(3)) < 1:
            raise ValueError(f"{what}: {part!r} is not RxN, RdF or RmS (R, N, F, S positive integers), in {spec!r}")
        out.append((int(m.group(1)), m.group(2), int(m.group(3))))
    return out


class Block(nn.Module):
    """VDVAE's residual bottleneck: 1x1, 3x3, 3x3, 1x1 convolutions, GELU before each; ``out = x + f(x)`` when
    ``residual``, else ``f(x)``. The last convolution is scaled by ``last_scale`` at init (deep stacks stay
    stable: VDVAE scales it by 1/sqrt(number of blocks)), or zeroed."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, residual: bool, last_scale: float = 1.0):
        super().__init__()
        self.residual = residual
        self.convs = nn.ModuleList([nn.Conv2d(c_in, c_mid, 1), nn.Conv2d(c_mid, c_mid, 3, padding=1),
                                    nn.Conv2d(c_mid, c_mid, 3, padding=1), nn.Conv2d(c_mid, c_out, 1)])
        with torch.no_grad():
            self.convs[-1].weight.mul_(last_scale)

    def forward(self, x):
        h = x
        for conv in self.convs:
            h = conv(F.gelu(h))
        return x + h if self.residual else h


class _Encoder(nn.Module):
    def __init__(self, channels: int, width: int, mid: int, blocks: list, image_size: int):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        n = len(blocks)
        self.blocks = nn.ModuleList(Block(width, mid, width, True, math.sqrt(1 / n)) for _ in blocks)
        res, self.down = image_size, []
        for r, kind, arg in blocks:
            if r != res:
                raise ValueError(f"encoder_blocks: a block at resolution {r} follows one that leaves {res}")
            res = res // arg if kind == "d" else res
            if kind == "d" and res * arg != r:
                raise ValueError(f"encoder_blocks: {r}d{arg} does not divide the resolution {r}")
            if kind == "m":
                raise ValueError("encoder_blocks: RmS (mix in) is a decoder block")
            self.down.append(arg if kind == "d" else 1)

    def forward(self, x) -> dict[int, torch.Tensor]:
        """The activation at each resolution (the last block's there, after its down-sampling)."""
        x = self.stem(x)
        acts = {x.shape[-1]: x}
        for block, down in zip(self.blocks, self.down):
            x = block(x)
            if down > 1:
                x = F.avg_pool2d(x, down)
            acts[x.shape[-1]] = x
        return acts


class TopDownBlock(nn.Module):
    """One layer of the hierarchy: prior and posterior of z_l at resolution ``res``, z_l projected into the
    stream, then a residual block."""

    def __init__(self, res: int, mixin: int | None, width: int, mid: int, z_channels: int, n_blocks: int):
        super().__init__()
        self.res, self.mixin, self.z_channels = res, mixin, z_channels
        self.posterior = Block(2 * width, mid, 2 * z_channels, residual=False)
        # the prior's last layer zeroed: every layer starts as N(0, I) and adds nothing to the stream
        self.prior = Block(width, mid, 2 * z_channels + width, residual=False, last_scale=0.0)
        self.z_proj = nn.Conv2d(z_channels, width, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(math.sqrt(1 / n_blocks))
        self.resnet = Block(width, mid, width, True, math.sqrt(1 / n_blocks))

    def distributions(self, x, acts=None):
        """(prior mean, prior logvar, the stream's update, and with ``acts`` the posterior mean and logvar)."""
        feats = self.prior(x)
        z = self.z_channels
        p_mu, p_logvar, update = feats[:, :z], feats[:, z:2 * z], feats[:, 2 * z:]
        if acts is None:
            return p_mu, p_logvar, update
        q_mu, q_logvar = self.posterior(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        return p_mu, p_logvar, update, q_mu, q_logvar

    def advance(self, x, update, z):
        return self.resnet(x + update + self.z_proj(z))


class HierarchicalVAE(VAE):
    """A VDVAE-style hierarchical VAE over ``(C, H, W)`` images (square, H = W = ``config.image_size``), with the
    objective interface of :class:`VAE`: ``forward`` -> (loss, stats) (stats with a KL per layer), ``elbo``,
    ``iwae``, ``log_likelihood``, ``sample``, ``reconstruct``. Build it with :func:`hierarchical_vae`."""

    def __init__(self, image_shape, config: HierarchicalConfig, likelihood: str = "dmol", **kwargs):
        c, h, w = image_shape
        if h != w or h != config.image_size:
            raise ValueError(f"image_shape {tuple(image_shape)}: the configuration's blocks are for "
                             f"{config.image_size}x{config.image_size} images")
        mid = max(1, int(config.width * config.bottleneck))
        enc_blocks = parse_blocks(config.encoder_blocks, "encoder_blocks")
        dec_blocks = parse_blocks(config.decoder_blocks, "decoder_blocks")
        encoder = _Encoder(c, config.width, mid, enc_blocks, h)
        layers, sizes = [], []
        for r, kind, arg in dec_blocks:
            for i in range(arg if kind == "x" else 1):
                layers.append(TopDownBlock(r, arg if kind == "m" and i == 0 else None, config.width, mid,
                                           config.z_channels, len(dec_blocks)))
                sizes.append(r)
        bad = [r for r in sizes if r not in {s for s in _resolutions(enc_blocks, h)}]
        if bad:
            raise ValueError(f"decoder_blocks: resolution {bad[0]} has no encoder activation "
                             f"(the encoder visits {sorted(set(_resolutions(enc_blocks, h)))})")
        if sizes[-1] != h:
            raise ValueError(f"decoder_blocks must end at the image's resolution {h}, got {sizes[-1]}")
        lik = likelihoods.get(likelihood)
        out_channels = lik.decoder_shape((c, h, w), -3, kwargs.get("obs_logvar"))[0]
        decoder = nn.ModuleList(layers)
        latent_dim = sum(config.z_channels * r * r for r in sizes)
        self.image_shape = (c, h, w)  # before VAE.__init__: a per-pixel Gaussian variance reads it
        super().__init__(encoder, decoder, latent_dim, likelihood=likelihood, event_dims=3, param_dim=-3, **kwargs)
        self.config = config
        self.start = nn.ParameterDict({str(r): nn.Parameter(torch.zeros(1, config.width, r, r))
                                       for r in sorted(set(sizes))})
        self.head = nn.Conv2d(config.width, out_channels, 1)

    @property
    def num_layers(self) -> int:
        return len(self.decoder)

    def _example_shape(self) -> torch.Size:
        return torch.Size(self.image_shape)

    # ---- the top-down pass ---------------------------------------------------------------------------------

    def _layer_input(self, layer, streams: dict, n: int):
        """The stream a layer reads: its resolution's (the learned start map at first), plus the upsampled
        stream of the resolution it mixes in."""
        x = streams.get(layer.res)
        if x is None:
            x = self.start[str(layer.res)].expand(n, -1, -1, -1)
        if layer.mixin is not None:
            x = x + F.interpolate(streams[layer.mixin], scale_factor=layer.res // layer.mixin)
        return x

    def _top_down(self, acts, num_samples: int, want_log_w: bool):
        """The likelihood's parameters (``(B, ...)``, with K > 1 ``(K, B, ...)``), the KL per layer (a list of ``(B,)``; K = 1 only), and with
        ``want_log_w`` log p(z) - log q(z) summed over layers ``(K, B)``."""
        k = num_samples
        batch = next(iter(acts.values())).shape[0]
        streams: dict[int, torch.Tensor] = {}
        kls, log_ratio = [], None
        for layer in self.decoder:
            a = acts[layer.res]
            if k > 1:
                a = a.repeat(k, 1, 1, 1)  # sample-major: example b of sample j at row j * B + b
            x = self._layer_input(layer, streams, a.shape[0])
            p_mu, p_logvar, update, q_mu, q_logvar = layer.distributions(x, a)
            if want_log_w:
                z, log_q = reparameterize(q_mu, q_logvar, return_log_q=True, event_dims=3)
                log_p = gaussian_log_prob(z, p_mu, p_logvar, event_dims=3)
                term = (log_p - log_q).view(k, batch)
                log_ratio = term if log_ratio is None else log_ratio + term
            else:
                z = reparameterize(q_mu, q_logvar)
            if k == 1:
                kls.append(gaussian_kl(q_mu, q_logvar, p_mu, p_logvar, event_dims=3))
            streams[layer.res] = layer.advance(x, update, z)
        out = self.head(streams[self.image_shape[1]])
        return self.lik.params(self, out.view(k, batch, *out.shape[1:]) if k > 1 else out), kls, log_ratio

    def encode(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's posterior (mu, logvar), flattened and concatenated, ``(B, latent_dim)`` each, along the
        path of posterior means (z_l = mu_l, no noise): what ``active_units`` reads."""
        acts = self._encode_images(x)
        streams: dict[int, torch.Tensor] = {}
        mus, logvars = [], []
        for layer in self.decoder:
            h = self._layer_input(layer, streams, x.shape[0])
            _, _, update, q_mu, q_logvar = layer.distributions(h, acts[layer.res])
            mus.append(q_mu.flatten(1))
            logvars.append(q_logvar.flatten(1))
            streams[layer.res] = layer.advance(h, update, q_mu)
        return torch.cat(mus, 1), torch.cat(logvars, 1)

    def decode(self, z):
        raise NotImplementedError("a hierarchical VAE has no single decoder of z: use sample() or reconstruct()")

    def _encode_images(self, x):
        self._check_batch(x)
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            raise ValueError(f"x must be a batch of images of shape (B, {c}, {h}, {w}) for this model, "
                             f"got {tuple(x.shape)}")
        param = self.head.weight
        h = x.to(param.dtype) if x.dtype == torch.float32 and param.dtype in (torch.float16, torch.bfloat16) else x
        return self.encoder(h)

    # ---- objectives ------------------------------------------------------------------------------------------

    def forward(self, x, num_samples: int = 1, beta: float = 1.0, free_bits: float = 0.0, objective: str = "elbo"):
        """``(loss, stats)``: the batch-mean negative ELBO (beta weighs the KL) and detached batch means of elbo,
        kl, rec and the KL of each layer (``kl_layers``, ``(L,)``, top layer first). The loss is in nats per
        example; VDVAE's per-dimension loss is this over C * H * W."""
        if objective != "elbo" or num_samples != 1 or free_bits:
            raise ValueError("HierarchicalVAE trains the single-sample ELBO (objective='elbo', num_samples=1, "
                             "free_bits=0); iwae() and log_likelihood() evaluate with K samples")
        params, kls, _ = self._top_down(self._encode_images(x), 1, False)
        log_px = self._log_px(x, params)
        kl_layers = torch.stack(kls)  # (L, B)
        kl = kl_layers.sum(0)
        loss = -log_px.mean() + beta * kl.mean()
        rec, kl_mean = log_px.detach().mean(), kl.detach().mean()
        return loss, {"elbo": rec - kl_mean, "kl": kl_mean, "rec": rec, "kl_layers": kl_layers.detach().mean(1)}

    def elbo(self, x, num_samples: int = 1) -> torch.Tensor:
        """``(B,)`` ELBO in nats: log p(x|z) minus the KL of every layer (closed form per layer given z_<l);
        with K samples, the mean of K such single-sample estimates."""
        check_num_samples(num_samples)
        acts = self._encode_images(x)
        total = 0.0
        for _ in range(num_samples):
            params, kls, _ = self._top_down(acts, 1, False)
            total = total + self._log_px(x, params) - torch.stack(kls).sum(0)
        return total / num_samples

    def _log_weights(self, x, acts, num_samples: int) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k | x), ``(K, B)``."""
        params, _, log_ratio = self._top_down(acts, num_samples, True)
        log_px = self._log_px(x, params)
        return (log_px.unsqueeze(0) if num_samples == 1 else log_px) + log_ratio

    def iwae(self, x, num_samples: int) -> torch.Tensor:
        """``(B,)`` IWAE bound with K = num_samples: log mean_k p(x, z_k) / q(z_k | x) over every layer's z."""
        check_num_samples(num_samples)
        log_w = self._log_weights(x, self._encode_images(x), num_samples)
        return torch.logsumexp(log_w, dim=0) - math.log(num_samples)

    @torch.no_grad()
    def log_likelihood(self, x, num_samples: int = 1000, chunk_size: int | None = None) -> torch.Tensor:
        """``(B,)`` importance-sampled log p(x) (the IWAE bound with K = num_samples), in chunks of samples with
        a streaming logsumexp."""
        check_num_samples(num_samples)
        if chunk_size is None:
            chunk_size = max(1, (1 << 20) // max(1, x.numel()))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        acts = self._encode_images(x)
        total = None
        for start in range(0, num_samples, chunk_size):
            part = torch.logsumexp(self._log_weights(x, acts, min(chunk_size, num_samples - start)).float(), dim=0)
            total = part if total is None else torch.logaddexp(total, part)
        return total - math.log(num_samples)

    # ---- generation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, temperature: float = 1.0) -> torch.Tensor:
        """n images from the prior, each layer's z_l ~ N(p_mu, temperature^2 exp(p_logvar)) (VDVAE's
        temperatures); the means of p(x|z), or with ``mean=False`` draws from it."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        streams: dict[int, torch.Tensor] = {}
        for layer in self.decoder:
            x = self._layer_input(layer, streams, n)
            p_mu, p_logvar, update = layer.distributions(x)
            z = reparameterize(p_mu, p_logvar + 2 * math.log(temperature)) if temperature != 1 else \
                reparameterize(p_mu, p_logvar)
            streams[layer.res] = layer.advance(x, update, z)
        out = self.head(streams[self.image_shape[1]])
        return self._output(self.lik.params(self, out), mean)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """x through the posterior: each z_l ~ q(z_l | z_<l, x), then the mean of p(x|z) or a draw from it."""
        params, _, _ = self._top_down(self._encode_images(x), 1, False)
        return self._output(params, mean)


def _resolutions(blocks, image_size: int) -> list[int]:
    res, out = image_size, [image_size]
    for _, kind, arg in blocks:
        res = res // arg if kind == "d" else res
        out.append(res)
    return out


def hierarchical_vae(image_shape, *, config: str | HierarchicalConfig = "small", likelihood: str = "dmol",
                     **kwargs) -> HierarchicalVAE:
    """A :class:`HierarchicalVAE` for ``(C, H, W)`` images: ``config`` a name of :data:`CONFIGS` (``"small"`` for a
    CPU, ``"vdvae-cifar10"``, ``"vdvae-imagenet32"``) or a :class:`HierarchicalConfig`; ``likelihood`` one of
    ``likelihoods.LIKELIHOODS`` ("dmol" for 8-bit images in [-1, 1]); further keyword arguments (``obs_logvar``,
    ``min_obs_logvar``) go to :class:`VAE`."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"config must be one of {tuple(CONFIGS)} or a HierarchicalConfig, got {config!r}")
        config = CONFIGS[config]
    if not isinstance(config, HierarchicalConfig):
        raise TypeError(f"config must be a name or a HierarchicalConfig, got {type(config).__name__}")
    ok = (isinstance(image_shape, (tuple, list)) and len(image_shape) == 3
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in image_shape))
    if not ok:
        raise ValueError(f"image_shape must be (C, H, W), three positive ints, got {image_shape!r}")
    return HierarchicalVAE(tuple(image_shape), config, likelihood, **kwargs)
