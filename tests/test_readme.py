"""The README's benchmark tables say what the committed results say: every number in them equals the
JSON the README links to (at the digits printed), row by row, for whatever columns the tables have."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

# README column header (lower case) -> how to read that value from a JSON row.
def _gbps(key):
    return lambda r: None if r.get(key) is None else r["bytes"] / (r[key] * 1e6)


def _ratio(a, b):
    return lambda r: None if r.get(a) is None or not r.get(b) else r[a] / r[b]


NUMERIC_COLUMNS = {
    "fused": lambda r: r["fused_ms"],
    "fused ms": lambda r: r["fused_ms"],
    "eager": lambda r: r["eager_ms"],
    "eager ms": lambda r: r["eager_ms"],
    "torch.compile": lambda r: r["compile_ms"],
    "compile": lambda r: r["compile_ms"],
    "compile ms": lambda r: r["compile_ms"],
    "fused us": lambda r: r["fused_ms"] * 1e3,
    "eager us": lambda r: r["eager_ms"] * 1e3,
    "compile us": lambda r: None if r["compile_ms"] is None else r["compile_ms"] * 1e3,
    "fused+compile ms": lambda r: r["fused_compile_ms"],
    "fused gb/s": lambda r: r["fused_gbps"],
    "eager gb/s": _gbps("eager_ms"),
    "compile gb/s": _gbps("compile_ms"),
    "of copy": lambda r: r["copy_fraction"],
    "copy": lambda r: r["copy_fraction"],
    "elbo ops ms fused": lambda r: r["elbo_ops_ms"]["fused"],
    "elbo ops ms eager": lambda r: r["elbo_ops_ms"]["eager"],
    "elbo share fused": lambda r: r["elbo_share"]["fused"],
    "elbo share eager": lambda r: r["elbo_share"]["eager"],
    "profiler share fused": lambda r: (r.get("elbo_share_profiler") or {}).get("fused"),
    "profiler share eager": lambda r: (r.get("elbo_share_profiler") or {}).get("eager"),
    "fused/eager": _ratio("fused_ms", "eager_ms"),
    "fused/compile": _ratio("fused_ms", "compile_ms"),
    "eager/fused": _ratio("eager_ms", "fused_ms"),
    "compile/fused": _ratio("compile_ms", "fused_ms"),
    "speedup vs eager": _ratio("eager_ms", "fused_ms"),
    "speedup vs compile": _ratio("compile_ms", "fused_ms"),
}
TEXT_COLUMNS = {"op", "pass", "dtype", "shape", "config", "batch"}
NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")
DTYPES = ("float32", "float64", "bfloat16", "float16")


def benchmarks_section() -> str:
    text = README.read_text()
    match = re.search(r"^## Benchmarks\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Benchmarks' section"
    return match.group(1)


def results_json() -> tuple[Path, dict]:
    """The one results file the README links to (its .md, .json or .png; the JSON sits beside them)."""
    stems = {re.sub(r"\.(md|json|png)$", "", m) for m in
             re.findall(r"\((benchmarks/results/[^)\s]+\.(?:md|json|png))\)", README.read_text())}
    assert len(stems) == 1, f"README.md should link exactly one benchmark result, found {sorted(stems)}"
    path = REPO / (stems.pop() + ".json")
    assert path.exists(), f"README.md links {path.relative_to(REPO)}'s results, but that JSON is not committed"
    return path, json.loads(path.read_text())


def tables(section: str):
    """(caption, header, rows) of every Markdown table; the caption is the paragraph just above it."""
    out, lines = [], section.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$", lines[i + 1]):
            # Cells without Markdown emphasis or code marks: `op`, **1.48** read as op, 1.48.
            cells = lambda line: [c.strip().strip("`*_").strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
            header = [c.lower() for c in cells(lines[i])]
            j = i + 2
            rows = []
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(cells(lines[j]))
                j += 1
            end = i
            while end > 0 and not lines[end - 1].strip():
                end -= 1
            k = end
            while k > 0 and lines[k - 1].strip():
                k -= 1
            out.append((" ".join(lines[k:end]), header, rows))
            i = j
        else:
            i += 1
    return out


def printed_equals(printed: str, value) -> bool:
    """The printed number is the value rounded to the printed digits (or '-' for a missing value)."""
    if printed in ("-", "n/a", ""):
        return value is None
    if value is None or not NUMBER.match(printed.rstrip("x")):
        return False
    printed = printed.rstrip("x")
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return f"{value:.{decimals}f}" == printed or math.isclose(float(f"{value:.{decimals}f}"), float(printed))


def label_shape(label: str, caption: str):
    """The shape a row is about: a tuple in its own label (e.g. 'mean (8, 512, 1024)'), else the caption's
    'B=..., D=...'; None when neither says."""
    m = re.search(r"\((\d+(?:,\s*\d+)+)\)", label)
    if m:
        return [int(s) for s in m.group(1).split(",")]
    b, d = re.search(r"\bB\s*=\s*(\d+)", caption), re.search(r"\bD\s*=\s*(\d+)", caption)
    return [int(b.group(1)), int(d.group(1))] if b and d else None


def check_table(caption, header, rows, result) -> list[str]:
    """The rows of one table that do not match the JSON, each with what the JSON has."""
    unknown = [h for h in header if h not in NUMERIC_COLUMNS and h not in TEXT_COLUMNS]
    assert not unknown, f"README benchmark table has columns this test cannot check against the JSON: {unknown}"
    train = "config" in header
    json_rows = result["train_step"] if train else result["rows"] + result.get("per_call", [])
    caption_dtype = next((d for d in DTYPES if re.search(rf"\b{d}\b", caption)), None)
    problems = []
    for row in rows:
        cell = dict(zip(header, row))
        if train:
            candidates = [r for r in json_rows if r["name"] == cell["config"]]
        else:
            label = cell["op"]
            op = re.match(r"[A-Za-z_]*", label).group(0)
            shape = [int(s) for s in cell["shape"].split("x")] if "shape" in cell else label_shape(label, caption)
            dtype = cell.get("dtype", caption_dtype)
            candidates = [r for r in json_rows if r["op"].startswith(op)
                          and ("pass" not in cell or r["pass"] == cell["pass"])
                          and (dtype is None or r["dtype"] == dtype)
                          and (shape is None or list(r["shape"]) == shape)]
        if not candidates:
            problems.append(f"{row}: no such row in the results JSON")
            continue
        numeric = [h for h in header if h in NUMERIC_COLUMNS]
        matches = [r for r in candidates if all(printed_equals(cell[h], NUMERIC_COLUMNS[h](r)) for h in numeric)]
        if not matches:
            problems.append(f"{row}: the JSON has " + " or ".join(
                str({h: round(NUMERIC_COLUMNS[h](r), 4) for h in numeric}) for r in candidates))
    return problems


def test_readme_benchmark_tables_match_the_committed_json():
    path, result = results_json()
    found = tables(benchmarks_section())
    assert found, "README.md's Benchmarks section has no table"
    problems = []
    for caption, header, rows in found:
        if "op" not in header and "config" not in header:
            pytest.fail(f"README benchmark table with header {header} is neither an op table nor a training-step one")
        problems += check_table(caption, header, rows, result)
    assert not problems, f"README rows that differ from {path.relative_to(REPO)}:\n" + "\n".join(problems)


def test_readme_copy_bandwidth_and_machine_match_the_json():
    _, result = results_json()
    section = benchmarks_section()
    for printed in re.findall(r"copy bandwidth[^.|]*?(\d+(?:\.\d+)?) GB/s", section):
        assert printed_equals(printed, result["copy_gbps"]), (printed, result["copy_gbps"])
    for m in re.finditer(r"torch (\d+\.\d+\.\d+)", section):
        assert result["torch"].startswith(m.group(1))
    for m in re.finditer(r"(\d+) cores", section):
        assert int(m.group(1)) == result["threads"], (m.group(0), result["threads"])
