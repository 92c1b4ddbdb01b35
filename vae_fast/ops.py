"""The public fused ops: thin wrappers over ``torch.ops.vae_fast.*`` (csrc/ops.cpp), their autograd
formulas (which call the fused backward kernels) and fake kernels (shapes for torch.compile).

The C++ side checks every argument (dtype, device, shapes, event_dims) before a kernel runs and
raises TypeError / ValueError / RuntimeError naming the argument; these wrappers add the checks that
only Python can make (non-tensor arguments) and draw the RNG seeds.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.vae_fast.*)

_ops = torch.ops.vae_fast
LOG_2PI = math.log(2.0 * math.pi)
_SEED_HIGH = 2**62


# ------------------------------------------------------------------------------------------------
# Argument helpers
# ------------------------------------------------------------------------------------------------
def _require_tensor(fn: str, **tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vae_fast.{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}")


def _require_event_dims(fn: str, event_dims) -> None:
    if isinstance(event_dims, bool) or not isinstance(event_dims, int):
        raise TypeError(f"vae_fast.{fn}: event_dims must be an int, got {type(event_dims).__name__}")


def _acc_dtype(*tensors) -> torch.dtype:
    """Reductions come out in float64 for float64 inputs, else float32 (half/bf16 are summed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _seed_tensor(seed, generator, device: torch.device) -> torch.Tensor:
    """A 1-element int64 seed on `device`: drawn from torch's generator (or `generator`), or given."""
    if seed is None:
        gen_device = generator.device if generator is not None else device
        drawn = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=gen_device, generator=generator)
        return drawn.to(device)
    if generator is not None:
        raise ValueError("vae_fast: give seed= or generator=, not both")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"vae_fast: seed must be an int or a 1-element int64 tensor, got {seed.dtype} of shape "
                            f"{tuple(seed.shape)}")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"vae_fast: seed must be an int or a 1-element int64 tensor, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"vae_fast: seed must fit in 64 bits, got {seed}")
    signed = seed - 2**64 if seed >= 2**63 else seed
    return torch.tensor([signed], dtype=torch.int64, device=device)


def _num_samples(fn: str, num_samples) -> int:
    if num_samples is None:
        return 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"vae_fast.{fn}: num_samples must be an int or None, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"vae_fast.{fn}: num_samples must be >= 1, got {num_samples}")
    return num_samples


# ------------------------------------------------------------------------------------------------
# Public ops
# ------------------------------------------------------------------------------------------------
def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, event_dims: int = 1) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) summed over the trailing `event_dims`.

    Without a prior the standard normal N(0, I). The prior arguments broadcast against mu/logvar.
    """
    _require_tensor("gaussian_kl", mu=mu, logvar=logvar)
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError("vae_fast.gaussian_kl: prior_mu and prior_logvar must be given together or not at all")
    if prior_mu is not None:
        _require_tensor("gaussian_kl", prior_mu=prior_mu, prior_logvar=prior_logvar)
    _require_event_dims("gaussian_kl", event_dims)
    return _ops.gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims)


def gaussian_log_prob(x, mean, logvar, *, event_dims: int = 1) -> torch.Tensor:
    """log N(x; mean, exp(logvar)) summed over the trailing `event_dims`; the arguments broadcast."""
    _require_tensor("gaussian_log_prob", x=x, mean=mean, logvar=logvar)
    _require_event_dims("gaussian_log_prob", event_dims)
    return _ops.gaussian_log_prob(x, mean, logvar, event_dims)


def bernoulli_log_prob(x, logits, *, event_dims: int = 1) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) = sum(x * l - softplus(l)) over the trailing `event_dims`."""
    _require_tensor("bernoulli_log_prob", x=x, logits=logits)
    _require_event_dims("bernoulli_log_prob", event_dims)
    return _ops.bernoulli_log_prob(x, logits, event_dims)


def reparameterize(mu, logvar, num_samples: Optional[int] = None, *, seed=None, generator=None,
                   return_log_q: bool = False, event_dims: int = 1):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) from the in-kernel Philox stream.

    Returns z of shape mu.shape, or (num_samples, *mu.shape) when num_samples is given. With
    `return_log_q`, also log q(z|x) per example (summed over `event_dims`), computed from the exact eps.
    """
    _require_tensor("reparameterize", mu=mu, logvar=logvar)
    _require_event_dims("reparameterize", event_dims)
    k = _num_samples("reparameterize", num_samples)
    seed_t = _seed_tensor(seed, generator, mu.device)
    z, log_q, _ = _ops.sample_gaussian(mu, logvar, seed_t, k, num_samples is not None, event_dims,
                                       bool(return_log_q), False)
    return (z, log_q) if return_log_q else z


def reparameterize_with_kl(mu, logvar, num_samples: Optional[int] = None, *, seed=None, generator=None,
                           event_dims: int = 1):
    """(z, KL(q || N(0, I))) in one pass over mu and logvar; see `reparameterize` and `gaussian_kl`."""
    _require_tensor("reparameterize_with_kl", mu=mu, logvar=logvar)
    _require_event_dims("reparameterize_with_kl", event_dims)
    k = _num_samples("reparameterize_with_kl", num_samples)
    seed_t = _seed_tensor(seed, generator, mu.device)
    z, _, kl = _ops.sample_gaussian(mu, logvar, seed_t, k, num_samples is not None, event_dims, False, True)
    return z, kl


class _StraightThroughLogClamp(torch.autograd.Function):
    """log(max(var, eps)) whose gradient passes straight through the clamp (as F.gaussian_nll_loss's).

    One pass and one tensor: the backward's 1 / max(var, eps) is exp(-logvar) of the saved output.
    """

    @staticmethod
    def forward(ctx, var, eps):
        logvar = var.clamp(min=eps).log_()
        ctx.save_for_backward(logvar)
        return logvar

    @staticmethod
    def backward(ctx, grad):
        (logvar,) = ctx.saved_tensors
        return grad * torch.exp(-logvar), None


def _check_var_negative(var: torch.Tensor) -> None:
    # Data-dependent: a host sync, so only in eager mode (not while compiling or capturing a graph).
    if torch.compiler.is_compiling() or var.numel() == 0:
        return
    if var.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if var.amin() < 0:  # one reduction, no boolean temporary (NaN compares False, as in torch.any(var < 0))
        raise ValueError("var has negative entry/entries")


def gaussian_nll_loss(input, target, var, full: bool = False, eps: float = 1e-6, reduction: str = "mean"):
    """Drop-in for ``torch.nn.functional.gaussian_nll_loss`` (torch 2.13): same values, gradients, errors.

    The per-element terms are the fused `gaussian_log_prob`; with reduction "mean"/"sum" the sum over
    every element happens inside that one pass. The negative-var check runs in eager mode only.
    """
    _require_tensor("gaussian_nll_loss", input=input, target=target)
    if isinstance(var, float):
        if var < 0:
            raise ValueError("var has negative entry/entries")
        var = torch.full((), var, dtype=input.dtype, device=input.device)  # broadcasts like ones_like(input) * var
    else:
        _require_tensor("gaussian_nll_loss", var=var)
        _check_var_negative(var)
        if var.size() != input.size():
            if input.size()[:-1] == var.size():
                var = torch.unsqueeze(var, -1)
            elif input.ndim == var.ndim and sum(y for x, y in zip(input.size(), var.size()) if x != y) == 1:
                pass
            else:
                raise ValueError("var is of incorrect size")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(reduction + " is not valid")

    out_dtype = torch.promote_types(torch.promote_types(input.dtype, target.dtype), var.dtype)
    if out_dtype == torch.float64:  # the fused ops take float64 only unmixed
        input, target, var = (t.to(torch.float64) for t in (input, target, var))
    logvar = _StraightThroughLogClamp.apply(var, eps)
    constant = 0.0 if full else 0.5 * LOG_2PI  # log N includes 0.5 log(2 pi); the loss without `full` does not
    if reduction == "none":
        loss = -gaussian_log_prob(target, input, logvar, event_dims=0) - constant
        return loss.to(out_dtype)
    ndim = len(torch.broadcast_shapes(input.shape, target.shape, var.shape))
    numel = math.prod(torch.broadcast_shapes(input.shape, target.shape, var.shape))
    total = -gaussian_log_prob(target, input, logvar, event_dims=ndim) - constant * numel
    if reduction == "mean":
        total = total / numel
    return total.to(out_dtype)


# ------------------------------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes for tracing (torch.compile, opcheck).
# ------------------------------------------------------------------------------------------------
def _row_out(event_dims: int, *tensors) -> torch.Tensor:
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    out_shape = shape[: len(shape) - event_dims]
    return tensors[0].new_empty(out_shape, dtype=_acc_dtype(*tensors))


@torch.library.register_fake("vae_fast::gaussian_kl")
def _(mu, logvar, prior_mu, prior_logvar, event_dims):
    priors = [] if prior_mu is None else [prior_mu, prior_logvar]
    return _row_out(event_dims, mu, logvar, *priors)


@torch.library.register_fake("vae_fast::gaussian_log_prob")
def _(x, mean, logvar, event_dims):
    return _row_out(event_dims, x, mean, logvar)


@torch.library.register_fake("vae_fast::bernoulli_log_prob")
def _(x, logits, event_dims):
    return _row_out(event_dims, x, logits)


def _grads_like(needs, originals):
    return [t.new_empty(t.shape) if need else t.new_empty((0,)) for need, t in zip(needs, originals)]


@torch.library.register_fake("vae_fast::gaussian_kl_backward")
def _(grad, mu, logvar, prior_mu, prior_logvar, event_dims, needs):
    originals = [mu, logvar] + ([] if prior_mu is None else [prior_mu, prior_logvar])
    grads = _grads_like(needs, originals)
    return grads + [mu.new_empty((0,)) for _ in range(4 - len(grads))]


@torch.library.register_fake("vae_fast::gaussian_log_prob_backward")
def _(grad, x, mean, logvar, event_dims, needs):
    return _grads_like(needs, [x, mean, logvar])


@torch.library.register_fake("vae_fast::bernoulli_log_prob_backward")
def _(grad, x, logits, event_dims, needs):
    return _grads_like(needs, [x, logits])


@torch.library.register_fake("vae_fast::sample_gaussian")
def _(mu, logvar, seed, num_samples, sample_dim, event_dims, want_log_q, want_kl):
    acc = _acc_dtype(mu)
    lead = (num_samples,) if sample_dim else ()
    reduced = tuple(mu.shape[: mu.dim() - event_dims])
    z = mu.new_empty(lead + tuple(mu.shape))
    log_q = mu.new_empty(lead + reduced if want_log_q else (0,), dtype=acc)
    kl = mu.new_empty(reduced if want_kl else (0,), dtype=acc)
    return z, log_q, kl


@torch.library.register_fake("vae_fast::sample_gaussian_backward")
def _(grad_z, grad_log_q, grad_kl, mu, logvar, seed, num_samples, sample_dim, event_dims, need_mu, need_logvar):
    return (mu.new_empty(mu.shape if need_mu else (0,)), mu.new_empty(mu.shape if need_logvar else (0,)))


# ------------------------------------------------------------------------------------------------
# Autograd: the backward of each op is its fused backward kernel, asked only for needed gradients.
# ------------------------------------------------------------------------------------------------
def _setup_row(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
    ctx.has_prior = len(inputs) == 5 and inputs[2] is not None
    ctx.event_dims = inputs[-1]


def _kl_backward(ctx, grad):
    saved = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[: len(saved)])
    mu, logvar = saved[0], saved[1]
    pmu, plv = (saved[2], saved[3]) if ctx.has_prior else (None, None)
    grads = _ops.gaussian_kl_backward(grad, mu, logvar, pmu, plv, ctx.event_dims, needs)
    out = [g if n else None for g, n in zip(grads, needs)]
    out += [None] * (4 - len(out))
    return out[0], out[1], out[2], out[3], None


def _gauss_backward(ctx, grad):
    x, mean, logvar = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = _ops.gaussian_log_prob_backward(grad, x, mean, logvar, ctx.event_dims, needs)
    return (*[g if n else None for g, n in zip(grads, needs)], None)


def _bern_backward(ctx, grad):
    x, logits = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2])
    grads = _ops.bernoulli_log_prob_backward(grad, x, logits, ctx.event_dims, needs)
    return (*[g if n else None for g, n in zip(grads, needs)], None)


def _setup_sample(ctx, inputs, output):
    mu, logvar, seed, num_samples, sample_dim, event_dims, want_log_q, want_kl = inputs
    ctx.save_for_backward(mu, logvar, seed)  # nothing of size K x B x D: eps is regenerated from the seed
    ctx.args = (num_samples, sample_dim, event_dims)
    ctx.wanted = (want_log_q, want_kl)
    ctx.set_materialize_grads(False)


def _sample_backward(ctx, grad_z, grad_log_q, grad_kl):
    mu, logvar, seed = ctx.saved_tensors
    num_samples, sample_dim, event_dims = ctx.args
    need_mu, need_logvar = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_log_q = grad_log_q if ctx.wanted[0] else None
    grad_kl = grad_kl if ctx.wanted[1] else None
    dmu = None
    if need_mu and grad_z is not None and grad_log_q is None and grad_kl is None and not sample_dim:
        dmu, need_mu = grad_z, False  # dz/dmu = 1: the gradient is g itself, no kernel
    if need_mu or need_logvar:
        kmu, klv = _ops.sample_gaussian_backward(grad_z, grad_log_q, grad_kl, mu, logvar, seed, num_samples,
                                                 sample_dim, event_dims, need_mu, need_logvar)
        dmu = kmu if need_mu else dmu
        dlv = klv if need_logvar else None
    else:
        dlv = None
    return dmu, dlv, None, None, None, None, None, None


def _no_double_backward(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"vae_fast: double backward through {name} is not supported")

    def setup(ctx, inputs, output):
        pass

    torch.library.register_autograd(f"vae_fast::{name}", backward, setup_context=setup)


torch.library.register_autograd("vae_fast::gaussian_kl", _kl_backward, setup_context=_setup_row)
torch.library.register_autograd("vae_fast::gaussian_log_prob", _gauss_backward, setup_context=_setup_row)
torch.library.register_autograd("vae_fast::bernoulli_log_prob", _bern_backward, setup_context=_setup_row)
torch.library.register_autograd("vae_fast::sample_gaussian", _sample_backward, setup_context=_setup_sample)
for _name in ("gaussian_kl_backward", "gaussian_log_prob_backward", "bernoulli_log_prob_backward",
              "sample_gaussian_backward"):
    _no_double_backward(_name)
