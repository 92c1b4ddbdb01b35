"""The benchmark suite: fused ops vs eager (``_composite.py``) vs ``torch.compile(reference)``.

Run it as ``python -m vae_fast bench [flags]`` or ``python benchmarks/run.py [flags]``. One process times,
per op, dtype, size and pass ("fwd", "fwd+bwd"), the fused op, the same maths in plain PyTorch, and that
plain PyTorch compiled by Inductor; the LDM posterior and PixelCNN++'s likelihood (DMOL) against their
originals; then a whole VAE training step and the memory of a large-K log-likelihood.
It writes ``<out>/<device-slug>-<date>.json`` (the schema in docs/architecture.md, "Benchmark results"), a Markdown table and a PNG;
a ``--quick`` run's names end in ``-quick`` and those of a run that left something out (``--only``, ``--ops``,
``--sizes``, ``--no-compile``, ...) in ``-partial``, so neither replaces a full run's files. The JSON and
Markdown are rewritten after every op row and section (``"complete": false`` until the end), so a run stopped
by a timeout leaves what it measured; ``--merge`` joins the parts of one device's run into one file.

The suite is a package, one module per concern; imports run one way, each module only importing those
listed before it:

    timing.py       percentiles, interleaved timing, peak memory, copy and write bandwidth
    cases.py        the ops under test (Case, make_case, make_call, input_sets, byte counts) and one op row
    ldm.py          DiagonalGaussianDistribution.sample() + kl() against diffusers' class
    dmol.py         the discretized mixture of logistics against PixelCNN++'s formula (and compiled)
    train_steps.py  whole training steps (TrainConfig, CUDA graphs, the ELBO ops' share), log-likelihood memory
    plots.py        the PNG
    report.py       the Markdown, the results files and their names, merging; the method, written down
    cli.py          the flags and main(); ``__main__.py`` runs it (``python -m vae_fast.bench``)

The method of measurement and the byte counts are ``report.py``'s docstring; every result carries them.
"""

from __future__ import annotations


def main(argv=None, prog: str = "python -m vae_fast bench") -> int:
    """The command line (``vae-fast bench``, ``python -m vae_fast bench``): see ``cli.main``."""
    from .cli import main as run  # imported here: importing one module of the suite loads only what it needs

    return run(argv, prog)
