"""The trainer's run folder and options, in process and fast (tiny models on digits): runs are never destroyed
by accident (one writer per folder, --overwrite replaces a run whole even when killed at any moment), damaged
checkpoints say so, divergence is caught at its step, torchrun restarts resume, the learning-rate schedule,
gradient clipping, best checkpoints, config files, TensorBoard, posterior-collapse warnings, the figures and the
summary at the end."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

import vae_fast
from vae_fast.train import cli, plots
from vae_fast.models.vae import VAE
from vae_fast.train import TrainConfig, load_run, train
from vae_fast.train.build import build_optimizer, learning_rate
from vae_fast.train.run_folder import BEST, CHECKPOINT, RunInUse, read_metrics, recover_run

PACKAGE_PARENT = str(Path(vae_fast.__file__).resolve().parent.parent)

TINY = dict(hidden=[16], latent_dim=2, batch_size=300)  # 5 steps per epoch on digits' 1500 examples


def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "epochs": 2, "out": str(tmp_path / "run"), **kw})


def _main(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _files(run) -> dict:
    """The run folder's files and their bytes (not the lock file, which records its last holder)."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


def _ckpt(run) -> dict:
    return torch.load(run / CHECKPOINT, weights_only=True)


# ---- a run is never destroyed by accident ----------------------------------------------------------------------


def test_a_fresh_run_into_a_folder_with_a_run_is_refused_and_leaves_it_intact(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    train(cfg, progress=False)
    run = tmp_path / "run"
    before = _files(run)
    capsys.readouterr()

    # The Python API names its own arguments, the command line its flags.
    with pytest.raises(FileExistsError, match="resume=True continues it, overwrite=True replaces it"):
        train(_cfg(tmp_path, lr=1000.0), progress=False)
    code, _, err = _main(["train", "--out", run, "--epochs", 1, "--quiet"], capsys)
    assert code == 1 and "--resume continues it, --overwrite replaces it" in err and len(err.strip().splitlines()) == 1
    assert _files(run) == before  # nothing touched, not even config.json

    # --overwrite replaces it; a diverging replacement keeps the old run, whole (nothing better came).
    with pytest.raises(FloatingPointError, match="this run saved no epoch: the run it was to replace stays"):
        train(_cfg(tmp_path, lr=1e6), overwrite=True, progress=False)
    assert _files(run) == before
    train(_cfg(tmp_path, epochs=1), overwrite=True, progress=False)
    assert _ckpt(run)["epoch"] == 1 and len(read_metrics(run / "metrics.jsonl")) == 1


# ---- one writer per run folder ---------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from vae_fast.train.run_folder import lock_run
lock_run(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_is_refused_at_once_naming_the_live_one_and_a_killed_one_blocks_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(tmp_path, epochs=1), progress=False)
    # Another process holds the run folder, as a live trainer does (the trainer's own lock_run).
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": PACKAGE_PARENT})
    try:
        assert holder.stdout.readline() == "locked\n"
        before = _files(run)
        who = f"pid {holder.pid} on {socket.gethostname()}"
        with pytest.raises(RunInUse, match=f"is being trained by another process \\({who}\\)"):
            train(_cfg(tmp_path, epochs=2), resume=True, progress=False)
        with pytest.raises(RunInUse, match=who):
            train(_cfg(tmp_path, epochs=2), overwrite=True, progress=False)
        capsys.readouterr()
        code, _, err = _main(["train", "--resume", "--out", run, "--epochs", 2, "--quiet"], capsys)
        assert code == 1 and who in err and len(err.strip().splitlines()) == 1, err
        assert _files(run) == before  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The OS dropped the dead process's lock: nothing to clean up, the same command goes on.
    code, _, err = _main(["train", "--resume", "--out", run, "--epochs", 2, "--quiet"], capsys)
    assert code == 0 and "resuming the run" in err, err
    assert _ckpt(run)["epoch"] == 2


# ---- --overwrite replaces a run whole, whenever it is killed --------------------------------------------------

# One process imports everything once, then forks a child per attempt that runs `train --overwrite` and SIGKILLs
# itself just before its n-th change to the run folder (a rename, unlink, mkdir or rmdir there); n = 0: never,
# and the child writes the list of those changes to events.txt. Forking skips the imports (seconds each here).
OVERWRITE_KILLER = """
import json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)  # no OpenMP thread team before a fork
import matplotlib.figure, sklearn.datasets, torch._dynamo  # noqa: F401 (the slow imports, once)
from vae_fast.train import cli

run, args = Path(sys.argv[1]), sys.argv[2:]
for line in sys.stdin:
    n = int(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(run.parent / "child.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        events = []

        def counted(name, fn):
            def call(*a, **kw):
                if str(a[0]).startswith(str(run)):
                    events.append(f"{name} {a[0]}")
                    if len(events) == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                return fn(*a, **kw)
            return call

        for name in ("replace", "unlink", "rmdir", "mkdir"):
            setattr(os, name, counted(name, getattr(os, name)))
        code = cli.main(["train", "--overwrite", "--out", str(run), *args])
        (run.parent / "events.txt").write_text("\\n".join(events))
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"killed": os.WIFSIGNALED(status), "code": os.WEXITSTATUS(status)}), flush=True)
"""


@pytest.mark.slow
def test_overwrite_killed_at_any_moment_leaves_the_old_run_or_the_new_one_never_a_mix(tmp_path):
    run, template = tmp_path / "run", tmp_path / "old"
    train(TrainConfig(**TINY, epochs=2, save="best", out=str(template)), progress=False)
    (template / "eval.json").write_text('{"test_elbo": -40.0}\n')  # what evaluate and sample leave there
    (template / "sample-seed0.png").write_bytes(b"\x89PNG old sample")
    (template / "notes.txt").write_text("not the run's: kept by every replacement\n")
    old = _files(template)
    new_args = ["--epochs", 2, "--lr", 0.002, "--hidden", 16, "--latent-dim", 2, "--batch-size", 300, "--quiet"]
    new_config = TrainConfig(**TINY, epochs=2, lr=0.002, out=str(run)).resolved().to_json()

    def state() -> tuple[str, int]:
        """("old", 0) or ("new", the new run's checkpoint epoch), after the recovery every command runs first;
        fails on anything else."""
        recover_run(run)
        assert not (run / ".overwrite").exists()
        files = _files(run)
        if files == old:
            return "old", 0
        assert files["notes.txt"] == old["notes.txt"]
        assert json.loads(files["config.json"]) == new_config
        ckpt = _ckpt(run)
        assert ckpt["config"] == new_config and ckpt["epoch"] in (1, 2)
        epochs = [m["epoch"] for m in read_metrics(run / "metrics.jsonl")]
        assert epochs in ([1], [1, 2]) and ckpt["epoch"] <= len(epochs)
        assert not {"best.pt", "eval.json", "sample-seed0.png"} & set(files), sorted(files)  # nothing of the old run
        assert not [name for name in files if name != "notes.txt" and files[name] == old.get(name)]
        return "new", ckpt["epoch"]

    # Its own process group: on a hang the killer and its child are killed whole, none is left behind.
    killer = subprocess.Popen([sys.executable, "-c", OVERWRITE_KILLER, str(run), *map(str, new_args)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": PACKAGE_PARENT}, start_new_session=True)

    def attempt(n: int) -> dict:
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(template, run)
        killer.stdin.write(f"{n}\n")
        killer.stdin.flush()
        if not select.select([killer.stdout], [], [], 300)[0]:
            os.killpg(killer.pid, signal.SIGKILL)
            pytest.fail(f"attempt {n} did not end in 300 s: " + (tmp_path / "child.log").read_text()[-3000:])
        line = killer.stdout.readline()
        assert line, (tmp_path / "child.log").read_text()
        return json.loads(line)

    try:
        # Uninterrupted: the new run, whole, and the list of its changes to the folder.
        assert attempt(0) == {"killed": False, "code": 0}, (tmp_path / "child.log").read_text()
        assert state() == ("new", 2)
        figures = {"loss.png", "reconstructions.png", "samples.png", "manifold.png"}
        assert set(_files(run)) == {"checkpoint.pt", "config.json", "metrics.jsonl", "notes.txt", *figures}
        events = (tmp_path / "events.txt").read_text().splitlines()
        swap_done = next(i for i, e in enumerate(events) if e == f"rmdir {run / '.overwrite'}")
        # A kill before each change up to the swap and just after it, and before the last change.
        seen = []
        for n in [*range(1, swap_done + 4), len(events)]:
            outcome = attempt(n)
            assert outcome["killed"], (n, events[n - 1], outcome)
            seen.append(state())
            if n == swap_done + 2:  # the new run, killed before saving its second epoch: --resume continues it
                assert seen[-1] == ("new", 1)
                result = train(TrainConfig.from_json(new_config), resume=True, progress=False)
                assert [m["epoch"] for m in result.metrics] == [1, 2] and state() == ("new", 2)
    finally:
        killer.stdin.close()
        try:
            killer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(killer.pid, signal.SIGKILL)
            killer.wait()
    # Killed before the commit mark: the old run, whole; after it: the new one.
    commit = next(i for i, e in enumerate(events) if e.startswith(f"replace {run / '.overwrite' / '..committed'}"))
    assert [kind for kind, _ in seen[:commit + 1]] == ["old"] * (commit + 1), list(zip(events, seen))
    assert [kind for kind, _ in seen[commit + 1:]] == ["new"] * (len(seen) - commit - 1), list(zip(events, seen))


def test_resume_starts_an_empty_folder_then_continues_and_says_which(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--out", run, "--epochs", 2, "--hidden", 16, "--latent-dim", 2, "--quiet", "--resume"]
    code, _, err = _main(argv, capsys)
    assert code == 0 and "starting a new run" in err
    code, _, err = _main([*argv[:4], 3, *argv[5:]], capsys)  # --epochs 3: a run may be extended
    assert code == 0 and "resuming the run" in err and "epoch 2 of 3" in err
    assert [m["epoch"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    code, _, err = _main(argv, capsys)  # a requeue of a finished job succeeds and does nothing
    assert code == 0 and "nothing left to train" in err and _ckpt(run)["epoch"] == 3


def test_a_torchrun_restart_resumes_by_itself(tmp_path, monkeypatch):
    train(_cfg(tmp_path, epochs=1), progress=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    result = train(_cfg(tmp_path, epochs=2), progress=False)  # no resume=True: the restart implies it
    assert [m["epoch"] for m in result.metrics] == [1, 2]


def test_default_out_and_likelihood_follow_the_dataset():
    assert TrainConfig().resolved().out == "runs/digits"
    assert TrainConfig(dataset="mnist:/data/mnist.npz").resolved().out == "runs/mnist"
    synthetic = TrainConfig(dataset="synthetic").resolved()
    assert (synthetic.out, synthetic.likelihood) == ("runs/synthetic", "gaussian")
    assert TrainConfig().resolved().likelihood == "bernoulli"


# ---- divergence and collapse ----------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path, epochs=3)
    train(dataclasses.replace(cfg, epochs=1), progress=False)
    good = (tmp_path / "run" / CHECKPOINT).read_bytes()

    forward, calls = VAE.forward, []

    def nan_at_third_call(self, *args, **kwargs):  # the resumed run's third step: epoch 2, step 3
        loss, stats = forward(self, *args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) == 3 else loss), stats

    monkeypatch.setattr(VAE, "forward", nan_at_third_call)
    with pytest.raises(FloatingPointError, match=r"at epoch 2, step 3 of 5 \(loss nan.*checkpoint \(epoch 1\) is kept"):
        train(cfg, resume=True, progress=False)
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == good
    assert [m["epoch"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]

    monkeypatch.setattr(VAE, "forward", forward)
    capsys.readouterr()
    code, _, err = _main(["train", "--out", tmp_path / "lr", "--lr", 1e6, "--hidden", 16, "--quiet"], capsys)
    assert code == 1 and "training diverged at epoch 1, step" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "lr" / CHECKPOINT).exists()


def test_collapse_is_reported_once_when_active_units_fall_to_zero(tmp_path, capsys):
    result = train(_cfg(tmp_path, epochs=3, beta=50.0), progress=False)  # a KL this costly shuts every unit off
    assert [m["active_units"] for m in result.metrics] == [0, 0, 0]
    err = capsys.readouterr().err
    assert err.count("0 of 2 latent units active") == 1 and "free_bits can help" in err


# ---- trainer options -------------------------------------------------------------------------------------------


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1e-2, warmup_steps=4, lr_schedule="cosine")
    lrs = [learning_rate(cfg, s, 104) for s in range(104)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert lrs[4] == pytest.approx(1e-2) and lrs[54] == pytest.approx(5e-3)  # half-way down the cosine
    assert lrs[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    constant = TrainConfig(lr=1e-2, warmup_steps=2)
    assert [learning_rate(constant, s, 10) for s in (0, 1, 2, 9)] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])


def test_schedule_and_clipping_are_applied_and_recorded(tmp_path, monkeypatch):
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, max_norm: clipped.append(max_norm) or clip(p, max_norm))
    cfg = _cfg(tmp_path, lr_schedule="cosine", warmup_steps=3, grad_clip=0.5)
    result = train(cfg, progress=False)
    assert clipped == [0.5] * 10  # every step
    assert [m["lr"] for m in result.metrics] == pytest.approx([learning_rate(cfg, s, 10) for s in (4, 9)])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["lr_schedule"], saved["warmup_steps"], saved["grad_clip"]) == ("cosine", 3, 0.5)
    # A cosine schedule's length is set by --epochs: extending it would change what was computed.
    with pytest.raises(ValueError, match="cosine schedule"):
        train(dataclasses.replace(cfg, epochs=3), resume=True, progress=False)


def test_save_best_keeps_the_best_epoch_for_figures_evaluate_and_sample(tmp_path):
    result = train(_cfg(tmp_path, epochs=4, save="best"), progress=False)
    run = tmp_path / "run"
    test_elbo = [m["test_elbo"] for m in result.metrics]
    best_epoch = 1 + test_elbo.index(max(test_elbo))
    best = torch.load(run / BEST, weights_only=True)
    assert best["epoch"] == best_epoch and _ckpt(run)["epoch"] == 4  # checkpoint.pt stays the last, to resume
    model, _, ckpt = load_run(run)
    assert ckpt["epoch"] == best_epoch
    assert all(torch.equal(v, best["model"][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, best["model"][k]) for k, v in result.model.state_dict().items())


def test_adam_uses_a_fused_or_foreach_kernel():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(3))], 1e-3)
    assert opt.defaults["fused"] or opt.defaults["foreach"]
    assert opt.defaults["fused"]  # CPU has a fused Adam in the torch this project pins


def test_config_file_then_flags_recorded_and_honoured_by_resume(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = 2\nhidden = [16]\nlatent-dim = 2\nlr_schedule = "cosine"\nlr = 0.002\n')
    run = tmp_path / "run"
    code, _, err = _main(["train", "--config", toml, "--lr", 0.003, "--out", run, "--quiet"], capsys)
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["epochs"], saved["hidden"], saved["latent_dim"], saved["lr_schedule"], saved["lr"]) == (
        2, [16], 2, "cosine", 0.003)
    # --resume alone takes every setting from the run; a changed one is refused, naming it.
    code, _, err = _main(["train", "--resume", "--out", run, "--quiet"], capsys)
    assert code == 0 and "nothing left to train" in err
    code, _, err = _main(["train", "--resume", "--out", run, "--lr-schedule", "constant", "--quiet"], capsys)
    assert code == 1 and "--lr-schedule constant (saved: 'cosine')" in err

    js = tmp_path / "run.json"
    js.write_text(json.dumps({"epochs": 1, "hidden": [16], "batch_size": 300}))
    code, _, err = _main(["train", "--config", js, "--out", tmp_path / "json", "--quiet"], capsys)
    assert code == 0 and json.loads((tmp_path / "json" / "config.json").read_text())["batch_size"] == 300

    bad = {"bad.toml": ("epochs = ", "not valid TOML"), "bad.json": ("{", "not valid JSON"),
           "unknown.toml": ("epoch = 3", "unknown settings ['epoch']"), "list.json": ("[1]", "expected a table"),
           "types.toml": ('lr = "fast"', "--lr must be a number"), "x.yaml": ("", "expected a .toml or .json")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        code, _, err = _main(["train", "--config", tmp_path / name, "--out", tmp_path / "never"], capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (name, err)
    assert not (tmp_path / "never").exists()


def test_tensorboard_is_optional(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    code, _, err = _main(["train", "--log-dir", tmp_path / "tb", "--out", tmp_path / "run"], capsys)
    assert code == 1 and "pip install tensorboard" in err and not (tmp_path / "run").exists()

    events = []

    class SummaryWriter:  # records what the trainer logs
        def __init__(self, log_dir, purge_step=None):
            events.append(("open", str(log_dir), purge_step))

        def add_scalar(self, tag, value, step):
            events.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            events.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    result = train(_cfg(tmp_path, log_dir=str(tmp_path / "tb")), progress=False)
    assert events[0] == ("open", str(tmp_path / "tb"), 0) and events[-1] == ("close",)
    test_elbo = [(value, step) for tag, value, step in (e for e in events if len(e) == 3 and e[0] == "test/elbo")]
    assert test_elbo == [(m["test_elbo"], m["step"]) for m in result.metrics]
    assert {e[0] for e in events[1:-1]} >= {"train/loss", "train/elbo", "train/kl", "lr", "active_units"}


# ---- figures ---------------------------------------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
    """The Figure objects the plots save, instead of PNG files."""
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    return saved


def test_loss_figure_has_a_title_whole_epoch_ticks_and_names_the_iwae_bound(figures):
    metrics = [{"epoch": e, "train_loss": 40.0 - e, "train_elbo": -41.0 + e, "test_elbo": -42.0 + e,
                "train_kl": 1.0 * e, "train_rec": -40.0} for e in (1, 2)]
    plots.save_loss_curves(metrics, "x.png", title="digits: IWAE, epoch 2", objective="iwae")
    (fig,) = figures
    assert fig._suptitle.get_text() == "digits: IWAE, epoch 2"
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["train IWAE bound (objective)", "train ELBO", "test ELBO"]


def test_manifold_has_z_axes_and_range(figures):
    torch.manual_seed(0)
    from vae_fast import mlp_vae

    model = mlp_vae(64, 2, hidden=[8]).eval()
    decoded = []
    decode = model.decode
    model.decode = lambda z: decoded.append(z) or decode(z)
    plots.save_manifold(model, "m.png", title="digits, epoch 1")
    (fig,) = figures
    # Read as a plot: the first image (top left) is z = (-2, 2), the last of the first row (2, 2), the last (2, -2).
    (z,) = decoded
    assert z.shape == (225, 2) and z[0].tolist() == [-2, 2] and z[14].tolist() == [2, 2] and z[-1].tolist() == [2, -2]
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z1", "z2")
    assert ax.get_xlim()[0] < -2 < 2 < ax.get_xlim()[1] and ax.get_ylim()[0] < -2 < 2 < ax.get_ylim()[1]
    assert "digits, epoch 1" in ax.get_title() and "[-2, 2]" in ax.get_title()


def test_figures_of_a_fresh_run_and_of_a_resume_of_the_finished_run_are_the_same(tmp_path):
    cfg = _cfg(tmp_path)
    train(cfg, progress=False)
    run = tmp_path / "run"
    names = ("loss.png", "reconstructions.png", "samples.png", "manifold.png")
    fresh = {name: (run / name).read_bytes() for name in names}
    torch.manual_seed(1234)  # whatever the caller's generator holds
    train(cfg, resume=True, progress=False)  # nothing left to train: the figures are drawn again
    assert {name: (run / name).read_bytes() for name in names} == fresh


def test_messages_name_what_the_caller_typed(tmp_path, capsys, monkeypatch):
    # The Python API speaks in its arguments; the command line in its flags.
    with pytest.raises(ValueError, match="^epochs must be a positive integer, got 0$"):
        train(_cfg(tmp_path, epochs=0), progress=False)
    with pytest.raises(ValueError, match=r"^beta, warmup_epochs and free_bits apply to the ELBO only, "
                                         r"not objective='iwae'$"):
        train(_cfg(tmp_path, objective="iwae", beta=0.5), progress=False)
    train(_cfg(tmp_path, epochs=1), progress=False)
    with pytest.raises(ValueError) as resumed:
        train(_cfg(tmp_path, epochs=1, lr=0.5), resume=True, progress=False)
    message = str(resumed.value)
    assert "resume=True continues the run in" in message and "but these differ: lr=0.5 (saved: 0.001)" in message
    assert "Only epochs, device, compile, log_dir, data_dir, keep may change" in message and "overwrite=True" in message
    assert "--" not in message
    capsys.readouterr()
    code, _, err = _main(["train", "--resume", "--out", tmp_path / "run", "--lr", 0.5], capsys)
    assert code == 1 and "--resume continues the run in" in err and "--lr 0.5 (saved: 0.001)" in err
    assert "Only --epochs, --device, --compile, --log-dir, --data-dir, --keep may change on resume" in err

    # No abbreviations: --epoch is not --epochs.
    code, _, err = _main(["train", "--epoch", 3, "--out", tmp_path / "never"], capsys)
    assert code == 2 and "unrecognized arguments: --epoch 3" in err
    # Errors name the program as it was called.
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/vae-fast"])
    code, _, err = _main(["evaluate", tmp_path / "missing"], capsys)
    assert code == 1 and err.startswith("vae-fast evaluate: error: ")
    code, _, err = _main(["train", "--bogus"], capsys)
    assert code == 2 and err.startswith("vae-fast: error: unrecognized arguments: --bogus")
    assert not (tmp_path / "never").exists()


def test_sample_output_creates_its_folder(tmp_path, capsys):
    train(_cfg(tmp_path, epochs=1), progress=False)
    output = tmp_path / "new" / "folder" / "s.png"
    code, out, err = _main(["sample", tmp_path / "run", "-n", 4, "--output", output], capsys)
    assert code == 0, err
    assert out.split() == [str(output), str(output.with_name("s-manifold.png"))]
    assert output.read_bytes()[:4] == b"\x89PNG"


def test_config_file_strings_are_read_as_the_flags_read_them(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('hidden = "16,8"\nlatent_dim = "2"\nepochs = 1\nbatch-size = "300"\nobs_logvar = "scalar"\n')
    code, _, err = _main(["train", "--config", toml, "--out", tmp_path / "run", "--quiet"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["hidden"], saved["latent_dim"], saved["batch_size"]) == ([16, 8], 2, 300)
    toml.write_text('hidden = "16,x"\n')  # refused as the flag refuses it, by the settings' check
    code, _, err = _main(["train", "--config", toml, "--out", tmp_path / "other"], capsys)
    assert code == 1 and "--hidden must be positive integers, got '16,x'" in err


def test_an_interrupted_run_says_what_it_kept_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    forward, calls = VAE.forward, []

    def interrupt_in_epoch_two(self, *args, **kwargs):  # Ctrl-C during the second epoch
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "forward", interrupt_in_epoch_two)
    run = tmp_path / "run"
    code, _, err = _main(["train", "--out", run, "--epochs", 3, "--hidden", 16, "--latent-dim", 2,
                          "--batch-size", 300, "--quiet"], capsys)
    assert code == 130
    assert (f"interrupted: the last good checkpoint (epoch 1) is kept in {run / CHECKPOINT}; the same command with "
            "--resume continues it") in err
    assert err.strip().splitlines()[-1].endswith("--resume continues it")
    assert sum("interrupted" in line for line in err.splitlines()) == 1  # one line: no second "train: interrupted"


def test_version(capsys):
    code, out, _ = _main(["--version"], capsys)
    assert code == 0 and out.startswith("vae_fast 0.1.0 (torch ")


def test_file_errors_name_the_file_without_errno(tmp_path):
    from vae_fast.train.data import read_idx
    from vae_fast.train.run_folder import atomic_write

    with pytest.raises(OSError, match=f"^cannot read {tmp_path}: Is a directory$"):
        read_idx(tmp_path)
    with pytest.raises(OSError, match=f"^cannot write {tmp_path / 'nope' / 'x.pt'}: No such file or directory$"):
        atomic_write(tmp_path / "nope" / "x.pt", lambda f: f.write(b"x"))


def test_keep_rotates_epoch_checkpoints_and_a_damaged_one_names_the_newest_good(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(dataset="synthetic", epochs=4, batch_size=500, hidden=[16], latent_dim=2, keep=2, out=str(out))
    train(cfg, progress=False)
    kept = sorted(p.name for p in out.glob("checkpoint-epoch*.pt"))
    assert kept == ["checkpoint-epoch0003.pt", "checkpoint-epoch0004.pt"]
    assert os.path.samefile(out / "checkpoint.pt", out / "checkpoint-epoch0004.pt")  # a link, not a copy
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 4
    # resumed with more epochs, --keep may change: the rotation goes on
    train(dataclasses.replace(cfg, epochs=5, keep=3), resume=True, progress=False)
    assert sorted(p.name for p in out.glob("checkpoint-epoch*.pt"))[-1] == "checkpoint-epoch0005.pt"
    assert len(list(out.glob("checkpoint-epoch*.pt"))) == 3
    # the newest damaged: the message names the newest good one; copying it back resumes from there
    (out / "checkpoint.pt").unlink()
    (out / "checkpoint.pt").write_bytes(b"torn")
    (out / "checkpoint-epoch0005.pt").write_bytes(b"torn too")
    with pytest.raises(ValueError, match=r"newest good one the run kept is .*checkpoint-epoch0004.pt \(epoch 4\)"):
        load_run(out)
    shutil.copyfile(out / "checkpoint-epoch0004.pt", out / "checkpoint.pt")
    assert load_run(out)[2]["epoch"] == 4
    # a run that keeps none says how to keep some
    (out / "checkpoint.pt").write_bytes(b"torn")
    for p in out.glob("checkpoint-epoch*.pt"):
        p.unlink()
    with pytest.raises(ValueError, match="kept no earlier checkpoint .*keep N keeps the last N"):
        load_run(out)
