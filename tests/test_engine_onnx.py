"""The engine on the onnx runtime: the exported decoder takes per-row positions and cache slots and
writes the engine's KV pool in place. A request's answer must not depend on when it joins, and every
engine step must match the eager runtime's (tiny presets, fp32, CPU)."""

from dataclasses import replace

import pytest
import torch

from conftest import load_tiny
from families import FAMILY_TESTS
from onnx_exports import exported
from vlmrt.engine import Engine, EngineOptions, Request
from vlmrt.errors import VlmrtError
from vlmrt.eval.tensor_parity import RTOL, tensor_error
from vlmrt.models import load_model
from vlmrt.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Describe this image.", "What is the person in the picture holding, and why?", "Hi"]


@pytest.fixture(scope="module", params=sorted(FAMILY_TESTS))
def pipes(request, tmp_path_factory):
    """(eager, onnx) pipelines of one family's tiny preset; the onnx one on the shared export."""
    loaded = load_tiny(FAMILY_TESTS[request.param]["tiny"])
    return Pipeline(loaded, "eager"), Pipeline(load_model(str(exported(loaded.name, tmp_path_factory))), "onnx")


class _Spy:
    """A runtime whose engine calls keep the logits of one request (by id), in call order."""

    def __init__(self, runtime):
        self.runtime, self.engine, self.watch, self.logits = runtime, None, None, []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def run_step(self, step):
        out = self.runtime.run_step(step)
        s = self.engine._live.get(self.watch)
        if s is not None and s.slot >= 0 and step.start <= s.slot < step.stop:
            self.logits.append(out[s.slot - step.start].clone())
        return out


def _spied(pipe) -> tuple[Engine, _Spy]:
    spy = _Spy(pipe.runtime)
    spy.engine = Engine(spy, pipe.processor, pipe.generation_config(), EngineOptions(kv_cache_gib=0.25, max_slots=4))
    return spy.engine, spy


def _tokens(engine: Engine, events: dict) -> dict[int, list[int]]:
    """Step until idle (events so far in `events`); id -> its tokens."""
    while engine.has_work():
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
        assert sorted(engine.running) == list(range(len(engine.running)))  # compacted: rows [0, n)
    return {rid: [t for ev in evs for t in ev.token_ids] for rid, evs in events.items()}


def _late_join(pipe, photo, k: int = 3):
    """Two requests of different lengths run k steps, then a third joins; returns the ids of the
    first two, the late one's id, everyone's tokens and the late one's logits per step."""
    cfg = lambda n, **kw: pipe.generation_config(max_new_tokens=n, stop_strings=(), stop_token_ids=(), **kw)
    first = [Request(PROMPTS[0], photo, cfg(12)), Request(PROMPTS[2], photo, cfg(5, repetition_penalty=1.4))]
    engine, spy = _spied(pipe)
    ids, events = [engine.add(r) for r in first], {}
    for _ in range(k):
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    spy.watch = late = engine.add(Request(PROMPTS[1], photo, cfg(8)))
    return ids, late, _tokens(engine, events), spy.logits, first


def _solo(pipe, request: Request):
    engine, spy = _spied(pipe)
    spy.watch = engine.add(request)
    return _tokens(engine, {})[spy.watch], spy.logits


def test_a_request_joining_a_running_batch_gets_its_solo_tokens_and_eagers_logits(pipes, photo):
    """On onnx, greedy fp32: the late request joins at step 3 into slot 2 while the short neighbour
    finishes (compaction moves rows); its tokens and its neighbours' equal their runs alone, and its
    logits at every engine step (prefill, then decode) match the eager runtime's engine steps."""
    eager, onnx = pipes
    ids, late, tokens, joined, first = _late_join(onnx, photo)
    cfg = onnx.generation_config(max_new_tokens=8, stop_strings=(), stop_token_ids=())
    solo, solo_logits = _solo(onnx, Request(PROMPTS[1], photo, cfg))
    assert tokens[late] == solo == [int(x.argmax()) for x in joined] and len(solo) == 8
    assert [tokens[i] for i in ids] == [_solo(onnx, r)[0] for r in first]
    _, reference = _solo(eager, Request(PROMPTS[1], photo, cfg))
    assert len(joined) == len(reference) == 8
    for step, (ours, theirs) in enumerate(zip(joined, reference)):
        err = tensor_error(theirs, ours)
        assert err["rel"] <= RTOL, f"{'prefill' if step == 0 else f'decode step {step}'} logits: {err}"


def test_the_pool_is_written_in_place_like_eagers(pipes, photo):
    """After a few engine steps the onnx pool's torch buffers (the same tensors as at allocation:
    bound by pointer, never replaced) hold the keys and values the eager engine wrote."""
    cfg = lambda n: pipes[0].generation_config(max_new_tokens=n, stop_strings=(), stop_token_ids=())
    engines = []
    for pipe in pipes:
        engine = Engine(pipe.runtime, pipe.processor, pipe.generation_config(), EngineOptions(kv_cache_gib=0.25, max_slots=3))
        buffers = [t.data_ptr() for t in engine.pool.keys + engine.pool.values]
        for p, n in zip(PROMPTS, (6, 4, 9)):
            engine.add(Request(p, photo, cfg(n)))
        for _ in range(3):
            engine.step()
        assert [t.data_ptr() for t in engine.pool.keys + engine.pool.values] == buffers
        engines.append(engine)
    ref, ours = engines
    assert {r: s.used for r, s in ref.running.items()} == {r: s.used for r, s in ours.running.items()}
    for r, s in ours.running.items():
        for a, b in zip(ref.pool.keys + ref.pool.values, ours.pool.keys + ours.pool.values):
            assert tensor_error(a[r, :, :s.used], b[r, :, :s.used])["rel"] <= RTOL


def test_pipeline_and_cli_run_onnx_on_the_engine_and_beams_on_the_loop(pipes, photo, tmp_path_factory, capsys):
    eager, onnx = pipes
    cfg = onnx.generation_config(max_new_tokens=6, stop_strings=(), stop_token_ids=())
    out = onnx([photo, photo], PROMPTS[:2], cfg)
    assert onnx._engine is not None and out.token_ids == eager([photo, photo], PROMPTS[:2], cfg).token_ids
    beams = replace(cfg, num_beams=2)
    assert onnx([photo], PROMPTS[2:], beams).token_ids == eager([photo], PROMPTS[2:], beams).token_ids
    if eager.loaded.name != "minigpt4-tiny":
        return
    from vlmrt.cli import main

    folder = exported(eager.loaded.name, tmp_path_factory)
    assert main(["run", "--model", str(folder), "--runtime", "onnx", "--image", str(photo), "--prompt", "Hi",
                 "--max-new-tokens", "3", "--kv-cache-gib", "0.01"]) == 0
    assert main(["run", "--model", str(folder), "--runtime", "onnx", "--image", str(photo), "--prompt", "Hi",
                 "--kv-cache-gib", "1e-9"]) == 2  # the engine's budget check: it is on the engine
    assert "raise --kv-cache-gib" in capsys.readouterr().err


def test_an_export_without_a_slot_decoder_has_no_engine_steps(pipes, monkeypatch):
    """A decoder without per-row slots (exports of earlier versions; static-shape exports, whose
    runtime tests/test_static_export.py runs through Pipeline) has no engine steps: `hasattr` is
    False, so Pipeline keeps the lock-step loop and the engine refuses it with a clear error."""
    eager, onnx = pipes
    if eager.loaded.name != "minigpt4-tiny":
        pytest.skip("one family is enough for the capability switch")
    assert hasattr(onnx.runtime, "run_step") and hasattr(onnx.runtime, "allocate_slots")
    monkeypatch.setattr(onnx.runtime, "slot_decoder", False)
    assert not hasattr(onnx.runtime, "run_step") and not hasattr(onnx.runtime, "allocate_slots")
    with pytest.raises(VlmrtError, match="does not run engine steps"):
        Engine(onnx.runtime, onnx.processor, onnx.generation_config())
