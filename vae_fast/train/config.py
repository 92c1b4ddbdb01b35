"""A run's settings: ``TrainConfig``, saved in config.json and every checkpoint, checked once."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..models import likelihoods
from ..models.hierarchical import CONFIGS as HVAE_CONFIGS
from ..models.vae import OBJECTIVES, OBS_LOGVAR_MODES
from . import data
from .messages import flag, setting

# Fields that may change when a run is resumed: they do not change what is computed (epochs only extends it,
# except under a cosine schedule, whose length it sets).
RESUMABLE_CHANGES = ("epochs", "device", "compile", "out", "log_dir", "data_dir", "keep")


MODELS = ("mlp", "conv", "hvae")
IMAGE_MODELS = ("conv", "hvae")  # models of (C, H, W) images


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in config.json and the checkpoint. ``None`` fields depend on the
    data set (see :meth:`resolved`)."""

    dataset: str = "digits"
    data_dir: str | None = None  # the image sets' files (None: data.default_data_dir)
    epochs: int = 100
    batch_size: int = 100
    model: str = "mlp"  # "mlp" | "conv" | "hvae" (hierarchical, VDVAE's design)
    hvae_config: str = "small"  # hvae only: a name of vae_fast.models.hierarchical.CONFIGS
    latent_dim: int = 8  # the flat latent's size (mlp, and conv without latent_channels)
    latent_channels: int | None = None  # conv only: a spatial latent (latent_channels, H/4, W/4)
    hidden: list = field(default_factory=lambda: [256, 128])  # mlp only
    likelihood: str | None = None  # None: gaussian for the real-valued "synthetic", bernoulli for images
    obs_logvar: str | float = "scalar"
    binarize: str = "dynamic"  # "dynamic" | "fixed" | "none"
    num_samples: int = 1
    objective: str = "elbo"
    beta: float = 1.0
    warmup_epochs: int = 0  # linear KL warm-up
    free_bits: float = 0.0
    lr: float = 1e-3
    lr_schedule: str = "constant"  # "constant" | "cosine" (to 0 at the last step)
    warmup_steps: int = 0  # linear learning-rate warm-up, before either schedule
    grad_clip: float = 0.0  # max global gradient norm; 0: no clipping
    skip_threshold: float = 0.0  # skip an update whose gradient norm (before clipping) is above this; 0: never
    keep: int = 1  # the last N epochs' checkpoints kept (checkpoint-epoch<E>.pt), checkpoint.pt the newest
    save: str = "last"  # the model a run keeps for its figures, evaluate and sample: "last" | "best"
    device: str = "auto"
    amp: str = "off"
    compile: bool = False
    seed: int = 0
    out: str | None = None  # None: runs/<data set>
    log_dir: str | None = None  # TensorBoard event files (optional dependency); metrics.jsonl is always written

    def resolved(self) -> "TrainConfig":
        """A copy with the data-set-dependent defaults filled in."""
        name = self.dataset.split(":")[0] if isinstance(self.dataset, str) else "run"
        return dataclasses.replace(
            self,
            likelihood=self.likelihood or ("gaussian" if self.dataset == "synthetic" else "bernoulli"),
            out=self.out or f"runs/{name}",
        )

    def validate(self) -> "TrainConfig":
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        for name in ("epochs", "batch_size", "latent_dim", "num_samples", "keep"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{flag(name)} must be a positive integer, got {v!r}")
        for name in ("warmup_epochs", "warmup_steps", "seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{flag(name)} must be a non-negative integer, got {v!r}")
        for name in ("beta", "free_bits", "grad_clip", "skip_threshold", "lr"):
            v = getattr(self, name)
            need(_is_number(v) and math.isfinite(v) and v >= 0, f"{flag(name)} must be a number >= 0, got {v!r}")
        need(self.lr > 0, f"{flag('lr')} must be > 0, got {self.lr}")
        need(isinstance(self.hidden, list) and all(isinstance(h, int) and h > 0 for h in self.hidden),
             f"{flag('hidden')} must be positive integers, got {self.hidden!r}")
        need(self.latent_channels is None or (isinstance(self.latent_channels, int)
                                              and not isinstance(self.latent_channels, bool)
                                              and self.latent_channels >= 1),
             f"{flag('latent_channels')} must be a positive integer, got {self.latent_channels!r}")
        need(self.latent_channels is None or self.model == "conv",
             f"{flag('latent_channels')} (a spatial latent) needs {setting('model', 'conv')}")
        need(self.model == "hvae" or self.hvae_config == "small",
             f"{flag('hvae_config')} is the hierarchical model's: it needs {setting('model', 'hvae')}")
        need(self.model != "hvae" or self.hvae_config in HVAE_CONFIGS,
             f"{flag('hvae_config')} must be {' | '.join(HVAE_CONFIGS)}, got {self.hvae_config!r}")
        need(self.model != "hvae" or self.objective == "elbo" and self.num_samples == 1 and self.free_bits == 0,
             f"{setting('model', 'hvae')} trains the single-sample ELBO ({setting('objective', 'elbo')}, "
             f"{setting('num_samples', 1)}, no {flag('free_bits')}); evaluate gives its IWAE and log p(x)")
        for name, choices in (("dataset", None), ("likelihood", tuple(likelihoods.LIKELIHOODS)),
                              ("model", MODELS),
                              ("binarize", ("dynamic", "fixed", "none")), ("objective", OBJECTIVES),
                              ("lr_schedule", ("constant", "cosine")), ("save", ("last", "best")),
                              ("device", ("auto", "cpu", "cuda")), ("amp", ("off", "bf16", "fp16"))):
            v = getattr(self, name)
            need(isinstance(v, str) and (choices is None or v in choices),
                 f"{flag(name)} must be {' | '.join(choices or ('a string',))}, got {v!r}")
        need(likelihoods.get(self.likelihood).eight_bit != "levels"
             or (data.levels(self.dataset) == 256 and self.model in IMAGE_MODELS),
             f"{setting('likelihood', self.likelihood)} is a distribution over the 256 values of 8-bit images: it needs "
             f"an 8-bit image set ({' | '.join(data.IMAGE_SETS)}, mnist:PATH) and an image model "
             f"({setting('model', 'conv')} or {setting('model', 'hvae')}), got "
             f"{setting('dataset', self.dataset)} and {setting('model', self.model)}")
        need(_is_number(self.obs_logvar) or self.obs_logvar in OBS_LOGVAR_MODES,
             f"{flag('obs_logvar')} must be {' | '.join(OBS_LOGVAR_MODES)} or a number, got {self.obs_logvar!r}")
        need(not (self.dataset == "synthetic" and self.likelihood == "bernoulli"),
             f"{setting('dataset', 'synthetic')} is real-valued: a Bernoulli likelihood needs data in [0, 1]; "
             f"use {setting('likelihood', 'gaussian')} (its default)")
        need(not self.objective.startswith("iwae") or (self.beta == 1 and self.free_bits == 0
                                                      and self.warmup_epochs == 0),
             f"{flag('beta')}, {flag('warmup_epochs')} and {flag('free_bits')} apply to the ELBO only, "
             f"not {setting('objective', self.objective)}")
        need(not (self.objective == "elbo-stl" and self.free_bits > 0),
             f"{flag('free_bits')} needs {setting('objective', 'elbo')} (elbo-stl has no per-dimension KL to floor)")
        need(isinstance(self.compile, bool), f"{flag('compile')} must be true or false, got {self.compile!r}")
        for name in ("out", "log_dir", "data_dir"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, str) and v), f"{flag(name)} must be a folder name, got {v!r}")
        return self

    def to_json(self) -> dict:
        """JSON types only, so the checkpoint loads with ``weights_only=True``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        """From a dict such as config.json (keys may use ``-`` for ``_``); missing fields take their defaults."""
        d = {k.replace("-", "_"): v for k, v in d.items()}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {', '.join(names)}")
        return cls(**d)


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys (e.g. seed, rank, epoch)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def run_title(cfg: TrainConfig, epoch: int, latent_shape=None) -> str:
    """What the figures say about a run: data set, model, objective and epoch (and the model's
    ``latent_shape``, if given, for a spatial latent)."""
    cfg = cfg.resolved()
    objective = {"elbo": "ELBO", "iwae": "IWAE", "iwae-dreg": "IWAE (DReG)", "elbo-stl": "ELBO (STL)"}.get(
        cfg.objective, cfg.objective)
    if cfg.num_samples > 1:
        objective += f", K={cfg.num_samples}"
    if cfg.beta != 1:
        objective += f", beta={cfg.beta:g}"
    if cfg.model == "hvae":
        model, latent = f"hierarchical VAE ({cfg.hvae_config})", f"{latent_shape[0] if latent_shape else '?'} dims"
    else:
        model = "conv VAE" if cfg.model == "conv" else "VAE"
        latent = "x".join(map(str, latent_shape)) if latent_shape else cfg.latent_dim
    return f"{cfg.dataset}: {cfg.likelihood.capitalize()} {model}, latent {latent}, {objective}, epoch {epoch}"
