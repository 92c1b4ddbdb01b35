"""``DiagonalGaussianDistribution``: a drop-in for the posterior class of diffusers / LDM / taming.

Same attributes (``parameters``, ``mean``, ``logvar``, ``std``, ``var``, ``deterministic``) and methods
(``sample(generator=None)``, ``kl(other=None)``, ``nll(sample, dims)``, ``mode()``) with the same values and
gradients, computed by the fused ops:

- ``mean`` and the raw log-variance are views of ``parameters`` (its two halves along ``dim``), read in place
  by the ops; the logvar clamp is applied by the kernels as they read it (torch.clamp's gradient: zero outside,
  passed at the edges), and the backward writes both gradients into one ``parameters``-shaped buffer, handed on
  as ``parameters``' gradient as it is (no zero-filled buffer per half, no ``cat`` as ``chunk``'s backward does).
- ``sample()`` is one ``reparameterize_with_kl`` pass: the KL comes out of the same read of mean and logvar
  and is handed to the next ``kl()`` (the usual ``z = posterior.sample(); kl = posterior.kl()`` costs one
  forward and one backward pass over the parameters).
- ``std`` and ``var`` are computed only when asked for.

Differences from diffusers, each a fix: ``kl`` and ``nll`` sum over every dim but the batch's (diffusers
sums dims 1, 2, 3, which for video latents ``(B, C, T, H, W)`` leaves a ``(B, W)`` result); in deterministic
mode the zeros come on the parameters' device and dtype (diffusers returns a CPU float32 tensor). Where diffusers'
arithmetic decides, this class follows it: float64 meeting another dtype in ``nll``/``kl`` promotes to float64
(cast here: the ops refuse the mix), ``nll(dims=[])`` sums every dim, and a deterministic ``sample`` still draws
diffusers' noise so that generators end where diffusers leaves them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._args import dense_error, not_dense
from .functional import gaussian_kl, gaussian_log_prob, reparameterize_with_kl
from ._composite import clamp_logvar


def _joined(first: torch.Tensor, second: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
    """``cat([first, second], dim)`` as a view, with no copy, when ``second`` lies right after ``first`` along
    ``dim`` in one storage (the fused ops' backward writes the two gradients so); else None."""
    if torch.compiler.is_compiling():  # storages are not inspected while tracing; the compiler fuses the cat
        return None
    if (first.shape != second.shape or first.stride() != second.stride() or first.dtype != second.dtype
            or first.device != second.device
            or first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
            or second.storage_offset() - first.storage_offset() != first.shape[dim] * first.stride(dim)):
        return None
    shape = list(first.shape)
    shape[dim] *= 2
    return first.as_strided(shape, first.stride(), first.storage_offset())


class _Halves(torch.autograd.Function):
    """(first half, second half) of ``parameters`` along ``dim`` as views; the backward returns both gradients
    as one tensor: the ops' one buffer itself when they wrote them into one, else a cat (a missing one as zeros)."""

    @staticmethod
    def forward(ctx, parameters, dim):
        half = parameters.shape[dim] // 2
        ctx.dim = dim
        return parameters.narrow(dim, 0, half), parameters.narrow(dim, half, half)

    @staticmethod
    def backward(ctx, grad_first, grad_second):
        if grad_first is not None and grad_second is not None:
            joined = _joined(grad_first, grad_second, ctx.dim)
            if joined is not None:
                return joined, None
        if grad_first is None:
            grad_first = torch.zeros_like(grad_second)
        if grad_second is None:
            grad_second = torch.zeros_like(grad_first)
        return torch.cat([grad_first, grad_second], dim=ctx.dim), None


def _check_parameters(parameters, dim) -> int:
    if not isinstance(parameters, torch.Tensor):
        raise TypeError(f"DiagonalGaussianDistribution: `parameters` must be a torch.Tensor, got "
                        f"{type(parameters).__name__}")
    if not_dense(parameters):
        raise dense_error("DiagonalGaussianDistribution: `parameters`", parameters)
    if not parameters.is_floating_point():
        raise TypeError(f"DiagonalGaussianDistribution: `parameters` must be floating point, got {parameters.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"DiagonalGaussianDistribution: `dim` must be an int, got {type(dim).__name__}")
    if parameters.dim() < 2:
        raise ValueError(f"DiagonalGaussianDistribution: `parameters` needs a batch dim and a parameter dim, got "
                         f"shape {tuple(parameters.shape)}")
    if not -parameters.dim() <= dim < parameters.dim():
        raise ValueError(f"DiagonalGaussianDistribution: `dim`={dim} is out of range for `parameters` of shape "
                         f"{tuple(parameters.shape)}")
    dim %= parameters.dim()
    if dim == 0:
        raise ValueError("DiagonalGaussianDistribution: `dim` cannot be the batch dim 0")
    if parameters.shape[dim] % 2:
        raise ValueError(f"DiagonalGaussianDistribution: `parameters` must have an even size along dim {dim} (mean, "
                         f"then logvar), got shape {tuple(parameters.shape)}")
    return dim


def _promoted(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, all cast to float64 when float64 meets another floating dtype: diffusers' arithmetic promotes
    there, where the fused ops refuse float64 mixed with other dtypes (a silent cast inside them would hide a
    precision mistake; here the drop-in's contract is diffusers' result). Else as they are."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1 and torch.float64 in dtypes and all(d.is_floating_point for d in dtypes):
        return tuple(t.to(torch.float64) for t in tensors)
    return tensors


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) with ``mean, logvar = parameters.chunk(2, dim)`` and logvar clamped to
    ``logvar_clamp`` (torch.clamp's gradient: zero outside the interval, passed at its edges)."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False, dim: int = 1,
                 logvar_clamp: Optional[tuple[float, float]] = (-30.0, 20.0)):
        self._dim = _check_parameters(parameters, dim)
        if logvar_clamp is not None:
            lo, hi = (float(v) for v in logvar_clamp)
            if not lo <= hi:
                raise ValueError(f"DiagonalGaussianDistribution: `logvar_clamp` must be (low, high) with low <= high, "
                                 f"got {logvar_clamp}")
            logvar_clamp = (lo, hi)
        self._clamp = logvar_clamp
        self.parameters = parameters
        self.deterministic = bool(deterministic)
        self._kl_from_sample: Optional[tuple[torch.Tensor, bool]] = None
        self._cache: dict = {}

    # ---- attributes (lazy: computed on first access, then kept) ---------------------------------------
    # Plain properties over a dict rather than functools.cached_property, whose lock (Python 3.11) stops
    # torch.compile from tracing them.

    def _lazy(self, name: str, compute):
        if name not in self._cache:
            self._cache[name] = compute()
        return self._cache[name]

    def _halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, unclamped logvar): views of ``parameters``."""
        return self._lazy("halves", lambda: _Halves.apply(self.parameters, self._dim))

    def _op_args(self) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple[float, float]]]:
        """(mean, logvar, logvar_clamp) for the ops: the raw half and the clamp, which the kernels apply as they
        read it."""
        return (*self._halves(), self._clamp)

    @property
    def mean(self) -> torch.Tensor:
        return self._halves()[0]

    @property
    def logvar(self) -> torch.Tensor:
        """The clamped log-variance (the methods pass the raw half and the clamp to the kernels instead)."""
        return self._lazy("logvar", lambda: clamp_logvar(self._halves()[1], self._clamp))

    @property
    def std(self) -> torch.Tensor:
        return self._lazy("std", lambda: torch.zeros_like(self.mean) if self.deterministic
                          else torch.exp(0.5 * self.logvar))

    @property
    def var(self) -> torch.Tensor:
        return self._lazy("var", lambda: torch.zeros_like(self.mean) if self.deterministic
                          else torch.exp(self.logvar))

    @property
    def _event_dims(self) -> int:
        return self.parameters.dim() - 1  # every dim but the batch's

    def _zero(self) -> torch.Tensor:
        # What diffusers returns in deterministic mode (shape (1,)), on the parameters' device and dtype.
        return self.parameters.new_zeros(1)

    # ---- methods -----------------------------------------------------------------------------------------

    def sample(self, generator=None) -> torch.Tensor:
        """mean + std * eps, differentiable, reproducible with ``generator`` (which draws the kernel's seed), or
        with a list of one generator per example (as diffusers' ``randn_tensor``: example i's noise then
        depends on ``generator[i]`` only)."""
        if isinstance(generator, (list, tuple)) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, (list, tuple)) and len(generator) != self.parameters.shape[0]:
            raise ValueError(f"DiagonalGaussianDistribution.sample: a list of generators needs one per example "
                             f"({self.parameters.shape[0]}), got {len(generator)}")
        if self.deterministic:
            # std is 0, but diffusers draws its noise all the same: draw what it draws, so the generator (or the
            # global RNG) is where diffusers leaves it. A new tensor, as diffusers' mean + 0 * eps.
            self._diffusers_draw(generator)
            return self.mean.clone()
        if isinstance(generator, (list, tuple)):
            mean, logvar, clamp = self._op_args()
            parts = [reparameterize_with_kl(m, lv, generator=g, event_dims=self._event_dims, logvar_clamp=clamp)
                     for m, lv, g in zip(mean.split(1), logvar.split(1), generator)]
            z, kl = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
        else:
            mean, logvar, clamp = self._op_args()
            z, kl = reparameterize_with_kl(mean, logvar, generator=generator, event_dims=self._event_dims,
                                           logvar_clamp=clamp)
        # The KL came out of the same pass: the next kl() returns it, if autograd was in the same mode.
        self._kl_from_sample = (kl, torch.is_grad_enabled())
        return z

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || other), other defaulting to N(0, I): ``(B,)``, summed over every dim but the batch's."""
        if self.deterministic:
            return self._zero()
        if other is None:
            cached, self._kl_from_sample = self._kl_from_sample, None  # handed out once: callers may modify it
            if cached is not None and cached[1] == torch.is_grad_enabled():
                return cached[0]
            mean, logvar, clamp = self._op_args()
            return gaussian_kl(mean, logvar, event_dims=self._event_dims, logvar_clamp=clamp)
        if not (hasattr(other, "mean") and hasattr(other, "logvar")):
            raise TypeError(f"DiagonalGaussianDistribution.kl: `other` must be a DiagonalGaussianDistribution, got "
                            f"{type(other).__name__}")
        if isinstance(other, DiagonalGaussianDistribution):  # its raw half and clamp, clamped in the kernel
            other_mean, other_logvar, other_clamp = other._op_args()
        else:  # another class (diffusers' own): its logvar as it gives it
            other_mean, other_logvar, other_clamp = other.mean, other.logvar, None
        mean, logvar, clamp = self._op_args()
        mean, logvar, other_mean, other_logvar = _promoted(mean, logvar, other_mean, other_logvar)
        return gaussian_kl(mean, logvar, other_mean, other_logvar, event_dims=self._event_dims, logvar_clamp=clamp,
                           prior_logvar_clamp=other_clamp)

    def nll(self, sample: torch.Tensor, dims: Optional[Sequence[int]] = None) -> torch.Tensor:
        """-log N(sample; mean, var) summed over ``dims`` (default: every dim but the batch's)."""
        if self.deterministic:
            return self._zero()
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"DiagonalGaussianDistribution.nll: `sample` must be a torch.Tensor, got "
                            f"{type(sample).__name__}")
        if not_dense(sample):
            raise dense_error("DiagonalGaussianDistribution.nll: `sample`", sample)
        mean, logvar, clamp = self._op_args()
        ndim = mean.dim()
        try:
            dims = list(range(1, ndim)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
            summed = sorted({int(d) % ndim for d in dims if -ndim <= int(d) < ndim})
        except (TypeError, ValueError):
            raise TypeError(f"DiagonalGaussianDistribution.nll: `dims` must be ints, got {dims!r}") from None
        if not dims:  # torch.sum(t, dim=[]) sums every dim, which diffusers' nll(dims=[]) returns
            dims = summed = list(range(ndim))
        if len(summed) != len(dims):
            raise ValueError(f"DiagonalGaussianDistribution.nll: `dims` must be distinct dims of a {ndim}-d "
                             f"sample, got {dims}")
        if sample.dim() != ndim:
            raise ValueError(f"DiagonalGaussianDistribution.nll: `sample` must have the mean's {ndim} dims, got shape "
                             f"{tuple(sample.shape)}")
        if not (sample.is_floating_point() or sample.is_complex()):
            sample = sample.to(mean.dtype)  # diffusers' `sample - self.mean` promotes integer samples
        sample, mean, logvar = _promoted(sample, mean, logvar)
        # The op sums trailing dims: move the summed ones last (a view; nothing moves when they already are).
        order = [d for d in range(ndim) if d not in summed] + summed
        if order != list(range(ndim)):
            sample, mean, logvar = (t.permute(order) for t in (sample, mean, logvar))
        return -gaussian_log_prob(sample, mean, logvar, event_dims=len(summed), logvar_clamp=clamp)

    def _diffusers_draw(self, generator) -> None:
        """The draws of diffusers' ``randn_tensor(mean.shape, generator, parameters.device, parameters.dtype)``,
        results discarded: a generator is drawn from on its own device, no generator means the device's RNG."""
        shape, dtype, device = self.mean.shape, self.parameters.dtype, self.parameters.device
        if isinstance(generator, (list, tuple)):
            for g in generator:
                torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype)
        elif generator is not None:
            torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
        else:
            torch.randn(shape, device=device, dtype=dtype)

    def mode(self) -> torch.Tensor:
        return self.mean
