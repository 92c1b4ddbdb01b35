"""The training loop: one process or DDP under torchrun, AMP, torch.compile, atomic resumable checkpoints.

Reproducibility: every epoch re-seeds its randomness (torch's generator, from which the fused ops draw their
seeds, and the binarisation generator) from (seed, rank, epoch), and the data order comes from
DistributedSampler's (seed, epoch). So ranks draw different noise, and a run resumed from the checkpoint of
epoch e draws exactly what the uninterrupted run drew from epoch e on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from . import data, plots
from .model import OBJECTIVES, OBS_LOGVAR_MODES, VAE, mlp_vae

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
_EVAL_STREAM = 2**31  # seed key of the evaluation noise; never a rank
# Fields that may change when a run is resumed: they do not change what is computed (epochs only extends it).
RESUMABLE_CHANGES = ("epochs", "device", "compile", "out")


@dataclass
class TrainConfig:
    dataset: str = "digits"
    epochs: int = 100
    batch_size: int = 100
    latent_dim: int = 8
    hidden: list = field(default_factory=lambda: [256, 128])
    likelihood: str = "bernoulli"
    obs_logvar: str | float = "scalar"
    binarize: str = "dynamic"  # "dynamic" | "fixed" | "none"
    num_samples: int = 1
    objective: str = "elbo"
    beta: float = 1.0
    warmup_epochs: int = 0
    free_bits: float = 0.0
    lr: float = 1e-3
    device: str = "auto"
    amp: str = "off"
    compile: bool = False
    seed: int = 0
    out: str = "runs/digits"

    def validate(self) -> "TrainConfig":
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        for name in ("epochs", "batch_size", "latent_dim", "num_samples"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= (0 if name == "epochs" else 1),
                 f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        need(all(isinstance(h, int) and h > 0 for h in self.hidden), f"--hidden must be positive integers, got {self.hidden}")
        need(self.likelihood in ("bernoulli", "gaussian"), f"--likelihood must be bernoulli or gaussian, got {self.likelihood!r}")
        need(isinstance(self.obs_logvar, (int, float)) or self.obs_logvar in OBS_LOGVAR_MODES,
             f"--obs-logvar must be one of {', '.join(OBS_LOGVAR_MODES)} or a number, got {self.obs_logvar!r}")
        need(self.binarize in ("dynamic", "fixed", "none"), f"--binarize must be dynamic, fixed or none, got {self.binarize!r}")
        need(self.objective in OBJECTIVES, f"--objective must be elbo or iwae, got {self.objective!r}")
        need(self.beta >= 0 and self.free_bits >= 0 and self.warmup_epochs >= 0,
             "--beta, --free-bits and --warmup-epochs must be >= 0")
        need(self.objective == "elbo" or (self.beta == 1 and self.free_bits == 0 and self.warmup_epochs == 0),
             "--beta, --warmup-epochs and --free-bits apply to the ELBO only, not --objective iwae")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        need(self.amp in ("off", "bf16", "fp16"), f"--amp must be off, bf16 or fp16, got {self.amp!r}")
        need(isinstance(self.seed, int) and self.seed >= 0, f"--seed must be a non-negative integer, got {self.seed!r}")
        return self

    def to_json(self) -> dict:
        """JSON types only, so the checkpoint loads with ``weights_only=True``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**d)


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys (e.g. seed, rank, epoch)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available in this torch build or machine")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name, local_rank) if name == "cuda" else torch.device(name)


def build_model(cfg: TrainConfig, input_dim: int) -> VAE:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and on every resume
    return mlp_vae(input_dim, cfg.latent_dim, cfg.hidden, cfg.likelihood, obs_logvar=cfg.obs_logvar)


def load_data(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    binarize = None if cfg.binarize == "none" or cfg.likelihood == "gaussian" else cfg.binarize
    return data.load(cfg.dataset, binarize=binarize)


# ---- files ---------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """``write(f)`` into a temporary file in the same folder, flush and fsync, then ``os.replace``: a kill at
    any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """The checkpoint dict (``weights_only=True``: no pickled code); ValueError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's message here is advice to drop weights_only: not for this file
        raise ValueError(f"cannot read checkpoint {path}: not a weights-only torch checkpoint") from None
    except Exception as e:  # torch raises many kinds here (RuntimeError, EOFError, ...)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "empty or truncated file"
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {detail}") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "epoch", "input_dim"} <= set(ckpt):
        raise ValueError(f"{path} is not a vae_fast checkpoint")
    return ckpt


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
    """The trained model of a run folder (in eval mode), its config and the checkpoint."""
    ckpt = load_checkpoint(Path(run) / CHECKPOINT)
    cfg = TrainConfig.from_json(ckpt["config"])
    dev = resolve_device(device)
    model = build_model(cfg, ckpt["input_dim"])
    model.load_state_dict(ckpt["model"])
    return model.to(dev).eval(), cfg, ckpt


# ---- training ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(fn, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``fn(batch) -> (B,)`` over all of ``x``, concatenated (in float32 on the CPU)."""
    return torch.cat([fn(x[i : i + batch_size]).float().cpu() for i in range(0, x.shape[0], batch_size)])


@dataclass
class TrainResult:
    model: VAE  # the plain module (not DDP- or compile-wrapped)
    metrics: list  # one dict per epoch, as in metrics.jsonl
    out: Path


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as ``cfg`` says, writing the run folder ``cfg.out`` (rank 0 only under DDP)."""
    cfg.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        result = _train(cfg, resume, progress, device)
        if own_group:
            # Rank 0 evaluates and writes after the last step: tearing gloo down on a rank that is done
            # while its peer still talks to it can abort the process ("terminate called ...").
            dist.barrier()
        return result
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, progress: bool, device: torch.device) -> TrainResult:
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out = Path(cfg.out)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out / CHECKPOINT)
        saved = TrainConfig.from_json(ckpt["config"])
        changed = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)!r} (saved: {getattr(saved, f.name)!r})"
                   for f in dataclasses.fields(cfg)
                   if f.name not in RESUMABLE_CHANGES and getattr(cfg, f.name) != getattr(saved, f.name)]
        if changed:
            raise ValueError(f"--resume continues the saved run; only {', '.join(RESUMABLE_CHANGES)} may change, "
                             f"not {', '.join(changed)}")

    train_x, test_x = (t.to(device) for t in load_data(cfg))
    dynamic = cfg.binarize == "dynamic" and cfg.likelihood == "bernoulli"
    raw = build_model(cfg, train_x.shape[1]).to(device)
    optimizer = torch.optim.Adam(raw.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start_epoch, step = 0, 0
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]

    metrics: list[dict] = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        if not resume:  # a fresh run: nothing of an earlier run in this folder may be mistaken for this one's
            if (out / CHECKPOINT).exists() and progress:
                tqdm.write(f"overwriting the run in {out} (--resume continues it instead)")
            for name in (CHECKPOINT, "loss.png", "reconstructions.png", "samples.png", "manifold.png", "eval.json"):
                (out / name).unlink(missing_ok=True)
        write_json(out / CONFIG, cfg.to_json())
        # Keep the lines of the epochs the checkpoint holds: later ones are trained again.
        metrics = [m for m in read_metrics(out / METRICS) if m.get("epoch", math.inf) <= start_epoch] if resume else []
        atomic_write(out / METRICS, lambda f: f.write("".join(json.dumps(m) + "\n" for m in metrics).encode()))

    model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None) if distributed else raw
    if cfg.compile:
        model = torch.compile(model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    sampler = DistributedSampler(range(train_x.shape[0]), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch

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
                   disable=not progress or rank != 0, dynamic_ncols=True)
        for i in range(0, len(order), cfg.batch_size):
            x = train_x[order[i : i + cfg.batch_size]]
            if dynamic:
                x = data.binarize_batch(x, bin_gen)
            beta = cfg.beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps else cfg.beta
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, stats = model(x, num_samples=cfg.num_samples, beta=beta, free_bits=cfg.free_bits,
                                    objective=cfg.objective)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
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
        if not all(map(math.isfinite, means)):
            raise FloatingPointError(f"epoch {epoch + 1}: training diverged (loss {means[0]})")
        if rank != 0:
            continue
        torch.manual_seed(derive_seed(cfg.seed, _EVAL_STREAM, epoch))
        raw.eval()
        test_elbo = evaluate(raw.elbo, test_x).mean().item()
        row = {"epoch": epoch + 1, "step": step, "train_loss": means[0], "train_elbo": means[1],
               "train_kl": means[2], "train_rec": means[3], "test_elbo": test_elbo, "beta": beta, "world_size": world,
               "time_s": round(time.perf_counter() - t0, 4)}
        metrics.append(row)
        # The metrics line first, then the checkpoint: a resume drops lines past the checkpoint's epoch.
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        save_checkpoint(out / CHECKPOINT, raw, optimizer, scaler, epoch + 1, step, cfg, train_x.shape[1])
        if progress:
            tqdm.write(f"epoch {epoch + 1:3d}/{cfg.epochs}  train ELBO {means[1]:9.3f}  test ELBO {test_elbo:9.3f}"
                       f"  KL {means[2]:7.3f}  ({row['time_s']:.2f} s)")

    if rank == 0:
        raw.eval()
        plots.save_all(raw, metrics, test_x, out)
    return TrainResult(raw, metrics, out)


def save_checkpoint(path: Path, model, optimizer, scaler, epoch: int, step: int, cfg: TrainConfig,
                    input_dim: int) -> None:
    state = {
        "input_dim": input_dim,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": cfg.to_json(),
        # Informational: each epoch re-seeds from (seed, rank, epoch), so resuming does not need these.
        "rng": {"torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})},
    }
    atomic_write(path, lambda f: torch.save(state, f))
