"""The models built on the fused ops: the VAE and its estimators (``vae``: ELBO, IWAE, log-likelihood; the MLP
model), the convolutional VAE for images (``conv``), and the observation models p(x|z) each defined once
(``likelihoods``)."""

from .conv import conv_vae
from .likelihoods import bits_per_dim
from .vae import VAE, active_units, gradient_snr, mlp_vae

__all__ = ["VAE", "active_units", "bits_per_dim", "conv_vae", "gradient_snr", "mlp_vae"]
