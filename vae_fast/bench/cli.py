"""The suite's command line: ``python -m vae_fast bench [flags]`` (also ``vae-fast bench``, ``python -m
vae_fast.bench`` and ``python benchmarks/run.py``): the flags, the run of the sections asked for, saving the
results after every row, and ``--merge``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

import torch

from .cases import (BCAST_K, CPU_SIZES, CUDA_SIZES, DTYPE_NAMES, IWAE_K, OPS, PASSES, PER_CALL_SIZES,
                    PER_CALL_SIZES_BY_OP, QUICK_SIZES, bench_op)
from .dmol import MIXTURES as DMOL_MIXTURES
from .dmol import iter_dmol_rows
from .ldm import ldm_rows
from .report import (bytes_table, compile_config, contention, cpu_snapshot, device_name, fmt, git_commit,
                     merge_results, method_text, results_stem, write_results)
from .timing import copy_gbps, write_gbps
from .train_steps import (CPU_TRAIN_CONFIGS, CPU_TRAIN_IMPLS, CUDA_TRAIN_CONFIGS, TRAIN_CONFIG_NAMES, TRAIN_IMPLS,
                          bench_log_likelihood, bench_train_step, train_step_note)


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for tok in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", tok)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise argparse.ArgumentTypeError(f"sizes are BxD with positive integers, comma-separated; got {tok!r}")
        sizes.append((int(m.group(1)), int(m.group(2))))
    return sizes


def _parse_list(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items
    return parse


DEFAULT_OUT = os.path.join("runs", "bench")  # outside the source tree; committed results: --out benchmarks/results


def build_parser(prog: str = "python -m vae_fast bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Fused vs eager vs torch.compile benchmarks of the vae_fast ops.")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 2 repeats, one compiled config (< 60 s); its files end in -quick")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--dtypes", type=_parse_list(tuple(DTYPE_NAMES)), default=None,
                   help="comma-separated (default: float32,float64,bfloat16 on CPU; float32,bfloat16 on CUDA)")
    p.add_argument("--ops", type=_parse_list(OPS), default=None, help="comma-separated subset of: " + ", ".join(OPS))
    p.add_argument("--sizes", type=_parse_sizes, default=None, help="comma-separated BxD, e.g. 64x1024,4096x1024")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output folder (default {DEFAULT_OUT}; results to commit: --out benchmarks/results)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per config (default 10; quick 2)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (compile_ms is null)")
    p.add_argument("--no-model", action="store_true", help="skip the training step and log-likelihood lines")
    p.add_argument("--no-per-call", action="store_true", help="skip the per-call table at training-loop sizes")
    p.add_argument("--no-ldm", action="store_true", help="skip the DiagonalGaussianDistribution rows")
    p.add_argument("--no-dmol", action="store_true", help="skip the discretized mixture of logistics rows")
    p.add_argument("--only", type=_parse_list(SECTIONS), default=None,
                   help="run only these sections, comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--train-configs", type=_parse_list(TRAIN_CONFIG_NAMES), default=None,
                   help="training-step configs, comma-separated (default: " + ",".join(CPU_TRAIN_CONFIGS)
                   + " on CPU; " + ",".join(CUDA_TRAIN_CONFIGS) + " on CUDA); all: " + ", ".join(TRAIN_CONFIG_NAMES))
    p.add_argument("--train-impls", type=_parse_list(tuple(TRAIN_IMPLS)), default=None,
                   help="training-step implementations (default: " + ",".join(CPU_TRAIN_IMPLS) + " on CPU; all on "
                   "CUDA); all: " + ", ".join(TRAIN_IMPLS))
    p.add_argument("--train-budget-s", type=float, default=None,
                   help="seconds a training-step config may spend compiling and capturing; impls not built by "
                        "then are left out (recorded)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="merge these results files of one device (e.g. the parts of a GPU check) into one, written "
                        "to --out; nothing is run")
    return p


SECTIONS = ("ops", "per-call", "ldm", "dmol", "train", "ll")
PARTIAL_FLAGS = ("dtypes", "ops", "sizes", "only", "train_configs", "train_impls", "train_budget_s")


def _merge_main(args, prog: str) -> int:
    parts = []
    for path in args.merge:
        try:
            with open(path) as f:
                parts.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"{prog}: error: --merge: cannot read {path}: {e}", file=sys.stderr)
            return 1
    try:
        merged = merge_results(parts)
    except ValueError as e:
        print(f"{prog}: error: --merge: {e}", file=sys.stderr)
        return 1
    stem = results_stem(args.out, merged["device_type"], merged["device"], merged["date"], bool(merged.get("quick")),
                        False)
    png = write_results(stem, merged)
    print(f"wrote {stem}.json, .md{', .png' if png else ''} (merged from {len(parts)} files)")
    return 0


def main(argv=None, prog: str = "python -m vae_fast bench") -> int:
    """The command line; `prog` names it in help and errors (``vae-fast bench`` when run as that command)."""
    args = build_parser(prog).parse_args(argv)
    if args.merge:
        return _merge_main(args, prog)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 1
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.repeats is not None and args.repeats < 1:
        print(f"{prog}: error: --repeats must be >= 1", file=sys.stderr)
        return 2
    quick = args.quick
    sections = set(args.only or SECTIONS)
    if args.no_per_call:
        sections.discard("per-call")
    if args.no_ldm:
        sections.discard("ldm")
    if args.no_dmol:
        sections.discard("dmol")
    if args.no_model:
        sections -= {"train", "ll"}
    partial = (sections != set(SECTIONS) or args.no_compile
               or any(getattr(args, name) is not None for name in PARTIAL_FLAGS))
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32", "float64", "bfloat16"])
    if device.type == "cuda" and "float64" in dtypes:
        print(f"{prog}: note: float64 on CUDA is benchmarked because it was asked for", file=sys.stderr)
    ops = args.ops or list(OPS)
    sizes = args.sizes or (QUICK_SIZES if quick else CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    repeats = args.repeats or (2 if quick else 10)
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    started = time.perf_counter()
    cpu_start = cpu_snapshot()
    if cpu_start is not None and hasattr(os, "getloadavg"):
        cpu_start["loadavg"] = os.getloadavg()[0]

    copy = copy_gbps(device)
    write = write_gbps(device)
    print(f"copy bandwidth: {copy:.1f} GB/s; writing 64 MiB: {write['existing_gbps']:.1f} GB/s into an existing "
          f"tensor, {write['fresh_alloc_gbps']:.1f} GB/s into a fresh one", flush=True)
    from .. import _C

    info = _C.build_info()
    name = device_name(device)
    today = datetime.date.today().isoformat()
    rows, per_call, ldm, dmol = [], [], [], []
    result = {
        "device": name,
        "date": today,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_gbps": copy,
        "rows": rows,
        "write_gbps": write,
        # Extra top-level keys (beyond docs/architecture.md's schema):
        "device_type": device.type,
        "cpu_isa": info.get("cpu_isa"),
        "build_info": info,
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "quick": quick,
        "repeats": repeats,
        "sections": sorted(sections),
        # False until the run has finished: a run stopped on the way (a timeout) leaves what it had measured.
        "complete": False,
        "wall_s": 0.0,
        "contention": None,
        "method": method_text(),
        "bytes_table": bytes_table(),
        "cases": {"gaussian_log_prob_bcast": f"x (B, D), mean (K, B, D), logvar () with K = {BCAST_K}; "
                                             "shape is the broadcast (K, B, D)",
                  "bernoulli_log_prob_iwae": f"x (B, D), logits (K, B, D) with K = {IWAE_K}, B = size // K; per call: "
                                             "(50, 128, 784)",
                  "discretized_mix_logistic_log_prob": f"x (B, 3, H, W), params (B, 10M, H, W) in PixelCNN++'s "
                                                       f"order with M = {DMOL_MIXTURES}, 8 bits; shape is x's"},
        "compile_config": compile_config(),
        "per_call": per_call,
        "ldm": ldm,
        "dmol": dmol,
        "train_step": [],
        "train_step_note": "train step not run",
        "log_likelihood": {"skipped": "not run"},
    }
    stem = results_stem(args.out, device.type, name, today, quick, partial,
                        only=[s for s in SECTIONS if s in sections] if args.only else None)

    def save(final: bool = False) -> bool:
        result["wall_s"] = time.perf_counter() - started
        # Other processes running meanwhile make every time longer (2 OpenMP threads wait for a busy core).
        result["contention"] = contention(cpu_start, cpu_snapshot())
        result["complete"] = final
        return write_results(stem, result, png=final)

    for op in ops if "ops" in sections else []:
        for dtype_name in dtypes:
            for size in sizes:
                for pass_ in PASSES:
                    if args.no_compile:
                        compile_it = False
                    elif quick:  # one small compiled config, so the column is exercised
                        compile_it = (op, dtype_name, size, pass_) == (ops[0], dtypes[0], sizes[0], "fwd")
                    else:
                        compile_it = True
                    row = bench_op(op, DTYPE_NAMES[dtype_name], size, pass_, device, repeats, compile_it, copy, gen)
                    rows.append(row)
                    print(f"{op:24s} {dtype_name:8s} {'x'.join(map(str, row['shape'])):>14s} {pass_:7s} "
                          f"fused {row['fused_ms']:9.3f} ms  eager {row['eager_ms']:9.3f} ms  compile "
                          f"{fmt(row['compile_ms']):>9s} ms  {row['fused_gbps']:6.1f} GB/s "
                          f"({row['copy_fraction']:.2f} of copy)", flush=True)
                    save()

    for op in ops if "per-call" in sections else []:
        op_sizes = PER_CALL_SIZES_BY_OP.get(op, PER_CALL_SIZES)
        for size in op_sizes[:1] if quick else op_sizes:
            for pass_ in PASSES:
                row = bench_op(op, torch.float32, size, pass_, device, repeats, not (args.no_compile or quick), copy,
                               gen)
                per_call.append(row)
                print(f"per call {op:24s} {'x'.join(map(str, row['shape'])):>10s} {pass_:7s} fused "
                      f"{row['fused_ms'] * 1e3:8.1f} us  eager {row['eager_ms'] * 1e3:8.1f} us  compile "
                      f"{fmt(None if row['compile_ms'] is None else row['compile_ms'] * 1e3):>8s} us", flush=True)
        save()

    if "ldm" in sections:
        ldm.extend(ldm_rows(device.type, quick, copy_gbps=copy, compile_it=not args.no_compile))
        for row in ldm:
            print(f"DiagonalGaussianDistribution {'x'.join(map(str, row['shape']))} {row['dtype']} {row['pass']}: fused "
                  f"{row['fused_ms']:.3f} ms, {row.get('baseline', 'eager')} {row['eager_ms']:.3f} ms", flush=True)
        save()

    if "dmol" in sections:
        for row in iter_dmol_rows(device.type, quick, repeats=args.repeats, copy_gbps=copy, compile_it=not args.no_compile):
            dmol.append(row)
            print(f"discretized_mix_logistic_log_prob x {'x'.join(map(str, row['shape']))} M={row['mixtures']} "
                  f"{row['pass']}: fused {row['fused_ms']:.3f} ms, eager {row['eager_ms']:.3f} ms, compile "
                  f"{fmt(row['compile_ms'])} ms, {row['fused_gbps']:.1f} GB/s ({row['copy_fraction']:.2f} of copy)",
                  flush=True)
            save()

    if "train" in sections:
        result["train_step_note"] = train_step_note(quick)
        train_rows, result["train_step_note"] = bench_train_step(
            device, max(3, repeats // 2) if not quick else repeats, quick, gen, configs=args.train_configs,
            impls=args.train_impls, budget_s=args.train_budget_s,
            on_row=lambda done: (result.__setitem__("train_step", list(done)), save()))
        result["train_step"] = train_rows
        for r in train_rows:
            if "skipped" in r:
                continue
            print(f"train step {r['name']}: " + ", ".join(f"{impl} {fmt(r.get(f'{impl}_ms'))} ms"
                                                          for impl in TRAIN_IMPLS if r.get(f"{impl}_ms") is not None),
                  flush=True)
    elif args.no_model:
        result["train_step_note"] = "train step skipped (--no-model)"
    if "ll" in sections:
        result["log_likelihood"] = bench_log_likelihood(device, quick, gen)
        print(f"log_likelihood: {result['log_likelihood']}", flush=True)
    elif args.no_model:
        result["log_likelihood"] = {"skipped": "--no-model"}

    png = save(final=True)
    print(f"wrote {stem}.json, .md{', .png' if png else ''} in {result['wall_s']:.0f} s")
    return 0
