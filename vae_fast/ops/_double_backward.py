"""Double backward: the backward ops' own autograd, as the vector-Jacobian product of their composite formulas
(``_composite.py``). Correctness, not speed: only ``create_graph=True`` reaches it.
"""

from __future__ import annotations

import torch

from .. import _C
from . import _composite
from ._args import OPS, schema_args


def _halves(joint: torch.Tensor, dim: int):
    """The two halves along `dim` of a backward op's concatenated gradient."""
    h = joint.shape[dim] // 2
    return joint.narrow(dim, 0, h), joint.narrow(dim, h, h)


def _leaves(tensors):
    return [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in tensors]


def _vjp_of_first_order(first_order, tensors, out_grads):
    """Gradients w.r.t. `tensors` of sum(out_grads * first_order(*tensors)); None where not reached."""
    with torch.enable_grad():
        leaves = _leaves(tensors)
        outs = first_order(*leaves)
        pairs = [(o, g) for o, g in zip(outs, out_grads) if o is not None and g is not None and o.requires_grad]
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        if not pairs or not wrt:
            return [None] * len(tensors)
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True,
                                    create_graph=torch.is_grad_enabled())
    it = iter(grads)
    return [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]


def _first_order(forward, n_args):
    """first_order(grad, *args): autograd.grad of the composite forward, differentiable itself."""
    def first_order(grad, *args):
        wrt = [a for a in args[:n_args] if a is not None]
        out = forward(*args)
        grads = torch.autograd.grad(out, wrt, grad, create_graph=True, allow_unused=True)
        it = iter(grads)
        return [next(it) if a is not None else None for a in args[:n_args]]
    return first_order


def _upcast(tensors):
    """float16 and bfloat16 tensors as float32 (the kernels' computing type); others as they are."""
    return [t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
            for t in tensors]


def _pad_to_inputs(ctx, grads):
    """`grads` padded with None to one per argument the op was called with (ctx.inputs also holds the trailing
    defaults the dispatcher dropped; needs_input_grad has the call's own length)."""
    return (*grads, *([None] * (len(ctx.needs_input_grad) - len(grads))))


def _register_table_double_backward(op: dict) -> None:
    """Autograd of `vae_fast::<name>_backward(grad, *tensors, *params, event_dims, needs, *clamps[, concat_dim])`
    (csrc/core/op_table.h): the vector-Jacobian product of the composite formula `_composite.<name>`."""
    name, n, n_params, clamp_names, pair = op["name"], len(op["tensors"]), len(op["params"]), op["clamps"], op["pair"]
    forward = getattr(_composite, name)

    def setup(ctx, inputs, output):
        ctx.inputs = schema_args(f"{name}_backward", inputs, {})  # double backward is rare: keep the references
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])

    def backward(ctx, grads):
        grad, *rest = ctx.inputs
        tensors, params = rest[:n], rest[n:n + n_params]
        event_dims = rest[n + n_params]
        clamps = dict(zip(clamp_names, rest[n + n_params + 2:]))
        concat_dim = rest[-1] if pair >= 0 else None
        grads = list(grads)
        if concat_dim is not None and grads[pair] is not None:
            grads[pair], grads[pair + 1] = _halves(grads[pair], concat_dim)
        first = _first_order(lambda *a: forward(*a[:n], *params, event_dims=event_dims, **clamps), n)
        gg = [g if t is not None and g is not None and g.numel() == t.numel() else None
              for g, t in zip(grads, tensors)]
        # The composite in float32 for half inputs, as the kernels compute; each result rounded once to its input's dtype.
        inputs = [grad, *tensors]
        out = _vjp_of_first_order(lambda gr, *ts: first(gr, *ts), _upcast(inputs), _upcast(gg))
        return _pad_to_inputs(ctx, [o.to(t.dtype) if o is not None else None for o, t in zip(out, inputs)])

    torch.library.register_autograd(f"vae_fast::{name}_backward", backward, setup_context=setup)


for _op in _C.op_table():
    _register_table_double_backward(_op)


def _sample_double_backward_setup(ctx, inputs, output):
    ctx.inputs = inputs
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])


def _sample_double_backward(ctx, grad_dmu, grad_dlogvar):
    (grad_z, grad_log_q, grad_kl, mu, logvar, seed, seed_value, num_samples, sample_dim, event_dims,
     path_only, need_mu, need_logvar, clamp, concat_dim) = ctx.inputs
    if concat_dim is not None and grad_dmu is not None:
        grad_dmu, grad_dlogvar = _halves(grad_dmu, concat_dim)
    # in float32 for half inputs, as the kernels compute (eps too: it is drawn in float32)
    zeros = torch.zeros_like(mu, dtype=torch.float64 if mu.dtype == torch.float64 else torch.float32)
    # z = eps exactly when mu = 0 and logvar = 0: the forward's eps
    eps = OPS.sample_gaussian(zeros, zeros, seed, seed_value, num_samples, sample_dim, event_dims, False, False,
                               False)[0]

    def first(gz, glq, gkl, m, lv):
        # With log_q_path_only, log q is evaluated at stop_grad(mu, logvar): its derivatives of every order
        # reach (mu, logvar) through z only (torch's Normal(mu.detach(), std.detach()).log_prob(z)).
        outs = _composite.sample_terms(m, lv, eps, event_dims, path_only, clamp)
        pairs = [(o, g) for o, g in zip(outs, (gz, glq, gkl)) if g is not None]
        grads = [torch.zeros_like(m), torch.zeros_like(lv)]
        if pairs:
            got = torch.autograd.grad([o for o, _ in pairs], [m, lv], [g for _, g in pairs], create_graph=True,
                                      allow_unused=True)
            grads = [a if a is not None else b for a, b in zip(got, grads)]
        return grads

    gg = [grad_dmu if need_mu else None, grad_dlogvar if need_logvar else None]
    inputs = [grad_z, grad_log_q, grad_kl, mu, logvar]
    out = _vjp_of_first_order(first, _upcast(inputs), _upcast(gg))
    return _pad_to_inputs(ctx, [o.to(t.dtype) if o is not None else None for o, t in zip(out, inputs)])


torch.library.register_autograd("vae_fast::sample_gaussian_backward", _sample_double_backward,
                                setup_context=_sample_double_backward_setup)
