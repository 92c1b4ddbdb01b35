"""The encoder gradient's signal-to-noise ratio against K for IWAE and DReG (Rainforth et al. 2018; Tucker et al.
2018), on a digits VAE trained for a few epochs: writes docs/snr-curve.png and prints the numbers.

    python scripts/snr_curve.py [--epochs 10] [--repeats 64] [--out docs/snr-curve.png]
"""

from __future__ import annotations

import argparse
import time

import torch

import vae_fast as vf
from vae_fast.train import data

KS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
OBJECTIVES = {"iwae": "IWAE", "iwae-dreg": "DReG"}


def train_digits(epochs: int, seed: int = 0) -> tuple[vf.VAE, torch.Tensor]:
    torch.manual_seed(seed)
    train_x, _ = data.load("digits")
    model = vf.mlp_vae(64, 8, hidden=(64,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in train_x[torch.randperm(len(train_x))].split(128):
            loss, _ = model(batch.bernoulli(), num_samples=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, train_x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default="docs/snr-curve.png")
    args = p.parse_args()

    model, train_x = train_digits(args.epochs)
    torch.manual_seed(1)
    x = train_x[: args.batch].bernoulli()
    snr = {obj: [] for obj in OBJECTIVES}
    t0 = time.perf_counter()
    for k in KS:
        for obj in OBJECTIVES:
            snr[obj].append(vf.gradient_snr(model, x, k, obj, repeats=args.repeats))
        print(f"K={k:4d}  " + "  ".join(f"{OBJECTIVES[o]} {snr[o][-1]:.3f}" for o in OBJECTIVES)
              + f"  ratio {snr['iwae-dreg'][-1] / snr['iwae'][-1]:.2f}  ({time.perf_counter() - t0:.0f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for obj, name in OBJECTIVES.items():
        ax.plot(KS, snr[obj], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel(r"encoder gradient SNR  $\|E g\| / \sqrt{E\|g - E g\|^2}$")
    ax.set_title(f"digits VAE, {args.epochs} epochs; {args.repeats} draws per point", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
