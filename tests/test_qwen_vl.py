"""Qwen-VL family: reference parity (decoder vs transformers' Qwen2ForCausalLM, vision vs CLIPEncoder
+ nn.MultiheadAttention), the resampler and the head-interleaved in_proj on tiny shapes, the
qwen.tiktoken tokenizer vs tiktoken's algorithm, prompt layout, loader round trips in the release's
file layout and key names (../shared/models/SPEC.md 3.7), bad inputs, and the CLI."""

import base64
import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import load_tiny
from vlmrt.errors import VlmrtError
from vlmrt.kv_cache import StaticKVCache
from vlmrt.models import load_model
from vlmrt.models import qwen_vl as Q
from vlmrt.models.layers import Resampler, sincos_2d_pos_embed
from vlmrt.weights import init_synthetic

TOL = 1e-4  # max abs difference in fp32


@pytest.fixture(scope="module")
def tiny():
    return load_tiny("qwen-vl-tiny")


def _rand_state(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ----------------------------------------------------------------------------- decoder parity
def _hf_qwen2(d, state):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads,
        rms_norm_eps=d.rms_norm_eps, max_position_embeddings=d.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta}, use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    model.load_state_dict(state, strict=True)  # Qwen2 names == ours: q/k/v with bias, o_proj without
    return model


def _llm_state(model):
    return {k[len("llm."):]: v for k, v in model.state_dict().items() if k.startswith("llm.")}


def test_decoder_matches_transformers_qwen2(tiny):
    m = tiny.model
    ref = _hf_qwen2(m.config.decoder, _llm_state(m))
    torch.manual_seed(0)
    b, t, s = 2, 12, 16
    embeds = torch.randn(b, t, m.config.decoder.hidden_size)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :3] = 0  # left padding in row 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticKVCache(m.num_layers, b, m.num_kv_heads, s, m.head_dim, torch.float32, "cpu")
    full = torch.nn.functional.pad(mask, (0, s - t))
    with torch.no_grad():
        ours = m.decode(embeds, pos, full, torch.arange(t), cache)
        theirs = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        # one decode step on the cache vs the reference over the whole sequence
        nxt = torch.randn(b, 1, m.config.decoder.hidden_size)
        full[:, t] = 1
        step = m.decode(nxt, pos[:, -1:] + 1, full, torch.tensor([t]), cache)
        ref_step = ref(inputs_embeds=torch.cat([embeds, nxt], 1), attention_mask=full[:, : t + 1],
                       position_ids=torch.cat([pos, pos[:, -1:] + 1], 1)).logits[:, -1:]
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max().item() <= TOL
    assert (step - ref_step).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- vision parity
def deinterleave(w, heads):
    """SPEC 3.2: in_proj output feature h*(3*hd) + j*hd + d is projection j of head h."""
    hd = w.shape[0] // (3 * heads)
    rows = lambda j: [h * 3 * hd + j * hd + d for h in range(heads) for d in range(hd)]
    return [w[rows(j)] for j in range(3)]


def _clip_encoder(v, state):
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoder

    enc = CLIPEncoder(CLIPVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_hidden, num_hidden_layers=v.layers,
                                       num_attention_heads=v.heads, hidden_act="gelu", layer_norm_eps=v.eps)).eval()
    hf = {}
    for i in range(v.layers):
        src, dst = f"visual.transformer.resblocks.{i}.", f"layers.{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            hf[dst + b + ".weight"], hf[dst + b + ".bias"] = state[src + a + ".weight"], state[src + a + ".bias"]
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", deinterleave(state[src + "attn.in_proj." + kind], v.heads)):
                hf[f"{dst}self_attn.{name}_proj.{kind}"] = part
    enc.load_state_dict(hf, strict=True)
    return enc


def _reference_vision(m, px):
    """conv1 -> + bicubic pos -> ln_pre -> CLIPEncoder -> nn.MultiheadAttention pool -> ln_post -> proj."""
    v, sd = m.config.vision, m.state_dict()
    x = F.conv2d(px, sd["visual.conv1.weight"], stride=v.patch_size).flatten(2).transpose(1, 2)
    g = v.grid
    resize = lambda t: F.interpolate(t.reshape(1, math.isqrt(t.shape[0]), -1, t.shape[1]).permute(0, 3, 1, 2),
                                     size=(g, g), mode="bicubic", align_corners=False)[0].flatten(1).T
    x = F.layer_norm(x + resize(sd["visual.positional_embedding"]), (v.width,), sd["visual.ln_pre.weight"],
                     sd["visual.ln_pre.bias"], v.eps)
    x = _clip_encoder(v, sd)(inputs_embeds=x).last_hidden_state
    pool = m.visual.attn_pool
    mha = torch.nn.MultiheadAttention(v.output_dim, v.resampler_heads).eval()
    mha.load_state_dict({k[len("attn."):]: t for k, t in pool.state_dict().items() if k.startswith("attn.")})
    kv = pool.ln_kv(pool.kv_proj(x)).transpose(0, 1)  # [N,B,D]
    q = (pool.ln_q(pool.query) + pool.pos_embed)[:, None].expand(-1, px.shape[0], -1)  # [Q,B,D]
    out = mha(q, kv + resize(pool.pos_embed)[:, None], kv, need_weights=False)[0].transpose(0, 1)
    return m.visual.ln_post(out) @ sd["visual.proj"]


def test_vision_stage_matches_clip_encoder_and_multihead_attention(tiny):
    m = tiny.model
    torch.manual_seed(0)
    px = torch.randn(2, 3, m.config.vision.image_size, m.config.vision.image_size)
    with torch.no_grad():
        ours, theirs = m.encode_images(px), _reference_vision(m, px)
    assert ours.shape == (2, m.config.vision.num_queries, m.config.decoder.hidden_size)
    assert (ours - theirs).abs().max().item() <= TOL


def test_in_proj_is_head_interleaved():
    """Rows [h*3*hd + j*hd, +hd) are q/k/v (j = 0/1/2) of head h: a block whose in_proj has only
    head 1's value rows set sees exactly those rows in head 1's output and zero elsewhere."""
    heads, hd = 2, 3
    attn = Q.VisualAttention(heads * hd, heads)
    with torch.no_grad():
        attn.in_proj.weight.zero_()
        attn.in_proj.bias.zero_()
        attn.in_proj.bias[1 * 3 * hd + 2 * hd: 1 * 3 * hd + 3 * hd] = torch.tensor([1.0, 2.0, 3.0])  # v of head 1
        attn.out_proj.weight.copy_(torch.eye(heads * hd))
        attn.out_proj.bias.zero_()
        out = attn(torch.randn(1, 4, heads * hd))
    # uniform attention (q = k = 0) averages identical values: head 0 -> 0, head 1 -> (1, 2, 3)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0]).expand(1, 4, 6))


# ----------------------------------------------------------------------------- resampler
def test_resampler_matches_multihead_attention_on_tiny_shapes():
    torch.manual_seed(0)
    pool = Resampler(num_queries=4, embed_dim=8, num_heads=2, kv_dim=6).eval()
    _rand_state(pool)
    x = torch.randn(2, 9, 6)  # a 3x3 patch grid
    key_pos = torch.randn(9, 8)
    mha = torch.nn.MultiheadAttention(8, 2).eval()
    mha.load_state_dict({k[len("attn."):]: t for k, t in pool.state_dict().items() if k.startswith("attn.")})
    with torch.no_grad():
        kv = F.layer_norm(x @ pool.kv_proj.weight.T, (8,), pool.ln_kv.weight, pool.ln_kv.bias, 1e-6).transpose(0, 1)
        q = F.layer_norm(pool.query, (8,), pool.ln_q.weight, pool.ln_q.bias, 1e-6) + pool.pos_embed
        expected = mha(q[:, None].expand(-1, 2, -1), kv + key_pos[:, None], kv, need_weights=False)[0].transpose(0, 1)
        ours = pool(x, key_pos)
    assert ours.shape == (2, 4, 8)
    assert (ours - expected).abs().max().item() <= 1e-5


def test_resampler_by_hand_when_all_image_tokens_are_equal():
    """Equal keys give uniform attention, so every query returns out_proj(v_proj(ln_kv(kv_proj(x0))))."""
    pool = Resampler(num_queries=3, embed_dim=4, num_heads=1, kv_dim=2).eval()
    _rand_state(pool, seed=1)
    x = torch.tensor([[[1.0, -2.0]] * 5])  # [1,5,2], five identical tokens
    with torch.no_grad():
        kv = pool.ln_kv(pool.kv_proj.weight @ x[0, 0])  # [4]
        v = pool.attn.in_proj_weight[8:] @ kv + pool.attn.in_proj_bias[8:]
        expected = pool.attn.out_proj.weight @ v + pool.attn.out_proj.bias
        ours = pool(x, torch.zeros(5, 4))
    torch.testing.assert_close(ours, expected.expand(1, 3, 4))


def test_sincos_table_follows_the_mae_convention():
    d, gh, gw = 8, 2, 3
    table = sincos_2d_pos_embed(d, gh, gw)
    w = [1 / 10000 ** (k / (d / 4)) for k in range(d // 4)]
    for p in range(gh * gw):
        r, c = divmod(p, gw)
        row = [math.sin(c * x) for x in w] + [math.cos(c * x) for x in w] + [math.sin(r * x) for x in w] + [math.cos(r * x) for x in w]
        torch.testing.assert_close(table[p], torch.tensor(row))


# ----------------------------------------------------------------------------- tokenizer
_WORDS = ["Describe", " this", " image", " the", "Picture", " hello", " world", "ing", " café", "你好", " don", "\n\n"]


def small_ranks():
    ranks = {bytes([b]): b for b in range(256)}
    for tok in (b"bc", b"ab", b"abc"):  # "abc" is reached by a + bc, not by the prefix chain
        ranks[tok] = len(ranks)
    for w in _WORDS:
        b = w.encode()
        for k in range(2, len(b) + 1):
            ranks.setdefault(b[:k], len(ranks))
    return ranks


def tiktoken_reference(text, ranks):
    """tiktoken's algorithm, written out: NFC, split off special tokens, regex pieces, then merge
    the adjacent pair of lowest rank (leftmost on ties) until none is a token."""
    import unicodedata

    import regex

    specials = {t: len(ranks) + i for i, t in enumerate(Q.SPECIAL_TOKENS)}
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", unicodedata.normalize("NFC", text)):
        if part in specials:
            ids.append(specials[part])
            continue
        for piece in regex.findall(Q.QWEN_PATTERN, part):
            b = piece.encode()
            parts = [b] if b in ranks else [bytes([x]) for x in b]
            while len(parts) > 1:
                cands = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks]
                if not cands:
                    break
                i = min(cands)[1]
                parts[i: i + 2] = [parts[i] + parts[i + 1]]
            ids += [ranks[p] for p in parts]
    return ids


@pytest.mark.parametrize("text", [
    "Describe this image.", "xabc abcabc", "Hello world!! 1234 don't  spaces\n\n\nnew  \t end  ",
    "cafe\u0301 café 你好世界", "<|im_start|>user\nPicture 1: <img></img>\nhi<|im_end|>\n", "it's THE'S 'll",
])
def test_tokenizer_matches_tiktoken_algorithm(text):
    ranks = small_ranks()
    tok = Q.build_qwen_tokenizer(ranks)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == tiktoken_reference(text, ranks)
    import unicodedata

    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_special_ids_follow_the_ranks():
    ranks = small_ranks()
    tok = Q.build_qwen_tokenizer(ranks)
    n = len(ranks)
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>")] \
        == [n, n + 1, n + 2, n + 214, n + 215, n + 216]
    assert tok.bos_token_id is None and tok.eos_token_id == n and tok.pad_token_id == n


def test_synthetic_tokenizer_has_the_release_ids(tiny):
    tok = tiny.tokenizer
    assert len(tok) == 151860
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>",
                                                   "<ref>", "<img>", "</img>", "<imgpad>")] \
        == [151643, 151644, 151645, 151850, 151851, 151857, 151858, 151859]
    assert tiny.spec.stop_token_ids == ((151643,), (151645,), (151644,))


# ----------------------------------------------------------------------------- prompt and embedding
def test_chat_prompt_layout(tiny):
    from vlmrt.processor import Processor

    ids = Processor(tiny.spec, tiny.tokenizer).prompt_ids("What is this?")
    tok = tiny.tokenizer
    n = tiny.spec.num_image_tokens
    start = ids.index(151857)
    assert ids[start + 1: start + 1 + n] == [151859] * n and ids[start + 1 + n] == 151858
    assert ids.count(151859) == n and ids[0] == 151644
    text = tok.decode(ids[: start + 1]) + "{image}" + tok.decode(ids[start + 1 + n:])
    assert text == Q.TEMPLATES["chatml"].replace("{prompt}", "What is this?")
    tail = [151644] + tok("assistant\n", add_special_tokens=False).input_ids
    assert ids[-len(tail):] == tail


def test_base_model_uses_the_plain_template(tiny):
    from vlmrt.processor import Processor

    with torch.device("meta"):
        spec = Q.QWenLMHeadModel(Q.PRESETS["qwen-vl-7b"]).processor_spec
    ids = Processor(spec, tiny.tokenizer).prompt_ids("Describe.")
    pic = tiny.tokenizer("Picture 1: ", add_special_tokens=False).input_ids
    assert ids == pic + [151857] + [151859] * 256 + [151858] + tiny.tokenizer("\nDescribe.", add_special_tokens=False).input_ids


def test_embed_writes_features_over_imgpad_only(tiny):
    m = tiny.model
    n, d = m.config.vision.num_queries, m.config.decoder.hidden_size
    ids = torch.tensor([[5, 151857] + [151859] * n + [151858, 7]])
    feats = torch.randn(1, n, d)
    with torch.no_grad():
        out = m.embed(ids, feats)
        text = m.embed(ids, None)
    torch.testing.assert_close(out[0, 2: 2 + n], feats[0])
    torch.testing.assert_close(out[0, [0, 1, n + 2, n + 3]], text[0, [0, 1, n + 2, n + 3]])


def test_pipeline_answers_and_rejects_a_too_long_prompt(tiny, photo):
    from vlmrt.pipeline import Pipeline

    pipe = Pipeline(tiny)
    res = pipe([photo, photo], ["Describe this image.", "What is it?"], pipe.generation_config(max_new_tokens=4))
    assert len(res.token_ids) == 2 and all(1 <= len(t) <= 4 for t in res.token_ids)
    assert res.token_ids[0] == pipe([photo], ["Describe this image."], pipe.generation_config(max_new_tokens=4)).token_ids[0]
    with pytest.raises(VlmrtError, match="context"):
        pipe([photo], ["word " * 600])


# ----------------------------------------------------------------------------- release folders
_OURS_TO_RELEASE = {
    "input_layernorm.weight": "ln_1.weight", "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight", "mlp.gate_proj.weight": "mlp.w2.weight",
    "mlp.up_proj.weight": "mlp.w1.weight", "mlp.down_proj.weight": "mlp.c_proj.weight",
}


def to_release_keys(state):
    """Our state dict -> the release's key names (SPEC 3.4 / 3.7), written independently of the loader."""
    out = {"transformer.wte.weight": state["llm.model.embed_tokens.weight"],
           "transformer.ln_f.weight": state["llm.model.norm.weight"], "lm_head.weight": state["llm.lm_head.weight"]}
    for k, v in state.items():
        if k.startswith("visual."):
            out["transformer." + k] = v
        m = re.fullmatch(r"llm\.model\.layers\.(\d+)\.(.+)", k)
        if m and m.group(2) in _OURS_TO_RELEASE:
            out[f"transformer.h.{m.group(1)}.{_OURS_TO_RELEASE[m.group(2)]}"] = v
        elif m and m.group(2).startswith("self_attn.q_proj."):
            kind, p = m.group(2).rsplit(".", 1)[1], f"llm.model.layers.{m.group(1)}.self_attn."
            out[f"transformer.h.{m.group(1)}.attn.c_attn.{kind}"] = torch.cat([state[f"{p}{n}_proj.{kind}"] for n in "qkv"])
    return {k: v.contiguous().clone() for k, v in out.items()}


def _release_config(n_ranks):
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "kv_channels": 32, "intermediate_size": 128, "vocab_size": n_ranks + 220,
        "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 256,
        "max_position_embeddings": 8192, "no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True,
        "tie_word_embeddings": False, "eos_token_id": n_ranks,
        "visual": {"heads": 4, "image_size": 56, "image_start_id": n_ranks + 214, "layers": 2, "mlp_ratio": 2.0,
                   "output_dim": 128, "patch_size": 14, "width": 48},
    }


def write_release(folder, fmt="bin", chat_format="chatml"):
    """A tiny Qwen-VL release: config.json, generation_config.json, qwen.tiktoken and weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    ranks = small_ranks()
    hf = _release_config(len(ranks))
    (folder / "config.json").write_text(json.dumps(hf))
    (folder / "generation_config.json").write_text(json.dumps({"chat_format": chat_format, "eos_token_id": len(ranks)}))
    (folder / "qwen.tiktoken").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    cfg = Q.QwenVLConfig.from_hf(hf, chat_format)
    model = Q.QWenLMHeadModel(replace(cfg, vision=replace(cfg.vision, pos_grid=2, query_grid=2)))
    init_synthetic(model, seed=3)
    state = to_release_keys(model.state_dict())
    if fmt == "safetensors":
        save_file(state, folder / "model.safetensors")
        return model
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / shard)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return model


@pytest.mark.parametrize("fmt,chat_format", [("bin", "chatml"), ("safetensors", "raw")])
def test_release_folder_round_trip(tmp_path, fmt, chat_format, photo):
    original = write_release(tmp_path / "qwen", fmt, chat_format)
    loaded = load_model(str(tmp_path / "qwen"))
    assert loaded.family == "qwen_vl" and not loaded.synthetic
    assert loaded.spec.template == Q.TEMPLATES["chatml" if chat_format == "chatml" else "plain"]
    ours = loaded.model.state_dict()
    assert set(ours) == set(original.state_dict())
    assert all(torch.equal(ours[k], v) for k, v in original.state_dict().items())
    assert loaded.spec.image_token_id == len(small_ranks()) + 216 and loaded.spec.num_image_tokens == 4
    from vlmrt.pipeline import Pipeline

    res = Pipeline(loaded)([photo], ["Describe this image."], Pipeline(loaded).generation_config(max_new_tokens=3))
    assert 1 <= len(res.token_ids[0]) <= 3


@pytest.fixture
def release(tmp_path):
    write_release(tmp_path / "qwen", "safetensors")
    return tmp_path / "qwen"


def test_missing_tokenizer_is_a_clear_error(release):
    (release / "qwen.tiktoken").unlink()
    with pytest.raises(VlmrtError, match="missing qwen.tiktoken"):
        load_model(str(release))


def test_corrupt_files_are_clear_errors(release):
    (release / "qwen.tiktoken").write_bytes(b"not-base64!! x\n")
    with pytest.raises(VlmrtError, match="qwen.tiktoken: line 1"):
        load_model(str(release))
    (release / "config.json").write_text('{"architectures": ["QWenLMHeadModel"], ')
    with pytest.raises(VlmrtError, match="not valid JSON"):
        load_model(str(release))


def test_truncated_weights_are_a_clear_error(release):
    data = (release / "model.safetensors").read_bytes()
    (release / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VlmrtError, match="corrupt or truncated"):
        load_model(str(release))


def test_missing_weight_and_foreign_tokenizer_are_named(release):
    from safetensors.torch import load_file, save_file

    state = load_file(str(release / "model.safetensors"))
    del state["transformer.h.1.mlp.w2.weight"]
    save_file(state, release / "model.safetensors")
    with pytest.raises(VlmrtError, match=r"llm\.model\.layers\.1\.mlp\.gate_proj\.weight"):
        load_model(str(release))
    hf = json.loads((release / "config.json").read_text())
    hf["visual"]["image_start_id"] = 151857
    (release / "config.json").write_text(json.dumps(hf))
    with pytest.raises(VlmrtError, match="does not belong"):
        load_model(str(release))


def test_cli_runs_the_tiny_preset(capsys, photo):
    from vlmrt.cli import main

    assert main(["run", "--model", "qwen-vl-tiny", "--image", str(photo), "--prompt", "Describe this image.",
                 "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "qwen_vl" and out["synthetic_weights"] and len(out["answers"][0]["token_ids"]) <= 3
