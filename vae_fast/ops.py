"""TEMPORARY pure-PyTorch stand-in with the public signatures; replaced by the fused custom ops."""
from __future__ import annotations
import torch
from . import reference as ref


def reparameterize(mu, logvar, num_samples=None, *, seed=None, generator=None, return_log_q=False, event_dims=1):
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    eps = torch.randn(shape, dtype=mu.dtype, device=mu.device, generator=generator)
    z = ref.reparameterize(mu, logvar, eps)
    if return_log_q:
        return z, ref.standard_normal_log_prob(eps, logvar.expand(shape), event_dims=event_dims)
    return z


def reparameterize_with_kl(mu, logvar, num_samples=None, *, seed=None, generator=None, event_dims=1):
    z = reparameterize(mu, logvar, num_samples, seed=seed, generator=generator)
    return z, ref.gaussian_kl(mu, logvar, event_dims=event_dims)


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, event_dims=1):
    return ref.gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims=event_dims)


def gaussian_log_prob(x, mean, logvar, *, event_dims=1):
    return ref.gaussian_log_prob(x, mean, logvar, event_dims=event_dims)


def bernoulli_log_prob(x, logits, *, event_dims=1):
    return ref.bernoulli_log_prob(x, logits, event_dims=event_dims)


def gaussian_nll_loss(input, target, var, full=False, eps=1e-6, reduction="mean"):
    return ref.gaussian_nll_loss(input, target, var, full, eps, reduction)
