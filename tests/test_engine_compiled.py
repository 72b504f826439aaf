"""The engine on the compiled runtime: every graph is built in warmup(), and serving (rows joining
and leaving, prompts of any length) never recompiles; tokens equal the eager engine's.

Dynamo's "eager" backend keeps this fast on a CPU: the graphs, guards and buckets are dynamo's,
only Inductor's code generation is skipped (tests/test_compiled.py checks Inductor itself).
"""

import pytest
import torch

from conftest import load_tiny
from vlmrt.engine import Engine, EngineOptions, Request
from vlmrt.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Describe this image.", "What is the person in the picture holding, and why?", "Hi"]


@pytest.fixture(scope="module", params=["minigpt4-tiny", "slimm-tiny"])  # plain RoPE; M-RoPE + DeepStack extras
def pipes(request):
    loaded = load_tiny(request.param)
    options = {"max_batch": 4, "batch_buckets": (2, 4), "backend": "eager", "window_buckets": (192,)}  # every row fits 192
    return Pipeline(loaded), Pipeline(loaded, "compiled", options)


def _tokens(events: dict, rid: int) -> list[int]:
    return [t for ev in events[rid] for t in ev.token_ids]


def _serve(engine: Engine, photo, late_at: int) -> tuple[dict, list[int]]:
    """Two requests, a third joining at step `late_at`, a fourth queued behind them; id -> events."""
    cfg = lambda n, **kw: engine.default_config.__class__(**{**engine.default_config.__dict__, "max_new_tokens": n,
                                                             "stop_strings": (), "stop_token_ids": (), **kw})
    ids = [engine.add(Request(PROMPTS[0], photo, cfg(9))), engine.add(Request(PROMPTS[2], photo, cfg(5)))]
    events: dict = {}
    step = 0
    while engine.has_work() or step <= late_at:
        if step == late_at:
            ids += [engine.add(Request(PROMPTS[1], photo, cfg(7, do_sample=True, seed=4))),
                    engine.add(Request(PROMPTS[2], photo, cfg(4))),
                    engine.add(Request(PROMPTS[0], photo, cfg(3, repetition_penalty=1.3)))]
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
        step += 1
    return events, ids


def test_compiled_engine_never_recompiles_and_matches_eager(pipes, photo):
    eager, compiled = pipes
    engine = compiled.engine  # warmup() compiles every graph here
    seen = set(compiled.runtime._seen)
    assert {("engine-decode", 2), ("engine-decode", 4), ("engine-decode", 2, 192), ("engine-prefill",)} <= seen
    windows = []
    spy = lambda *a, window=None, **kw: windows.append(window) or decode_call(*a, window=window, **kw)
    decode_call, compiled.runtime._engine_decode_call = compiled.runtime._engine_decode_call, spy
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, ids = _serve(engine, photo, late_at=2)
        again, ids2 = _serve(engine, photo, late_at=0)  # other row counts per step
    del compiled.runtime._engine_decode_call
    new = {k for k in compiled.runtime._seen - seen if k[0] != "vision"}  # vision compiles per image shape, on first use
    assert not new  # no decoder graph was compiled while serving
    assert windows and set(windows) == {192}  # every step attended over the window bucket, not the whole slot
    ref_engine = Engine(eager.runtime, eager.processor, eager.generation_config(), EngineOptions(kv_cache_gib=0.25, max_slots=4))
    ref, ref_ids = _serve(ref_engine, photo, late_at=2)
    assert [_tokens(got, i) for i in ids] == [_tokens(ref, i) for i in ref_ids]
    assert [_tokens(again, i) for i in ids2] == [_tokens(ref, i) for i in ref_ids]  # joining earlier: same tokens


def test_compiled_engine_steps_match_eager_tensor_for_tensor(pipes, photo):
    """Tensor-level parity on engine steps (vlmrt/eval/engine_parity.py): every prefill's logits and
    every decode call's logits [n,V] of the compiled engine equal the eager engine's, while rows
    join, finish and are compacted; the tokens are identical."""
    from vlmrt.eval.engine_parity import EngineReference

    eager, compiled = pipes
    cfg = lambda n: eager.generation_config(max_new_tokens=n)
    reqs = [Request(PROMPTS[0], photo, cfg(6)), Request(PROMPTS[1], photo, cfg(3)), Request(PROMPTS[2], photo, cfg(5))]
    ref = EngineReference(eager.runtime, eager.processor, reqs, EngineOptions(kv_cache_gib=0.25, max_slots=4))
    result = ref.compare(compiled.engine)
    result.assert_ok("compiled engine")
    names = [c.name for c in result.checks]
    assert names.count("engine_prefill_1") == 1 and "engine_prefill_3" in names and "engine_decode_step_5" in names
    assert all(len(t) == n for t, n in zip(result.tokens, (6, 3, 5)))
