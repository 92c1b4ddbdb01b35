"""``python -m vae_fast train | evaluate | sample | bench``.

Bad arguments and bad files give one line on stderr and a non-zero exit (2 for usage, 1 otherwise), never a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

PROG = "vae_fast"


class _Parser(argparse.ArgumentParser):
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


def _build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    d = TrainConfig()
    parser = _Parser(prog=PROG, description="Fused-op VAE: train, evaluate, sample, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a VAE (DDP under torchrun)",
                       description="Train a VAE; writes checkpoint.pt, config.json, metrics.jsonl and PNGs to --out.")
    # Defaults are None so that --resume can tell the flags that were given from the saved config's values.
    flag = lambda name, **kw: t.add_argument(name, default=None, **kw)  # noqa: E731
    flag("--dataset", help=f"digits | synthetic | mnist:PATH (default {d.dataset})")
    flag("--epochs", type=int, help=f"default {d.epochs}")
    flag("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    flag("--latent-dim", type=int, help=f"default {d.latent_dim}")
    flag("--hidden", type=_int_list, help="MLP hidden sizes, comma-separated; '' for a linear model "
                                          f"(default {','.join(map(str, d.hidden))})")
    flag("--likelihood", choices=["bernoulli", "gaussian"], help=f"default {d.likelihood}")
    flag("--obs-logvar", type=_obs_logvar, help="Gaussian only: scalar | per_feature | decoder | a fixed number "
                                                f"(default {d.obs_logvar})")
    flag("--binarize", choices=["dynamic", "fixed", "none"], help=f"Bernoulli only (default {d.binarize})")
    flag("--num-samples", type=int, help=f"samples of z per example (default {d.num_samples})")
    flag("--objective", choices=["elbo", "iwae"], help=f"default {d.objective}")
    flag("--beta", type=float, help=f"KL weight (default {d.beta})")
    flag("--warmup-epochs", type=int, help="epochs of linear KL warm-up from 0 to --beta (default 0)")
    flag("--free-bits", type=float, help="nats per latent dimension (default 0)")
    flag("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    flag("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    flag("--amp", choices=["off", "bf16", "fp16"], help="autocast dtype (fp16 adds a GradScaler; default off)")
    flag("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    flag("--seed", type=int, help=f"default {d.seed}")
    flag("--out", help=f"run folder (default {d.out})")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="test ELBO, IWAE, log-likelihood and active units of a run")
    e.add_argument("run", help="run folder")
    e.add_argument("--num-samples", type=int, default=1000, help="samples for log p(x) (default 1000)")
    e.add_argument("--iwae-samples", type=int, default=50, help="K of the IWAE bound (default 50)")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_evaluate)

    s = sub.add_parser("sample", help="a PNG grid of samples (and the manifold for a 2-D latent space)")
    s.add_argument("run", help="run folder")
    s.add_argument("-n", "--num", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--output", help="PNG path (default RUN/samples.png)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sample)

    sub.add_parser("bench", help="the benchmark suite (its own flags: bench --help)", add_help=False)
    return parser


def _train(args) -> int:
    from .train import TrainConfig, load_checkpoint, train, CHECKPOINT

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if args.resume:
        out = Path(given.get("out", TrainConfig.out))
        saved = load_checkpoint(out / CHECKPOINT)["config"]
        cfg = TrainConfig.from_json({**saved, **given, "out": str(out)})
    else:
        cfg = TrainConfig(**given)
    train(cfg, resume=args.resume, progress=not args.quiet)
    return 0


def _run_dir(run: str) -> Path:
    path = Path(run)
    if not path.is_dir():
        raise CliError(f"run folder {run!r} does not exist")
    return path


def _evaluate(args) -> int:
    import torch
    from .model import active_units
    from .train import evaluate, load_data, load_run, write_json

    if args.num_samples < 1 or args.iwae_samples < 1:
        raise CliError("--num-samples and --iwae-samples must be >= 1")
    run = _run_dir(args.run)
    model, cfg, ckpt = load_run(run, args.device)
    _, test = load_data(cfg)
    test = test.to(next(model.parameters()).device)
    torch.manual_seed(args.seed)
    result = {
        "epoch": ckpt["epoch"],
        "test_elbo": evaluate(model.elbo, test).mean().item(),
        f"test_iwae_{args.iwae_samples}": evaluate(lambda x: model.iwae(x, args.iwae_samples), test).mean().item(),
        "test_log_likelihood": evaluate(lambda x: model.log_likelihood(x, args.num_samples), test).mean().item(),
        "log_likelihood_samples": args.num_samples,
        "active_units": active_units(model, test),
        "latent_dim": model.latent_dim,
    }
    write_json(run / "eval.json", result)
    print(f"{run}: epoch {result['epoch']}, {len(test)} test examples, nats per example")
    print(f"  ELBO                {result['test_elbo']:10.3f}")
    print(f"  IWAE (K={args.iwae_samples:<5d})      {result[f'test_iwae_{args.iwae_samples}']:10.3f}")
    print(f"  log p(x) (K={args.num_samples:<5d})  {result['test_log_likelihood']:10.3f}")
    print(f"  active units        {result['active_units']:4d} / {model.latent_dim}")
    return 0


def _sample(args) -> int:
    import torch
    from . import plots
    from .train import load_run

    if args.num < 1:
        raise CliError("--num must be >= 1")
    run = _run_dir(args.run)
    model, _, _ = load_run(run, args.device)
    torch.manual_seed(args.seed)
    output = Path(args.output) if args.output else run / "samples.png"
    if not plots.save_image_grid(model.sample(args.num), output, title=f"{args.num} samples"):
        raise CliError("examples are not square images: nothing to draw")
    print(output)
    if plots.save_manifold(model, output.with_name("manifold.png")):
        print(output.with_name("manifold.png"))
    return 0


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module(f"{__package__}.bench")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.bench":
            raise
        print(f"{PROG} bench: error: the benchmark suite ({__package__}.bench) is not in this install", file=sys.stderr)
        return 1
    return bench.main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ValueError, OSError, FloatingPointError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
