"""Every Python code block of README.md runs as written.

The rule: a block fenced as ```python is a program a reader may paste, so it runs here, on its own (a fresh
namespace, nothing from the blocks before it), in a scratch working directory (what it writes, such as a run
folder, lands there). Blocks fenced otherwise are not run: ```bash (shell commands), ```toml (config files),
```pycon (an interactive session with its output, `>>>` prompts), ``` (plain text). So a Python snippet
that cannot run as it stands must not be fenced as ```python.

All blocks run in one subprocess (the imports are paid once; a block that patches a library, as the
diffusers one does, cannot leak into the other tests), each exec'd in a fresh namespace.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import vae_fast

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```(\S*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

RUNNER = """
import json, sys, traceback
blocks = json.load(sys.stdin)
for block in blocks:
    print(f"README.md line {block['line']}", file=sys.stderr, flush=True)
    try:
        exec(compile(block["code"], f"README.md:{block['line']}", "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the block at README.md line {block['line']}", file=sys.stderr, flush=True)
        sys.exit(1)
print(f"ran {len(blocks)} blocks", flush=True)
"""


def python_blocks() -> list[dict]:
    """``{"line", "code"}`` of every ```python block, line: that of its opening fence."""
    text = README.read_text()
    return [{"line": text.count("\n", 0, m.start()) + 1, "code": m.group(2)}
            for m in FENCE.finditer(text) if m.group(1) == "python"]


def test_the_rule_finds_the_readme_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 5, blocks  # the ops, the VAE, training from Python, the posterior, DReG
    for block in blocks:
        assert ">>> " not in block["code"], f"README.md line {block['line']}: a session transcript is ```pycon"
    fences = re.findall(r"^```(\S*)", README.read_text(), re.M)
    assert len(fences) % 2 == 0, "an unclosed code fence in README.md"


def test_every_python_block_runs_as_written(tmp_path):
    blocks = python_blocks()
    if importlib.util.find_spec("diffusers") is None:  # an optional test extra: its block needs it
        blocks = [b for b in blocks if "diffusers" not in b["code"]]
    env = {**os.environ, "PYTHONPATH": str(Path(vae_fast.__file__).resolve().parent.parent),
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"ran {len(blocks)} blocks" in proc.stdout
    # What the training block wrote landed in the scratch folder, not in the repository.
    assert (tmp_path / "runs" / "digits-2d" / "checkpoint.pt").is_file()
