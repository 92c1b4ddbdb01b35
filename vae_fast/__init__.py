"""vae_fast: the VAE training objective as fused, exact PyTorch custom ops (CPU and CUDA)."""

from .ops import (
    bernoulli_log_prob,
    gaussian_kl,
    gaussian_log_prob,
    gaussian_nll_loss,
    reparameterize,
    reparameterize_with_kl,
)
from . import data
from .conv import conv_vae
from .dmol import discretized_mix_logistic_log_prob, sample_discretized_mix_logistic
from .distributions import DiagonalGaussianDistribution
from .likelihoods import bits_per_dim
from .model import VAE, active_units, gradient_snr, mlp_vae
from .patch import patch_diffusers, unpatch_diffusers

__version__ = "0.1.0"

__all__ = [
    "DiagonalGaussianDistribution",
    "VAE",
    "active_units",
    "bernoulli_log_prob",
    "bits_per_dim",
    "conv_vae",
    "data",
    "discretized_mix_logistic_log_prob",
    "gaussian_kl",
    "gaussian_log_prob",
    "gaussian_nll_loss",
    "gradient_snr",
    "mlp_vae",
    "patch_diffusers",
    "reparameterize",
    "reparameterize_with_kl",
    "sample_discretized_mix_logistic",
    "unpatch_diffusers",
]
