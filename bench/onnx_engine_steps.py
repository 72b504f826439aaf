"""Per-step decode cost of the onnx runtime: the engine on the slot-mapped pool vs the lock-step loop,
at one batch size, plus what binding each present to its past's buffer saves.

```
 lockstep  8 requests as one left-padded batch through vlmrt.generate.generate (runtime.decode per step)
 engine    the same 8 requests added to the engine, stepped until done (runtime.run_step per step)
 binding   one decoder call on the engine's pool, presents bound to the pasts' buffers (in place)
           vs to separate buffers of the same size (ScatterElements then copies every past first)
```

Reported: the decoder call (ms, median over decode steps) and the whole step (embedding, decoder,
sampling, stops: ms per step). Run it with this checkout on PYTHONPATH for the slot decoder, or with
an earlier checkout (whose export concatenates pasts) for the old lock-step figure: modes that the
checkout lacks are skipped. Use a fresh VLMRT_CACHE per checkout (the exports differ).

    VLMRT_CACHE=/tmp/c python bench/onnx_engine_steps.py [--preset minigpt4-tiny] [--batch 8] [--new-tokens 48] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(os.environ.get("VLMRT_ROOT", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(ROOT))

from vlmrt.generate import generate  # noqa: E402
from vlmrt.pipeline import Pipeline  # noqa: E402

PROMPTS = ["Describe this image.", "What is the person in the picture holding, and why?", "Hi",
           "What colour is the sky in this photo?"]


def _timed(obj, name: str, keep, calls: list):
    """Wrap obj.name so each call that `keep(args)` selects appends its ms to `calls`."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        if keep(args):
            calls.append((time.perf_counter() - t0) * 1e3)
        return out

    setattr(obj, name, wrapper)
    return inner


def lockstep(pipe, cfg, batch_size: int, photo) -> dict:
    rt, calls = pipe.runtime, []
    inner = _timed(rt, "decode", lambda a: a[0].shape[1] == 1, calls)
    batch = pipe.processor([photo] * batch_size, [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)])
    t0 = time.perf_counter()
    out = generate(rt, batch, cfg, pipe.loaded.tokenizer)
    total = time.perf_counter() - t0
    rt.decode = inner
    return {"decoder_ms": statistics.median(calls), "step_ms": out.timings["ms_per_token"], "steps": len(calls),
            "wall_s": total}


class _Clocked:
    """The runtime, with each decode `run_step` (T = 1) timed into `calls`."""

    def __init__(self, runtime, calls: list):
        self.runtime, self.calls = runtime, calls

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def run_step(self, step):
        t0 = time.perf_counter()
        out = self.runtime.run_step(step)
        if step.logits_at is None:
            self.calls.append((time.perf_counter() - t0) * 1e3)
        return out


def engine(pipe, cfg, batch_size: int, photo, max_seq: int | None = None) -> dict:
    """The requests on the engine; slots of `max_seq` positions (None: the model's context)."""
    from vlmrt.engine import Engine, EngineOptions, Request

    calls = []
    e = Engine(_Clocked(pipe.runtime, calls), pipe.processor, pipe.generation_config(),
               EngineOptions(kv_cache_gib=1, max_slots=batch_size, max_seq=max_seq))
    t0 = time.perf_counter()
    e.run([Request(PROMPTS[i % len(PROMPTS)], photo, cfg) for i in range(batch_size)])
    total = time.perf_counter() - t0
    return {"decoder_ms": statistics.median(calls), "step_ms": e.timers["decode_s"] * 1e3 / e.timers["decode_steps"],
            "steps": e.timers["decode_steps"], "wall_s": total, "slot_positions": e.max_seq}


def binding(pipe, batch_size: int, max_seq: int, runs: int) -> dict:
    """One decode call over `batch_size` pool rows of `max_seq` slots: presents in place vs copied."""
    from vlmrt.kv_cache import SlotKVCache
    from vlmrt.stages import ATTENTION_MASK, CACHE_POSITION, INPUTS_EMBEDS, LOGITS, LOGITS_INDEX, POSITION_IDS

    rt = pipe.runtime
    m, n = rt.model, batch_size
    pool = SlotKVCache(m.num_layers, n, m.num_kv_heads, max_seq, m.head_dim, rt.dtype, rt.device)
    spare = SlotKVCache(m.num_layers, n, m.num_kv_heads, max_seq, m.head_dim, rt.dtype, rt.device)
    embeds = rt.embed(torch.full((n, 1), 5), None)
    embeds = embeds["inputs_embeds"] if isinstance(embeds, dict) else embeds
    slot = max_seq // 2
    mask = torch.zeros(n, max_seq + 1, dtype=torch.long)
    mask[:, :slot + 1] = 1
    values = {INPUTS_EMBEDS: embeds, POSITION_IDS: torch.full((n, 1), slot), ATTENTION_MASK: mask,
              CACHE_POSITION: torch.full((n, 1), slot), LOGITS_INDEX: torch.zeros(n, dtype=torch.long)}
    info, sess = rt.manifest.stages["decoder"], rt.sessions["decoder"]

    def call(out_pool) -> float:
        b, keep = sess.io_binding(), []
        for t in info.inputs:
            if t.name.startswith("past_key_values."):
                _, layer, kind = t.name.split(".")
                rt._bind_buffer(b, t.name, (pool.keys if kind == "key" else pool.values)[int(layer)])
                continue
            v = values.get(t.name)
            if v is None:
                continue
            if t.name == POSITION_IDS and len(t.shape) == 3:
                v = v[None].expand(3, -1, -1)
            keep.append(v := v.contiguous())
            rt._bind_buffer(b, t.name, v)
        b.bind_output(LOGITS, rt.device_type, rt.device_id)
        for t in info.outputs:
            if t.name.startswith("present."):
                _, layer, kind = t.name.split(".")
                rt._bind_buffer(b, t.name, (out_pool.keys if kind == "key" else out_pool.values)[int(layer)], output=True)
        t0 = time.perf_counter()
        sess.run_with_iobinding(b)
        return (time.perf_counter() - t0) * 1e3

    in_place, copied = [], []
    for _ in range(runs):  # taking turns: both see the same load
        in_place.append(call(pool))
        copied.append(call(spare))
    mib = 2 * m.num_layers * n * m.num_kv_heads * (max_seq + 1) * m.head_dim * 4 / 2**20
    return {"in_place_ms": statistics.median(in_place[1:]), "copied_ms": statistics.median(copied[1:]),
            "pool_mib": round(mib, 1), "max_seq": max_seq}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="minigpt4-tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--binding-seq", type=int, default=2048, help="slots per row of the binding comparison")
    p.add_argument("--runs", type=int, default=21)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (1: no spinning pool)")
    a = p.parse_args()
    from vlmrt.config import set_threads

    set_threads(a.threads)
    torch.set_num_threads(1)
    photo = ROOT / "vlmrt" / "assets" / "astronaut.jpg"
    pipe = Pipeline.load(a.preset, runtime="onnx")
    cfg = replace(pipe.generation_config(max_new_tokens=a.new_tokens), stop_strings=(), stop_token_ids=())
    print(f"{a.preset}, batch {a.batch}, {a.new_tokens} new tokens, onnx threads {pipe.runtime.threads}, "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    lockstep(pipe, cfg, a.batch, photo)  # warm-up
    print("lockstep", lockstep(pipe, cfg, a.batch, photo), flush=True)
    if hasattr(pipe.runtime, "run_step"):
        engine(pipe, cfg, a.batch, photo)  # warm-up
        print("engine  ", engine(pipe, cfg, a.batch, photo), flush=True)
        need = max(pipe.processor([photo], [p])["input_ids"].shape[1] for p in PROMPTS) + a.new_tokens
        print("engine, slots of the lock-step length", engine(pipe, cfg, a.batch, photo, need), flush=True)
        print("binding ", binding(pipe, a.batch, a.binding_seq, a.runs), flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
