"""PNG figures of a run: loss curves, reconstructions, samples, and the 2-D latent manifold.

Examples are drawn as images when they are images: ``(N, C, H, W)`` with 1 (grey) or 3 (colour) channels, or
flat rows of a square number of grey pixels (digits, MNIST as rows). Values are shown in [0, 1]; a model that
reads data in another range (``likelihoods``' ``data_range``) is mapped back first.

Uses matplotlib's object API (``Figure``), not pyplot: no global state, no display needed. Each PNG is written
atomically (a temporary file in the same folder, then ``os.replace``): a kill never leaves a torn figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..models.hierarchical import HierarchicalVAE
from ..models.likelihoods import DATA_RANGES


def image_side(dim: int) -> int | None:
    """The side of a square image with ``dim`` pixels, or None if ``dim`` is not a square."""
    side = math.isqrt(dim)
    return side if side * side == dim and side > 1 else None


def _as_images(x: torch.Tensor, data_range: str = "unit") -> torch.Tensor | None:
    """``(N, H, W)`` grey or ``(N, H, W, 3)`` colour images in [0, 1], or None if ``x`` holds no images."""
    x = x.detach().float().cpu()
    low, high = DATA_RANGES[data_range]
    x = (x - low) / (high - low)
    if x.dim() == 4 and x.shape[1] in (1, 3):
        return x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    if x.dim() == 3:  # (N, H, W): grey
        return x
    flat = x.reshape(x.shape[0], -1)
    side = image_side(flat.shape[1])
    return None if side is None else flat.reshape(-1, side, side)


def _grid(images: torch.Tensor, ncols: int) -> torch.Tensor:
    """Tile ``(N, H, W)`` (or ``(N, H, W, 3)``) images into one ``(rows * (H + 1) + 1, ncols * (W + 1) + 1)``
    picture with 1-pixel gaps."""
    n, h, w = images.shape[:3]
    rows = math.ceil(n / ncols)
    canvas = torch.ones(rows * (h + 1) + 1, ncols * (w + 1) + 1, *images.shape[3:])
    for i in range(n):
        r, c = divmod(i, ncols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[i]
    return canvas


def _show(ax, images: torch.Tensor, ncols: int, **kwargs) -> None:
    """Grey images as dark on light (``gray_r``, as digits are drawn); colour as it is."""
    grid = _grid(images.clamp(0, 1), ncols).numpy()
    if images.dim() == 4:
        ax.imshow(grid, interpolation="nearest", **kwargs)
    else:
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest", **kwargs)


def save_figure(fig: Figure, path: str | Path, **kwargs) -> None:
    """Atomically, in the format the file name says (PNG without a suffix): never PNG bytes under a .jpg name."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    formats = fig.canvas.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"cannot write {path}: .{fmt} is not an image format (use one of "
                         f"{', '.join('.' + f for f in sorted(formats))})")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=fmt, **kwargs)
        if tmp.exists():  # (a test may record the figure instead of writing it)
            os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_image_grid(x: torch.Tensor, path: str | Path, ncols: int = 8, title: str = "",
                    data_range: str = "unit") -> bool:
    """Save examples as a grid of images: ``(N, C, H, W)`` with C = 1 or 3, or ``(N, D)`` rows of square grey
    images; values in ``data_range`` (``data.DATA_RANGES``). False (nothing written) if they are not images."""
    images = _as_images(x, data_range)
    if images is None:
        return False
    fig = Figure(figsize=(6, 6 * math.ceil(len(images) / ncols) / ncols + 0.6))
    ax = fig.add_subplot()
    _show(ax, images, ncols)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    return True


def _two_line(title: str, what: str) -> str:
    return f"{title}\n{what}" if title else what


def save_loss_curves(metrics: list[dict], path: str | Path, title: str = "", objective: str = "elbo") -> None:
    """Train and test ELBO per epoch (and the bound an IWAE objective trains), and the ELBO's two terms."""
    epochs = [m["epoch"] for m in metrics]
    fig = Figure(figsize=(10, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    if objective.startswith("iwae"):  # what the run maximises is not the ELBO: show it too, named
        ax1.plot(epochs, [-m["train_loss"] for m in metrics], label=f"train {objective.upper()} bound (objective)")
    ax1.plot(epochs, [m["train_elbo"] for m in metrics], label="train ELBO")
    ax1.plot(epochs, [m["test_elbo"] for m in metrics], label="test ELBO")
    ax1.set_ylabel("nats per example (higher is better)")
    ax1.set_title("bounds on log p(x)", fontsize=10)
    kl, rec = [m["train_kl"] for m in metrics], [-m["train_rec"] for m in metrics]
    ax2.plot(epochs, kl, label="KL(q(z|x) || p(z))")
    ax2.plot(epochs, rec, label="-E_q log p(x|z)")
    if min(kl + rec) > 0:  # a Gaussian log-likelihood or a collapsed KL can be <= 0: no log scale then
        ax2.set_yscale("log")
    ax2.set_ylabel("nats per example")
    ax2.set_title("the ELBO's terms (train)", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))  # no fractional epochs
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


@torch.no_grad()
def save_reconstructions(model, x: torch.Tensor, path: str | Path, n: int = 16, title: str = "") -> bool:
    """Rows of originals, each above its reconstruction: ``n`` examples evenly spaced through ``x`` (data sets
    cut in order, such as patches' crops, would otherwise show one region only)."""
    x = x[torch.linspace(0, len(x) - 1, min(n, len(x))).round().long().to(x.device)] if len(x) else x
    recon = model.reconstruct(x).cpu()
    x = x.cpu()
    pairs = []
    for i in range(0, len(x), 8):
        pairs += [x[i : i + 8], recon[i : i + 8]]
    return save_image_grid(torch.cat(pairs), path, ncols=min(8, len(x)), data_range=model.lik.data_range,
                           title=_two_line(title, "test data (odd rows) and their reconstructions (even rows)"))


SAMPLE_TEMPERATURES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # a hierarchical model's rows, as VDVAE shows them


@torch.no_grad()
def save_samples(model, path: str | Path, n: int = 64, title: str = "") -> bool:
    """``n`` samples (means of p(x|z)); of a hierarchical model, one row of 8 per temperature of
    :data:`SAMPLE_TEMPERATURES` (every layer's z drawn at that scale of its prior)."""
    if isinstance(model, HierarchicalVAE):
        rows = [model.sample(8, temperature=t) for t in SAMPLE_TEMPERATURES]
        temps = ", ".join(f"{t:g}" for t in SAMPLE_TEMPERATURES)
        return save_image_grid(torch.cat(rows), path, data_range=model.lik.data_range,
                               title=_two_line(title, f"means of p(x|z); rows: temperature {temps}"))
    return save_image_grid(model.sample(n), path, data_range=model.lik.data_range,
                           title=_two_line(title, f"{n} samples: means of p(x|z), z ~ N(0, I)"))


def save_kl_layers(metrics: list[dict], path: str | Path, title: str = "") -> bool:
    """A hierarchical model's KL per layer (nats per example, train, last epoch), top layer first: where the
    model puts its information. False if the metrics have none."""
    if not metrics or "train_kl_layers" not in metrics[-1]:
        return False
    kl = metrics[-1]["train_kl_layers"]
    fig = Figure(figsize=(max(5.0, 0.35 * len(kl) + 2), 3.6))
    ax = fig.add_subplot()
    ax.bar(range(1, len(kl) + 1), kl)
    ax.set_xlabel("layer (1: top, lowest resolution)")
    ax.set_ylabel("KL(q || p), nats per example")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(_two_line(title, f"KL per layer, epoch {metrics[-1]['epoch']} (train)"), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True


@torch.no_grad()
def save_manifold(model, path: str | Path, n: int = 15, z_max: float = 2.0, title: str = "") -> bool:
    """Decoded means over an evenly spaced n x n grid of a 2-D latent space, z in [-z_max, z_max]^2 (about 95%
    of the prior's mass per axis at 2), with the z axes drawn."""
    if tuple(model.latent_shape) != (2,):
        return False
    p = next(model.parameters())
    z_axis = torch.linspace(-z_max, z_max, n, dtype=p.dtype, device=p.device)
    # Row r of the picture is z2 = z_axis[n - 1 - r] (z2 grows upwards), column c is z1 = z_axis[c].
    z = torch.stack(torch.meshgrid(z_axis, z_axis.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)
    images = _as_images(model.decode_mean(z), model.lik.data_range)
    if images is None:
        return False
    half = z_max / (n - 1) if n > 1 else 0.5  # each image spans one grid step, centred on its z
    fig = Figure(figsize=(6.6, 6.6))
    ax = fig.add_subplot()
    _show(ax, images, n, extent=(-z_max - half, z_max + half, -z_max - half, z_max + half))
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(_two_line(title, f"decoded means over the latent plane, z in [{-z_max:g}, {z_max:g}]^2"), fontsize=10)
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    return True


def save_all(model, metrics: list[dict], test: torch.Tensor, out: str | Path, title: str = "",
             objective: str = "elbo") -> list[Path]:
    """Every figure that applies to this run, each titled with ``title``; returns the files written."""
    out = Path(out)
    written = []
    if metrics:
        save_loss_curves(metrics, out / "loss.png", title=title, objective=objective)
        written.append(out / "loss.png")
    for name, ok in (
        ("reconstructions.png", lambda p: save_reconstructions(model, test, p, title=title)),
        ("samples.png", lambda p: save_samples(model, p, title=title)),
        ("manifold.png", lambda p: save_manifold(model, p, title=title)),
        ("kl_layers.png", lambda p: save_kl_layers(metrics, p, title=title)),
    ):
        if ok(out / name):
            written.append(out / name)
    return written
