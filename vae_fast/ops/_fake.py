"""Fake kernels: output shapes and dtypes for tracing (torch.compile, opcheck). With static shapes they first run
the eager checks (``_C.check_op`` on the fake tensors), so compiled code raises the TypeError / ValueError eager
code raises; with symbolic shapes only the shapes are derived. The table ops' (csrc/core/op_table.h) come from
``_C.op_table()``.
"""

from __future__ import annotations

import torch

from .. import _C
from ._args import schema_args, static_shapes


def _acc_dtype(*tensors) -> torch.dtype:
    """Reductions come out in float64 for float64 inputs, else float32 (half/bf16 are summed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_out(event_dims: int, *tensors) -> torch.Tensor:
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    return tensors[0].new_empty(shape[: len(shape) - event_dims], dtype=_acc_dtype(*tensors))


def _grads_like(needs, originals, concat_dim=None, pair=0):
    """The backward ops' gradients: contiguous, empty where not needed; with concat_dim, the pair's two in one
    contiguous tensor (their concatenation along it) in the first slot of the pair, the second slot empty."""
    grads = [t.new_empty(t.shape) if need else t.new_empty((0,)) for need, t in zip(needs, originals)]
    if concat_dim is not None:
        t = originals[pair]
        shape = list(t.shape)
        shape[concat_dim % t.dim()] *= 2
        grads[pair], grads[pair + 1] = t.new_empty(shape), t.new_empty((0,))
    return grads


def _dmol_out(event_dims: int, x, params, num_bits, layout) -> torch.Tensor:
    """dmol_log_prob's output: the leading dims of x and params broadcast, then (H) / (H, W) for event_dims 2 / 1."""
    lead = torch.broadcast_shapes(tuple(x.shape[:-3]), tuple(params.shape[:-3]))
    h, w = (params.shape[-2], params.shape[-1]) if layout == 0 else (params.shape[-3], params.shape[-2])
    shape = tuple(lead) + ((h,) if event_dims <= 2 else ()) + ((w,) if event_dims == 1 else ())
    return params.new_empty(shape, dtype=_acc_dtype(x, params))


# The forward's output of a table op, by family: f(event_dims, *tensors, *params).
_FAMILY_OUT = {
    "rows": lambda event_dims, *args: _row_out(event_dims, *(t for t in args if isinstance(t, torch.Tensor))),
    "dmol": _dmol_out,
}


def _register_table_fakes(op: dict) -> None:
    """The fake kernels of a table op (csrc/core/op_table.h) and of its backward."""
    name, n, event_at, pair = op["name"], len(op["tensors"]), len(op["tensors"]) + len(op["params"]), op["pair"]

    def fake(*args, **kwargs):
        args = schema_args(name, args, kwargs)
        if static_shapes(*args[:n]):
            _C.check_op(name, args)
        return _FAMILY_OUT[op["family"]](args[event_at], *args[:event_at])

    def fake_backward(*args, **kwargs):
        args = schema_args(f"{name}_backward", args, kwargs)
        originals = [t for t in args[1:n + 1] if t is not None]
        concat_dim = args[-1] if pair >= 0 else None
        grads = _grads_like(args[event_at + 2], originals, concat_dim, max(pair, 0))
        return grads + [originals[0].new_empty((0,)) for _ in range(n - len(grads))]

    torch.library.register_fake(f"vae_fast::{name}")(fake)
    torch.library.register_fake(f"vae_fast::{name}_backward")(fake_backward)


for _op in _C.op_table():
    _register_table_fakes(_op)


@torch.library.register_fake("vae_fast::sample_gaussian")
def _(mu, logvar, seed, seed_value, num_samples, sample_dim, event_dims, want_log_q, want_kl, log_q_path_only,
      logvar_clamp=None):
    if static_shapes(mu, logvar, seed):
        _C.check_op("sample_gaussian", [mu, logvar, seed, seed_value, num_samples, sample_dim, event_dims, want_log_q,
                                        want_kl, log_q_path_only, logvar_clamp])
    acc = _acc_dtype(mu)
    lead = (num_samples,) if sample_dim else ()
    reduced = tuple(mu.shape[: mu.dim() - event_dims])
    z = mu.new_empty(lead + tuple(mu.shape))
    log_q = mu.new_empty(lead + reduced if want_log_q else (0,), dtype=acc)
    kl = mu.new_empty(reduced if want_kl else (0,), dtype=acc)
    return z, log_q, kl


@torch.library.register_fake("vae_fast::draw_seed")
def _(like):
    return like.new_empty((1,), dtype=torch.int64)


@torch.library.register_fake("vae_fast::sample_gaussian_backward")
def _(grad_z, grad_log_q, grad_kl, mu, logvar, seed, seed_value, num_samples, sample_dim, event_dims,
      log_q_path_only, need_mu, need_logvar, logvar_clamp=None, concat_dim=None):
    return tuple(_grads_like([need_mu, need_logvar], [mu, logvar], concat_dim, 0))


@torch.library.register_fake("vae_fast::sample_dmol")
def _(params, seed, seed_value, channels, num_bits, layout):
    if static_shapes(params):
        _C.check_op("sample_dmol", [params, seed, seed_value, channels, num_bits, layout])
    lead = tuple(params.shape[:-3])
    if layout == 0:
        shape = lead + (channels, params.shape[-2], params.shape[-1])
    else:
        shape = lead + (params.shape[-3], params.shape[-2], channels)
    return params.new_empty(shape)
