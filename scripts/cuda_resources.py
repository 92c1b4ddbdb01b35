#!/usr/bin/env python3
"""Resource report of the CUDA kernels, without a GPU.

Compiles the module's kernel sources (csrc/cuda/rows.cu, sample.cu) for sm_90 with
``nvcc -Xptxas -v``, reads each kernel's registers, spills and static shared memory, and computes
its resident blocks per SM at the block sizes its launcher uses (the occupancy rules of the CUDA
occupancy calculator for sm_90: 64K registers in 4 sub-partitions, allocated per warp in units of
256; 64 warps, 32 blocks and 228 KB of shared memory per SM, 1 KB of it reserved per block).

Writes the table as Markdown (``--out``, default docs/cuda-resources.md) and exits non-zero on any
spill, and on a missed budget when the budgets are enforced: forward and element-wise kernels at
most 64 registers (float64 instances excepted: two registers per value), every kernel at least 2 resident blocks per SM at every block size it is
launched with. Standard library only; needs nvcc (exits 0 with a notice without it).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["rows.cu", "sample.cu", "dmol.cu"]  # the module's kernels, csrc/cuda/*.cu (the tests are in tests/cuda/)
# A mangled-name fragment of a kernel each source defines (--from-log checks the log has them all).
SOURCE_MARKERS = {"rows.cu": "reduce_vec_kernel", "sample.cu": "sample_z_kernel"}
ARCH = "sm_90"

# sm_90 (H100/H200) per-SM limits, as cuda_occupancy.h models them.
REGS_PER_SM = 65536
SUB_PARTITIONS = 4
REG_ALLOC_UNIT = 256  # registers, per warp
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_ALLOC_UNIT = 128

REG_BUDGET = 64       # forward and element-wise kernels
MIN_BLOCKS_PER_SM = 2  # every kernel
ENFORCE_BUDGETS = False

# Block sizes each kernel is launched with (its launcher in rows.cu / sample.cu; group_grid gives
# 256-thread blocks of warp-slice groups, or one group of tpr threads per block for tpr > 32), and
# whether it is a forward or element-wise kernel (the register budget applies).
LAUNCH = {
    "reduce_kernel": ([64, 128, 256], True),             # pick_tpr(.., 256)
    "reduce_vec_kernel": ([64, 128, 256], True),         # the fast path, the same
    "segment_sum_kernel": ([64, 128, 256], True),        # long rows, the second stage
    "map_kernel": ([256], True),
    "map_vec_kernel": ([256], True),
    "bcast_vec_kernel": ([256], False),                  # the broadcast backward's fast path
    "scalar_acc_vec_kernel": ([256], False),             # ... and with scalar gradients
    "bcast_row_vec_kernel": ([64, 128, 256], False),     # ... and per-row ones: pick_tpr(.., 256)
    "acc_kernel": ([64, 128, 256], False),               # pick_tpr(.., 256)
    "sample_z_kernel": ([256], True),
    "sample_rows_kernel": ([64, 128, 256], True),        # pick_tpr(.., 256)
    "sample_bwd_kernel": ([256], False),
    # The mixture of logistics: a pixel's M components x C channels in registers. Spills of up to
    # 64 bytes (the third field) are marked, not failed: ptxas saves a few registers around the calls into
    # libdevice's slow paths (log1p, expm1) in three instances; whether they cost anything is for a GPU to say.
    "dmol_fwd_kernel": ([128], True, 64),                # per pixel, then dmol_sum_kernel
    "dmol_sum_kernel": ([64, 128, 256], True),           # pick_tpr(.., 256)
    "dmol_bwd_kernel": ([128], False, 64),
    "dmol_sample_kernel": ([128], True, 64),
}


def blocks_per_sm(regs: int, smem: int, block: int) -> tuple[int, str]:
    """Resident blocks per SM and the limiting resource."""
    warps = (block + 31) // 32
    regs_per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    if regs_per_warp:
        warps_by_regs = (REGS_PER_SM // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS
        by_regs = warps_by_regs // warps
    else:
        by_regs = MAX_BLOCKS_PER_SM
    smem_block = -(-(smem + SMEM_RESERVED_PER_BLOCK) // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    limits = {
        "registers": by_regs,
        "warps": MAX_WARPS_PER_SM // warps,
        "blocks": MAX_BLOCKS_PER_SM,
        "shared memory": SMEM_PER_SM // smem_block,
    }
    n = min(limits.values())
    return n, next(k for k, v in limits.items() if v == n)


def compile_one(nvcc: str, src: str, tmp: str) -> str:
    cmd = [nvcc, "-std=c++17", f"-arch={ARCH}", "-cubin", "--expt-relaxed-constexpr",
           "-Xptxas", "-v", "-I", str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda" / src),
           "-o", os.path.join(tmp, src + ".cubin")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"FAIL: nvcc could not compile csrc/cuda/{src}")
    return r.stdout + r.stderr


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per mangled kernel name: regs, spill stores/loads, stack, smem (sm_90 entries only)."""
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = m.group(1) if m.group(2) == ARCH else None
            if cur:
                out[cur] = {"regs": 0, "spill_st": 0, "spill_ld": 0, "stack": 0, "smem": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[cur]["smem"] = int(s.group(1)) if s else 0
    return out


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if not filt:
        return {n: n for n in names}
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    lines = r.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def op_kinds() -> list[str]:
    """core/launch_args.h's OpKind names in enum order (demangled template arguments are their numbers)."""
    text = (ROOT / "csrc" / "core" / "launch_args.h").read_text()
    body = re.search(r"enum class OpKind[^{]*\{(.*?)\};", text, re.S)
    if not body:
        return []
    body = re.sub(r"//[^\n]*", "", body.group(1))
    return [n.strip() for n in body.split(",") if n.strip()]


def short_name(d: str, kinds: list[str]) -> tuple[str, str]:
    """('reduce_kernel', '<KlStdFwd, float>') from a demangled name."""
    d = re.sub(r"\(vae_fast::OpKind\)(\d+)", lambda m: kinds[int(m.group(1))] if int(m.group(1)) < len(kinds) else m.group(0), d)
    dtypes = ["Float32", "Float64", "Float16", "BFloat16"]  # launch_args.h's DType
    d = re.sub(r"\(vae_fast::DType\)(\d+)", lambda m: dtypes[int(m.group(1))] if int(m.group(1)) < 4 else m.group(0), d)
    d = d.replace("vae_fast::cuda::detail::", "").replace("vae_fast::OpKind::", "")
    d = d.replace("(vae_fast::OpKind)", "").replace("vae_fast::", "")
    d = re.sub(r"^void ", "", d)
    d = re.sub(r"\(.*\)$", "", d)
    m = re.match(r"([A-Za-z_0-9]+)(<.*>)?$", d)
    return (m.group(1), m.group(2) or "") if m else (d, "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "cuda-resources.md"))
    ap.add_argument("--compare", help="a committed table: say whether --out differs from it")
    ap.add_argument("--from-log", help="read the ptxas -v output of a full build (scripts/check_cuda_compile.sh "
                    "leaves it in build/cuda-check.log) instead of compiling again; compiles when the log "
                    "lacks a kernel of some source (an incremental build)")
    args = ap.parse_args()
    nvcc = shutil.which("nvcc")
    if not nvcc:
        print("nvcc not found: CUDA resource report skipped")
        return 0
    logs = None
    if args.from_log and Path(args.from_log).exists():
        found = parse_ptxas(Path(args.from_log).read_text(errors="replace"))
        # one log for all sources; every source must have its kernels in it (a full build)
        if all(any(m in k for k in found) for m in SOURCE_MARKERS.values()):
            logs = [Path(args.from_log).read_text(errors="replace")]
            print(f"CUDA resources: ptxas output read from {args.from_log}")
    if logs is None:
        with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(len(SOURCES)) as ex:
            logs = list(ex.map(lambda s: compile_one(nvcc, s, tmp), SOURCES))
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]

    rows, failures = [], []
    kinds = op_kinds()
    for src, log in zip(SOURCES if len(logs) == len(SOURCES) else ["*"], logs):
        res = parse_ptxas(log)
        if not res:
            failures.append(f"no kernel of {src} found in ptxas output")
        names = demangle(list(res))
        for mangled, r in res.items():
            base, targs = short_name(names[mangled], kinds)
            ksrc = src
            if src == "*":  # a build log may hold other kernels too: only the module's are reported
                if not mangled.startswith("_ZN8vae_fast4cuda6detail"):
                    continue
                ksrc = "sample.cu" if base.startswith("sample_") else "dmol.cu" if base.startswith("dmol_") else "rows.cu"
            if base not in LAUNCH:
                failures.append(f"{base}{targs}: no launch configuration known (add it to LAUNCH)")
                continue
            blocks, fwd, *tolerated = LAUNCH[base]
            spill_ok = tolerated[0] if tolerated else 0
            per = [(b, *blocks_per_sm(r["regs"], r["smem"], b)) for b in blocks]
            worst = min(per, key=lambda t: t[1])
            marks = []
            if r["spill_st"] or r["spill_ld"]:
                if max(r["spill_st"], r["spill_ld"]) <= spill_ok:
                    marks.append(f"spill <= {spill_ok} B tolerated")
                else:
                    marks.append("SPILL")
                    failures.append(f"{base}{targs}: spills ({r['spill_st']} B stores, {r['spill_ld']} B loads)")
            if fwd and "double" not in targs and r["regs"] > REG_BUDGET:
                marks.append(f"> {REG_BUDGET} regs")
            if worst[1] < MIN_BLOCKS_PER_SM:
                marks.append(f"< {MIN_BLOCKS_PER_SM} blocks/SM")
            budget_marks = [m for m in marks if m != "SPILL" and not m.startswith("spill")]
            if budget_marks and ENFORCE_BUDGETS:
                failures.append(f"{base}{targs}: over budget ({', '.join(budget_marks)})")
            occ = ", ".join(f"{b}: {n} ({100 * n * ((b + 31) // 32) // MAX_WARPS_PER_SM}%)" for b, n, _ in per)
            rows.append((ksrc, base, targs, r, occ, worst, marks, fwd))
    rows.sort(key=lambda t: (t[0], t[1], t[2]))

    lines = [
        "# CUDA kernels: registers and occupancy on sm_90",
        "",
        "Written by `scripts/cuda_resources.py` (CI runs it; do not edit by hand). Compiled with "
        f"`nvcc -arch={ARCH} -Xptxas -v` ({ver}). Blocks per SM at each block size the launcher uses "
        "(occupancy in % of 64 warps in brackets); the limit is the resource that bounds the smallest "
        f"of them. Budgets: forward and element-wise kernels at most {REG_BUDGET} registers (marked "
        f"**fwd**; float64 instances, two registers per value, are listed but not held to it); every kernel at least {MIN_BLOCKS_PER_SM} resident blocks per SM; no spills (the mixture of logistics' kernels: up to 64 B tolerated and marked). "
        + ("The script fails CI on any spill or missed budget." if ENFORCE_BUDGETS
           else "The script fails CI on spills only; missed budgets are marked."),
        "",
        "| source | kernel | instance | fwd | regs | spill B (st/ld) | smem B | blocks/SM by block size | min limited by | over budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for src, base, targs, r, occ, worst, marks, fwd in rows:
        lines.append(
            f"| {src} | `{base}` | `{targs}` | {'**fwd**' if fwd else ''} | {r['regs']} | "
            f"{r['spill_st']}/{r['spill_ld']} | {r['smem']} | {occ} | {worst[2]} | {', '.join(marks) or '-'} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmpname = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmpname, out)
    print(f"CUDA resources: {len(rows)} kernels for {ARCH}, table in {out}")
    if args.compare:
        same = Path(args.compare).read_text() == text if Path(args.compare).exists() else False
        print(f"  (the committed {args.compare} is {'up to date' if same else 'STALE: rerun scripts/cuda_resources.py'})")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
