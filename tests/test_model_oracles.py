"""The model's bounds against independent oracles: ELBO, IWAE and the importance-sampled log-likelihood
recomputed here in float64 with torch.distributions from the very eps the model drew, for K = 1, 5, 50.

Nothing here calls model.py's code: the oracle uses only the model's encoder and decoder networks, its
observation log-variance parameters (with the documented smooth floor) and the eps stream (itself checked
against the documented Philox stream in test_known_answers.py).
The model's ops draw their seeds from torch's generator, so resetting it and drawing eps with mu = 0,
logvar = 0 (z = eps) reproduces each draw."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

import vae_fast as vf
from vae_fast.train import data
from vae_fast.models.vae import mlp_vae

B, LATENT = 12, 4


def draw_eps(seed, num_samples, chunk=None):
    """The eps the model's sampling calls draw after torch.manual_seed(seed): one (K, B, L) draw, or one
    draw per chunk of samples in order (log_likelihood draws a fresh seed for each chunk)."""
    torch.manual_seed(seed)
    zeros = torch.zeros(B, LATENT, dtype=torch.float64)
    sizes = [num_samples] if chunk is None else [min(chunk, num_samples - s) for s in range(0, num_samples, chunk)]
    return torch.cat([vf.reparameterize(zeros, zeros, k) for k in sizes])


# Observation models: Bernoulli; Gaussian with a fixed, a learned per-pixel, or a predicted log-variance
# (the last two on 1x8x8 images, event_dims = 3). Learned values are set away from their start (0).
MODELS = ["bernoulli", "gaussian-fixed", "gaussian-per_feature-image", "gaussian-decoder-image"]


def make_model(kind):
    torch.manual_seed(0)
    likelihood, *mode = kind.split("-")
    image = mode[-1:] == ["image"]
    obs = {"obs_logvar": -1.0 if mode[0] == "fixed" else mode[0]} if mode else {}
    model = mlp_vae((1, 8, 8) if image else 64, LATENT, hidden=(32,), likelihood=likelihood, **obs).double()
    with torch.no_grad():  # a posterior away from the prior, so the bounds differ visibly
        model.encoder[-1][-1].bias[:LATENT] += torch.linspace(-1.0, 1.0, LATENT, dtype=torch.float64)
        if mode and mode[0] == "per_feature":
            model.obs_logvar_raw.copy_(torch.linspace(-8.0, 1.0, 64, dtype=torch.float64).reshape(1, 8, 8))
    x = data.load("digits", binarize="fixed")[0][:B].double()
    return model, (x.reshape(B, 1, 8, 8) if image else x)


def observation_model(model, out, event_dims):
    """p(x|z) from the decoder's output, by the documented parametrisation: Bernoulli logits, or a Gaussian
    mean with log-variance fixed, learned or predicted (the second half of the last dimension), learned and
    predicted ones floored smoothly: floor + softplus(raw - floor)."""
    def floored(raw):
        return model.min_obs_logvar + torch.nn.functional.softplus(raw - model.min_obs_logvar)

    if model.likelihood == "bernoulli":
        return D.Independent(D.Bernoulli(logits=out), event_dims)
    if model.obs_logvar_mode == "fixed":
        mean, logvar = out, model.obs_logvar_fixed
    elif model.obs_logvar_mode == "decoder":
        mean, raw = out.chunk(2, dim=-1)
        logvar = floored(raw)
    else:
        mean, logvar = out, floored(model.obs_logvar_raw)
    return D.Independent(D.Normal(mean, torch.exp(0.5 * logvar).expand_as(mean)), event_dims)


def oracle(model, x, eps):
    """Per example (B,): the ELBO (K-sample reconstruction, closed-form KL), the Monte Carlo ELBO
    mean_k log w_k, and the IWAE bound log mean_k exp(log w_k), all from the given eps (K, B, L)."""
    with torch.no_grad():
        mu, logvar = model.encoder(x).chunk(2, dim=-1)
        q = D.Independent(D.Normal(mu, torch.exp(0.5 * logvar)), 1)
        prior = D.Independent(D.Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
        z = mu + torch.exp(0.5 * logvar) * eps
        out = model.decoder(z.reshape(-1, LATENT))
        out = out.reshape(*z.shape[:2], *out.shape[1:])
        log_px = observation_model(model, out, x.dim() - 1).log_prob(x)
        log_w = log_px + prior.log_prob(z) - q.log_prob(z)
        k = eps.shape[0]
        return {
            "elbo": log_px.mean(0) - D.kl_divergence(q, prior),
            "mc_elbo": log_w.mean(0),
            "iwae": torch.logsumexp(log_w, 0) - math.log(k),
        }


CLOSE = {"rtol": 1e-9, "atol": 1e-9}  # float64 throughout: only summation order differs


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("k", [1, 5, 50])
def test_elbo_and_iwae_match_the_oracle(kind, k):
    model, x = make_model(kind)
    eps = draw_eps(1, k)
    expected = oracle(model, x, eps)
    torch.manual_seed(1)
    torch.testing.assert_close(model.elbo(x, k).detach(), expected["elbo"], **CLOSE)
    torch.manual_seed(1)
    iwae = model.iwae(x, k).detach()
    torch.testing.assert_close(iwae, expected["iwae"], **CLOSE)
    # The gap: IWAE_K >= the mean of the same K log-weights, equal for K = 1 and strictly above for K > 1
    # (Jensen; the log-weights of an untrained model spread over several nats).
    gap = iwae - expected["mc_elbo"]
    if k == 1:
        torch.testing.assert_close(gap, torch.zeros_like(gap), **CLOSE)
    else:
        assert (gap > 1e-3).all(), gap


@pytest.mark.parametrize("k", [1, 5, 50])
def test_training_losses_match_the_oracle(k):
    model, x = make_model("bernoulli")
    eps = draw_eps(2, k)
    expected = oracle(model, x, eps)
    torch.manual_seed(2)
    loss, stats = model(x, num_samples=k)
    torch.testing.assert_close(loss.detach(), -expected["elbo"].mean(), **CLOSE)
    torch.testing.assert_close(stats["elbo"], expected["elbo"].mean(), **CLOSE)
    torch.manual_seed(2)
    loss, _ = model(x, num_samples=k, objective="iwae")
    torch.testing.assert_close(loss.detach(), -expected["iwae"].mean(), **CLOSE)
    if k > 1:  # the IWAE objective is a tighter bound than the ELBO of the same samples
        assert -loss.item() > expected["mc_elbo"].mean().item() + 1e-3


@pytest.mark.parametrize("num_samples, chunk", [(1, None), (5, 2), (50, 50), (50, 7)])
def test_log_likelihood_matches_the_oracle(num_samples, chunk):
    model, x = make_model("bernoulli")
    eps = draw_eps(3, num_samples, chunk=chunk if chunk is not None else num_samples)
    expected = oracle(model, x, eps)
    torch.manual_seed(3)
    ll = model.log_likelihood(x, num_samples, chunk_size=chunk)
    # log_likelihood accumulates its logsumexp in float32 (memory-lean for huge K): float32 rounding of
    # log-weights of tens of nats.
    torch.testing.assert_close(ll.double(), expected["iwae"], rtol=1e-6, atol=1e-5)

