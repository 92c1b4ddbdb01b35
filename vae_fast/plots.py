"""PNG figures of a run: loss curves, reconstructions, samples, and the 2-D latent manifold.

Uses matplotlib's object API (``Figure``), not pyplot: no global state, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure


def image_side(dim: int) -> int | None:
    """The side of a square image with ``dim`` pixels, or None if ``dim`` is not a square."""
    side = math.isqrt(dim)
    return side if side * side == dim and side > 1 else None


def _as_images(x: torch.Tensor) -> torch.Tensor | None:
    flat = x.detach().float().cpu().reshape(x.shape[0], -1)
    side = image_side(flat.shape[1])
    return None if side is None else flat.reshape(-1, side, side)


def _grid(images: torch.Tensor, ncols: int) -> torch.Tensor:
    """Tile ``(N, H, W)`` images into one ``(rows * (H + 1), ncols * (W + 1))`` picture with 1-pixel gaps."""
    n, h, w = images.shape
    rows = math.ceil(n / ncols)
    canvas = torch.ones(rows * (h + 1) + 1, ncols * (w + 1) + 1)
    for i in range(n):
        r, c = divmod(i, ncols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[i]
    return canvas


def save_image_grid(x: torch.Tensor, path: str | Path, ncols: int = 8, title: str = "") -> bool:
    """Save ``(N, D)`` examples as a grid of square images; False (nothing written) if D is not square."""
    images = _as_images(x)
    if images is None:
        return False
    fig = Figure(figsize=(6, 6 * math.ceil(len(images) / ncols) / ncols + 0.4))
    ax = fig.add_subplot()
    ax.imshow(_grid(images.clamp(0, 1), ncols).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True


def save_loss_curves(metrics: list[dict], path: str | Path) -> None:
    """Train and test ELBO per epoch, and the KL term."""
    epochs = [m["epoch"] for m in metrics]
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [m["train_elbo"] for m in metrics], label="train ELBO")
    ax1.plot(epochs, [m["test_elbo"] for m in metrics], label="test ELBO")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("nats per example")
    ax1.legend()
    ax2.plot(epochs, [m["train_kl"] for m in metrics], label="KL(q || p)")
    ax2.plot(epochs, [-m["train_rec"] for m in metrics], label="-E_q log p(x|z)")
    ax2.set_xlabel("epoch")
    ax2.set_yscale("log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@torch.no_grad()
def save_reconstructions(model, x: torch.Tensor, path: str | Path, n: int = 16) -> bool:
    """Rows of originals, each above its reconstruction."""
    x = x[:n]
    recon = model.reconstruct(x).reshape(len(x), -1).cpu()
    flat = x.reshape(len(x), -1).cpu()
    pairs = []
    for i in range(0, len(x), 8):
        pairs += [flat[i : i + 8], recon[i : i + 8]]
    return save_image_grid(torch.cat(pairs), path, ncols=min(8, len(x)), title="data (odd rows), reconstructions")


@torch.no_grad()
def save_samples(model, path: str | Path, n: int = 64) -> bool:
    return save_image_grid(model.sample(n), path, title="samples (means of p(x|z), z ~ N(0, I))")


@torch.no_grad()
def save_manifold(model, path: str | Path, n: int = 15) -> bool:
    """Decoded means over an n x n grid of Gaussian quantiles of a 2-D latent space."""
    if model.latent_dim != 2:
        return False
    p = next(model.parameters())
    q = torch.special.ndtri(torch.linspace(0.05, 0.95, n, dtype=torch.float64)).to(p.dtype)
    z = torch.stack(torch.meshgrid(q, -q, indexing="xy"), dim=-1).reshape(-1, 2).to(p.device)
    mean = model.decode(z)
    mean = torch.sigmoid(mean) if model.likelihood == "bernoulli" else mean[0]
    return save_image_grid(mean, path, ncols=n, title="latent manifold")


def save_all(model, metrics: list[dict], test: torch.Tensor, out: str | Path) -> list[Path]:
    """Every figure that applies to this run; returns the files written."""
    out = Path(out)
    written = []
    if metrics:
        save_loss_curves(metrics, out / "loss.png")
        written.append(out / "loss.png")
    for name, ok in (
        ("reconstructions.png", lambda p: save_reconstructions(model, test, p)),
        ("samples.png", lambda p: save_samples(model, p)),
        ("manifold.png", lambda p: save_manifold(model, p)),
    ):
        if ok(out / name):
            written.append(out / name)
    return written
