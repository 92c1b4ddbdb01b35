"""The run folder: its files (checkpoints, metrics, config, figures) written atomically, one writer at a time,
and a run replaced as a whole.

Run folders are never destroyed by accident: ``train`` refuses a folder that holds a checkpoint unless told to
resume it or overwrite it, and ``checkpoint.pt`` is only ever replaced (atomically) by a newer good one. One
trainer at a time writes a run folder: it holds an exclusive ``flock`` on ``RUN/.lock`` for as long as it
runs (the OS drops it when the process dies, so a restart after a kill is never blocked). Replacing a run
is atomic as a whole: the new run trains in ``RUN/.overwrite/`` until it has saved its first epoch, then a
commit mark there decides the swap, which any later command finishes (or, without the mark, undoes).
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import torch

from ..models.vae import VAE
from .build import build_model, resolve_device
from .config import TrainConfig
from .messages import flag, setting

CHECKPOINT = "checkpoint.pt"  # the last good epoch: what --resume continues
BEST = "best.pt"  # with save="best": the epoch with the highest test ELBO
METRICS = "metrics.jsonl"
CONFIG = "config.json"
EVAL = "eval.json"  # written by evaluate
FIGURES = ("loss.png", "reconstructions.png", "samples.png", "manifold.png", "kl_layers.png")
LOCK = ".lock"  # flock'ed by the live trainer; never deleted (a deleted lock file could be locked twice)
STAGING = ".overwrite"  # a replacing run's files until its first epoch is saved
COMMITTED = ".committed"  # in STAGING: the replacement is decided; lists the new run's files


class RunInUse(RuntimeError):
    """Another live process is training into this run folder."""


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


def damaged(path: Path, what: str) -> ValueError:
    """The error of a damaged checkpoint: what is wrong, and what to do, naming the newest good checkpoint the
    run kept (``keep``) if it has one."""
    good = newest_good_checkpoint(Path(path).parent, but=Path(path))
    if good is not None:
        what_to_do = (f"the newest good one the run kept is {good[0]} (epoch {good[1]}): copy it over "
                      f"{Path(path).parent / CHECKPOINT} to go on from there, or train the run afresh with "
                      f"{setting('overwrite')}")
    else:
        what_to_do = (f"the run kept no earlier checkpoint ({flag('keep')} N keeps the last N epochs' checkpoints): "
                      f"restore it from a copy, or train the run afresh with {setting('overwrite')}")
    return ValueError(f"checkpoint {path} is damaged ({what}): {what_to_do}")


def kept_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The epoch checkpoints a run keeps with ``keep`` > 1 (``checkpoint-epoch<E>.pt``), newest first."""
    found = []
    for p in Path(out).glob("checkpoint-epoch*.pt"):
        digits = p.name[len("checkpoint-epoch"):-len(".pt")]
        if digits.isdigit():
            found.append((int(digits), p))
    return sorted(found, reverse=True)


def newest_good_checkpoint(out: Path, but: Path | None = None) -> tuple[Path, int] | None:
    """(path, epoch) of the newest kept checkpoint of the run in ``out`` that loads (``but`` left out), or None."""
    for epoch, p in kept_checkpoints(out):
        if but is not None and p.resolve() == but.resolve():
            continue
        try:
            torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 -- damaged too: look further back
            continue
        return p, epoch
    return None


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
        raise damaged(path, "truncated or corrupt: it does not load as a torch checkpoint") from None
    except (PermissionError, IsADirectoryError) as e:  # the file may be fine: say why it cannot be opened
        raise OSError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except Exception:  # torch raises many kinds for torn or foreign bytes (OSError, RuntimeError, KeyError, ...)
        raise damaged(path, "truncated or corrupt: it does not load as a torch checkpoint") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "epoch", "input_dim"} <= set(ckpt):
        raise damaged(path, "a torch file, but not a vae_fast checkpoint")
    if not (isinstance(ckpt["config"], dict) and isinstance(ckpt["epoch"], int) and isinstance(ckpt["model"], dict)):
        raise damaged(path, "its config, epoch or weights are not what a vae_fast checkpoint holds")
    return ckpt


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


def save_epoch_checkpoint(out: Path, epoch: int, keep: int, save) -> None:
    """Save epoch ``epoch``'s checkpoint as ``out/checkpoint.pt`` with ``save(path)`` (atomic). With ``keep`` > 1 it is
    written as ``checkpoint-epoch<E>.pt`` and ``checkpoint.pt`` becomes a hard link to it (an atomic rename, no
    second copy); then all but the newest ``keep`` epoch files are deleted: a kill at any moment leaves
    ``checkpoint.pt`` whole and at least the last ``keep - 1`` epochs before it."""
    out = Path(out)
    if keep <= 1:
        save(out / CHECKPOINT)
        return
    path = out / f"checkpoint-epoch{epoch:04d}.pt"
    save(path)
    link = out / f".{CHECKPOINT}.{os.getpid()}.link"
    link.unlink(missing_ok=True)
    os.link(path, link)
    os.replace(link, out / CHECKPOINT)
    fsync_dir(out)
    for _, old in kept_checkpoints(out)[keep:]:
        old.unlink(missing_ok=True)


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


def fsync_dir(path: Path) -> None:
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


def run_files(out: Path) -> list[Path]:
    """The files of the run in ``out``: those the trainer, ``evaluate`` and ``sample`` write there by default
    (anything else, such as a config file kept beside the run, is not the run's)."""
    return [p for p in out.iterdir() if p.is_file() and (
        p.name in (CHECKPOINT, BEST, METRICS, CONFIG, EVAL, *FIGURES)
        or (p.name.startswith("checkpoint-epoch") and p.name.endswith(".pt"))
        or (p.name.startswith("sample-seed") and p.name.endswith(".png")))]


def recover(out: Path) -> None:
    """Finish a replacement that has its commit mark, or undo one that has none (the caller holds the lock).
    Idempotent: a kill inside it leaves what a second call completes."""
    stage = out / STAGING
    if not stage.is_dir():
        return
    mark = stage / COMMITTED
    if mark.is_file():
        new = set(json.loads(mark.read_text()))
        for p in run_files(out):
            if p.name not in new:  # the old run's (a new file already moved in keeps its name)
                p.unlink()
        for name in sorted(new):
            if (stage / name).exists():
                os.replace(stage / name, out / name)
        fsync_dir(out)
        mark.unlink()
    for p in stage.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    stage.rmdir()
    fsync_dir(out)


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
        recover(out)
    finally:
        os.close(fd)


def commit(out: Path, stage: Path) -> None:
    """Replace the run in ``out`` by the one staged in ``stage``, as a whole: the commit mark decides it."""
    new = sorted(p.name for p in stage.iterdir() if p.is_file() and not p.name.startswith("."))
    atomic_write(stage / COMMITTED, lambda f: f.write(json.dumps(new).encode()))
    recover(out)


def saved_config(out: str | Path) -> dict | None:
    """The config of the checkpoint in run folder ``out``, or None if it has none (an error if unreadable)."""
    recover_run(out)
    path = Path(out) / CHECKPOINT
    return load_checkpoint(path)["config"] if path.exists() else None


def load_run(run: str | Path, device: str = "auto") -> tuple[VAE, TrainConfig, dict]:
    """The model a run folder keeps (in eval mode): the last epoch's, or with ``save="best"`` the best
    one's; its config and the checkpoint it came from."""
    recover_run(run)
    path = Path(run) / CHECKPOINT
    ckpt = load_checkpoint(path)
    cfg = saved_settings(ckpt["config"], path)
    if cfg.save == "best" and (Path(run) / BEST).exists():
        path = Path(run) / BEST
        ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    model = build_model(cfg, ckpt["input_dim"])
    load_weights(model, ckpt, path)
    return model.to(dev).eval(), cfg, ckpt


def saved_settings(config: dict, path: Path) -> "TrainConfig":
    try:
        return TrainConfig.from_json(config).resolved().validate()
    except (ValueError, TypeError):
        raise damaged(path, "its saved settings are not valid") from None


def load_weights(model, ckpt: dict, path: Path) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError):
        raise damaged(path, "its weights do not fit the model its config describes") from None


def kept(saved_epoch: int | None, out: Path, stage: Path | None = None) -> str:
    if stage is not None:
        return f"this run saved no epoch: the run it was to replace stays in {out}"
    if saved_epoch is None:
        return "this run saved no checkpoint"
    return f"the last good checkpoint (epoch {saved_epoch}) is kept in {out / CHECKPOINT}"
