"""Beam search (vlmrt/beam.py): token for token against transformers' `generate(num_beams=3)` on the
same decoder weights and inputs_embeds, identical beams on every runtime, stops, streaming, errors."""

import copy
import dataclasses
import json

import pytest
import torch

from conftest import load_tiny
from families import FAMILY_TESTS
from reference import hf_llama
from vlmrt.beam import _Stops
from vlmrt.cli import build_parser, main
from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.generate import generate
from vlmrt.kv_cache import StaticKVCache
from vlmrt.models import load_model
from vlmrt.pipeline import Pipeline
from vlmrt.processor import Processor
from vlmrt.runtimes.compiled import CompiledRuntime
from vlmrt.runtimes.eager import EagerRuntime
from vlmrt.runtimes.onnx import OnnxRuntime

pytestmark = pytest.mark.usefixtures("one_thread")

N = 24  # new tokens
PADDED = ["Describe this image.", "What is the person wearing?"]  # 116 and 114 tokens: row 1 is left-padded
EVEN = ["Describe this image.", "Tell me a story."]  # 116 tokens each: no padding
FAVOURED = torch.arange(100, 32000, 800)  # 40 token ids
RUNTIME_EOS = (1, 15)  # (row, index) of the eos in the runtime test: one row stops, one runs to N


def _llm_state(model):
    return {k[len("llama_model."):]: v for k, v in model.state_dict().items() if k.startswith("llama_model.")}


@pytest.fixture(scope="module")
def sharp():
    """minigpt4-tiny made to depend on what it made: its head favours 40 tokens (their lm_head rows
    x2, the others x0.7), so beams repeat tokens and the repetition penalty changes the answer, and
    attention outputs are x5, so the next token depends on the cache (a beam fed another beam's
    cache row answers differently). Returns it and transformers' Llama holding its decoder's weights."""
    base = load_tiny("minigpt4-tiny")
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        head = model.llama_model.lm_head.weight  # [V,D]
        scale = torch.full((head.shape[0], 1), 0.7)
        scale[FAVOURED] = 2.0
        head.mul_(scale)
        for layer in model.llama_model.model.layers:
            layer.self_attn.o_proj.weight.mul_(5.0)
    return dataclasses.replace(base, model=model), hf_llama(model.config.decoder, _llm_state(model))


def _batch(loaded, photo, prompts):
    """Two rows; the last 4 prompt tokens are random ids per row (the tiny model's answer hardly
    depends on the rest, and rows that answer alike would hide rows mixed up in the cache)."""
    batch = Processor(loaded.spec, loaded.tokenizer)([photo, photo], prompts)
    batch["input_ids"][:, -4:] = torch.randint(3, 32000, (2, 4), generator=torch.Generator().manual_seed(0))
    return batch


def _ours(runtime, loaded, batch, eos=None, **kw):
    cfg = GenerationConfig(max_new_tokens=N, num_beams=3, stop_token_ids=((eos,),) if eos is not None else (), **kw)
    return generate(runtime, batch, cfg, loaded.tokenizer)


def _theirs(ref, loaded, batch, eos=None, **kw):
    """transformers' beams, and how many forward passes it made (prefill + decode steps)."""
    from transformers import GenerationConfig as HFGenerationConfig

    m = loaded.model
    hf_cfg = HFGenerationConfig(max_new_tokens=N, num_beams=3, do_sample=False, eos_token_id=eos, bos_token_id=None,
                                pad_token_id=0, **kw)
    calls = []
    hook = ref.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            embeds = m.embed(batch["input_ids"], m.encode_images(batch["pixel_values"]))
            out = ref.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], generation_config=hf_cfg)
    finally:
        hook.remove()
    return [r[:r.index(eos) + 1] if eos in r else r for r in out.tolist()], len(calls)  # shorter ones end in eos fill


# transformers 5 skips the first <left padding> *generated* tokens of a row in the repetition penalty
# when the prompt is inputs_embeds (its prompt_ignore_length counts prompt slots that input_ids lacks
# here), so penalty cases use prompts without padding; vlmrt penalises every generated token.
CASES = {  # name -> (prompts, settings, the eos: (row, index) of a token in the answer without one)
    "padded": (PADDED, {}, (0, 2)),
    "penalty": (EVEN, {"repetition_penalty": 1.2}, (0, 2)),
    "early-stopping": (EVEN, {"repetition_penalty": 1.2, "early_stopping": True}, (0, 3)),
    "length-penalty": (PADDED, {"length_penalty": 0.5}, (0, 9)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_beams_match_transformers_with_and_without_an_eos(sharp, photo, case):
    """Same ids, and the search ends at the same step (so finished hypotheses and the rule that
    closes a prompt's search agree, even where the answer would not show it)."""
    loaded, ref = sharp
    prompts, kw, (row, index) = CASES[case]
    batch = _batch(loaded, photo, prompts)
    free = _ours(EagerRuntime(loaded), loaded, batch, **kw)
    assert (free.token_ids, 1 + free.timings["decode_steps"]) == _theirs(ref, loaded, batch, **kw)
    assert free.finish_reasons == ["length", "length"] and free.token_ids[0] != free.token_ids[1]
    eos = free.token_ids[row][index]  # a token the best beam makes mid-answer
    stopped = _ours(EagerRuntime(loaded), loaded, batch, eos, **kw)
    assert (stopped.token_ids, 1 + stopped.timings["decode_steps"]) == _theirs(ref, loaded, batch, eos, **kw)
    assert "stop" in stopped.finish_reasons and stopped.timings["decode_steps"] < N - 1  # the eos ended it early


def test_the_penalty_changes_the_answer(sharp, photo):
    """So the parity above covers it: without it the beams repeat tokens."""
    loaded, _ = sharp
    batch = _batch(loaded, photo, EVEN)
    plain = _ours(EagerRuntime(loaded), loaded, batch)
    penalised = _ours(EagerRuntime(loaded), loaded, batch, repetition_penalty=1.2)
    assert all(len(set(ids)) < N for ids in plain.token_ids) and plain.token_ids != penalised.token_ids


class Recorder:
    """A runtime that notes the cache rows each reorder asks for and what each decode call is fed."""

    def __init__(self, runtime):
        self.runtime, self.rows, self.fed = runtime, [], []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def reorder(self, rows):
        self.rows.append(rows.tolist())
        self.runtime.reorder(rows)

    def decode(self, embeds, position_ids, mask, cache_position, **extras):
        self.fed.append((position_ids.clone(), mask.clone(), cache_position.clone()))
        return self.runtime.decode(embeds, position_ids, mask, cache_position, **extras)


@pytest.fixture(scope="module")
def runtimes(sharp, tmp_path_factory):
    """The sharp model on every runtime (compiled: dynamo's "eager" backend, no Inductor compile time)."""
    from vlmrt.export import export_model

    loaded, _ = sharp
    folder = tmp_path_factory.mktemp("onnx-sharp")
    export_model(loaded, folder, force=True, progress=None)
    return {
        "eager": EagerRuntime(loaded),
        "compiled": CompiledRuntime(loaded, max_batch=8, batch_buckets=(8,), backend="eager"),
        "onnx": OnnxRuntime(load_model(str(folder))),
    }


def test_every_runtime_finds_the_same_beams(sharp, runtimes, photo):
    loaded, _ = sharp
    batch = _batch(loaded, photo, PADDED)
    free = _ours(EagerRuntime(loaded), loaded, batch, repetition_penalty=1.2)
    eos = free.token_ids[RUNTIME_EOS[0]][RUNTIME_EOS[1]]
    results = {}
    for name, runtime in runtimes.items():
        rec = Recorder(runtime)
        results[name] = _ours(rec, loaded, batch, eos, repetition_penalty=1.2)
        assert rec.rows[0] == [0, 0, 0, 1, 1, 1]  # the first reorder fans each prompt out to its beams
        assert any(r != list(range(6)) for r in rec.rows[1:]), name  # beams took other beams' rows
    eager = results["eager"]
    assert "stop" in eager.finish_reasons and "length" in eager.finish_reasons
    for name, out in results.items():
        assert (out.token_ids, out.texts, out.finish_reasons) == (eager.token_ids, eager.texts, eager.finish_reasons), \
            name


@pytest.mark.parametrize("family", sorted(FAMILY_TESTS))
def test_every_family_feeds_beams_as_the_greedy_loop_feeds_rows(family):
    """Every family (M-RoPE positions, DeepStack extras, image slices), a left-padded batch: prefill
    gets the greedy loop's inputs, each decode step gives beam j of row b row b's positions, mask and
    slot; and each row's beams equal the row's search alone."""
    from PIL import Image

    from conftest import ASSETS

    pipe, beams = Pipeline(load_tiny(FAMILY_TESTS[family]["tiny"])), 3
    photo = Image.open(ASSETS / "astronaut.jpg").convert("RGB").resize((192, 128))  # few patches: fast
    images, prompts = [photo, photo.transpose(Image.FLIP_LEFT_RIGHT)], ["Hi", "What is in this picture? Describe it."]
    batch = pipe.processor(images, prompts)
    greedy_cfg = GenerationConfig(max_new_tokens=6)
    greedy, beam = Recorder(pipe.runtime), Recorder(pipe.runtime)
    generate(greedy, batch, greedy_cfg, pipe.loaded.tokenizer)
    out = generate(beam, batch, dataclasses.replace(greedy_cfg, num_beams=beams), pipe.loaded.tokenizer)
    assert len(beam.fed) == len(greedy.fed) == 6
    for i, ((pos, mask, slot), (bpos, bmask, bslot)) in enumerate(zip(greedy.fed, beam.fed)):
        if i:  # decode steps: [...,B,1] positions, [B,S] masks -> one copy per beam
            pos, mask = pos.repeat_interleave(beams, dim=-2), mask.repeat_interleave(beams, dim=0)
        assert torch.equal(bpos, pos) and torch.equal(bmask, mask) and torch.equal(bslot, slot), i
    cfg = dataclasses.replace(greedy_cfg, num_beams=beams, max_new_tokens=12, repetition_penalty=1.2)
    assert pipe(images, prompts, cfg).token_ids == [pipe([i], [p], cfg).token_ids[0] for i, p in zip(images, prompts)]
    assert out.finish_reasons == ["length", "length"]


def test_cache_reorder_copies_rows_in_place():
    cache = StaticKVCache(2, 4, 1, 5, 2, torch.float32, "cpu")
    for t in cache.keys + cache.values:
        t.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand_as(t))  # row i holds i
    addresses = [t.data_ptr() for t in cache.keys + cache.values]
    cache.reorder(torch.tensor([2, 2, 0]), seq=3)
    for t in cache.keys + cache.values:
        assert t[:, 0, :3, 0].tolist() == [[2.0] * 3, [2.0] * 3, [0.0] * 3, [3.0] * 3]
        assert t[:, 0, 3:, 0].tolist() == [[0.0] * 2, [1.0] * 2, [2.0] * 2, [3.0] * 2]  # slots past seq untouched
    assert [t.data_ptr() for t in cache.keys + cache.values] == addresses


def test_stop_sequences_and_strings_end_candidates():
    tok = load_tiny("minigpt4-tiny").tokenizer
    the, cat, hashes, hash_, sat = 259, 688, 2277, 29937, 2844  # ▁the ▁cat ## # ▁sat
    cand = torch.tensor([[[the, cat, hashes, hash_], [the, sat, cat, hashes], [the, hashes, cat, sat]]])  # [1,3,4]
    cand = torch.cat([cand, torch.zeros(1, 3, 2, dtype=torch.long)], dim=2)  # N = 6, n + 1 = 4 tokens made
    by_ids = _Stops(GenerationConfig(stop_token_ids=((hashes, hash_), (sat,))), tok, "cpu")
    assert by_ids.hits(cand, 3).tolist() == [[True, False, True]]
    by_text = _Stops(GenerationConfig(stop_strings=("cat##",)), tok, "cpu")  # spans two tokens
    assert by_text.hits(cand, 3).tolist() == [[True, True, False]]
    assert by_text.hits(cand, 5).tolist() == [[True, True, True]]  # the last token ends every candidate


def test_a_stop_string_ends_hypotheses_as_its_token_does(sharp, photo):
    """A stop string that only one token makes (here) ends the same hypotheses, inside the search, as
    that token's id. The winners are not the answers of a search without stops cut short, which is
    all that cutting the string out of the final text would give."""
    loaded, _ = sharp
    batch = _batch(loaded, photo, PADDED)
    free = _ours(EagerRuntime(loaded), loaded, batch, repetition_penalty=1.2)
    token = free.token_ids[0][3]
    text = loaded.tokenizer.convert_ids_to_tokens(token).replace("\u2581", " ")  # " batcea"
    by_id = _ours(EagerRuntime(loaded), loaded, batch, token, repetition_penalty=1.2)
    by_text = _ours(EagerRuntime(loaded), loaded, batch, stop_strings=(text,), repetition_penalty=1.2)
    assert all(ids != cut[:len(ids)] for ids, cut in zip(by_id.token_ids, free.token_ids))
    assert by_text.finish_reasons == ["stop", "stop"] and not any(text in t for t in by_text.texts)
    assert (by_text.token_ids, by_text.texts) == (by_id.token_ids, by_id.texts)


def test_text_is_passed_once_at_the_end(photo):
    loaded = load_tiny("minigpt4-tiny")
    calls = []
    cfg = GenerationConfig(max_new_tokens=8, num_beams=2)
    out = generate(EagerRuntime(loaded), _batch(loaded, photo, PADDED), cfg, loaded.tokenizer,
                   on_text=lambda row, text: calls.append((row, text)))
    assert calls == [(0, out.texts[0]), (1, out.texts[1])] and all(out.texts)


def test_one_beam_is_the_greedy_loop(photo, monkeypatch):
    import vlmrt.beam

    loaded = load_tiny("minigpt4-tiny")
    batch = _batch(loaded, photo, PADDED)
    monkeypatch.setattr(vlmrt.beam, "beam_search", lambda *a, **k: pytest.fail("beam search ran for num_beams=1"))
    one = generate(EagerRuntime(loaded), batch, GenerationConfig(max_new_tokens=8, num_beams=1), loaded.tokenizer)
    greedy = generate(EagerRuntime(loaded), batch, GenerationConfig(max_new_tokens=8), loaded.tokenizer)
    assert one.token_ids == greedy.token_ids


def test_bad_beam_settings_are_clear_errors(photo):
    with pytest.raises(VlmrtError, match="sampling is not supported"):
        GenerationConfig(num_beams=3, do_sample=True)
    for bad in (0, -1, 2.5):
        with pytest.raises(VlmrtError, match="num_beams must be an integer >= 1"):
            GenerationConfig(num_beams=bad)

    class NoReorder:
        name = "plain"

    loaded = load_tiny("minigpt4-tiny")
    with pytest.raises(VlmrtError, match="plain runtime cannot reorder its KV cache"):
        generate(NoReorder(), _batch(loaded, photo, PADDED), GenerationConfig(num_beams=2), loaded.tokenizer)
    small = CompiledRuntime(loaded, max_batch=4, backend="eager")  # 2 prompts x 3 beams do not fit 4 rows
    with pytest.raises(VlmrtError, match=r"above the compiled runtime's cache maximum of 4.*2 prompt\(s\) x 3 beams = 6"):
        generate(small, _batch(loaded, photo, PADDED), GenerationConfig(num_beams=3), loaded.tokenizer)


def test_cli_num_beams(capsys, photo):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    assert "--num-beams" in capsys.readouterr().out
    args = ["run", "--model", "minigpt4-tiny", "--image", str(photo), "--prompt", "Describe this image.",
            "--max-new-tokens", "8", "--num-beams", "3"]
    assert main(args + ["--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["answers"][0]
    loaded = load_tiny("minigpt4-tiny")
    batch = Processor(loaded.spec, loaded.tokenizer)([photo], ["Describe this image."])
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3, stop_token_ids=loaded.spec.stop_token_ids,
                           stop_strings=loaded.spec.stop_strings)
    assert answer["token_ids"] == generate(EagerRuntime(loaded), batch, cfg, loaded.tokenizer).token_ids[0]
    assert main(args + ["--temperature", "0.7"]) == 2
    assert "sampling is not supported" in capsys.readouterr().err
