"""Rank 0 of the 2-rank CPU group tests/test_tp.py runs (one group for the whole module).

    python tests/tp_worker.py OUT.json

This process starts rank 1 as a real `vlmrt run ... --tp 2` follower (vlmrt.tp.launch.spawn_ranks),
then, for every family's tiny preset, runs the same engine script on a tp=1 runtime and on the
tp=2 group (fp32; int8 for two families), and the lock-step loop on a left-padded batch; the same
from a Qwen-VL release folder (.bin shards, fused c_attn) that every rank reads for its own shard
only (fp32 and int8); then kills rank 1 and times how long a step takes to fail. Everything it saw
goes to OUT.json for the test to judge.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from vlmrt.config import GenerationConfig
from vlmrt.engine import Engine, EngineOptions, Request
from vlmrt.errors import VlmrtError
from vlmrt.generate import generate
from vlmrt.models import load_model
from vlmrt.processor import Processor
from vlmrt.quantize import parse_weights, with_weights
from vlmrt.runtimes.eager import EagerRuntime
from vlmrt.tp.group import init_group
from vlmrt.tp.launch import spawn_ranks
from vlmrt.tp.runtime import LeaderRuntime
from vlmrt.tp.shard import Shard

sys.path.insert(0, str(Path(__file__).parent))
from families import FAMILY_TESTS  # noqa: E402
from test_qwen_vl import write_release  # noqa: E402

IMAGE = str(Path(__file__).parents[1] / "vlmrt" / "assets" / "astronaut.jpg")
PROMPTS = ["Describe this image.", "What is in the picture, and what colour is the sky above it?", "Why?"]
TOKENS = 32
TIMEOUT_S = 20.0
INT8_FAMILIES = ("minigpt4", "slimm")  # KV heads split (GQA) / replicated (one KV head), q/k/v biases


class Spy:
    """A runtime whose engine calls keep every request's logits, in call order."""

    def __init__(self, runtime):
        self.runtime, self.engine, self.logits = runtime, None, {}

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def run_step(self, step):
        out = self.runtime.run_step(step)  # [n,V]
        for slot, s in self.engine.running.items():
            if step.start <= slot < step.stop:
                self.logits.setdefault(s.id, []).append(out[slot - step.start].float().clone())
        return out


def engine_script(runtime, processor) -> tuple[dict, dict]:
    """Three requests of different lengths, a fourth joining after three steps: tokens and logits per id."""
    spy = Spy(runtime)
    cfg = GenerationConfig(max_new_tokens=TOKENS, pad_token_id=processor.pad_token_id)  # no stops: 32 tokens each
    spy.engine = engine = Engine(spy, processor, cfg, EngineOptions(kv_cache_gib=0.05, max_slots=4))
    states = [engine._live[engine.add(Request(p, IMAGE))] for p in PROMPTS]
    for _ in range(3):
        engine.step()
    states.append(engine._live[engine.add(Request("Count the stars.", IMAGE))])
    while engine.has_work():
        engine.step()
    return {s.id: list(s.row.tokens) for s in states}, {k: torch.stack(v) for k, v in spy.logits.items()}


def lockstep(runtime, loaded) -> list[list[int]]:
    processor = Processor(loaded.spec, loaded.tokenizer)
    batch = processor([IMAGE, IMAGE], PROMPTS[:2])  # left-padded rows of different lengths
    return generate(runtime, batch, GenerationConfig(max_new_tokens=8), loaded.tokenizer).token_ids


def compare(base, weights: str, group, shard=None) -> dict:
    """tp=1 vs tp=2 on copies of `base` (a LoadedModel kept at fp: each run quantizes its own copy);
    `shard`: rank 0's shard loaded as such (from a release folder), used instead of a copy of `base`."""
    fmt = parse_weights(None if weights == "fp" else weights)
    ref_loaded, tp_loaded = (with_weights(replace(base, model=copy.deepcopy(base.model)), fmt) for _ in range(2))
    if shard is not None:
        tp_loaded = with_weights(shard, fmt)
    processor = Processor(ref_loaded.spec, ref_loaded.tokenizer)
    ref, tp = EagerRuntime(ref_loaded), LeaderRuntime(tp_loaded, group)
    ref_tokens, ref_logits = engine_script(ref, processor)
    tp_tokens, tp_logits = engine_script(tp, processor)
    rel = max(float((tp_logits[k] - ref_logits[k]).abs().max() / ref_logits[k].abs().max()) for k in ref_logits)
    first = max(float((tp_logits[k][0] - ref_logits[k][0]).abs().max() / ref_logits[k][0].abs().max()) for k in ref_logits)
    agree = [next((i for i, (a, b) in enumerate(zip(ref_tokens[k], tp_tokens[k])) if a != b), TOKENS) for k in ref_tokens]
    steps = sorted(len(v) for v in tp_logits.values())
    out = {"tokens_equal": ref_tokens == tp_tokens, "tokens": len(ref_tokens), "lengths": sorted(map(len, ref_tokens.values())),
           "rel_logits": rel, "rel_first": first, "same_prefix": agree, "logit_steps": steps, "kv_heads": [ref.model.num_kv_heads, tp.model.num_kv_heads]}
    if weights == "fp":
        out["lockstep_equal"] = lockstep(ref, ref_loaded) == lockstep(tp, tp_loaded)
    return out


def compiled(loaded, group, backend: str = "aot_eager") -> dict:
    """The compiled runtime at tp=2 vs tp=1: the lock-step loop on two rows of different lengths on
    `loaded` (minigpt4-tiny: its KV heads split), vision eager, one prefill and one decode graph per
    runtime. aot_eager keeps this cheap on a cold cache: Dynamo and AOTAutograd trace the
    functional all-reduce into the graph as Inductor's would (Inductor: bench/RESULTS.md)."""
    from torch._dynamo.utils import counters

    from vlmrt.runtimes.compiled import CompiledRuntime

    options = {"max_batch": 2, "compile_vision": False, "max_seq": 256, "backend": backend}
    out = {}
    for tp in (1, 2):
        counters.clear()
        t0 = time.perf_counter()
        copied = replace(loaded, model=copy.deepcopy(loaded.model))
        runtime = CompiledRuntime(copied, **options) if tp == 1 else LeaderRuntime(copied, group, "compiled", options)
        out[tp] = lockstep(runtime, loaded), sum(counters["graph_break"].values()), time.perf_counter() - t0
    return {"tokens_equal": out[1][0] == out[2][0], "lengths": [len(t) for t in out[2][0]],
            "graph_breaks": [out[1][1], out[2][1]], "seconds": [out[1][2], out[2][2]]}


def main(out_path: str) -> None:
    children = spawn_ranks(2, ["run", "--model", "minigpt4-tiny", "--image", IMAGE, "--prompt", "x", "--tp", "2",
                               "--tp-timeout", str(TIMEOUT_S)])
    group = init_group(2, "cpu", TIMEOUT_S)
    report = {"families": {}}
    bases = {}
    for family, entry in FAMILY_TESTS.items():
        base = bases[family] = load_model(entry["tiny"])  # one tokenizer per family: building one is slow
        for weights in ("fp", "int8") if family in INT8_FAMILIES else ("fp",):
            report["families"][f"{family}/{weights}"] = r = compare(base, weights, group)
            print(f"tp_worker: {family}/{weights}: {r}", file=sys.stderr, flush=True)  # shown when the test fails
    with tempfile.TemporaryDirectory() as tmp:  # the follower reads the same folder for its own shard
        folder = Path(tmp) / "qwen-vl"
        write_release(folder, "bin")
        whole = load_model(str(folder))
        for weights in ("fp", "int8"):
            mine = load_model(str(folder), shard=Shard(0, 2, row_absmax=weights == "int8"))
            report["families"][f"qwen_vl-release/{weights}"] = r = compare(whole, weights, group, mine)
            r["rank0_sharded"] = mine.model.tp_shard == (0, 2)
            print(f"tp_worker: qwen_vl-release/{weights}: {r}", file=sys.stderr, flush=True)
    report["compiled"] = compiled(bases["minigpt4"], group)
    print(f"tp_worker: compiled: {report['compiled']}", file=sys.stderr, flush=True)
    try:
        LeaderRuntime(with_weights(base, parse_weights("int4")), group)
    except VlmrtError as e:
        report["int4_error"] = str(e)
    last = LeaderRuntime(base, group)
    processor = Processor(base.spec, base.tokenizer)
    engine = Engine(last, processor, GenerationConfig(max_new_tokens=4), EngineOptions(kv_cache_gib=0.05, max_slots=2))
    children[0].kill()  # rank 1 dies
    children[0].wait()
    t0 = time.perf_counter()
    try:
        engine.run([Request("Describe this image.", IMAGE)])
        report["dead_rank"] = {"error": None}
    except VlmrtError as e:
        report["dead_rank"] = {"error": str(e), "seconds": time.perf_counter() - t0}
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
