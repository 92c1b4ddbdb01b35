"""Benchmark rows for ``vf.DiagonalGaussianDistribution`` against diffusers' class at latent-diffusion shapes.

One training step of an LDM autoencoder calls ``posterior.sample()`` and ``posterior.kl()`` on the encoder's
``(B, 2C, H, W)`` output; these rows time exactly that, forward ("fwd", under no_grad) and forward+backward
("fwd+bwd", gradient of both outputs into ``parameters``), in the schema of docs/architecture.md ("Benchmark
results"), timed with the suite's own helpers (``cases.time_row``: ``timing.time_interleaved``, ``timing.peak_mb``). The eager
baseline is diffusers' ``DiagonalGaussianDistribution`` when diffusers is installed, else the same operations in
eager PyTorch (``_EagerPosterior``; the row's ``"baseline"`` says which). ``torch.compile`` compiles that baseline (not in
quick mode, nor with ``--no-compile``).

Bytes (as ``reparameterize_with_kl``, N = latent elements, half the parameters): fwd reads mean and logvar and
writes z and the per-example KL, 3Ns + B s_out; backward reads gz, gkl, mean and logvar and writes the one
parameters gradient, Ns + B s_out + 2Ns + 2Ns.
"""

from __future__ import annotations


import torch

from ..ops import DiagonalGaussianDistribution
from .cases import Case, time_passes
from .timing import copy_gbps as measure_copy_gbps

SHAPES = [(16, 8, 64, 64), (16, 32, 32, 32)]  # latents (16, 4, 64, 64) (SD) and (16, 16, 32, 32)
QUICK_SHAPES = [(2, 8, 16, 16)]


def baseline():
    """(diffusers' class, its name), or the same operations written here."""
    try:
        import diffusers
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Theirs

        return Theirs, f"diffusers {diffusers.__version__}"
    except ImportError:
        return _EagerPosterior, "eager, diffusers' operations"


class _EagerPosterior:
    """The latent-diffusion posterior in eager PyTorch, the operations diffusers' class runs (0.42): the encoder's
    output split into mean and log-variance, the log-variance clamped to [-30, 20], the standard deviation and
    the variance each formed by an exp, z = mean + std * randn, KL to N(0, I) summed over (C, H, W)."""

    def __init__(self, parameters):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self):
        eps = torch.randn(self.mean.shape, device=self.parameters.device, dtype=self.parameters.dtype)
        return self.mean + self.std * eps

    def kl(self):
        return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def _sample_and_kl(cls):
    def call(parameters):
        posterior = cls(parameters)
        return posterior.sample(), posterior.kl()
    return call


def posterior_case(params: torch.Tensor, theirs) -> Case:
    """The suite's description of one config: bytes as ``reparameterize_with_kl``'s (z and kl out; the
    backward reads gz, gkl, mean, logvar and writes the parameters' gradient)."""
    s_out = 8 if params.dtype == torch.float64 else 4
    n, b = params.numel() // 2, params.shape[0]
    out = n * params.element_size() + b * s_out
    return Case(op="DiagonalGaussianDistribution.sample+kl", shape=list(params.shape), inputs=[params],
                      fused=_sample_and_kl(DiagonalGaussianDistribution), eager=_sample_and_kl(theirs), grads=[0],
                      bwd_reads=[0], bwd_writes=[0], out_bytes=out, g_bytes=out)


def ldm_rows(device: str, quick: bool, *, repeats: int | None = None, copy_gbps: float | None = None,
             compile_it: bool = True) -> list[dict]:
    """Rows for each latent-diffusion shape, dtype (float32; bfloat16 too on CUDA) and pass; ``copy_gbps``
    (measured here when not given) is the suite's copy bandwidth, for ``copy_fraction``; the compiled baseline
    only if ``compile_it`` and not ``quick``."""
    dev = torch.device(device)
    theirs, baseline_name = baseline()
    repeats = repeats or (5 if quick else 15)
    copy = copy_gbps or measure_copy_gbps(dev)
    dtypes = [torch.float32] + ([torch.bfloat16] if dev.type == "cuda" else [])
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        for dtype in dtypes:
            case = posterior_case(torch.randn(shape, generator=gen).to(device=dev, dtype=dtype), theirs)
            for row in time_passes(case, dtype, dev, repeats, copy, compile_it and not quick):
                rows.append({**row, "baseline": baseline_name})
    return rows
