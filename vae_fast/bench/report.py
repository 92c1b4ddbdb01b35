"""What a run writes: the results JSON's bookkeeping (device, commit, contention, compile configuration), the
Markdown report, the files and their names (``-quick``, ``-partial``), and merging the parts of one device's run.

The method of measurement and the byte counts are written down here, below; ``method_text()`` and
``bytes_table()`` put them into every result (its ``"method"`` and ``"bytes_table"``) and the Markdown prints
the method.

Method
------
* CPU: ``time.perf_counter`` around each call. Two warm-up calls per implementation (the first compiled
  call compiles). Then ``repeats`` rounds; each round times every implementation once, the order rotated
  from round to round (interleaved, so drift in clock speed or in the neighbours of a VM hits all three
  alike). A call shorter than ``MIN_SAMPLE_S`` is repeated inside one sample and averaged. Big configs get
  fewer rounds (at least 3) so that one config takes about ``CONFIG_BUDGET_S``. p20/p50/p80 over rounds.
* CUDA: CUDA events around each sample, several input sets rotated so the inputs are not resident in L2
  (the sets together are at least 4x the L2 size, unless one set is already larger); same percentiles.
* "fwd" runs under ``torch.no_grad()`` (inference). "fwd+bwd" runs the op with autograd and then
  ``torch.autograd.grad(outputs, inputs_that_need_grad, g)`` with a fixed random upstream gradient ``g``.
* torch.compile: ``torch.compile(reference_fn)`` with Inductor's defaults; dynamo is reset before every
  (op, dtype, size, pass), so each is compiled for its own static shapes, as a fixed-shape training loop
  sees it. The sampling baselines call ``torch.randn`` inside the compiled graph: Inductor generates those
  numbers with its own CPU RNG, which is slow (it is not a vectorised Philox), so "compile" for
  ``reparameterize*`` on CPU largely measures Inductor's RNG. In ``--quick`` mode only one small config is
  compiled; ``compile_ms`` (and ``peak_mb["compile"]``) is ``null`` for every other row.
* Reading CPU numbers: a ``copy_fraction`` above 1 means the inputs sat in cache (the copy that defines 1.0
  moves 512 MiB). At 16M elements each fresh output is a 64 MiB block that glibc maps anew and the kernel
  faults in page by page; ``write_gbps`` in the JSON measures that cost (writing into a fresh vs an existing
  64 MiB tensor), which the copy ceiling does not pay. Inductor's CPU code generation (torch 2.13) writes a
  vectorised ``expm1(x)`` as ``exp(x) - 1``, so the compiled KL baseline is cheaper than, and not as accurate
  as, the reference it compiles.
* The discretized mixture of logistics (section ``dmol``): PixelCNN++'s tensors, x (B, 3, H, W) on the
  256-level grid and params (B, 10M, H, W) in its P order (M = 10), float32. Eager is PixelCNN++'s own
  ``discretized_mix_logistic_loss`` (``_dmol_composite.pixelcnn_pp_log_prob``, per example), compile is
  ``torch.compile`` of it (dynamo reset per shape and pass, as above); the fused op reads the same two
  tensors in place (permuted views, ``layout="pixelcnn++"``). "fwd+bwd" asks for the gradient w.r.t. params
  only (x is data). Timed and measured like the ops (interleaved, p20/p50/p80, peak memory, CUDA input sets
  rotated past L2).
* Training steps (CUDA adds CUDA graphs): one Adam step (grads set to None, forward, backward, step) per
  config and implementation, timed like the ops (interleaved; CUDA events): the fused model, the same model
  with _composite.py's maths, each eager, compiled (``torch.compile``, Inductor defaults), compiled with
  ``mode="reduce-overhead"`` (CUDA graph trees, ``cudagraph_mark_step_begin()`` each step), and captured
  whole in one CUDA graph (``torch.cuda.graph``, capturable Adam, static inputs copied in, then replayed).
  Each is warmed up three times first (compiling, recording); one that fails records its error and the
  others go on. The same code runs on the CPU (no capture there: the static-input step itself runs).
* Peak memory, CPU: one extra call per implementation under ``torch.profiler`` with ``profile_memory=True``;
  the peak of the running total of the c10 CPU allocator's allocations and frees during that call (what the
  call allocates on top of what was live before it: temporaries, outputs, saved tensors and gradients;
  inputs do not count). Allocations made outside torch's allocator (e.g. OpenMP scratch) are not seen.
  CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated before the call.

Bytes: the fewest an op must move
---------------------------------
Every input read once, every output written once; for "fwd+bwd" the backward adds: read the upstream
gradient g (per row for the reductions, so small), read the inputs the gradient formula needs, write only the
gradients that are asked for. N = elements per tensor, R = rows (outputs of a reduction), s = element size,
s_out = size of the reduction's dtype (float32 for float32/bfloat16 inputs, float64 for float64).

==========================  ===========================  ==================================================
op (arguments, grads)        fwd                          extra for bwd
==========================  ===========================  ==================================================
gaussian_kl(mu, lv)          read mu, lv; write kl        read g, mu, lv; write dmu, dlv
                             = 2Ns + R s_out              = R s_out + 2Ns + 2Ns
gaussian_log_prob(x, m, lv)  read x, m, lv; write lp      read g, x, m, lv; write dm, dlv (x is data)
                             = 3Ns + R s_out              = R s_out + 3Ns + 2Ns
gaussian_log_prob_bcast      m (K,B,D), x (B,D), lv ()    read g, x, m, lv; write dm (K,B,D), dlv (scalar)
                             = (KBD + BD) s + KB s_out    = KB s_out + (KBD + BD) s + KBD s
bernoulli_log_prob(x, l)     read x, l; write lp          read g, x, l; write dl
                             = 2Ns + R s_out              = R s_out + 2Ns + Ns
bernoulli_log_prob_iwae      l (K,B,D), x (B,D)           read g, x, l; write dl (K,B,D)
                             = (KBD + BD) s + KB s_out    = KB s_out + (KBD + BD) s + KBD s
reparameterize (K=1)         read mu, lv; write z         read g (N), lv; write dlv (dmu is g itself)
                             = 3Ns                        = 3Ns
reparameterize_with_kl (K=1) read mu, lv; write z, kl     read gz, gkl, mu, lv; write dmu, dlv
                             = 3Ns + R s_out              = Ns + R s_out + 2Ns + 2Ns
gaussian_nll_loss(in, t, v)  read in, t, v; write loss    read g, in, t, v; write din, dv (t is data)
  (reduction="mean")         = 3Ns + s                    = s + 3Ns + 2Ns  (loss in the inputs' dtype)
discretized_mix_logistic     x (B,C,H,W), l (B,P,H,W)     read g (B), x, l; write dl (x is data)
  _log_prob (C = 3,          = (BCHW + BPHW) s + B s_out  = B s_out + (BCHW + BPHW) s + BPHW s
  P = 10M, per example)
==========================  ===========================  ==================================================

The same byte count divides every implementation's time (``fused_gbps`` in the rows; the plot's lines for
eager and compile), so GB/s compares like with like. ``copy_gbps`` is bytes read plus written by
``dst.copy_(src)`` on 64M float32 (256 MiB each), measured in the same run; ``copy_fraction`` =
``fused_gbps / copy_gbps``: 1.0 means the op runs at the speed of a plain memory copy.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import tempfile
import time

import torch

from .plots import plot_png
from .train_steps import GRAPH_IMPLS, TRAIN_IMPLS


def cpu_snapshot() -> dict | None:
    """CPU seconds: busy on the whole machine, stolen by the hypervisor, and used by this process (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = os.times()
    return {"busy": (user + nice + system + irq + softirq) / hz, "steal": steal / hz,
            "own": own.user + own.system + own.children_user + own.children_system, "wall": time.perf_counter()}


def contention(start: dict | None, end: dict | None) -> dict | None:
    """Average number of cores that other processes kept busy (and the hypervisor stole) during the run."""
    if start is None or end is None:
        return None
    wall = max(end["wall"] - start["wall"], 1e-9)
    other = (end["busy"] - start["busy"]) - (end["own"] - start["own"])
    return {"other_processes_cores": max(other, 0.0) / wall, "steal_cores": (end["steal"] - start["steal"]) / wall,
            "loadavg_at_start": start.get("loadavg")}


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), or None outside a git checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device, name: str) -> str:
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return f"{device.type}-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def compile_config() -> dict:
    import torch._inductor.config as ic

    return {
        "call": "torch.compile(reference_fn)  (backend='inductor', mode=None, dynamic=None, fullgraph=False)",
        "dynamo_reset_per_config": True,
        "fallback_random": ic.fallback_random,
        "freezing": ic.freezing,
        "max_autotune": ic.max_autotune,
        "cpp_wrapper": ic.cpp_wrapper,
        "cpp.simdlen": ic.cpp.simdlen,
        "cpp.threads": ic.cpp.threads,
        "triton.cudagraphs": ic.triton.cudagraphs,
        "note": ("The sampling baselines draw eps with torch.randn inside the compiled graph; on CPU Inductor "
                 "generates it with its own scalar RNG, which is slow, so compile_ms for reparameterize* on CPU "
                 "mostly measures that RNG."),
    }


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it the permissions a plain open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def _ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _timing_cells(r: dict, fmt) -> str:
    """A timed row's cells from "fused ms (p20-p80)" to "peak MiB": times, ratios, GB/s of each implementation
    (the row's minimal bytes over its time), copy fraction, peaks."""
    gb = lambda ms: None if ms is None else r["bytes"] / (ms * 1e6)  # noqa: E731
    pk = r["peak_mb"]
    return (f"{fmt(r['fused_ms'])} ({fmt(r['fused_p20_ms'])}-{fmt(r['fused_p80_ms'])}) | {fmt(r['eager_ms'])} | "
            f"{fmt(r['compile_ms'])} | {_ratio(r['fused_ms'], r['eager_ms'])} | "
            f"{_ratio(r['fused_ms'], r['compile_ms'])} | {fmt(r['fused_gbps'])} | {fmt(gb(r['eager_ms']))} | "
            f"{fmt(gb(r['compile_ms']))} | {r['copy_fraction']:.2f} | "
            f"{fmt(pk['fused'])} / {fmt(pk['eager'])} / {fmt(pk['compile'])} |")


def to_markdown(result: dict) -> str:
    lines = [f"# vae_fast benchmarks: {result['device']}, {result['date']}", ""]
    lines += [
        f"- machine: {result['device']} ({result['device_type']}), {result['threads']} threads, "
        f"CPU ISA of the fused kernels: {result['cpu_isa']}, torch {result['torch']}, "
        f"{result['platform']}",
        f"- copy bandwidth (`dst.copy_(src)`, 64M float32, read + write): **{result['copy_gbps']:.1f} GB/s**",
        f"- writing a {result['write_gbps']['tensor_mb']:.0f} MiB float32 tensor: "
        f"{result['write_gbps']['existing_gbps']:.1f} GB/s into an existing one, "
        f"{result['write_gbps']['fresh_alloc_gbps']:.1f} GB/s into a freshly allocated one (page faults)",
        f"- run: {'quick' if result['quick'] else 'full'}, {result['wall_s']:.0f} s",
    ]
    busy = result.get("contention")
    if busy:
        lines.append(f"- other processes kept {busy['other_processes_cores']:.2f} cores busy on average during the run "
                     f"(hypervisor steal {busy['steal_cores']:.2f} cores)"
                     + (" -- **the machine was not quiet: times are inflated**"
                        if busy["other_processes_cores"] > 0.1 * result["threads"] else ""))
    lines += [
        "",
        "## Method",
        "",
        result["method"],
        "",
        "Columns: times are p50 in ms; `fused/eager` and `fused/compile` are time ratios (below 1: fused is "
        "faster); GB/s uses the minimal byte count for every implementation; `copy` is fused GB/s over the copy "
        "bandwidth. Peak memory in MiB allocated by one call above what was live before it.",
        "",
    ]
    if result.get("cases"):
        lines += ["Op argument shapes: " + "; ".join(f"`{k}`: {v}" for k, v in result["cases"].items()), ""]
    largest = _largest_rows(result["rows"])
    if largest:
        lines += [f"## Largest size, {largest[0]['dtype']}", "",
                  "| op | shape | pass | fused ms | eager ms | compile ms | fused/eager | fused/compile | fused GB/s | copy |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in largest:
            lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['pass']} | {fmt(r['fused_ms'])} | "
                         f"{fmt(r['eager_ms'])} | {fmt(r['compile_ms'])} | {_ratio(r['fused_ms'], r['eager_ms'])} | "
                         f"{_ratio(r['fused_ms'], r['compile_ms'])} | {fmt(r['fused_gbps'])} | {r['copy_fraction']:.2f} |")
        lines.append("")
    if result["rows"]:  # a run of other sections only (--only ldm, dmol, train) has no op rows
        lines += ["## Ops", "",
                  "| op | dtype | shape | pass | fused ms (p20-p80) | eager ms | compile ms | fused/eager | "
                  "fused/compile | fused GB/s | eager GB/s | compile GB/s | copy | peak MiB fused/eager/compile |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['dtype']} | {'x'.join(map(str, r['shape']))} | {r['pass']} | "
                     + _timing_cells(r, fmt))
    if result.get("per_call"):
        lines += ["", "## Per call at training-loop sizes (float32)", "",
                  "| op | shape | pass | fused us | eager us | compile us | fused/eager | fused/compile |",
                  "|---|---|---|---|---|---|---|---|"]
        us = lambda ms: None if ms is None else ms * 1e3  # noqa: E731
        for r in result["per_call"]:
            lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['pass']} | {fmt(us(r['fused_ms']))} | "
                         f"{fmt(us(r['eager_ms']))} | {fmt(us(r['compile_ms']))} | "
                         f"{_ratio(r['fused_ms'], r['eager_ms'])} | {_ratio(r['fused_ms'], r['compile_ms'])} |")
    if result.get("ldm"):
        lines += ["", "## DiagonalGaussianDistribution: sample() + kl(), against diffusers' class", "",
                  "| parameters | dtype | pass | fused ms | baseline ms | compiled baseline ms | fused/baseline | "
                  "fused GB/s | copy | baseline |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["ldm"]:
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['pass']} | {fmt(r['fused_ms'])} | "
                         f"{fmt(r['eager_ms'])} | {fmt(r['compile_ms'])} | {_ratio(r['fused_ms'], r['eager_ms'])} | "
                         f"{fmt(r['fused_gbps'])} | {r['copy_fraction']:.2f} | {r.get('baseline', '')} |")
    if result.get("dmol"):
        lines += ["", "## Discretized mixture of logistics: log p(x), against PixelCNN++'s formula", "",
                  "x (B, 3, H, W) and params (B, 10M, H, W) as PixelCNN++ has them (its P order), float32; the "
                  "fused op reads them in place with `layout=\"pixelcnn++\"`; eager = PixelCNN++'s "
                  "`discretized_mix_logistic_loss`, compile = `torch.compile` of it; fwd+bwd: gradient w.r.t. "
                  "params. GB/s: the minimal bytes over each implementation's time.", "",
                  "| x | M | pass | fused ms (p20-p80) | eager ms | compile ms | fused/eager | fused/compile | "
                  "fused GB/s | eager GB/s | compile GB/s | copy | peak MiB fused/eager/compile |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["dmol"]:
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r.get('mixtures', '')} | {r['pass']} | "
                         + _timing_cells(r, fmt))
    lines += ["", "## Training step", ""]
    timed = [r for r in result["train_step"] if "skipped" not in r]
    if timed:
        lines += ["| config | model | fused ms | eager ms | compile ms | fused+compile ms | fused/eager | "
                  "fused/compile | ELBO ops ms fused / eager | ELBO share fused / eager | "
                  "profiler ELBO share fused / eager | peak MiB fused/eager |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in timed:
            pk, e, sh = r["peak_mb"], r.get("elbo_ops_ms") or {}, r.get("elbo_share") or {}
            ps = r.get("elbo_share_profiler") or {}
            lines.append(
                f"| {r['name']} (batch {r['batch'][0]}) | {r['model']} | {fmt(r['fused_ms'])} | {fmt(r['eager_ms'])} | "
                f"{fmt(r['compile_ms'])} | {fmt(r['fused_compile_ms'])} | {_ratio(r['fused_ms'], r['eager_ms'])} | "
                f"{_ratio(r['fused_ms'], r['compile_ms'])} | {fmt(e.get('fused'))} / {fmt(e.get('eager'))} | "
                f"{fmt(sh.get('fused'), 2)} / {fmt(sh.get('eager'), 2)} | {fmt(ps.get('fused'), 2)} / "
                f"{fmt(ps.get('eager'), 2)} | {fmt(pk['fused'])} / {fmt(pk['eager'])} |")
    graphs = [r for r in timed if any(r.get(f"{i}_ms") is not None for i in GRAPH_IMPLS)]
    if graphs:
        lines += ["", "With CUDA graphs (ms, p50): `reduce-overhead` = torch.compile(mode=\"reduce-overhead\"); "
                  "`graph` = the whole step captured in one CUDA graph. Best: the fastest with and without the fused "
                  "ops, and their ratio.", "",
                  "| config | fused | eager | compile | fused+compile | compile reduce-overhead | "
                  "fused+compile reduce-overhead | eager graph | fused graph | best fused | best other | "
                  "best fused / best other |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in graphs:
            bf, bo = r.get("best_fused"), r.get("best_other")
            lines.append(f"| {r['name']} (batch {r['batch'][0]}) | "
                         + " | ".join(fmt(r.get(f"{i}_ms")) for i in TRAIN_IMPLS)
                         + f" | {bf[0] if bf else '-'} | {bo[0] if bo else '-'} | "
                         f"{_ratio(bf[1], bo[1]) if bf and bo else '-'} |")
    for r in result["train_step"]:
        if "skipped" in r:
            lines.append(f"\n- {r['name']}: skipped ({r['skipped']})")
        for impl, err in (r.get("errors") or {}).items():
            lines.append(f"\n- {r['name']} {impl} failed: `{err.splitlines()[0][:300] if err else ''}`")
    lines += ["", result["train_step_note"], "", "## Log-likelihood memory", ""]
    ll = result["log_likelihood"]
    if "skipped" in ll:
        lines.append(f"Skipped: {ll['skipped']}")
    else:
        lines.append(
            f"`model.log_likelihood(x, num_samples={ll['num_samples']})` on {ll['batch'][0]} examples of "
            f"{ll['batch'][1]} pixels ({ll['model']}, latent {ll['latent_dim']}): {ll['seconds']:.1f} s, peak "
            f"{fmt(ll['peak_mb'])} MiB (decoding all samples at once would need "
            f"{ll['unchunked_logits_mb']:.0f} MiB for the logits alone).")
    lines += ["", "## Compile configuration", "", "```", json.dumps(result["compile_config"], indent=2), "```", ""]
    return "\n".join(lines)


def _largest_rows(rows: list) -> list:
    """Per op and pass, the row with the most elements, in float32 if there is any (else the first dtype)."""
    if not rows:
        return []
    dtypes = [r["dtype"] for r in rows]
    dtype = "float32" if "float32" in dtypes else dtypes[0]
    best: dict = {}
    for r in rows:
        key = (r["op"], r["pass"])
        if r["dtype"] == dtype and (key not in best or math.prod(r["shape"]) > math.prod(best[key]["shape"])):
            best[key] = r
    return list(best.values())


def results_stem(out: str, device_type: str, name: str, date: str, quick: bool, partial: bool,
                 only: list[str] | None = None) -> str:
    """Where a run's files go: ``<out>/<device-slug>-<date>``, with ``-quick`` for a quick run and ``-partial`` for
    one that left something out, so neither replaces a full run's files of the same day and device; a partial
    run of chosen sections (``--only``) names them (``-dmol-partial``), so runs of other sections that day keep
    their files."""
    tag = "".join(f"-{s}" for s in only or [])
    suffix = "-quick" if quick else f"{tag}-partial" if partial else ""
    return os.path.join(out, f"{device_slug(torch.device(device_type), name)}-{date}{suffix}")


def write_results(stem: str, result: dict, png: bool = True) -> bool:
    """The JSON and Markdown (and the PNG, if asked and matplotlib is there), each written atomically."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    _atomic_write(stem + ".json", (json.dumps(result, indent=1) + "\n").encode())
    _atomic_write(stem + ".md", to_markdown(result).encode())
    image = plot_png(result) if png else None
    if image is not None:
        _atomic_write(stem + ".png", image)
    return image is not None


def merge_results(parts: list[dict]) -> dict:
    """One result from several runs of one device: rows, per-call, LDM, DMOL and training-step rows joined (a later
    op row of the same op, dtype, shape and pass replaces an earlier one only if it has a compile time and the
    earlier one has not); the log-likelihood line and the rest from the first part that has them."""
    if not parts:
        raise ValueError("merge_results: no results to merge")
    devices = {(p.get("device_type"), p.get("device")) for p in parts}
    if len(devices) != 1:
        raise ValueError(f"merge_results: the parts come from different devices: {sorted(map(str, devices))}")
    merged = dict(parts[0])
    for key in ("rows", "per_call", "ldm", "dmol", "train_step"):
        joined: dict = {}
        for p in parts:
            for r in p.get(key) or []:
                k = (r.get("name"),) if key == "train_step" else (r["op"], r["dtype"], tuple(r["shape"]), r["pass"])
                if k not in joined or (r.get("compile_ms") is not None and joined[k].get("compile_ms") is None) \
                        or (key == "train_step" and "skipped" in joined[k]):
                    joined[k] = r
        merged[key] = list(joined.values())
    ll = next((p["log_likelihood"] for p in parts if "skipped" not in p.get("log_likelihood", {"skipped": 1})), None)
    merged["log_likelihood"] = ll or parts[0].get("log_likelihood", {"skipped": "in no part"})
    merged["train_step_note"] = next((p["train_step_note"] for p in parts if p.get("train_step")),
                                     parts[0].get("train_step_note", ""))
    merged["wall_s"] = sum(p.get("wall_s", 0.0) for p in parts)
    merged["sections"] = sorted({s for p in parts for s in p.get("sections", [])})
    merged["complete"] = all(p.get("complete", True) for p in parts)
    merged["merged_from"] = [{"git_commit": p.get("git_commit"), "wall_s": p.get("wall_s"),
                              "sections": p.get("sections"), "complete": p.get("complete")} for p in parts]
    return merged


def method_text() -> str:
    """The method of measurement as this module's docstring writes it down (the results' ``"method"``)."""
    doc = __doc__ or ""
    return doc.split("Method\n------\n", 1)[-1].split("Bytes: the fewest", 1)[0].strip()


def bytes_table() -> str:
    """The fewest bytes each op must move, as this module's docstring writes it down (``"bytes_table"``)."""
    doc = __doc__ or ""
    return doc.split("Bytes: the fewest an op must move\n---------------------------------\n", 1)[-1].strip()
