"""The shared generation loop: sampling, stopping, batching with left padding, streaming."""

import itertools
import random

import pytest
import torch

import vlmrt.generate
from conftest import load_tiny
from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.generate import (RowText, apply_repetition_penalty, byte_piece_ids, decode_one_token, generate, prefill,
                            prompt_positions, sample_next_token)
from vlmrt.pipeline import Pipeline
from vlmrt.runtimes.eager import EagerRuntime


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(load_tiny("minigpt4-tiny"))


def test_repetition_penalty_follows_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_top_k_1_is_greedy_and_sampling_is_seeded():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    history = torch.zeros(4, 0, dtype=torch.long)
    k1 = GenerationConfig(do_sample=True, top_k=1)
    assert torch.equal(sample_next_token(logits, history, k1, torch.Generator().manual_seed(1)), logits.argmax(-1))
    cfg = GenerationConfig(do_sample=True, temperature=1.5, top_p=0.9)
    a = sample_next_token(logits, history, cfg, torch.Generator().manual_seed(7))
    b = sample_next_token(logits, history, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = GenerationConfig(do_sample=True, top_p=0.7)
    seen = {int(sample_next_token(logits, torch.zeros(1, 0, dtype=torch.long), cfg, torch.Generator().manual_seed(s)))
            for s in range(200)}
    assert seen == {0, 1}


def test_bad_sampling_settings_are_rejected():
    with pytest.raises(VlmrtError):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(VlmrtError):
        GenerationConfig(do_sample=True, temperature=0.0)
    with pytest.raises(VlmrtError):
        GenerationConfig(top_p=1.5)


class _Tok:
    """A tokenizer whose token i decodes to the i-th word of a fixed list."""

    words = ["", " the", " cat", " #", "##", " sat", "\n", " end"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.words[i] for i in ids)


def test_stop_string_is_cut_and_never_streamed():
    row = RowText(_Tok(), GenerationConfig(stop_strings=("###",)))
    pieces = [row.push(t) for t in (1, 2, 3, 4)]  # " the cat ###"
    assert row.finished == "stop" and row.text == " the cat "
    assert "".join(pieces) == " the cat "


def test_stop_token_sequence_finishes_the_row():
    row = RowText(_Tok(), GenerationConfig(stop_token_ids=((6, 7),)))
    for t in (1, 5, 6):
        row.push(t)
    assert row.finished is None
    row.push(7)
    assert row.finished == "stop" and row.text == " the sat" and row.tokens == [1, 5, 6, 7]


def test_streamed_pieces_add_up_to_the_answer(pipe, photo):
    pieces = []
    out = pipe([photo], ["Describe this image."], pipe.generation_config(max_new_tokens=24),
               on_text=lambda row, text: pieces.append(text))
    assert "".join(pieces) == out.texts[0] and len(out.token_ids[0]) == 24


def test_each_row_of_a_left_padded_batch_matches_its_solo_run(pipe, photo):
    prompts = ["Describe this image.", "What is the person in the picture holding in the left hand?", "Hi"]
    cfg = pipe.generation_config(max_new_tokens=16, stop_token_ids=(), stop_strings=())
    batch = pipe([photo] * 3, prompts, cfg)
    for i, p in enumerate(prompts):
        solo = pipe([photo], [p], cfg)
        assert solo.token_ids[0] == batch.token_ids[i], p
        assert batch.row_prompt_tokens[i] == solo.prompt_tokens == solo.row_prompt_tokens[0], p  # padding left out
    assert batch.prompt_tokens == max(batch.row_prompt_tokens) > min(batch.row_prompt_tokens)


def test_rows_finish_on_their_own(pipe, photo):
    """Make the first token of row 0 a stop token: row 0 stops at once, row 1 runs to the limit."""
    loaded = pipe.loaded
    proc = pipe.processor
    batch = proc([photo, photo], ["Describe this image.", "What is the person in the picture holding?"])
    free = generate(EagerRuntime(loaded), batch, GenerationConfig(max_new_tokens=6), loaded.tokenizer)
    first0, first1 = free.token_ids[0][0], free.token_ids[1][0]
    assert first0 != first1, "the synthetic weights must answer two prompts differently (vlmrt/weights.py)"
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=((first0,),))
    out = generate(EagerRuntime(loaded), batch, cfg, loaded.tokenizer)
    assert out.finish_reasons == ["stop", "length"]
    assert out.token_ids[0] == [first0] and out.token_ids[1] == free.token_ids[1]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(pipe, photo):
    cfg = pipe.generation_config(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=50, seed=3)
    a = pipe([photo], ["Describe this image."], cfg).token_ids
    b = pipe([photo], ["Describe this image."], cfg).token_ids
    greedy = pipe([photo], ["Describe this image."], pipe.generation_config(max_new_tokens=16)).token_ids
    assert a == b and a != greedy


def test_prompt_longer_than_the_context_is_rejected(pipe, photo):
    with pytest.raises(VlmrtError, match="context is 512; shorten the prompt"):
        pipe([photo], ["word " * 600], pipe.generation_config(max_new_tokens=4))


def test_answer_is_cut_to_fit_the_context(pipe, photo):
    out = pipe([photo], ["the " * 380], pipe.generation_config(max_new_tokens=200, stop_token_ids=(), stop_strings=()))
    assert out.prompt_tokens + len(out.token_ids[0]) == 512 and out.notes


# ----------------------------------------------------------------------------- incremental text, stops seen late
def reference_stop(tokens: list[int], cfg: GenerationConfig, tok) -> tuple[str, str] | None:
    """Brute force, as the loop once did after every token: (reason, answer) when `tokens` ends the
    row, else None. Stop token sequences first (the first listed wins), then stop strings in a full
    decode of the rest."""
    body = tokens
    for seq in cfg.stop_token_ids:
        if tuple(tokens[-len(seq):]) == tuple(seq):
            body = tokens[:-len(seq)]
            break
    text = tok.decode(body, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in cfg.stop_strings) if i >= 0), default=-1)
    if cut >= 0 or body is not tokens:
        return "stop", text[:cut] if cut >= 0 else text
    return None


def reference_answer(tokens: list[int], cfg: GenerationConfig, tok) -> tuple[list[int], str, str]:
    """(tokens kept, answer, finish reason) of a row fed `tokens`."""
    for k in range(1, len(tokens) + 1):
        stop = reference_stop(tokens[:k], cfg, tok)
        if stop:
            return tokens[:k], stop[1], stop[0]
    return tokens, tok.decode(tokens, skip_special_tokens=True), "length"


def byte_level_bpe():
    """A GPT-2 style byte-level BPE trained here on a few lines (multi-byte characters included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["the cat sat on the mat ###", "naïve café costs 5 € 日本語のテキスト 😀👍", "hello world\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


@pytest.fixture(scope="module")
def tokenizers_under_test():
    sentencepiece = load_tiny("minigpt4-tiny").tokenizer  # Unigram, byte fallback, drops a leading space
    return {"sentencepiece": sentencepiece, "byte-level": byte_level_bpe()}


def random_ids(tok, rng: random.Random, n: int) -> list[int]:
    """Mostly ids that make decoding hard: byte pieces (incomplete and invalid UTF-8), special
    tokens, word pieces with a leading space."""
    byte_ids = sorted(byte_piece_ids(tok) - set(tok.all_special_ids))
    words = tok.convert_tokens_to_ids(["\u2581the", "\u2581#", "#", "\u2581###"]) if byte_ids else []
    pools = [byte_ids, words, tok.all_special_ids, range(len(tok))]
    return [rng.choice(rng.choice([p for p in pools if p])) for _ in range(n)]


@pytest.mark.parametrize("name", ["sentencepiece", "byte-level"])
def test_incremental_text_equals_a_full_decode_on_random_tokens(tokenizers_under_test, name):
    tok, rng = tokenizers_under_test[name], random.Random(0)
    settled, unsettled = 0, byte_piece_ids(tok)
    for _ in range(300):
        ids = random_ids(tok, rng, rng.randrange(1, 40))
        row, streamed = RowText(tok, GenerationConfig()), ""
        for i, t in enumerate(ids):
            streamed += row.push(t)
            full = tok.decode(ids[: i + 1], skip_special_tokens=True)
            assert full.startswith(streamed), (ids[: i + 1], streamed, full)
            if full and t not in unsettled and not full.endswith("\ufffd"):
                assert streamed == full, ids[: i + 1]  # text is held back only while it may change
                settled += 1
        streamed += row.finish("length")
        assert streamed == row.text == tok.decode(ids, skip_special_tokens=True), ids
    assert settled > 1000


@pytest.mark.parametrize("name", ["sentencepiece", "byte-level"])
def test_stops_on_random_tokens_match_a_full_decode_after_every_token(tokenizers_under_test, name):
    """Stop strings cut out of the text (so they span tokens and multi-byte characters) and stop
    token pairs: same tokens kept, answer and reason as brute force; nothing of a stop streamed."""
    tok, rng = tokenizers_under_test[name], random.Random(1)
    stopped = 0
    for trial in range(300):
        ids = random_ids(tok, rng, rng.randrange(2, 40))
        text, a = tok.decode(ids, skip_special_tokens=True), rng.randrange(len(ids) - 1)
        at = rng.randrange(max(1, len(text) - 1))
        strings = (text[at:at + rng.randrange(1, 6)], "###") if trial % 2 and text else ()
        cfg = GenerationConfig(stop_strings=strings, stop_token_ids=((ids[a], ids[a + 1]),) if trial % 3 else ())
        row, streamed = RowText(tok, cfg, track=trial % 4 != 0), []
        for t in ids:
            streamed.append(row.push(t))
            assert not any(s and s in "".join(streamed) for s in strings)
            if row.finished:
                break
        streamed.append(row.finish("length"))
        kept, answer, reason = reference_answer(ids, cfg, tok)
        assert (row.tokens, row.text, row.finished) == (kept, answer, reason), (ids, cfg)
        assert "".join(streamed) == answer
        stopped += reason == "stop"
    assert stopped > 100


class Recorder:
    """Wraps a runtime: notes what each decode step is fed (positions, mask, cache slot) and, as
    `sample`, the history each sampling call penalises."""

    def __init__(self, runtime):
        self.runtime, self.steps, self.histories = runtime, [], []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def decode(self, embeds, position_ids, mask, cache_position, **extras):
        if embeds.shape[1] == 1:
            self.steps.append((position_ids.clone(), mask.clone(), cache_position.clone()))
        return self.runtime.decode(embeds, position_ids, mask, cache_position, **extras)

    def sample(self, logits, history, cfg, generator):
        self.histories.append(history.clone())
        return sample_next_token(logits, history, cfg, generator)


def reference_generate(runtime: Recorder, batch, cfg, tok):
    """The loop as it was: host reads each token at once, full decode per token, pad fed to a
    finished row from the next step, history grown with torch.cat. 2-D positions only."""
    ids, (b, t), n = batch["input_ids"], batch["input_ids"].shape, cfg.max_new_tokens
    runtime.start(b, t + n)
    mask = torch.zeros(b, t + n, dtype=torch.long)
    mask[:, :t] = batch["attention_mask"]
    positions = prompt_positions(batch)
    position, gen = positions[:, -1], torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None
    embeds = runtime.embed(ids, runtime.encode_images(batch["pixel_values"]))
    token = runtime.sample(prefill(runtime, embeds, mask, positions), torch.zeros(b, 0, dtype=torch.long), cfg, gen)
    history, rows, reasons = token[:, None], [[] for _ in range(b)], [None] * b
    while True:
        for i, x in enumerate(token.tolist()):
            if reasons[i] is None:
                rows[i].append(x)
                reasons[i] = (reference_stop(rows[i], cfg, tok) or (None,))[0]
        if all(reasons) or history.shape[1] >= n:
            break
        fed = torch.where(torch.tensor([r is not None for r in reasons]), cfg.pad_token_id, token)
        mask[:, t + history.shape[1] - 1] = 1
        position = position + 1
        logits = decode_one_token(runtime, fed, position, mask, t + history.shape[1] - 1)
        token = runtime.sample(logits, history, cfg, gen)
        history = torch.cat([history, token[:, None]], dim=1)
    return [reference_answer(r, cfg, tok) for r in rows]


@pytest.mark.parametrize("sampling", [False, True])
def test_stops_seen_late_do_not_change_outputs(pipe, photo, sampling, monkeypatch):
    """Rows stopping at different steps (a stop token, a stop token pair, a stop string, the
    length). With 0, 1 or 3 steps of lookahead, streaming or not, the loop returns what the
    reference loop returns, feeds every step the same positions, mask and slot, and penalises the
    same history for every row still running; lookahead adds at most that many steps at the end."""
    loaded, tok = pipe.loaded, pipe.loaded.tokenizer
    prompts = ["Describe this image.", "What is the person in the picture holding?", "Hi", "What colour is the sky?"]
    batch = pipe.processor([photo] * 4, prompts)
    knobs = dict(do_sample=True, temperature=1.3, top_k=40, top_p=0.95, seed=5) if sampling else {}
    free_cfg = GenerationConfig(max_new_tokens=14, repetition_penalty=1.3, pad_token_id=7, **knobs)
    free = generate(EagerRuntime(loaded), batch, free_cfg, tok).token_ids
    spanning = tok.decode(free[2][10:12], skip_special_tokens=True)[3:11]  # crosses a token boundary
    cfg = GenerationConfig(**{**free_cfg.__dict__, "stop_token_ids": ((free[1][3],), tuple(free[0][8:10])),
                              "stop_strings": (spanning,)})
    ref = Recorder(EagerRuntime(loaded))
    expected = [tuple(e) for e in reference_generate(ref, batch, cfg, tok)]
    assert len({len(kept) for kept, _, _ in expected}) >= 3, "rows should stop at different steps"
    for lookahead, stream in itertools.product((0, 1, 3), (True, False)):
        pieces, rec = [""] * 4, Recorder(EagerRuntime(loaded))
        monkeypatch.setattr(vlmrt.generate, "sample_next_token", rec.sample)
        on_text = (lambda i, s: pieces.__setitem__(i, pieces[i] + s)) if stream else None
        out = generate(rec, batch, cfg, tok, on_text=on_text, lookahead=lookahead)
        assert list(zip(out.token_ids, out.texts, out.finish_reasons)) == expected, (lookahead, stream)
        assert pieces == (out.texts if stream else [""] * 4)
        assert out.timings["decode_steps"] == len(ref.steps) == max(map(len, out.token_ids)) - 1
        assert len(ref.steps) <= len(rec.steps) <= len(ref.steps) + lookahead
        assert len(rec.histories) == len(rec.steps) + 1  # the sampler was recorded (prefill included)
        for a, b in zip(ref.steps, rec.steps):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        for j, (a, b) in enumerate(zip(ref.histories, rec.histories)):
            running = [i for i, (kept, _, _) in enumerate(expected) if len(kept) > j]
            assert torch.equal(a[running], b[running]), j
