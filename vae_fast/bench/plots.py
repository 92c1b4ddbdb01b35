"""The results' PNG: effective bandwidth (minimal bytes over time) of each implementation against the elements,
per op and pass, with the copy bandwidth as the ceiling."""

from __future__ import annotations

import io
import math

from .cases import PASSES


def plot_png(result: dict) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dtypes = [r["dtype"] for r in result["rows"]]
    dtype = "float32" if "float32" in dtypes else (dtypes[0] if dtypes else None)
    ops = list(dict.fromkeys(r["op"] for r in result["rows"]))
    if dtype is None or not ops:
        return None
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 2.8 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, pass_ in enumerate(PASSES):
            ax = axes[i][j]
            rows = [r for r in result["rows"] if r["op"] == op and r["pass"] == pass_ and r["dtype"] == dtype]
            rows.sort(key=lambda r: math.prod(r["shape"]))
            n = [math.prod(r["shape"]) for r in rows]
            for impl, style in (("fused", "o-"), ("eager", "s--"), ("compile", "^:")):
                pts = [(x, r["bytes"] / (r[f"{impl}_ms"] * 1e6)) for x, r in zip(n, rows)
                       if r[f"{impl}_ms"] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, label=impl)
            ax.axhline(result["copy_gbps"], color="k", lw=1, label="copy")
            ax.set_xscale("log")
            ax.set_title(f"{op} {dtype} {pass_}", fontsize=9)
            ax.set_xlabel("elements")
            ax.set_ylabel("GB/s (minimal bytes)")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"{result['device']}, {result['date']}: effective bandwidth (copy = ceiling)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
