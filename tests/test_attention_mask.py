"""The mask each decoder call hands SDPA: is_causal (no mask tensor, the T keys just written) for a
fresh, unpadded prefill, an additive float mask in the model's dtype otherwise, never a bool mask,
so that a GPU's SDPA may pick its flash or memory-efficient kernels; and the same logits either way."""

import pytest
import torch

from conftest import load_tiny
from vlmrt.config import GenerationConfig
from vlmrt.generate import generate, split_embedded
from vlmrt.kv_cache import StaticKVCache
from vlmrt.models.layers import attention_bias, causal_mask, is_fresh_prefill
from vlmrt.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_attention_bias_is_the_causal_mask_as_zero_and_minus_inf():
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])  # [B=2,S=5]
    slots = torch.tensor([[2], [3]])  # one query per row
    bias = attention_bias(valid, slots, torch.bfloat16)
    allowed = causal_mask(valid, slots)
    assert bias.dtype == torch.bfloat16 and bias.shape == allowed.shape == (2, 1, 1, 5)
    assert torch.equal(bias == 0, allowed) and torch.isneginf(bias[~allowed]).all()
    assert attention_bias(valid, slots, torch.float32, causal_prefill=True) is None


def test_a_fresh_prefill_is_told_from_its_slots_and_padding():
    ones = torch.ones(2, 8, dtype=torch.long)
    left_padded = ones.clone()
    left_padded[1, 0] = 0
    assert is_fresh_prefill(ones, torch.arange(5))
    assert not is_fresh_prefill(left_padded, torch.arange(5))  # a padded row: the float mask
    assert not is_fresh_prefill(ones, torch.arange(2, 7))  # keys before it in the cache
    assert not is_fresh_prefill(ones, torch.tensor([4]))  # a decode step
    assert not is_fresh_prefill(ones, torch.arange(5).expand(2, 5))  # per-row slots: the engine says so itself


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call of the shared decoder layers (vlmrt/models/layers.py; the vision towers have
    their own): (kind, query length, key length); kind is "causal" (is_causal, no mask) or the
    mask's dtype (None: no mask)."""
    import types

    from vlmrt.models import layers

    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append(("causal" if is_causal else getattr(attn_mask, "dtype", None), q.shape[-2], k.shape[-2]))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    functional = types.SimpleNamespace(**vars(torch.nn.functional))
    functional.scaled_dot_product_attention = spy
    monkeypatch.setattr(layers, "F", functional)
    return calls


@pytest.mark.parametrize("preset", ["minigpt4-tiny", "slimm-tiny"])  # Llama decoder; SliMM's own (M-RoPE, DeepStack)
def test_each_call_picks_its_mask_kind(preset, photo, sdpa_calls):
    pipe = Pipeline(load_tiny(preset))
    layers, cfg = pipe.runtime.model.num_layers, GenerationConfig(max_new_tokens=3)
    generate(pipe.runtime, pipe.processor([photo], ["Hi"]), cfg, pipe.loaded.tokenizer)  # one row: unpadded
    t, s = sdpa_calls[0][1], sdpa_calls[-1][2]
    assert t > 1 and sdpa_calls[:layers] == [("causal", t, t)] * layers  # square: flash-eligible
    assert sdpa_calls[layers:] and set(sdpa_calls[layers:]) == {(torch.float32, 1, s)}  # decode steps
    sdpa_calls.clear()
    generate(pipe.runtime, pipe.processor([photo] * 2, ["Hi", "Describe this image in detail."]), cfg,
             pipe.loaded.tokenizer)  # left-padded rows
    assert {c[0] for c in sdpa_calls} == {torch.float32} and sdpa_calls[0][1] > 1
    sdpa_calls.clear()
    pipe([photo, photo], ["Hi", "Describe this image in detail."], cfg)  # the engine: one prefill, a padded row
    prefills = [c for c in sdpa_calls if c[1] > 1]
    assert len(prefills) == layers and {c[0] for c in prefills} == {torch.float32}
    assert {c[0] for c in sdpa_calls if c[1] == 1} == {torch.float32}
    sdpa_calls.clear()
    pipe([photo, photo], ["Hi", "Hi"], cfg)  # equal prompts: one unpadded prefill of both rows
    prefills = [c for c in sdpa_calls if c[1] > 1]
    assert len(prefills) == layers and all(c[0] == "causal" and c[1] == c[2] for c in prefills)


@pytest.mark.parametrize("preset", ["minigpt4-tiny", "slimm-tiny"])
def test_is_causal_gives_the_float_mask_s_logits(preset, photo):
    pipe = Pipeline(load_tiny(preset))
    rt, batch = pipe.runtime, pipe.processor([photo], ["Describe this image."])
    m = rt.model
    with torch.inference_mode():
        embeds, extras = split_embedded(rt.embed(batch["input_ids"], rt.encode_images(batch["pixel_values"])))  # [1,T,D]
        t = embeds.shape[1]
        positions = batch.get("position_ids", torch.arange(t)[None])
        mask = torch.ones(1, t + 4, dtype=torch.long)

        def logits(causal: bool) -> torch.Tensor:
            cache = StaticKVCache(m.num_layers, 1, m.num_kv_heads, t + 4, m.head_dim, torch.float32, "cpu")
            return m.decode(embeds, positions, mask, torch.arange(t), cache, causal_prefill=causal, **extras)  # [1,T,V]

        causal, masked = logits(True), logits(False)
    assert causal.shape[1] == t
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)
