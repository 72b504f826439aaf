"""`logprobs` / `top_logprobs` with the official openai client: the values are log_softmax of the
logits the eager runtime gives for the same tokens (the lock-step loop, not the engine), the tokens
spell the answer, streamed chunks carry the same values, each of `n` choices its own; bad values 400."""

import math
import random

import pytest
import torch

from conftest import load_tiny
from serve_helpers import data_url, running
from families import FAMILY_TESTS
from vlmrt.generate import forced_logits
from vlmrt.pipeline import Pipeline

openai = pytest.importorskip("openai", reason="the test extra: pip install 'vlmrt[test]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install 'vlmrt[serve]'")

from vlmrt.serve_logprobs import TokenPieces, _byte_decoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS, TOP, QUESTION = 6, 5, "Describe this image."


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(load_tiny("minigpt4-tiny"))


@pytest.fixture(scope="module")
def client(pipe):
    with running(pipe, max_batch=4) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def messages(photo):
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                         {"type": "image_url", "image_url": {"url": data_url(photo)}}]}]


def ask(client, messages, **fields):
    return client.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=TOKENS, logprobs=True,
                                          **{"top_logprobs": TOP, **fields})


@pytest.fixture(scope="module")
def greedy(client, messages):
    return ask(client, messages)


def table(content) -> list[tuple]:
    return [(t.token, t.logprob, tuple(t.bytes), tuple((x.token, x.logprob) for x in t.top_logprobs)) for t in content]


def test_greedy_logprobs_are_the_model_s_and_spell_the_answer(greedy, pipe, photo):
    choice = greedy.choices[0]
    content = choice.logprobs.content
    assert choice.finish_reason == "length" and len(content) == TOKENS == greedy.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == TOP
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs), abs=1e-6)  # greedy: the top one
        assert t.token == t.top_logprobs[0].token
        assert sum(math.exp(x.logprob) for x in t.top_logprobs) <= 1 + 1e-5
    assert b"".join(bytes(t.bytes) for t in content).decode() == choice.message.content
    if all(bytes(t.bytes).decode("utf-8", "ignore").encode() == bytes(t.bytes) for t in content):
        assert "".join(t.token for t in content) == choice.message.content

    # the reference: the eager runtime's logits for the same tokens, by the lock-step verbs
    ids = pipe([photo], [QUESTION], pipe.generation_config(max_new_tokens=TOKENS)).token_ids[0]
    batch = pipe.processor([photo], [QUESTION])
    with torch.inference_mode():
        ref = torch.log_softmax(torch.cat(forced_logits(pipe.runtime, batch, torch.tensor([ids]))).float(), -1)  # [N,V]
    top = ref.topk(TOP, dim=-1)
    assert ref.argmax(-1).tolist() == ids
    torch.testing.assert_close(torch.tensor([t.logprob for t in content]), ref[range(TOKENS), ids], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor([[x.logprob for x in t.top_logprobs] for t in content]), top.values,
                               atol=1e-4, rtol=0)


def test_stream_chunks_carry_the_same_logprobs(greedy, client, messages):
    chunks = list(ask(client, messages, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == greedy.choices[0].message.content
    for a, b in zip(table(streamed), table(greedy.choices[0].logprobs.content), strict=True):
        assert a[0] == b[0] and a[2] == b[2] and a[1] == pytest.approx(b[1], abs=1e-5)
        assert [x[0] for x in a[3]] == [x[0] for x in b[3]]


def test_each_of_n_sampled_choices_has_its_own_logprobs(client, messages):
    out = ask(client, messages, n=2, temperature=1.5, seed=3, top_logprobs=0)
    tokens = []
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) == out.usage.completion_tokens // 2 and all(t.top_logprobs == [] for t in content)
        assert b"".join(bytes(t.bytes) for t in content).decode(errors="replace") == choice.message.content
        tokens.append([t.token for t in content])
    assert tokens[0] != tokens[1]  # seeds 3 and 4 sample different answers
    streamed = list(ask(client, messages, n=2, temperature=1.5, seed=3, top_logprobs=0, stream=True))
    for i, choice in enumerate(out.choices):
        mine = [t.logprob for c in streamed for ch in c.choices if ch.index == i and ch.logprobs
                for t in ch.logprobs.content]
        assert mine == pytest.approx([t.logprob for t in choice.logprobs.content], abs=1e-5)


def test_no_logprobs_unless_asked(client, messages):
    for fields in ({}, {"top_logprobs": 0}, {"logprobs": False}):
        out = client.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=2, **fields)
        assert out.choices[0].logprobs is None


@pytest.mark.parametrize("fields, message", [
    ({"logprobs": True, "top_logprobs": 21}, "`top_logprobs` must be an integer in [0, 20]"),
    ({"top_logprobs": 2}, "`top_logprobs` needs `logprobs` set to true"),
    ({"logprobs": "yes"}, "`logprobs` must be true or false"),
    ({"logprobs": True, "extra_body": {"num_beams": 2}}, "`logprobs` with `num_beams` > 1 is not served"),
])
def test_bad_logprobs_fields_are_a_400(client, messages, fields, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=2, **fields)
    assert e.value.status_code == 400 and message in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("family", sorted(FAMILY_TESTS))
def test_token_bytes_spell_the_decoded_text_for_every_family(family):
    """Random ids (byte pieces and invalid UTF-8 runs included): the pieces' bytes join into the
    tokenizer's own decode (SentencePiece for some families, byte-level BPE for Qwen-VL)."""
    tok = load_tiny(FAMILY_TESTS[family]["tiny"]).tokenizer
    pieces, rng, special = TokenPieces(tok), random.Random(0), set(tok.all_special_ids)
    for _ in range(20):
        ids = [i for i in (rng.randrange(len(tok)) for _ in range(12)) if i not in special]
        joined = b"".join(pieces.piece(t, k == 0) for k, t in enumerate(ids))
        assert joined.decode(errors="replace") == tok.decode(ids, skip_special_tokens=True)


def test_the_byte_level_table_is_gpt2_s():
    from tokenizers import pre_tokenizers

    table = _byte_decoder(load_tiny("qwen-vl-tiny").tokenizer)
    assert sorted(table) == sorted(pre_tokenizers.ByteLevel.alphabet()) and sorted(table.values()) == list(range(256))
    assert table["\u0120"] == ord(" ") and table["A"] == ord("A")  # GPT-2's "Ġ" is the space
