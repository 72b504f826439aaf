"""Reference parity: our MiniGPT-4 stages vs transformers' Blip2VisionModel, Blip2QFormerModel and
LlamaForCausalLM built from the same tiny config and weights (fp32, CPU)."""

import copy

import pytest
import torch

from conftest import load_tiny
from reference import hf_blip2_vision, hf_llama, hf_qformer
from vlmrt.config import GenerationConfig
from vlmrt.kv_cache import StaticKVCache
from vlmrt.runtimes.eager import EagerRuntime
from vlmrt.generate import generate

TOL = 1e-4  # max abs difference in fp32


@pytest.fixture(scope="module")
def tiny():
    return load_tiny("minigpt4-tiny")


def _llm_state(model):
    return {k[len("llama_model."):]: v for k, v in model.state_dict().items() if k.startswith("llama_model.")}


def _our_logits(model, embeds, mask):
    b, t, _ = embeds.shape
    cache = StaticKVCache(model.num_layers, b, model.num_kv_heads, t, model.head_dim, torch.float32, "cpu")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model.decode(embeds, pos, mask, torch.arange(t), cache)


def _vision_diff(model, ref):
    torch.manual_seed(0)
    px = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size)
    with torch.no_grad():
        ours = model.ln_vision(model.visual_encoder(px))
        theirs = ref(pixel_values=px).last_hidden_state
    return (ours - theirs).abs().max().item()


def test_vision_tower_matches_blip2_vision_model(tiny):
    m = tiny.model
    ref = hf_blip2_vision(m.config.vision, m.config.ln_vision_eps, m.state_dict())
    assert _vision_diff(m, ref) <= TOL


def test_qformer_matches_blip2_qformer_model(tiny):
    m = tiny.model
    ref = hf_qformer(m.config.qformer, m.config.vision.width, m.state_dict())
    torch.manual_seed(0)
    image = torch.randn(2, m.config.vision.num_patches + 1, m.config.vision.width)
    q = m.query_tokens.expand(2, -1, -1)
    with torch.no_grad():
        ours = m.Qformer(q, image)
        theirs = ref(query_embeds=q, encoder_hidden_states=image).last_hidden_state
    assert (ours - theirs).abs().max().item() <= TOL


def test_decoder_logits_match_llama_for_causal_lm(tiny):
    m = tiny.model
    ref = hf_llama(m.config.decoder, _llm_state(m))
    torch.manual_seed(0)
    ids = torch.randint(3, 32000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding in row 1
    with torch.no_grad():
        embeds = m.embed(ids, None)
        ours = _our_logits(m, embeds, mask)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= TOL


def test_greedy_loop_matches_hf_generate(tiny, photo):
    from vlmrt.processor import Processor

    m = tiny.model
    ref = hf_llama(m.config.decoder, _llm_state(m))
    batch = Processor(tiny.spec, tiny.tokenizer)([photo, photo], ["Describe this image.", "What is the person wearing?"])
    cfg = GenerationConfig(max_new_tokens=32)
    ours = generate(EagerRuntime(tiny), batch, cfg, tiny.tokenizer)
    with torch.no_grad():
        embeds = m.embed(batch["input_ids"], m.encode_images(batch["pixel_values"]))
        out = ref.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=32,
                           min_new_tokens=32, do_sample=False, pad_token_id=0)
    assert [list(r) for r in out.tolist()] == ours.token_ids


def test_parity_checks_catch_a_perturbed_weight(tiny):
    """The tolerances above are tight enough to see a small change in one weight."""
    m = copy.deepcopy(tiny.model)
    ref = hf_blip2_vision(m.config.vision, m.config.ln_vision_eps, m.state_dict())
    with torch.no_grad():
        m.visual_encoder.blocks[1].attn.v_bias.add_(0.01)
    assert _vision_diff(m, ref) > TOL
    ref_llm = hf_llama(m.config.decoder, _llm_state(m))
    with torch.no_grad():
        m.llama_model.model.layers[0].mlp.down_proj.weight[0, 0] += 0.05
        embeds = m.embed(torch.randint(3, 32000, (1, 8)), None)
        mask = torch.ones(1, 8, dtype=torch.long)
        diff = (_our_logits(m, embeds, mask) - ref_llm(inputs_embeds=embeds).logits).abs().max().item()
    assert diff > TOL
