"""The ops under test: each op at one dtype and size as a ``Case`` (its inputs, the fused op, the same maths in
plain PyTorch, and the fewest bytes it must move: the byte table in ``report.py``'s docstring), the calls the
timing runs (forward under no_grad, or forward + grad), the input sets, and one op's row of the results."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..ops import _composite as R
from .. import ops as fused_ops
from .timing import nbytes, peak_mb, percentiles, time_interleaved

PASSES = ("fwd", "fwd+bwd")
IMPLS = ("fused", "eager", "compile")
BCAST_K = 8  # samples in the (K, B, D) decoder-output case
IWAE_K = 50  # samples in the IWAE-shaped case: Bernoulli logits (K, B, D) against the data (B, D)
# The IWAE shape the per-call table uses for that case: K = 50 samples of MNIST-sized batches, (50, 128, 784).
PER_CALL_SIZES_BY_OP = {"bernoulli_log_prob_iwae": [(IWAE_K * 128, 784)]}

CPU_SIZES = [(64, 1024), (1024, 1024), (4096, 1024), (16384, 1024)]  # 64K .. 16M elements
CUDA_SIZES = [(4096, 1024), (65536, 1024), (262144, 1024)]  # 16 MB, 256 MB, 1 GB per float32 tensor
QUICK_SIZES = [(16, 256), (64, 1024)]
# Per-call cost where VAEs are trained: a few hundred rows, tens to hundreds of columns (float32).
PER_CALL_SIZES = [(100, 8), (128, 20), (128, 784), (1024, 64)]
DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
               "float16": torch.float16}


@dataclass
class Case:
    """One op at one dtype and size: its inputs, the three implementations, and what its bytes are."""

    op: str
    shape: list[int]  # the broadcast shape the op works on
    inputs: list[torch.Tensor]
    fused: Callable
    eager: Callable
    grads: list[int]  # indices of the inputs that need a gradient
    bwd_reads: list[int]  # inputs the backward must read
    bwd_writes: list[int]  # gradients the backward must write (reparameterize: dmu is g itself)
    out_bytes: int = 0
    g_bytes: int = 0

    def bytes(self, pass_: str) -> int:
        fwd = sum(nbytes(t) for t in self.inputs) + self.out_bytes
        if pass_ == "fwd":
            return fwd
        bwd = (self.g_bytes + sum(nbytes(self.inputs[i]) for i in self.bwd_reads)
               + sum(nbytes(self.inputs[i]) for i in self.bwd_writes))
        return fwd + bwd


def _eager_reparameterize(mu, logvar):
    return R.sample_eager(mu, logvar, with_kl=False)


def _eager_reparameterize_with_kl(mu, logvar):
    return R.sample_eager(mu, logvar)


def _eager_nll(inp, target, var):
    return F.gaussian_nll_loss(inp, target, var)


def make_case(op: str, b: int, d: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Case:
    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale + shift
        return t.to(dtype)

    if op == "gaussian_kl":
        c = Case(op, [b, d], [rnd(b, d), rnd(b, d, scale=0.5)], fused_ops.gaussian_kl, R.gaussian_kl,
                 grads=[0, 1], bwd_reads=[0, 1], bwd_writes=[0, 1])
    elif op == "gaussian_log_prob":
        c = Case(op, [b, d], [rnd(b, d), rnd(b, d), rnd(b, d, scale=0.5)], fused_ops.gaussian_log_prob,
                 R.gaussian_log_prob, grads=[1, 2], bwd_reads=[0, 1, 2], bwd_writes=[1, 2])
    elif op == "gaussian_log_prob_bcast":
        # Decoder output (K, B, D) scored against the data (B, D), one scalar log-variance.
        k, bb = BCAST_K, max(1, b // BCAST_K)
        c = Case(op, [k, bb, d], [rnd(bb, d), rnd(k, bb, d), rnd(scale=0.5)], fused_ops.gaussian_log_prob,
                 R.gaussian_log_prob, grads=[1, 2], bwd_reads=[0, 1, 2], bwd_writes=[1, 2])
    elif op == "bernoulli_log_prob":
        x = (torch.rand((b, d), generator=gen, device=device) < 0.5).to(dtype)
        c = Case(op, [b, d], [x, rnd(b, d, scale=3.0)], fused_ops.bernoulli_log_prob, R.bernoulli_log_prob,
                 grads=[1], bwd_reads=[0, 1], bwd_writes=[1])
    elif op == "bernoulli_log_prob_iwae":
        # K = 50 decoder outputs (logits) scored against the data as it is (B, D): the IWAE objective's shape.
        k, bb = IWAE_K, max(1, b // IWAE_K)
        x = (torch.rand((bb, d), generator=gen, device=device) < 0.5).to(dtype)
        c = Case(op, [k, bb, d], [x, rnd(k, bb, d, scale=3.0)], fused_ops.bernoulli_log_prob, R.bernoulli_log_prob,
                 grads=[1], bwd_reads=[0, 1], bwd_writes=[1])
    elif op == "reparameterize":
        c = Case(op, [b, d], [rnd(b, d), rnd(b, d, scale=0.5)], fused_ops.reparameterize, _eager_reparameterize,
                 grads=[0, 1], bwd_reads=[1], bwd_writes=[1])
    elif op == "reparameterize_with_kl":
        c = Case(op, [b, d], [rnd(b, d), rnd(b, d, scale=0.5)], fused_ops.reparameterize_with_kl,
                 _eager_reparameterize_with_kl, grads=[0, 1], bwd_reads=[0, 1], bwd_writes=[0, 1])
    elif op == "gaussian_nll_loss":
        var = rnd(b, d, scale=0.0, shift=0.5) + torch.rand((b, d), generator=gen, device=device).to(dtype)
        c = Case(op, [b, d], [rnd(b, d), rnd(b, d), var], fused_ops.gaussian_nll_loss, _eager_nll,
                 grads=[0, 2], bwd_reads=[0, 1, 2], bwd_writes=[0, 2])
    else:
        raise ValueError(f"unknown op {op!r}")
    with torch.no_grad():
        outs = _as_tuple(c.fused(*c.inputs))
    c.out_bytes = sum(nbytes(o) for o in outs)
    c.g_bytes = c.out_bytes  # one upstream gradient per output, shaped like it
    return c


OPS = ("gaussian_kl", "gaussian_log_prob", "gaussian_log_prob_bcast", "bernoulli_log_prob", "bernoulli_log_prob_iwae",
       "reparameterize", "reparameterize_with_kl", "gaussian_nll_loss")


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def make_call(fn: Callable, case: Case, pass_: str, gen: torch.Generator) -> Callable[[list], object]:
    """A function of one input set that runs `fn` for the pass (no_grad forward, or forward + grad)."""
    if pass_ == "fwd":
        def fwd(inputs):
            with torch.no_grad():
                return fn(*inputs)
        return fwd

    grad_outputs: dict = {}  # upstream gradients, made on the first call to match this fn's outputs

    def fwd_bwd(inputs):
        outs = _as_tuple(fn(*inputs))
        if "g" not in grad_outputs:
            grad_outputs["g"] = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32)
                                 .to(o.dtype) for o in outs]
        return torch.autograd.grad(outs, [inputs[i] for i in case.grads], grad_outputs["g"])
    return fwd_bwd


def input_sets(case: Case, pass_: str, n: int) -> list[list[torch.Tensor]]:
    """`n` copies of the inputs (CUDA: rotated past L2); the ones with a gradient require it for fwd+bwd."""
    sets = [case.inputs] + [[t.clone() for t in case.inputs] for _ in range(n - 1)]
    out = []
    for s in sets:
        s = [t.detach().requires_grad_(pass_ == "fwd+bwd" and i in case.grads) for i, t in enumerate(s)]
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------------
# One op row
# ------------------------------------------------------------------------------------------------
def time_row(case: Case, dtype: torch.dtype, pass_: str, calls: dict, sets: list, repeats: int,
             device: torch.device, copy: float) -> dict:
    """Times `calls` (fused, eager[, compile]) on the input `sets`: one row of the results JSON."""
    samples = time_interleaved(calls, sets, repeats, device)
    stats = {name: percentiles(s) for name, s in samples.items()}
    peaks = {name: peak_mb(lambda c=call: c(sets[0]), device) for name, call in calls.items()}
    nbytes = case.bytes(pass_)
    fused_gbps = nbytes / (stats["fused"][1] * 1e6)
    return {
        "op": case.op,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": list(case.shape),
        "pass": pass_,
        "fused_ms": stats["fused"][1],
        "eager_ms": stats["eager"][1],
        "compile_ms": stats["compile"][1] if "compile" in stats else None,
        "fused_p20_ms": stats["fused"][0],
        "fused_p80_ms": stats["fused"][2],
        "bytes": int(nbytes),
        "fused_gbps": fused_gbps,
        "copy_fraction": fused_gbps / copy,
        "peak_mb": {name: peaks.get(name) for name in IMPLS},
    }


def n_input_sets(case: Case, device: torch.device) -> int:
    """How many input sets to rotate: on CUDA enough that together they are 4x the L2 (inputs not resident in
    it; at most 8), on the CPU one."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(8, math.ceil(4 * l2 / sum(nbytes(t) for t in case.inputs))))


def time_passes(case: Case, dtype: torch.dtype, device: torch.device, repeats: int, copy: float, compile_it: bool):
    """A section's case (ldm, dmol) timed per pass (fwd, fwd+bwd): fused, eager and, with `compile_it`,
    torch.compile of eager (dynamo reset before and after); yields one time_row per pass."""
    n_sets = n_input_sets(case, device)
    for pass_ in PASSES:
        sets = input_sets(case, pass_, n_sets)
        fns = {"fused": case.fused, "eager": case.eager}
        if compile_it:
            torch._dynamo.reset()
            fns["compile"] = torch.compile(case.eager)
        grad_gen = torch.Generator(device=device).manual_seed(1)  # upstream gradients are drawn on the device
        calls = {name: make_call(fn, case, pass_, grad_gen) for name, fn in fns.items()}
        yield time_row(case, dtype, pass_, calls, sets, repeats, device, copy)
        del sets, calls, fns
        if compile_it:
            torch._dynamo.reset()


def bench_op(op: str, dtype: torch.dtype, size: tuple[int, int], pass_: str, device: torch.device,
             repeats: int, compile_it: bool, copy: float, gen: torch.Generator) -> dict:
    case = make_case(op, size[0], size[1], dtype, device, gen)
    sets = input_sets(case, pass_, n_input_sets(case, device))
    calls = {"fused": make_call(case.fused, case, pass_, gen), "eager": make_call(case.eager, case, pass_, gen)}
    if compile_it:
        torch._dynamo.reset()
        calls["compile"] = make_call(torch.compile(case.eager), case, pass_, gen)
    row = time_row(case, dtype, pass_, calls, sets, repeats, device, copy)
    del sets, calls, case
    if compile_it:
        torch._dynamo.reset()
    return row
