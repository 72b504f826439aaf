"""The shared generation loop: sampling, stopping, batching with left padding, streaming."""

import pytest
import torch

from conftest import load_tiny
from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.generate import RowText, apply_repetition_penalty, generate, sample_next_token
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
        assert pipe([photo], [p], cfg).token_ids[0] == batch.token_ids[i], p


def test_rows_finish_on_their_own(pipe, photo):
    """Make the first token of row 0 a stop token: row 0 stops at once, row 1 runs to the limit."""
    loaded = pipe.loaded
    proc = pipe.processor
    batch = proc([photo, photo], ["Describe this image.", "What is the person in the picture holding?"])
    free = generate(EagerRuntime(loaded), batch, GenerationConfig(max_new_tokens=6), loaded.tokenizer)
    first0, first1 = free.token_ids[0][0], free.token_ids[1][0]
    if first0 == first1:
        pytest.skip("both rows start with the same token on these weights")
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
