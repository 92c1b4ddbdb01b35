"""What a run's config builds: the device and process group, the model, the optimizer and its learning rate, and the
data as the model reads them (train batches prepared afresh, the test set once)."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from ..models import likelihoods
from ..models.conv import conv_vae
from ..models.hierarchical import hierarchical_vae
from ..models.vae import VAE, mlp_vae
from . import data
from .config import IMAGE_MODELS, TrainConfig
from .messages import setting

EVAL_STREAM = 2**31  # seed key of the evaluation noise; never a rank


FIGURE_STREAM = 2**31 + 1  # seed key of the figures' samples: a fresh run and a resume draw the same


def torchrun_restart() -> int:
    """How many times torchrun has restarted this job (0 outside torchrun): a restart resumes by itself."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init_process_group(backend: str) -> None:
    """The env:// process group, its keys under a prefix of this torchrun attempt: torchrun's agent keeps one
    store across restarts, and a restarted gloo group that read the addresses a dead attempt left there hung
    or was refused in connectFullMesh (seen here, 1 restart in 3)."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"vae_fast/attempt_{torchrun_restart()}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting('device', 'cuda')}: CUDA is not available in this torch build or machine")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name, local_rank) if name == "cuda" else torch.device(name)


def build_model(cfg: TrainConfig, input_dim: int | list[int]) -> VAE:
    """The model ``cfg`` describes for examples of ``input_dim`` values (an int) or of that shape (a list)."""
    cfg = cfg.resolved()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and on every resume
    if cfg.model == "hvae":
        return hierarchical_vae(tuple(input_dim), config=cfg.hvae_config, likelihood=cfg.likelihood,
                                obs_logvar=cfg.obs_logvar)
    if cfg.model == "conv":
        latent = dict(latent_channels=cfg.latent_channels) if cfg.latent_channels else dict(latent_dim=cfg.latent_dim)
        return conv_vae(tuple(input_dim), likelihood=cfg.likelihood, obs_logvar=cfg.obs_logvar, **latent)
    return mlp_vae(input_dim, cfg.latent_dim, cfg.hidden, cfg.likelihood, obs_logvar=cfg.obs_logvar)


def input_dim_of(x: torch.Tensor) -> int | list[int]:
    """What the checkpoint records of the data's examples: their size if flat, else their shape."""
    return x.shape[1] if x.dim() == 2 else list(x.shape[1:])


def build_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """Adam with its fused kernel where the device has one (CPU and CUDA in current torch), else the foreach
    one. On a digits step (one core) the for-loop default's optimizer.step took 0.53-0.56 of 2.1-2.2 ms; the fused
    one takes 0.19 of 1.7-1.85 ms."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # "fused=True requires ... supported devices"
        return torch.optim.Adam(params, lr=lr, foreach=True)


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: a linear warm-up over
    ``warmup_steps``, then constant, or a cosine decay reaching 0 at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def data_treatment(cfg: TrainConfig) -> tuple[str | None, int | None]:
    """What the likelihood makes of ``cfg``'s data: ``(binarize, dequantize)``, the binarisation of a
    Bernoulli model (None, "fixed" or "dynamic") and the levels a continuous density's data are dequantised
    over (256 for 8-bit data; None: not quantised data, or not a continuous density)."""
    cfg = cfg.resolved()
    lik = likelihoods.get(cfg.likelihood)
    binarize = cfg.binarize if lik.eight_bit == "binarize" and cfg.binarize != "none" else None
    dequantize = data.levels(cfg.dataset) if lik.eight_bit == "dequantize" else None
    return binarize, dequantize


def load_data(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` as the model reads them: in the likelihood's range, as images for a conv model. The
    test set is prepared once (a fixed binarisation or dequantisation); the train set is prepared per batch by
    :func:`prepare_batch` when that is drawn afresh ("dynamic" binarisation, dequantisation)."""
    cfg = cfg.resolved()
    binarize, dequantize = data_treatment(cfg)
    train, test = data.load(cfg.dataset, binarize=binarize, data_dir=cfg.data_dir)
    if dequantize:
        test = data.fixed_dequantize(test, dequantize)
    data_range = likelihoods.get(cfg.likelihood).data_range
    train, test = data.to_range(train, data_range), data.to_range(test, data_range)
    if cfg.model in IMAGE_MODELS:
        try:
            train, test = data.as_images(train, cfg.dataset), data.as_images(test, cfg.dataset)
        except ValueError as e:
            raise ValueError(f"{setting('model', cfg.model)}: {e}") from None
    return train, test


def prepare_batch(cfg: TrainConfig, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A train batch as the model reads it: binarised afresh ("dynamic"), or dequantised afresh for a
    continuous density of 8-bit data (uniform noise in each level's bin), or as it is."""
    binarize, dequantize = data_treatment(cfg)
    if binarize == "dynamic":
        return data.binarize_batch(x, generator)
    if dequantize:
        return data.dequantize(x, generator, dequantize, likelihoods.get(cfg.resolved().likelihood).data_range)
    return x


def bits_per_dim_setup(cfg: TrainConfig, example_shape) -> tuple[int, float | None] | None:
    """``(num_dims, bin_width)`` for ``likelihoods.bits_per_dim`` of a run's test log-likelihoods, or None where
    bits per dimension do not apply (a Bernoulli model of grey values, a density of data that are not
    quantised)."""
    binarize, _ = data_treatment(cfg)
    applies, width = likelihoods.get(cfg.resolved().likelihood).bin_width(data.levels(cfg.dataset),
                                                                        binarize is not None)
    return (math.prod(example_shape), width) if applies else None
