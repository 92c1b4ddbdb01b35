"""Timing and memory: percentiles, interleaved timing of several implementations, the peak memory of one call, the
device's copy and write bandwidth. How they are used is the method in ``report.py``'s docstring."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Callable

import torch

MIN_SAMPLE_S = 2e-3  # a CPU sample repeats the call until it lasts at least this long
CONFIG_BUDGET_S = 2.0  # rough time one config's timed rounds may take (CPU)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(samples, dtype=torch.float64)
    p20, p50, p80 = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return p20, p50, p80


def time_interleaved(calls: dict[str, Callable], sets: list, repeats: int, device: torch.device,
                     budget_s: float | None = None) -> dict[str, list[float]]:
    """Per implementation, `repeats` samples in milliseconds (fewer for slow calls, at least 3); the timed rounds
    take about ``budget_s`` (default CONFIG_BUDGET_S)."""
    if budget_s is None:
        budget_s = CONFIG_BUDGET_S
    names = list(calls)
    est = {}
    for name in names:  # warm-up (compiles the compiled one), then one timed call as an estimate
        calls[name](sets[0])
        sync(device)
        t0 = time.perf_counter()
        calls[name](sets[0])
        sync(device)
        est[name] = max(time.perf_counter() - t0, 1e-7)
    inner = {n: max(1, math.ceil(MIN_SAMPLE_S / est[n])) for n in names}
    if device.type == "cuda":
        inner = {n: max(inner[n], len(sets)) for n in names}
    round_s = sum(est[n] * inner[n] for n in names)
    repeats = max(min(repeats, 3), min(repeats, int(budget_s / round_s)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, k = calls[name], inner[name]
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(k):
                    fn(sets[i % len(sets)])
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / k)
            else:
                t0 = time.perf_counter()
                for _ in range(k):
                    fn(sets[0])
                samples[name].append((time.perf_counter() - t0) * 1e3 / k)
    return samples


def peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory (MiB) the call allocates above what was live before it; see the method (report.py)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak / 2**20
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak / 2**20


@contextlib.contextmanager
def stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side logs two lines per start/stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def copy_gbps(device: torch.device, repeats: int = 7) -> float:
    """Bytes read plus written per second by dst.copy_(src) on 64M float32 (256 MiB each)."""
    src = torch.ones(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    samples = time_interleaved({"copy": lambda s: dst.copy_(src)}, [[src]], repeats, device, budget_s=1e9)["copy"]
    ms = percentiles(samples)[1]
    return 2 * nbytes(src) / (ms * 1e6)


def write_gbps(device: torch.device, numel: int = 16 * 2**20, repeats: int = 7) -> dict:
    """Write bandwidth into an existing 64 MiB float32 tensor and into a freshly allocated one."""
    dst = torch.empty(numel, device=device)
    calls = {"existing": lambda s: dst.fill_(1.0), "fresh": lambda s: torch.empty(numel, device=device).fill_(1.0)}
    samples = time_interleaved(calls, [[dst]], repeats, device, budget_s=1e9)
    gbps = {name: nbytes(dst) / (percentiles(v)[1] * 1e6) for name, v in samples.items()}
    return {"tensor_mb": nbytes(dst) / 2**20, "existing_gbps": gbps["existing"], "fresh_alloc_gbps": gbps["fresh"]}
