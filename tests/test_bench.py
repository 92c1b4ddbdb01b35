"""The benchmark suite: `--quick` writes a complete JSON (the schema in docs/architecture.md, "Benchmark results"), Markdown and PNG.

Checks shapes and types of the results, the byte formulas, file names, merging, and the training-step code
that the GPU check runs (CUDA graphs, reduce-overhead) rehearsed on the CPU with tiny shapes; never timings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from vae_fast.bench import cases, cli, dmol, report, timing, train_steps

ROW_KEYS = {"op", "dtype", "shape", "pass", "fused_ms", "eager_ms", "compile_ms", "fused_p20_ms", "fused_p80_ms",
            "bytes", "fused_gbps", "copy_fraction", "peak_mb"}


def _is_float(v) -> bool:
    return isinstance(v, float)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = "import sys, vae_fast.bench as b; sys.exit(b.main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the profiler's C++ side logs "USDT: ... profiler_start" per session: silenced around every profiled call
    assert "USDT" not in proc.stderr and "profiler_start" not in proc.stderr, proc.stderr[-2000:]
    files = sorted(os.listdir(out))
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 1, files
    with open(out / jsons[0]) as f:
        return out, files, jsons[0], json.load(f)


def test_files_named_and_complete(quick_run):
    out, files, name, result = quick_run
    stem = name[: -len(".json")]
    # A quick run's names end in -quick: it never replaces the full run of the same day and device.
    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d{4}-\d{2}-\d{2}-quick", stem), stem
    assert stem.endswith(result["date"] + "-quick")
    assert result["complete"] is True and set(result["sections"]) == set(cli.SECTIONS)
    assert set(files) == {stem + ".json", stem + ".md", stem + ".png"}  # no temporary files left behind
    md = (out / (stem + ".md")).read_text()
    assert "copy bandwidth" in md and "| op |" in md and "## Largest size" in md
    assert (out / (stem + ".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_level_schema(quick_run):
    result = quick_run[3]
    assert isinstance(result["device"], str) and result["device"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", result["date"])
    assert result["torch"] == torch.__version__
    assert _is_int(result["threads"]) and result["threads"] >= 1
    assert _is_float(result["copy_gbps"]) and result["copy_gbps"] > 0
    assert result["write_gbps"]["fresh_alloc_gbps"] > 0 and result["write_gbps"]["existing_gbps"] > 0
    assert isinstance(result["rows"], list) and result["rows"]
    assert isinstance(result["compile_config"], dict) and "fallback_random" in result["compile_config"]
    assert isinstance(result["cpu_isa"], str)
    assert isinstance(result["method"], str) and "perf_counter" in result["method"]


def test_every_row_has_the_schema(quick_run):
    rows = quick_run[3]["rows"]
    for row in rows:
        assert ROW_KEYS <= set(row), (row, ROW_KEYS - set(row))
        assert isinstance(row["op"], str) and isinstance(row["dtype"], str)
        assert isinstance(row["shape"], list) and row["shape"] and all(_is_int(s) and s > 0 for s in row["shape"])
        assert row["pass"] in ("fwd", "fwd+bwd")
        for key in ("fused_ms", "eager_ms", "fused_p20_ms", "fused_p80_ms", "fused_gbps", "copy_fraction"):
            assert _is_float(row[key]) and row[key] > 0, (key, row)
        assert row["compile_ms"] is None or (_is_float(row["compile_ms"]) and row["compile_ms"] > 0)
        assert row["fused_p20_ms"] <= row["fused_ms"] <= row["fused_p80_ms"]
        assert _is_int(row["bytes"]) and row["bytes"] > 0
        assert row["fused_gbps"] == pytest.approx(row["bytes"] / (row["fused_ms"] * 1e6))
        assert set(row["peak_mb"]) == {"fused", "eager", "compile"}
        for impl, v in row["peak_mb"].items():
            assert v is None or (_is_float(v) and v >= 0), (impl, v)
        assert row["peak_mb"]["fused"] is not None and row["peak_mb"]["eager"] is not None
        assert (row["peak_mb"]["compile"] is None) == (row["compile_ms"] is None)


def test_rows_cover_ops_dtypes_passes(quick_run):
    rows = quick_run[3]["rows"]
    combos = {(r["op"], r["dtype"], r["pass"]) for r in rows}
    for op in cases.OPS:
        for dtype in ("float32", "float64", "bfloat16"):
            for pass_ in cases.PASSES:
                assert (op, dtype, pass_) in combos
    assert any(r["compile_ms"] is not None for r in rows), "quick mode compiles one config"


def test_model_lines(quick_run):
    result = quick_run[3]
    assert isinstance(result["train_step"], list) and result["train_step"]
    for r in result["train_step"]:
        assert _is_float(r["fused_ms"]) and _is_float(r["eager_ms"])
    ll = result["log_likelihood"]
    assert _is_float(ll["peak_mb"]) and _is_int(ll["num_samples"])


# ---- byte formulas (docs/architecture.md: each input read once, each output written once, backward only what it needs) ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_byte_formulas(dtype):
    b, d = 8, 32
    n = b * d
    s = torch.tensor([], dtype=dtype).element_size()
    so = 8 if dtype == torch.float64 else 4  # reductions: float64 for float64, else float32
    gen = torch.Generator().manual_seed(0)
    expected = {  # op: (fwd, fwd + bwd)
        "gaussian_kl": (2 * n * s + b * so, 2 * n * s + b * so + b * so + 4 * n * s),
        "gaussian_log_prob": (3 * n * s + b * so, 3 * n * s + b * so + b * so + 5 * n * s),
        "bernoulli_log_prob": (2 * n * s + b * so, 2 * n * s + b * so + b * so + 3 * n * s),
        "reparameterize": (3 * n * s, 6 * n * s),
        "reparameterize_with_kl": (3 * n * s + b * so, 3 * n * s + b * so + n * s + b * so + 4 * n * s),
        # A drop-in for F.gaussian_nll_loss: the loss comes out in the inputs' dtype.
        "gaussian_nll_loss": (3 * n * s + s, 3 * n * s + s + s + 5 * n * s),
    }
    for op, (fwd, total) in expected.items():
        case = cases.make_case(op, b, d, dtype, torch.device("cpu"), gen)
        assert case.bytes("fwd") == fwd, op
        assert case.bytes("fwd+bwd") == total, op
    k, bb = cases.BCAST_K, b // cases.BCAST_K
    case = cases.make_case("gaussian_log_prob_bcast", b, d, dtype, torch.device("cpu"), gen)
    assert case.shape == [k, bb, d]
    fwd = (k * bb * d + bb * d + 1) * s + k * bb * so
    assert case.bytes("fwd") == fwd
    assert case.bytes("fwd+bwd") == fwd + k * bb * so + (k * bb * d + bb * d + 1) * s + (k * bb * d + 1) * s


# ---- the discretized mixture of logistics (section "dmol") ----
def test_dmol_section_runs_alone_and_its_rows_have_the_schema(tmp_path):
    """`--only dmol` on tiny shapes: rows of the ops' schema under "dmol" (nothing else run), their bytes as the
    method's table counts them, and their own table in the Markdown."""
    code = cli.main(["--only", "dmol", "--quick", "--device", "cpu", "--repeats", "2", "--out", str(tmp_path)])
    assert code == 0
    (name,) = [p.name for p in tmp_path.iterdir() if p.suffix == ".json"]
    assert name.endswith("-quick.json")
    result = json.loads((tmp_path / name).read_text())
    assert result["complete"] is True and result["sections"] == ["dmol"]
    assert result["rows"] == [] and result["ldm"] == [] and result["per_call"] == []
    rows = result["dmol"]
    assert [(r["shape"], r["pass"]) for r in rows] == [([2, 3, 8, 8], p) for p in cases.PASSES]
    b, c, h, w, m = 2, 3, 8, 8, dmol.MIXTURES
    x_bytes, l_bytes, out = 4 * b * c * h * w, 4 * b * 10 * m * h * w, 4 * b
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["op"] == "discretized_mix_logistic_log_prob" and r["dtype"] == "float32"
        assert r["params_shape"] == [b, 10 * m, h, w] and r["mixtures"] == m and r["layout"] == "pixelcnn++"
        for key in ("fused_ms", "eager_ms", "fused_p20_ms", "fused_p80_ms", "fused_gbps", "copy_fraction"):
            assert _is_float(r[key]) and r[key] > 0, (key, r)
        assert r["fused_p20_ms"] <= r["fused_ms"] <= r["fused_p80_ms"]
        assert r["compile_ms"] is None and r["peak_mb"]["compile"] is None  # quick: nothing compiled
        assert r["peak_mb"]["fused"] is not None and r["peak_mb"]["eager"] is not None
        assert r["fused_gbps"] == pytest.approx(r["bytes"] / (r["fused_ms"] * 1e6))
        assert r["copy_fraction"] == pytest.approx(r["fused_gbps"] / result["copy_gbps"])
    fwd = x_bytes + l_bytes + out  # read x and params once, write log p per example
    assert rows[0]["bytes"] == fwd
    assert rows[1]["bytes"] == fwd + out + x_bytes + l_bytes + l_bytes  # read g, x, params; write dparams
    md = (tmp_path / name.replace(".json", ".md")).read_text()
    assert "## Discretized mixture of logistics" in md and "| 2x3x8x8 | 10 | fwd+bwd |" in md
    assert "discretized_mix_logistic" in result["bytes_table"] and "PixelCNN++" in result["method"]


def test_dmol_fused_and_baseline_read_the_same_tensors():
    """The benchmark's fused call and PixelCNN++'s formula agree on its inputs (float32 against float64)."""
    case = dmol.dmol_case((2, 3, 4, 5), 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    got = case.fused(*case.inputs)
    want = case.eager(*(t.double() for t in case.inputs))
    assert got.shape == (2,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def test_dmol_rows_merge():
    row = {**_row("discretized_mix_logistic_log_prob"), "shape": [16, 3, 32, 32]}
    merged = report.merge_results([_part([], dmol=[row]), _part([], dmol=[{**row, "compile_ms": 2.0}])])
    assert merged["dmol"] == [{**row, "compile_ms": 2.0}]


def test_bad_arguments_exit_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--sizes", "12by3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["--ops", "gaussian_kl,nope"])
    assert e.value.code == 2
    assert cli.main(["--repeats", "0"]) == 2


def test_quick_and_partial_runs_never_take_a_full_runs_names(tmp_path):
    full = report.results_stem(str(tmp_path), "cpu", "AMD EPYC 7B13", "2026-12-01", quick=False, partial=False)
    assert os.path.basename(full) == "cpu-amd-epyc-7b13-2026-12-01"
    quick = report.results_stem(str(tmp_path), "cpu", "AMD EPYC 7B13", "2026-12-01", quick=True, partial=True)
    partial = report.results_stem(str(tmp_path), "cuda", "NVIDIA H200", "2026-12-01", quick=False, partial=True)
    assert os.path.basename(quick) == "cpu-amd-epyc-7b13-2026-12-01-quick"
    assert os.path.basename(partial) == "cuda-nvidia-h200-2026-12-01-partial"
    only = report.results_stem(str(tmp_path), "cpu", "AMD EPYC 7B13", "2026-12-01", quick=False, partial=True,
                               only=["ldm", "dmol"])
    assert os.path.basename(only) == "cpu-amd-epyc-7b13-2026-12-01-ldm-dmol-partial"  # --only names its sections


def test_quick_run_keeps_the_committed_results(tmp_path, monkeypatch):
    """`bench --quick` with the default --out (runs/bench, outside the source tree), run where the committed results
    are: they stay as they were, and a quick run asked to write there (--out benchmarks/results) never replaces a
    full run's files of the same day and device."""
    name = report.device_name(torch.device("cpu"))
    today = __import__("datetime").date.today().isoformat()
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    full = results / f"{report.device_slug(torch.device('cpu'), name)}-{today}"
    for ext in (".json", ".md"):
        (full.parent / (full.name + ext)).write_text("the full run\n")
    monkeypatch.chdir(tmp_path)
    args = ["--quick", "--device", "cpu", "--ops", "gaussian_kl", "--dtypes", "float32", "--sizes", "4x8",
            "--no-compile", "--no-model", "--no-per-call", "--no-ldm", "--no-dmol"]
    assert cli.main(args) == 0
    assert sorted(os.listdir(results)) == sorted(full.name + ext for ext in (".json", ".md"))
    assert (tmp_path / "runs" / "bench" / (full.name + "-quick.json")).exists()
    assert cli.main([*args, "--out", os.path.join("benchmarks", "results")]) == 0
    for ext in (".json", ".md"):
        assert (full.parent / (full.name + ext)).read_text() == "the full run\n"
    assert (full.parent / (full.name + "-quick.json")).exists()


def _part(rows, train=(), device="NVIDIA H200", **extra):
    return {"device": device, "device_type": "cuda", "date": "2026-12-01", "torch": "2.11", "threads": 16,
            "copy_gbps": 4000.0, "write_gbps": {"tensor_mb": 64, "existing_gbps": 1.0, "fresh_alloc_gbps": 1.0},
            "rows": rows, "per_call": [], "ldm": [], "train_step": list(train), "train_step_note": "note",
            "log_likelihood": {"skipped": "not run"}, "quick": False, "wall_s": 10.0, "complete": True,
            "sections": ["ops"], "cpu_isa": "avx512", "platform": "linux", "repeats": 10, "method": "m",
            "compile_config": {}, **extra}


def _row(op, compile_ms=None, dtype="float32"):
    return {"op": op, "dtype": dtype, "shape": [4, 8], "pass": "fwd", "fused_ms": 1.0, "eager_ms": 2.0,
            "compile_ms": compile_ms, "fused_p20_ms": 0.9, "fused_p80_ms": 1.1, "bytes": 100, "fused_gbps": 1e-4,
            "copy_fraction": 0.5, "peak_mb": {"fused": 0.0, "eager": 0.0, "compile": None}}


def test_merge_joins_parts_and_prefers_compiled_rows(tmp_path):
    a = _part([_row("gaussian_kl"), _row("bernoulli_log_prob")])
    b = _part([_row("gaussian_kl", compile_ms=1.5), _row("gaussian_kl", dtype="bfloat16")],
              train=[{"name": "mnist-mlp-b1024", "skipped": "x"}], sections=["train"], complete=False)
    merged = report.merge_results([a, b])
    keyed = {(r["op"], r["dtype"]): r for r in merged["rows"]}
    assert len(merged["rows"]) == 3 and keyed[("gaussian_kl", "float32")]["compile_ms"] == 1.5
    assert merged["wall_s"] == 20.0 and merged["sections"] == ["ops", "train"] and merged["complete"] is False
    assert merged["train_step"] == [{"name": "mnist-mlp-b1024", "skipped": "x"}]
    with pytest.raises(ValueError, match="different devices"):
        report.merge_results([a, _part([], device="NVIDIA H100")])
    paths = []
    for i, part in enumerate((a, b)):
        paths.append(str(tmp_path / f"part{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(part, f)
    out = tmp_path / "merged"
    assert cli.main(["--merge", *paths, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == [
        "cuda-nvidia-h200-2026-12-01.json", "cuda-nvidia-h200-2026-12-01.md"]
    assert cli.main(["--merge", str(tmp_path / "missing.json"), "--out", str(out)]) == 1


def test_training_step_table_shows_cuda_graph_impls_and_errors():
    ms = {f"{impl}_ms": None for impl in train_steps.TRAIN_IMPLS}
    ms.update(fused_ms=2.0, eager_ms=3.0, fused_graph_ms=1.0, compile_cudagraphs_ms=1.5)
    row = {"name": "mnist-mlp-b1024", "batch": [1024, 784], "model": "m", **ms, "elbo_ops_ms": {}, "elbo_share": {},
           "peak_mb": {impl: None for impl in train_steps.TRAIN_IMPLS}, "best_fused": ["fused_graph", 1.0],
           "best_other": ["compile_cudagraphs", 1.5], "errors": {"fused_compile": "RuntimeError: boom"}}
    part = _part([_row("gaussian_kl")], train=[row, {"name": "ldm-autoencoderkl", "skipped": "ImportError: no"}])
    md = report.to_markdown({**part, "contention": None, "cases": {}})
    assert "With CUDA graphs" in md
    graph_line = next(line for line in md.splitlines() if line.startswith("| mnist-mlp-b1024") and "fused_graph" in line)
    assert "| fused_graph | compile_cudagraphs | 0.67 |" in graph_line
    assert "fused_compile failed: `RuntimeError: boom`" in md and "ldm-autoencoderkl: skipped" in md


# ---- the training-step code the GPU check runs, rehearsed on the CPU --------------------------------------
@pytest.fixture
def short_budget(monkeypatch):
    monkeypatch.setattr(timing, "CONFIG_BUDGET_S", 0.01)  # the fewest timed rounds (3): only the code is checked


def test_training_step_impls_run_on_cpu(short_budget):
    """Every training-step implementation but the compiled ones (the quick run compiles nothing; one compiled
    impl is timed in the test below), on a tiny MLP VAE and a tiny diffusers AutoencoderKL: rows complete."""
    pytest.importorskip("diffusers")
    gen = torch.Generator().manual_seed(0)
    impls = ["fused", "eager", "eager_graph", "fused_graph"]
    rows, note = train_steps.bench_train_step(torch.device("cpu"), 3, True, gen,
                                              configs=["digits", "ldm-autoencoderkl-tiny"], impls=impls)
    assert [r["name"] for r in rows] == ["digits", "ldm-autoencoderkl-tiny"] and "reduce-overhead" in note
    for r in rows:
        assert r["errors"] == {}, r["errors"]
        for impl in train_steps.TRAIN_IMPLS:
            assert (r[f"{impl}_ms"] is not None) == (impl in impls), impl
            if impl in impls:
                assert _is_float(r[f"{impl}_ms"]) and r[f"{impl}_ms"] > 0
        assert r["best_fused"][0] in ("fused", "fused_graph") and r["best_other"][0] in ("eager", "eager_graph")
        assert set(r["elbo_ops_ms"]) == {"fused", "eager"} and all(v > 0 for v in r["elbo_ops_ms"].values())
        assert 0 < r["elbo_share"]["fused"] and 0 < r["elbo_share"]["eager"]
    assert rows[1]["model"].startswith("diffusers AutoencoderKL 3x4x4 -> 4x4x4")


def test_compiled_reduce_overhead_step_runs_on_cpu(short_budget):
    """The reduce-overhead impl (mark_step each step) through torch.compile: on the CPU Inductor makes no CUDA
    graphs, but everything around them runs, and a failing impl is recorded without losing the others."""
    gen = torch.Generator().manual_seed(0)
    rows, _ = train_steps.bench_train_step(torch.device("cpu"), 3, True, gen, configs=["digits"],
                                           impls=["fused", "eager", "fused_compile_cudagraphs"])
    (r,) = rows
    assert r["errors"] == {} and r["fused_compile_cudagraphs_ms"] > 0


def test_failing_impl_is_recorded_and_the_others_timed(monkeypatch, short_budget):
    real = train_steps.train_step_impl

    def failing(cfg, make_loss, impl, device, static_x):
        if impl == "fused_graph":
            raise RuntimeError("capture failed")
        return real(cfg, make_loss, impl, device, static_x)

    monkeypatch.setattr(train_steps, "train_step_impl", failing)
    rows, _ = train_steps.bench_train_step(torch.device("cpu"), 3, True, torch.Generator().manual_seed(0),
                                           configs=["digits"], impls=["fused", "eager", "fused_graph"])
    (r,) = rows
    assert r["errors"] == {"fused_graph": "RuntimeError: capture failed"}
    assert r["fused_graph_ms"] is None and r["fused_ms"] > 0 and r["eager_ms"] > 0


def test_graphed_step_rehearsal_copies_inputs_and_trains():
    """graphed_step off CUDA: the static inputs take each call's input set, and the step trains (the loss of a
    fixed batch goes down over steps, each drawing new samples)."""
    cfg = next(c for c in train_steps.TRAIN_CONFIGS if c.name == "digits")
    dev = torch.device("cpu")
    x = train_steps._train_data(cfg, dev, torch.Generator().manual_seed(0))
    _, make_loss, _ = train_steps._trainee(cfg, dev)
    static = torch.zeros_like(x)
    step = train_steps.train_step_impl(cfg, make_loss, "fused_graph", dev, static)
    losses = [step([x]).item() for _ in range(40)]
    assert torch.equal(static, x)
    assert len(set(losses[:5])) == 5 and sum(losses[-5:]) < sum(losses[:5])


def test_train_flags_are_checked():
    for flags in (["--train-configs", "nope"], ["--train-impls", "fused,nope"], ["--only", "ops,nope"]):
        with pytest.raises(SystemExit) as e:
            cli.main(flags)
        assert e.value.code == 2


def test_train_budget_leaves_out_the_impls_it_has_no_time_for(short_budget):
    rows, _ = train_steps.bench_train_step(torch.device("cpu"), 3, True, torch.Generator().manual_seed(0),
                                           configs=["digits"], impls=["fused", "eager", "fused_graph"], budget_s=0.0)
    (r,) = rows
    assert r["fused_ms"] > 0 and r["eager_ms"] > 0 and r["fused_graph_ms"] is None
    assert r["errors"]["fused_graph"].startswith("not run:")


def test_the_suites_modules_import_one_way():
    """vae_fast/bench/ is split by concern with no import cycle: every import of a sibling module (at any depth,
    lazy ones too) points down one order."""
    import ast
    import pathlib

    import vae_fast.bench

    pkg = pathlib.Path(vae_fast.bench.__file__).parent
    modules = {p.stem: p for p in pkg.glob("*.py")}
    edges = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        edges[name] = deps & set(modules)
    order = []  # a topological order exists iff there is no cycle
    while len(order) < len(edges):
        ready = sorted(n for n in edges if n not in order and edges[n] <= set(order))
        assert ready, f"import cycle among {sorted(set(edges) - set(order))}: {edges}"
        order += ready
    assert not edges["timing"], "timing is the bottom layer: it imports no sibling"
    assert all("cli" not in deps for name, deps in edges.items() if name not in ("__init__", "__main__"))


@pytest.mark.parametrize("argv0, prog", [("/usr/bin/vae-fast", "vae-fast bench"), ("-m", "python -m vae_fast bench")])
def test_bench_names_itself_as_called(argv0, prog, monkeypatch, capsys):
    from vae_fast.train import cli as main_cli

    monkeypatch.setattr(sys, "argv", [argv0])
    assert main_cli.main(["bench", "--repeats", "0"]) == 2
    assert capsys.readouterr().err.startswith(f"{prog}: error: --repeats must be >= 1")
    with pytest.raises(SystemExit):
        main_cli.main(["bench", "--help"])
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")
