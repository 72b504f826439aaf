"""Where a decode call of the mindspore runtime spends its time, on a tiny preset (per-kernel costs
show at their worst there).

```
 decode     runtime.decode at T=1 (the lock-step loop): the whole call, and inside it the decoder
            graph's own run vs the rest (inputs to MindSpore, missing inputs as zeros, logits to torch)
 kernels    the decoder source's kernel lines (calls of ops./vops.), by call (the most common ones)
 profiler   (--profiler) MindSpore's profiler over a few decode graph runs: kernel time per run by op
            type (the rest of a run is the runtime's own: launch, shape inference, memory)
 shapes     (--shapes) the same decoder source as Cells of fewer dynamic dims, on the decode call's own
            inputs: batch and sequence static (the cache dim dynamic), and every dim static (MindSpore
            then compiles per input shape): ms per run, compile s, logits against the dynamic graph's
```

    python bench/mindspore_decode_profile.py [--preset slimm-tiny] [--batch 1] [--cache 64] [--steps 30]
        [--shapes] [--profiler] [--jit-level O0|O1] [--dispatch-threads N]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(os.environ.get("VLMRT_ROOT", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(ROOT))

from vlmrt.models import load_model  # noqa: E402
from vlmrt.profiling import median_ms as _ms  # noqa: E402


def decode_split(rt, b: int, cache: int, steps: int) -> tuple[dict, tuple]:
    """The whole decode call, the decoder graph's share of it, and the graph's last inputs."""
    from vlmrt.generate import split_embedded

    past = cache // 2
    embeds = split_embedded(rt.embed(torch.full((b, 1), 5, dtype=torch.long), None))[0]  # [b,1,D]
    positions, mask, slots = torch.full((b, 1), past), torch.ones(b, past + 1, dtype=torch.long), torch.tensor([past])
    graph, inner, args = rt.programs["decoder"], [], []

    def timed(*a):
        t0 = time.perf_counter()
        out = graph(*a)
        out[0].asnumpy()  # the logits read back (as the runtime's copy to torch does)
        inner.append((time.perf_counter() - t0) * 1e3)
        args[:] = a
        return out

    rt.start(b, cache)
    rt.programs["decoder"] = timed
    try:
        whole = _ms(lambda: rt.decode(embeds, positions, mask, slots), steps)
    finally:
        rt.programs["decoder"] = graph
    return {"decode call ms": whole, "decoder graph ms": statistics.median(inner[2:])}, tuple(args)


def kernel_lines(source: str) -> tuple[int, list]:
    calls = collections.Counter(re.findall(r"= \(?((?:v?ops)\.\w+)\(", source))
    return sum(calls.values()), calls.most_common(8)


def fewer_dynamic_dims(rt, args: tuple, steps: int) -> None:
    """The decoder source as Cells with batch and sequence static, then every dim static."""
    import mindspore as ms

    from vlmrt.runtimes.mindspore import to_torch

    graph = rt.programs["decoder"]
    module = sys.modules[type(graph).__module__]
    reference = to_torch(graph(*args)[0])
    names = [t.name for t in rt.graphs["decoder"].inputs]
    for label, dynamic in [("batch, sequence static; cache dim dynamic", True), ("every dim static", False)]:
        cell = module.Graph()
        for p in graph.get_parameters():
            setattr(cell, p.name, ms.Parameter(p.value().copy(), name=p.name, requires_grad=False))
        cell.set_train(False)
        if dynamic:
            cache = {n for n, t in zip(names, rt.graphs["decoder"].inputs) if "cache_sequence" in t.shape}
            cell.set_inputs(*[ms.Tensor(shape=[None if n in cache and i == 2 else d for i, d in enumerate(a.shape)],
                                        dtype=a.dtype) for n, a in zip(names, args)])
        t0 = time.perf_counter()
        diff = float((to_torch(cell(*args)[0]) - reference).abs().max())
        compile_s = time.perf_counter() - t0
        run = _ms(lambda: cell(*args)[0].asnumpy(), steps)
        print(f"decoder, {label}: {run:.2f} ms per run, compile {compile_s:.1f} s, logits max |diff| {diff:.2e}")


def profile_kernels(graph, args: tuple, runs: int = 5) -> None:
    """Kernel ms per decoder run by op type, from MindSpore's profiler (its CPU op summary)."""
    import csv
    import tempfile

    import mindspore as ms

    with tempfile.TemporaryDirectory() as folder:
        prof = ms.Profiler(output_path=folder)
        for _ in range(runs):
            graph(*args)[0].asnumpy()
        prof.analyse()
        with open(next(Path(folder).rglob("cpu_op_type_info_0.csv"))) as f:
            rows = list(csv.DictReader(f))
    per_run = {r["op_type"]: float(r["total_compute_time"]) / runs for r in rows}
    top = sorted(per_run.items(), key=lambda kv: -kv[1])[:6]
    print(f"decoder kernels (profiler, {runs} runs): {sum(per_run.values()):.2f} ms per run; "
          + ", ".join(f"{k} {v:.2f}" for k, v in top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="slimm-tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache", type=int, default=64, help="cache slots per row (rounded up to 128)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shapes", action="store_true")
    ap.add_argument("--profiler", action="store_true")
    ap.add_argument("--jit-level", choices=["O0", "O1"], help="MindSpore's jit_level (default: its own)")
    ap.add_argument("--dispatch-threads", type=int, help="MindSpore's runtime dispatch threads (default: its own)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from vlmrt.runtimes.mindspore import MindSporeRuntime, import_mindspore

    ms = import_mindspore()
    if args.jit_level:
        ms.set_context(jit_config={"jit_level": args.jit_level})
    if args.dispatch_threads:
        ms.runtime.dispatch_threads_num(args.dispatch_threads)

    t0 = time.perf_counter()
    rt = MindSporeRuntime(load_model(args.preset), threads=1)
    print(f"{args.preset}: load + lowering {time.perf_counter() - t0:.1f} s; {rt.kind}")
    split, graph_args = decode_split(rt, args.batch, args.cache, args.steps)
    for k, v in split.items():
        print(f"batch {args.batch}, cache {args.cache}: {k} {v:.2f}")
    total, common = kernel_lines(Path(rt._sources.name, "decoder.py").read_text())
    print(f"decoder source: {total} kernel lines; most common: {common}")
    if args.profiler:
        profile_kernels(rt.programs["decoder"], graph_args)
    if args.shapes:
        fewer_dynamic_dims(rt, graph_args, args.steps)


if __name__ == "__main__":
    main()
