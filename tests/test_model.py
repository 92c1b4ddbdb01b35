"""The VAE model: API and shapes, objectives (beta, free bits, IWAE), the log-likelihood estimator, and
training quality: probabilistic PCA against its closed form, the bound ordering, fused vs reference ops."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vae_fast
import vae_fast.models.likelihoods as likelihoods_mod
import vae_fast.models.vae as model_mod
from vae_fast import ops
from vae_fast.ops import _composite as ref
from vae_fast.train import data
from vae_fast.models.vae import VAE, active_units, mlp_vae
from vae_fast.train import TrainConfig, train

PACKAGE_PARENT = str(Path(vae_fast.__file__).resolve().parent.parent)


def _digits_batch(n=32):
    train_x, _ = data.load("digits")
    return train_x[:n]


# ---- API and shapes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood,obs_logvar", [("bernoulli", "scalar"), ("gaussian", "scalar"),
                                                   ("gaussian", "per_feature"), ("gaussian", "decoder"),
                                                   ("gaussian", -1.5)])
def test_shapes_of_every_method(likelihood, obs_logvar):
    torch.manual_seed(0)
    model = mlp_vae((1, 4, 4), 3, hidden=(16,), likelihood=likelihood, obs_logvar=obs_logvar)
    x = torch.rand(5, 1, 4, 4).bernoulli()
    assert model.event_dims == 3
    for k in (1, 4):
        assert model.elbo(x, k).shape == (5,)
        assert model.iwae(x, k).shape == (5,)
        loss, stats = model(x, num_samples=k)
        assert loss.shape == () and set(stats) == {"elbo", "kl", "rec"}
        assert all(not v.requires_grad and v.shape == () for v in stats.values())
    assert model.log_likelihood(x, 7, chunk_size=3).shape == (5,)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 3)
    assert model.sample(6).shape == (6, 1, 4, 4)
    assert model.sample(6, mean=False).shape == (6, 1, 4, 4)
    assert model.reconstruct(x).shape == x.shape
    assert model.reconstruct(x, mean=False).shape == x.shape
    if likelihood == "bernoulli":
        assert ((model.sample(6) > 0) & (model.sample(6) < 1)).all()  # probabilities, not logits
        assert set(model.sample(6, mean=False).unique().tolist()) <= {0.0, 1.0}
    if isinstance(obs_logvar, float):
        assert model.observation_logvar().item() == obs_logvar
        assert all("obs_logvar" not in name for name, _ in model.named_parameters())


def test_decoder_outputs_are_scored_against_unexpanded_data(monkeypatch):
    seen = []
    fused = likelihoods_mod.bernoulli_log_prob

    def spy(x, logits, **kw):
        seen.append((tuple(x.shape), tuple(logits.shape), x.stride()))
        return fused(x, logits, **kw)

    monkeypatch.setattr(likelihoods_mod, "bernoulli_log_prob", spy)
    model = mlp_vae(64, 4, hidden=(32,))
    x = _digits_batch(8)
    model(x, num_samples=5)
    model.iwae(x, 3)
    model.log_likelihood(x, 10, chunk_size=4)
    assert [s[:2] for s in seen] == [((8, 64), (5, 8, 64)), ((8, 64), (3, 8, 64)), ((8, 64), (4, 8, 64)),
                                     ((8, 64), (4, 8, 64)), ((8, 64), (2, 8, 64))]
    assert all(s[2] == x.stride() for s in seen)  # the data itself, not an expanded view


def test_bad_arguments_raise():
    model = mlp_vae(64, 4, hidden=(32,))
    x = _digits_batch(4)
    with pytest.raises(ValueError, match="iwae"):
        model(x, num_samples=2, objective="iwae", beta=0.5)
    with pytest.raises(ValueError, match="iwae"):
        model(x, num_samples=2, objective="iwae", free_bits=0.1)
    with pytest.raises(ValueError, match="objective"):
        model(x, objective="vae")
    with pytest.raises(ValueError, match="num_samples"):
        model.elbo(x, 0)
    with pytest.raises(ValueError, match="num_samples"):
        model.log_likelihood(x, 0)
    with pytest.raises(ValueError, match="likelihood"):
        mlp_vae(64, 4, likelihood="poisson")
    with pytest.raises(ValueError, match="obs_logvar"):
        mlp_vae(64, 4, likelihood="gaussian", obs_logvar="diagonal")
    with pytest.raises(ValueError, match="2 \\* latent_dim"):
        VAE(nn.Linear(64, 5), nn.Linear(4, 64), 4).encode(x)


# ---- objectives ------------------------------------------------------------------------------------------------


def _loss(model, x, seed, **kw):
    torch.manual_seed(seed)  # the ops draw their seeds from torch's generator: same seed, same eps
    return model(x, **kw)


def test_beta_weights_the_kl():
    torch.manual_seed(0)
    model = mlp_vae(64, 4, hidden=(32,))
    x = _digits_batch()
    loss1, stats = _loss(model, x, 1, num_samples=3)
    loss0, _ = _loss(model, x, 1, num_samples=3, beta=0.0)
    loss2, _ = _loss(model, x, 1, num_samples=3, beta=2.5)
    torch.testing.assert_close(loss1, -stats["elbo"])
    torch.testing.assert_close(loss0, -stats["rec"])
    torch.testing.assert_close(loss2, -stats["rec"] + 2.5 * stats["kl"])
    mu, logvar = model.encode(x)
    torch.testing.assert_close(stats["kl"], ref.gaussian_kl(mu, logvar).mean().detach())


def test_free_bits_is_kingmas_per_dimension_floor():
    torch.manual_seed(0)
    model = mlp_vae(64, 6, hidden=(32,))
    with torch.no_grad():  # spread the dimensions' KLs around the floor
        model.encoder[1][-1].bias[:6] = torch.linspace(-1.5, 1.5, 6)
    x = _digits_batch()
    mu, logvar = (t.detach() for t in model.encode(x))
    kl_dims = ref.gaussian_kl(mu.double(), logvar.double(), event_dims=0).mean(0)
    fb = 0.4
    assert (kl_dims < fb).any() and (kl_dims > fb).any()
    loss0, stats0 = _loss(model, x, 3, num_samples=2)
    loss_fb, stats_fb = _loss(model, x, 3, num_samples=2, free_bits=fb)
    expected = kl_dims.clamp_min(fb).sum() - kl_dims.sum()
    torch.testing.assert_close((loss_fb - loss0).double(), expected, rtol=1e-4, atol=1e-4)
    assert stats_fb == stats0  # the stats report the true ELBO, not the objective

    # With every dimension under its floor, the KL term is constant: only the reconstruction has gradients.
    model.zero_grad()
    _loss(model, x, 4, free_bits=1e3)[0].backward()
    grads_fb = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _loss(model, x, 4, beta=0.0)[0].backward()
    for g_fb, p in zip(grads_fb, model.parameters()):
        torch.testing.assert_close(g_fb, p.grad)


def test_iwae_objective_is_the_iwae_bound():
    torch.manual_seed(0)
    model = mlp_vae(64, 4, hidden=(32,))
    x = _digits_batch()
    loss, _ = _loss(model, x, 5, num_samples=7, objective="iwae")
    torch.manual_seed(5)
    torch.testing.assert_close(loss, -model.iwae(x, 7).mean())


def test_observation_logvar_starts_at_zero_and_is_floored():
    floor = math.log(1e-3)
    model = mlp_vae(16, 2, hidden=(8,), likelihood="gaussian", obs_logvar="per_feature")
    assert model.observation_logvar().shape == (16,)
    torch.testing.assert_close(model.observation_logvar(), torch.zeros(16), atol=1e-6, rtol=0)
    with torch.no_grad():
        model.obs_logvar_raw.copy_(torch.linspace(-50, 5, 16))
    value = model.observation_logvar()
    assert (value >= floor).all() and value[0].item() == pytest.approx(floor, abs=1e-6)
    assert value[-1].item() == pytest.approx(5, abs=1e-3)  # no effect far above the floor
    value.sum().backward()
    g = model.obs_logvar_raw.grad
    assert ((g >= 0) & (g <= 1)).all() and g[-1].item() == pytest.approx(1, abs=1e-3)

    # The decoder's predicted log-variance gets the same floor.
    dec_model = mlp_vae(16, 2, hidden=(8,), likelihood="gaussian", obs_logvar="decoder")
    with torch.no_grad():
        dec_model.decoder[0][-1].bias[16:] = -100.0
    _, logvar = dec_model.decode(torch.zeros(3, 2))
    assert logvar.shape == (3, 16) and (logvar >= floor - 1e-6).all()


def test_a_constant_pixel_does_not_blow_up_a_learned_variance():
    """Digits has always-zero pixels: a per-pixel variance would collapse to 0 without the floor."""
    torch.manual_seed(0)
    x, _ = data.load("digits")
    model = mlp_vae(64, 4, hidden=(64,), likelihood="gaussian", obs_logvar="per_feature")
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(150):
        loss, _ = model(x[:500])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())
    constant = (x.std(0) == 0).nonzero().flatten()
    assert len(constant) > 0
    assert (model.observation_logvar()[constant] > math.log(1e-3) - 1e-4).all()


# ---- the log-likelihood estimator ------------------------------------------------------------------------------


def test_log_likelihood_chunks_agree_and_bound_the_decoder_batch():
    torch.manual_seed(0)
    model = mlp_vae(64, 4, hidden=(32,))
    x = _digits_batch(16)
    rows = []
    model.decoder.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    a = model.log_likelihood(x, 600, chunk_size=7)
    assert max(rows) == 7 * 16 and sum(rows) == 600 * 16
    b = model.log_likelihood(x, 600, chunk_size=600)
    assert not a.requires_grad
    torch.testing.assert_close(a, b, atol=0.1, rtol=0)  # independent draws: agree to MC error


def test_log_likelihood_memory_does_not_grow_with_num_samples():
    """K = 20000 on 256 examples: unchunked, one (K, B, 64) float32 tensor alone would be 1.3 GB."""
    code = (
        "import json, resource, torch, vae_fast as vf\n"
        "torch.manual_seed(0)\n"
        "m = vf.mlp_vae(64, 8, hidden=(32,))\n"
        "x = torch.rand(256, 64).bernoulli()\n"
        "m.log_likelihood(x, 500)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "ll = m.log_likelihood(x, 20000)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'growth_mb': (after - before) / 1024, 'finite': bool(torch.isfinite(ll).all())}))\n"
    )
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["finite"]
    assert result["growth_mb"] < 200, result


def test_active_units_counts_dimensions_whose_mean_varies():
    torch.manual_seed(0)
    model = mlp_vae(64, 5, hidden=(32,))
    with torch.no_grad():  # dimensions 2, 3, 4 of mu ignore the input: collapsed
        model.encoder[1][-1].weight[2:5] = 0.0
        model.encoder[1][-1].weight[:2] *= 20
    x, _ = data.load("digits")
    assert active_units(model, x) == 2
    assert active_units(model, x, threshold=1e9) == 0


# ---- training quality ------------------------------------------------------------------------------------------


def test_linear_vae_reaches_the_probabilistic_pca_maximum_likelihood():
    """A linear VAE with a learned scalar noise variance is probabilistic PCA (Tipping & Bishop 1999), whose
    maximum likelihood has a closed form; its ELBO optimum is that solution (Lucas et al. 2019)."""
    torch.manual_seed(0)
    train_x, _ = data.load("synthetic")
    n, d = train_x.shape
    q = data.synthetic_model().W.shape[1]
    eig = torch.linalg.eigvalsh(torch.cov(train_x.double().T, correction=0)).flip(0)
    noise_var = eig[q:].mean()
    ml = -0.5 * (d * math.log(2 * math.pi) + eig[:q].log().sum() + (d - q) * noise_var.log() + d)

    model = mlp_vae(d, q, hidden=(), likelihood="gaussian", obs_logvar="scalar")
    steps = 800
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = model(train_x[torch.randint(0, n, (500,), generator=gen)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    linear = model.decoder[0][0]
    W, b, s2 = linear.weight.detach(), linear.bias.detach(), model.observation_logvar().detach().exp()
    exact = data.marginal_log_prob(train_x, W, b, s2)
    assert ml - exact.mean() < 0.1, (ml.item(), exact.mean().item())

    x = train_x[:1000]
    torch.manual_seed(1)
    estimate = model.log_likelihood(x, 1000).double()
    assert abs(estimate.mean() - exact[:1000].mean()) < 0.02, (estimate.mean().item(), exact[:1000].mean().item())
    elbo = torch.stack([model.elbo(x, 100).detach().double() for _ in range(3)]).mean(0)
    assert estimate.mean() > elbo.mean()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    cfg = TrainConfig(epochs=30, hidden=[128, 64], latent_dim=8, out=str(tmp_path_factory.mktemp("digits")))
    return train(cfg, progress=False)


def test_digits_training_improves_the_test_elbo(digits_run):
    test_elbo = [m["test_elbo"] for m in digits_run.metrics]
    assert len(test_elbo) == 30 and all(math.isfinite(v) for v in test_elbo)
    assert test_elbo[-1] > test_elbo[0] + 10  # about -43 nats at epoch 1, about -25 at epoch 30
    assert test_elbo[-1] > -30
    assert max(test_elbo[-5:]) > max(test_elbo[:5])


def test_bounds_are_ordered_on_a_trained_model(digits_run):
    """ELBO <= IWAE_10 <= IWAE_100 <= log p(x), each step checked to 3 standard errors of the mean gap."""
    model = digits_run.model
    _, test_x = data.load("digits", binarize="dynamic")
    torch.manual_seed(0)
    with torch.no_grad():
        chain = [model.elbo(test_x, 10), model.iwae(test_x, 10), model.iwae(test_x, 100),
                 model.log_likelihood(test_x, 2000)]
    for lower, upper in zip(chain, chain[1:]):
        gap = (upper - lower).double()
        assert gap.mean() > -3 * gap.std() / math.sqrt(len(gap)), gap.mean()
    total = (chain[-1] - chain[0]).double()
    assert total.mean() > 3 * total.std() / math.sqrt(len(total))  # the ELBO is strictly below log p(x)


def test_log_weights_average_to_the_elbo(digits_run):
    """E_q[log p(x|z) + log p(z) - log q(z|x)] is the ELBO, whose KL the model takes in closed form: checks
    the sign and scale of log q (from the exact eps) and of the prior term on a trained posterior."""
    model = digits_run.model
    _, test_x = data.load("digits", binarize="dynamic")
    torch.manual_seed(0)
    with torch.no_grad():
        mu, logvar = model.encode(test_x)
        log_w, _ = model._log_weights(test_x, mu, logvar, 1000)
        elbo = model.elbo(test_x, 1000)
        kl = ref.gaussian_kl(mu, logvar)
    assert kl.mean() > 1  # a posterior away from the prior
    assert abs(log_w.mean() - elbo.mean()) < 0.05, (log_w.mean(), elbo.mean())


def _reference_ops(monkeypatch):
    """Make the model compute with ``_composite.py`` (autograd through plain PyTorch), drawing the very eps the
    fused sampler draws: the fused op with mu = 0, logvar = 0 returns its eps, consuming the same seed."""
    fused_sample = ops.reparameterize

    def reparameterize(mu, logvar, num_samples=None, *, return_log_q=False, event_dims=1, **kw):
        eps = fused_sample(torch.zeros_like(mu), torch.zeros_like(logvar), num_samples, **kw).detach()
        z = ref.reparameterize(mu, logvar, eps)
        if return_log_q:
            return z, ref.standard_normal_log_prob(eps, logvar, event_dims=event_dims)
        return z

    def reparameterize_with_kl(mu, logvar, num_samples=None, *, event_dims=1, **kw):
        return reparameterize(mu, logvar, num_samples, **kw), ref.gaussian_kl(mu, logvar, event_dims=event_dims)

    monkeypatch.setattr(model_mod, "reparameterize", reparameterize)
    monkeypatch.setattr(model_mod, "reparameterize_with_kl", reparameterize_with_kl)
    for module, name in ((model_mod, "gaussian_kl"), (model_mod, "gaussian_log_prob"),  # the KL, log p(z)
                         (likelihoods_mod, "gaussian_log_prob"), (likelihoods_mod, "bernoulli_log_prob")):
        monkeypatch.setattr(module, name, getattr(ref, name))


def _train_losses(objective, num_samples, steps=150):
    torch.manual_seed(0)
    model = mlp_vae(64, 8, hidden=(64,))
    x, _ = data.load("digits", binarize="fixed")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        batch = x[(step * 100) % 1500 :][:100]
        loss, _ = model(batch, num_samples=num_samples, objective=objective)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses), torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("objective,num_samples", [("elbo", 1), ("elbo", 4), ("iwae", 5)])
def test_fused_and_reference_ops_train_the_same(monkeypatch, objective, num_samples):
    """Convergence test: the same VAE trained with the fused ops and with _composite.py, same seeds and eps.
    The two differ only by float32 rounding (summation order): after 150 Adam steps, measured up to 2e-7
    (ELBO) and 5e-6 (IWAE, whose log-weights cancel) relative in every step's loss, and 1e-7 (ELBO) to 2.4e-4
    (IWAE) in the weights' relative norm: Adam turns rounding noise in near-zero gradients into +-lr steps, so
    single weights can drift by ~2e-3. Tolerances: 2e-5 relative on every loss, 1e-3 on the weights' relative
    norm; a logvar gradient 1% too large fails the loss check (7e-5)."""
    fused_losses, fused_params = _train_losses(objective, num_samples)
    with monkeypatch.context() as m:
        _reference_ops(m)
        ref_losses, ref_params = _train_losses(objective, num_samples)
    assert fused_losses[-1] < fused_losses[0] - 5  # it trained
    torch.testing.assert_close(fused_losses, ref_losses, rtol=2e-5, atol=0)
    assert (fused_params - ref_params).norm() / ref_params.norm() < 1e-3
