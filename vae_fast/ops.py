"""The public fused ops: thin wrappers over ``torch.ops.vae_fast.*`` (csrc/ops.cpp).

The C++ side checks every argument (dtype, device, shapes, event_dims) before a kernel runs and
raises TypeError / ValueError / RuntimeError naming the argument; it also holds the ops' autograd
(csrc/autograd.cpp) and their shape functions for torch.compile (the Meta kernels run the same
checks, so compiled code reports the errors eager code reports). These wrappers add what only
Python can do: checks of non-tensor arguments, seeds under torch.compile, `gaussian_nll_loss`'s
drop-in argument handling, and the composite formulas that make double backward work.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.vae_fast.*)
from . import _composite

_ops = torch.ops.vae_fast
LOG_2PI = math.log(2.0 * math.pi)
_SEED_HIGH = 2**62


# ------------------------------------------------------------------------------------------------
# Argument helpers
# ------------------------------------------------------------------------------------------------
_STRIDED = torch.strided


def _not_dense(t: torch.Tensor) -> bool:
    """True for what the ops have no kernel for, which the dispatcher would refuse with "Could not run ...
    backend" (or worse): sparse, mkldnn and jagged layouts, and strided-layout nested and quantized tensors.
    Three attribute reads: this runs on every call."""
    return t.layout is not _STRIDED or t.is_nested or t.is_quantized


def _kind(t: torch.Tensor) -> str:
    if t.is_nested:
        return f"a nested tensor (layout {t.layout})"
    if t.is_quantized:
        return f"a quantized tensor ({t.dtype})"
    return f"layout {t.layout}"


def _dense_error(what: str, t: torch.Tensor) -> TypeError:
    return TypeError(f"{what} must be a dense tensor (layout torch.strided, not nested or quantized), got {_kind(t)}")


def _require_tensor(fn: str, **tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vae_fast.{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.layout is not _STRIDED or t.is_nested or t.is_quantized:  # _not_dense, inlined (every call)
            raise _dense_error(f"vae_fast.{fn}: `{name}`", t)


def _require_int(fn: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"vae_fast.{fn}: {name} must be an int, got {type(value).__name__}")


def _seed_args(fn: str, seed, generator, like: torch.Tensor):
    """(seed tensor or None, seed value or None) for the sampling op.

    Neither given: eager CPU calls leave the draw to C++ (torch's CPU generator, no extra op); under
    torch.compile, and on CUDA, the seed is a device tensor from the opaque op `draw_seed` (the same
    C++ draw; torch.randint on CUDA), so compiled code draws what eager code draws, no two calls
    share a seed (the op is tagged nondeterministic_seeded), and CUDA graphs replay fresh draws (the
    seed is drawn and read on the device).
    """
    device = like.device
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"vae_fast.{fn}: generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None:
            raise ValueError(f"vae_fast.{fn}: give seed= or generator=, not both")
        drawn = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=generator.device, generator=generator)
        return drawn.to(device), None
    if seed is None:
        if device.type == "cpu" and not torch.compiler.is_compiling():
            return None, None  # drawn in C++, no extra op
        # a fresh empty tensor per call: graph CSE never merges two draws (it never merges aten.empty)
        return _ops.draw_seed(torch.empty(0, device=device)), None
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"vae_fast.{fn}: seed must be an int or a 1-element int64 tensor, got {seed.dtype} of "
                            f"shape {tuple(seed.shape)}")
        if seed.is_meta and device.type != "meta":  # no value to copy: torch would say "Cannot copy out of meta"
            raise ValueError(f"vae_fast.{fn}: seed is a meta tensor (it holds no value) but the samples are drawn on "
                             f"{device}: give seed on {device} or as an int")
        return seed.reshape(1).to(device), None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"vae_fast.{fn}: seed must be an int or a 1-element int64 tensor, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"vae_fast.{fn}: seed must fit in 64 bits, got {seed}")
    return None, seed - 2**64 if seed >= 2**63 else seed  # passed by value: no host-to-device copy


def _clamp_arg(fn: str, name: str, clamp) -> Optional[list]:
    """None, or ``[low, high]`` as floats for the op's ``float[]?`` argument (the op checks low <= high)."""
    if clamp is None:
        return None
    if (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clamp)):
        raise TypeError(f"vae_fast.{fn}: {name} must be None or a pair of numbers (low, high), got {clamp!r}")
    return [float(clamp[0]), float(clamp[1])]


def _num_samples(fn: str, num_samples) -> int:
    if num_samples is None:
        return 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"vae_fast.{fn}: num_samples must be an int or None, got {type(num_samples).__name__}")
    if not 1 <= num_samples < 2**62:
        raise ValueError(f"vae_fast.{fn}: num_samples must be in [1, 2**62), got {num_samples}")
    return num_samples


# ------------------------------------------------------------------------------------------------
# Public ops
# ------------------------------------------------------------------------------------------------
def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, event_dims: int = 1, logvar_clamp=None,
                prior_logvar_clamp=None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) summed over the trailing `event_dims`.

    Without a prior the standard normal N(0, I). The prior arguments broadcast against mu/logvar.
    `logvar_clamp` / `prior_logvar_clamp` = (low, high): that log-variance is read as torch.clamp(lv, low, high),
    in the kernel, with torch.clamp's gradient (zero outside [low, high], passed at its edges).
    """
    _require_tensor("gaussian_kl", mu=mu, logvar=logvar)
    for name, t in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if t is not None:
            _require_tensor("gaussian_kl", **{name: t})
    _require_int("gaussian_kl", "event_dims", event_dims)
    clamp = _clamp_arg("gaussian_kl", "logvar_clamp", logvar_clamp)
    prior_clamp = _clamp_arg("gaussian_kl", "prior_logvar_clamp", prior_logvar_clamp)
    return _ops.gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims, clamp, prior_clamp)


def gaussian_log_prob(x, mean, logvar, *, event_dims: int = 1, logvar_clamp=None) -> torch.Tensor:
    """log N(x; mean, exp(logvar)) summed over the trailing `event_dims`; the arguments broadcast.
    `logvar_clamp` = (low, high): logvar clamped in the kernel, as in `gaussian_kl`."""
    _require_tensor("gaussian_log_prob", x=x, mean=mean, logvar=logvar)
    _require_int("gaussian_log_prob", "event_dims", event_dims)
    clamp = _clamp_arg("gaussian_log_prob", "logvar_clamp", logvar_clamp)
    return _ops.gaussian_log_prob(x, mean, logvar, event_dims, clamp)


def bernoulli_log_prob(x, logits, *, event_dims: int = 1) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) = sum(x * l - softplus(l)) over the trailing `event_dims`."""
    _require_tensor("bernoulli_log_prob", x=x, logits=logits)
    _require_int("bernoulli_log_prob", "event_dims", event_dims)
    return _ops.bernoulli_log_prob(x, logits, event_dims)


def reparameterize(mu, logvar, num_samples: Optional[int] = None, *, seed=None, generator=None,
                   return_log_q: bool = False, log_q_path_only: bool = False, event_dims: int = 1, logvar_clamp=None):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) from the in-kernel Philox stream.

    Returns z of shape mu.shape, or (num_samples, *mu.shape) when num_samples is given. With
    `return_log_q`, also log q(z|x) per example (summed over `event_dims`), computed from the exact eps.
    With `log_q_path_only`, log_q is log q(z; stop_grad(mu), stop_grad(logvar)): the same value, its
    gradient reaching mu and logvar only through z (sticking the landing; DReG). `logvar_clamp` = (low, high):
    logvar clamped in the kernel, as in `gaussian_kl`.
    """
    _require_tensor("reparameterize", mu=mu, logvar=logvar)
    _require_int("reparameterize", "event_dims", event_dims)
    k = _num_samples("reparameterize", num_samples)
    clamp = _clamp_arg("reparameterize", "logvar_clamp", logvar_clamp)
    seed_t, seed_v = _seed_args("reparameterize", seed, generator, mu)
    z, log_q, _ = _ops.sample_gaussian(mu, logvar, seed_t, seed_v, k, num_samples is not None, event_dims,
                                       bool(return_log_q), False, bool(log_q_path_only), clamp)
    return (z, log_q) if return_log_q else z


def reparameterize_with_kl(mu, logvar, num_samples: Optional[int] = None, *, seed=None, generator=None,
                           event_dims: int = 1, logvar_clamp=None):
    """(z, KL(q || N(0, I))) in one pass over mu and logvar; see `reparameterize` and `gaussian_kl`."""
    _require_tensor("reparameterize_with_kl", mu=mu, logvar=logvar)
    _require_int("reparameterize_with_kl", "event_dims", event_dims)
    k = _num_samples("reparameterize_with_kl", num_samples)
    clamp = _clamp_arg("reparameterize_with_kl", "logvar_clamp", logvar_clamp)
    seed_t, seed_v = _seed_args("reparameterize_with_kl", seed, generator, mu)
    z, _, kl = _ops.sample_gaussian(mu, logvar, seed_t, seed_v, k, num_samples is not None, event_dims, False, True,
                                    False, clamp)
    return z, kl


# ------------------------------------------------------------------------------------------------
# gaussian_nll_loss: torch 2.13's F.gaussian_nll_loss argument handling, fused terms
# ------------------------------------------------------------------------------------------------
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
    _require_tensor("gaussian_nll_loss", input=input)
    if isinstance(target, (int, float, complex)):
        # torch's `input - target` takes a Python number: a 0-dim tensor of the dtype that subtraction gives
        # (a bool stays bool, which torch's subtraction refuses, as below); float32 for float16 and bfloat16,
        # whose kernels take the number at float32 precision as torch's do (the result stays in input's dtype)
        dtype = torch.bool if isinstance(target, bool) else torch.result_type(input, target)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        target = torch.full((), target, dtype=dtype, device=input.device)
    _require_tensor("gaussian_nll_loss", target=target)
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
        _require_tensor("gaussian_nll_loss", var=var)
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
        loss = _ops.gaussian_nll(input, target, var, float(eps), 0)
        if full:
            loss = loss + 0.5 * LOG_2PI
        return loss if loss.dtype == out_dtype else loss.to(out_dtype)
    numel = math.prod(shape)
    if input.is_cuda and len(shape) > 1:
        # The CUDA row kernels give a row to one thread group: one row of every element would run on one block
        # (measured on an H200 at 268M elements: 277 ms, against eager's 5.7). Per-row sums over the last dim, then their sum in
        # float64 (deterministic, and exact enough: the rows' own sums are compensated).
        rows = _ops.gaussian_nll(input, target, var, float(eps), 1)
        total = rows.sum(dtype=torch.float64).to(rows.dtype)
    else:
        total = _ops.gaussian_nll(input, target, var, float(eps), len(shape))
    if full:
        total = total + 0.5 * LOG_2PI * numel
    if reduction == "mean":
        total = total / numel
    return total if total.dtype == out_dtype else total.to(out_dtype)


# ------------------------------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes for tracing (torch.compile, opcheck). With static shapes they
# first run the eager checks (csrc/ops.cpp's check_op on the fake tensors), so compiled code raises
# the TypeError / ValueError eager code raises; with symbolic shapes only the shapes are derived.
# ------------------------------------------------------------------------------------------------
def _static(*tensors) -> bool:
    return all(isinstance(s, int) for t in tensors if t is not None for s in (*t.shape, *t.stride()))


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


def _halves(joint: torch.Tensor, dim: int):
    """The two halves along `dim` of a backward op's concatenated gradient."""
    h = joint.shape[dim] // 2
    return joint.narrow(dim, 0, h), joint.narrow(dim, h, h)


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


def _schema_args(name: str, args, kwargs) -> list:
    """A call's arguments in the order of op `name`'s schema, defaults filled in (a caller may leave them out)."""
    schema = getattr(_ops, name).default._schema
    return [*args, *(kwargs.get(a.name, a.default_value) for a in schema.arguments[len(args):])]


def _register_table_fakes(op: dict) -> None:
    """The fake kernels of a table op (csrc/op_table.h) and of its backward."""
    name, n, event_at, pair = op["name"], len(op["tensors"]), len(op["tensors"]) + len(op["params"]), op["pair"]

    def fake(*args, **kwargs):
        args = _schema_args(name, args, kwargs)
        if _static(*args[:n]):
            _C.check_op(name, args)
        return _FAMILY_OUT[op["family"]](args[event_at], *args[:event_at])

    def fake_backward(*args, **kwargs):
        args = _schema_args(f"{name}_backward", args, kwargs)
        originals = [t for t in args[1:n + 1] if t is not None]
        concat_dim = args[-1] if pair >= 0 else None
        grads = _grads_like(args[event_at + 2], originals, concat_dim, max(pair, 0))
        return grads + [originals[0].new_empty((0,)) for _ in range(n - len(grads))]

    torch.library.register_fake(f"vae_fast::{name}")(fake)
    torch.library.register_fake(f"vae_fast::{name}_backward")(fake_backward)


@torch.library.register_fake("vae_fast::sample_gaussian")
def _(mu, logvar, seed, seed_value, num_samples, sample_dim, event_dims, want_log_q, want_kl, log_q_path_only,
      logvar_clamp=None):
    if _static(mu, logvar, seed):
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


# ------------------------------------------------------------------------------------------------
# Double backward: the backward ops' own autograd, as the vector-Jacobian product of their composite
# formulas (_composite.py). Correctness, not speed: only create_graph=True reaches it.
# ------------------------------------------------------------------------------------------------
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
    (csrc/op_table.h): the vector-Jacobian product of the composite formula `_composite.<name>`."""
    name, n, n_params, clamp_names, pair = op["name"], len(op["tensors"]), len(op["params"]), op["clamps"], op["pair"]
    forward = getattr(_composite, name)

    def setup(ctx, inputs, output):
        ctx.inputs = _schema_args(f"{name}_backward", inputs, {})  # double backward is rare: keep the references
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
    _register_table_fakes(_op)
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
    eps = _ops.sample_gaussian(zeros, zeros, seed, seed_value, num_samples, sample_dim, event_dims, False, False,
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
