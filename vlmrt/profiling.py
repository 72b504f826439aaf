"""Where a decode step's time goes: device work vs host gaps vs syncs (`vlmrt bench --profile`).

A runner's `generate(batch, n)` runs under `torch.profiler` twice, for 2 new tokens (vision, prefill,
the first token and one decode step) and for N; the difference is N-2 decode steps, so no marker
inside the loop is needed and every runner (vlmrt's runtimes, transformers' generate) is measured
the same way.

```
 generate(batch, 2) ─► profile A ─┐
 generate(batch, N) ─► profile B ─┴─► (B - A) / (N - 2) per decode step:
      wall ms        the host clock around each call
      busy ms        CUDA: kernel + copy time on the GPU; CPU: time inside ATen ops
      gap ms         wall - busy: kernel launches, Python, framework overhead (what CUDA graphs remove)
      syncs          host waits for the device (cuda*Synchronize, .item()); copies: cudaMemcpy*
 top ops of B by device time (CUDA) or self CPU time; B's Chrome trace (open in Perfetto)
```
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from vlmrt.errors import VlmrtError

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "aten::_local_scalar_dense")  # the last: .item() / a tensor's value read by Python
COPY_EVENTS = ("cudaMemcpy",)  # host<->device copies (cudaMemcpy, cudaMemcpyAsync): some block
TOP_OPS = 8


def median_ms(fn, steps: int, warmup: int = 2) -> float:
    """Median wall time in ms of `steps` calls of fn(), after `warmup` discarded calls (host-side
    timing: fn must return only when its work is done, as a framework call that hands back a result)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_generation(runner, batch: dict, new_tokens: int, device: torch.device,
                       trace: Path | None = None) -> dict:
    """Per-decode-step figures of `runner.generate(batch, new_tokens)` (see the module docstring).

    Returns: {"steps", "wall_ms", "busy_ms", "gap_ms", "busy_share", "syncs", "copies", "busy_kind",
    "top_ops", "trace"}; per-step values are means over the last N-2 decode steps.
    """
    if new_tokens < 3:
        raise VlmrtError(f"profiling needs --max-new-tokens of at least 3 (2 are the baseline pass), got {new_tokens}")
    runner.generate(batch, 2)  # unprofiled: a runtime may compile the shorter request's shapes first
    first = _profiled(runner, batch, 2, device, None)
    full = _profiled(runner, batch, new_tokens, device, trace)
    steps = new_tokens - 2
    wall = (full["wall_ms"] - first["wall_ms"]) / steps
    busy = max(full["busy_ms"] - first["busy_ms"], 0.0) / steps
    return {
        "steps": steps, "wall_ms": wall, "busy_ms": busy, "gap_ms": max(wall - busy, 0.0),
        "busy_share": busy / wall if wall > 0 else None, "syncs": (full["syncs"] - first["syncs"]) / steps,
        "copies": (full["copies"] - first["copies"]) / steps,
        "busy_kind": "cuda kernels" if device.type == "cuda" else "cpu aten ops",
        "top_ops": full["top_ops"], "trace": str(trace) if trace else None,
    }


def _profiled(runner, batch: dict, new_tokens: int, device: torch.device, trace: Path | None) -> dict:
    """One profiled `runner.generate`: wall ms, busy ms, sync count, top ops; writes the trace."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        runner.generate(batch, new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return {"wall_ms": wall_ms, **summarize(prof.events(), on_cuda=device.type == "cuda")}


def summarize(events, on_cuda: bool) -> dict:
    """Busy time (ms), sync count and the top ops of a profiler's events.

    CUDA: busy = the sum of device-side events (kernels, copies, memsets); ops ranked by it.
    CPU: busy = the self time of ATen ops (the compute; the rest is Python and framework).
    """
    busy_us, syncs, copies, per_op, calls = 0.0, 0, 0, Counter(), Counter()
    for e in events:
        syncs += e.name.startswith(SYNC_EVENTS)
        copies += e.name.startswith(COPY_EVENTS)
        if on_cuda and e.device_type == DeviceType.CUDA:
            us = e.time_range.elapsed_us()
        elif not on_cuda and e.device_type == DeviceType.CPU and e.name.startswith("aten::") and not e.is_async:
            us = e.self_cpu_time_total
        else:
            continue
        busy_us += us
        per_op[e.name] += us
        calls[e.name] += 1
    total = busy_us or 1.0
    top = [{"op": name, "calls": calls[name], "ms": us / 1e3, "share": us / total}
           for name, us in per_op.most_common(TOP_OPS)]
    return {"busy_ms": busy_us / 1e3, "syncs": syncs, "copies": copies, "top_ops": top}


def format_profile(rows: list[dict]) -> str:
    """Bench rows with a `profile` entry -> a Markdown table per decode step, plus each row's top op."""
    lines = ["| runtime | batch | wall ms/step | busy ms/step | gap ms/step | busy share | syncs/step | copies/step "
             "| top op (share of busy) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("profile")
        if not p:
            continue
        top = p["top_ops"][0] if p["top_ops"] else None
        top_text = f"{top['op'][:48]} ({100 * top['share']:.0f}%)" if top else "-"
        share = "-" if p["busy_share"] is None else f"{100 * p['busy_share']:.0f}%"
        lines.append(f"| {r['runtime']} | {r['batch']} | {p['wall_ms']:.2f} | {p['busy_ms']:.2f} | {p['gap_ms']:.2f} "
                     f"| {share} | {p['syncs']:.1f} | {p['copies']:.1f} | {top_text} |")
    return "\n".join(lines)
