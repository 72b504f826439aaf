"""The engine: continuous batching on the slot pool. A request's answer must not depend on when it
joins or on its neighbours; queueing, aborts and refusals behave."""

import pytest
import torch

from conftest import load_tiny
from engine_spy import CallCounter
from engine_spy import spied as _spied
from families import FAMILY_TESTS
from vlmrt.engine import Engine, EngineOptions, Request
from vlmrt.errors import VlmrtError
from vlmrt.generate import forced_logits, generate
from vlmrt.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Describe this image.", "What is the person in the picture holding, and why?", "Hi"]


@pytest.fixture(scope="module", params=sorted(FAMILY_TESTS))
def pipe(request):
    return Pipeline(load_tiny(FAMILY_TESTS[request.param]["tiny"]))


def _engine(pipe, slots: int = 4, **kw) -> Engine:
    return Engine(pipe.runtime, pipe.processor, pipe.generation_config(), EngineOptions(kv_cache_gib=0.25, max_slots=slots, **kw))


def _alone(pipe, request: Request) -> list[int]:
    return _engine(pipe).run([request])[0].row.tokens


def _drain(engine: Engine) -> dict[int, list]:
    """Step until idle; id -> list of events."""
    seen: dict[int, list] = {}
    while engine.has_work():
        for ev in engine.step():
            seen.setdefault(ev.request_id, []).append(ev)
        assert sorted(engine.running) == list(range(len(engine.running)))  # compacted: rows [0, n)
    return seen


def test_a_request_joining_a_running_batch_gets_its_solo_tokens(pipe, photo):
    """Greedy fp32: the late request lands in a slot above 0, at another length than its neighbours,
    after k steps; its tokens (and theirs) equal their runs alone, and so do its logits at every step
    (a wrong position or slot moves logits even where greedy tokens survive)."""
    cfg = lambda n, **kw: pipe.generation_config(max_new_tokens=n, stop_strings=(), stop_token_ids=(), **kw)
    first = [Request(PROMPTS[0], photo, cfg(14)), Request(PROMPTS[2], photo, cfg(9, repetition_penalty=1.4))]
    late = Request(PROMPTS[1], photo, cfg(10))
    engine, spy = _spied(pipe)
    ids = [engine.add(r) for r in first]
    events: dict[int, list] = {}
    for _ in range(4):
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    spy.watch = late_id = engine.add(late)
    for rid, evs in _drain(engine).items():
        events.setdefault(rid, []).extend(evs)
    tokens = {rid: [t for ev in evs for t in ev.token_ids] for rid, evs in events.items()}
    solo, solo_spy = _spied(pipe)
    solo_spy.watch = solo.add(late)
    _drain(solo)
    assert tokens[late_id] == [int(x.argmax()) for x in solo_spy.logits]
    batch = pipe.processor([photo], [late.prompt])  # the lock-step loop (generate.py) as the reference
    lockstep = forced_logits(pipe.runtime, batch, torch.tensor([tokens[late_id]]))
    for ours, theirs in zip(solo_spy.logits, lockstep):
        torch.testing.assert_close(ours, theirs[0], rtol=1e-4, atol=1e-4)
    assert len(spy.logits) == len(solo_spy.logits) == 10
    for joined, alone in zip(spy.logits, solo_spy.logits):
        torch.testing.assert_close(joined, alone, rtol=1e-4, atol=1e-4)
    assert [tokens[i] for i in ids] == [_alone(pipe, r) for r in first]
    assert events[late_id][-1].finished == "length" and len(tokens[late_id]) == 10


def test_seeded_sampling_does_not_depend_on_neighbours(pipe, photo):
    sampled = Request(PROMPTS[0], photo, pipe.generation_config(max_new_tokens=12, do_sample=True, temperature=1.5,
                                                                 top_k=30, top_p=0.9, seed=11))
    others = [Request(PROMPTS[1], photo, pipe.generation_config(max_new_tokens=7, do_sample=True, seed=3)),
              Request(PROMPTS[2], photo, pipe.generation_config(max_new_tokens=15))]
    alone = _engine(pipe).run([sampled])[0]
    mixed = _engine(pipe).run([others[0], sampled, others[1]])[1]
    assert (mixed.row.tokens, mixed.row.text) == (alone.row.tokens, alone.row.text)
    reseeded = _engine(pipe).run([Request(sampled.prompt, photo, pipe.generation_config(
        max_new_tokens=12, do_sample=True, temperature=1.5, top_k=30, top_p=0.9, seed=12))])[0]
    assert reseeded.row.tokens != alone.row.tokens  # the seed is the request's own


def test_more_requests_than_slots_queue(photo):
    pipe = Pipeline(load_tiny("minigpt4-tiny"))
    reqs = [Request(PROMPTS[i % 3], photo, pipe.generation_config(max_new_tokens=4 + i)) for i in range(5)]
    engine = _engine(pipe, slots=2)
    ids = [engine.add(r) for r in reqs]
    first = engine.step()
    assert len(engine.running) <= 2 and len(engine.waiting) >= 3
    events = _drain(engine)
    for ev in reversed(first):
        events[ev.request_id].insert(0, ev)
    got = [[t for ev in events[i] for t in ev.token_ids] for i in ids]
    assert got == [_alone(pipe, r) for r in reqs]
    assert not engine.running and not engine.waiting


def test_abort_frees_the_slot_and_unknown_or_finished_ids_are_noops(photo):
    pipe = Pipeline(load_tiny("minigpt4-tiny"))
    engine = _engine(pipe, slots=1)
    long = engine.add(Request(PROMPTS[0], photo, pipe.generation_config(max_new_tokens=40, stop_strings=(), stop_token_ids=())))
    short = engine.add(Request(PROMPTS[2], photo, pipe.generation_config(max_new_tokens=3)))
    engine.step()
    assert list(s.id for s in engine.running.values()) == [long] and engine.waiting
    assert engine.abort(long) is True and not engine.running  # freed at once
    events = engine.step()
    assert [(e.request_id, e.finished) for e in events][0] == (long, "abort")
    assert any(e.request_id == short for e in events)  # the queued request took the slot in the same step
    _drain(engine)
    assert engine.abort(long) is False and engine.abort(short) is False and engine.abort(12345) is False
    assert not engine.has_work()


def test_a_prompt_longer_than_the_context_is_refused(photo):
    pipe = Pipeline(load_tiny("minigpt4-tiny"))
    length = pipe.processor([photo], [PROMPTS[1]])["input_ids"].shape[1]
    engine = _engine(pipe, max_seq=length)
    with pytest.raises(VlmrtError, match="shorten the prompt"):
        engine.add(Request(PROMPTS[1], photo))
    assert not engine.has_work()
    rid = engine.add(Request(PROMPTS[2], photo, pipe.generation_config(max_new_tokens=500)))
    assert "cut from 500" in engine.notes(rid)[0]
    assert _drain(engine)[rid][-1].finished in ("stop", "length")


def test_a_budget_that_holds_no_slot_says_so():
    pipe = Pipeline(load_tiny("minigpt4-tiny"))
    with pytest.raises(VlmrtError, match="kv-cache-gib"):
        Engine(pipe.runtime, pipe.processor, pipe.generation_config(), EngineOptions(kv_cache_gib=1e-6))
    small = Engine(pipe.runtime, pipe.processor, pipe.generation_config(), EngineOptions(kv_cache_gib=0.25, max_slots=64))
    m = pipe.loaded.model
    per_slot = 2 * m.num_layers * m.num_kv_heads * (small.max_seq + 1) * m.head_dim * 4
    assert small.num_slots == min(64, (1 << 28) // per_slot)
    assert small.pool.keys[0].shape == (small.num_slots, m.num_kv_heads, small.max_seq + 1, m.head_dim)


def test_stop_strings_and_stop_tokens_are_per_request(photo):
    pipe = Pipeline(load_tiny("minigpt4-tiny"))
    free_cfg = pipe.generation_config(max_new_tokens=12, stop_strings=(), stop_token_ids=())
    free = _alone(pipe, Request(PROMPTS[0], photo, free_cfg))
    stop_tok = pipe.generation_config(max_new_tokens=12, stop_strings=(), stop_token_ids=((free[4],),))
    engine = _engine(pipe)
    a, b = engine.run([Request(PROMPTS[0], photo, stop_tok), Request(PROMPTS[0], photo, free_cfg)])
    assert a.row.finished == "stop" and a.row.tokens == free[:free.index(free[4]) + 1]
    assert b.row.tokens == free and b.row.finished == "length"
    assert torch.equal(engine.mask, torch.zeros_like(engine.mask))  # every slot freed


def test_serve_bench_runs_the_same_load_on_both_paths(tmp_path):
    from vlmrt.bench_serve import ServeBenchConfig, format_serve, run_serve_bench

    cfg = ServeBenchConfig("minigpt4-tiny", str(tmp_path), requests=4, concurrency=2, answers=(3, 5), probe=False)
    result = run_serve_bench(cfg)
    assert result["engine"]["requests"] == result["one_at_a_time"]["requests"] == 4
    assert result["engine"]["tokens"] == result["one_at_a_time"]["tokens"] >= 12  # exact lengths, stops off
    assert result["engine"]["ttft_ms"]["p99"] >= result["engine"]["ttft_ms"]["p50"] > 0
    assert "tok/s" in format_serve(result) and (tmp_path / "serve.json").is_file()
    with pytest.raises(VlmrtError, match="concurrency"):
        run_serve_bench(ServeBenchConfig("minigpt4-tiny", requests=2, concurrency=0))


def test_cli_kv_cache_budget_too_small_is_one_clear_line(capsys, photo):
    from vlmrt.cli import main

    rc = main(["run", "--model", "minigpt4-tiny", "--image", str(photo), "--prompt", "Hi", "--kv-cache-gib", "1e-9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "raise --kv-cache-gib" in err[0]
    assert main(["run", "--model", "minigpt4-tiny", "--image", str(photo), "--prompt", "Hi", "--max-new-tokens", "3",
                 "--kv-cache-gib", "0.01"]) == 0


def test_a_decode_over_the_window_in_use_equals_one_over_the_whole_slot(photo):
    """A decode attends over the positions in use (rounded up), not all S+1: the logits of the
    running rows equal those of a call over the whole slot, and a padding row (scratch position,
    zero mask) stays finite inside the window. A burst of arrivals is admitted a few per step."""
    from vlmrt.engine import StepInputs, attention_window
    from vlmrt.generate import split_embedded

    pipe = Pipeline(load_tiny("minigpt4-tiny"))
    engine = _engine(pipe, max_prefills=2)
    for p in PROMPTS:
        engine.add(Request(p, photo, pipe.generation_config(max_new_tokens=20, stop_strings=(), stop_token_ids=())))
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 1  # two prefills in the first step
    for _ in range(3):
        engine.step()
    rt, n, scratch = pipe.runtime, len(engine.running), engine.pool.scratch
    used = [engine.running[r].used for r in range(n)]
    slots = torch.tensor([[u] for u in used] + [[scratch]])  # row n: padding
    mask = engine.mask[:n + 1].clone()
    mask[torch.arange(n), slots[:n, 0]] = 1
    embeds, _ = split_embedded(rt.embed(torch.tensor([[5], [7], [9], [0]][:n + 1]), None))
    positions = slots.clone()
    call = lambda window: rt.run_step(StepInputs(0, n + 1, embeds, positions, slots, mask, None, {}, window))
    w, moved = attention_window(StepInputs(0, n + 1, embeds, positions, slots, mask, None, {}, max(used) + 1), scratch)
    assert max(used) < w < scratch and moved[n, 0] == w - 1 and torch.equal(moved[:n], slots[:n])
    whole, windowed = call(None), call(max(used) + 1)
    torch.testing.assert_close(windowed[:n], whole[:n], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(windowed).all()


def test_logprobs_are_the_raw_distribution_s_for_the_rows_that_ask_only(photo):
    """A sampled row asks for 3 top tokens beside a greedy row that asks for none and one that asks
    for 0: values are log_softmax of the lock-step loop's logits (raw: before temperature and top-k),
    asking changes no token, the others' events carry None."""
    pipe = Pipeline(load_tiny("minigpt4-tiny"))
    cfg = lambda **kw: pipe.generation_config(max_new_tokens=6, stop_strings=(), stop_token_ids=(), **kw)
    sampled = dict(do_sample=True, temperature=1.5, top_k=30, seed=5)
    reqs = [Request(PROMPTS[1], photo, cfg()), Request(PROMPTS[0], photo, cfg(logprobs=3, **sampled)),
            Request(PROMPTS[2], photo, cfg(logprobs=0))]
    engine = _engine(pipe)
    ids = [engine.add(r) for r in reqs]
    events = _drain(engine)
    assert all(ev.logprobs is None for ev in events[ids[0]])
    lps = [lp for ev in events[ids[1]] for lp in ev.logprobs or []]
    tokens = [lp.token_id for lp in lps]
    assert tokens == engine.run([Request(PROMPTS[0], photo, cfg(**sampled))])[0].row.tokens
    batch = pipe.processor([photo], [PROMPTS[0]])
    ref = torch.log_softmax(torch.cat(forced_logits(pipe.runtime, batch, torch.tensor([tokens]))), -1)  # [6,V]
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in lps]), ref[range(6), tokens], rtol=0, atol=1e-4)
    top = ref.topk(3, dim=-1)
    assert [[t for t, _ in lp.top] for lp in lps] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in lp.top] for lp in lps]), top.values, rtol=0, atol=1e-4)
    zero = [lp for ev in events[ids[2]] for lp in ev.logprobs or []]
    assert len(zero) == 6 and all(lp.top == () and lp.logprob <= 0 for lp in zero)
    with pytest.raises(VlmrtError, match="logprobs must be None or an integer >= 0"):
        pipe.generation_config(logprobs=-1)
    with pytest.raises(VlmrtError, match="beam search returns no token log-probabilities"):
        pipe.generation_config(logprobs=2, num_beams=2)


def _over(pipe, runtime, slots: int = 4) -> Engine:
    return Engine(runtime, pipe.processor, pipe.generation_config(), EngineOptions(kv_cache_gib=0.25, max_slots=slots))


def test_requests_admitted_together_share_the_calls_and_get_their_solo_and_lockstep_tokens(pipe, photo):
    """Three prompts of different lengths admitted in one step, the last text only: one vision call
    for the two images (patch rows: one per request), one prefill call over rows [0, 3) (padded
    rows: the float mask path; M-RoPE positions beside a text row's); a request joining two steps
    later prefills alone. Every request's tokens equal its run alone and the lock-step loop's (a
    left-padded batch, generate.py); the three share a first-token time, and the stage timers moved."""
    cfg = pipe.generation_config(max_new_tokens=6, stop_strings=(), stop_token_ids=())
    reqs = [Request(p, im, cfg) for p, im in zip(PROMPTS, [photo, photo, None])]
    counter = CallCounter(pipe.runtime)
    engine = _over(pipe, counter)
    ids = [engine.add(r) for r in reqs]
    states = [engine._live[i] for i in ids]
    events: dict[int, list] = {}
    for _ in range(2):
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    late = engine.add(Request(PROMPTS[1], photo, cfg))
    for rid, evs in _drain(engine).items():
        events.setdefault(rid, []).extend(evs)
    rows = pipe.processor([photo], [PROMPTS[0]])["pixel_values"].dim() != 4
    assert counter.vision == (["rows"] * 3 if rows else [2, 1])
    assert counter.prefills == [(0, 3, False), (3, 4, True)]
    tokens = {rid: [t for ev in evs for t in ev.token_ids] for rid, evs in events.items()}
    alone = [_alone(pipe, r) for r in reqs]
    assert [tokens[i] for i in ids] == alone and tokens[late] == alone[1]
    lockstep = generate(pipe.runtime, pipe.processor([photo] * 2, PROMPTS[:2]), cfg, pipe.processor.tokenizer)
    assert lockstep.token_ids == alone[:2]
    assert len({s.first_token for s in states}) == 1
    assert all(s.first_token <= events[i][0].time for s, i in zip(states, ids))
    assert engine.timers["vision_s"] > 0 and engine.timers["prefill_s"] > 0


def test_a_runtime_gets_the_images_and_rows_it_takes_and_the_image_cache_one_entry_per_image(photo):
    """A runtime that takes 2 images a vision call and 2 rows a prefill call gets 3 admitted requests
    as 2 + 1 of each; behind the image cache, one call runs the 2 distinct images (the photo twice is
    one entry), and asking again runs none. Tokens equal each request's alone."""
    from PIL import Image

    from vlmrt.image_cache import CachedVision

    pipe = Pipeline(load_tiny("minigpt4-tiny"))
    cfg = pipe.generation_config(max_new_tokens=4, stop_strings=(), stop_token_ids=())
    reqs = [Request(PROMPTS[0], photo, cfg), Request(PROMPTS[1], Image.new("RGB", (80, 60), (200, 40, 20)), cfg),
            Request(PROMPTS[2], photo, cfg)]
    alone = [_alone(pipe, r) for r in reqs]
    counter = CallCounter(pipe.runtime, vision_batch=2, prefill_rows=2)
    assert [s.row.tokens for s in _over(pipe, counter).run(reqs)] == alone
    assert counter.vision == [2, 1] and counter.prefills == [(0, 2, False), (2, 3, True)]
    cache = CachedVision(CallCounter(pipe.runtime), 1 << 26)
    engine = _over(pipe, cache)
    assert [s.row.tokens for s in engine.run(reqs)] == alone
    assert cache.runtime.vision == [2] and (cache.misses, cache.hits, len(cache.entries)) == (2, 1, 2)
    assert [s.row.tokens for s in engine.run(reqs)] == alone
    assert cache.runtime.vision == [2] and (cache.misses, cache.hits) == (2, 4)


class _FailingVision(CallCounter):
    """A runtime whose vision stage fails on an image of one colour (every channel constant)."""

    def encode_images(self, pixel_values, **named):
        out = super().encode_images(pixel_values, **named)
        if (pixel_values.amax(dim=(-1, -2)) == pixel_values.amin(dim=(-1, -2))).all(-1).any():
            raise RuntimeError("bad image")
        return out


class _SingleImages(CallCounter):
    """A runtime whose vision stage fails on more than one image a call (and says otherwise)."""

    def encode_images(self, pixel_values, **named):
        out = super().encode_images(pixel_values, **named)
        if pixel_values.shape[0] > 1:
            raise RuntimeError("one image a call")
        return out


def test_a_request_whose_stage_fails_fails_alone_when_admitted_with_others(photo):
    """The batched vision call fails, so the three requests are prefilled again one by one: the
    first runs, the bad one fails alone (an "error" event, its slot back, the exception out of the
    step), the third waits for the next step. The events of the failed step come with the next;
    the others' tokens equal their runs alone. A batch that fails where each request runs alone (a
    batching fault, not a bad request) runs them one by one, with a RuntimeWarning."""
    from PIL import Image

    pipe = Pipeline(load_tiny("minigpt4-tiny"))
    cfg = pipe.generation_config(max_new_tokens=4, stop_strings=(), stop_token_ids=())
    reqs = [Request(PROMPTS[0], photo, cfg), Request(PROMPTS[1], Image.new("RGB", (64, 64)), cfg),
            Request(PROMPTS[2], photo, cfg)]
    failing = _FailingVision(pipe.runtime)
    engine = _over(pipe, failing)
    ids = [engine.add(r) for r in reqs]
    with pytest.raises(RuntimeError, match="bad image"):
        engine.step()
    assert failing.vision == [3, 1, 1] and failing.prefills == [(0, 1, True)]
    assert [s.id for s in engine.running.values()] == ids[:1] and [s.id for s in engine.waiting] == ids[2:]
    events = _drain(engine)
    assert [(ev.token_ids, ev.finished) for ev in events[ids[1]]] == [([], "error")]
    tokens = {rid: [t for ev in evs for t in ev.token_ids] for rid, evs in events.items()}
    assert [tokens[ids[0]], tokens[ids[2]]] == [_alone(pipe, reqs[0]), _alone(pipe, reqs[2])]
    assert failing.prefills == [(0, 1, True), (1, 2, True)] and not engine.has_work()
    single = _SingleImages(pipe.runtime)  # a batch fails where each alone runs: tokens as alone, and a warning
    with pytest.warns(RuntimeWarning, match="3 requests admitted together failed as a batch"):
        states = _over(pipe, single).run([reqs[0], reqs[2], reqs[0]])
    assert [s.row.tokens for s in states] == [tokens[ids[0]], tokens[ids[2]], tokens[ids[0]]]
    assert single.vision == [3, 1, 1, 1] and single.prefills == [(0, 1, True), (1, 2, True), (2, 3, True)]
