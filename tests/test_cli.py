"""The command line end to end: train / evaluate / sample on digits, the run folder's files, SIGKILL and
--resume, DDP with two CPU processes under torchrun, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vae_fast
from vae_fast.train import cli
from vae_fast.models.vae import mlp_vae

PACKAGE_PARENT = str(Path(vae_fast.__file__).resolve().parent.parent)
SMALL = ["--hidden", "64", "--quiet"]  # a small model: these tests are about the machinery, not quality


def _env(**extra):
    return {**os.environ, "PYTHONPATH": PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vae_fast", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch digits run with a 2-D latent space (so the manifold is drawn), through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = _cli("train", "--epochs", 2, "--latent-dim", 2, "--hidden", "64", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_writes_the_run_folder(run):
    out, proc = run
    assert "epoch   2/2" in proc.stdout and "test ELBO" in proc.stdout
    # Not on a terminal: one plain line per epoch, no progress-bar frames in the log.
    lines = proc.stdout.splitlines()
    assert [line[:11] for line in lines[:-2]] == ["epoch   1/2", "epoch   2/2"]
    assert "\r" not in proc.stdout + proc.stderr
    # Then a summary: the final test ELBO, where the checkpoint and figures went, the next commands.
    # Binarised digits: a Bernoulli log-probability of binary data, so in bits per dimension too (64 pixels).
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["test_elbo"]
    bpd = -final / (64 * math.log(2))
    assert lines[-2] == (f"done: epoch 2/2, test ELBO {final:.3f} ({bpd:.3f} bits/dim); checkpoint "
                         f"{out / 'checkpoint.pt'}, figures {out}/{{loss,reconstructions,samples,manifold}}.png")
    assert lines[-1] == f"next: python -m vae_fast evaluate {out}; python -m vae_fast sample {out}"
    # Errors and status lines name the program as it was called.
    assert all(line.startswith("python -m vae_fast: ") for line in proc.stderr.splitlines()), proc.stderr
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl", "loss.png", "reconstructions.png",
                 "samples.png", "manifold.png"):
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(set(m) >= {"train_loss", "train_elbo", "train_kl", "train_rec", "test_elbo", "step", "active_units",
                          "lr"} for m in metrics)
    assert all(0 <= m["active_units"] <= 2 for m in metrics)
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["latent_dim"] == 2 and config["hidden"] == [64]

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # no pickled code
    assert ckpt["epoch"] == 2 and ckpt["step"] == metrics[-1]["step"] and ckpt["config"] == config
    assert set(ckpt) >= {"model", "optimizer", "scaler", "epoch", "step", "config", "rng"}
    assert all(isinstance(v, torch.Tensor) for v in ckpt["rng"].values())
    model = mlp_vae(ckpt["input_dim"], 2, hidden=[64])
    model.load_state_dict(ckpt["model"])


def test_evaluate_and_sample(run):
    out, _ = run
    proc = _cli("evaluate", out, "--num-samples", 200, "--iwae-samples", 20)
    assert proc.returncode == 0, proc.stderr
    assert "ELBO" in proc.stdout and "log p(x)" in proc.stdout and "active units" in proc.stdout
    # Each label as written ("IWAE (K=20)", not "IWAE (K=20   )"), the values in one column.
    rows = proc.stdout.splitlines()[1:4]
    assert [row[:22].strip() for row in rows] == ["ELBO", "IWAE (K=20)", "log p(x) (K=200)"], rows
    assert all(re.fullmatch(r" +-?\d+\.\d{3}", row[22:]) for row in rows), rows
    result = json.loads((out / "eval.json").read_text())
    # ordered in expectation; the estimates of K = 20 and K = 200 (other draws) may swap by Monte Carlo noise
    assert result["test_elbo"] < result["test_iwae_20"] < result["test_log_likelihood"] + 0.01
    assert result["test_log_likelihood"] < 0
    assert 0 <= result["active_units"] <= 2
    # Binarised digits: a discrete likelihood, bits/dim = -log p(x) / (64 ln 2), printed under the rows above.
    assert result["bits_per_dim_bin_width"] is None
    assert result["test_bits_per_dim"] == pytest.approx(-result["test_log_likelihood"] / (64 * math.log(2)))
    assert proc.stdout.splitlines()[4].split()[:2] == ["bits/dim", f"{result['test_bits_per_dim']:.4f}"]

    # off a terminal, one line as each stage starts and one as it ends
    stages = [line for line in proc.stderr.splitlines() if ": evaluate: " in line]
    assert [line.split(": evaluate: ")[1].split(":")[0] for line in stages[::2]] == \
        ["ELBO", "IWAE (K=20)", "log p(x) (K=200)"], proc.stderr
    assert all(line.endswith(" s") and ": done in " in line for line in stages[1::2]), stages

    figures = {name: (out / name).read_bytes() for name in ("samples.png", "manifold.png")}
    proc = _cli("sample", out, "-n", 16, "--output", out / "more.png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out / "more.png"), str(out / "more-manifold.png")]
    proc = _cli("sample", out, "--seed", 3)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out / "sample-seed3.png"), str(out / "sample-seed3-manifold.png")]
    proc = _cli("sample", out, "-n", 4, "--output", out / "s.jpg")
    assert proc.returncode == 0, proc.stderr
    assert (out / "s.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG bytes under a .jpg name, not PNG
    proc = _cli("sample", out, "-n", 4, "--output", out / "s.xyz")
    assert proc.returncode == 1 and ".xyz is not an image format (use one of" in proc.stderr, proc.stderr
    assert not (out / "s.xyz").exists()
    proc = _cli("sample", out, "-n", 8, "--draws", "--temperature", 0.5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == str(out / "sample-seed0-draws-t0.5.png")
    for bad in ("0", "-1", "nan", "inf"):
        proc = _cli("sample", out, "--temperature", bad)
        assert proc.returncode != 0 and "--temperature must be a positive number" in proc.stderr, (bad, proc.stderr)
    for name in ("more.png", "more-manifold.png", "sample-seed3.png", "sample-seed3-manifold.png",
                 "sample-seed0-draws-t0.5.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    # The training run's own figures are untouched.
    assert figures == {name: (out / name).read_bytes() for name in figures}


def test_evaluate_refuses_a_live_run_and_training_drops_a_stale_eval(tmp_path):
    out = tmp_path / "run"
    proc = _cli("train", "--epochs", 1, *SMALL, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert _cli("evaluate", out, "--num-samples", 5, "--iwae-samples", 2).returncode == 0
    assert json.loads((out / "eval.json").read_text())["epoch"] == 1
    from vae_fast.train.run_folder import lock_run

    fd = lock_run(out)  # as a live trainer holds it
    try:
        proc = _cli("evaluate", out, "--num-samples", 5)
        assert proc.returncode == 1 and "is being trained by another process" in proc.stderr, proc.stderr
    finally:
        os.close(fd)
    proc = _cli("train", "--epochs", 2, *SMALL, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "eval.json").exists()  # epoch 1's result went with the checkpoint it was about


@pytest.mark.slow
def test_sigint_says_once_what_was_kept(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vae_fast", "train", "--epochs", "500", *SMALL, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    said = [line for line in (stdout + stderr).splitlines() if "interrupted" in line]
    assert len(said) == 1 and "--resume continues it" in said[0], said  # one line: what was kept, and how to go on


# ---- SIGKILL and --resume -------------------------------------------------------------------------------------

# The same command every time, as a cluster requeue or torchrun restart runs it: --resume starts the run in
# an empty folder and continues it afterwards.
RESUME_ARGS = ["train", "--epochs", 8, *SMALL, "--resume"]


def _kill_when(proc, out: Path, moment: str) -> bool:
    """SIGKILL ``proc`` at ``moment``; False if it finished first.

    mid-write: while a checkpoint's temporary file exists; after-checkpoint: as soon as checkpoint.pt is
    replaced; mid-epoch: 0-100 ms after that."""
    ckpt = out / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns if ckpt.exists() else None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if moment == "mid-write":
            hit = out.is_dir() and any(e.name.startswith(".checkpoint.pt.") for e in os.scandir(out))
        else:
            hit = ckpt.exists() and ckpt.stat().st_mtime_ns != before
            if hit and moment == "mid-epoch":
                time.sleep(torch.rand(()).item() * 0.1)
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0002)
    proc.wait(timeout=60)
    return False


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_matches_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    proc = _cli(*RESUME_ARGS, "--out", whole)
    assert proc.returncode == 0, proc.stderr

    out = tmp_path / "killed"
    kills = []
    for moment in ["after-checkpoint", "mid-write", "mid-epoch", "mid-write"]:
        args = [*RESUME_ARGS, "--out", out]
        p = subprocess.Popen([sys.executable, "-m", "vae_fast", *map(str, args)], env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = _kill_when(p, out, moment)
        leftover = [e.name for e in os.scandir(out) if e.name.endswith(".tmp")]
        kills.append((moment, killed, bool(leftover)))
        # Whatever the moment, the last good checkpoint is there and loads without pickled code.
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert isinstance(ckpt["epoch"], int) and 1 <= ckpt["epoch"] <= 8
    assert kills[0][1], "the first run must be killed after its first checkpoint"
    assert any(moment == "mid-write" and torn for moment, _, torn in kills), f"no kill landed mid-write: {kills}"

    proc = _cli(*RESUME_ARGS, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "resuming the run" in proc.stderr
    assert _metrics(out) == _metrics(whole)
    assert not [e.name for e in os.scandir(out) if e.name.endswith(".tmp")]
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- DDP --------------------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import os, sys, torch
from vae_fast.train import TrainConfig, train
out = sys.argv[1]
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
# The first attempt trains 1 epoch and crashes; torchrun restarts the job, whose same call resumes by itself.
# (One restart allowed: the trainer keys its process group by the attempt, so a restarted gloo group never reads
# the addresses the dead attempt left in torchrun's store; before that, 1 restart in 3 hung or was refused.)
result = train(TrainConfig(epochs=1 if restart == 0 else 2, hidden=[32], batch_size=50, out=out + "/run"),
               progress=False)
if restart == 0:
    os._exit(3)
torch.save(result.model.state_dict(), f"{out}/rank{os.environ['RANK']}.pt")
"""


def test_ddp_with_two_cpu_processes_keeps_replicas_identical_and_resumes_after_a_restart(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    # Its own process group: on a timeout the launcher and both workers are killed, none is left behind.
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--max-restarts", "1", str(script), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail("torchrun did not finish in 600 s:\n" + stderr[-3000:])
    assert proc.returncode == 0, stderr[-3000:]
    assert "resuming the run" in stderr and "at epoch 1 of 2" in stderr
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # each rank drew its own noise, yet in sync
    torch.manual_seed(0)  # the trainer's initial weights
    init = mlp_vae(64, 8, hidden=[32]).state_dict()
    assert not torch.equal(init["encoder.1.0.weight"], rank0["encoder.1.0.weight"])  # it trained
    metrics = _metrics(tmp_path / "run")  # written once, by rank 0
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["world_size"] == 2 for m in metrics)
    assert metrics[-1]["step"] == 2 * 15  # each rank trains on its half: 750 examples, batches of 50
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and all(torch.equal(ckpt["model"][k], rank0[k]) for k in rank0)


# ---- bad input ------------------------------------------------------------------------------------------------


def _main(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


def test_bad_input_gives_one_line_and_nonzero_exit(run, tmp_path, capsys):
    good, _ = run
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "checkpoint.pt").write_bytes(b"not a checkpoint")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "checkpoint.pt").write_bytes((good / "checkpoint.pt").read_bytes()[:2000])
    empty = tmp_path / "empty"
    empty.mkdir()

    def damaged(run):  # names the file, says it is damaged and what to do
        return (f"checkpoint {run / 'checkpoint.pt'} is damaged (truncated or corrupt: it does not load as a torch "
                "checkpoint): the run kept no earlier checkpoint (--keep N keeps the last N epochs' checkpoints): "
                "restore it from a copy, or train the run afresh with --overwrite")

    cases = [
        ([], "required", 2),
        (["train", "--bogus"], "unrecognized arguments: --bogus", 2),
        (["train", "--amp", "fp8"], "invalid choice: 'fp8'", 2),
        (["train", "--epochs", "many"], "invalid int value: 'many'", 2),
        (["train", "--hidden", "a,b"], "comma-separated integers", 2),
        (["train", "--epochs", -1, "--out", empty], "--epochs must be", 1),
        (["train", "--epochs", 0, "--out", empty], "--epochs must be a positive integer", 1),
        (["train", "--resume", "--overwrite", "--out", empty], "not allowed with argument", 2),
        (["train", "--dataset", "synthetic", "--likelihood", "bernoulli", "--out", empty], "--likelihood gaussian", 1),
        (["train", "--out", tmp_path / "garbage" / "checkpoint.pt" / "run", "--epochs", 1, *SMALL],
         "cannot create the run folder", 1),
        (["train", "--config", tmp_path / "missing.toml", "--out", empty], "cannot read it: No such file", 1),
        (["train", "--lr", 0, "--out", empty], "--lr must be > 0", 1),
        (["train", "--objective", "iwae", "--beta", 0.5, "--out", empty], "ELBO only", 1),
        (["train", "--dataset", "imagenet", "--out", empty], "unknown data set 'imagenet'", 1),
        (["train", "--dataset", f"mnist:{tmp_path / 'nope'}", "--out", empty], "does not exist", 1),
        (["train", "--resume", "--out", garbage], damaged(garbage), 1),
        (["train", "--resume", "--out", good, "--lr", 0.5], "but these differ: --lr 0.5 (saved: 0.001). Only "
                                                           "--epochs, --device, --compile, --log-dir, --data-dir, "
                                                           "--keep may change", 1),
        (["evaluate", tmp_path / "missing"], "does not exist", 1),
        (["evaluate", empty], "no checkpoint at", 1),
        (["evaluate", garbage], damaged(garbage), 1),
        (["evaluate", truncated], damaged(truncated), 1),
        (["sample", garbage], damaged(garbage), 1),
        (["sample", truncated], damaged(truncated), 1),
        (["sample", good, "-n", 0], "--num must be >= 1", 1),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "--device", "cuda", "--out", empty], "CUDA is not available", 1))
    for argv, message, code in cases:
        got_code, err = _main(argv, capsys)
        assert got_code == code and message in err, (argv, got_code, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert "Errno" not in err and ".tmp" not in err, (argv, err)
    assert not any(empty.iterdir())  # a failed command leaves nothing behind

    # And for real: a process, its exit status, its stderr.
    for argv in (["evaluate", garbage], ["train", "--bogus"]):
        proc = _cli(*argv)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- AMP and torch.compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_and_checkpoints_its_scaler(tmp_path, amp):
    from vae_fast.train import TrainConfig, train

    result = train(TrainConfig(epochs=2, hidden=[32], amp=amp, out=str(tmp_path)), progress=False)
    assert all(math.isfinite(m["test_elbo"]) for m in result.metrics)
    assert result.metrics[-1]["train_elbo"] > result.metrics[0]["train_elbo"]
    scaler = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    assert ("scale" in scaler) == (amp == "fp16")  # a GradScaler only for fp16


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    args = ["train", "--epochs", 2, "--hidden", 32, "--quiet"]
    eager, compiled = (_cli(*args, *extra, "--out", tmp_path / name)
                       for name, extra in (("eager", []), ("compiled", ["--compile"])))
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    for a, b in zip(_metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")):
        assert a["step"] == b["step"]
        for key in ("train_loss", "test_elbo"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key  # measured: ~2e-8


def test_gaussian_run_on_non_image_data(tmp_path, capsys):
    """synthetic has 8 features: a loss plot but no image grids, and `sample` says why it draws nothing."""
    from vae_fast.train import TrainConfig, train

    cfg = TrainConfig(dataset="synthetic", latent_dim=2, hidden=[], epochs=2, out=str(tmp_path))
    result = train(cfg, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["likelihood"] == "gaussian"  # synthetic's default
    assert result.metrics[-1]["test_elbo"] > result.metrics[0]["test_elbo"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["loss.png"]
    code, err = _main(["sample", tmp_path], capsys)
    assert code == 1 and "not square images" in err
