"""The benchmark suite: fused ops vs eager (``_composite.py``) vs ``torch.compile(reference)``.

Run it as ``python -m vae_fast bench [flags]`` or ``python benchmarks/run.py [flags]``. One process times,
per op, dtype, size and pass ("fwd", "fwd+bwd"), the fused op, the same maths in plain PyTorch, and that
plain PyTorch compiled by Inductor; then a whole VAE training step and the memory of a large-K log-likelihood.
It writes ``<out>/<device-slug>-<date>.json`` (DESIGN.md section 5's schema), a Markdown table and a PNG;
a ``--quick`` run's names end in ``-quick`` and those of a run that left something out (``--only``, ``--ops``,
``--sizes``, ``--no-compile``, ...) in ``-partial``, so neither replaces a full run's files. The JSON and
Markdown are rewritten after every op row and section (``"complete": false`` until the end), so a run stopped
by a timeout leaves what it measured; ``--merge`` joins the parts of one device's run into one file.

Method
------
* CPU: ``time.perf_counter`` around each call. Two warm-up calls per implementation (the first compiled
  call compiles). Then ``repeats`` rounds; each round times every implementation once, the order rotated
  from round to round (interleaved, so drift in clock speed or in the neighbours of a VM hits all three
  alike). A call shorter than ``MIN_SAMPLE_S`` is repeated inside one sample and averaged. Big configs get
  fewer rounds (at least 3) so that one config takes about ``CONFIG_BUDGET_S``. p20/p50/p80 over rounds.
* CUDA: CUDA events around each sample, several input sets rotated so the inputs are not resident in L2
  (the sets together are at least 4x the L2 size, unless one set is already larger); same percentiles.
* "fwd" runs under ``torch.no_grad()`` (inference). "fwd+bwd" runs the op with autograd and then
  ``torch.autograd.grad(outputs, inputs_that_need_grad, g)`` with a fixed random upstream gradient ``g``.
* torch.compile: ``torch.compile(reference_fn)`` with Inductor's defaults; dynamo is reset before every
  (op, dtype, size, pass), so each is compiled for its own static shapes, as a fixed-shape training loop
  sees it. The sampling baselines call ``torch.randn`` inside the compiled graph: Inductor generates those
  numbers with its own CPU RNG, which is slow (it is not a vectorised Philox), so "compile" for
  ``reparameterize*`` on CPU largely measures Inductor's RNG. In ``--quick`` mode only one small config is
  compiled; ``compile_ms`` (and ``peak_mb["compile"]``) is ``null`` for every other row.
* Reading CPU numbers: a ``copy_fraction`` above 1 means the inputs sat in cache (the copy that defines 1.0
  moves 512 MiB). At 16M elements each fresh output is a 64 MiB block that glibc maps anew and the kernel
  faults in page by page; ``write_gbps`` in the JSON measures that cost (writing into a fresh vs an existing
  64 MiB tensor), which the copy ceiling does not pay. Inductor's CPU code generation (torch 2.13) writes a
  vectorised ``expm1(x)`` as ``exp(x) - 1``, so the compiled KL baseline is cheaper than, and not as accurate
  as, the reference it compiles.
* Training steps (CUDA adds CUDA graphs): one Adam step (grads set to None, forward, backward, step) per
  config and implementation, timed like the ops (interleaved; CUDA events): the fused model, the same model
  with _composite.py's maths, each eager, compiled (``torch.compile``, Inductor defaults), compiled with
  ``mode="reduce-overhead"`` (CUDA graph trees, ``cudagraph_mark_step_begin()`` each step), and captured
  whole in one CUDA graph (``torch.cuda.graph``, capturable Adam, static inputs copied in, then replayed).
  Each is warmed up three times first (compiling, recording); one that fails records its error and the
  others go on. The same code runs on the CPU (no capture there: the static-input step itself runs).
* Peak memory, CPU: one extra call per implementation under ``torch.profiler`` with ``profile_memory=True``;
  the peak of the running total of the c10 CPU allocator's allocations and frees during that call (what the
  call allocates on top of what was live before it: temporaries, outputs, saved tensors and gradients;
  inputs do not count). Allocations made outside torch's allocator (e.g. OpenMP scratch) are not seen.
  CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated before the call.

Bytes: the fewest an op must move
---------------------------------
Every input read once, every output written once; for "fwd+bwd" the backward adds: read the upstream
gradient g (per row for the reductions, so small), read the inputs the gradient formula needs, write only the
gradients that are asked for. N = elements per tensor, R = rows (outputs of a reduction), s = element size,
s_out = size of the reduction's dtype (float32 for float32/bfloat16 inputs, float64 for float64).

==========================  ===========================  ==================================================
op (arguments, grads)        fwd                          extra for bwd
==========================  ===========================  ==================================================
gaussian_kl(mu, lv)          read mu, lv; write kl        read g, mu, lv; write dmu, dlv
                             = 2Ns + R s_out              = R s_out + 2Ns + 2Ns
gaussian_log_prob(x, m, lv)  read x, m, lv; write lp      read g, x, m, lv; write dm, dlv (x is data)
                             = 3Ns + R s_out              = R s_out + 3Ns + 2Ns
gaussian_log_prob_bcast      m (K,B,D), x (B,D), lv ()    read g, x, m, lv; write dm (K,B,D), dlv (scalar)
                             = (KBD + BD) s + KB s_out    = KB s_out + (KBD + BD) s + KBD s
bernoulli_log_prob(x, l)     read x, l; write lp          read g, x, l; write dl
                             = 2Ns + R s_out              = R s_out + 2Ns + Ns
bernoulli_log_prob_iwae      l (K,B,D), x (B,D)           read g, x, l; write dl (K,B,D)
                             = (KBD + BD) s + KB s_out    = KB s_out + (KBD + BD) s + KBD s
reparameterize (K=1)         read mu, lv; write z         read g (N), lv; write dlv (dmu is g itself)
                             = 3Ns                        = 3Ns
reparameterize_with_kl (K=1) read mu, lv; write z, kl     read gz, gkl, mu, lv; write dmu, dlv
                             = 3Ns + R s_out              = Ns + R s_out + 2Ns + 2Ns
gaussian_nll_loss(in, t, v)  read in, t, v; write loss    read g, in, t, v; write din, dv (t is data)
  (reduction="mean")         = 3Ns + s                    = s + 3Ns + 2Ns  (loss in the inputs' dtype)
==========================  ===========================  ==================================================

The same byte count divides every implementation's time (``fused_gbps`` in the rows; the plot's lines for
eager and compile), so GB/s compares like with like. ``copy_gbps`` is bytes read plus written by
``dst.copy_(src)`` on 64M float32 (256 MiB each), measured in the same run; ``copy_fraction`` =
``fused_gbps / copy_gbps``: 1.0 means the op runs at the speed of a plain memory copy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops as fused_ops
from . import _composite as R

PASSES = ("fwd", "fwd+bwd")
IMPLS = ("fused", "eager", "compile")
MIN_SAMPLE_S = 2e-3  # a CPU sample repeats the call until it lasts at least this long
CONFIG_BUDGET_S = 2.0  # rough time one config's timed rounds may take (CPU)
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


# ------------------------------------------------------------------------------------------------
# The ops under test
# ------------------------------------------------------------------------------------------------
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
        fwd = sum(_nbytes(t) for t in self.inputs) + self.out_bytes
        if pass_ == "fwd":
            return fwd
        bwd = (self.g_bytes + sum(_nbytes(self.inputs[i]) for i in self.bwd_reads)
               + sum(_nbytes(self.inputs[i]) for i in self.bwd_writes))
        return fwd + bwd


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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
    c.out_bytes = sum(_nbytes(o) for o in outs)
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
# Timing and memory
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(samples, dtype=torch.float64)
    p20, p50, p80 = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return p20, p50, p80


def time_interleaved(calls: dict[str, Callable], sets: list, repeats: int, device: torch.device,
                     budget_s: float = CONFIG_BUDGET_S) -> dict[str, list[float]]:
    """Per implementation, `repeats` samples in milliseconds (fewer for slow calls, at least 3)."""
    names = list(calls)
    est = {}
    for name in names:  # warm-up (compiles the compiled one), then one timed call as an estimate
        calls[name](sets[0])
        _sync(device)
        t0 = time.perf_counter()
        calls[name](sets[0])
        _sync(device)
        est[name] = max(time.perf_counter() - t0, 1e-7)
    inner = {n: max(1, math.ceil(MIN_SAMPLE_S / est[n])) for n in names}
    if device.type == "cuda":
        inner = {n: max(inner[n], len(sets)) for n in names}
    round_s = sum(est[n] * inner[n] for n in names)
    repeats = max(min(repeats, 3), min(repeats, int(budget_s / round_s)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, k = calls[name], inner[name]
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(k):
                    fn(sets[i % len(sets)])
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / k)
            else:
                t0 = time.perf_counter()
                for _ in range(k):
                    fn(sets[0])
                samples[name].append((time.perf_counter() - t0) * 1e3 / k)
    return samples


def peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory (MiB) the call allocates above what was live before it; see the module docstring."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak / 2**20
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak / 2**20


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side logs two lines per start/stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def copy_gbps(device: torch.device, repeats: int = 7) -> float:
    """Bytes read plus written per second by dst.copy_(src) on 64M float32 (256 MiB each)."""
    src = torch.ones(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    samples = time_interleaved({"copy": lambda s: dst.copy_(src)}, [[src]], repeats, device, budget_s=1e9)["copy"]
    ms = percentiles(samples)[1]
    return 2 * _nbytes(src) / (ms * 1e6)


def write_gbps(device: torch.device, numel: int = 16 * 2**20, repeats: int = 7) -> dict:
    """Write bandwidth into an existing 64 MiB float32 tensor and into a freshly allocated one."""
    dst = torch.empty(numel, device=device)
    calls = {"existing": lambda s: dst.fill_(1.0), "fresh": lambda s: torch.empty(numel, device=device).fill_(1.0)}
    samples = time_interleaved(calls, [[dst]], repeats, device, budget_s=1e9)
    gbps = {name: _nbytes(dst) / (percentiles(v)[1] * 1e6) for name, v in samples.items()}
    return {"tensor_mb": _nbytes(dst) / 2**20, "existing_gbps": gbps["existing"], "fresh_alloc_gbps": gbps["fresh"]}


# ------------------------------------------------------------------------------------------------
# Op benchmarks
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


def bench_op(op: str, dtype: torch.dtype, size: tuple[int, int], pass_: str, device: torch.device,
             repeats: int, compile_it: bool, copy: float, gen: torch.Generator) -> dict:
    case = make_case(op, size[0], size[1], dtype, device, gen)
    n_sets = 1
    if device.type == "cuda":
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        set_bytes = sum(_nbytes(t) for t in case.inputs)
        n_sets = max(1, min(8, math.ceil(4 * l2 / set_bytes)))
    sets = input_sets(case, pass_, n_sets)
    calls = {"fused": make_call(case.fused, case, pass_, gen), "eager": make_call(case.eager, case, pass_, gen)}
    if compile_it:
        torch._dynamo.reset()
        calls["compile"] = make_call(torch.compile(case.eager), case, pass_, gen)
    row = time_row(case, dtype, pass_, calls, sets, repeats, device, copy)
    del sets, calls, case
    if compile_it:
        torch._dynamo.reset()
    return row


# ------------------------------------------------------------------------------------------------
# Whole training step and the large-K log-likelihood
# ------------------------------------------------------------------------------------------------
def _ref_reparameterize(mu, logvar, num_samples=None, *, seed=None, generator=None, return_log_q=False,
                        log_q_path_only=False, event_dims=1):
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    eps = torch.randn(shape, dtype=mu.dtype, device=mu.device, generator=generator)
    z = R.reparameterize(mu, logvar, eps)
    if not return_log_q:
        return z
    return z, R.sample_log_q(mu, logvar, z, eps, event_dims=event_dims, log_q_path_only=log_q_path_only)


def _ref_reparameterize_with_kl(mu, logvar, num_samples=None, *, seed=None, generator=None, event_dims=1):
    return R.sample_eager(mu, logvar, num_samples, event_dims=event_dims)


REFERENCE_MODEL_OPS = {
    "bernoulli_log_prob": R.bernoulli_log_prob,
    "gaussian_kl": R.gaussian_kl,
    "gaussian_log_prob": R.gaussian_log_prob,
    "reparameterize": _ref_reparameterize,
    "reparameterize_with_kl": _ref_reparameterize_with_kl,
}


@contextlib.contextmanager
def reference_ops_in_model():
    """The model code with _composite.py's plain-PyTorch maths in place of the fused ops."""
    from . import model as model_module

    saved = {name: getattr(model_module, name) for name in REFERENCE_MODEL_OPS}
    for name, fn in REFERENCE_MODEL_OPS.items():
        setattr(model_module, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(model_module, name, fn)


@contextlib.contextmanager
def elbo_ops_in_ranges():
    """The model's ELBO ops (fused or reference, whichever are bound) each inside a profiler range "elbo::<name>"."""
    from . import model as model_module

    saved = {name: getattr(model_module, name) for name in REFERENCE_MODEL_OPS}

    def ranged(name, fn):
        def call(*args, **kwargs):
            with torch.profiler.record_function(f"elbo::{name}"):
                return fn(*args, **kwargs)
        return call

    for name, fn in saved.items():
        setattr(model_module, name, ranged(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(model_module, name, fn)


def profiled_elbo_share(step, x, steps: int) -> float:
    """The profiler's share of a training step spent in the ELBO ops: the CPU time of the "elbo::" ranges (the
    ops' forward, with everything they call) plus that of the backward functions of the autograd nodes made
    inside them (matched by sequence number), over the CPU time of the "bench::step" ranges around the steps.
    The profiler's per-op overhead is in both; it weighs more on the eager maths (more, smaller ops)."""
    with elbo_ops_in_ranges():
        step([x])  # warm-up with the ranges in place
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with torch.profiler.record_function("bench::step"):
                    step([x])
    events = prof.events()

    def in_elbo_range(e):
        while e is not None:
            if e.name.startswith("elbo::"):
                return True
            e = e.cpu_parent
        return False

    step_us = sum(e.cpu_time_total for e in events if e.name == "bench::step")
    # outermost ranges only, and the sequence numbers of the autograd nodes made inside them
    elbo_us = sum(e.cpu_time_total for e in events if e.name.startswith("elbo::") and not in_elbo_range(e.cpu_parent))
    seqs = {e.sequence_nr for e in events if e.sequence_nr >= 0 and in_elbo_range(e)}
    elbo_us += sum(e.cpu_time_total for e in events
                   if e.name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr in seqs)
    return elbo_us / step_us if step_us > 0 else float("nan")


@dataclass
class TrainConfig:
    name: str
    batch: int
    input_dim: int
    hidden: tuple
    latent: int
    likelihood: str = "bernoulli"
    obs_logvar: str = "scalar"
    objective: str = "elbo"
    num_samples: int = 1
    image: tuple = ()  # "ldm" configs: (C, H, W) of the images; hidden = the autoencoder's block channels
    kind: str = "mlp"  # "mlp": vae_fast.mlp_vae; "ldm": diffusers' AutoencoderKL with its posterior swapped


TRAIN_CONFIGS = [
    TrainConfig("digits", 128, 64, (256, 128), 8),
    TrainConfig("mnist-mlp", 128, 784, (512,), 20),
    TrainConfig("mnist-mlp-b1024", 1024, 784, (512,), 20),
    TrainConfig("mnist-mlp-iwae50", 128, 784, (512,), 20, objective="iwae", num_samples=50),
    TrainConfig("mnist-mlp-gauss-perfeature", 512, 784, (512,), 20, likelihood="gaussian",
                obs_logvar="per_feature"),
    TrainConfig("mnist-mlp-b16384", 16384, 784, (512,), 20),
    # A small latent-diffusion autoencoder: 3x128x128 images to 4x32x32 latents, (16, 8, 32, 32) moments.
    TrainConfig("ldm-autoencoderkl", 16, 3 * 128 * 128, (32, 64, 64), 4, likelihood="gaussian", image=(3, 128, 128),
                kind="ldm"),
    # The same at toy size: a CPU rehearsal of the code path (tests, dry runs).
    TrainConfig("ldm-autoencoderkl-tiny", 2, 3 * 4 * 4, (32,), 4, likelihood="gaussian", image=(3, 4, 4),
                kind="ldm"),
]
TRAIN_CONFIG_NAMES = tuple(c.name for c in TRAIN_CONFIGS)
CPU_TRAIN_CONFIGS = ("digits", "mnist-mlp", "mnist-mlp-b1024", "mnist-mlp-iwae50", "mnist-mlp-gauss-perfeature")
CUDA_TRAIN_CONFIGS = ("mnist-mlp-b1024", "mnist-mlp-b16384", "mnist-mlp-iwae50", "ldm-autoencoderkl")

# name: (reference maths in place of the fused ops, torch.compile mode or None, whole step in one CUDA graph)
TRAIN_IMPLS = {
    "fused": (False, None, False),
    "eager": (True, None, False),
    "compile": (True, "default", False),
    "fused_compile": (False, "default", False),
    "compile_cudagraphs": (True, "reduce-overhead", False),
    "fused_compile_cudagraphs": (False, "reduce-overhead", False),
    "eager_graph": (True, None, True),
    "fused_graph": (False, None, True),
}
CPU_TRAIN_IMPLS = ("fused", "eager", "compile", "fused_compile")  # CUDA graphs are a CUDA matter
CUDA_TRAIN_IMPLS = tuple(TRAIN_IMPLS)
QUICK_TRAIN_IMPLS = ("fused", "eager")
# The order impls are built in, so a time budget drops the least needed: fused and eager first (the share needs
# both), the CUDA graphs without compiling (cheap), then the compiled ones.
TRAIN_IMPL_ORDER = ("fused", "eager", "fused_graph", "eager_graph", "fused_compile_cudagraphs", "compile_cudagraphs",
                    "compile", "fused_compile")
GRAPH_IMPLS = ("compile_cudagraphs", "fused_compile_cudagraphs", "eager_graph", "fused_graph")


class _FixedEncoder(torch.nn.Module):
    """Returns a fixed leaf tensor: the encoder's output without its cost (for timing the ELBO ops alone)."""

    def __init__(self, h):
        super().__init__()
        self.h = torch.nn.Parameter(h)

    def forward(self, x):
        return self.h


class _FixedDecoder(torch.nn.Module):
    """A fixed output that still depends on z (one broadcast add), shaped like the real decoder's."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, z):
        return self.out[: z.shape[0]] + z[:, :1].reshape((z.shape[0],) + (1,) * (self.out.dim() - 1))


class _MlpLoss(torch.nn.Module):
    """x -> the VAE's training loss (what ``vae-fast train`` minimises); compiling it compiles the whole model."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.model, self.num_samples, self.objective = model, cfg.num_samples, cfg.objective

    def forward(self, x):
        return self.model(x, num_samples=self.num_samples, objective=self.objective)[0]


class _LdmLoss(torch.nn.Module):
    """x -> an LDM autoencoder's loss: encode, the posterior's sample() and kl(), decode, MSE + 1e-6 KL (the
    perceptual and adversarial terms left out). ``posterior_cls`` is vae_fast's class or diffusers' own."""

    def __init__(self, vae, posterior_cls, kl_weight: float = 1e-6):
        super().__init__()
        self.vae, self.posterior_cls, self.kl_weight = vae, posterior_cls, kl_weight

    def forward(self, x):
        h = self.vae.encoder(x)
        if getattr(self.vae, "quant_conv", None) is not None:
            h = self.vae.quant_conv(h)
        posterior = self.posterior_cls(h)
        z = posterior.sample()
        kl = posterior.kl()
        rec = self.vae.decode(z).sample
        return F.mse_loss(rec, x) + self.kl_weight * kl.mean()


def _train_data(cfg: TrainConfig, device, gen):
    if cfg.kind == "ldm":
        return torch.rand((cfg.batch, *cfg.image), generator=gen, device=device) * 2 - 1
    x = torch.rand((cfg.batch, cfg.input_dim), generator=gen, device=device)
    return (x < 0.3).float() if cfg.likelihood == "bernoulli" else x


def _trainee(cfg: TrainConfig, device: torch.device):
    """(base model, {False: fused, True: reference} -> loss module factory, model text) for one config; the
    factory deep-copies the base, so every implementation starts from the same weights."""
    torch.manual_seed(0)
    if cfg.kind == "ldm":
        from diffusers import AutoencoderKL
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Theirs

        from .distributions import DiagonalGaussianDistribution as Ours

        n = len(cfg.hidden)
        base = AutoencoderKL(in_channels=cfg.image[0], out_channels=cfg.image[0],
                             down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=cfg.hidden, layers_per_block=1, latent_channels=cfg.latent,
                             norm_num_groups=32, sample_size=cfg.image[-1]).to(device)
        side = cfg.image[-1] // 2 ** (n - 1)
        text = (f"diffusers AutoencoderKL {'x'.join(map(str, cfg.image))} -> {cfg.latent}x{side}x{side}, channels "
                f"{'-'.join(map(str, cfg.hidden))}, posterior sample()+kl(), MSE + 1e-6 KL, Adam")
        return base, (lambda reference: _LdmLoss(_clone_module(base), Theirs if reference else Ours)), text
    from .model import mlp_vae

    base = mlp_vae(cfg.input_dim, cfg.latent, hidden=cfg.hidden, likelihood=cfg.likelihood,
                   obs_logvar=cfg.obs_logvar).to(device)
    text = (f"mlp_vae {cfg.input_dim}-{'-'.join(map(str, cfg.hidden))}-{cfg.latent}, {cfg.likelihood}"
            + (f" ({cfg.obs_logvar} logvar)" if cfg.likelihood == "gaussian" else "")
            + f", {cfg.objective} K={cfg.num_samples}, Adam")
    return base, (lambda reference: _MlpLoss(_clone_module(base), cfg)), text


def _maths(cfg: TrainConfig, reference: bool):
    """The context a step runs in: _composite.py's maths patched into vae_fast.model for an eager MLP step."""
    return reference_ops_in_model() if reference and cfg.kind == "mlp" else contextlib.nullcontext()


def train_step_impl(cfg: TrainConfig, make_loss, impl: str, device: torch.device, static_x: torch.Tensor):
    """A call of one input set ``[x]`` that runs one training step of ``impl`` (see TRAIN_IMPLS) and returns the
    detached loss. The "_graph" impls capture the whole step in one CUDA graph (``graphed_step``)."""
    reference, mode, graph = TRAIN_IMPLS[impl]
    module = make_loss(reference)
    opt = _adam(module, capturable=graph and device.type == "cuda")
    run = torch.compile(module, mode=mode) if mode is not None else module
    step = make_step(run, opt, lambda: _maths(cfg, reference), mark_step=mode == "reduce-overhead")
    return graphed_step(step, [static_x], device) if graph else step


def make_step(run, opt, maths=contextlib.nullcontext, mark_step: bool = False):
    """One training step as a training loop writes it: grads set to None, forward, backward, optimizer step.
    ``mark_step``: torch.compile(mode="reduce-overhead") is told that a new step begins (CUDA graph trees may
    then reuse the last step's outputs)."""
    def step(inputs):
        (x,) = inputs
        with maths():
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            loss = run(x)
            loss.backward()
            opt.step()
        return loss.detach()
    return step


def graphed_step(step, static_inputs: list, device: torch.device, warmup: int = 3):
    """``step`` (forward, backward and optimizer step of ``static_inputs``) captured in one CUDA graph, after
    ``warmup`` steps on a side stream (they create the optimizer state); returns a call of one input set that
    copies it into the static inputs and replays the graph, returning the step's (static) loss. The optimizer
    must be capturable. Off CUDA nothing is captured: the same calls run the step on the static inputs (a
    rehearsal of everything but the capture)."""
    graph, out = None, {}
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(static_inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out["loss"] = step(static_inputs)
    else:
        for _ in range(warmup):
            step(static_inputs)

    def call(inputs):
        for dst, src in zip(static_inputs, inputs):
            if dst is not src:
                dst.copy_(src)
        if graph is None:
            return step(static_inputs)
        graph.replay()
        return out["loss"]
    return call


def bench_train_step(device: torch.device, repeats: int, quick: bool, gen: torch.Generator,
                     configs=None, impls=None, budget_s: float | None = None,
                     on_row: Callable[[list], None] | None = None) -> tuple[list, str]:
    """One Adam step per config and implementation (TRAIN_IMPLS): fused vs reference ops, eager, compiled,
    compiled with CUDA graphs, captured whole in a CUDA graph; and the ELBO ops' share of the step. An impl that
    fails (compiling, capturing) gets its error in the row's ``errors`` and no time; the others go on. Impls are
    built in TRAIN_IMPL_ORDER; once a config has spent ``budget_s`` building them, the rest are left out (in
    ``errors``), so a slow compile cannot cost the config's row. ``on_row(rows)`` is called after each config
    (the command line saves its results there)."""
    if configs is None:
        configs = ["digits"] if quick else list(CUDA_TRAIN_CONFIGS if device.type == "cuda" else CPU_TRAIN_CONFIGS)
    if impls is None:
        impls = QUICK_TRAIN_IMPLS if quick else (CUDA_TRAIN_IMPLS if device.type == "cuda" else CPU_TRAIN_IMPLS)
    impls = [i for i in TRAIN_IMPL_ORDER if i in impls or i in ("fused", "eager")]  # the share needs both
    rows = []
    for cfg in (next(c for c in TRAIN_CONFIGS if c.name == name) for name in configs):
        started = time.perf_counter()
        try:
            base, make_loss, model_text = _trainee(cfg, device)
        except ImportError as e:
            rows.append({"name": cfg.name, "skipped": f"{type(e).__name__}: {e}"})
            print(f"train step {cfg.name}: skipped ({e})", flush=True)
            continue
        x = _train_data(cfg, device, gen)
        calls, errors = {}, {}
        torch._dynamo.reset()
        for impl in impls:
            spent = time.perf_counter() - started
            if budget_s is not None and impl not in ("fused", "eager") and spent > budget_s:
                errors[impl] = f"not run: {spent:.0f} s spent of the config's {budget_s:.0f} s budget"
                print(f"train step {cfg.name} {impl}: {errors[impl]}", file=sys.stderr, flush=True)
                continue
            try:
                call = train_step_impl(cfg, make_loss, impl, device, x.clone())
                for _ in range(3):  # compiles; CUDA graph trees warm up, record, then replay
                    call([x])
                _sync(device)
                calls[impl] = call
            except Exception as e:  # noqa: BLE001 -- one failing impl must not lose the others' numbers
                errors[impl] = f"{type(e).__name__}: {str(e).strip()[:400]}"
                print(f"train step {cfg.name} {impl}: failed: {errors[impl]}", file=sys.stderr, flush=True)
        if "fused" not in calls or "eager" not in calls:
            rows.append({"name": cfg.name, "skipped": "fused or eager failed", "errors": errors})
            continue
        samples = time_interleaved(calls, [[x]], repeats, device, budget_s=4 * CONFIG_BUDGET_S)
        stats = {impl: percentiles(s) for impl, s in samples.items()}
        peaks = {impl: peak_mb(lambda c=call: c([x]), device) for impl, call in calls.items()}
        if cfg.kind == "ldm":
            elbo = _posterior_ops_ms(cfg, base, x, repeats, device)
        else:
            elbo = _elbo_ops_ms(base, x, cfg, repeats, device)
        profiled = {}
        if device.type == "cpu" and cfg.kind == "mlp":
            for impl in ("fused", "eager"):
                with (reference_ops_in_model() if impl == "eager" else contextlib.nullcontext()):
                    module = make_loss(False)
                    profiled[impl] = profiled_elbo_share(make_step(module, _adam(module)), x,
                                                         steps=3 if quick else 10)
        ms = {impl: (stats[impl][1] if impl in stats else None) for impl in TRAIN_IMPLS}
        rows.append({
            "name": cfg.name, "batch": [cfg.batch, cfg.input_dim], "latent_dim": cfg.latent, "model": model_text,
            **{f"{impl}_ms": v for impl, v in ms.items()},
            "fused_p20_ms": stats["fused"][0], "fused_p80_ms": stats["fused"][2],
            "p20_p80_ms": {impl: [stats[impl][0], stats[impl][2]] for impl in stats},
            "best_fused": _best(ms, fused=True), "best_other": _best(ms, fused=False),
            "elbo_ops_ms": elbo,
            "elbo_share": {impl: elbo[impl] / stats[impl][1] for impl in ("fused", "eager")},
            "elbo_share_profiler": profiled or None,
            "peak_mb": {impl: peaks.get(impl) for impl in TRAIN_IMPLS},
            "errors": errors,
            "seconds": time.perf_counter() - started,  # compiling included
        })
        del calls
        torch._dynamo.reset()
        if on_row is not None:
            on_row(rows)
    return rows, train_step_note(quick)


def train_step_note(quick: bool) -> str:
    """What the training-step rows mean (the results' ``train_step_note``)."""
    return ("train step: fused = the model as written; eager = the same model with _composite.py's maths "
            "patched into vae_fast.model (the LDM config: diffusers' own posterior class); compile = "
            "torch.compile of the eager one, fused_compile = of the fused one (Inductor defaults); *_cudagraphs = "
            "the same compiled with mode='reduce-overhead' (CUDA graph trees; cudagraph_mark_step_begin() and grads "
            "set to None each step); *_graph = the whole step (forward, backward, capturable Adam) captured in one "
            "CUDA graph with static inputs and replayed. Adam (fused=True where the device has it), grads set to "
            "None each step. best_fused / best_other: the fastest fused-op impl and the fastest without the fused "
            "ops. ELBO ops = the same step with the encoder and decoder replaced by fixed tensors (one broadcast "
            "add keeps z in the graph), so what remains is the objective's ops, forward and backward, with the "
            "model code and autograd engine around them (the LDM config: the posterior's sample() and kl(), "
            "forward and backward, at the latent shape); share = that time over the whole step. Profiler share "
            "(CPU): the ops alone, from torch.profiler over 10 steps: the CPU time of the model's ELBO op calls "
            "(each in a range) and of the backward functions of the autograd nodes they made, over the steps' "
            "CPU time. Peak memory of a CUDA-graph replay is near 0: its memory is the graph's private pool."
            + (" Quick mode: fused and eager only." if quick else ""))


def _best(ms: dict, fused: bool):
    """(impl, ms) of the fastest impl with (fused=True) or without the fused ops, or None."""
    timed = [(v, impl) for impl, v in ms.items() if v is not None and (not TRAIN_IMPLS[impl][0]) == fused]
    return [min(timed)[1], min(timed)[0]] if timed else None


def _adam(model, capturable: bool = False):
    kwargs = {"capturable": True} if capturable else {}
    try:
        return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=1e-3, **kwargs)


def _elbo_ops_ms(base, x, cfg: TrainConfig, repeats: int, device: torch.device) -> dict:
    """Time of the objective's ops alone (fused and eager), forward and backward, in one step's shapes."""
    model = _clone_module(base)
    with torch.no_grad():
        h = model.encoder(x)
        mu = h[..., : cfg.latent]
        z = mu.expand(cfg.num_samples, *mu.shape).reshape(-1, cfg.latent) if cfg.num_samples > 1 else mu
        out = model.decoder(z)
    model.encoder, model.decoder = _FixedEncoder(h), _FixedDecoder(out)
    model.to(device)
    loss = _MlpLoss(model, cfg)
    calls = {impl: make_step(loss, _NoOptimizer(model), lambda r=impl == "eager": _maths(cfg, r))
             for impl in ("fused", "eager")}
    samples = time_interleaved(calls, [[x]], repeats, device, budget_s=2 * CONFIG_BUDGET_S)
    return {impl: percentiles(s)[1] for impl, s in samples.items()}


def _posterior_ops_ms(cfg: TrainConfig, base, x, repeats: int, device: torch.device) -> dict:
    """The LDM config's ELBO ops: the posterior's sample() and kl(), forward and backward (a random upstream
    gradient), at the encoder's moments shape, vae_fast's class ("fused") and diffusers' ("eager")."""
    from . import bench_ldm

    with torch.no_grad():
        h = base.encoder(x)
        if getattr(base, "quant_conv", None) is not None:
            h = base.quant_conv(h)
    theirs, _ = bench_ldm._baseline()
    case = bench_ldm._case(h.detach(), theirs)
    sets = input_sets(case, "fwd+bwd", 1)
    grad_gen = torch.Generator(device=device).manual_seed(1)
    calls = {name: make_call(fn, case, "fwd+bwd", grad_gen) for name, fn in (("fused", case.fused),
                                                                            ("eager", case.eager))}
    samples = time_interleaved(calls, sets, repeats, device, budget_s=2 * CONFIG_BUDGET_S)
    return {impl: percentiles(s)[1] for impl, s in samples.items()}


class _NoOptimizer:
    """Stands in for the optimizer where only forward and backward are timed: zero_grad, no step."""

    def __init__(self, module):
        self.module = module

    def zero_grad(self, set_to_none: bool = True):
        self.module.zero_grad(set_to_none=set_to_none)

    def step(self):
        pass


def _clone_module(module):
    import copy

    return copy.deepcopy(module)


def bench_log_likelihood(device: torch.device, quick: bool, gen: torch.Generator) -> dict:
    """Memory and time of model.log_likelihood with many samples (chunked, streaming logsumexp)."""
    try:
        from .model import mlp_vae
    except ImportError as e:
        return {"skipped": f"vae_fast.model is not available ({e})"}
    k, batch, input_dim, latent = (200 if quick else 20000), 256, 64, 16
    torch.manual_seed(0)
    model = mlp_vae(input_dim, latent).to(device).eval()
    x = (torch.rand((batch, input_dim), generator=gen, device=device) < 0.3).float()
    model.log_likelihood(x[:2], num_samples=2)  # warm-up
    t0 = time.perf_counter()
    peak = peak_mb(lambda: model.log_likelihood(x, num_samples=k), device)  # one run, timed and profiled
    seconds = time.perf_counter() - t0
    return {
        "num_samples": k, "batch": [batch, input_dim], "latent_dim": latent, "model": "mlp_vae, bernoulli",
        "chunk_size": "default", "seconds": seconds, "peak_mb": peak,  # seconds: of the profiled run
        # What the decoder's logits alone would take if all K samples were decoded at once.
        "unchunked_logits_mb": k * batch * input_dim * 4 / 2**20,
    }


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def cpu_snapshot() -> dict | None:
    """CPU seconds: busy on the whole machine, stolen by the hypervisor, and used by this process (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = os.times()
    return {"busy": (user + nice + system + irq + softirq) / hz, "steal": steal / hz,
            "own": own.user + own.system + own.children_user + own.children_system, "wall": time.perf_counter()}


def contention(start: dict | None, end: dict | None) -> dict | None:
    """Average number of cores that other processes kept busy (and the hypervisor stole) during the run."""
    if start is None or end is None:
        return None
    wall = max(end["wall"] - start["wall"], 1e-9)
    other = (end["busy"] - start["busy"]) - (end["own"] - start["own"])
    return {"other_processes_cores": max(other, 0.0) / wall, "steal_cores": (end["steal"] - start["steal"]) / wall,
            "loadavg_at_start": start.get("loadavg")}


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), or None outside a git checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device, name: str) -> str:
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return f"{device.type}-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def compile_config() -> dict:
    import torch._inductor.config as ic

    return {
        "call": "torch.compile(reference_fn)  (backend='inductor', mode=None, dynamic=None, fullgraph=False)",
        "dynamo_reset_per_config": True,
        "fallback_random": ic.fallback_random,
        "freezing": ic.freezing,
        "max_autotune": ic.max_autotune,
        "cpp_wrapper": ic.cpp_wrapper,
        "cpp.simdlen": ic.cpp.simdlen,
        "cpp.threads": ic.cpp.threads,
        "triton.cudagraphs": ic.triton.cudagraphs,
        "note": ("The sampling baselines draw eps with torch.randn inside the compiled graph; on CPU Inductor "
                 "generates it with its own scalar RNG, which is slow, so compile_ms for reparameterize* on CPU "
                 "mostly measures that RNG."),
    }


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it the permissions a plain open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def _ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def to_markdown(result: dict) -> str:
    lines = [f"# vae_fast benchmarks: {result['device']}, {result['date']}", ""]
    lines += [
        f"- machine: {result['device']} ({result['device_type']}), {result['threads']} threads, "
        f"CPU ISA of the fused kernels: {result['cpu_isa']}, torch {result['torch']}, "
        f"{result['platform']}",
        f"- copy bandwidth (`dst.copy_(src)`, 64M float32, read + write): **{result['copy_gbps']:.1f} GB/s**",
        f"- writing a {result['write_gbps']['tensor_mb']:.0f} MiB float32 tensor: "
        f"{result['write_gbps']['existing_gbps']:.1f} GB/s into an existing one, "
        f"{result['write_gbps']['fresh_alloc_gbps']:.1f} GB/s into a freshly allocated one (page faults)",
        f"- run: {'quick' if result['quick'] else 'full'}, {result['wall_s']:.0f} s",
    ]
    busy = result.get("contention")
    if busy:
        lines.append(f"- other processes kept {busy['other_processes_cores']:.2f} cores busy on average during the run "
                     f"(hypervisor steal {busy['steal_cores']:.2f} cores)"
                     + (" -- **the machine was not quiet: times are inflated**"
                        if busy["other_processes_cores"] > 0.1 * result["threads"] else ""))
    lines += [
        "",
        "## Method",
        "",
        result["method"],
        "",
        "Columns: times are p50 in ms; `fused/eager` and `fused/compile` are time ratios (below 1: fused is "
        "faster); GB/s uses the minimal byte count for every implementation; `copy` is fused GB/s over the copy "
        "bandwidth. Peak memory in MiB allocated by one call above what was live before it.",
        "",
    ]
    if result.get("cases"):
        lines += ["Op argument shapes: " + "; ".join(f"`{k}`: {v}" for k, v in result["cases"].items()), ""]
    largest = _largest_rows(result["rows"])
    if largest:
        lines += [f"## Largest size, {largest[0]['dtype']}", "",
                  "| op | shape | pass | fused ms | eager ms | compile ms | fused/eager | fused/compile | fused GB/s | copy |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in largest:
            lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['pass']} | {_fmt(r['fused_ms'])} | "
                         f"{_fmt(r['eager_ms'])} | {_fmt(r['compile_ms'])} | {_ratio(r['fused_ms'], r['eager_ms'])} | "
                         f"{_ratio(r['fused_ms'], r['compile_ms'])} | {_fmt(r['fused_gbps'])} | {r['copy_fraction']:.2f} |")
        lines.append("")
    lines += ["## Ops", "",
              "| op | dtype | shape | pass | fused ms (p20-p80) | eager ms | compile ms | fused/eager | "
              "fused/compile | fused GB/s | eager GB/s | compile GB/s | copy | peak MiB fused/eager/compile |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        gb = lambda ms: None if ms is None else r["bytes"] / (ms * 1e6)  # noqa: E731
        pk = r["peak_mb"]
        lines.append(
            f"| {r['op']} | {r['dtype']} | {'x'.join(map(str, r['shape']))} | {r['pass']} | "
            f"{_fmt(r['fused_ms'])} ({_fmt(r['fused_p20_ms'])}-{_fmt(r['fused_p80_ms'])}) | {_fmt(r['eager_ms'])} | "
            f"{_fmt(r['compile_ms'])} | {_ratio(r['fused_ms'], r['eager_ms'])} | "
            f"{_ratio(r['fused_ms'], r['compile_ms'])} | {_fmt(r['fused_gbps'])} | {_fmt(gb(r['eager_ms']))} | "
            f"{_fmt(gb(r['compile_ms']))} | {r['copy_fraction']:.2f} | "
            f"{_fmt(pk['fused'])} / {_fmt(pk['eager'])} / {_fmt(pk['compile'])} |")
    if result.get("per_call"):
        lines += ["", "## Per call at training-loop sizes (float32)", "",
                  "| op | shape | pass | fused us | eager us | compile us | fused/eager | fused/compile |",
                  "|---|---|---|---|---|---|---|---|"]
        us = lambda ms: None if ms is None else ms * 1e3  # noqa: E731
        for r in result["per_call"]:
            lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['pass']} | {_fmt(us(r['fused_ms']))} | "
                         f"{_fmt(us(r['eager_ms']))} | {_fmt(us(r['compile_ms']))} | "
                         f"{_ratio(r['fused_ms'], r['eager_ms'])} | {_ratio(r['fused_ms'], r['compile_ms'])} |")
    if result.get("ldm"):
        lines += ["", "## DiagonalGaussianDistribution: sample() + kl(), against diffusers' class", "",
                  "| parameters | dtype | pass | fused ms | baseline ms | compiled baseline ms | fused/baseline | "
                  "fused GB/s | copy | baseline |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["ldm"]:
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['pass']} | {_fmt(r['fused_ms'])} | "
                         f"{_fmt(r['eager_ms'])} | {_fmt(r['compile_ms'])} | {_ratio(r['fused_ms'], r['eager_ms'])} | "
                         f"{_fmt(r['fused_gbps'])} | {r['copy_fraction']:.2f} | {r.get('baseline', '')} |")
    lines += ["", "## Training step", ""]
    timed = [r for r in result["train_step"] if "skipped" not in r]
    if timed:
        lines += ["| config | model | fused ms | eager ms | compile ms | fused+compile ms | fused/eager | "
                  "fused/compile | ELBO ops ms fused / eager | ELBO share fused / eager | "
                  "profiler ELBO share fused / eager | peak MiB fused/eager |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in timed:
            pk, e, sh = r["peak_mb"], r.get("elbo_ops_ms") or {}, r.get("elbo_share") or {}
            ps = r.get("elbo_share_profiler") or {}
            lines.append(
                f"| {r['name']} (batch {r['batch'][0]}) | {r['model']} | {_fmt(r['fused_ms'])} | {_fmt(r['eager_ms'])} | "
                f"{_fmt(r['compile_ms'])} | {_fmt(r['fused_compile_ms'])} | {_ratio(r['fused_ms'], r['eager_ms'])} | "
                f"{_ratio(r['fused_ms'], r['compile_ms'])} | {_fmt(e.get('fused'))} / {_fmt(e.get('eager'))} | "
                f"{_fmt(sh.get('fused'), 2)} / {_fmt(sh.get('eager'), 2)} | {_fmt(ps.get('fused'), 2)} / "
                f"{_fmt(ps.get('eager'), 2)} | {_fmt(pk['fused'])} / {_fmt(pk['eager'])} |")
    graphs = [r for r in timed if any(r.get(f"{i}_ms") is not None for i in GRAPH_IMPLS)]
    if graphs:
        lines += ["", "With CUDA graphs (ms, p50): `reduce-overhead` = torch.compile(mode=\"reduce-overhead\"); "
                  "`graph` = the whole step captured in one CUDA graph. Best: the fastest with and without the fused "
                  "ops, and their ratio.", "",
                  "| config | fused | eager | compile | fused+compile | compile reduce-overhead | "
                  "fused+compile reduce-overhead | eager graph | fused graph | best fused | best other | "
                  "best fused / best other |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in graphs:
            bf, bo = r.get("best_fused"), r.get("best_other")
            lines.append(f"| {r['name']} (batch {r['batch'][0]}) | "
                         + " | ".join(_fmt(r.get(f"{i}_ms")) for i in TRAIN_IMPLS)
                         + f" | {bf[0] if bf else '-'} | {bo[0] if bo else '-'} | "
                         f"{_ratio(bf[1], bo[1]) if bf and bo else '-'} |")
    for r in result["train_step"]:
        if "skipped" in r:
            lines.append(f"\n- {r['name']}: skipped ({r['skipped']})")
        for impl, err in (r.get("errors") or {}).items():
            lines.append(f"\n- {r['name']} {impl} failed: `{err.splitlines()[0][:300] if err else ''}`")
    lines += ["", result["train_step_note"], "", "## Log-likelihood memory", ""]
    ll = result["log_likelihood"]
    if "skipped" in ll:
        lines.append(f"Skipped: {ll['skipped']}")
    else:
        lines.append(
            f"`model.log_likelihood(x, num_samples={ll['num_samples']})` on {ll['batch'][0]} examples of "
            f"{ll['batch'][1]} pixels ({ll['model']}, latent {ll['latent_dim']}): {ll['seconds']:.1f} s, peak "
            f"{_fmt(ll['peak_mb'])} MiB (decoding all samples at once would need "
            f"{ll['unchunked_logits_mb']:.0f} MiB for the logits alone).")
    lines += ["", "## Compile configuration", "", "```", json.dumps(result["compile_config"], indent=2), "```", ""]
    return "\n".join(lines)


def _largest_rows(rows: list) -> list:
    """Per op and pass, the row with the most elements, in float32 if there is any (else the first dtype)."""
    if not rows:
        return []
    dtypes = [r["dtype"] for r in rows]
    dtype = "float32" if "float32" in dtypes else dtypes[0]
    best: dict = {}
    for r in rows:
        key = (r["op"], r["pass"])
        if r["dtype"] == dtype and (key not in best or math.prod(r["shape"]) > math.prod(best[key]["shape"])):
            best[key] = r
    return list(best.values())


def plot_png(result: dict) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dtypes = [r["dtype"] for r in result["rows"]]
    dtype = "float32" if "float32" in dtypes else (dtypes[0] if dtypes else None)
    ops = list(dict.fromkeys(r["op"] for r in result["rows"]))
    if dtype is None or not ops:
        return None
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 2.8 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, pass_ in enumerate(PASSES):
            ax = axes[i][j]
            rows = [r for r in result["rows"] if r["op"] == op and r["pass"] == pass_ and r["dtype"] == dtype]
            rows.sort(key=lambda r: math.prod(r["shape"]))
            n = [math.prod(r["shape"]) for r in rows]
            for impl, style in (("fused", "o-"), ("eager", "s--"), ("compile", "^:")):
                pts = [(x, r["bytes"] / (r[f"{impl}_ms"] * 1e6)) for x, r in zip(n, rows)
                       if r[f"{impl}_ms"] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, label=impl)
            ax.axhline(result["copy_gbps"], color="k", lw=1, label="copy")
            ax.set_xscale("log")
            ax.set_title(f"{op} {dtype} {pass_}", fontsize=9)
            ax.set_xlabel("elements")
            ax.set_ylabel("GB/s (minimal bytes)")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"{result['device']}, {result['date']}: effective bandwidth (copy = ceiling)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for tok in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", tok)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise argparse.ArgumentTypeError(f"sizes are BxD with positive integers, comma-separated; got {tok!r}")
        sizes.append((int(m.group(1)), int(m.group(2))))
    return sizes


def _parse_list(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vae_fast bench",
                                description="Fused vs eager vs torch.compile benchmarks of the vae_fast ops.")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 2 repeats, one compiled config (< 60 s); its files end in -quick")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--dtypes", type=_parse_list(tuple(DTYPE_NAMES)), default=None,
                   help="comma-separated (default: float32,float64,bfloat16 on CPU; float32,bfloat16 on CUDA)")
    p.add_argument("--ops", type=_parse_list(OPS), default=None, help="comma-separated subset of: " + ", ".join(OPS))
    p.add_argument("--sizes", type=_parse_sizes, default=None, help="comma-separated BxD, e.g. 64x1024,4096x1024")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per config (default 10; quick 2)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (compile_ms is null)")
    p.add_argument("--no-model", action="store_true", help="skip the training step and log-likelihood lines")
    p.add_argument("--no-per-call", action="store_true", help="skip the per-call table at training-loop sizes")
    p.add_argument("--no-ldm", action="store_true", help="skip the DiagonalGaussianDistribution rows")
    p.add_argument("--only", type=_parse_list(SECTIONS), default=None,
                   help="run only these sections, comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--train-configs", type=_parse_list(TRAIN_CONFIG_NAMES), default=None,
                   help="training-step configs, comma-separated (default: " + ",".join(CPU_TRAIN_CONFIGS)
                   + " on CPU; " + ",".join(CUDA_TRAIN_CONFIGS) + " on CUDA); all: " + ", ".join(TRAIN_CONFIG_NAMES))
    p.add_argument("--train-impls", type=_parse_list(tuple(TRAIN_IMPLS)), default=None,
                   help="training-step implementations (default: " + ",".join(CPU_TRAIN_IMPLS) + " on CPU; all on "
                   "CUDA); all: " + ", ".join(TRAIN_IMPLS))
    p.add_argument("--train-budget-s", type=float, default=None,
                   help="seconds a training-step config may spend compiling and capturing; impls not built by "
                        "then are left out (recorded)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="merge these results files of one device (e.g. the parts of a GPU check) into one, written "
                        "to --out; nothing is run")
    return p


SECTIONS = ("ops", "per-call", "ldm", "train", "ll")
PARTIAL_FLAGS = ("dtypes", "ops", "sizes", "only", "train_configs", "train_impls", "train_budget_s")


def results_stem(out: str, device_type: str, name: str, date: str, quick: bool, partial: bool) -> str:
    """Where a run's files go: ``<out>/<device-slug>-<date>``, with ``-quick`` for a quick run and ``-partial`` for
    one that left something out, so neither replaces a full run's files of the same day and device."""
    suffix = "-quick" if quick else "-partial" if partial else ""
    return os.path.join(out, f"{device_slug(torch.device(device_type), name)}-{date}{suffix}")


def write_results(stem: str, result: dict, png: bool = True) -> bool:
    """The JSON and Markdown (and the PNG, if asked and matplotlib is there), each written atomically."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    _atomic_write(stem + ".json", (json.dumps(result, indent=1) + "\n").encode())
    _atomic_write(stem + ".md", to_markdown(result).encode())
    image = plot_png(result) if png else None
    if image is not None:
        _atomic_write(stem + ".png", image)
    return image is not None


def merge_results(parts: list[dict]) -> dict:
    """One result from several runs of one device: rows, per-call, LDM and training-step rows joined (a later
    op row of the same op, dtype, shape and pass replaces an earlier one only if it has a compile time and the
    earlier one has not); the log-likelihood line and the rest from the first part that has them."""
    if not parts:
        raise ValueError("merge_results: no results to merge")
    devices = {(p.get("device_type"), p.get("device")) for p in parts}
    if len(devices) != 1:
        raise ValueError(f"merge_results: the parts come from different devices: {sorted(map(str, devices))}")
    merged = dict(parts[0])
    for key in ("rows", "per_call", "ldm", "train_step"):
        joined: dict = {}
        for p in parts:
            for r in p.get(key) or []:
                k = (r.get("name"),) if key == "train_step" else (r["op"], r["dtype"], tuple(r["shape"]), r["pass"])
                if k not in joined or (r.get("compile_ms") is not None and joined[k].get("compile_ms") is None) \
                        or (key == "train_step" and "skipped" in joined[k]):
                    joined[k] = r
        merged[key] = list(joined.values())
    ll = next((p["log_likelihood"] for p in parts if "skipped" not in p.get("log_likelihood", {"skipped": 1})), None)
    merged["log_likelihood"] = ll or parts[0].get("log_likelihood", {"skipped": "in no part"})
    merged["train_step_note"] = next((p["train_step_note"] for p in parts if p.get("train_step")),
                                     parts[0].get("train_step_note", ""))
    merged["wall_s"] = sum(p.get("wall_s", 0.0) for p in parts)
    merged["sections"] = sorted({s for p in parts for s in p.get("sections", [])})
    merged["complete"] = all(p.get("complete", True) for p in parts)
    merged["merged_from"] = [{"git_commit": p.get("git_commit"), "wall_s": p.get("wall_s"),
                              "sections": p.get("sections"), "complete": p.get("complete")} for p in parts]
    return merged


def _merge_main(args) -> int:
    parts = []
    for path in args.merge:
        try:
            with open(path) as f:
                parts.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"vae_fast bench: error: --merge: cannot read {path}: {e}", file=sys.stderr)
            return 1
    try:
        merged = merge_results(parts)
    except ValueError as e:
        print(f"vae_fast bench: error: --merge: {e}", file=sys.stderr)
        return 1
    stem = results_stem(args.out, merged["device_type"], merged["device"], merged["date"], bool(merged.get("quick")),
                        False)
    png = write_results(stem, merged)
    print(f"wrote {stem}.json, .md{', .png' if png else ''} (merged from {len(parts)} files)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge:
        return _merge_main(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("vae_fast bench: error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 1
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.repeats is not None and args.repeats < 1:
        print("vae_fast bench: error: --repeats must be >= 1", file=sys.stderr)
        return 2
    quick = args.quick
    sections = set(args.only or SECTIONS)
    if args.no_per_call:
        sections.discard("per-call")
    if args.no_ldm:
        sections.discard("ldm")
    if args.no_model:
        sections -= {"train", "ll"}
    partial = (sections != set(SECTIONS) or args.no_compile
               or any(getattr(args, name) is not None for name in PARTIAL_FLAGS))
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32", "float64", "bfloat16"])
    if device.type == "cuda" and "float64" in dtypes:
        print("vae_fast bench: note: float64 on CUDA is benchmarked because it was asked for", file=sys.stderr)
    ops = args.ops or list(OPS)
    sizes = args.sizes or (QUICK_SIZES if quick else CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    repeats = args.repeats or (2 if quick else 10)
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    started = time.perf_counter()
    cpu_start = cpu_snapshot()
    if cpu_start is not None and hasattr(os, "getloadavg"):
        cpu_start["loadavg"] = os.getloadavg()[0]

    copy = copy_gbps(device)
    write = write_gbps(device)
    print(f"copy bandwidth: {copy:.1f} GB/s; writing 64 MiB: {write['existing_gbps']:.1f} GB/s into an existing "
          f"tensor, {write['fresh_alloc_gbps']:.1f} GB/s into a fresh one", flush=True)
    from . import _C

    info = _C.build_info()
    name = device_name(device)
    today = datetime.date.today().isoformat()
    rows, per_call, ldm = [], [], []
    result = {
        "device": name,
        "date": today,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_gbps": copy,
        "rows": rows,
        "write_gbps": write,
        # Extra top-level keys (beyond DESIGN.md's schema):
        "device_type": device.type,
        "cpu_isa": info.get("cpu_isa"),
        "build_info": info,
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "quick": quick,
        "repeats": repeats,
        "sections": sorted(sections),
        # False until the run has finished: a run stopped on the way (a timeout) leaves what it had measured.
        "complete": False,
        "wall_s": 0.0,
        "contention": None,
        "method": _method_text(),
        "bytes_table": _bytes_table(),
        "cases": {"gaussian_log_prob_bcast": f"x (B, D), mean (K, B, D), logvar () with K = {BCAST_K}; "
                                             "shape is the broadcast (K, B, D)",
                  "bernoulli_log_prob_iwae": f"x (B, D), logits (K, B, D) with K = {IWAE_K}, B = size // K; per call: "
                                             "(50, 128, 784)"},
        "compile_config": compile_config(),
        "per_call": per_call,
        "ldm": ldm,
        "train_step": [],
        "train_step_note": "train step not run",
        "log_likelihood": {"skipped": "not run"},
    }
    stem = results_stem(args.out, device.type, name, today, quick, partial)

    def save(final: bool = False) -> bool:
        result["wall_s"] = time.perf_counter() - started
        # Other processes running meanwhile make every time longer (2 OpenMP threads wait for a busy core).
        result["contention"] = contention(cpu_start, cpu_snapshot())
        result["complete"] = final
        return write_results(stem, result, png=final)

    for op in ops if "ops" in sections else []:
        for dtype_name in dtypes:
            for size in sizes:
                for pass_ in PASSES:
                    if args.no_compile:
                        compile_it = False
                    elif quick:  # one small compiled config, so the column is exercised
                        compile_it = (op, dtype_name, size, pass_) == (ops[0], dtypes[0], sizes[0], "fwd")
                    else:
                        compile_it = True
                    row = bench_op(op, DTYPE_NAMES[dtype_name], size, pass_, device, repeats, compile_it, copy, gen)
                    rows.append(row)
                    print(f"{op:24s} {dtype_name:8s} {'x'.join(map(str, row['shape'])):>14s} {pass_:7s} "
                          f"fused {row['fused_ms']:9.3f} ms  eager {row['eager_ms']:9.3f} ms  compile "
                          f"{_fmt(row['compile_ms']):>9s} ms  {row['fused_gbps']:6.1f} GB/s "
                          f"({row['copy_fraction']:.2f} of copy)", flush=True)
                    save()

    for op in ops if "per-call" in sections else []:
        op_sizes = PER_CALL_SIZES_BY_OP.get(op, PER_CALL_SIZES)
        for size in op_sizes[:1] if quick else op_sizes:
            for pass_ in PASSES:
                row = bench_op(op, torch.float32, size, pass_, device, repeats, not (args.no_compile or quick), copy,
                               gen)
                per_call.append(row)
                print(f"per call {op:24s} {'x'.join(map(str, row['shape'])):>10s} {pass_:7s} fused "
                      f"{row['fused_ms'] * 1e3:8.1f} us  eager {row['eager_ms'] * 1e3:8.1f} us  compile "
                      f"{_fmt(None if row['compile_ms'] is None else row['compile_ms'] * 1e3):>8s} us", flush=True)
        save()

    if "ldm" in sections:
        from .bench_ldm import ldm_rows

        ldm.extend(ldm_rows(device.type, quick, copy_gbps=copy, compile_it=not args.no_compile))
        for row in ldm:
            print(f"DiagonalGaussianDistribution {'x'.join(map(str, row['shape']))} {row['dtype']} {row['pass']}: fused "
                  f"{row['fused_ms']:.3f} ms, {row.get('baseline', 'eager')} {row['eager_ms']:.3f} ms", flush=True)
        save()

    if "train" in sections:
        result["train_step_note"] = train_step_note(quick)
        train_rows, result["train_step_note"] = bench_train_step(
            device, max(3, repeats // 2) if not quick else repeats, quick, gen, configs=args.train_configs,
            impls=args.train_impls, budget_s=args.train_budget_s,
            on_row=lambda done: (result.__setitem__("train_step", list(done)), save()))
        result["train_step"] = train_rows
        for r in train_rows:
            if "skipped" in r:
                continue
            print(f"train step {r['name']}: " + ", ".join(f"{impl} {_fmt(r.get(f'{impl}_ms'))} ms"
                                                          for impl in TRAIN_IMPLS if r.get(f"{impl}_ms") is not None),
                  flush=True)
    elif args.no_model:
        result["train_step_note"] = "train step skipped (--no-model)"
    if "ll" in sections:
        result["log_likelihood"] = bench_log_likelihood(device, quick, gen)
        print(f"log_likelihood: {result['log_likelihood']}", flush=True)
    elif args.no_model:
        result["log_likelihood"] = {"skipped": "--no-model"}

    png = save(final=True)
    print(f"wrote {stem}.json, .md{', .png' if png else ''} in {result['wall_s']:.0f} s")
    return 0


def _method_text() -> str:
    doc = __doc__ or ""
    return doc.split("Method\n------\n", 1)[-1].split("Bytes: the fewest", 1)[0].strip()


def _bytes_table() -> str:
    doc = __doc__ or ""
    return doc.split("Bytes: the fewest an op must move\n---------------------------------\n", 1)[-1].strip()


if __name__ == "__main__":
    sys.exit(main())
