"""HTTP load on two `vlmrt serve` builds, one after the other, on the same machine: throughput and
latency percentiles at several client counts, requests lost, and the TTFT the image cache saves.

```
 for each server (a source tree: PYTHONPATH=TREE python -m vlmrt serve --model M --port P):
   start it, wait for /health
   for C in concurrency: C clients (openai.AsyncOpenAI, retries off), each sends R requests in
     turn (non-streamed, max_tokens N) ─► completed, lost (any error), tokens/s, latency p50/p90/p99
   new server only: streamed TTFT with a fresh image each time (miss) vs the same image (hit)
   stop it
```

Usage:
    git archive main | tar -x -C /tmp/vlmrt-main
    python bench/serve_http.py --tree old=/tmp/vlmrt-main --tree new=. --out /tmp/serve_http.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

IMAGE = Path(__file__).resolve().parent.parent / "vlmrt" / "assets" / "astronaut.jpg"


def data_url(raw: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def noise_png(seed: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buf, "PNG")
    return data_url(buf.getvalue(), "png")


def messages(url: str) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def start(tree: str, model: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    proc = subprocess.Popen([sys.executable, "-m", "vlmrt", "serve", "--model", model, "--port", str(port), *extra],
                            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server of {tree} did not start")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(int(q * len(values)), len(values) - 1)]


async def load(url: str, model: str, clients: int, per_client: int, tokens: int) -> dict:
    import openai

    body = messages(data_url(IMAGE.read_bytes()))
    latencies, lost, generated = [], 0, 0

    async def one_client(c):
        nonlocal lost, generated
        for _ in range(per_client):
            t0 = time.perf_counter()
            try:
                r = await c.chat.completions.create(model=model, messages=body, max_tokens=tokens)
            except openai.OpenAIError:
                lost += 1
                continue
            latencies.append(time.perf_counter() - t0)
            generated += r.usage.completion_tokens

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * per_client, "completed": len(latencies), "lost": lost,
            "wall_s": wall, "requests_per_s": len(latencies) / wall, "tokens_per_s": generated / wall,
            "p50_s": pct(latencies, 0.5), "p90_s": pct(latencies, 0.9), "p99_s": pct(latencies, 0.99)}


async def cache_ttft(url: str, model: str, n: int) -> dict:
    """Median TTFT, streamed one at a time: a fresh image each request vs the same one again."""
    import openai

    async def ttft(c, image_url):
        t0 = time.perf_counter()
        s = await c.chat.completions.create(model=model, messages=messages(image_url), max_tokens=2, stream=True)
        first = None
        async for chunk in s:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
        return first

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as c:
        same = noise_png(10_000)
        await ttft(c, same)  # fills the cache
        misses, hits = [], []
        for i in range(n):  # interleaved, so a change in the machine's load hits both alike
            misses.append(await ttft(c, noise_png(i)))
            hits.append(await ttft(c, same))
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        counters = {k: float(v) for k, v in (line.split() for line in r.read().decode().splitlines()
                                              if line.startswith("vlmrt_image_cache_"))}
    return {"miss_ttft_ms": statistics.median(misses) * 1e3, "hit_ttft_ms": statistics.median(hits) * 1e3, **counters}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=DIR: a source tree to serve from")
    p.add_argument("--model", default="minigpt4-tiny")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends in turn (default 2)")
    p.add_argument("--tokens", type=int, default=16, help="max_tokens per request (default 16)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--cache-probes", type=int, default=6, help="TTFT probes per case (new server; 0 = skip)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    results = {"load_average_before": os.getloadavg(), "runs": {}}
    for spec in args.tree:
        name, tree = spec.split("=", 1)
        proc = start(tree, args.model, args.port, [])
        url = f"http://127.0.0.1:{args.port}"
        try:
            rows = []
            for c in map(int, args.concurrency.split(",")):
                row = asyncio.run(load(url, args.model, c, args.per_client, args.tokens))
                row["load_average"] = os.getloadavg()[0]
                print(name, json.dumps(row), flush=True)
                rows.append(row)
            entry = {"tree": tree, "load": rows}
            if args.cache_probes and name != "old":
                entry["image_cache"] = asyncio.run(cache_ttft(url, args.model, args.cache_probes))
                print(name, json.dumps(entry["image_cache"]), flush=True)
            results["runs"][name] = entry
        finally:
            proc.terminate()
            proc.wait(30)
    results["load_average_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
