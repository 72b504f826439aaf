"""`vlmrt bench --scenario serve`: load on the engine vs the request-at-a-time path, in one run.

Requests with mixed prompt and answer lengths arrive at a fixed concurrency (C clients, each sends
its next request when its previous one finished) or as a Poisson process (rate R per second). The
same requests, in the same order, run twice on the same model and runtime:

```
 requests (seeded: prompt words, answer tokens) ──┬─► engine: add on arrival, step() in a loop
                                                  │     (continuous batching over the slot pool)
                                                  └─► one at a time: a FIFO queue, generate() per
                                                        request (what a loop over Pipeline calls did)
 per request: arrival ─► first token (TTFT) ─► tokens (inter-token gaps) ─► finish (latency)
 ─► throughput (tokens/s), TTFT / inter-token / latency p50 and p99, per path; the ratio
 plus a probe: a 16-token request arriving behind a 300-token one, vs its latency alone
```

Arrival times are virtual for the one-at-a-time path (its clock runs only while it works), so both
paths see the same schedule whatever the machine does in between. Stops are off: every request
generates exactly its answer length.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlmrt.engine import Engine, EngineOptions, Request
from vlmrt.errors import VlmrtError
from vlmrt.generate import generate

IMAGE = Path(__file__).resolve().parent / "assets" / "astronaut.jpg"
ANSWERS = (16, 32, 64, 128, 300)  # answer lengths drawn per request
WORDS = "describe the colours shapes people objects light and mood of this picture in detail".split()


@dataclass(frozen=True)
class ServeBenchConfig:
    """The load: how many requests, how they arrive, the engine's size."""

    model: str
    out: str | None = None
    requests: int = 64
    concurrency: int = 32  # fixed-concurrency clients (used when rate is None)
    rate: float | None = None  # Poisson arrivals per second instead of fixed concurrency
    runtime: str = "eager"
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    kv_cache_gib: float | None = None
    baseline: bool = True  # also run the request-at-a-time path
    answers: tuple[int, ...] = ANSWERS  # answer lengths drawn per request
    probe: bool = True  # also time a 16-token request behind a 300-token one


def make_requests(cfg: ServeBenchConfig, pipe) -> list[Request]:
    rng = random.Random(cfg.seed)
    reqs = []
    for _ in range(cfg.requests):
        prompt = "Please " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) + "."
        n = rng.choice(cfg.answers)
        reqs.append(Request(prompt, IMAGE, pipe.generation_config(max_new_tokens=n, stop_strings=(), stop_token_ids=())))
    return reqs


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": 0.0, "p99": 0.0}
    xs = sorted(xs)
    return {"p50": statistics.median(xs), "p99": xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]}


def _summary(records: list[dict], wall_s: float) -> dict:
    tokens = sum(r["tokens"] for r in records)
    gaps = [g for r in records for g in r["gaps_ms"]]
    return {"requests": len(records), "tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s,
            "ttft_ms": percentiles([r["ttft_ms"] for r in records]), "inter_token_ms": percentiles(gaps),
            "latency_ms": percentiles([r["latency_ms"] for r in records])}


def run_engine(engine: Engine, reqs: list[Request], cfg: ServeBenchConfig) -> dict:
    """Serve `reqs` on the engine under the configured arrivals; one record per request."""
    arrivals = _poisson(cfg) if cfg.rate else None
    start, queue, records, live = time.perf_counter(), list(range(len(reqs))), {}, {}
    clients = 0
    while queue or engine.has_work():
        now = time.perf_counter() - start
        while queue and (arrivals[queue[0]] <= now if arrivals else clients < cfg.concurrency):
            i = queue.pop(0)
            live[engine.add(reqs[i])] = {"arrival": arrivals[i] if arrivals else now, "times": []}
            clients += 1
        if not engine.has_work():
            time.sleep(max(0.0, arrivals[queue[0]] - now))
            continue
        for ev in engine.step():
            rec = live[ev.request_id]
            t = ev.time - start
            rec["times"] += [t] * len(ev.token_ids)
            if ev.finished:
                records[ev.request_id] = _record(rec["arrival"], rec["times"], t)
                clients -= 1
    return _summary(list(records.values()), time.perf_counter() - start)


def run_one_at_a_time(pipe, reqs: list[Request], cfg: ServeBenchConfig) -> dict:
    """The same requests through generate() one at a time (FIFO), on a virtual clock that runs while
    it works; inter-token gaps are the request's mean decode time per token."""
    arrivals = _poisson(cfg) if cfg.rate else None
    clock, records, done = 0.0, [], []
    for i, req in enumerate(reqs):
        if arrivals:
            arrival = arrivals[i]
        else:  # client i % C sends its next request when its previous one finished
            arrival = done[i - cfg.concurrency] if i >= cfg.concurrency else 0.0
        clock = max(clock, arrival)
        t0 = time.perf_counter()
        batch = pipe.processor([req.image], [req.prompt])  # counted: the engine's add() runs the processor too
        t1 = time.perf_counter()
        out = generate(pipe.runtime, batch, req.config, pipe.loaded.tokenizer)
        took = time.perf_counter() - t0
        n = len(out.token_ids[0])
        first = clock + (t1 - t0) + out.timings["ttft_ms"] / 1e3
        gap = out.timings["ms_per_token"] / 1e3
        times = [first + k * gap for k in range(n)]
        clock += took
        done.append(clock)
        records.append(_record(arrival, times, clock))
    return _summary(records, clock)


def _record(arrival: float, times: list[float], finish: float) -> dict:
    return {"tokens": len(times), "ttft_ms": (times[0] - arrival) * 1e3 if times else 0.0,
            "gaps_ms": [(b - a) * 1e3 for a, b in zip(times, times[1:])], "latency_ms": (finish - arrival) * 1e3}


def _poisson(cfg: ServeBenchConfig) -> list[float]:
    rng, t, out = random.Random(cfg.seed + 1), 0.0, []
    for _ in range(cfg.requests):
        t += rng.expovariate(cfg.rate)
        out.append(t)
    return out


def probe_short_behind_long(engine: Engine, pipe) -> dict:
    """A 16-token request alone, then arriving 4 steps after a 300-token one started (engine);
    one-at-a-time it waits for the long one to finish."""
    cfg = lambda n: pipe.generation_config(max_new_tokens=n, stop_strings=(), stop_token_ids=())
    short, long = Request("What is in the picture?", IMAGE, cfg(16)), Request("Describe this image.", IMAGE, cfg(300))
    t0 = time.perf_counter()
    engine.run([short])
    alone = time.perf_counter() - t0
    engine.add(long)
    for _ in range(4):
        engine.step()
    t0 = time.perf_counter()
    sid = engine.add(short)
    while True:
        if any(ev.request_id == sid and ev.finished for ev in engine.step()):
            break
    behind = time.perf_counter() - t0
    while engine.has_work():
        engine.step()
    return {"short_alone_ms": alone * 1e3, "short_behind_long_ms": behind * 1e3, "ratio": behind / alone}


def run_serve_bench(cfg: ServeBenchConfig) -> dict:
    from vlmrt.pipeline import Pipeline

    if cfg.requests < 1 or cfg.concurrency < 1 or (cfg.rate is not None and cfg.rate <= 0):
        raise VlmrtError("--requests and --concurrency must be at least 1, and --rate above 0")
    pipe = Pipeline.load(cfg.model, runtime=cfg.runtime, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    engine = Engine(pipe.runtime, pipe.processor, pipe.generation_config(),
                    EngineOptions(kv_cache_gib=cfg.kv_cache_gib, max_slots=max(cfg.concurrency, 1)))
    reqs = make_requests(cfg, pipe)
    engine.run(reqs[:2])  # warm-up: allocator, first calls
    result = {"config": asdict(cfg), "slots": engine.num_slots, "torch_threads": torch.get_num_threads(),
              "engine": run_engine(engine, reqs, cfg)}
    if cfg.probe:
        result["probe"] = probe_short_behind_long(engine, pipe)
    if cfg.baseline:
        result["one_at_a_time"] = run_one_at_a_time(pipe, reqs, cfg)
        result["speedup"] = result["engine"]["tokens_per_s"] / result["one_at_a_time"]["tokens_per_s"]
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "serve.json").write_text(json.dumps(result, indent=2))
    return result


def format_serve(result: dict) -> str:
    lines = [f"{'path':<14}{'tok/s':>9}{'TTFT p50':>10}{'p99':>9}{'ITL p50':>9}{'p99':>8}{'lat p50':>10}{'p99':>9}  (ms)"]
    for name in ("engine", "one_at_a_time"):
        if name in result:
            r = result[name]
            lines.append(f"{name:<14}{r['tokens_per_s']:>9.1f}{r['ttft_ms']['p50']:>10.0f}{r['ttft_ms']['p99']:>9.0f}"
                         f"{r['inter_token_ms']['p50']:>9.1f}{r['inter_token_ms']['p99']:>8.1f}"
                         f"{r['latency_ms']['p50']:>10.0f}{r['latency_ms']['p99']:>9.0f}")
    if "speedup" in result:
        lines.append(f"engine throughput vs one at a time: {result['speedup']:.2f}x")
    p = result.get("probe")
    if p:
        lines.append(f"16-token request: alone {p['short_alone_ms']:.0f} ms, 4 steps behind a 300-token one "
                     f"{p['short_behind_long_ms']:.0f} ms ({p['ratio']:.2f}x)")
    return "\n".join(lines)
