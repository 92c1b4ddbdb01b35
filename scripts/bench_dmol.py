"""CPU timing and peak memory of the fused DMOL log-likelihood against PixelCNN++'s eager formula and
torch.compile of it (issue 23). Prints a Markdown table; the lead moves it into vae_fast/bench.py.

    .venv/bin/python scripts/bench_dmol.py [--reps N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vae_fast as vf
from vae_fast import _dmol_composite as composite
from vae_fast.bench import peak_mb


def make(B, H, W, M, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (B, 3, H, W), generator=g).float() / 127.5 - 1).to(dtype)
    l = torch.randn(B, 10 * M, H, W, generator=g).to(dtype)  # PixelCNN++'s P order, NCHW (the PyTorch port's)
    return x, l


def timeit(fn, reps):
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    M = 10
    eager = composite.pixelcnn_pp_log_prob
    compiled = torch.compile(eager)

    def fused(x, l):  # the same tensors, read in place as PixelCNN++'s (B, H, W, C) / (B, H, W, P) views
        return vf.discretized_mix_logistic_log_prob(x.permute(0, 2, 3, 1), l.permute(0, 2, 3, 1), layout="pixelcnn++")

    impls = {"fused": fused, "eager": eager, "compile": compiled}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU ISA {vf._C.build_info()['cpu_isa']}")
    print("| shape (x) | M | pass | fused ms | eager ms | compile ms | peak MiB fused / eager / compile |")
    print("|---|---|---|---|---|---|---|")
    for B, H, W in ((16, 32, 32), (32, 64, 64)):
        x, l = make(B, H, W, M)
        ref = eager(x.double(), l.double())
        got = fused(x, l)
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-2), (got, ref)
        for pas in ("fwd", "fwd+bwd"):
            row, peaks = {}, {}
            for name, f in impls.items():
                if pas == "fwd":
                    def call(f=f):
                        with torch.no_grad():
                            return f(x, l)
                else:
                    def call(f=f):
                        lr = l.detach().requires_grad_()
                        f(x, lr).sum().backward()
                        return lr.grad
                row[name] = timeit(call, args.reps)
                peaks[name] = peak_mb(call, torch.device("cpu"))
            print(f"| ({B}, 3, {H}, {W}) | {M} | {pas} | {row['fused']:.2f} | {row['eager']:.2f} | {row['compile']:.2f} | "
                  f"{peaks['fused']:.1f} / {peaks['eager']:.1f} / {peaks['compile']:.1f} |")


if __name__ == "__main__":
    main()
