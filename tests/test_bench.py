"""The benchmark suite: `--quick` writes a complete JSON (DESIGN.md section 5's schema), Markdown and PNG.

Checks shapes and types of the results, and the byte formulas; never timings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from vae_fast import bench

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
    files = sorted(os.listdir(out))
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 1, files
    with open(out / jsons[0]) as f:
        return out, files, jsons[0], json.load(f)


def test_files_named_and_complete(quick_run):
    out, files, name, result = quick_run
    stem = name[: -len(".json")]
    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d{4}-\d{2}-\d{2}", stem), stem
    assert stem.endswith(result["date"])
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
    for op in bench.OPS:
        for dtype in ("float32", "float64", "bfloat16"):
            for pass_ in bench.PASSES:
                assert (op, dtype, pass_) in combos
    assert any(r["compile_ms"] is not None for r in rows), "quick mode compiles one config"


def test_model_lines(quick_run):
    result = quick_run[3]
    assert isinstance(result["train_step"], list) and result["train_step"]
    for r in result["train_step"]:
        assert _is_float(r["fused_ms"]) and _is_float(r["eager_ms"])
    ll = result["log_likelihood"]
    assert _is_float(ll["peak_mb"]) and _is_int(ll["num_samples"])


# ---- byte formulas (DESIGN.md: each input read once, each output written once, backward only what it needs) ----
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
        case = bench.make_case(op, b, d, dtype, torch.device("cpu"), gen)
        assert case.bytes("fwd") == fwd, op
        assert case.bytes("fwd+bwd") == total, op
    k, bb = bench.BCAST_K, b // bench.BCAST_K
    case = bench.make_case("gaussian_log_prob_bcast", b, d, dtype, torch.device("cpu"), gen)
    assert case.shape == [k, bb, d]
    fwd = (k * bb * d + bb * d + 1) * s + k * bb * so
    assert case.bytes("fwd") == fwd
    assert case.bytes("fwd+bwd") == fwd + k * bb * so + (k * bb * d + bb * d + 1) * s + (k * bb * d + 1) * s


def test_bad_arguments_exit_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--sizes", "12by3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.main(["--ops", "gaussian_kl,nope"])
    assert e.value.code == 2
    assert bench.main(["--repeats", "0"]) == 2
