"""The VAE module: encoder/decoder wiring, the ELBO and IWAE objectives, importance-sampled log-likelihood.

All the probability maths goes through the fused ops in ``ops.py``; this file only wires them together.
Samples always lead: with K samples, ``z`` is ``(K, B, latent)`` and decoder outputs are ``(K, B, *event)``,
scored against the data ``(B, *event)`` as it is (the ops broadcast; the data is never expanded).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from . import likelihoods
from .likelihoods import OBS_LOGVAR_MODES, bits_per_dim, floor_logvar  # noqa: F401  (re-exported)
from ..ops import gaussian_kl, gaussian_log_prob, reparameterize, reparameterize_with_kl

LIKELIHOODS = tuple(likelihoods.LIKELIHOODS)  # their names; likelihoods.py defines them
OBJECTIVES = ("elbo", "iwae", "iwae-dreg", "elbo-stl")
IWAE_OBJECTIVES = ("iwae", "iwae-dreg")


class VAE(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))) from ``encoder``; p(x|z) from ``decoder``, as the likelihood says
    (``likelihoods.py``: Bernoulli logits, or a Gaussian).

    ``latent_dim`` is an int (a flat latent vector: ``encoder(x)`` returns ``(B, 2 * latent_dim)``, mu then
    logvar) or a shape such as ``(C, H, W)`` (a spatial latent: ``encoder(x)`` returns ``(B, 2C, H, W)``, mu and
    logvar stacked on the first latent dimension); ``self.latent_dim`` is then the number of latent
    dimensions (C * H * W) and ``self.latent_shape`` the shape. ``decoder(z)`` takes ``(N, *latent_shape)`` and
    returns logits or the Gaussian mean shaped like one example (with ``obs_logvar="decoder"``: mean and logvar
    stacked on dimension ``param_dim``, the last by default, the channels (-3) for images). ``event_dims``
    trailing data dimensions make one example.

    ``obs_logvar`` (Gaussian only): ``"scalar"`` (one learned value), ``"per_feature"`` (learned, shaped like
    one example), ``"decoder"`` (predicted), or a float (fixed). Learned values start at 0 and are floored
    smoothly at ``min_obs_logvar``: constant pixels would otherwise drive the variance to 0 and the
    likelihood to infinity.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int | Sequence[int],
        likelihood: str = "bernoulli",
        obs_logvar: str | float = "scalar",
        event_dims: int = 1,
        min_obs_logvar: float = math.log(1e-3),
        param_dim: int = -1,
    ):
        super().__init__()
        lik = likelihoods.get(likelihood)
        if not isinstance(obs_logvar, (int, float)) and obs_logvar not in OBS_LOGVAR_MODES:
            raise ValueError(f"obs_logvar must be one of {OBS_LOGVAR_MODES} or a float, got {obs_logvar!r}")
        self.latent_shape = _latent_shape(latent_dim)
        if not isinstance(event_dims, int) or event_dims < 1:
            raise ValueError(f"event_dims must be a positive int, got {event_dims!r}")
        if not isinstance(param_dim, int) or not -event_dims <= param_dim <= -1:
            raise ValueError(f"param_dim must be a negative int in [-event_dims, -1] = [{-event_dims}, -1], "
                             f"got {param_dim!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = math.prod(self.latent_shape)
        self.likelihood = likelihood
        self.lik = lik
        self.event_dims = event_dims
        self.param_dim = param_dim
        self.min_obs_logvar = float(min_obs_logvar)
        self.obs_logvar_mode = None
        lik.setup(self, obs_logvar)

    def _example_shape(self) -> torch.Size:
        """Shape of one decoded example, found by decoding one z (in eval mode, so no statistics change)."""
        param = next(self.decoder.parameters(), None)
        device = param.device if param is not None else None
        was_training = self.decoder.training
        self.decoder.eval()
        with torch.no_grad():
            shape = self.decoder(torch.zeros(1, *self.latent_shape, device=device)).shape[1:]
        self.decoder.train(was_training)
        return shape

    def _floor(self, raw: torch.Tensor) -> torch.Tensor:
        return floor_logvar(raw, self.min_obs_logvar)

    def observation_logvar(self) -> torch.Tensor | None:
        """The learned or fixed observation log-variance (None for Bernoulli or ``obs_logvar="decoder"``)."""
        if self.obs_logvar_mode == "fixed":
            return self.obs_logvar_fixed
        if self.obs_logvar_mode in ("scalar", "per_feature"):
            return self._floor(self.obs_logvar_raw)
        return None

    # ---- distribution parameters -------------------------------------------------------------------------

    @property
    def latent_event_dims(self) -> int:
        """How many trailing dimensions of z make one latent vector (1 flat, 3 for a (C, H, W) latent)."""
        return len(self.latent_shape)

    def _check_batch(self, x) -> None:
        """A TypeError naming the conversion for a batch no layer could take as it is: not a tensor, integer or
        bool levels, float64 against lower-precision parameters. (The data's range is the likelihood ops' check:
        ``bernoulli_log_prob`` and ``discretized_mix_logistic_log_prob`` refuse data off their support.)"""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor batch, got {type(x).__name__}")
        convert = f'vf.data.from_levels(x, "{self.lik.data_range}")'
        if not x.is_floating_point():
            low, high = likelihoods.DATA_RANGES[self.lik.data_range]
            raise TypeError(f"x must be a floating batch in [{low:g}, {high:g}] (likelihood {self.likelihood!r}), got "
                            f"{x.dtype}: 8-bit images (uint8) are {convert}")
        param = next(self.parameters(), None)
        if x.dtype == torch.float64 and param is not None and param.dtype != torch.float64:
            raise TypeError(f"x is float64 but the model's parameters are {param.dtype}: pass x.to({param.dtype}) "
                            f"(or convert the model with model.double())")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), each ``(B, *latent_shape)``: views of the encoder's output, not copies.
        A float32 batch into a float16 or bfloat16 model (``model.to(torch.bfloat16)``) enters the encoder in the
        model's dtype, while the likelihood scores the float32 data (bfloat16 cannot hold 8-bit levels)."""
        self._check_batch(x)
        param = next(self.encoder.parameters(), None)
        if param is not None and x.dtype == torch.float32 and param.dtype in (torch.float16, torch.bfloat16):
            x = x.to(param.dtype)
        h = self.encoder(x)
        k = self.latent_event_dims
        want = (2 * self.latent_shape[0], *self.latent_shape[1:])
        if tuple(h.shape[-k:]) != want or h.dim() <= k:
            what = "end in 2 * latent_dim" if k == 1 else "end in (2 * C, *rest) of latent shape (C, *rest)"
            raise ValueError(f"encoder output must {what} = {want}, got {tuple(h.shape)}")
        mu, logvar = h.chunk(2, dim=-k)
        return mu, logvar

    def decode(self, z: torch.Tensor):
        """Parameters of p(x|z) for z of shape ``(..., *latent_shape)``: Bernoulli logits, or (mean, logvar)."""
        k = self.latent_event_dims
        lead = z.shape[:-k]
        # The decoder sees one flat batch, so convolutional decoders work with any number of leading dims.
        out = self.decoder(z.reshape(-1, *z.shape[-k:]))
        out = out.reshape(*lead, *out.shape[1:])
        return self.lik.params(self, out)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z) (probabilities for Bernoulli) for z of shape ``(..., *latent_shape)``."""
        return self._output(self.decode(z), True)

    def _log_px(self, x: torch.Tensor, params) -> torch.Tensor:
        return self.lik.log_prob(x, params, self.event_dims)

    def _output(self, params, mean: bool) -> torch.Tensor:
        """The mean of p(x|z) (probabilities for Bernoulli), or a draw from it."""
        return self.lik.output(params, mean)

    # ---- objectives --------------------------------------------------------------------------------------

    def _sample_with_kl(self, mu, logvar, num_samples: int, per_dim: bool = False):
        """z ``(K, B, *latent_shape)`` and the KL, ``(B,)`` or per dimension ``(B, *latent_shape)``; K = 1 takes
        the op's single-sample path."""
        check_num_samples(num_samples)
        z, kl = reparameterize_with_kl(mu, logvar, None if num_samples == 1 else num_samples,
                                       event_dims=0 if per_dim else self.latent_event_dims)
        return (z.unsqueeze(0) if num_samples == 1 else z), kl

    def _log_weights(self, x, mu, logvar, num_samples: int, dreg: bool = False, path_only: bool = False):
        """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) and log p(x|z_k), each ``(K, B)``.

        ``path_only``: log q's gradient reaches mu and logvar only through z (STL, Roeder et al. 2017).
        ``dreg`` (implies ``path_only``): the gradients reaching z and log q are multiplied by the normalised
        weights w~ = softmax_k(log w), so that with the IWAE loss the encoder gets DReG's
        sum_k w~_k^2 d log w_k / d z_k dz_k / d phi (Tucker et al. 2018) while the decoder, which sees z only
        as an input, keeps IWAE's sum_k w~_k d log p(x|z_k) / d theta.
        """
        check_num_samples(num_samples)
        k = self.latent_event_dims
        z, log_q = reparameterize(mu, logvar, num_samples, return_log_q=True, log_q_path_only=path_only or dreg,
                                  event_dims=k)
        weights: list[torch.Tensor] = []  # w~: known only once log w is, read when the gradients arrive
        dreg = dreg and torch.is_grad_enabled()
        if dreg:
            z, log_q = _ScaleGradByWeights.apply(z, log_q, weights)
        zero = z.new_zeros(())
        log_pz = gaussian_log_prob(z, zero, zero, event_dims=k)
        log_px = self._log_px(x, self.decode(z))
        log_w = log_px + log_pz - log_q
        if dreg:
            weights.append(torch.softmax(log_w.detach(), dim=0))
        return log_w, log_px

    def forward(self, x, num_samples: int = 1, beta: float = 1.0, free_bits: float = 0.0, objective: str = "elbo"):
        """``(loss, stats)``: the batch-mean loss to minimise and detached batch means of elbo, kl, rec."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective in IWAE_OBJECTIVES and (beta != 1.0 or free_bits > 0):
            raise ValueError(f"beta and free_bits apply to the ELBO only; objective={objective!r} needs beta=1, "
                             "free_bits=0")
        if objective == "elbo-stl" and free_bits > 0:
            raise ValueError("free_bits needs the closed-form per-dimension KL: use objective='elbo', not 'elbo-stl'")
        if free_bits < 0:
            raise ValueError(f"free_bits must be >= 0, got {free_bits}")
        mu, logvar = self.encode(x)
        if objective in IWAE_OBJECTIVES:
            log_w, log_px = self._log_weights(x, mu, logvar, num_samples, dreg=objective == "iwae-dreg")
            loss = -(torch.logsumexp(log_w, dim=0) - math.log(num_samples)).mean()
            with torch.no_grad():
                kl = gaussian_kl(mu, logvar)
        elif objective == "elbo-stl":
            # Monte Carlo ELBO, mean_k [log p(x|z_k) - beta * (log q(z_k|x) - log p(z_k))], log q's parameter
            # path stopped: its gradient is zero-variance at the true posterior ("sticking the landing").
            log_w, log_px = self._log_weights(x, mu, logvar, num_samples, path_only=True)
            loss = -(log_px + beta * (log_w - log_px)).mean()
            with torch.no_grad():
                kl = gaussian_kl(mu, logvar)
        else:
            z, kl = self._sample_with_kl(mu, logvar, num_samples, per_dim=free_bits > 0)
            log_px = self._log_px(x, self.decode(z))
            if free_bits > 0:
                # Kingma et al. (2016): each latent dimension's batch-mean KL costs at least free_bits nats.
                kl_term = torch.clamp_min(kl.mean(0), free_bits).sum()
                kl = kl.flatten(1).sum(-1)
            else:
                kl_term = kl.mean()
            loss = -log_px.mean() + beta * kl_term
        rec = log_px.detach().mean()
        kl_mean = kl.detach().mean()
        return loss, {"elbo": rec - kl_mean, "kl": kl_mean, "rec": rec}

    def elbo(self, x, num_samples: int = 1) -> torch.Tensor:
        """``(B,)`` ELBO in nats: mean over K samples of log p(x|z_k), minus the closed-form KL."""
        mu, logvar = self.encode(x)
        z, kl = self._sample_with_kl(mu, logvar, num_samples)
        return self._log_px(x, self.decode(z)).mean(0) - kl

    def iwae(self, x, num_samples: int) -> torch.Tensor:
        """``(B,)`` IWAE bound with K = num_samples (log q from the exact eps)."""
        mu, logvar = self.encode(x)
        log_w, _ = self._log_weights(x, mu, logvar, num_samples)
        return torch.logsumexp(log_w, dim=0) - math.log(num_samples)

    @torch.no_grad()
    def log_likelihood(self, x, num_samples: int = 1000, chunk_size: int | None = None) -> torch.Tensor:
        """``(B,)`` importance-sampled log p(x): the IWAE bound with K = num_samples, computed in chunks of
        samples with a streaming logsumexp, so memory does not grow with num_samples."""
        check_num_samples(num_samples)
        if chunk_size is None:
            # About 4M data elements decoded per chunk (16 MB of x's size; the decoder's output is a few times
            # that: 33x for a mixture of logistics over RGB): memory bounded for any image size and batch.
            chunk_size = max(1, (1 << 22) // max(1, x.numel()))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        mu, logvar = self.encode(x)
        total = None
        for start in range(0, num_samples, chunk_size):
            log_w, _ = self._log_weights(x, mu, logvar, min(chunk_size, num_samples - start))
            part = torch.logsumexp(log_w.float(), dim=0)
            total = part if total is None else torch.logaddexp(total, part)
        return total - math.log(num_samples)

    # ---- generation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, temperature: float = 1.0) -> torch.Tensor:
        """n examples decoded from z ~ N(0, temperature^2 I): the means of p(x|z) (Bernoulli probabilities, the
        mixture of logistics' mean), or with ``mean=False`` draws from p(x|z) (binary images, Gaussian noise
        added, the mixture's fused sampler: values on the 256 levels). A temperature below 1 draws z nearer the
        prior's mode (VDVAE shows samples at several)."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        p = next(self.parameters())
        z = torch.randn(n, *self.latent_shape, device=p.device, dtype=p.dtype)
        return self._output(self.decode(z * temperature if temperature != 1 else z), mean)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """Decoded posterior means (z = mu); with ``mean=False`` z ~ q(z|x) and x ~ p(x|z)."""
        mu, logvar = self.encode(x)
        z = mu if mean else reparameterize(mu, logvar)
        return self._output(self.decode(z), mean)


class _ScaleGradByWeights(torch.autograd.Function):
    """Identity on (z ``(K, B, ...)``, log_q ``(K, B)``); the backward multiplies both gradients by the
    normalised importance weights ``weights[0]`` ``(K, B)``, which the caller appends after the forward
    (they depend on the decoder's output for these very z)."""

    @staticmethod
    def forward(ctx, z, log_q, weights):
        ctx.weights = weights
        return z.view_as(z), log_q.view_as(log_q)

    @staticmethod
    def backward(ctx, grad_z, grad_log_q):
        w = ctx.weights[0]
        if grad_z is not None:
            grad_z = grad_z * w.reshape(w.shape + (1,) * (grad_z.dim() - w.dim())).to(grad_z.dtype)
        if grad_log_q is not None:
            grad_log_q = grad_log_q * w.to(grad_log_q.dtype)
        return grad_z, grad_log_q, None


def _latent_shape(latent_dim) -> tuple[int, ...]:
    if isinstance(latent_dim, int) and not isinstance(latent_dim, bool):
        shape = (latent_dim,)
    elif isinstance(latent_dim, (tuple, list, torch.Size)) and latent_dim:
        shape = tuple(latent_dim)
    else:
        shape = ()
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"latent_dim must be a positive int or a shape of positive ints, got {latent_dim!r}")
    return shape


def check_num_samples(num_samples) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def mlp_vae(
    input_dim: int | Sequence[int],
    latent_dim: int,
    hidden: Sequence[int] = (256, 128),
    likelihood: str = "bernoulli",
    **kwargs,
) -> VAE:
    """The default model: MLP encoder and decoder (SiLU) with the given hidden sizes (``hidden=()`` is linear).

    ``input_dim`` is the size of one flat example or its shape (e.g. ``(1, 28, 28)``); further keyword
    arguments (``obs_logvar``, ``min_obs_logvar``) go to :class:`VAE`.
    """
    shape = (input_dim,) if isinstance(input_dim, int) else tuple(int(s) for s in input_dim)
    flat = math.prod(shape)
    hidden = tuple(hidden)
    # Several parameter tensors (a Gaussian's mean and logvar) are concatenated on the last dim.
    out_shape = likelihoods.get(likelihood).decoder_shape(shape, -1, kwargs.get("obs_logvar"))
    encoder = nn.Sequential(nn.Flatten(start_dim=-len(shape)), _mlp((flat, *hidden, 2 * latent_dim)))
    decoder = nn.Sequential(_mlp((latent_dim, *reversed(hidden), math.prod(out_shape))), nn.Unflatten(-1, out_shape))
    return VAE(encoder, decoder, latent_dim, likelihood=likelihood, event_dims=len(shape), **kwargs)


def gradient_snr(model: VAE, x: torch.Tensor, num_samples: int, objective: str = "iwae", repeats: int = 32,
                 params=None) -> float:
    """Signal-to-noise ratio ||E g|| / sqrt(E ||g - E g||^2) of the loss's gradient g on the batch ``x`` (by
    default with respect to the encoder's parameters), estimated from ``repeats`` independent draws of the
    samples (Rainforth et al. 2018: IWAE's encoder SNR falls as K grows; DReG's rises).

    ||mean g||^2 overestimates ||E g||^2 by tr(Cov g) / repeats, the floor that makes a pure-noise gradient
    look like signal; that bias is subtracted (and the result floored at 0), so small SNRs are not hidden
    under 1 / sqrt(repeats).
    """
    if not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"repeats must be an int >= 2, got {repeats!r}")
    params = list(model.encoder.parameters() if params is None else params)
    grads = []
    for _ in range(repeats):
        loss, _ = model(x, num_samples=num_samples, objective=objective)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(grads).double()
    noise = g.var(0).sum()
    signal = (g.mean(0).square().sum() - noise / repeats).clamp_min(0)
    return math.sqrt(signal / noise)


@torch.no_grad()
def active_units(model: VAE, x: torch.Tensor, threshold: float = 0.01, batch_size: int = 1024) -> int:
    """Latent dimensions j with Var_x(E_q[z_j | x]) > threshold (Burda et al.): the posterior-collapse check."""
    mus = torch.cat([model.encode(x[i : i + batch_size])[0].float() for i in range(0, x.shape[0], batch_size)])
    return int((mus.var(dim=0, unbiased=False) > threshold).sum())
