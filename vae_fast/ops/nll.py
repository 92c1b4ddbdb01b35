"""``gaussian_nll_loss``: a drop-in for ``torch.nn.functional.gaussian_nll_loss`` (torch 2.13's argument handling,
dtype rules and errors) whose per-element terms are one fused pass."""

from __future__ import annotations

import math

import torch

from .. import _C
from ._args import OPS, require_tensor

LOG_2PI = math.log(2.0 * math.pi)

_DTYPE_PROXIES: dict = {}


def _proxy(dtype: torch.dtype, zero_dim: bool) -> torch.Tensor:
    """A meta tensor standing for an intermediate of that dtype and dimensionality (type promotion)."""
    key = (dtype, zero_dim)
    if key not in _DTYPE_PROXIES:
        _DTYPE_PROXIES[key] = torch.empty(() if zero_dim else (1,), dtype=dtype, device="meta")
    return _DTYPE_PROXIES[key]


def _nll_dtype(input, target, var_dtype: torch.dtype, var_zero_dim: bool) -> torch.dtype:
    """The dtype of torch's `0.5 * (log(var) + (input - target) ** 2 / var)`, 0-dim rules included."""
    floating = (input.dtype == target.dtype == var_dtype) and input.dtype.is_floating_point
    if floating:
        return input.dtype
    default = torch.get_default_dtype()
    diff_zero = input.dim() == 0 and target.dim() == 0
    diff = torch.result_type(input, target)
    quotient = torch.result_type(_proxy(diff, diff_zero), _proxy(var_dtype, var_zero_dim))
    quotient = quotient if quotient.is_floating_point else default
    log_var = var_dtype if var_dtype.is_floating_point else default
    return torch.result_type(_proxy(log_var, var_zero_dim), _proxy(quotient, diff_zero and var_zero_dim))


def _check_var_negative(var: torch.Tensor) -> None:
    # Data-dependent: a host sync, so only in eager mode (not while compiling or capturing a graph).
    if torch.compiler.is_compiling() or var.numel() == 0:
        return
    if var.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    # As torch: a NaN elsewhere does not hide a negative entry. A contiguous CPU var: a parallel C++ loop (no
    # op, no dispatcher, no temporary: about 10 us at 128x784, where torch.any(var < 0) takes about 75); else
    # torch's kernels.
    plain_cpu = var.device.type == "cpu" and var.is_floating_point() and var.is_contiguous()
    negative = _C.any_negative(var) if plain_cpu else torch.any(var < 0)
    if negative:
        raise ValueError("var has negative entry/entries")


def gaussian_nll_loss(input, target, var, full: bool = False, eps: float = 1e-6, reduction: str = "mean"):
    """Drop-in for ``torch.nn.functional.gaussian_nll_loss`` (torch 2.13): same values, gradients, errors.

    One fused pass sums the per-element terms 0.5 * (log max(var, eps) + (input - target)^2 / max(var, eps))
    (+ 0.5 log 2 pi with `full`) in float32 (float64 for float64), compensated; the gradient passes
    straight through the clamp, as torch's. The negative-var check runs in eager mode only.
    """
    require_tensor("gaussian_nll_loss", input=input)
    if isinstance(target, (int, float, complex)):
        # torch's `input - target` takes a Python number: a 0-dim tensor of the dtype that subtraction gives
        # (a bool stays bool, which torch's subtraction refuses, as below); float32 for float16 and bfloat16,
        # whose kernels take the number at float32 precision as torch's do (the result stays in input's dtype)
        dtype = torch.bool if isinstance(target, bool) else torch.result_type(input, target)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        target = torch.full((), target, dtype=dtype, device=input.device)
    require_tensor("gaussian_nll_loss", target=target)
    if input.dtype.is_complex or target.dtype.is_complex:  # torch returns a complex "loss"; the terms are real
        name, t = ("input", input) if input.dtype.is_complex else ("target", target)
        raise TypeError(f"vae_fast.gaussian_nll_loss: `{name}` must be real, got {t.dtype}")
    if isinstance(var, float):
        if var < 0:
            raise ValueError("var has negative entry/entries")
        # torch: var * ones_like(input); a 0-dim tensor broadcasts the same without the full-size copy
        var_dtype = input.dtype if input.dtype.is_floating_point else torch.get_default_dtype()
        var_zero_dim = input.dim() == 0
        var = torch.full((), var, dtype=var_dtype, device=input.device)
    else:
        require_tensor("gaussian_nll_loss", var=var)
        # torch's order: the negative entries, the size, the reduction, then its clamp_ refuses integer var
        _check_var_negative(var)
        if var.size() != input.size():
            if input.size()[:-1] == var.size():
                var = torch.unsqueeze(var, -1)
            elif input.ndim == var.ndim and sum(y for x, y in zip(input.size(), var.size()) if x != y) == 1:
                pass
            else:
                raise ValueError("var is of incorrect size")
        var_dtype, var_zero_dim = var.dtype, var.dim() == 0
    if reduction not in ("none", "mean", "sum"):
        if not isinstance(reduction, str):  # torch: TypeError from its `reduction + " is not valid"`
            raise TypeError(f"vae_fast.gaussian_nll_loss: reduction must be a str ('none', 'mean' or 'sum'), got "
                            f"{type(reduction).__name__}")
        raise ValueError(f"{reduction} is not valid: reduction must be 'none', 'mean' or 'sum'")
    if not (var_dtype.is_floating_point or var_dtype.is_complex):  # torch's clamp_(min=eps) refuses these
        raise RuntimeError(f"result type Float can't be cast to the desired output type {var_dtype}: "
                           "vae_fast.gaussian_nll_loss: `var` must be a floating tensor")
    if input.dtype == torch.bool or target.dtype == torch.bool:  # torch's `input - target` refuses bool
        raise RuntimeError("Subtraction, the `-` operator, with a bool tensor is not supported: "
                           "vae_fast.gaussian_nll_loss: `input` and `target` must not be bool")
    try:
        shape = input.shape if input.shape == target.shape == var.shape else \
            torch.broadcast_shapes(input.shape, target.shape, var.shape)
    except RuntimeError:  # raise torch's own message: its loss fails at `input - target` (or at `/ var`)
        stand_ins = [torch.zeros(()).expand(t.shape) for t in (input, target, var)]  # no memory
        (stand_ins[0] - stand_ins[1]) / stand_ins[2]
        raise

    out_dtype = _nll_dtype(input, target, var_dtype, var_zero_dim)
    if not all(t.dtype.is_floating_point for t in (input, target)) or out_dtype == torch.float64:
        # integer data, or float64 (the fused ops take float64 only unmixed): cast to the result type
        input, target, var = (t.to(out_dtype) if t.dtype != out_dtype else t for t in (input, target, var))
    if reduction == "none":
        loss = OPS.gaussian_nll(input, target, var, float(eps), 0)
        if full:
            loss = loss + 0.5 * LOG_2PI
        return loss if loss.dtype == out_dtype else loss.to(out_dtype)
    numel = math.prod(shape)
    if input.is_cuda and len(shape) > 1:
        # The CUDA row kernels give a row to one thread group: one row of every element would run on one block
        # (measured on an H200 at 268M elements: 277 ms, against eager's 5.7). Per-row sums over the last dim, then their sum in
        # float64 (deterministic, and exact enough: the rows' own sums are compensated).
        rows = OPS.gaussian_nll(input, target, var, float(eps), 1)
        total = rows.sum(dtype=torch.float64).to(rows.dtype)
    else:
        total = OPS.gaussian_nll(input, target, var, float(eps), len(shape))
    if full:
        total = total + 0.5 * LOG_2PI * numel
    if reduction == "mean":
        total = total / numel
    return total if total.dtype == out_dtype else total.to(out_dtype)
