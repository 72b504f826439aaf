"""Where a decode call of the paddle runtime spends its time, on a tiny preset (per-call costs show
at their worst there).

```
 decode     runtime.decode at T=1 (the lock-step loop): the whole call, and inside it the decoder
            program's own run vs the rest (inputs to Paddle, missing inputs as zeros, logits to torch)
 step       runtime.run_step at T=1 on the engine's pool (n rows): the whole call
 empty      a one-op static program (x + 1) called the same way: the executor's fixed cost per call
 ops        the decoder program's op count, by op type (the most common ones)
 predictor  the same decoder program saved and run on a `paddle.inference` predictor (IR passes on,
            oneDNN off), on the decode call's own inputs: ms per run and its logits against the program's
 profiler   (--profiler) Paddle's profiler over a few decode calls: the op types taking most time
```

    python bench/paddle_decode_profile.py [--preset minigpt4-tiny] [--batch 1] [--cache 64] [--steps 40] [--profiler]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(os.environ.get("VLMRT_ROOT", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(ROOT))

from vlmrt.models import load_model  # noqa: E402
from vlmrt.profiling import median_ms as _ms  # noqa: E402


def _decode_inputs(rt, b: int, past: int):
    embeds = rt.embed(torch.full((b, 1), 5, dtype=torch.long), None)  # [b,1,D]
    mask = torch.ones(b, past + 1, dtype=torch.long)
    return embeds, torch.full((b, 1), past, dtype=torch.long), mask, torch.tensor([past])


def decode_split(rt, b: int, cache: int, steps: int) -> dict:
    """The whole decode call and the decoder program's share of it."""
    embeds, positions, mask, slots = _decode_inputs(rt, b, cache // 2)
    rt.start(b, cache)
    program, inner = rt.programs["decoder"], []

    def timed(*args):
        t0 = time.perf_counter()
        out = program(*args)
        inner.append((time.perf_counter() - t0) * 1e3)
        return out

    rt.programs["decoder"] = timed
    try:
        whole = _ms(lambda: rt.decode(embeds, positions, mask, slots), steps)
        rt.start(b, cache)
        rt.programs["decoder"] = lambda *args: (ARGS.append(args), program(*args))[1]
        rt.decode(embeds, positions, mask, slots)
    finally:
        rt.programs["decoder"] = program
    return {"decode call ms": whole, "decoder program ms": statistics.median(inner[2:])}


ARGS: list = []  # the decoder program's last inputs (for the predictor)


def predictor_call(rt, steps: int) -> tuple[float, float]:
    """The decoder program on a predictor, on the inputs of the last decode call: (ms, max |logits diff|)."""
    import tempfile

    import paddle

    from vlmrt.runtimes.paddle import _Predictor

    args, program = ARGS[-1], rt.programs["decoder"]
    with tempfile.TemporaryDirectory() as folder:
        paddle.jit.save(program, f"{folder}/decoder")
        predictor = _Predictor(Path(folder), rt.graphs["decoder"], 1)
        ms = _ms(lambda: predictor(*args), steps)
        diff = float((torch.from_dlpack(predictor(*args)[0]) - torch.from_dlpack(program(*args)[0])).abs().max())
    return ms, diff


def engine_step(rt, n: int, cache: int, steps: int) -> float:
    from vlmrt.engine import StepInputs

    embeds, positions, mask, _ = _decode_inputs(rt, n, cache // 2)
    rt.allocate_slots(n, cache)
    mask = torch.nn.functional.pad(mask, (0, cache + 1 - mask.shape[1]))
    step = StepInputs(0, n, embeds, positions, torch.full((n, 1), cache // 2), mask, None, {}, cache // 2 + 1)
    with torch.inference_mode():
        return _ms(lambda: rt.run_step(step), steps)


def empty_program(steps: int) -> float:
    import paddle

    class One(paddle.nn.Layer):
        def forward(self, x):
            return x + 1

    static = paddle.jit.to_static(One(), input_spec=[paddle.static.InputSpec([None, 8], "float32", "x")],
                                  full_graph=True)
    x = paddle.ones([1, 8])
    return _ms(lambda: static(x), steps)


def op_counts(rt) -> tuple[int, list]:
    program = rt.programs["decoder"].forward.concrete_program.main_program
    names = collections.Counter(op.name() for op in program.global_block().ops)
    return sum(names.values()), names.most_common(12)


def profile_ops(rt, b: int, cache: int, calls: int = 10) -> None:
    import paddle.profiler as profiler

    embeds, positions, mask, slots = _decode_inputs(rt, b, cache // 2)
    rt.start(b, cache)
    rt.decode(embeds, positions, mask, slots)
    with profiler.Profiler(targets=[profiler.ProfilerTarget.CPU]) as prof:
        for _ in range(calls):
            rt.decode(embeds, positions, mask, slots)
            prof.step()
    prof.summary(sorted_by=profiler.SortedKeys.CPUTotal, op_detail=False, thread_sep=False, time_unit="ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="minigpt4-tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache", type=int, default=64, help="cache slots per row")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profiler", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from vlmrt.runtimes.paddle import PaddleRuntime

    t0 = time.perf_counter()
    rt = PaddleRuntime(load_model(args.preset), threads=1)
    print(f"{args.preset}: load + lowering {time.perf_counter() - t0:.1f} s; {rt.kind}")
    for k, v in decode_split(rt, args.batch, args.cache, args.steps).items():
        print(f"batch {args.batch}, cache {args.cache}: {k} {v:.2f}")
    print(f"engine step, {args.batch} rows: {engine_step(rt, args.batch, args.cache, args.steps):.2f} ms")
    print(f"one-op static program: {empty_program(args.steps):.3f} ms per call")
    try:
        total, common = op_counts(rt)
        print(f"decoder program: {total} ops; most common: {common}")
    except AttributeError as e:  # a predictor: no program object to read
        print(f"decoder program: op count not readable ({e})")
    ms, diff = predictor_call(rt, args.steps)
    print(f"decoder on a paddle.inference predictor: {ms:.2f} ms per run (logits max |diff| {diff:.2e})")
    if args.profiler:
        profile_ops(rt, args.batch, args.cache)


if __name__ == "__main__":
    main()
