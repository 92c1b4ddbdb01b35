"""The hierarchical VAE (vf.hierarchical_vae): its ELBO against an independent float64 computation of the same
model (every layer's KL and the likelihood, by the composite formulas), IWAE(K=1) against the ELBO, the
estimators' shapes and orderings, sampling, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

import vae_fast as vf
import vae_fast.models.hierarchical as hier
from vae_fast.ops import _composite as ref
from vae_fast.ops import _dmol_composite as dmol_ref

TINY = hier.HierarchicalConfig(8, 2, "8x1,8d2,4x1,4d4,1x1", "1x1,4m1,4x1,8m4,8x1", image_size=8)


def _levels(shape, gen, dtype=torch.float32):
    return (torch.randint(0, 256, shape, generator=gen).to(dtype) / 127.5 - 1)


def _model(likelihood="dmol", channels=3, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = vf.hierarchical_vae((channels, 8, 8), config=TINY, likelihood=likelihood, **kw).to(dtype)
    # the prior's last layer starts at zero (every prior N(0, I)): move it so the priors differ from layer to layer
    with torch.no_grad():
        for layer in m.decoder:
            layer.prior.convs[-1].weight.normal_(0, 0.3)
    return m


def _composite_elbo(model, x, zs):
    """The ELBO of ``model`` at the given draws ``zs`` (one per layer), computed here in float64 with the
    composite formulas: sum over layers of KL(q_l || p_l), and the likelihood of the decoder's output."""
    acts = model.encoder(x)
    streams, kl = {}, 0.0
    for layer, z in zip(model.decoder, zs):
        a = acts[layer.res]
        h = streams.get(layer.res, model.start[str(layer.res)].expand(a.shape[0], -1, -1, -1))
        if layer.mixin is not None:
            h = h + torch.nn.functional.interpolate(streams[layer.mixin], scale_factor=layer.res // layer.mixin)
        p_mu, p_lv, update, q_mu, q_lv = layer.distributions(h, a)
        kl = kl + ref.gaussian_kl(q_mu, q_lv, p_mu, p_lv, event_dims=3)
        streams[layer.res] = layer.advance(h, update, z)
    out = model.head(streams[model.image_shape[1]])
    if model.likelihood == "dmol":
        log_px = dmol_ref.dmol_log_prob(x, out)
    else:
        log_px = ref.bernoulli_log_prob(x, out, event_dims=3)
    return log_px - kl


def _recording_draws(monkeypatch):
    """Records each layer's z as the model draws it (the fused sampler)."""
    zs = []
    fused = hier.reparameterize

    def record(*args, **kwargs):
        out = fused(*args, **kwargs)
        zs.append(out[0] if isinstance(out, tuple) else out)
        return out

    monkeypatch.setattr(hier, "reparameterize", record)
    return zs


@pytest.mark.parametrize("likelihood,channels", [("dmol", 3), ("dmol", 1), ("bernoulli", 1)])
def test_elbo_equals_float64_composite(monkeypatch, likelihood, channels):
    gen = torch.Generator().manual_seed(1)
    model = _model(likelihood, channels)
    x = _levels((5, channels, 8, 8), gen, torch.float64)
    if likelihood == "bernoulli":
        x = (x > 0).double()
    zs = _recording_draws(monkeypatch)
    got = model.elbo(x)
    assert len(zs) == model.num_layers == 5
    want = _composite_elbo(model, x, zs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)
    # and forward's stats: the per-layer KLs sum to the KL, elbo = rec - kl
    zs.clear()
    loss, stats = model(x)
    assert stats["kl_layers"].shape == (5,) and (stats["kl_layers"] >= 0).all()
    torch.testing.assert_close(stats["kl_layers"].sum(), stats["kl"])
    torch.testing.assert_close(stats["elbo"], stats["rec"] - stats["kl"])
    torch.testing.assert_close(-loss.detach(), _composite_elbo(model, x, zs).mean(), rtol=1e-10, atol=1e-9)


def test_gradients_match_composite(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    model = _model()
    x = _levels((3, 3, 8, 8), gen, torch.float64)
    zs = _recording_draws(monkeypatch)
    torch.manual_seed(5)
    model.elbo(x).sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # the composite computation with the same eps: z_l re-formed from the layer's own (mu, logvar) so that the
    # gradient reaches the posterior through z, as the sampler's does
    eps = []
    acts = model.encoder(x)
    streams = {}
    for layer, z in zip(model.decoder, zs):
        h = streams.get(layer.res, model.start[str(layer.res)].expand(x.shape[0], -1, -1, -1))
        if layer.mixin is not None:
            h = h + torch.nn.functional.interpolate(streams[layer.mixin], scale_factor=layer.res // layer.mixin)
        _, _, update, q_mu, q_lv = layer.distributions(h, acts[layer.res])
        eps.append(((z - q_mu) * torch.exp(-0.5 * q_lv)).detach())
        streams[layer.res] = layer.advance(h, update, z.detach())

    formed = iter(eps)

    def reform(mu, logvar, *args, **kwargs):
        return mu + torch.exp(0.5 * logvar) * next(formed)

    monkeypatch.setattr(hier, "reparameterize", reform)
    monkeypatch.setattr(hier, "gaussian_kl", ref.gaussian_kl)
    monkeypatch.setattr(model, "_log_px", lambda xx, params: dmol_ref.dmol_log_prob(xx, params))
    model.elbo(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, fused[name], rtol=1e-8, atol=1e-10, msg=name)


def test_iwae_k1_is_an_unbiased_elbo():
    # IWAE with K = 1 is log p(x|z) + log p(z) - log q(z): a Monte Carlo ELBO; its mean over draws is the ELBO
    gen = torch.Generator().manual_seed(3)
    model = _model()
    x = _levels((2, 3, 8, 8), gen, torch.float64)
    torch.manual_seed(0)
    n = 200
    with torch.no_grad():
        iw = torch.stack([model.iwae(x, 1) for _ in range(n)])
        el = torch.stack([model.elbo(x) for _ in range(n)])
    diff = iw.mean(0) - el.mean(0)
    se = (iw.var(0) / n + el.var(0) / n).sqrt()
    assert (diff.abs() < 4 * se).all(), (diff, se)


def test_bounds_order_and_log_likelihood_chunks():
    gen = torch.Generator().manual_seed(4)
    model = _model()
    x = _levels((3, 3, 8, 8), gen, torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        elbo = torch.stack([model.elbo(x) for _ in range(20)]).mean(0)
        iwae = torch.stack([model.iwae(x, 16) for _ in range(20)]).mean(0)
    assert (iwae > elbo).all()
    torch.manual_seed(7)
    a = model.log_likelihood(x, 12, chunk_size=12)
    torch.manual_seed(7)
    torch.testing.assert_close(a, model.iwae(x, 12).float())  # one chunk: the same draws as iwae's
    # chunks: the streaming logsumexp of the chunks' weights is that of all of them
    log_w = torch.randn(12, 3, dtype=torch.float64) * 30
    sizes = []

    def weights(xx, acts, k):
        sizes.append(k)
        start = sum(sizes[:-1])
        return log_w[start:start + k]

    model._log_weights = weights
    got = model.log_likelihood(x, 12, chunk_size=5)
    assert sizes == [5, 5, 2]
    torch.testing.assert_close(got, (torch.logsumexp(log_w, 0) - math.log(12)).float())


def test_sample_and_reconstruct():
    model = _model(dtype=torch.float32)
    s = model.sample(4)
    assert s.shape == (4, 3, 8, 8) and s.abs().max() <= 1
    d = model.sample(4, mean=False, temperature=0.5)
    levels = (d + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # true draws lie on the 256 levels
    gen = torch.Generator().manual_seed(5)
    r = model.reconstruct(_levels((2, 3, 8, 8), gen))
    assert r.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=0.0)


def test_training_steps_lower_the_loss():
    gen = torch.Generator().manual_seed(6)
    model = _model(dtype=torch.float32)
    x = _levels((16, 3, 8, 8), gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    first = None
    for _ in range(30):
        loss, _ = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first - 0.05 * abs(first)


def test_configs_and_errors():
    for name, cfg in hier.CONFIGS.items():
        assert hier.parse_blocks(cfg.encoder_blocks, "e") and hier.parse_blocks(cfg.decoder_blocks, "d"), name
    assert vf.hierarchical_vae((3, 32, 32)).num_layers == 9
    with pytest.raises(ValueError, match="encoder_blocks"):
        vf.hierarchical_vae((3, 8, 8), config=hier.HierarchicalConfig(8, 2, "8x1,8q2", "8x1", image_size=8))
    with pytest.raises(ValueError, match="must end at the image's resolution 8"):
        vf.hierarchical_vae((3, 8, 8), config=hier.HierarchicalConfig(8, 2, "8x1,8d2", "4x1", image_size=8))
    with pytest.raises(ValueError, match="blocks are for 8x8"):
        vf.hierarchical_vae((3, 16, 16), config=TINY)
    with pytest.raises(ValueError, match="config must be one of"):
        vf.hierarchical_vae((3, 32, 32), config="huge")
    model = _model(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model.elbo(torch.zeros(2, 3, 16, 16))
    with pytest.raises(TypeError, match="from_levels"):
        model.elbo(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="single-sample ELBO"):
        model(torch.zeros(2, 3, 8, 8), objective="iwae")
    assert math.isfinite(model.elbo(-torch.ones(2, 3, 8, 8)).sum().item())


# ---- the trainer ---------------------------------------------------------------------------------------------------


@pytest.fixture()
def few_patches(cut_patches):
    cut_patches(64, 16)  # two batches of 32 an epoch


def test_train_resume_evaluate_sample(tmp_path, few_patches, capsys):
    from vae_fast.train import TrainConfig, cli, load_run, train

    settings = dict(dataset="patches", model="hvae", likelihood="dmol", batch_size=32, grad_clip=200.0,
                    skip_threshold=1e6)
    whole = train(TrainConfig(epochs=2, out=str(tmp_path / "whole"), **settings), progress=False)
    rows = whole.metrics
    assert [m["epoch"] for m in rows] == [1, 2] and all(m["skipped_updates"] == 0 for m in rows)
    assert len(rows[-1]["train_kl_layers"]) == whole.model.num_layers == 9
    assert abs(sum(rows[-1]["train_kl_layers"]) - rows[-1]["train_kl"]) < 1e-3 * abs(rows[-1]["train_kl"]) + 1e-6
    names = {p.name for p in (tmp_path / "whole").iterdir()}
    assert {"samples.png", "reconstructions.png", "kl_layers.png", "loss.png"} <= names
    # resumed after epoch 1: bitwise the run trained in one go
    part = tmp_path / "part"
    train(TrainConfig(epochs=1, out=str(part), **settings), progress=False)
    resumed = train(TrainConfig(epochs=2, out=str(part), **settings), resume=True, progress=False)
    for name, p in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], p), name
    model, cfg, _ = load_run(tmp_path / "whole")
    assert isinstance(model, vf.HierarchicalVAE) and cfg.hvae_config == "small"
    assert cli.main(["evaluate", str(tmp_path / "whole"), "--num-samples", "4", "--iwae-samples", "2"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert cli.main(["sample", str(tmp_path / "whole"), "-n", "4", "--draws", "--temperature", "0.7"]) == 0


def test_skip_threshold_skips_and_counts(tmp_path, few_patches):
    from vae_fast.train import TrainConfig, train

    cfg = TrainConfig(dataset="patches", model="hvae", likelihood="dmol", batch_size=32, epochs=1,
                      skip_threshold=1e-9, out=str(tmp_path / "run"))
    torch.manual_seed(0)
    start = vf.hierarchical_vae((3, 32, 32))  # the trainer seeds its model from cfg.seed (0): the same weights
    result = train(cfg, progress=False)
    assert result.metrics[0]["skipped_updates"] == 2  # 64 examples in batches of 32: both updates dropped
    for name, p in start.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], p), name


def test_config_errors():
    from vae_fast.train import TrainConfig

    with pytest.raises(ValueError, match="hvae_config must be small"):
        TrainConfig(dataset="patches", model="hvae", likelihood="dmol", hvae_config="big").validate()
    with pytest.raises(ValueError, match="hvae_config is the hierarchical model's"):
        TrainConfig(dataset="patches", model="conv", hvae_config="vdvae-cifar10").validate()
    with pytest.raises(ValueError, match="single-sample ELBO"):
        TrainConfig(dataset="patches", model="hvae", likelihood="dmol", objective="iwae", num_samples=5).validate()
