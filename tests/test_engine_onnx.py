"""The engine on the onnx runtime: the exported decoder takes per-row positions and cache slots and
writes the engine's KV pool in place. A request's answer must not depend on when it joins, and every
engine step must match the eager runtime's (tiny presets, fp32, CPU)."""

from dataclasses import replace

import pytest
import torch

from conftest import load_tiny
from engine_spy import CallCounter
from engine_spy import spied as _spied
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


def test_requests_admitted_together_share_the_calls_and_get_their_solo_and_eagers_tokens(pipes, photo):
    """On onnx, three prompts of different lengths admitted in one step go through one vision call
    (the export's dynamic batch; patch rows: one per request) and one padded prefill call over rows
    [0, 3); their tokens equal each one's run alone on onnx and the eager engine's."""
    eager, onnx = pipes
    cfg = onnx.generation_config(max_new_tokens=5, stop_strings=(), stop_token_ids=())
    reqs = [Request(p, photo, cfg) for p in PROMPTS]
    counter = CallCounter(onnx.runtime)
    engine = Engine(counter, onnx.processor, onnx.generation_config(), EngineOptions(kv_cache_gib=0.25, max_slots=3))
    tokens = [s.row.tokens for s in engine.run(reqs)]
    rows = onnx.processor([photo], [PROMPTS[0]])["pixel_values"].dim() != 4
    assert counter.vision == (["rows"] * 3 if rows else [3]) and counter.prefills == [(0, 3, False)]
    assert tokens == [_solo(onnx, r)[0] for r in reqs] == [_solo(eager, r)[0] for r in reqs]


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


def test_pipeline_runs_onnx_on_the_engine_and_beams_on_the_loop(pipes, photo):
    eager, onnx = pipes
    cfg = onnx.generation_config(max_new_tokens=6, stop_strings=(), stop_token_ids=())
    out = onnx([photo, photo], PROMPTS[:2], cfg)
    assert onnx._engine is not None and out.token_ids == eager([photo, photo], PROMPTS[:2], cfg).token_ids
    beams = replace(cfg, num_beams=2)
    assert onnx([photo], PROMPTS[2:], beams).token_ids == eager([photo], PROMPTS[2:], beams).token_ids


def test_cli_runs_an_export_on_the_engine(photo, tmp_path_factory, capsys):
    """`vlmrt run --model EXPORT` is on the engine: the engine's KV budget check answers (the run
    itself is tests/test_onnx_export.py's)."""
    from vlmrt.cli import main

    folder = str(exported("minigpt4-tiny", tmp_path_factory))
    assert main(["run", "--model", folder, "--runtime", "onnx", "--image", str(photo), "--prompt", "Hi",
                 "--kv-cache-gib", "1e-9"]) == 2
    assert "raise --kv-cache-gib" in capsys.readouterr().err


class _ConcatDecoder(torch.nn.Module):
    """The decoder form of earlier exports: pasts [B,H_kv,P,hd] in, presents [B,H_kv,P+T,hd] out."""

    stage = "decoder"

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(model.num_layers) for kv in ("key", "value")]

    def forward(self, embeds, positions, mask, *pasts):
        from vlmrt.kv_cache import ConcatKVCache

        cache = ConcatKVCache(list(pasts[0::2]), list(pasts[1::2]))
        slots = torch.arange(embeds.shape[1]) + pasts[0].shape[2]  # [T]: P..P+T-1
        logits = self.model.decode(embeds, positions, mask, slots, cache, logits_at=(slots[-1] - slots[0]).reshape(1))
        return (logits, *[t for i in range(len(cache.keys)) for t in (cache.keys[i], cache.values[i])])


def test_an_export_of_the_concatenating_form_runs_the_lock_step_loop(photo, tmp_path, tmp_path_factory):
    """A folder whose decoder concatenates pasts (as exports of earlier versions did) has no engine
    steps, so Pipeline runs it on the lock-step loop: the eager runtime's tokens, beams included."""
    import shutil

    from vlmrt.export.manifest import read_manifest, write_manifest
    from vlmrt.export.onnx import StageIO, export_stage

    loaded = load_tiny("minigpt4-tiny")
    folder = shutil.copytree(exported(loaded.name, tmp_path_factory), tmp_path / "old")
    m = loaded.model
    b, t, past = 2, 5, 3
    inputs = {"inputs_embeds": torch.randn(b, t, 32), "position_ids": torch.arange(past, past + t).expand(b, -1),
              "attention_mask": torch.ones(b, past + t, dtype=torch.long)}
    for i in range(m.num_layers):
        for kv in ("key", "value"):
            inputs[f"past_key_values.{i}.{kv}"] = torch.randn(b, m.num_kv_heads, past, m.head_dim)
    axes = {"inputs_embeds": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"}, "logits": {0: "batch"},
            **{k: {0: "batch", 2: "past_sequence"} for k in inputs if k.startswith("past_")},
            **{k: {0: "batch", 2: "total_sequence"} for k in _ConcatDecoder(m).output_names[1:]}}
    info = export_stage(_ConcatDecoder(m), StageIO(inputs, axes), folder, 17, lambda _: None)
    old = read_manifest(folder)
    write_manifest(folder, replace(old, stages={**old.stages, "decoder": info}))
    onnx, eager = Pipeline(load_model(str(folder)), "onnx"), Pipeline(loaded, "eager")
    assert not hasattr(onnx.runtime, "run_step") and not hasattr(onnx.runtime, "allocate_slots")
    with pytest.raises(VlmrtError, match="does not run engine steps"):
        Engine(onnx.runtime, onnx.processor, onnx.generation_config())
    cfg = onnx.generation_config(max_new_tokens=6, stop_strings=(), stop_token_ids=())
    for c in (cfg, replace(cfg, num_beams=2)):
        assert onnx([photo, photo], PROMPTS[:2], c).token_ids == eager([photo, photo], PROMPTS[:2], c).token_ids
