"""The ops' maths as composite PyTorch: double backward's formulas, the benchmarks' eager baseline and the
tests' float64 oracle.

Every function here computes in the dtype it is given (pass float64 tensors for a reference) and
uses the same numerically careful forms as the fused kernels (``csrc/core/elbo_math.h``, ``dmol_math.h``), so that the
two differ only by rounding and summation order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def clamp_logvar(logvar, clamp=None):
    """logvar clamped to ``clamp`` = (lo, hi) with torch.clamp (its gradient: zero outside, passed at the edges),
    or as it is when ``clamp`` is None: the ops' ``logvar_clamp``."""
    return logvar if clamp is None else torch.clamp(logvar, clamp[0], clamp[1])


def _sum_event(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    if event_dims == 0:
        return t
    return t.sum(dim=tuple(range(-event_dims, 0)))


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, event_dims=1, logvar_clamp=None,
                prior_logvar_clamp=None):
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))), summed over ``event_dims``."""
    logvar = clamp_logvar(logvar, logvar_clamp)
    if prior_logvar is not None:
        prior_logvar = clamp_logvar(prior_logvar, prior_logvar_clamp)
    if prior_mu is None:
        term = 0.5 * (mu * mu + torch.expm1(logvar) - logvar)
    else:
        d = logvar - prior_logvar
        diff = mu - prior_mu
        term = 0.5 * (torch.expm1(d) - d + diff * diff * torch.exp(-prior_logvar))
    return _sum_event(term, event_dims)


def gaussian_log_prob(x, mean, logvar, *, event_dims=1, logvar_clamp=None):
    """log N(x; mean, exp(logvar)), summed over ``event_dims``."""
    logvar = clamp_logvar(logvar, logvar_clamp)
    diff = x - mean
    term = -0.5 * (LOG_2PI + logvar + diff * diff * torch.exp(-logvar))
    return _sum_event(term, event_dims)


def bernoulli_log_prob(x, logits, *, event_dims=1):
    """log Bernoulli(x; sigmoid(logits)) = x * l - softplus(l), summed over ``event_dims``."""
    # softplus as max(l, 0) + log1p(exp(-|l|)): exact for every l (F.softplus switches to l above 20)
    softplus = logits.clamp(min=0) + torch.log1p(torch.exp(-logits.abs()))
    return _sum_event(x * logits - softplus, event_dims)


def reparameterize(mu, logvar, eps):
    """z = mu + exp(logvar / 2) * eps; ``eps`` may carry leading sample dimensions."""
    return mu + torch.exp(0.5 * logvar) * eps


def standard_normal_log_prob(eps, logvar, *, event_dims=1):
    """log q(z|x) for z = mu + sigma * eps, computed from the exact eps (not from z - mu)."""
    return _sum_event(-0.5 * (LOG_2PI + logvar + eps * eps), event_dims)


def gaussian_nll(input, target, var, eps, *, event_dims=0):
    """F.gaussian_nll_loss's terms 0.5 * (log vc + (input - target)^2 / vc), vc = max(var, eps), summed
    over ``event_dims``; the gradient passes straight through the clamp, as torch's."""
    vc = var + (var.clamp(min=eps) - var).detach()
    return _sum_event(0.5 * (torch.log(vc) + (input - target) ** 2 / vc), event_dims)


def sample_log_q(mu, logvar, z, eps, *, event_dims=1, log_q_path_only=False):
    """log q(z|x) of z = mu + sigma * eps, from the exact eps; with ``log_q_path_only`` evaluated at
    stop_grad(mu, logvar), so that its gradient flows through z only."""
    if not log_q_path_only:
        return standard_normal_log_prob(eps, logvar, event_dims=event_dims)
    m, lv = mu.detach(), logvar.detach()
    scaled = (z - m) * torch.exp(-0.5 * lv)
    return _sum_event(-0.5 * (LOG_2PI + lv + scaled * scaled), event_dims)


def sample_terms(mu, logvar, eps, event_dims=1, log_q_path_only=False, logvar_clamp=None):
    """(z, log q(z|x), KL) of the sampling op for a given eps (leading sample dims), composite; logvar clamped
    to ``logvar_clamp`` first (when given)."""
    logvar = clamp_logvar(logvar, logvar_clamp)
    z = reparameterize(mu, logvar, eps)
    log_q = sample_log_q(mu, logvar, z, eps, event_dims=event_dims, log_q_path_only=log_q_path_only)
    return z, log_q, gaussian_kl(mu, logvar, event_dims=event_dims)


def gaussian_nll_loss(input, target, var, full=False, eps=1e-6, reduction="mean"):
    """The eager baseline for the drop-in loss: PyTorch's own implementation."""
    return F.gaussian_nll_loss(input, target, var, full=full, eps=eps, reduction=reduction)


def sample_eager(mu, logvar, num_samples=None, event_dims=1, with_kl=True):
    """Eager reparameterised sampling with torch's RNG (the benchmarks' baseline)."""
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    eps = torch.randn(shape, dtype=mu.dtype, device=mu.device)
    z = reparameterize(mu, logvar, eps)
    if not with_kl:
        return z
    return z, gaussian_kl(mu, logvar, event_dims=event_dims)


# The op vae_fast::dmol_log_prob's maths (its own module: with PixelCNN++'s eager formula, the baseline).
from ._dmol_composite import dmol_log_prob  # noqa: E402,F401
