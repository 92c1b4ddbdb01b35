"""The training loop: one process or DDP under torchrun, AMP, torch.compile, atomic resumable checkpoints.

Reproducibility: every epoch re-seeds its randomness (torch's generator, from which the fused ops draw their
seeds, and the binarisation generator) from (seed, rank, epoch), the data order comes from
DistributedSampler's (seed, epoch), and the learning rate is a function of the step alone. So ranks draw
different noise, and a run resumed from the checkpoint of epoch e computes exactly what the uninterrupted run
computed from epoch e on.

Run folders are never destroyed by accident: ``train`` refuses a folder that holds a checkpoint unless told to
resume it or overwrite it, and ``checkpoint.pt`` is only ever replaced (atomically) by a newer good one. One
trainer at a time writes a run folder: it holds an exclusive ``flock`` on ``RUN/.lock`` for as long as it
runs (the OS drops it when the process dies, so a restart after a kill is never blocked). Replacing a run
is atomic as a whole: the new run trains in ``RUN/.overwrite/`` until it has saved its first epoch, then a
commit mark there decides the swap, which any later command finishes (or, without the mark, undoes).
"""

from __future__ import annotations

import contextvars
import dataclasses
import fcntl
import json
import math
import os
import pickle
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from . import data, likelihoods, plots
from .conv import conv_vae
from .model import OBJECTIVES, OBS_LOGVAR_MODES, VAE, active_units, mlp_vae

CHECKPOINT = "checkpoint.pt"  # the last good epoch: what --resume continues
BEST = "best.pt"  # with save="best": the epoch with the highest test ELBO
METRICS = "metrics.jsonl"
CONFIG = "config.json"
EVAL = "eval.json"  # written by evaluate
FIGURES = ("loss.png", "reconstructions.png", "samples.png", "manifold.png")
LOCK = ".lock"  # flock'ed by the live trainer; never deleted (a deleted lock file could be locked twice)
STAGING = ".overwrite"  # a replacing run's files until its first epoch is saved
COMMITTED = ".committed"  # in STAGING: the replacement is decided; lists the new run's files
_EVAL_STREAM = 2**31  # seed key of the evaluation noise; never a rank
_FIGURE_STREAM = 2**31 + 1  # seed key of the figures' samples: a fresh run and a resume draw the same
# Fields that may change when a run is resumed: they do not change what is computed (epochs only extends it,
# except under a cosine schedule, whose length it sets).
RESUMABLE_CHANGES = ("epochs", "device", "compile", "out", "log_dir", "data_dir")
MODELS = ("mlp", "conv")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The command line's name ("vae-fast", "python -m vae_fast") while it runs a command, else None: messages
# then name settings as its flags (--batch-size, --resume), else as the Python API's arguments.
CLI_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("vae_fast_cli_prog", default=None)


def _flag(name: str) -> str:
    """A setting as the caller spells it: ``--batch-size`` on the command line, ``batch_size`` in Python."""
    return "--" + name.replace("_", "-") if CLI_PROG.get() else name


def _set(name: str, value=True) -> str:
    """A setting with its value as the caller spells it: ``--resume``, ``--objective iwae``; ``resume=True``,
    ``objective='iwae'``."""
    if CLI_PROG.get():
        return _flag(name) if value is True else f"{_flag(name)} {value}"
    return f"{name}={value!r}"


class RunInUse(RuntimeError):
    """Another live process is training into this run folder."""


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in config.json and the checkpoint. ``None`` fields depend on the
    data set (see :meth:`resolved`)."""

    dataset: str = "digits"
    data_dir: str | None = None  # the image sets' files (None: data.default_data_dir)
    epochs: int = 100
    batch_size: int = 100
    model: str = "mlp"  # "mlp" | "conv"
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

        for name in ("epochs", "batch_size", "latent_dim", "num_samples"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{_flag(name)} must be a positive integer, got {v!r}")
        for name in ("warmup_epochs", "warmup_steps", "seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{_flag(name)} must be a non-negative integer, got {v!r}")
        for name in ("beta", "free_bits", "grad_clip", "lr"):
            v = getattr(self, name)
            need(_is_number(v) and math.isfinite(v) and v >= 0, f"{_flag(name)} must be a number >= 0, got {v!r}")
        need(self.lr > 0, f"{_flag('lr')} must be > 0, got {self.lr}")
        need(isinstance(self.hidden, list) and all(isinstance(h, int) and h > 0 for h in self.hidden),
             f"{_flag('hidden')} must be positive integers, got {self.hidden!r}")
        need(self.latent_channels is None or (isinstance(self.latent_channels, int)
                                              and not isinstance(self.latent_channels, bool)
                                              and self.latent_channels >= 1),
             f"{_flag('latent_channels')} must be a positive integer, got {self.latent_channels!r}")
        need(self.latent_channels is None or self.model == "conv",
             f"{_flag('latent_channels')} (a spatial latent) needs {_set('model', 'conv')}")
        for name, choices in (("dataset", None), ("likelihood", tuple(likelihoods.LIKELIHOODS)),
                              ("model", MODELS),
                              ("binarize", ("dynamic", "fixed", "none")), ("objective", OBJECTIVES),
                              ("lr_schedule", ("constant", "cosine")), ("save", ("last", "best")),
                              ("device", ("auto", "cpu", "cuda")), ("amp", ("off", "bf16", "fp16"))):
            v = getattr(self, name)
            need(isinstance(v, str) and (choices is None or v in choices),
                 f"{_flag(name)} must be {' | '.join(choices or ('a string',))}, got {v!r}")
        need(likelihoods.get(self.likelihood).eight_bit != "levels"
             or (data.levels(self.dataset) == 256 and self.model == "conv"),
             f"{_set('likelihood', self.likelihood)} is a distribution over the 256 values of 8-bit images: it needs "
             f"an 8-bit image set ({' | '.join(data.IMAGE_SETS)}, mnist:PATH) and {_set('model', 'conv')}, got "
             f"{_set('dataset', self.dataset)} and {_set('model', self.model)}")
        need(_is_number(self.obs_logvar) or self.obs_logvar in OBS_LOGVAR_MODES,
             f"{_flag('obs_logvar')} must be {' | '.join(OBS_LOGVAR_MODES)} or a number, got {self.obs_logvar!r}")
        need(not (self.dataset == "synthetic" and self.likelihood == "bernoulli"),
             f"{_set('dataset', 'synthetic')} is real-valued: a Bernoulli likelihood needs data in [0, 1]; "
             f"use {_set('likelihood', 'gaussian')} (its default)")
        need(not self.objective.startswith("iwae") or (self.beta == 1 and self.free_bits == 0
                                                      and self.warmup_epochs == 0),
             f"{_flag('beta')}, {_flag('warmup_epochs')} and {_flag('free_bits')} apply to the ELBO only, "
             f"not {_set('objective', self.objective)}")
        need(not (self.objective == "elbo-stl" and self.free_bits > 0),
             f"{_flag('free_bits')} needs {_set('objective', 'elbo')} (elbo-stl has no per-dimension KL to floor)")
        need(isinstance(self.compile, bool), f"{_flag('compile')} must be true or false, got {self.compile!r}")
        for name in ("out", "log_dir", "data_dir"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, str) and v), f"{_flag(name)} must be a folder name, got {v!r}")
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


def _init_process_group(backend: str) -> None:
    """The env:// process group, its keys under a prefix of this torchrun attempt: torchrun's agent keeps one
    store across restarts, and a restarted gloo group that read the addresses a dead attempt left there hung
    or was refused in connectFullMesh (seen here, 1 restart in 3)."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"vae_fast/attempt_{torchrun_restart()}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{_set('device', 'cuda')}: CUDA is not available in this torch build or machine")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name, local_rank) if name == "cuda" else torch.device(name)


def build_model(cfg: TrainConfig, input_dim: int | list[int]) -> VAE:
    """The model ``cfg`` describes for examples of ``input_dim`` values (an int) or of that shape (a list)."""
    cfg = cfg.resolved()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and on every resume
    if cfg.model == "conv":
        latent = dict(latent_channels=cfg.latent_channels) if cfg.latent_channels else dict(latent_dim=cfg.latent_dim)
        return conv_vae(tuple(input_dim), likelihood=cfg.likelihood, obs_logvar=cfg.obs_logvar, **latent)
    return mlp_vae(input_dim, cfg.latent_dim, cfg.hidden, cfg.likelihood, obs_logvar=cfg.obs_logvar)


def _input_dim(x: torch.Tensor) -> int | list[int]:
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
    if cfg.model == "conv":
        try:
            train, test = data.as_images(train, cfg.dataset), data.as_images(test, cfg.dataset)
        except ValueError as e:
            raise ValueError(f"{_set('model', 'conv')}: {e}") from None
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


def torchrun_restart() -> int:
    """How many times torchrun has restarted this job (0 outside torchrun): a restart resumes by itself."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _say(message: str) -> None:
    """A status line for logs (stderr, flushed at once: job logs are files)."""
    print(f"{CLI_PROG.get() or 'vae_fast'}: {message}", file=sys.stderr, flush=True)


# ---- files ---------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """``write(f)`` into a temporary file in the same folder, flush and fsync, then ``os.replace``: a kill at
    any moment leaves either the old file or the new one, never a torn one. An OSError names ``path`` (not
    the temporary file) and says why, without errno numbers."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"checkpoint {path} is damaged ({what}): restore it from a copy, or train the run afresh "
                      f"with {_set('overwrite')}")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """The checkpoint dict (``weights_only=True``: no pickled code). FileNotFoundError if there is none;
    ValueError naming the file, saying it is damaged and what to do, if it cannot be read as one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # pickled code; torch advises dropping weights_only: not for this file
            raise ValueError(f"cannot read checkpoint {path}: it holds pickled code (not a vae_fast checkpoint), "
                             "which is not loaded") from None
        raise _damaged(path, "truncated or corrupt: it does not load as a torch checkpoint") from None
    except (PermissionError, IsADirectoryError) as e:  # the file may be fine: say why it cannot be opened
        raise OSError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except Exception:  # torch raises many kinds for torn or foreign bytes (OSError, RuntimeError, KeyError, ...)
        raise _damaged(path, "truncated or corrupt: it does not load as a torch checkpoint") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "epoch", "input_dim"} <= set(ckpt):
        raise _damaged(path, "a torch file, but not a vae_fast checkpoint")
    if not (isinstance(ckpt["config"], dict) and isinstance(ckpt["epoch"], int) and isinstance(ckpt["model"], dict)):
        raise _damaged(path, "its config, epoch or weights are not what a vae_fast checkpoint holds")
    return ckpt


def saved_config(out: str | Path) -> dict | None:
    """The config of the checkpoint in run folder ``out``, or None if it has none (an error if unreadable)."""
    recover_run(out)
    path = Path(out) / CHECKPOINT
    return load_checkpoint(path)["config"] if path.exists() else None


# ---- one writer per run folder, and replacing a run as a whole ------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_run(out: str | Path) -> int:
    """Create the run folder if needed and take its writer's lock: an exclusive ``flock`` on ``RUN/.lock``,
    held until the returned descriptor is closed or the process dies (the OS drops it then: a restart after
    a kill is never blocked). RunInUse, naming the live holder, if another process holds it."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OSError(f"cannot create the run folder {out}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunInUse(f"{out} is being trained by another process ({holder or 'pid unknown'}), which holds "
                       f"{out / LOCK}: wait for it to end, or stop it") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def _run_files(out: Path) -> list[Path]:
    """The files of the run in ``out``: those the trainer, ``evaluate`` and ``sample`` write there by default
    (anything else, such as a config file kept beside the run, is not the run's)."""
    return [p for p in out.iterdir() if p.is_file() and (
        p.name in (CHECKPOINT, BEST, METRICS, CONFIG, EVAL, *FIGURES)
        or (p.name.startswith("sample-seed") and p.name.endswith(".png")))]


def _recover(out: Path) -> None:
    """Finish a replacement that has its commit mark, or undo one that has none (the caller holds the lock).
    Idempotent: a kill inside it leaves what a second call completes."""
    stage = out / STAGING
    if not stage.is_dir():
        return
    mark = stage / COMMITTED
    if mark.is_file():
        new = set(json.loads(mark.read_text()))
        for p in _run_files(out):
            if p.name not in new:  # the old run's (a new file already moved in keeps its name)
                p.unlink()
        for name in sorted(new):
            if (stage / name).exists():
                os.replace(stage / name, out / name)
        _fsync_dir(out)
        mark.unlink()
    for p in stage.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    stage.rmdir()
    _fsync_dir(out)


def recover_run(out: str | Path) -> None:
    """Bring a run folder that a kill left in the middle of ``overwrite`` to a whole run: the new one if it
    had saved its first epoch, else the old one. Does nothing while a live trainer holds the folder (it
    finishes that itself) or if there is nothing to do."""
    out = Path(out)
    if not (out / STAGING).is_dir():
        return
    try:
        fd = lock_run(out)
    except (RunInUse, OSError):  # a live trainer's, or a folder this process may not write: read it as it is
        return
    try:
        _recover(out)
    finally:
        os.close(fd)


def _commit(out: Path, stage: Path) -> None:
    """Replace the run in ``out`` by the one staged in ``stage``, as a whole: the commit mark decides it."""
    new = sorted(p.name for p in stage.iterdir() if p.is_file() and not p.name.startswith("."))
    atomic_write(stage / COMMITTED, lambda f: f.write(json.dumps(new).encode()))
    _recover(out)


def read_metrics(path: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a line torn by a kill is dropped)."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def load_run(run: str | Path, device: str = "auto") -> tuple[VAE, TrainConfig, dict]:
    """The model a run folder keeps (in eval mode): the last epoch's, or with ``save="best"`` the best
    one's; its config and the checkpoint it came from."""
    recover_run(run)
    path = Path(run) / CHECKPOINT
    ckpt = load_checkpoint(path)
    cfg = _saved_settings(ckpt["config"], path)
    if cfg.save == "best" and (Path(run) / BEST).exists():
        path = Path(run) / BEST
        ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    model = build_model(cfg, ckpt["input_dim"])
    _load_weights(model, ckpt, path)
    return model.to(dev).eval(), cfg, ckpt


def _saved_settings(config: dict, path: Path) -> "TrainConfig":
    try:
        return TrainConfig.from_json(config).resolved().validate()
    except (ValueError, TypeError):
        raise _damaged(path, "its saved settings are not valid") from None


def _load_weights(model, ckpt: dict, path: Path) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError):
        raise _damaged(path, "its weights do not fit the model its config describes") from None


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
    model = "conv VAE" if cfg.model == "conv" else "VAE"
    latent = "x".join(map(str, latent_shape)) if latent_shape else cfg.latent_dim
    return f"{cfg.dataset}: {cfg.likelihood.capitalize()} {model}, latent {latent}, {objective}, epoch {epoch}"


# ---- training ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(fn, x: torch.Tensor, batch_size: int = 500, label: str | None = None) -> torch.Tensor:
    """``fn(batch) -> (B,)`` over all of ``x``, concatenated (in float32 on the CPU). With ``label``, progress on
    stderr: a bar with its estimate on a terminal, else one line as the stage starts and one as it ends."""
    starts = range(0, x.shape[0], batch_size)
    if label is None:
        return torch.cat([fn(x[i : i + batch_size]).float().cpu() for i in starts])
    terminal = sys.stderr.isatty()
    if not terminal:
        _say(f"evaluate: {label}: {x.shape[0]} examples in {len(starts)} batches ...")
    began, parts = time.monotonic(), []
    with tqdm(total=x.shape[0], desc=label, unit="ex", disable=not terminal, leave=False, file=sys.stderr) as bar:
        for i in starts:
            parts.append(fn(x[i : i + batch_size]).float().cpu())
            bar.update(parts[-1].shape[0])
    if not terminal:
        _say(f"evaluate: {label}: done in {time.monotonic() - began:.1f} s")
    return torch.cat(parts)


@dataclass
class TrainResult:
    model: VAE  # the plain module (not DDP- or compile-wrapped): the last epoch's, or with save="best" the best
    metrics: list  # one dict per epoch, as in metrics.jsonl
    out: Path
    summary: str = ""  # what the run ended with, where it went and what comes next (printed with progress)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train as ``cfg`` says, writing the run folder ``cfg.out`` (rank 0 only under DDP).

    ``resume``: continue the checkpoint in the folder, or start a new run if there is none. Without it a
    folder holding a checkpoint is refused (FileExistsError) unless ``overwrite``, which replaces the run as a
    whole once the new one has saved its first epoch. A folder another live process trains is refused
    (RunInUse). Under torchrun a restarted job resumes by itself. ``progress``: a progress bar on a
    terminal, one line per epoch and a summary at the end.
    """
    cfg = cfg.resolved().validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    if cfg.log_dir:
        _summary_writer_class()  # fail before any process group or file exists
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        _init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        result = _train(cfg, resume or torchrun_restart() > 0, overwrite, progress, device)
        if own_group:
            # Rank 0 evaluates and writes after the last step: tearing gloo down on a rank that is done
            # while its peer still talks to it can abort the process ("terminate called ...").
            dist.barrier()
        return result
    finally:
        if own_group:
            dist.destroy_process_group()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(f"{_flag('log_dir')} needs TensorBoard, which is not installed (pip install tensorboard)"
                          ) from None
    return SummaryWriter


def _changed_settings(cfg: TrainConfig, saved: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that a resume of ``saved`` may not change, as the caller spells them."""
    changed = [f"{_set(f.name, getattr(cfg, f.name))} (saved: {getattr(saved, f.name)!r})"
               for f in dataclasses.fields(cfg)
               if f.name not in RESUMABLE_CHANGES and getattr(cfg, f.name) != getattr(saved, f.name)]
    if cfg.lr_schedule == "cosine" and cfg.epochs != saved.epochs:
        changed.append(f"{_set('epochs', cfg.epochs)} (saved: {saved.epochs}; under a cosine schedule it sets the "
                       "schedule's length)")
    return changed


def _open_run(cfg: TrainConfig, resume: bool, overwrite: bool) -> tuple[dict | None, bool]:
    """(the checkpoint to continue or None for a new run, whether the new run replaces one); refuses to
    replace a run unless asked to. The caller holds the folder's lock."""
    out = Path(cfg.out)
    _recover(out)  # a replacement a kill interrupted: finished or undone before anything reads the folder
    if not (out / CHECKPOINT).exists():
        if resume:
            _say(f"no checkpoint in {out}: starting a new run")
        return None, False
    if resume:
        ckpt = load_checkpoint(out / CHECKPOINT)
        changed = _changed_settings(cfg, _saved_settings(ckpt["config"], out / CHECKPOINT))
        if not changed:
            if ckpt["epoch"] >= cfg.epochs:
                _say(f"the run in {out} is at epoch {ckpt['epoch']} of {cfg.epochs}: nothing left to train")
            else:
                _say(f"resuming the run in {out} at epoch {ckpt['epoch']} of {cfg.epochs}")
            return ckpt, False
        if not overwrite:  # (both: a torchrun restart of a replacement that had not saved an epoch yet)
            may = ", ".join(_flag(n) for n in ("epochs", "device", "compile", "log_dir", "data_dir"))
            raise ValueError(f"{_set('resume')} continues the run in {out} with its own settings, but these differ: "
                             f"{', '.join(changed)}. Only {may} may change on resume ({_flag('epochs')} not under a "
                             f"cosine schedule); train into another folder, or replace this run with "
                             f"{_set('overwrite')}")
    elif not overwrite:
        raise FileExistsError(f"{out} holds a run ({CHECKPOINT}): {_set('resume')} continues it, "
                              f"{_set('overwrite')} replaces it")
    _say(f"replacing the run in {out}: it stays whole until this run has saved its first epoch")
    return None, True


def _agree(fn, distributed: bool):
    """``fn()`` on rank 0, its result (or its exception) on every rank: the ranks never part ways over what
    they find in the run folder (a rank that raises alone would leave the others waiting)."""
    if not distributed:
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # handed to every rank, raised there
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, progress: bool, device: torch.device) -> TrainResult:
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    out = Path(cfg.out)
    # Before the run folder is touched: a bad data set leaves nothing behind.
    train_x, test_x = (t.to(device) for t in load_data(cfg))
    lock = None

    def open_run():  # rank 0 alone holds the lock; the others learn its outcome (or its error) from _agree
        nonlocal lock
        lock = lock_run(out)
        return _open_run(cfg, resume, overwrite)

    try:
        ckpt, replacing = _agree(open_run, distributed)
        return _run(cfg, ckpt, out / STAGING if replacing else None, train_x, test_x, progress, device)
    finally:
        if lock is not None:
            os.close(lock)  # drops the flock


def _run(cfg: TrainConfig, ckpt: dict | None, stage: Path | None, train_x: torch.Tensor, test_x: torch.Tensor,
         progress: bool, device: torch.device) -> TrainResult:
    """The training itself; rank 0 writes into ``stage`` (a run being replaced) until the first epoch is
    saved, then commits the replacement and writes into the run folder."""
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out = Path(cfg.out)
    here = stage or out  # where this run's files go now
    binarize, dequantize = data_treatment(cfg)
    fresh = binarize == "dynamic" or dequantize is not None  # the train batches are drawn afresh
    raw = build_model(cfg, _input_dim(train_x)).to(device)
    optimizer = build_optimizer(raw.parameters(), cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start_epoch, step, best = 0, 0, None
    if ckpt is not None:
        _load_weights(raw, ckpt, out / CHECKPOINT)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt.get("best")

    metrics: list[dict] = []
    writer = None
    saved_epoch = start_epoch if ckpt is not None else None  # this run's last good checkpoint
    try:
        if rank == 0:
            if stage is not None:
                stage.mkdir()  # _open_run's recovery removed any older one
            for stale in out.glob(".*.tmp"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
            if ckpt is None and stage is None:  # a new run: nothing of an earlier one may be mistaken for this one's
                for p in _run_files(out):
                    p.unlink()
            write_json(here / CONFIG, cfg.to_json())
            # Keep the lines of the epochs the checkpoint holds: later ones are trained again.
            metrics = [m for m in read_metrics(out / METRICS) if m.get("epoch", math.inf) <= start_epoch] if ckpt else []
            atomic_write(here / METRICS, lambda f: f.write("".join(json.dumps(m) + "\n" for m in metrics).encode()))
            if cfg.log_dir:  # purge_step: a resumed run's events replace those past its checkpoint
                writer = _summary_writer_class()(cfg.log_dir, purge_step=step)

        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None) if distributed else raw
        if cfg.compile:
            model = torch.compile(model)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        sampler = DistributedSampler(range(train_x.shape[0]), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        kl_warmup_steps = cfg.warmup_epochs * steps_per_epoch
        bar_on = progress and rank == 0 and sys.stderr.isatty()  # off a terminal: one plain line per epoch
        was_active = metrics[-1].get("active_units", 1) if metrics else 1

        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            epoch_seed = derive_seed(cfg.seed, rank, epoch)
            torch.manual_seed(epoch_seed)  # the fused ops draw their Philox seeds from this generator
            bin_gen = torch.Generator(device=device).manual_seed(epoch_seed)
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), device=device)
            raw.train()
            sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss, elbo, kl, rec, examples
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not bar_on, dynamic_ncols=True)
            for i in range(0, len(order), cfg.batch_size):
                x = train_x[order[i : i + cfg.batch_size]]
                if fresh:
                    x = prepare_batch(cfg, x, bin_gen)
                beta = cfg.beta * min(1.0, (step + 1) / kl_warmup_steps) if kl_warmup_steps else cfg.beta
                lr = learning_rate(cfg, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, stats = model(x, num_samples=cfg.num_samples, beta=beta, free_bits=cfg.free_bits,
                                        objective=cfg.objective)
                # Caught at the step it happens (one host sync per step), before it reaches the weights.
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training diverged at epoch {epoch + 1}, step {i // cfg.batch_size + 1} of {steps_per_epoch}"
                        f" (loss {loss.item()}, lr {lr:g}); {_kept(saved_epoch, out, stage)}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                sums[:4] += x.shape[0] * torch.stack([loss.detach(), stats["elbo"], stats["kl"], stats["rec"]]).double()
                sums[4] += x.shape[0]
                bar.update()
                if bar.n % 10 == 0 and not bar.disable:
                    bar.set_postfix(elbo=f"{(sums[1] / sums[4]).item():.2f}")
            bar.close()
            if distributed:
                dist.all_reduce(sums)
            means = (sums[:4] / sums[4]).tolist()
            if rank != 0:
                continue
            torch.manual_seed(derive_seed(cfg.seed, _EVAL_STREAM, epoch))
            raw.eval()
            test_elbo = evaluate(raw.elbo, test_x).mean().item()
            if not all(map(math.isfinite, [*means, test_elbo])):
                raise FloatingPointError(f"training diverged in epoch {epoch + 1} (test ELBO {test_elbo}); "
                                         f"{_kept(saved_epoch, out, stage)}")
            active = active_units(raw, test_x)
            row = {"epoch": epoch + 1, "step": step, "train_loss": means[0], "train_elbo": means[1],
                   "train_kl": means[2], "train_rec": means[3], "test_elbo": test_elbo, "active_units": active,
                   "beta": beta, "lr": lr, "world_size": world, "time_s": round(time.perf_counter() - t0, 4)}
            metrics.append(row)
            if active == 0 and was_active:
                _say(f"warning: epoch {epoch + 1}: 0 of {raw.latent_dim} latent units active: the decoder ignores z "
                     f"(posterior collapse, if it lasts); KL warm-up ({_flag('warmup_epochs')}) or "
                     f"{_flag('free_bits')} can help")
            elif active and not was_active:
                _say(f"epoch {epoch + 1}: {active} of {raw.latent_dim} latent units active again")
            was_active = active
            # The metrics line first, then best.pt, then the checkpoint: a resume drops lines past the
            # checkpoint's epoch and redoes (bitwise) whatever came after it.
            with open(here / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
            if cfg.save == "best" and (best is None or test_elbo > best["test_elbo"]):
                best = {"epoch": epoch + 1, "test_elbo": test_elbo}
                save_checkpoint(here / BEST, raw, optimizer, scaler, epoch + 1, step, cfg, _input_dim(train_x), best)
            save_checkpoint(here / CHECKPOINT, raw, optimizer, scaler, epoch + 1, step, cfg, _input_dim(train_x), best)
            (here / EVAL).unlink(missing_ok=True)  # evaluate's result of an older checkpoint: never left stale
            saved_epoch = epoch + 1
            if stage is not None:  # the first good epoch of a replacing run: the old run goes, whole
                _commit(out, stage)
                here, stage = out, None
            if writer is not None:
                for key in ("train_loss", "train_elbo", "train_kl", "train_rec", "test_elbo", "active_units", "lr"):
                    writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train", "test")) else key,
                                      row[key], step)
                writer.flush()
            if progress:
                line = (f"epoch {epoch + 1:3d}/{cfg.epochs}  train ELBO {means[1]:9.3f}  test ELBO {test_elbo:9.3f}"
                        f"  KL {means[2]:7.3f}  active {active}/{raw.latent_dim}  ({row['time_s']:.2f} s)")
                tqdm.write(line)
                sys.stdout.flush()
    except KeyboardInterrupt as e:
        if rank == 0:
            _say(f"interrupted: {_kept(saved_epoch, out, stage)}"
                 + (f"; the same command with {_set('resume')} continues it" if saved_epoch else ""))
            e.reported = True  # the command line prints no second line
        raise
    finally:
        if writer is not None:
            writer.close()
        if stage is not None and rank == 0 and stage.is_dir():  # the replacement never saved an epoch: undo it
            _recover(out)

    summary = ""
    if rank == 0:
        last_epoch = metrics[-1]["epoch"] if metrics else start_epoch
        if cfg.save == "best" and best is not None:
            raw.load_state_dict(load_checkpoint(out / BEST, map_location=device)["model"])
            last_epoch = best["epoch"]
        raw.eval()
        # The figures' samples come from a generator of their own, seeded from the run's seed: a fresh run and
        # a resume of the finished run draw the same ones.
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(derive_seed(cfg.seed, _FIGURE_STREAM))
            figures = plots.save_all(raw, metrics, test_x, out, title=run_title(cfg, last_epoch, raw.latent_shape),
                                     objective=cfg.objective)
        summary = _summary(cfg, metrics, best, figures, bits_per_dim_setup(cfg, test_x.shape[1:]))
        if progress:
            print(summary, flush=True)
    return TrainResult(raw, metrics, out, summary)


def _summary(cfg: TrainConfig, metrics: list[dict], best: dict | None, figures: list[Path],
             bpd: tuple[int, float | None] | None = None) -> str:
    """Two lines: what the run reached and where its files are; what to run next. ``bpd``: (num_dims,
    bin_width) to state the ELBO in bits per dimension too, where they apply."""
    out = Path(cfg.out)

    def elbo(value):
        return f"{value:.3f}" + (f" ({likelihoods.bits_per_dim(value, *bpd):.3f} bits/dim)" if bpd else "")

    if metrics:
        reached = f"epoch {metrics[-1]['epoch']}/{cfg.epochs}, test ELBO {elbo(metrics[-1]['test_elbo'])}"
        if cfg.save == "best" and best is not None:
            reached += f" (kept: epoch {best['epoch']}, test ELBO {elbo(best['test_elbo'])}, in {out / BEST})"
    else:
        reached = "no epochs trained"
    names = "{" + ",".join(p.stem for p in figures) + "}.png" if len(figures) > 1 else figures[0].name if figures else ""
    where = f"checkpoint {out / CHECKPOINT}" + (f", figures {out / names}" if names else "")
    prog = CLI_PROG.get()
    then = (f"{prog} evaluate {out}; {prog} sample {out}" if prog
            else f"vae_fast.train.load_run({str(out)!r}) for the model")
    return f"done: {reached}; {where}\nnext: {then}"


def _kept(saved_epoch: int | None, out: Path, stage: Path | None = None) -> str:
    if stage is not None:
        return f"this run saved no epoch: the run it was to replace stays in {out}"
    if saved_epoch is None:
        return "this run saved no checkpoint"
    return f"the last good checkpoint (epoch {saved_epoch}) is kept in {out / CHECKPOINT}"


def save_checkpoint(path: Path, model, optimizer, scaler, epoch: int, step: int, cfg: TrainConfig,
                    input_dim: int | list[int], best: dict | None = None) -> None:
    state = {
        "input_dim": input_dim,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": cfg.to_json(),
        "best": best,  # {"epoch", "test_elbo"} of the best epoch so far (save="best"), else None
        # Informational: each epoch re-seeds from (seed, rank, epoch), so resuming does not need these.
        "rng": {"torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})},
    }
    atomic_write(path, lambda f: torch.save(state, f))
