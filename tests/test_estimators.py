"""Gradient estimators of vf.VAE: DReG ("iwae-dreg", Tucker et al. 2018) and sticking the landing ("elbo-stl",
Roeder et al. 2017), against float64 autograd references of their surrogates on the same eps, and DReG's
encoder-gradient SNR against IWAE's on a trained digits model (Rainforth et al. 2018)."""

from __future__ import annotations

import math

import pytest
import torch

import vae_fast as vf
from vae_fast.ops import _composite as ref
from vae_fast.train import data


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return vf.mlp_vae(6, 3, hidden=(8,)).to(dtype)


def _grads(model, loss):
    enc = torch.autograd.grad(loss, list(model.encoder.parameters()), retain_graph=True)
    dec = torch.autograd.grad(loss, list(model.decoder.parameters()))
    return enc, dec


def _same_eps(seed, mu, num_samples):
    """The eps the model's sampling op draws after torch.manual_seed(seed) (its seed comes from torch's RNG)."""
    torch.manual_seed(seed)
    zeros = torch.zeros_like(mu)
    return vf.reparameterize(zeros, zeros, num_samples)


def _reference_log_w(model, x, eps):
    """float64 log w_k with log q's parameter path stopped, and log p(x|z_k)."""
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    log_q = ref.gaussian_log_prob(z, mu.detach(), logvar.detach())
    log_pz = ref.gaussian_log_prob(z, z.new_zeros(()), z.new_zeros(()))
    log_px = ref.bernoulli_log_prob(x, model.decode(z), event_dims=1)
    return log_px + log_pz - log_q


@pytest.mark.parametrize("num_samples", [1, 7])
def test_dreg_gradients_equal_the_surrogate_reference(num_samples):
    model = _model()
    x = torch.rand(5, 6, dtype=torch.float64).bernoulli()
    torch.manual_seed(11)
    loss, _ = model(x, num_samples=num_samples, objective="iwae-dreg")
    enc, dec = _grads(model, loss)

    mu, _ = model.encode(x)
    log_w = _reference_log_w(model, x, _same_eps(11, mu, num_samples))
    w = torch.softmax(log_w.detach(), dim=0)
    iwae = (torch.logsumexp(log_w, 0) - math.log(num_samples)).mean()
    ref_enc = torch.autograd.grad(-(w**2 * log_w).sum(0).mean(), list(model.encoder.parameters()), retain_graph=True)
    ref_dec = torch.autograd.grad(-iwae, list(model.decoder.parameters()))

    torch.testing.assert_close(loss, -iwae, rtol=1e-12, atol=1e-12)  # the value is the IWAE bound
    for got, want in zip(enc + dec, ref_enc + ref_dec):
        assert want.abs().max() > 1e-6  # a gradient that could be wrong
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_dreg_decoder_gradient_and_value_are_iwaes_on_the_same_eps():
    model = _model()
    x = torch.rand(9, 6, dtype=torch.float64).bernoulli()
    out = {}
    for objective in ("iwae", "iwae-dreg"):
        torch.manual_seed(5)
        loss, stats = model(x, num_samples=16, objective=objective)
        out[objective] = (loss.detach(), stats, *_grads(model, loss))
    (l_i, s_i, enc_i, dec_i), (l_d, s_d, enc_d, dec_d) = out["iwae"], out["iwae-dreg"]
    torch.testing.assert_close(l_d, l_i, rtol=1e-13, atol=0)
    assert s_d == s_i or all(torch.allclose(s_d[k], s_i[k], rtol=1e-13) for k in s_i)
    for a, b in zip(dec_d, dec_i):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # ... while the encoder's differs (else the test above would not tell the estimators apart)
    assert max((a - b).abs().max() for a, b in zip(enc_d, enc_i)) > 1e-4


def test_elbo_stl_gradients_equal_the_surrogate_reference():
    model = _model()
    x = torch.rand(5, 6, dtype=torch.float64).bernoulli()
    for beta in (1.0, 0.3):
        torch.manual_seed(3)
        loss, stats = model(x, num_samples=4, objective="elbo-stl", beta=beta)
        enc, dec = _grads(model, loss)
        mu, _ = model.encode(x)
        eps = _same_eps(3, mu, 4)
        log_w = _reference_log_w(model, x, eps)
        z = mu + torch.exp(0.5 * model.encode(x)[1]) * eps
        log_px = ref.bernoulli_log_prob(x, model.decode(z), event_dims=1)
        want = -(log_px + beta * (log_w - log_px)).mean()
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        for got, w in zip(enc + dec, torch.autograd.grad(want, list(model.parameters()))):
            torch.testing.assert_close(got, w, rtol=1e-9, atol=1e-11)
        assert set(stats) == {"elbo", "kl", "rec"}


def test_dreg_with_one_sample_is_stl():
    model = _model()
    x = torch.rand(5, 6, dtype=torch.float64).bernoulli()
    grads = {}
    for objective in ("iwae-dreg", "elbo-stl"):
        torch.manual_seed(8)
        grads[objective] = torch.autograd.grad(model(x, objective=objective)[0], list(model.parameters()))
    for a, b in zip(grads["iwae-dreg"], grads["elbo-stl"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("objective,kwargs", [("iwae-dreg", {"beta": 0.5}), ("iwae-dreg", {"free_bits": 0.1}),
                                              ("elbo-stl", {"free_bits": 0.1}), ("dreg", {})])
def test_bad_objective_arguments(objective, kwargs):
    model = _model(torch.float32)
    with pytest.raises(ValueError, match="objective|free_bits"):
        model(torch.rand(2, 6), num_samples=2, objective=objective, **kwargs)


def test_dreg_without_grad_is_the_iwae_bound():
    model = _model()
    x = torch.rand(4, 6, dtype=torch.float64).bernoulli()
    torch.manual_seed(2)
    with torch.no_grad():
        loss, _ = model(x, num_samples=8, objective="iwae-dreg")
    torch.manual_seed(2)
    torch.testing.assert_close(loss, -model.iwae(x, 8).mean(), rtol=1e-13, atol=0)


def test_dreg_encoder_snr_far_above_iwae_on_a_trained_digits_model():
    """Rainforth et al. (2018): IWAE's encoder gradient gets noisier relative to its signal as K grows; DReG's
    does not. At K = 64 on a digits model trained for a few epochs, DReG's SNR is several times IWAE's (about
    6x with many draws, see scripts/snr_curve.py; the threshold leaves room for the noise of 24 draws)."""
    torch.manual_seed(0)
    train_x, _ = data.load("digits")
    model = vf.mlp_vae(64, 8, hidden=(64,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(4):
        for batch in train_x[torch.randperm(len(train_x))].split(128):
            loss, _ = model(batch.bernoulli(), num_samples=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    x = train_x[:16].bernoulli()
    snr = {obj: vf.gradient_snr(model, x, 64, obj, repeats=24) for obj in ("iwae", "iwae-dreg")}
    print(f"encoder gradient SNR at K=64: {snr}")
    assert snr["iwae-dreg"] > 0.3 and snr["iwae-dreg"] > 3 * snr["iwae"], snr


def test_gradient_snr_of_a_noiseless_gradient_is_infinite():
    model = _model()
    x = torch.rand(3, 6, dtype=torch.float64).bernoulli()
    # The decoder's bias gets the same gradient from every draw when the decoder is fed mu only: no noise.
    bias = model.decoder[0][-1].bias
    with torch.no_grad():
        model.encoder[1][-1].weight[3:].fill_(0)
        model.encoder[1][-1].bias[3:].fill_(-200.0)  # logvar = -200: z = mu to float64 precision
    assert vf.gradient_snr(model, x, 2, "iwae", repeats=3, params=[bias]) > 1e6


def test_dreg_under_torch_compile_equals_eager():
    """The weights reach the gradient scaling after the forward (through a list): compiled code must agree."""
    model = _model()
    x = torch.rand(5, 6, dtype=torch.float64).bernoulli()
    out = []
    for m in (model, torch.compile(model, backend="aot_eager")):
        torch.manual_seed(1)
        loss, _ = m(x, num_samples=4, objective="iwae-dreg")
        out.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-13, atol=0)
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
