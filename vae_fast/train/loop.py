"""The training loop: one process or DDP under torchrun, AMP, torch.compile, atomic resumable checkpoints.

Reproducibility: every epoch re-seeds its randomness (torch's generator, from which the fused ops draw their
seeds, and the binarisation generator) from (seed, rank, epoch), the data order comes from
DistributedSampler's (seed, epoch), and the learning rate is a function of the step alone. So ranks draw
different noise, and a run resumed from the checkpoint of epoch e computes exactly what the uninterrupted run
computed from epoch e on. The run folder's rules: ``run_folder.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from ..models import likelihoods
from ..models.vae import VAE, active_units
from . import plots
from .build import (EVAL_STREAM, FIGURE_STREAM, bits_per_dim_setup, build_model, build_optimizer, data_treatment,
                    init_process_group, input_dim_of, learning_rate, load_data, prepare_batch, resolve_device,
                    torchrun_restart)
from .config import RESUMABLE_CHANGES, TrainConfig, derive_seed, run_title
from .messages import CLI_PROG, flag, say, setting
from .run_folder import (BEST, CHECKPOINT, CONFIG, EVAL, METRICS, STAGING, atomic_write, commit, kept, load_checkpoint,
                         load_weights, lock_run, read_metrics, recover, run_files, save_checkpoint, save_epoch_checkpoint,
                         saved_settings,
                         write_json)

@torch.no_grad()
def evaluate(fn, x: torch.Tensor, batch_size: int = 500, label: str | None = None) -> torch.Tensor:
    """``fn(batch) -> (B,)`` over all of ``x``, concatenated (in float32 on the CPU). With ``label``, progress on
    stderr: a bar with its estimate on a terminal, else one line as the stage starts and one as it ends."""
    starts = range(0, x.shape[0], batch_size)
    if label is None:
        return torch.cat([fn(x[i : i + batch_size]).float().cpu() for i in starts])
    terminal = sys.stderr.isatty()
    if not terminal:
        say(f"evaluate: {label}: {x.shape[0]} examples in {len(starts)} batches ...")
    began, parts = time.monotonic(), []
    with tqdm(total=x.shape[0], desc=label, unit="ex", disable=not terminal, leave=False, file=sys.stderr) as bar:
        for i in starts:
            parts.append(fn(x[i : i + batch_size]).float().cpu())
            bar.update(parts[-1].shape[0])
    if not terminal:
        say(f"evaluate: {label}: done in {time.monotonic() - began:.1f} s")
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
        init_process_group("nccl" if device.type == "cuda" else "gloo")
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
        raise ImportError(f"{flag('log_dir')} needs TensorBoard, which is not installed (pip install tensorboard)"
                          ) from None
    return SummaryWriter


def _changed_settings(cfg: TrainConfig, saved: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that a resume of ``saved`` may not change, as the caller spells them."""
    changed = [f"{setting(f.name, getattr(cfg, f.name))} (saved: {getattr(saved, f.name)!r})"
               for f in dataclasses.fields(cfg)
               if f.name not in RESUMABLE_CHANGES and getattr(cfg, f.name) != getattr(saved, f.name)]
    if cfg.lr_schedule == "cosine" and cfg.epochs != saved.epochs:
        changed.append(f"{setting('epochs', cfg.epochs)} (saved: {saved.epochs}; under a cosine schedule it sets the "
                       "schedule's length)")
    return changed


def _open_run(cfg: TrainConfig, resume: bool, overwrite: bool) -> tuple[dict | None, bool]:
    """(the checkpoint to continue or None for a new run, whether the new run replaces one); refuses to
    replace a run unless asked to. The caller holds the folder's lock."""
    out = Path(cfg.out)
    recover(out)  # a replacement a kill interrupted: finished or undone before anything reads the folder
    if not (out / CHECKPOINT).exists():
        if resume:
            say(f"no checkpoint in {out}: starting a new run")
        return None, False
    if resume:
        ckpt = load_checkpoint(out / CHECKPOINT)
        changed = _changed_settings(cfg, saved_settings(ckpt["config"], out / CHECKPOINT))
        if not changed:
            if ckpt["epoch"] >= cfg.epochs:
                say(f"the run in {out} is at epoch {ckpt['epoch']} of {cfg.epochs}: nothing left to train")
            else:
                say(f"resuming the run in {out} at epoch {ckpt['epoch']} of {cfg.epochs}")
            return ckpt, False
        if not overwrite:  # (both: a torchrun restart of a replacement that had not saved an epoch yet)
            may = ", ".join(flag(n) for n in ("epochs", "device", "compile", "log_dir", "data_dir", "keep"))
            raise ValueError(f"{setting('resume')} continues the run in {out} with its own settings, but these differ: "
                             f"{', '.join(changed)}. Only {may} may change on resume ({flag('epochs')} not under a "
                             f"cosine schedule); train into another folder, or replace this run with "
                             f"{setting('overwrite')}")
    elif not overwrite:
        raise FileExistsError(f"{out} holds a run ({CHECKPOINT}): {setting('resume')} continues it, "
                              f"{setting('overwrite')} replaces it")
    say(f"replacing the run in {out}: it stays whole until this run has saved its first epoch")
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
    raw = build_model(cfg, input_dim_of(train_x)).to(device)
    optimizer = build_optimizer(raw.parameters(), cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start_epoch, step, best = 0, 0, None
    if ckpt is not None:
        load_weights(raw, ckpt, out / CHECKPOINT)
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
                for p in run_files(out):
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
            layer_sums = None  # a hierarchical model's KL per layer, summed over examples
            skipped = 0  # updates skipped for their gradient norm (skip_threshold)
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
                        f" (loss {loss.item()}, lr {lr:g}); {kept(saved_epoch, out, stage)}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip or cfg.skip_threshold:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or math.inf)
                # VDVAE's guard: the update of a batch whose gradient norm is far above the usual (or not finite) is
                # dropped and counted. The same norm on every rank (the gradients are all-reduced): all skip together.
                if cfg.skip_threshold and not bool(norm < cfg.skip_threshold):
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                else:
                    scaler.step(optimizer)
                scaler.update()
                step += 1
                sums[:4] += x.shape[0] * torch.stack([loss.detach(), stats["elbo"], stats["kl"], stats["rec"]]).double()
                sums[4] += x.shape[0]
                if "kl_layers" in stats:
                    layer_sums = x.shape[0] * stats["kl_layers"].double() + (0 if layer_sums is None else layer_sums)
                bar.update()
                if bar.n % 10 == 0 and not bar.disable:
                    bar.set_postfix(elbo=f"{(sums[1] / sums[4]).item():.2f}")
            bar.close()
            if distributed:
                dist.all_reduce(sums)
                if layer_sums is not None:
                    dist.all_reduce(layer_sums)
            means = (sums[:4] / sums[4]).tolist()
            if rank != 0:
                continue
            torch.manual_seed(derive_seed(cfg.seed, EVAL_STREAM, epoch))
            raw.eval()
            test_elbo = evaluate(raw.elbo, test_x).mean().item()
            if not all(map(math.isfinite, [*means, test_elbo])):
                raise FloatingPointError(f"training diverged in epoch {epoch + 1} (test ELBO {test_elbo}); "
                                         f"{kept(saved_epoch, out, stage)}")
            active = active_units(raw, test_x)
            row = {"epoch": epoch + 1, "step": step, "train_loss": means[0], "train_elbo": means[1],
                   "train_kl": means[2], "train_rec": means[3], "test_elbo": test_elbo, "active_units": active,
                   "beta": beta, "lr": lr, "world_size": world, "time_s": round(time.perf_counter() - t0, 4)}
            if cfg.skip_threshold:
                row["skipped_updates"] = skipped
            if layer_sums is not None:
                row["train_kl_layers"] = (layer_sums / sums[4]).tolist()
            metrics.append(row)
            if active == 0 and was_active:
                say(f"warning: epoch {epoch + 1}: 0 of {raw.latent_dim} latent units active: the decoder ignores z "
                     f"(posterior collapse, if it lasts); KL warm-up ({flag('warmup_epochs')}) or "
                     f"{flag('free_bits')} can help")
            elif active and not was_active:
                say(f"epoch {epoch + 1}: {active} of {raw.latent_dim} latent units active again")
            was_active = active
            # The metrics line first, then best.pt, then the checkpoint: a resume drops lines past the
            # checkpoint's epoch and redoes (bitwise) whatever came after it.
            with open(here / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
            if cfg.save == "best" and (best is None or test_elbo > best["test_elbo"]):
                best = {"epoch": epoch + 1, "test_elbo": test_elbo}
                save_checkpoint(here / BEST, raw, optimizer, scaler, epoch + 1, step, cfg, input_dim_of(train_x), best)
            save_epoch_checkpoint(here, epoch + 1, cfg.keep, lambda p: save_checkpoint(
                p, raw, optimizer, scaler, epoch + 1, step, cfg, input_dim_of(train_x), best))
            (here / EVAL).unlink(missing_ok=True)  # evaluate's result of an older checkpoint: never left stale
            saved_epoch = epoch + 1
            if stage is not None:  # the first good epoch of a replacing run: the old run goes, whole
                commit(out, stage)
                here, stage = out, None
            if writer is not None:
                for key in ("train_loss", "train_elbo", "train_kl", "train_rec", "test_elbo", "active_units", "lr"):
                    writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train", "test")) else key,
                                      row[key], step)
                writer.flush()
            if progress:
                line = (f"epoch {epoch + 1:3d}/{cfg.epochs}  train ELBO {means[1]:9.3f}  test ELBO {test_elbo:9.3f}"
                        f"  KL {means[2]:7.3f}  active {active}/{raw.latent_dim}  ({row['time_s']:.2f} s)"
                        + (f"  skipped {skipped}" if cfg.skip_threshold else ""))
                tqdm.write(line)
                sys.stdout.flush()
    except KeyboardInterrupt as e:
        if rank == 0:
            say(f"interrupted: {kept(saved_epoch, out, stage)}"
                 + (f"; the same command with {setting('resume')} continues it" if saved_epoch else ""))
            e.reported = True  # the command line prints no second line
        raise
    finally:
        if writer is not None:
            writer.close()
        if stage is not None and rank == 0 and stage.is_dir():  # the replacement never saved an epoch: undo it
            recover(out)

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
            torch.manual_seed(derive_seed(cfg.seed, FIGURE_STREAM))
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
