#!/usr/bin/env python3
"""Mutation audit: plant small wrong changes in a copy of the repository, rebuild, run the tests, and report
which mutants the suite kills. Not part of CI (minutes per mutant); run it before resolving an issue that
changes kernels or the model, and give the score in the note. Goal: every mutant killed.

    .venv/bin/python scripts/mutate.py              # every mutant: its own tests first (-x), then the rest
    .venv/bin/python scripts/mutate.py --quick      # only each mutant's own tests
    .venv/bin/python scripts/mutate.py --only philox-round-key,iwae-as-mean
    .venv/bin/python scripts/mutate.py --list
    .venv/bin/python scripts/mutate.py --work /tmp/vf-mutate   # keep the scratch copy: reruns rebuild less

How: the source (committed HEAD, or the working tree with --source worktree) is copied once into a scratch
folder and built there with CMake in its own build folder (Ninja; only what a mutant touches is recompiled),
together with the emulated CUDA self-test (build/cuda-emu/selftest, when the CUDA headers are there).
Each mutant is one exact string replacement in one file (it fails loudly if the text is not there exactly
once: the code moves, update the mutant), applied, rebuilt when it touches C++, tested, and reverted. Tests
run under a Python that sees the project's .venv packages but not its editable install, with the copy first
on the path, so they import the mutated build and nothing else. A baseline run of the same tests on the
unmutated copy comes first (a test failing there would make every mutant look killed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file in the repository
    old: str | tuple  # exact text, present exactly once; a tuple: alternatives for code in flux, first found
    new: str | tuple  # the replacement (one per alternative)
    tests: tuple  # the test files (pytest node ids) that should kill it, run first with -x
    why: str

    def edits(self):
        return list(zip(self.old, self.new)) if isinstance(self.old, tuple) else [(self.old, self.new)]


SAMPLING_TESTS = ("tests/test_known_answers.py", "tests/test_sampling.py")
OP_TESTS = ("tests/test_ops.py",)
EMU_SELFTEST = "tests/test_known_answers.py::test_emulated_cuda_selftest_passes"
MODEL_TESTS = ("tests/test_model_oracles.py", "tests/test_model.py")
DMOL_TESTS = "tests/test_dmol.py"
DATA_TESTS = "tests/test_data_checks.py"

MUTANTS = [
    # ---- the random stream ----------------------------------------------------------------------------------
    Mutant("philox-round-key", "csrc/core/philox.h", "c0 = hi1 ^ c1 ^ k0;", "c0 = hi1 ^ c1 ^ k1;", SAMPLING_TESTS,
           "a Philox round that XORs the wrong key word (passed the whole suite before the known-answer tests)"),
    Mutant("philox-weyl-constant", "csrc/core/philox.h", "kWeyl1 = 0xBB67AE85u", "kWeyl1 = 0xBB67AE87u", SAMPLING_TESTS,
           "a wrong key-schedule constant"),
    Mutant("cpu-counter-word", "csrc/cpu/sample.cpp", "c1[j] = static_cast<uint32_t>(b >> 32);",
           "c1[j] = static_cast<uint32_t>(b);", SAMPLING_TESTS,
           "the CPU's counter word 1 off the documented layout (the CUDA counter is built elsewhere)"),
    Mutant("cuda-counter-word", "csrc/core/philox.h", "out[2] = 0u;", "out[2] = 1u;", ("tests/test_known_answers.py",),
           "the counter the CUDA kernels build (philox::block; the CPU builds its own): only the emulated CUDA "
           "kernels (or a GPU) can see it"),
    Mutant("box-muller-swap", "csrc/core/elbo_math.h", "n0 = r * c;\n  n1 = r * s;", "n0 = r * s;\n  n1 = r * c;",
           SAMPLING_TESTS, "sin and cos swapped: still a perfect normal stream, but not the documented one"),
    # ---- formulas ------------------------------------------------------------------------------------------
    Mutant("kl-std-dlogvar", "csrc/core/elbo_math.h", "dlv = vmath::scaled_half_expm1(g, lv);",
           "dlv = vmath::scaled_half_expm1(g * V(1.01f), lv);", OP_TESTS + SAMPLING_TESTS,
           "a 1% error in the KL's dlogvar"),
    Mutant("gaussian-log-prob-dlogvar", "csrc/core/elbo_math.h", "dlv = (half_g * s) * s - half_g;",
           "dlv = V(1.01f) * ((half_g * s) * s - half_g);", OP_TESTS, "a 1% error in the likelihood's dlogvar"),
    Mutant("bernoulli-grad-sign", "csrc/core/elbo_math.h", "dl = g * (x - sigmoid);", "dl = g * (sigmoid - x);", OP_TESTS,
           "the Bernoulli gradient's sign"),
    Mutant("log-q-dlogvar", "csrc/core/elbo_math.h", "constexpr float kLogQDlogvar = -0.5f;",
           "constexpr float kLogQDlogvar = -0.495f;", SAMPLING_TESTS, "a 1% error in d log q / d logvar"),
    # ---- the sampler backward ------------------------------------------------------------------------------
    Mutant("sampler-dlogvar-scale", "csrc/core/elbo_math.h", "return V(0.5f) * sigma * sum_g_eps;",
           "return V(0.505f) * sigma * sum_g_eps;", SAMPLING_TESTS, "a 1% error in the sampler's dlogvar"),
    Mutant("sampler-backward-last-sample-only", "csrc/cpu/sample.cpp",
           "(V::loadu(sum_ge + i, cnt) + gv * V::loadu(eps + i, cnt)).store(sum_ge + i, cnt);",
           "(gv * V::loadu(eps + i, cnt)).store(sum_ge + i, cnt);", SAMPLING_TESTS,
           "dlogvar from the last of K samples only"),
    # ---- the reduction of broadcast gradients --------------------------------------------------------------
    Mutant("broadcast-partial-overwrites", "csrc/cpu/rows.cpp",
           ("if (op.dtype == DType::Float64) static_cast<double*>(op.data)[off] += value;",
            "  static_cast<acc_t*>(op.data)[off] += value;"),
           ("if (op.dtype == DType::Float64) static_cast<double*>(op.data)[off] = value;",
            "  static_cast<acc_t*>(op.data)[off] = value;"), OP_TESTS,
           "a broadcast argument's partial sum keeps only the last line added to it"),
    Mutant("broadcast-first-block-only", "csrc/glue/row_problem.cpp", "partials[j].sum(0).view(", "partials[j].select(0, 0).view(",
           OP_TESTS, "the block partial sums of a broadcast gradient: only the first block kept"),
    Mutant("clamp-edge-open", "csrc/cpu/common.h", "const V keep = (x >= vlo) & (x <= vhi);",
           "const V keep = (x > vlo) & (x <= vhi);", ("tests/test_clamp.py",),
           "the logvar clamp's gradient stopped at the lower edge (torch.clamp passes it there)"),
    # ---- the CUDA kernels, through the emulated self-test (tests/cuda/; no GPU needed) -------------------------
    Mutant("cuda-bcast-segment-short", "csrc/cuda/rows.cu",
           "CSum<float> acc0[W], acc1[W];\n    VF_NO_UNROLL\n    for (int64_t q = q0; q < q1; ++q) {",
           "CSum<float> acc0[W], acc1[W];\n    VF_NO_UNROLL\n    for (int64_t q = q0; q + 1 < q1; ++q) {", (EMU_SELFTEST,),
           "the one-pass broadcast backward drops the last row of each segment"),
    Mutant("cuda-scalar-acc-tail", "csrc/cuda/rows.cu", "      if (e >= valid) continue;\n      if (slot == 0) {",
           "      if (slot == 0) {", (EMU_SELFTEST,),
           "the scalar-sum kernels (per-row and scalar gradients) add the values past a row's end"),
    Mutant("cuda-bcast-row-lanes", "csrc/cuda/rows.cu", "for (int64_t c = g.lane; c < p.cpi; c += g.tpr) {",
           "for (int64_t c = g.lane; c < p.cpi; c += 2 * g.tpr) {", (EMU_SELFTEST,),
           "the per-row one-pass backward skips every other chunk of a row"),
    Mutant("cuda-sampler-k1-instance", "csrc/cuda/sample.cu",
           "return p.K == 1 ? launch_kernel(&sample_bwd_kernel<float, true>",
           "return p.K <= 2 ? launch_kernel(&sample_bwd_kernel<float, true>", (EMU_SELFTEST,),
           "the sampler backward's single-sample instance runs for K = 2 (the second sample ignored)"),
    # ---- the op table's glue (csrc/core/op_table.h's ops: OpCall, TableFn, the generated fake kernels) --------
    Mutant("op-call-backward-clamp-offset", "csrc/glue/table_ops.cpp", "c.set_clamps(p, 1);", "c.set_clamps(p, 0);",
           ("tests/test_clamp.py",),
           "a backward's clamps not shifted past its upstream gradient: the clamp lands on the argument before"),
    Mutant("op-call-optional-half-given", "csrc/glue/table_ops.cpp",
           "if (optional_given != 0 && optional_given != optional_count) {", "if (false) {", OP_TESTS,
           "the optional tensors' 'given together or not at all' check disabled: gaussian_kl(mu, logvar, "
           "prior_mu) silently drops prior_mu"),
    Mutant("table-fn-no-concat-split", "csrc/glue/autograd.cpp",
           "    if (concat) split_halves(g[pair], *concat, g[pair], g[pair + 1]);\n", "",
           ("tests/test_clamp.py", "tests/test_distributions.py"),
           "TableFn's backward hands on the one buffer of a (mean, logvar) pair without splitting it"),
    Mutant("fake-event-dims-position", "vae_fast/ops/_fake.py",
           'len(op["tensors"]) + len(op["params"]), op["pair"]', 'len(op["tensors"]), op["pair"]',
           ("tests/test_dmol.py::test_opcheck", "tests/test_dmol.py::test_compile_fullgraph",
            "tests/test_gaussian_nll_loss.py"),
           "the generated fake kernels read event_dims (and needs) where an op with params has its first param"),
    # ---- the discretized mixture of logistics (core/dmol_math.h: the CPU and CUDA kernels) ----------------
    Mutant("dmol-dlogscale-sign", "csrc/core/dmol_math.h", "const V gls_mid = b_sb - a_sna - d_over_expm1(d);",
           "const V gls_mid = b_sb - a_sna + d_over_expm1(d);", (DMOL_TESTS + "::test_gradients_match_composite",),
           "a sign in d log P(bin) / d log-scale of a middle bin"),
    Mutant("dmol-log-scale-clamp", "csrc/core/dmol_math.h", "constexpr double kDmolLogScaleMin = -7.0;",
           "constexpr double kDmolLogScaleMin = -8.0;", (DMOL_TESTS + "::test_matches_composite",),
           "the log-scales clamped at -8 instead of PixelCNN++'s -7"),
    Mutant("dmol-clamp-gradient-passes", "csrc/core/dmol_math.h",
           "gls[k][c] = vmath::where_lt(raw, lo_clamp, V(0.0f), gl);", "gls[k][c] = gl;",
           (DMOL_TESTS + "::test_gradients_match_composite",),
           "a log-scale below the clamp gets a gradient (torch.clamp gives it none)"),
    Mutant("dmol-edge-threshold", "csrc/core/dmol_math.h", "V(-1.0 + hw), V(1.0 - hw),", "V(-1.0 - hw), V(1.0 - hw),",
           (DMOL_TESTS + "::test_matches_composite",),
           "the lowest edge threshold below -1: the bin at x = -1 is a middle bin, not the open-ended edge"),
    Mutant("dmol-blue-coupling", "csrc/core/dmol_math.h", "m[2] = m[2] + t[1] * x[0] + t[2] * x[1];",
           "m[2] = m[2] + t[1] * x[0] + t[1] * x[1];", (DMOL_TESTS + "::test_matches_composite",),
           "the blue channel's mean coupled to green with red's coefficient (the forward only)"),
    Mutant("dmol-sampler-argmin", "csrc/core/dmol_math.h", "if (v > best || k == 0) {", "if (v < best || k == 0) {",
           (DMOL_TESTS,), "the sampler's Gumbel-max picks the least likely component"),
    Mutant("dmol-sampler-blue-coupling", "csrc/core/dmol_math.h", "        m = m + t * out[1];",
           "        m = m + t * out[0];", (DMOL_TESTS,),
           "the sampler couples blue to red twice (green's draw ignored)"),
    Mutant("dmol-backward-prior-weights", "csrc/core/dmol_math.h", "const V r = vmath::exp(w[k] - lse_w), pi",
           "const V r = vmath::exp(logit[k] - lse_l), pi", (DMOL_TESTS + "::test_gradients_match_composite",),
           "the backward weights each component by its prior pi_k instead of its responsibility"),
    # ---- data off the support, the fuzz's edges (issue 29) ---------------------------------------------------
    Mutant("dmol-grid-unchecked", "csrc/core/dmol_math.h",
           "return vmath::where_gt(vmath::abs(x), V(1.0f), nan, vmath::where_gt(off_grid, k.grid_tol, nan, v));",
           "return vmath::where_gt(vmath::abs(x), V(1.0f), nan, v);", (DATA_TESTS,),
           "data in [0, 1] scored by the mixture of logistics as if they were levels in [-1, 1]"),
    Mutant("bernoulli-support-unchecked", "csrc/core/elbo_math.h",
           "const V x = vmath::where_gt(x_in * (x_in - V(1.0f)), V(0.0f), V(NAN), x_in);", "const V x = x_in;",
           (DATA_TESTS,), "0..255 data scored by the Bernoulli likelihood"),
    Mutant("lse-skips-no-neg-inf", "csrc/core/dmol_math.h",
           "s = vmath::where_eq(v, V(-INFINITY), s, vmath::where_gt(v, m, s * e + V(1.0f), s + e));",
           "s = vmath::where_gt(v, m, s * e + V(1.0f), s + e);", (DATA_TESTS,),
           "a first mixture component of weight 0 (logit -inf) makes log p NaN"),
    Mutant("sech2-from-expm1", "csrc/core/dmol_math.h", "const V e = vmath::exp(V(-2.0f) * vmath::abs(r));",
           "const V e = V(1.0f) + vmath::expm1(V(-2.0f) * vmath::abs(r));", (DATA_TESTS,),
           "sech^2 = 4e / (1 + e)^2 with e = 1 + expm1(-2|r|): cancels where tanh saturates"),
    Mutant("nll-difference-overflows", "csrc/core/elbo_math.h",
           "return vmath::where_eq(vmath::abs(d), V(INFINITY), V(2.0f) * ((V(0.5f) * x - V(0.5f) * t) / r), d / r);",
           "return d / r;",
           (DATA_TESTS,), "gaussian_nll_loss's x - t overflows near the top of float32"),
    Mutant("dmol-broadcast-half-grad-rounded-per-sample", "csrc/glue/dmol_ops.cpp",
           "at::empty(full, t.options().dtype(p.acc).memory_format(", "at::empty(full, t.options().memory_format(",
           (DATA_TESTS,), "a half params' gradient rounded per sample before the sum over the samples"),
    Mutant("double-backward-in-half", "vae_fast/ops/_double_backward.py",
           "_vjp_of_first_order(lambda gr, *ts: first(gr, *ts), _upcast(inputs), _upcast(gg))",
           "_vjp_of_first_order(lambda gr, *ts: first(gr, *ts), inputs, gg)", (DATA_TESTS,),
           "double backward of half inputs computed in half precision"),
    Mutant("sampler-double-backward-in-half", "vae_fast/ops/_double_backward.py",
           "out = _vjp_of_first_order(first, _upcast(inputs), _upcast(gg))",
           "out = _vjp_of_first_order(first, inputs, gg)", (DATA_TESTS,),
           "the sampler's double backward of half inputs computed in half precision"),
    Mutant("dmol-data-check-in-double", "csrc/glue/dmol_ops.cpp", "(x_in.detach().to(acc) + 1.0)",
           "(x_in.detach().to(at::kDouble) + 1.0)", (DATA_TESTS,),
           "the glue measures the distance from the grid in double, the kernel in float32: a NaN without an error"),
    Mutant("dmol-edge-zero-times-inf", "csrc/core/dmol_math.h", "const V a_sna = vmath::zero_where_zero(sna, a * sna)",
           "const V a_sna = a * sna", (DATA_TESTS,),
           "a mean of -inf at the bottom edge bin: d/dlog-scale is inf * 0 = NaN"),
    # ---- the model's objectives ----------------------------------------------------------------------------
    Mutant("iwae-as-mean", "vae_fast/models/vae.py",
           "        log_w, _ = self._log_weights(x, mu, logvar, num_samples)\n"
           "        return torch.logsumexp(log_w, dim=0) - math.log(num_samples)",
           "        log_w, _ = self._log_weights(x, mu, logvar, num_samples)\n        return log_w.mean(0)",
           MODEL_TESTS, "iwae() as a K-sample ELBO (passed the whole suite before the model oracles)"),
    Mutant("iwae-objective-as-mean", "vae_fast/models/vae.py",
           "loss = -(torch.logsumexp(log_w, dim=0) - math.log(num_samples)).mean()", "loss = -log_w.mean()",
           MODEL_TESTS, "the IWAE training objective as a K-sample ELBO"),
    Mutant("elbo-sums-samples", "vae_fast/models/vae.py", "return self._log_px(x, self.decode(z)).mean(0) - kl",
           "return self._log_px(x, self.decode(z)).sum(0) - kl", MODEL_TESTS,
           "elbo() sums the K reconstructions instead of averaging them"),
    Mutant("log-likelihood-normaliser", "vae_fast/models/vae.py", "return total - math.log(num_samples)",
           "return total - math.log(chunk_size)", MODEL_TESTS,
           "the importance-sampled log-likelihood divided by the chunk size instead of K"),
    # ---- checkpoint / resume -------------------------------------------------------------------------------
    Mutant("resume-drops-optimizer-state", "vae_fast/train/loop.py",
           '        optimizer.load_state_dict(ckpt["optimizer"])\n', "", ("tests/test_cli.py", "tests/test_model.py"),
           "--resume restarts Adam's moments from zero"),
    Mutant("resume-epoch-seed", "vae_fast/train/loop.py", "epoch_seed = derive_seed(cfg.seed, rank, epoch)",
           "epoch_seed = derive_seed(cfg.seed, rank, epoch - start_epoch)", ("tests/test_cli.py",),
           "a resumed run re-seeds its epochs from the resume point"),
]


# ---- the scratch copy -----------------------------------------------------------------------------------------
def run(cmd, cwd=None, env=None, timeout=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, timeout=timeout, capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    return proc


def make_copy(work: Path, source: str) -> Path:
    """The source copied into work/repo (over an earlier copy: file times are kept, so an existing build
    folder rebuilds only what changed)."""
    copy = work / "repo"
    if source == "head":
        copy.mkdir(exist_ok=True)
        git = subprocess.Popen(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(copy)], stdin=git.stdout, check=True)
        if git.wait() != 0:
            sys.exit("git archive failed")
    else:
        shutil.copytree(REPO, copy, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".venv", "build", ".git", "runs", "__pycache__", "*.so",
                                                      ".pytest_cache", ".hypothesis"))
    return copy


def test_python(work: Path) -> Path:
    """A Python that imports the .venv's packages (torch, pytest, ...) but not its editable vae_fast: a venv
    whose only link to .venv is a .pth line naming its site-packages (.pth files inside are not run)."""
    base = run([VENV / "bin" / "python", "-c", "import sys; print(sys.base_prefix)"]).stdout.strip()
    site = run([VENV / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    env_dir = work / "pyenv"
    if not (env_dir / "bin" / "python").exists():
        run([Path(base) / "bin" / "python3", "-m", "venv", "--without-pip", env_dir])
    purelib = run([env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    Path(purelib.strip(), "vae_fast_mutate_base.pth").write_text(site + "\n")
    return env_dir / "bin" / "python"


def build(copy: Path) -> float:
    """Configure once, then rebuild incrementally; the module lands in the copy's package folder."""
    start = time.time()
    build_dir = copy / "build" / "mutate"
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    if not (build_dir / "build.ninja").exists():
        run([VENV / "bin" / "cmake", "-S", copy, "-B", build_dir, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             f"-DPython3_EXECUTABLE={VENV / 'bin' / 'python'}", "-DVAE_FAST_CUDA=OFF"], env=env)
    proc = run([VENV / "bin" / "cmake", "--build", build_dir, "--target", "_C"], env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    (module,) = build_dir.glob("_C*.so")
    shutil.copy2(module, copy / "vae_fast" / module.name)
    build_emulated_cuda(copy)
    return time.time() - start


def cuda_headers() -> Path | None:
    """The CUDA toolkit's include folder (cuda_runtime.h), as scripts/check_cuda_compile.sh finds it."""
    if shutil.which("nvcc"):
        out = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "/dev/null", "-o", "/dev/null"], capture_output=True,
                             text=True).stderr
        m = re.search(r'INCLUDES="*-I([^" ]*)', out)
        if m and Path(m.group(1), "cuda_runtime.h").exists():
            return Path(m.group(1))
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    return home if (home / "cuda_runtime.h").exists() else None


def build_emulated_cuda(copy: Path) -> None:
    """build/cuda-emu/selftest in the copy, as CI builds it (tests/test_known_answers.py compares its eps
    with the documented stream): the CUDA kernels compiled by g++ against tests/cuda/emu.h. Without the
    CUDA headers there is none, and the test skips (so a CUDA-only mutant survives: say so)."""
    include = cuda_headers()
    if include is None:
        return
    out = copy / "build" / "cuda-emu"
    out.mkdir(parents=True, exist_ok=True)
    sources = {"selftest": "tests/cuda/selftest.cu", "rows": "csrc/cuda/rows.cu", "sample": "csrc/cuda/sample.cu"}
    procs = [subprocess.Popen(["g++", "-std=c++17", "-O1", "-DVF_EMULATE", "-x", "c++", f"-I{include}", "-Icsrc",
                               "-Itests/cuda", "-c", src, "-o", str(out / f"{f}.o")], cwd=copy, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for f, src in sources.items()]
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("emulated CUDA build failed:\n" + "".join(logs)[-3000:])
    run(["g++", *(out / f"{f}.o" for f in ("selftest", "rows", "sample")), "-o", out / "selftest", "-lpthread"])


def pytest(python: Path, copy: Path, targets, timeout: float, first_failure=True):
    """(exit code, the failed test ids or the output's tail, seconds); exit code -1 on a timeout."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VAE_FAST_CPU_ISA", None)
    start = time.time()
    stop = ["-x"] if first_failure else []
    try:
        proc = run([python, "-m", "pytest", *stop, "-q", "-p", "no:cacheprovider", *targets], cwd=copy, env=env,
                   timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, ["timed out"], time.time() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    return proc.returncode, failed or [proc.stdout[-300:].strip()], time.time() - start


def apply(copy: Path, mutant: Mutant) -> str:
    """Plants the mutant; returns the file's original text."""
    path = copy / mutant.path
    text = path.read_text()
    for old, new in mutant.edits():
        if text.count(old) == 1:
            path.write_text(text.replace(old, new))
            return text
    counts = [text.count(old) for old, _ in mutant.edits()]
    raise LookupError(f"mutant {mutant.name}: the text to replace occurs {counts} times in {mutant.path} (expected "
                      f"once; the code has moved, update the mutant): {[old for old, _ in mutant.edits()]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutant names")
    parser.add_argument("--quick", action="store_true", help="run only each mutant's own tests")
    parser.add_argument("--source", choices=["head", "worktree"], default="head",
                        help="mutate the committed HEAD (default) or the working tree as it is")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline run on the unmutated copy")
    parser.add_argument("--deselect-failing", action="store_true",
                        help="deselect the tests that fail unmutated (code in flux) instead of stopping")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    parser.add_argument("--work", type=Path,
                        help="scratch folder to use and keep (a second run reuses its build: faster)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()

    mutants = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutants: {unknown}")
        mutants = [m for m in MUTANTS if m.name in wanted]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:36s} {m.path:22s} {m.why}")
        return 0

    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="vae_fast_mutate_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        copy = make_copy(work, args.source)
        python = test_python(work)
        for m in mutants:  # every pattern checked before anything slow runs
            (copy / m.path).write_text(apply(copy, m))
        print(f"building the unmutated copy in {copy} ...", flush=True)
        print(f"  built in {build(copy):.0f} s", flush=True)
        own = sorted({t for m in mutants for t in m.tests})
        deselect = []
        if not args.no_baseline:
            rc, failed, secs = pytest(python, copy, own, args.timeout, first_failure=False)
            if rc != 0:
                print(f"baseline: the unmutated copy fails ({secs:.0f} s):\n  " + "\n  ".join(failed), flush=True)
                if not args.deselect_failing:
                    print("fix that first, or rerun with --deselect-failing")
                    return 2
                deselect = [f"--deselect={t}" for t in failed]
            else:
                print(f"baseline: {', '.join(own)} pass unmutated ({secs:.0f} s)", flush=True)

        killed, survived, errors = [], [], []
        for m in mutants:
            original = apply(copy, m)
            try:
                compiled = not m.path.endswith(".py")
                if compiled:
                    try:
                        build(copy)
                    except RuntimeError as e:
                        errors.append(m.name)
                        print(f"ERROR     {m.name}: {e}", flush=True)
                        continue
                stages = [[*m.tests, *deselect]]
                if not args.quick:
                    stages.append(["tests", *[f"--deselect={t}" for t in m.tests], *deselect])
                verdict = None
                for stage in stages:
                    rc, failed, secs = pytest(python, copy, stage, args.timeout)
                    if rc == 1 or rc == -1:
                        verdict = f"KILLED    {m.name}: {failed[0]} ({secs:.0f} s)"
                        break
                    if rc != 0:
                        verdict = f"ERROR     {m.name}: pytest exit {rc}: {failed[0]}"
                        break
                if verdict is None:
                    survived.append(m.name)
                    print(f"SURVIVED  {m.name}: {m.why}", flush=True)
                else:
                    (killed if verdict.startswith("KILLED") else errors).append(m.name)
                    print(verdict, flush=True)
            finally:
                (copy / m.path).write_text(original)
        if any(not m.path.endswith(".py") for m in mutants):
            build(copy)  # leave the copy's build unmutated (for a later run with the same --work)
        print(f"\nscore: {len(killed)}/{len(mutants)} killed"
              + (f"; survived: {', '.join(survived)}" if survived else "")
              + (f"; errors: {', '.join(errors)}" if errors else ""))
        return 0 if len(killed) == len(mutants) else 1
    finally:
        if args.work:
            print(f"scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
