"""vae_fast: the VAE training objective as fused, exact PyTorch custom ops (CPU and CUDA).

The layers, each a subpackage importing only those before it: ``ops`` (the fused ops), ``models`` (the VAEs
built on them), ``train`` (the trainer, its data and command line), ``bench`` (the benchmarks).
"""

from .models import HierarchicalVAE, VAE, active_units, bits_per_dim, conv_vae, gradient_snr, hierarchical_vae, mlp_vae
from .ops import (
    DiagonalGaussianDistribution,
    bernoulli_log_prob,
    discretized_mix_logistic_log_prob,
    gaussian_kl,
    gaussian_log_prob,
    gaussian_nll_loss,
    patch_diffusers,
    reparameterize,
    reparameterize_with_kl,
    sample_discretized_mix_logistic,
    unpatch_diffusers,
)
from .train import data

__version__ = "0.1.0"

__all__ = [
    "DiagonalGaussianDistribution",
    "HierarchicalVAE",
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
    "hierarchical_vae",
    "mlp_vae",
    "patch_diffusers",
    "reparameterize",
    "reparameterize_with_kl",
    "sample_discretized_mix_logistic",
    "unpatch_diffusers",
]
