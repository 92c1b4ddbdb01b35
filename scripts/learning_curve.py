#!/usr/bin/env python3
"""Test bits/dim against wall time on `patches`: the conv VAE and the small hierarchical VAE, both with the mixture
of logistics, each trained for the same CPU time budget on this machine, one after the other (one process at a
time: the two share no cores). Each run trains epoch by epoch (resuming its own run folder), so the budget is met
to within an epoch; the curve's points are the trainer's per-epoch test ELBO (a bound: bits/dim from it are an
upper bound on the model's bits/dim) against the cumulative training time the trainer records (`time_s`, the
test evaluation of each epoch included).

    .venv/bin/python scripts/learning_curve.py --minutes 8 --out benchmarks/results/learning-curve-patches

writes OUT.json (the metrics of both runs, the machine, the command) and OUT.png.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from vae_fast.train import TrainConfig, train
from vae_fast.train.plots import save_figure
from vae_fast.train.run_folder import write_json

DIMS = 3 * 32 * 32
MODELS = {
    "conv VAE (dmol)": dict(model="conv", latent_dim=32, batch_size=32, lr=1e-3),
    # VDVAE's gradient clip (200) and skip threshold (400) are for its loss per dimension; the trainer's loss is per
    # example, D = 3072 times larger, and so are its gradient norms.
    "hierarchical VAE, small (dmol)": dict(model="hvae", batch_size=32, lr=1e-3, grad_clip=200.0 * DIMS,
                                           skip_threshold=400.0 * DIMS),
}


def bits_per_dim(elbo: float) -> float:
    return -elbo / (DIMS * math.log(2.0))


def run(name: str, settings: dict, budget_s: float, folder: Path) -> list[dict]:
    epochs, metrics = 0, []
    while sum(m["time_s"] for m in metrics) < budget_s:
        epochs += 1
        cfg = TrainConfig(dataset="patches", likelihood="dmol", epochs=epochs, out=str(folder), **settings)
        metrics = train(cfg, resume=True, progress=False).metrics
        done = sum(m["time_s"] for m in metrics)
        print(f"{name}: epoch {epochs}, {done:.0f} s, test {bits_per_dim(metrics[-1]['test_elbo']):.3f} bits/dim",
              flush=True)
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training time per model (default 8)")
    parser.add_argument("--out", default="runs/learning-curve-patches", help="OUT.json and OUT.png")
    parser.add_argument("--runs", default="runs/learning-curve", help="the run folders")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = {}
    for i, (name, settings) in enumerate(MODELS.items()):
        curves[name] = run(name, settings, 60 * args.minutes, Path(args.runs) / f"model{i}")
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "budget_s": 60 * args.minutes, "bits_per_dim_of": "the test ELBO (an upper bound)",
        "models": {name: {"settings": MODELS[name], "metrics": m} for name, m in curves.items()},
    }
    write_json(out.with_suffix(".json"), result)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name, metrics in curves.items():
        t = [sum(m["time_s"] for m in metrics[: i + 1]) / 60 for i in range(len(metrics))]
        ax.plot(t, [bits_per_dim(m["test_elbo"]) for m in metrics], marker="o", label=name)
    ax.set_xlabel("training time, minutes (this CPU)")
    ax.set_ylabel("test bits/dim (from the ELBO; lower is better)")
    ax.set_title(f"patches (32x32 RGB): the same {args.minutes:g} minutes each", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"), dpi=100)
    for name, metrics in curves.items():
        print(f"{name}: {bits_per_dim(metrics[-1]['test_elbo']):.3f} bits/dim after {len(metrics)} epochs, "
              f"{sum(m['time_s'] for m in metrics) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
