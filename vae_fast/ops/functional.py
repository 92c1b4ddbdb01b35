"""The public fused ops: thin wrappers over ``torch.ops.vae_fast.*``.

The C++ side checks every argument (dtype, device, shapes, event_dims) before a kernel runs and raises
TypeError / ValueError / RuntimeError naming the argument; it also holds the ops' autograd and their checks
for torch.compile (the fake kernels, ``_fake.py``, run the same checks, so compiled code reports the errors
eager code reports). These wrappers add what only Python can check (``_args.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._args import OPS, clamp_arg, num_samples_arg, require_int, require_tensor, seed_args


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, event_dims: int = 1, logvar_clamp=None,
                prior_logvar_clamp=None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) summed over the trailing `event_dims`.

    Without a prior the standard normal N(0, I). The prior arguments broadcast against mu/logvar.
    `logvar_clamp` / `prior_logvar_clamp` = (low, high): that log-variance is read as torch.clamp(lv, low, high),
    in the kernel, with torch.clamp's gradient (zero outside [low, high], passed at its edges).
    """
    require_tensor("gaussian_kl", mu=mu, logvar=logvar)
    for name, t in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if t is not None:
            require_tensor("gaussian_kl", **{name: t})
    require_int("gaussian_kl", "event_dims", event_dims)
    clamp = clamp_arg("gaussian_kl", "logvar_clamp", logvar_clamp)
    prior_clamp = clamp_arg("gaussian_kl", "prior_logvar_clamp", prior_logvar_clamp)
    return OPS.gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims, clamp, prior_clamp)


def gaussian_log_prob(x, mean, logvar, *, event_dims: int = 1, logvar_clamp=None) -> torch.Tensor:
    """log N(x; mean, exp(logvar)) summed over the trailing `event_dims`; the arguments broadcast.
    `logvar_clamp` = (low, high): logvar clamped in the kernel, as in `gaussian_kl`."""
    require_tensor("gaussian_log_prob", x=x, mean=mean, logvar=logvar)
    require_int("gaussian_log_prob", "event_dims", event_dims)
    clamp = clamp_arg("gaussian_log_prob", "logvar_clamp", logvar_clamp)
    return OPS.gaussian_log_prob(x, mean, logvar, event_dims, clamp)


def bernoulli_log_prob(x, logits, *, event_dims: int = 1) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) = sum(x * l - softplus(l)) over the trailing `event_dims`."""
    require_tensor("bernoulli_log_prob", x=x, logits=logits)
    require_int("bernoulli_log_prob", "event_dims", event_dims)
    return OPS.bernoulli_log_prob(x, logits, event_dims)


def reparameterize(mu, logvar, num_samples: Optional[int] = None, *, seed=None, generator=None,
                   return_log_q: bool = False, log_q_path_only: bool = False, event_dims: int = 1, logvar_clamp=None):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) from the in-kernel Philox stream.

    Returns z of shape mu.shape, or (num_samples, *mu.shape) when num_samples is given. With
    `return_log_q`, also log q(z|x) per example (summed over `event_dims`), computed from the exact eps.
    With `log_q_path_only`, log_q is log q(z; stop_grad(mu), stop_grad(logvar)): the same value, its
    gradient reaching mu and logvar only through z (sticking the landing; DReG). `logvar_clamp` = (low, high):
    logvar clamped in the kernel, as in `gaussian_kl`.
    """
    require_tensor("reparameterize", mu=mu, logvar=logvar)
    require_int("reparameterize", "event_dims", event_dims)
    k = num_samples_arg("reparameterize", num_samples)
    clamp = clamp_arg("reparameterize", "logvar_clamp", logvar_clamp)
    seed_t, seed_v = seed_args("reparameterize", seed, generator, mu)
    z, log_q, _ = OPS.sample_gaussian(mu, logvar, seed_t, seed_v, k, num_samples is not None, event_dims,
                                       bool(return_log_q), False, bool(log_q_path_only), clamp)
    return (z, log_q) if return_log_q else z


def reparameterize_with_kl(mu, logvar, num_samples: Optional[int] = None, *, seed=None, generator=None,
                           event_dims: int = 1, logvar_clamp=None):
    """(z, KL(q || N(0, I))) in one pass over mu and logvar; see `reparameterize` and `gaussian_kl`."""
    require_tensor("reparameterize_with_kl", mu=mu, logvar=logvar)
    require_int("reparameterize_with_kl", "event_dims", event_dims)
    k = num_samples_arg("reparameterize_with_kl", num_samples)
    clamp = clamp_arg("reparameterize_with_kl", "logvar_clamp", logvar_clamp)
    seed_t, seed_v = seed_args("reparameterize_with_kl", seed, generator, mu)
    z, _, kl = OPS.sample_gaussian(mu, logvar, seed_t, seed_v, k, num_samples is not None, event_dims, False, True,
                                    False, clamp)
    return z, kl
