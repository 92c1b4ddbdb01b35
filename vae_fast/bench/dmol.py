"""Benchmark rows for the discretized mixture of logistics (``vf.discretized_mix_logistic_log_prob``, issue 23)
against PixelCNN++'s own formula.

The tensors are PixelCNN++'s (its PyTorch port's): data x (B, 3, H, W) on the 256-level grid in [-1, 1] and the
network's output l (B, 10M, H, W), the P axis in PixelCNN++'s order. The baseline is its eager
``discretized_mix_logistic_loss`` (``_dmol_composite.pixelcnn_pp_log_prob``: permutes both to (B, H, W, .)
inside, returns log p(x) per example); "compile" is ``torch.compile`` of that function; the fused op reads the
very same tensors in place as ``x.permute(0, 2, 3, 1)``, ``l.permute(0, 2, 3, 1)`` with ``layout="pixelcnn++"``.
"fwd" runs under no_grad; "fwd+bwd" takes the gradient with respect to l (x is data). Timed with the suite's
own helpers (``cases.time_row``: interleaved, p20/p50/p80, ``timing.peak_mb``), rows in the suite's schema.

Bytes (s = 4, float32; s_out = 4): fwd reads x and l once and writes the per-example log p,
(BCHW + BPHW) s + B s_out; backward reads g (B values), x and l and writes dl,
B s_out + (BCHW + BPHW) s + BPHW s.
"""

from __future__ import annotations


import torch

from ..ops import _dmol_composite as composite
from ..ops import discretized_mix_logistic_log_prob
from .cases import Case, time_passes
from .timing import copy_gbps as measure_copy_gbps

OP = "discretized_mix_logistic_log_prob"
MIXTURES = 10  # PixelCNN++'s nr_logistic_mix
NUM_BITS = 8
SHAPES = [(16, 3, 32, 32), (32, 3, 64, 64)]  # x: CIFAR-10-sized batches, and 64 x 64 images
QUICK_SHAPES = [(2, 3, 8, 8)]
BASELINE = "PixelCNN++'s discretized_mix_logistic_loss (eager, _dmol_composite.pixelcnn_pp_log_prob)"


def fused(x, l):
    """The fused op on PixelCNN++'s tensors, read in place as its (B, H, W, C) / (B, H, W, P) views."""
    return discretized_mix_logistic_log_prob(x.permute(0, 2, 3, 1), l.permute(0, 2, 3, 1), num_bits=NUM_BITS,
                                             layout="pixelcnn++")


def eager(x, l):
    return composite.pixelcnn_pp_log_prob(x, l, NUM_BITS)


def dmol_case(shape: tuple[int, int, int, int], mixtures: int, device: torch.device, gen: torch.Generator) -> Case:
    """x on the 2^bits-level grid and l ~ N(0, 1), float32, made on the CPU by `gen` and moved to `device`."""
    b, c, h, w = shape
    levels = 2 ** NUM_BITS - 1
    x = torch.randint(0, levels + 1, (b, c, h, w), generator=gen).float() * (2.0 / levels) - 1.0
    l = torch.randn(b, mixtures * composite.params_per_mixture(c), h, w, generator=gen)
    out = b * 4  # log p per example, float32
    return Case(op=OP, shape=list(shape), inputs=[x.to(device), l.to(device)], fused=fused, eager=eager, grads=[1],
                bwd_reads=[0, 1], bwd_writes=[1], out_bytes=out, g_bytes=out)


def dmol_rows(device: str, quick: bool, **kwargs) -> list[dict]:
    """All of ``iter_dmol_rows``' rows."""
    return list(iter_dmol_rows(device, quick, **kwargs))


def iter_dmol_rows(device: str, quick: bool, *, repeats: int | None = None, copy_gbps: float | None = None,
                   compile_it: bool = True, shapes=None, mixtures: int = MIXTURES):
    """Rows, one at a time (the caller saves after each), for each shape of x (default SHAPES, quick
    QUICK_SHAPES) and pass, float32; ``copy_gbps`` (measured here when not given) is the suite's copy bandwidth,
    for ``copy_fraction``; the compiled baseline only if ``compile_it`` and not ``quick``."""
    dev = torch.device(device)
    repeats = repeats or (5 if quick else 15)
    copy = copy_gbps or measure_copy_gbps(dev)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape in shapes or (QUICK_SHAPES if quick else SHAPES):
        if shape[1] != 3:
            raise ValueError(f"dmol_rows: PixelCNN++'s formula takes 3 channels, got x {tuple(shape)}")
        case = dmol_case(shape, mixtures, dev, gen)
        for row in time_passes(case, torch.float32, dev, repeats, copy, compile_it and not quick):
            yield {**row, "mixtures": mixtures, "params_shape": list(case.inputs[1].shape),
                   "num_bits": NUM_BITS, "layout": "pixelcnn++", "baseline": BASELINE}
