"""MiniCPM-V-2 family (vlmrt/models/minicpmv.py): the slicing rule vs SPEC 2.3's worked examples,
the vision tower vs transformers' SiglipVisionModel, the resampler vs nn.MultiheadAttention, the
decoder vs a reference written from SPEC 2.5's formulas and vs GraniteForCausalLM, batched
(packed, masked, bucketed) slices vs the release's one-chunk-at-a-time encode, the release-folder
loader and bad inputs. All on the tiny preset, CPU, fp32."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import load_tiny
from vlmrt.errors import VlmrtError
from vlmrt.kv_cache import StaticKVCache
from vlmrt.models import load_model
from vlmrt.models import minicpmv as mc
from vlmrt.models.layers import sincos_2d_at
from vlmrt.processor import Processor

TINY = "minicpm-v-tiny"
REAL = mc.PRESETS["minicpm-v-2"].slicing


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ----------------------------------------------------------------------------- slicing and inputs
@pytest.mark.parametrize("size, source, grid, cell", [
    ((1024, 768), (518, 392), (2, 2), (518, 392)),
    ((1920, 1080), (602, 336), (4, 2), (420, 476)),
    ((448, 448), (448, 448), None, None),
    ((300, 200), (546, 364), None, None),
])
def test_slice_plan_matches_spec_worked_examples(size, source, grid, cell):
    assert mc.plan_slices(*size, REAL) == (source, grid, cell)


@pytest.mark.parametrize("size", [(1, 1), (1, 100_000), (300_000, 1), (20_000, 50), (5, 4000), (14, 14)])
def test_degenerate_sizes_plan_into_the_canvas(size):
    source, grid, cell = mc.plan_slices(*size, REAL)
    for s in [source] + ([cell] if cell else []):
        w, h = mc.fit_canvas(s, REAL)
        assert w % 14 == 0 and h % 14 == 0 and 1 <= (w // 14) * (h // 14) <= REAL.capacity


def test_normal_aspects_are_never_shrunk():
    for w, h in [(1024, 768), (1920, 1080), (640, 64), (100, 1000), (4000, 300)]:
        source, _, cell = mc.plan_slices(w, h, REAL)
        assert all(mc.fit_canvas(s, REAL) == s for s in [source] + ([cell] if cell else []))


@pytest.mark.parametrize("out_size, in_size", [(27, 27), (32, 27), (37, 27), (28, 27), (10, 27), (1, 27), (100, 27), (2, 3), (4, 3)])
def test_antialias_weights_match_torch_interpolate(out_size, in_size):
    x = torch.randn(1, 5, in_size, in_size, dtype=torch.float64)
    a = torch.tensor(mc.antialias_bicubic_weights(out_size, in_size), dtype=torch.float64)  # [out,in]
    ours = torch.einsum("ia,ncab,jb->ncij", a, x, a)
    ref = F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)  # in float64 the weights are torch's exactly


def test_image_markup_follows_the_release():
    one = "<image>" + "<unk>" * 2 + "</image>"
    assert mc.image_markup(None, 2) == one
    assert mc.image_markup((3, 2), 2) == one + "<slice>" + one * 3 + "\n" + one * 3 + "</slice>"


def test_processor_batch_shapes_and_ids():
    loaded = load_tiny(TINY)
    s = loaded.model.config.slicing
    proc = Processor(loaded.spec, loaded.tokenizer)
    batch = proc([_image(1024, 768), _image(30, 40)], ["What is this?", "And this?"])
    k, L = 10, s.capacity  # 1024x768 at S=56: grid [3,3] -> 10 chunks; the 30x40 image: 1 chunk, padded
    assert batch["pixel_values"].shape == (2, 3, s.canvas_rows * 14, k * s.canvas_cols * 14)
    assert batch["patch_coords"].shape == (2, k * L, 2) and batch["patch_pos_weights"].shape == (2, k * L, 2 * s.pos_grid)
    ids = batch["input_ids"]
    assert (ids[0] == mc.IMAGE_TOKEN_ID).sum() == 10 * s.query_num and (ids[1] == mc.IMAGE_TOKEN_ID).sum() == s.query_num
    assert (ids[0] == 101).sum() == 10 and (ids[0] == 111).sum() == 1 and (ids[1] == 111).sum() == 0
    assert batch["attention_mask"][1].sum() == (ids[1] != proc.pad_token_id).sum()
    assert loaded.tokenizer.decode(ids[0, :3].tolist()).startswith("<s>")


def test_processor_spec_survives_a_json_round_trip():
    from vlmrt.processor import ProcessorSpec

    spec = load_tiny(TINY).spec
    assert ProcessorSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # as an export manifest holds it
    assert mc.SliceConfig.from_options(spec.hook_options) == load_tiny(TINY).model.config.slicing


def test_prompt_with_image_markup_is_refused():
    loaded = load_tiny(TINY)
    with pytest.raises(VlmrtError, match="image markup"):
        Processor(loaded.spec, loaded.tokenizer)([_image(50, 50)], ["look <image> here"])


# ----------------------------------------------------------------------------- vision tower and resampler
def _hf_siglip(vcfg, state):
    """transformers' SiglipVisionModel with our vpm.* weights (mapping of SPEC 2.2)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=vcfg.width, intermediate_size=vcfg.mlp_hidden, num_hidden_layers=vcfg.depth,
                             num_attention_heads=vcfg.heads, image_size=vcfg.pos_grid * vcfg.patch_size,
                             patch_size=vcfg.patch_size, layer_norm_eps=vcfg.eps, hidden_act="gelu", vision_use_head=False)
    model = SiglipVisionModel(cfg).eval()
    inner = getattr(model, "vision_model", model)  # transformers 5.23 dropped the wrapper; older 5.x have it
    hf = {"embeddings.patch_embedding.weight": state["vpm.patch_embed.proj.weight"],
          "embeddings.patch_embedding.bias": state["vpm.patch_embed.proj.bias"],
          "embeddings.position_embedding.weight": state["vpm.pos_embed"][0],
          "post_layernorm.weight": state["vpm.norm.weight"], "post_layernorm.bias": state["vpm.norm.bias"]}
    for i in range(vcfg.depth):
        src, dst = f"vpm.blocks.{i}.", f"encoder.layers.{i}."
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            hf[dst + b + ".weight"], hf[dst + b + ".bias"] = state[src + a + ".weight"], state[src + a + ".bias"]
        for name, w, b in zip("qkv", state[src + "attn.qkv.weight"].chunk(3), state[src + "attn.qkv.bias"].chunk(3)):
            hf[f"{dst}self_attn.{name}_proj.weight"], hf[f"{dst}self_attn.{name}_proj.bias"] = w, b
    inner.load_state_dict(hf, strict=False)
    missing = set(inner.state_dict()) - set(hf)
    assert all("position_ids" in k for k in missing), missing
    return model


def _vpm(model, pixels):
    g = (pixels.shape[2] // 14, pixels.shape[3] // 14)
    coords, weights = mc.chunk_inputs(*g, model.config.vision.pos_grid, g[0] * g[1])
    return model.vpm(pixels, weights[None], (coords[None, :, 0] >= 0))


@torch.no_grad()
def test_vision_tower_matches_transformers_siglip_at_the_native_grid():
    """At the table's own grid (3x3 patches here, 27x27 in the release) timm does not resize the
    position table, and transformers does not either: the two towers must agree. Off that grid they
    differ by design: timm resizes with antialias=True (Keys a=-0.5, even when upscaling),
    transformers' interpolate_pos_encoding without (a=-0.75)."""
    model = load_tiny(TINY).model
    hf = _hf_siglip(model.config.vision, model.state_dict())
    pixels = torch.randn(2, 3, 42, 42)
    torch.testing.assert_close(_vpm(model, pixels), hf(pixel_values=pixels).last_hidden_state, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_vision_tower_off_grid_matches_timm_style_resize():
    model = load_tiny(TINY).model
    hf = _hf_siglip(model.config.vision, model.state_dict())
    hf = getattr(hf, "vision_model", hf)
    pixels = torch.randn(1, 3, 70, 28)  # a 5x2 grid: the 3x3 table is resized (up in rows, down in columns)
    table = model.vpm.pos_embed.reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(table, size=(5, 2), mode="bicubic", antialias=True, align_corners=False)  # timm's resample
    x = hf.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
    ref = hf.post_layernorm(hf.encoder(inputs_embeds=x).last_hidden_state)
    torch.testing.assert_close(_vpm(model, pixels), ref, atol=1e-5, rtol=1e-4)


def _mae_sincos(dim, gh, gw):
    """SPEC 2.4's table, written independently in numpy float64."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    return torch.from_numpy(np.concatenate([one(dim // 2, cols), one(dim // 2, rows)], axis=1)).float()


@torch.no_grad()
def test_resampler_matches_multihead_attention_reference_with_padding():
    model = load_tiny(TINY).model
    cfg, r = model.config, model.resampler
    d = cfg.decoder.hidden_size
    mha = torch.nn.MultiheadAttention(d, cfg.resampler_heads)
    mha.load_state_dict({k[len("attn."):]: v for k, v in r.state_dict().items() if k.startswith("attn.")})
    gh, gw, pad = 3, 5, 4
    x = torch.randn(1, gh * gw, cfg.vision.width)
    kv = r.ln_kv(r.kv_proj(x)).permute(1, 0, 2)  # [L,1,D] sequence-first, as the release
    q = (r.ln_q(r.query) + r.pos_embed)[:, None]  # [Q,1,D]
    ref = r.ln_post(mha(q, kv + _mae_sincos(d, gh, gw)[:, None], kv)[0].permute(1, 0, 2)) @ r.proj
    rows, cols = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)
    torch.testing.assert_close(sincos_2d_at(rows, cols, d), _mae_sincos(d, gh, gw), atol=1e-6, rtol=0)
    padded = torch.cat([x, torch.randn(1, pad, x.shape[2]) * 100], dim=1)  # junk keys, masked out
    key_pos = sincos_2d_at(torch.cat([rows, torch.zeros(pad)]), torch.cat([cols, torch.zeros(pad)]), d)
    mask = torch.arange(gh * gw + pad)[None] < gh * gw
    torch.testing.assert_close(r(padded, key_pos[None], mask), ref, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_batched_slices_match_the_release_one_chunk_at_a_time():
    """Packed canvases, padding masks and bucket padding change nothing: each row's features equal
    encoding every chunk alone at its own grid, as the release does."""
    loaded = load_tiny(TINY)
    model, s = loaded.model, loaded.model.config.slicing
    images = [_image(200, 90, 1), _image(30, 40, 2), _image(3, 700, 3)]
    batch = Processor(loaded.spec, loaded.tokenizer)(images, ["a", "b", "c"])
    feats = model.encode_images(batch["pixel_values"], batch["patch_coords"], batch["patch_pos_weights"])
    for b, img in enumerate(images):
        chunks, _ = mc.slice_image(img, s)
        ref = torch.cat([_alone(model, c, loaded.spec) for c in chunks], dim=1)  # [1,n*Q,D]
        torch.testing.assert_close(feats[b:b + 1, : ref.shape[1]], ref, atol=1e-5, rtol=1e-4)
        assert torch.isfinite(feats[b]).all()


def _alone(model, chunk, spec):
    """One chunk, batch 1, at its own grid: the release's get_vision_embedding."""
    x = torch.from_numpy(np.asarray(chunk, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    return model.encode_images(x[None])


# ----------------------------------------------------------------------------- decoder
def _reference_minicpm(sd, ids, layers, heads, scale_emb=12.0, scale_depth=1.4, dim_model_base=256, eps=1e-5, theta=10000.0):
    """MiniCPM-2.4B from SPEC 2.5's formulas alone, no cache: ids [T] -> logits [T,V]."""
    w = lambda k: sd["llm." + k]
    rms = lambda x, g: g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    h = w("model.embed_tokens.weight")[ids] * scale_emb  # scale_emb on token embeddings
    t, d = h.shape
    hd = d // heads
    ang = torch.arange(t)[:, None].float() * theta ** (-torch.arange(0, hd, 2).float() / hd)  # [T,hd/2]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rope = lambda x: x * cos + torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1) * sin
    causal = torch.ones(t, t).tril().bool()
    for i in range(layers):
        p = f"model.layers.{i}."
        x = rms(h, w(p + "input_layernorm.weight"))
        q, k, v = (x @ w(p + f"self_attn.{n}_proj.weight").T for n in "qkv")
        q, k, v = (z.view(t, heads, hd).transpose(0, 1) for z in (q, k, v))  # [H,T,hd]
        att = (rope(q) @ rope(k).transpose(1, 2) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        o = (att @ v).transpose(0, 1).reshape(t, d) @ w(p + "self_attn.o_proj.weight").T
        h = h + o * (scale_depth / math.sqrt(layers))  # residual scale on the attention branch
        x = rms(h, w(p + "post_attention_layernorm.weight"))
        m = (F.silu(x @ w(p + "mlp.gate_proj.weight").T) * (x @ w(p + "mlp.up_proj.weight").T)) @ w(p + "mlp.down_proj.weight").T
        h = h + m * (scale_depth / math.sqrt(layers))  # and on the MLP branch
    h = rms(h, w("model.norm.weight"))
    return (h / (d / dim_model_base)) @ w("lm_head.weight").T  # logits from h / (hidden / dim_model_base)


def _our_logits(model, ids):
    cache = StaticKVCache(model.num_layers, 1, model.num_kv_heads, 32, model.head_dim, torch.float32, "cpu")
    t = ids.shape[1]
    mask = torch.zeros(1, 32, dtype=torch.long)
    mask[:, :t] = 1
    return model.decode(model.embed(ids, None), torch.arange(t)[None], mask, torch.arange(t), cache)


@torch.no_grad()
def test_decoder_matches_the_spec_formulas():
    model = load_tiny(TINY).model
    d = model.config.decoder
    ids = torch.tensor([[1, 7, 300, 42, 9, 1000, 3]])
    ref = _reference_minicpm(model.state_dict(), ids[0], d.num_layers, d.num_heads)
    torch.testing.assert_close(_our_logits(model, ids)[0], ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_decoder_matches_transformers_granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    model = load_tiny(TINY).model
    d = model.config.decoder
    cfg = GraniteConfig(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                        num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads,
                        rms_norm_eps=d.rms_norm_eps, max_position_embeddings=d.max_position_embeddings,
                        rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta},
                        embedding_multiplier=12.0, residual_multiplier=1.4 / math.sqrt(d.num_layers),
                        logits_scaling=d.hidden_size / 256, attention_multiplier=1 / math.sqrt(d.head_dim))
    granite = GraniteForCausalLM(cfg).eval()
    granite.load_state_dict({k[4:]: v for k, v in model.state_dict().items() if k.startswith("llm.")})
    ids = torch.tensor([[1, 7, 300, 42, 9, 1000, 3]])
    torch.testing.assert_close(_our_logits(model, ids), granite(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_embed_scales_text_but_not_image_features():
    model = load_tiny(TINY).model
    ids = torch.tensor([[1, 101, 0, 0, 102, 5]])
    feats = torch.randn(1, 2, model.config.decoder.hidden_size)
    out = model.embed(ids, feats)
    table = model.llm.model.embed_tokens.weight
    torch.testing.assert_close(out[0, 2:4], feats[0])
    torch.testing.assert_close(out[0, [0, 1, 4, 5]], table[[1, 101, 102, 5]] * 12.0)


def test_real_preset_has_the_release_parameter_count():
    with torch.device("meta"):
        model = mc.MiniCPMVForConditionalGeneration(mc.PRESETS["minicpm-v-2"])
    assert sum(p.numel() for p in model.parameters()) == 3_434_965_792  # SPEC 2.1: total_size / 2 (bf16)


# ----------------------------------------------------------------------------- release folder
def _write_release(loaded, folder, tokenizer=True):
    """A tiny release in MiniCPM-V-2's layout: config.json, two safetensors shards + index, tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = loaded.config
    d = cfg.decoder
    config = {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "hidden_size": d.hidden_size,
              "num_hidden_layers": d.num_layers, "num_attention_heads": d.num_heads, "num_key_value_heads": d.num_kv_heads,
              "intermediate_size": d.intermediate_size, "hidden_act": "silu", "vocab_size": d.vocab_size,
              "max_position_embeddings": d.max_position_embeddings, "rms_norm_eps": d.rms_norm_eps, "rope_theta": 10000.0,
              "rope_scaling": None, "tie_word_embeddings": False, "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4,
              "bos_token_id": 1, "eos_token_id": 2, "vision_encoder": "vit_so400m_patch14_siglip_384.webli",
              "drop_vision_last_layer": True, "query_num": cfg.query_num, "image_size": cfg.scale_resolution,
              "patch_size": 14, "slice_mode": True, "max_slice_nums": 9, "scale_resolution": cfg.scale_resolution,
              "mm_use_im_start_end": True, "torch_dtype": "float32",
              "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV"}}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if tokenizer:
        loaded.tokenizer.save_pretrained(folder)
        _release_tokenizer_config(folder)
    return folder


def _release_tokenizer_config(folder, special=mc.SPECIAL_TOKENS):
    """The release's tokenizer_config.json names remote code (July 2024 commit 3ce0a28)."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in special.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for i, t in special.items() if i > 2],
        "auto_map": {"AutoTokenizer": ["tokenization_minicpmv.MiniCPMVTokenizer", None]}, "bos_token": "<s>",
        "eos_token": "</s>", "legacy": True, "pad_token": "<unk>", "tokenizer_class": "MiniCPMVTokenizer", "unk_token": "<unk>"}))


def _answer(loaded, photo, n=4):
    from vlmrt.pipeline import Pipeline

    pipe = Pipeline(loaded)
    return pipe([photo], ["Describe this image."], pipe.generation_config(max_new_tokens=n)).token_ids[0]


def test_release_folder_round_trip(tmp_path, photo):
    tiny = load_tiny(TINY)
    folder = _write_release(tiny, tmp_path / "MiniCPM-V-2")
    loaded = load_model(str(folder))
    assert loaded.family == "minicpmv" and not loaded.synthetic
    assert loaded.config.decoder == tiny.config.decoder and loaded.config.vision == tiny.config.vision
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert _answer(loaded, photo) == _answer(tiny, photo)


def test_sentencepiece_tokenizer_model_loads(tmp_path, photo):
    import sentencepiece as spm

    folder = _write_release(load_tiny(TINY), tmp_path / "rel", tokenizer=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("describe this image please what is in the photo\n" * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                   hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   user_defined_symbols=list(mc.MARKUP), minloglevel=2)
    _release_tokenizer_config(folder, {0: "<unk>", 1: "<s>", 2: "</s>", **{3 + i: t for i, t in enumerate(mc.MARKUP)}})
    loaded = load_model(str(folder))
    batch = Processor(loaded.spec, loaded.tokenizer)([photo], ["Describe this image."])
    assert (batch["input_ids"] == 0).sum() == 10 * loaded.config.query_num
    assert len(_answer(loaded, photo, 2)) == 2


def _break(folder, victim):
    if victim == "shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    elif victim == "corrupt shard":
        path = folder / "model-00001-of-00002.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif victim == "config":
        (folder / "config.json").write_text('{"architectures": ["MiniCPMV"], oops')
    elif victim == "tokenizer":
        for f in folder.glob("tokenizer*"):
            f.unlink()
    elif victim == "key":
        from safetensors.torch import load_file, save_file

        path = folder / "model-00002-of-00002.safetensors"
        state = load_file(path)
        state.pop("vpm.norm.weight")
        save_file(state, path)


@pytest.mark.parametrize("victim, match", [
    ("shard", "missing weight shards.*model-00002"), ("corrupt shard", "corrupt or truncated"),
    ("config", "config.json is not valid JSON"), ("tokenizer", "no tokenizer"), ("key", "missing 1 weight.*vpm.norm.weight"),
])
def test_broken_release_folder_errors_are_clear(tmp_path, victim, match):
    folder = _write_release(load_tiny(TINY), tmp_path / "rel")
    _break(folder, victim)
    with pytest.raises(VlmrtError, match=match):
        load_model(str(folder))


def test_tokenizer_without_markup_tokens_is_refused(tmp_path):
    from vlmrt.tokenizer import build_synthetic_tokenizer

    folder = _write_release(load_tiny(TINY), tmp_path / "rel", tokenizer=False)
    build_synthetic_tokenizer(300, {0: "<unk>", 1: "<s>", 2: "</s>"}, bos="<s>", eos="</s>").save_pretrained(folder)
    with pytest.raises(VlmrtError, match="not MiniCPM-V's.*<image>"):
        load_model(str(folder))


# ----------------------------------------------------------------------------- end to end
def test_too_long_prompt_is_a_clear_error(photo):
    from vlmrt.pipeline import Pipeline

    pipe = Pipeline(load_tiny(TINY))
    spec = pipe.loaded.spec
    n = int((pipe.processor([photo], ["why"])["input_ids"] == spec.image_token_id).sum())
    assert n > spec.num_image_tokens  # the photo is sliced: the message must count every slice
    with pytest.raises(VlmrtError, match=rf"context.*\({n} of them image tokens\)|\({n} of them image tokens\).*context"):
        pipe([photo], ["why " * 1200])


def test_degenerate_images_run_end_to_end():
    from vlmrt.pipeline import Pipeline

    pipe = Pipeline(load_tiny(TINY))
    images = [_image(1, 1), _image(1, 900), _image(2000, 3), _image(15, 13)]
    out = pipe(images, ["?"] * 4, pipe.generation_config(max_new_tokens=2))
    assert all(len(ids) == 2 for ids in out.token_ids)


def test_cli_run_and_presets_listed(photo, capsys):
    from vlmrt.cli import main
    from vlmrt.models import all_presets

    assert main(["run", "--model", TINY, "--image", str(photo), "--prompt", "Describe this image.", "--max-new-tokens", "3"]) == 0
    assert "synthetic weights" in capsys.readouterr().err
    assert {"minicpm-v-2", TINY} <= set(all_presets())  # what `vlmrt models` lists
