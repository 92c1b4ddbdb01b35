"""Convolutional VAEs: shapes of every method for flat and spatial latents and every Gaussian variance, the
spatial latent's ELBO against torch.distributions, a few training steps, bad arguments, and conv runs through the
trainer and the CLI (save, evaluate with bits per dimension, sample), colour figures included."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributions as D

import vae_fast as vf
from vae_fast.train import cli, data, plots
from vae_fast.train import TrainConfig, load_run, train

VARIANTS = [("bernoulli", "scalar"), ("gaussian", "scalar"), ("gaussian", "per_feature"), ("gaussian", "decoder"),
            ("gaussian", -2.0)]


@pytest.mark.parametrize("image_shape,latent", [((1, 8, 8), {"latent_dim": 5}), ((3, 16, 12), {"latent_channels": 2})])
@pytest.mark.parametrize("likelihood,obs_logvar", VARIANTS)
def test_shapes_of_every_method(image_shape, latent, likelihood, obs_logvar):
    torch.manual_seed(0)
    model = vf.conv_vae(image_shape, **latent, likelihood=likelihood, obs_logvar=obs_logvar, channels=(4, 8))
    c, h, w = image_shape
    latent_shape = (5,) if "latent_dim" in latent else (2, h // 4, w // 4)
    assert model.latent_shape == latent_shape and model.latent_dim == math.prod(latent_shape)
    assert model.event_dims == 3
    x = torch.rand(3, *image_shape).round()
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, *latent_shape)
    for k in (1, 3):
        assert model.elbo(x, k).shape == model.iwae(x, k).shape == (3,)
    for objective, kw in (("elbo", {"free_bits": 0.1}), ("iwae-dreg", {}), ("elbo-stl", {})):
        loss, stats = model(x, num_samples=3, objective=objective, **kw)
        loss.backward()
        assert loss.shape == () and math.isfinite(loss.item())
    assert model.log_likelihood(x, 7, chunk_size=3).shape == (3,)
    for mean in (True, False):
        assert model.sample(2, mean=mean).shape == (2, *image_shape)
        assert model.reconstruct(x, mean=mean).shape == x.shape
    out = model.decoder(torch.zeros(1, *latent_shape))
    assert out.shape == (1, 2 * c if obs_logvar == "decoder" else c, h, w)  # mean, then logvar, on the channels
    if obs_logvar == "per_feature":
        assert model.observation_logvar().shape == image_shape
    assert 0 <= vf.active_units(model, x) <= model.latent_dim


def test_spatial_latent_elbo_against_torch_distributions():
    """The KL, log q and log p(z) of a (C, H, W) latent are summed over all three dims (event_dims=3): the
    fused ELBO and IWAE equal torch.distributions' from the same eps."""
    torch.manual_seed(0)
    model = vf.conv_vae((1, 8, 8), latent_channels=3, channels=(4, 8)).double()
    with torch.no_grad():
        model.encoder[-1].bias[:3] += torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)  # away from the prior
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64).round()
    k = 5
    torch.manual_seed(1)
    elbo = model.elbo(x, k)
    torch.manual_seed(1)
    iwae = model.iwae(x, k)
    mu, logvar = (t.detach() for t in model.encode(x))
    torch.manual_seed(1)  # the same seed draw: eps of the fused sampler at mu = 0, logvar = 0
    eps = vf.reparameterize(torch.zeros_like(mu), torch.zeros_like(logvar), k)
    z = mu + torch.exp(0.5 * logvar) * eps
    q = D.Independent(D.Normal(mu, torch.exp(0.5 * logvar)), 3)
    prior = D.Independent(D.Normal(torch.zeros_like(mu), torch.ones_like(mu)), 3)
    with torch.no_grad():
        logits = model.decoder(z.reshape(-1, 3, 2, 2)).reshape(k, 4, 1, 8, 8)
    log_px = D.Independent(D.Bernoulli(logits=logits), 3).log_prob(x)
    torch.testing.assert_close(elbo.detach(), log_px.mean(0) - D.kl_divergence(q, prior))
    log_w = log_px + prior.log_prob(z) - q.log_prob(z)
    torch.testing.assert_close(iwae.detach(), torch.logsumexp(log_w, 0) - math.log(k))


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    x = data.as_images(data.load("digits", binarize="fixed")[0][:64], "digits")
    for latent in ({"latent_dim": 4}, {"latent_channels": 1}):
        model = vf.conv_vae((1, 8, 8), **latent, channels=(8, 16))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(30):
            loss, _ = model(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        # Measured: 44.2 -> 29.4 nats (flat), 44.5 -> 31.1 (spatial), mean of the first and last 5 steps.
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, (latent, losses[:5], losses[-5:])


def test_bad_arguments_name_themselves():
    cases = [
        (dict(image_shape=(28, 28), latent_dim=2), "image_shape must be \\(C, H, W\\), three positive ints"),
        (dict(image_shape=(1, 28.0, 28), latent_dim=2), "image_shape must be"),
        (dict(image_shape=(1, 10, 8), latent_dim=2), "H and W must be multiples of 4 .* got H=10, W=8"),
        (dict(image_shape=(1, 8, 8)), "exactly one of latent_dim .* and latent_channels"),
        (dict(image_shape=(1, 8, 8), latent_dim=2, latent_channels=2), "exactly one of latent_dim"),
        (dict(image_shape=(1, 8, 8), latent_dim=0), "latent_dim must be a positive int, got 0"),
        (dict(image_shape=(1, 8, 8), latent_channels=True), "latent_channels must be a positive int"),
        (dict(image_shape=(1, 8, 8), latent_dim=2, channels=()), "channels must be one or more positive ints"),
        (dict(image_shape=(1, 8, 8), latent_dim=2, likelihood="gaussian", obs_logvar="diag"), "obs_logvar must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            vf.conv_vae(**kwargs)
    assert vf.conv_vae((1, 16, 16), 2, channels=(4, 4, 4)).latent_shape == (2,)  # 3 halvings: 16 is a multiple of 8
    model = vf.conv_vae((3, 8, 8), 2)
    with pytest.raises(ValueError, match="x must be a batch of images of shape \\(B, 3, 8, 8\\) for this model, "
                                         "got \\(2, 1, 8, 8\\)"):
        model.elbo(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="got \\(2, 192\\)"):
        model(torch.zeros(2, 192))
    with pytest.raises(ValueError, match="latent_dim must be a positive int or a shape"):
        vf.VAE(torch.nn.Identity(), torch.nn.Identity(), (2, 0, 2))
    with pytest.raises(ValueError, match="encoder output must end in \\(2 \\* C, \\*rest\\)"):
        vf.VAE(torch.nn.Identity(), torch.nn.Identity(), (2, 3, 3)).encode(torch.zeros(1, 4, 3, 2))


def test_sample_temperature_and_draws():
    torch.manual_seed(0)
    model = vf.conv_vae((3, 8, 8), latent_channels=2, likelihood="dmol")
    torch.manual_seed(1)
    got = model.sample(4, temperature=0.5)
    torch.manual_seed(1)
    z = torch.randn(4, *model.latent_shape)
    with torch.no_grad():
        want = model.decode_mean(0.5 * z)
    torch.testing.assert_close(got, want)  # z ~ N(0, T^2 I): the prior's draws scaled by T
    draws = model.sample(16, mean=False, temperature=0.7)
    k = (draws.double() + 1) * 127.5
    assert (k - k.round()).abs().max() < 1e-4 and draws.min() >= -1 and draws.max() <= 1  # the 256 levels (float32)
    assert torch.isfinite(vf.discretized_mix_logistic_log_prob(draws, model.decode(torch.zeros(16, 2, 2, 2)))).all()
    bern = vf.conv_vae((1, 8, 8), latent_channels=2)
    assert set(bern.sample(8, mean=False).unique().tolist()) <= {0.0, 1.0}
    for bad in (0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            model.sample(2, temperature=bad)


def test_colour_figures(tmp_path):
    torch.manual_seed(0)
    model = vf.conv_vae((3, 8, 8), 2, channels=(4, 8)).eval()
    x = torch.rand(16, 3, 8, 8)
    assert plots.save_reconstructions(model, x, tmp_path / "r.png")
    assert plots.save_samples(model, tmp_path / "s.png", n=8)
    assert plots.save_manifold(model, tmp_path / "m.png", n=3)
    for name in ("r.png", "s.png", "m.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    images = plots._as_images(x)
    assert images.shape == (16, 8, 8, 3) and torch.equal(images[3, 2, 1], x[3, :, 2, 1])
    assert plots._grid(images, 8).shape == (2 * 9 + 1, 8 * 9 + 1, 3)
    assert torch.equal(plots._as_images(2 * x - 1, "signed"), plots._as_images(x))  # mapped back to [0, 1]
    assert plots._as_images(torch.rand(4, 2, 8, 8)) is None  # 2 channels: not something to draw
    # Reconstructions of examples spread through the set (patches' test crops run region by region).
    seen = []
    reconstruct = model.reconstruct
    model.reconstruct = lambda batch: seen.append(batch) or reconstruct(batch)
    plots.save_reconstructions(model, torch.arange(40.0).reshape(40, 1, 1, 1).expand(40, 3, 8, 8) / 40,
                               tmp_path / "r.png", n=4)
    assert seen[0][:, 0, 0, 0].mul(40).round().tolist() == [0, 13, 26, 39]
    assert not plots.save_manifold(vf.conv_vae((1, 8, 8), latent_channels=2), tmp_path / "none.png")


@pytest.fixture()
def small_patches(cut_patches):
    cut_patches(200, 40)


def test_conv_gaussian_run_on_colour_patches(tmp_path, small_patches, capsys):
    out = tmp_path / "run"
    cfg = TrainConfig(dataset="patches", model="conv", likelihood="gaussian", latent_channels=2, epochs=2,
                      batch_size=100, out=str(out))
    result = train(cfg, progress=False)
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    assert result.metrics[-1]["train_elbo"] > result.metrics[0]["train_elbo"]
    assert "bits/dim)" in result.summary.splitlines()[0]
    assert {"reconstructions.png", "samples.png", "loss.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "config.json").read_text())
    assert (saved["model"], saved["latent_channels"], saved["likelihood"]) == ("conv", 2, "gaussian")
    model, cfg2, ckpt = load_run(out)
    assert model.latent_shape == (2, 8, 8) and ckpt["input_dim"] == [3, 32, 32]
    for name, p in result.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p)

    assert cli.main(["evaluate", str(out), "--num-samples", "10", "--iwae-samples", "5"]) == 0
    stdout = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    # A density of dequantised 8-bit data: bits/dim = 8 - log p(x) / (3072 ln 2), bins of 1/256.
    assert result["bits_per_dim_bin_width"] == 1 / 256
    assert result["test_bits_per_dim"] == pytest.approx(8 - result["test_log_likelihood"] / (3072 * math.log(2)))
    assert 0 < result["test_bits_per_dim"] < result["test_elbo_bits_per_dim"]
    row = next(line for line in stdout.splitlines() if line.split()[0] == "bits/dim")
    assert row.split()[1] == f"{result['test_bits_per_dim']:.4f}"
    assert row.endswith("ELBO: {:.4f}; 3072 dims, dequantised, bins of 0.00390625)".format(
        result["test_elbo_bits_per_dim"]))


def test_conv_cli_round_trip_on_digits(tmp_path, capsys):
    """train --model conv --latent-channels, then evaluate and sample rebuild the model from the run."""
    out = tmp_path / "run"
    argv = ["train", "--model", "conv", "--latent-channels", "1", "--epochs", "1", "--batch-size", "300",
            "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "done: epoch 1/1" in first and "bits/dim" in first
    assert cli.main(["evaluate", str(out), "--num-samples", "5", "--iwae-samples", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].split()[0] == "bits/dim" and lines[5].split()[:2] == ["active", "units"]
    assert lines[5].split()[-1] == "4"  # 1 x 2 x 2 latent dimensions
    assert cli.main(["sample", str(out), "-n", "4"]) == 0
    assert (out / "sample-seed0.png").read_bytes()[:4] == b"\x89PNG"
    # Resuming with another model or latent is refused; the flags are checked before anything runs.
    assert cli.main([*argv[:-1], "--resume", "--latent-channels", "2", "--epochs", "2"]) == 1
    assert "--latent-channels 2 (saved: 1)" in capsys.readouterr().err
    assert cli.main(["train", "--latent-channels", "2", "--out", str(tmp_path / "x")]) == 1
    assert "--latent-channels (a spatial latent) needs --model conv" in capsys.readouterr().err
    assert cli.main(["train", "--model", "conv", "--dataset", "synthetic", "--out", str(tmp_path / "y")]) == 1
    assert "--model conv: data set 'synthetic' is not images" in capsys.readouterr().err
