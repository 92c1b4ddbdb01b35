"""``python -m vae_fast train | evaluate | sample | bench`` (also installed as the ``vae-fast`` command).

Bad arguments and bad files give one line on stderr and a non-zero exit (2 for usage, 1 otherwise), never a
traceback. Messages name the program as it was called: ``vae-fast`` or ``python -m vae_fast``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

PROG = "vae-fast"  # the console script; ``python -m vae_fast`` when run that way (see _prog)
_BENCH = "vae_fast.bench"  # imported when asked for: an install may leave it out


def _prog() -> str:
    return PROG if Path(sys.argv[0]).name == PROG else "python -m vae_fast"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations: `--epoch 3` must not be taken as `--epochs 3` (nor a typo as some other flag).
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class CliError(Exception):
    """A user error: printed as one line."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _obs_logvar(text: str):
    try:
        return float(text)
    except ValueError:
        return text


TRAIN_OBJECTIVES = ("elbo", "iwae", "iwae-dreg", "elbo-stl")


def _version() -> str:
    import torch
    from .. import __version__

    return f"vae_fast {__version__} (torch {torch.__version__})"  # the package's version, however it was called


def _build_parser() -> argparse.ArgumentParser:
    from ..models.hierarchical import CONFIGS as HVAE_CONFIGS
    from ..models.likelihoods import LIKELIHOODS
    from .config import MODELS, TrainConfig

    d = TrainConfig()
    parser = _Parser(prog=_prog(), description="Fused-op VAE: train, evaluate, sample, benchmark.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a VAE (DDP under torchrun)",
                       description="Train a VAE; writes checkpoint.pt, config.json, metrics.jsonl and PNGs to --out. "
                                   "Settings come from the defaults, then --config FILE, then the flags given.")
    # Defaults are None so that --config and --resume can tell the flags that were given.
    flag = lambda name, **kw: t.add_argument(name, default=None, **kw)  # noqa: E731
    flag("--config", metavar="FILE", help="settings from a TOML or JSON file (keys as the flags: epochs, "
                                          "batch_size or batch-size, ...); flags override it")
    flag("--dataset", help="digits | synthetic | mnist | fashion-mnist | cifar10 | patches | mnist:PATH "
                           f"(default {d.dataset}; patches: 32x32 crops of two photographs, no download)")
    flag("--data-dir", metavar="DIR", help="the folder with mnist's, fashion-mnist's or cifar10's published files "
                                           "(default ~/.cache/vae_fast/DATASET; torchvision, if installed, "
                                           "downloads them there)")
    flag("--epochs", type=int, help=f"default {d.epochs}")
    flag("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    flag("--model", choices=MODELS, help="an MLP, a convolutional VAE for images, or a hierarchical VAE for 32x32 "
                                         f"images in VDVAE's design (default {d.model})")
    flag("--hvae-config", choices=list(HVAE_CONFIGS), help="--model hvae: small (learns patches on a CPU in minutes), "
                                                           "or VDVAE's published CIFAR-10 / ImageNet-32 models "
                                                           f"(default {d.hvae_config})")
    flag("--latent-dim", type=int, help=f"size of the flat latent (default {d.latent_dim})")
    flag("--latent-channels", type=int, help="--model conv: a spatial latent of this many channels at a quarter "
                                             "of the image's height and width, instead of --latent-dim")
    flag("--hidden", type=_int_list, help="MLP hidden sizes, comma-separated; '' for a linear model "
                                          f"(default {','.join(map(str, d.hidden))})")
    flag("--likelihood", choices=list(LIKELIHOODS), help="default gaussian for synthetic, else bernoulli")
    flag("--obs-logvar", type=_obs_logvar, help="Gaussian only: scalar | per_feature | decoder | a fixed number "
                                                f"(default {d.obs_logvar})")
    flag("--binarize", choices=["dynamic", "fixed", "none"], help=f"Bernoulli only (default {d.binarize})")
    flag("--num-samples", type=int, help=f"samples of z per example, K (default {d.num_samples})")
    flag("--objective", choices=TRAIN_OBJECTIVES, help=f"default {d.objective}")
    flag("--beta", type=float, help=f"KL weight (default {d.beta})")
    flag("--warmup-epochs", type=int, help="epochs of linear KL warm-up from 0 to --beta (default 0)")
    flag("--free-bits", type=float, help="nats per latent dimension (default 0)")
    flag("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    flag("--lr-schedule", choices=["constant", "cosine"], help="after the warm-up: constant, or cosine decay to 0 "
                                                               f"at the last step (default {d.lr_schedule})")
    flag("--warmup-steps", type=int, help="optimizer steps of linear learning-rate warm-up (default 0)")
    flag("--grad-clip", type=float, help="clip the global gradient norm to this (default 0: off); the loss is per "
                                         "example (VDVAE's 200 per dimension is 614400 for 3x32x32)")
    flag("--skip-threshold", type=float, help="skip (and count) an update whose gradient norm is above this, as "
                                              "VDVAE does (default 0: never). The loss is per example: VDVAE's 400 "
                                              "(per dimension) is 400 * C*H*W here, 1228800 for 3x32x32")
    flag("--keep", type=int, help="keep the checkpoints of the last N epochs (RUN/checkpoint-epoch<E>.pt, rotated "
                                  "atomically; checkpoint.pt is the newest) to go back to (default 1: only "
                                  "checkpoint.pt)")
    flag("--save", choices=["last", "best"], help="the model the run keeps for its figures, evaluate and sample: "
                                                  "the last epoch's, or the best test ELBO's (best.pt) (default last)")
    flag("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    flag("--amp", choices=["off", "bf16", "fp16"], help="autocast dtype (fp16 adds a GradScaler; default off)")
    flag("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    flag("--seed", type=int, help=f"default {d.seed}")
    flag("--out", help="run folder (default runs/DATASET)")
    flag("--log-dir", help="also write TensorBoard events here (needs the tensorboard package)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, or "
                                                             "start it if there is none (the same command for every requeue)")
    again.add_argument("--overwrite", action="store_true", help="replace a run already in --out (else refused)")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="test ELBO, IWAE, log-likelihood and active units of a run")
    e.add_argument("run", help="run folder")
    e.add_argument("--num-samples", type=int, default=1000,
                   help="samples K of z per test example for log p(x) (default 1000): the long stage, K decodes of "
                        "every test example (8 minutes for 450 conv-model patches on 2 CPU cores); 100 gives a "
                        "looser bound in a tenth of the time")
    e.add_argument("--iwae-samples", type=int, default=50, help="K of the IWAE bound (default 50)")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--data-dir", metavar="DIR", help="read the data set's files here, not where the run read them")
    e.set_defaults(func=_evaluate)

    s = sub.add_parser("sample", help="a PNG grid of samples (and the manifold for a 2-D latent space)")
    s.add_argument("run", help="run folder")
    s.add_argument("-n", "--num", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--output", help="PNG path (default RUN/sample-seedSEED.png; a 2-D latent space also gets "
                                    "OUTPUT-manifold.png)")
    s.add_argument("--draws", action="store_true",
                   help="draw each image from p(x|z) (binary pixels for a Bernoulli model, the fused sampler's 256 "
                        "levels for dmol, Gaussian noise added) instead of showing the mean of p(x|z)")
    s.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="z ~ N(0, T^2 I): below 1, samples nearer the prior's mode (default 1)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sample)

    sub.add_parser("bench", help="the benchmark suite (its own flags: bench --help)", add_help=False)
    return parser


def _read_config(path: str) -> dict:
    """The settings in a TOML or JSON file, keys as TrainConfig's fields (``-`` or ``_``)."""
    from .config import TrainConfig

    p = Path(path)
    if p.suffix not in (".toml", ".json"):
        raise CliError(f"--config {path}: expected a .toml or .json file")
    try:
        text = p.read_text()
    except OSError as e:
        raise CliError(f"--config {path}: cannot read it: {e.strerror or e}") from None
    try:
        if p.suffix == ".json":
            settings = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise CliError(f"--config {path}: TOML needs Python >= 3.11; use a .json file") from None
            settings = tomllib.loads(text)
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise CliError(f"--config {path}: not valid {p.suffix[1:].upper()}: {e}") from None
    if not isinstance(settings, dict):
        raise CliError(f"--config {path}: expected a table of settings, got {type(settings).__name__}")
    try:
        TrainConfig.from_json(settings)  # unknown keys fail here, with the list of known ones
    except ValueError as e:
        raise CliError(f"--config {path}: {e}") from None
    settings = {k.replace("-", "_"): v for k, v in settings.items()}
    # A string value is read as the flag reads its text (hidden = "64,32" as --hidden 64,32); one the flag
    # would refuse stays as it is, for the settings' own check to name.
    types = {a.dest: a.type for a in parser_actions() if a.type is not None}
    for key, value in settings.items():
        if isinstance(value, str) and key in types:
            try:
                settings[key] = types[key](value)
            except (ValueError, argparse.ArgumentTypeError):
                pass
    return settings


def parser_actions() -> list[argparse.Action]:
    """The train subcommand's arguments."""
    sub = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]._actions


def _train(args) -> int:
    from .build import torchrun_restart
    from .config import TrainConfig
    from .loop import train
    from .run_folder import saved_config

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    given = {**(_read_config(args.config) if args.config else {}), **given}
    cfg = TrainConfig(**given)
    resume = args.resume or torchrun_restart() > 0
    if resume:  # settings not given come from the run being continued
        saved = saved_config(cfg.resolved().out)
        if saved is not None:
            cfg = TrainConfig.from_json({**saved, **given})
    result = train(cfg, resume=resume, overwrite=args.overwrite, progress=not args.quiet)
    if args.quiet and result.summary:  # --quiet drops the progress, not what the run ended with
        print(result.summary, flush=True)
    return 0


def _run_dir(run: str) -> Path:
    path = Path(run)
    if not path.is_dir():
        raise CliError(f"run folder {run!r} does not exist")
    return path


def _evaluate(args) -> int:
    from .run_folder import LOCK, lock_run

    if args.num_samples < 1 or args.iwae_samples < 1:
        raise CliError("--num-samples and --iwae-samples must be >= 1")
    run = _run_dir(args.run)
    if not (run / LOCK).exists():  # no trainer ever wrote here (load_run says what is missing)
        return _evaluate_run(args, run)
    # A run being trained is refused (its checkpoint moves on; eval.json would be stale): the trainer's lock,
    # held while evaluating, so no trainer starts on the folder meanwhile either.
    lock = lock_run(run)
    try:
        return _evaluate_run(args, run)
    finally:
        os.close(lock)


def _evaluate_run(args, run: Path) -> int:
    import torch
    from ..models.likelihoods import bits_per_dim
    from ..models.vae import active_units
    from .build import bits_per_dim_setup, load_data
    from .loop import evaluate
    from .run_folder import load_run, write_json

    model, cfg, ckpt = load_run(run, args.device)
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
    _, test = load_data(cfg)
    test = test.to(next(model.parameters()).device)
    torch.manual_seed(args.seed)
    n = len(test)
    result = {
        "epoch": ckpt["epoch"],
        "test_elbo": evaluate(model.elbo, test, label="ELBO").mean().item(),
        # K samples of a batch decoded at once: batches of about 4M data elements in all (bounded memory)
        f"test_iwae_{args.iwae_samples}": evaluate(lambda x: model.iwae(x, args.iwae_samples), test,
                                                   max(1, (1 << 22) // (args.iwae_samples * test[0].numel())),
                                                   label=f"IWAE (K={args.iwae_samples})").mean().item(),
        # K decodes per example: the long stage, in about 20 batches so that its progress moves
        "test_log_likelihood": evaluate(lambda x: model.log_likelihood(x, args.num_samples), test,
                                        min(500, max(1, -(-n // 20))),
                                        label=f"log p(x) (K={args.num_samples})").mean().item(),
        "log_likelihood_samples": args.num_samples,
        "active_units": active_units(model, test),
        "latent_dim": model.latent_dim,
    }
    bpd = bits_per_dim_setup(cfg, test.shape[1:])
    if bpd:  # the log-likelihood's and the bounds' (Theis et al. 2016: see likelihoods.bits_per_dim)
        result["test_bits_per_dim"] = bits_per_dim(result["test_log_likelihood"], *bpd)
        result["test_elbo_bits_per_dim"] = bits_per_dim(result["test_elbo"], *bpd)
        result["bits_per_dim_bin_width"] = bpd[1]  # null: a discrete likelihood
    write_json(run / "eval.json", result)
    which = " (its best, --save best)" if cfg.save == "best" else ""
    print(f"{run}: epoch {result['epoch']}{which}, {len(test)} test examples, nats per example")
    for label, value in (("ELBO", result["test_elbo"]),
                         (f"IWAE (K={args.iwae_samples})", result[f"test_iwae_{args.iwae_samples}"]),
                         (f"log p(x) (K={args.num_samples})", result["test_log_likelihood"])):
        print(f"  {label:<20s}{value:10.3f}")
    if bpd:
        how = "discrete" if bpd[1] is None else f"dequantised, bins of {bpd[1]:g}"
        print(f"  {'bits/dim':<20s}{result['test_bits_per_dim']:10.4f}   (from log p(x); ELBO: "
              f"{result['test_elbo_bits_per_dim']:.4f}; {bpd[0]} dims, {how})")
    print(f"  {'active units':<20s}{result['active_units']:4d} / {model.latent_dim}")
    return 0


def _sample(args) -> int:
    import torch
    from . import plots
    from .config import run_title
    from .run_folder import load_run

    if args.num < 1:
        raise CliError("--num must be >= 1")
    if not 0 < args.temperature < float("inf"):
        raise CliError(f"--temperature must be a positive number, got {args.temperature}")
    run = _run_dir(args.run)
    model, cfg, ckpt = load_run(run, args.device)
    torch.manual_seed(args.seed)
    # Its own files: never the training run's samples.png or manifold.png.
    kind = ("-draws" if args.draws else "") + (f"-t{args.temperature:g}" if args.temperature != 1 else "")
    output = Path(args.output) if args.output else run / f"sample-seed{args.seed}{kind}.png"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"--output {output}: cannot create its folder: {e.strerror or e}") from None
    title = run_title(cfg, ckpt["epoch"], model.latent_shape)
    what = "draws from p(x|z)" if args.draws else "means of p(x|z)"
    with torch.no_grad():
        images = model.sample(args.num, mean=not args.draws, temperature=args.temperature)
    if not plots.save_image_grid(images, output, data_range=model.lik.data_range,
                                 title=f"{title}\n{args.num} samples, {what}, temperature {args.temperature:g} "
                                       f"(seed {args.seed})"):
        raise CliError("examples are not square images: nothing to draw")
    print(output)
    manifold = output.with_name(f"{output.stem}-manifold.png")
    if plots.save_manifold(model, manifold, title=title):
        print(manifold)
    return 0


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module(_BENCH)
    except ModuleNotFoundError as e:
        if e.name != _BENCH:
            raise
        print(f"{_prog()} bench: error: the benchmark suite ({_BENCH}) is not in this install",
              file=sys.stderr)
        return 1
    return bench.main(argv, f"{_prog()} bench") or 0


def _message(e: BaseException) -> str:
    """One line for the user: no errno numbers, no internal file names."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    from .messages import CLI_PROG
    from .run_folder import RunInUse

    prog = _prog()
    args = _build_parser().parse_args(argv)
    token = CLI_PROG.set(prog)  # messages from the trainer name flags, not Python arguments
    try:
        return args.func(args)
    except (CliError, ValueError, OSError, FloatingPointError, ImportError, RunInUse) as e:
        print(f"{prog} {args.command}: error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if not getattr(e, "reported", False):  # the trainer says what it kept, in one line of its own
            print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        CLI_PROG.reset(token)
