"""The fused ops, the layer every model builds on: the public wrappers (``functional``: the Gaussian and Bernoulli
terms and the reparameterised sampler; ``nll``: the ``gaussian_nll_loss`` drop-in; ``dmol``: the discretized
mixture of logistics), the posterior drop-in (``distributions``, and ``diffusers_patch`` for diffusers' models),
and the private modules that make them custom ops: shared argument checks (``_args``), the fake kernels for
tracing (``_fake``), double backward (``_double_backward``) and the composite maths it differentiates, which the
tests also use as their float64 oracle and the benchmarks as eager PyTorch (``_composite``, ``_dmol_composite``).
"""

from . import _double_backward, _fake  # noqa: F401  (register the ops' fake kernels and double backward)
from .distributions import DiagonalGaussianDistribution
from .diffusers_patch import patch_diffusers, unpatch_diffusers
from .dmol import discretized_mix_logistic_log_prob, sample_discretized_mix_logistic
from .functional import bernoulli_log_prob, gaussian_kl, gaussian_log_prob, reparameterize, reparameterize_with_kl
from .nll import gaussian_nll_loss

__all__ = [
    "DiagonalGaussianDistribution",
    "bernoulli_log_prob",
    "discretized_mix_logistic_log_prob",
    "gaussian_kl",
    "gaussian_log_prob",
    "gaussian_nll_loss",
    "patch_diffusers",
    "reparameterize",
    "reparameterize_with_kl",
    "sample_discretized_mix_logistic",
    "unpatch_diffusers",
]
