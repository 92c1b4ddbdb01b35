"""vf.patch_diffusers(): diffusers' image autoencoders build fused posteriors, and train as they did.

The convergence test trains a tiny AutoencoderKL stock and patched from the same weights. In deterministic
mode (the posterior's mode, so no noise stream is involved) the two runs must agree step by step within
float32 rounding; with sampled latents the noise streams differ (diffusers' randn against the in-kernel
Philox), so the two runs are compared by their loss over the last steps, averaged over seeds."""

from __future__ import annotations

import copy

import pytest
import torch

import vae_fast as vf

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.autoencoders import vae as diffusers_vae  # noqa: E402


@pytest.fixture
def unpatched():
    vf.unpatch_diffusers()
    yield
    vf.unpatch_diffusers()


def _tiny_autoencoder(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=2,
                         norm_num_groups=4, sample_size=16)


def test_patch_and_unpatch_swap_the_posterior_class(unpatched):
    model, x = _tiny_autoencoder(0), torch.randn(2, 3, 16, 16)
    stock = diffusers_vae.DiagonalGaussianDistribution
    assert type(model.encode(x).latent_dist) is stock
    patched = vf.patch_diffusers()
    assert "diffusers.models.autoencoders.autoencoder_kl" in patched
    assert vf.patch_diffusers() == patched  # a second call changes nothing
    posterior = model.encode(x).latent_dist
    assert isinstance(posterior, vf.DiagonalGaussianDistribution) and isinstance(posterior, stock)
    with torch.no_grad():
        reference = stock(posterior.parameters)
        torch.testing.assert_close(posterior.kl(), reference.kl(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(posterior.mode(), reference.mode())
    assert diffusers_vae.DiagonalGaussianDistribution is stock  # the video autoencoders' import is untouched
    assert set(vf.unpatch_diffusers()) == set(patched)
    assert type(model.encode(x).latent_dist) is stock


def test_patch_refuses_a_module_without_the_class(unpatched):
    with pytest.raises(ValueError, match="has no DiagonalGaussianDistribution"):
        vf.patch_diffusers(["diffusers.models.activations"])
    with pytest.raises(ImportError, match="cannot import"):
        vf.patch_diffusers(["diffusers.models.no_such_module"])


def _train(model, data, steps, sample, seed):
    """The latent-diffusion autoencoder's loss (reconstruction + a small KL weight), SGD with momentum: Adam
    would blow the rounding noise of gradients that are zero in exact arithmetic (the attention's key bias)
    up to full steps, and the two runs apart. Returns the losses."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        x = data[step % len(data)]
        posterior = model.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        rec = model.decode(z).sample
        loss = (rec - x).pow(2).mean() + 1e-3 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(4, 3, 16, 16, generator=g)  # four images, two noisy copies each: something to learn
    return [(base + 0.05 * torch.randn(base.shape, generator=g)).clamp(0, 1) * 2 - 1 for _ in range(2)]


def test_training_deterministic_mode_matches_stock(unpatched):
    stock = _tiny_autoencoder(1)
    fused = copy.deepcopy(stock)
    data = _data(1)
    want = _train(stock, data, 20, sample=False, seed=2)
    vf.patch_diffusers()
    got = _train(fused, data, 20, sample=False, seed=2)
    assert want[-1] < 0.8 * want[0]  # it learns
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=1e-5)
    for (name, a), b in zip(stock.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4, msg=name)


def test_training_with_samples_converges_as_stock(unpatched):
    """Different noise streams: the mean loss of the last 10 of 25 steps over three seeds, within 10%."""
    finals = {}
    for patched in (False, True):
        if patched:
            vf.patch_diffusers()
        runs = []
        for seed in range(3):
            model, data = _tiny_autoencoder(10 + seed), _data(10 + seed)
            runs.append(sum(_train(model, data, 25, sample=True, seed=20 + seed)[-10:]) / 10)
        finals[patched] = sum(runs) / len(runs)
    assert abs(finals[True] - finals[False]) <= 0.1 * finals[False], finals
