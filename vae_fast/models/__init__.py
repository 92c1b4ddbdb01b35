"""The models built on the fused ops: the VAE and its estimators (``vae``: ELBO, IWAE, log-likelihood; the MLP
model), the convolutional VAE for images (``conv``), the hierarchical VAE (``hierarchical``: VDVAE's design) and
the observation models p(x|z), each defined once (``likelihoods``)."""

from .conv import conv_vae
from .hierarchical import HierarchicalVAE, hierarchical_vae
from .likelihoods import bits_per_dim
from .vae import VAE, active_units, gradient_snr, mlp_vae

__all__ = ["HierarchicalVAE", "VAE", "active_units", "bits_per_dim", "conv_vae", "gradient_snr", "hierarchical_vae",
           "mlp_vae"]
