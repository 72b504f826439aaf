"""SliMM: parity with transformers' Qwen2-VL (vision tower, M-RoPE positions, decoder, prefill and a
decode step) on a tiny config with identical weights; DeepStack against references written from the
SPEC 4.4/4.5 formulas with boolean masks and explicit loops; the processor's bounds and layout; the
release loader (both key layouts) and its errors; the pipeline end to end.

fp32 tolerances: atol 1e-5 for logits and features (observed ~1e-6).
"""

import inspect
import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from conftest import load_tiny
from vlmrt.errors import VlmrtError
from vlmrt.generate import decode_one_token, split_embedded
from vlmrt.kv_cache import StaticKVCache
from vlmrt.models import LoadedModel, load_model
from vlmrt.models.layers import causal_mask
from vlmrt.models.slimm import (IM_END, IMAGE_PAD, PRESETS, TEMPLATE, SliMMForConditionalGeneration,
                                config_from_release, mrope_position_ids, processor_spec, smart_resize)
from vlmrt.models.slimm_vision import patch_rows
from vlmrt.processor import Processor
from vlmrt.weights import build_on, init_synthetic

TINY = PRESETS["slimm-tiny"]
ATOL = 1e-5
VISION_START, VISION_END = 151652, 151653


def tiny_model(seed=0, **changes) -> SliMMForConditionalGeneration:
    cfg = replace(TINY, **changes)
    model = build_on(torch.device("cpu"), torch.float32, lambda: SliMMForConditionalGeneration(cfg))
    init_synthetic(model, seed)
    return model.eval()


def run_prefill(m, ids, am, positions, feats):
    """Our three stages on a left-padded batch -> logits [B,T,V]."""
    embeds, extras = split_embedded(m.embed(ids, feats))
    cache = StaticKVCache(m.num_layers, ids.shape[0], m.num_kv_heads, 64, m.head_dim, torch.float32, "cpu")
    mask = torch.zeros(ids.shape[0], 64, dtype=torch.long)
    mask[:, :ids.shape[1]] = am
    return m.decode(embeds, positions, mask, torch.arange(ids.shape[1]), cache, **extras), cache, mask


def batch_of(rows: list[list[int]]):
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), 151643)
    am = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], am[i, t - len(r):] = torch.tensor(r), 1
    return ids, am


def image_row(n_img: int, before: int, after: int) -> list[int]:
    return [5] * before + [VISION_START] + [IMAGE_PAD] * n_img + [VISION_END] + [7] * after


# ----------------------------------------------------------------------------- transformers parity
@pytest.fixture(scope="module")
def hf_release(tmp_path_factory):
    """A tiny Qwen2VLForConditionalGeneration with random weights, saved as a release folder in the
    newer key layout (model.language_model.*, model.visual.*) with a vocab.json + merges.txt tokenizer."""
    tr = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    vc = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=32, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}
    tc = dict(vocab_size=151657, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=64, rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=True,
              rope_parameters=rope, rope_scaling=rope, rope_theta=1e6)
    cfg = tr.Qwen2VLConfig(text_config=tc, vision_config=vc, image_token_id=IMAGE_PAD, video_token_id=151656,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=True)
    hf = tr.Qwen2VLForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter random, biases included
        for name, p in hf.named_parameters():
            is_scale = name.endswith("weight") and ("norm" in name or "ln_q" in name)
            p.copy_((1.0 if is_scale else 0.0) + (0.1 if is_scale else 0.05) * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("qwen2vl_release")
    d = cfg.to_dict()
    d["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(d))
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(folder / "model.safetensors"))
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz.ĠĊ")}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return hf, folder


@pytest.fixture(scope="module")
def hf_inputs():
    """Two images of different sizes (grids in 14-px patches) in a left-padded batch of two rows."""
    g = torch.Generator().manual_seed(2)
    grids = [(1, 4, 6), (1, 2, 2)]
    rows = torch.cat([patch_rows(torch.randn(1, 3, 14 * h, 14 * w, generator=g), 14, 2, 2) for _, h, w in grids])
    ids, am = batch_of([image_row(6, 3, 4), image_row(1, 2, 9)])
    return rows, torch.tensor(grids), ids, am


def hf_rope_index(hf, ids, grid, am):
    """transformers' get_rope_index, across its signatures (5.17 and 5.23)."""
    fn = hf.model.get_rope_index
    kw = {"image_grid_thw": grid, "attention_mask": am}
    if "mm_token_type_ids" in inspect.signature(fn).parameters:
        kw["mm_token_type_ids"] = (ids == IMAGE_PAD).int()
    return fn(ids, **kw)[0]


def test_loader_reads_the_newer_key_layout(hf_release):
    loaded = load_model(str(hf_release[1]))
    cfg = loaded.config
    assert loaded.family == "slimm" and not loaded.synthetic
    assert (cfg.deepstack, cfg.mrope_section, cfg.vision.depth) == ("none", (2, 3, 3), 2)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert loaded.tokenizer("ab").input_ids  # vocab.json + merges.txt


def test_vision_tower_matches_transformers(hf_release, hf_inputs):
    hf, folder = hf_release
    rows, grid, _, _ = hf_inputs
    ours = load_model(str(folder)).model
    with torch.no_grad():
        ref = hf.model.visual(rows, grid_thw=grid)
        ref = getattr(ref, "pooler_output", ref)  # [7,D]
        got = ours.encode_images(rows, grid)  # [1,7,D]
    torch.testing.assert_close(got[0], ref, atol=ATOL, rtol=1e-4)


def test_mrope_positions_match_get_rope_index(hf_release, hf_inputs):
    hf = hf_release[0]
    _, grid, ids, am = hf_inputs
    ours = mrope_position_ids(ids, am, [tuple(g) for g in grid.tolist()], 2)
    ref = hf_rope_index(hf, ids, grid, am)
    assert torch.equal(ours[:, am.bool()], ref[:, am.bool()])
    text_ids, text_am = batch_of([[5, 6, 7], [5, 6, 7, 8, 9]])  # text only: 0..n-1 on all three axes
    text = mrope_position_ids(text_ids, text_am, [], 2)
    assert text[:, 1].tolist() == [list(range(5))] * 3 and text[:, 0, 2:].tolist() == [list(range(3))] * 3


def test_two_images_in_one_row_match_transformers(hf_release, hf_inputs):
    hf, folder = hf_release
    rows, grid, _, _ = hf_inputs  # grids (1,4,6) then (1,2,2): 6 and 1 slots
    ids, am = batch_of([image_row(6, 3, 2) + image_row(1, 0, 4)])
    pos = mrope_position_ids(ids, am, [tuple(g) for g in grid.tolist()], 2)
    assert torch.equal(pos, hf_rope_index(hf, ids, grid, am))
    m = load_model(str(folder)).model
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am, pixel_values=rows, image_grid_thw=grid,
                 position_ids=hf_rope_index(hf, ids, grid, am)).logits
        got, _, _ = run_prefill(m, ids, am, pos, m.encode_images(rows, grid))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)


def test_prefill_and_a_decode_step_match_transformers(hf_release, hf_inputs):
    hf, folder = hf_release
    rows, grid, ids, am = hf_inputs
    m = load_model(str(folder)).model
    grids = [tuple(g) for g in grid.tolist()]
    pos = mrope_position_ids(ids, am, grids, 2)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am, pixel_values=rows, image_grid_thw=grid, position_ids=pos).logits
        got, cache, mask = run_prefill(m, ids, am, pos, m.encode_images(rows, grid))
        valid = am.bool()
        torch.testing.assert_close(got[valid], ref[valid], atol=ATOL, rtol=1e-4)
        # one decode step: positions continue from the last prompt position + 1 (generate.py's rule)
        nxt = torch.tensor([9, 11])
        ids2, am2 = torch.cat([ids, nxt[:, None]], 1), torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1)
        ref2 = hf(input_ids=ids2, attention_mask=am2, pixel_values=rows, image_grid_thw=grid,
                  position_ids=hf_rope_index(hf, ids2, grid, am2)).logits[:, -1]
        mask[:, ids.shape[1]] = 1
        position = pos.amax(0)[:, -1].expand(3, -1) + 1  # [3,B]
        runtime = _Direct(m, cache)
        got2 = decode_one_token(runtime, nxt, position, mask, ids.shape[1])
    torch.testing.assert_close(got2, ref2, atol=ATOL, rtol=1e-4)


class _Direct:
    """The two runtime verbs decode_one_token needs, straight on the model and a given cache."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def embed(self, ids, feats):
        return self.model.embed(ids, feats)

    def decode(self, embeds, positions, mask, cache_position, **extras):
        return self.model.decode(embeds, positions, mask, cache_position, self.cache, **extras)


# ----------------------------------------------------------------------------- DeepStack references
def test_deepstack_in_the_decoder_follows_the_release_formula():
    """SPEC 4.4 with boolean masks, as CustomQwen2.forward: before layer l in [start, start+K*interval),
    h[image] += E[(l - start) // interval]. Here K=2, start 1, interval 2: layers 1,2 <- E0; 3,4 <- E1."""
    base = replace(TINY.decoder, num_layers=6)
    m = tiny_model(decoder=base, deepstack_interval=2)
    ids, am = batch_of([image_row(9, 2, 3), image_row(9, 5, 1)])
    pos = mrope_position_ids(ids, am, [(1, 6, 6)] * 2, 2)
    g = torch.Generator().manual_seed(3)
    feats, groups = torch.randn(2 * 9, 32, generator=g), torch.randn(2, 2 * 9, 32, generator=g)
    with torch.no_grad():
        named = {"image_features": feats[None], "deepstack_features": groups[:, None]}
        got, _, mask = run_prefill(m, ids, am, pos, named)
        image = ids == IMAGE_PAD
        h = m.model.embed_tokens(ids).clone()
        h[image] = feats
        cos, sin = m.rotary(pos, h.dtype)
        attn = causal_mask(mask, torch.arange(ids.shape[1]))
        cache = StaticKVCache(6, 2, m.num_kv_heads, 64, m.head_dim, torch.float32, "cpu")
        for layer_id, layer in enumerate(m.model.layers):
            if 1 <= layer_id < 1 + 2 * 2:
                h[image] = h[image] + groups[(layer_id - 1) // 2]
            h = layer(h, cos, sin, attn, torch.arange(ids.shape[1]), cache)
        ref = m.lm_head(m.model.norm(h))
        plain, _, _ = run_prefill(m, ids, am, pos, feats[None])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the groups do change the result


def test_deepstack_midlayers_taps_block_inputs():
    """DeepStackMidLayerMerger: group k = mlp_k(ln_k(state entering block taps[k]) per 2x2 window)."""
    m = tiny_model()
    seen = {}
    hooks = [m.visual.blocks[i].register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0]))
             for i in (1, 2)]
    px = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = m.encode_images(px)
        mg = m.visual.merger
        for k, block in enumerate((1, 2)):
            x = seen[block].reshape(-1, 32)  # [2*36,E]
            ref = mg.mlp_deepstack_list[k](mg.ln_q_deepstack_list[k](x).reshape(-1, 4 * 32))  # [2*9,D]
            torch.testing.assert_close(out["deepstack_features"][k].reshape(-1, 32), ref, atol=ATOL, rtol=1e-4)
    for h in hooks:
        h.remove()
    assert out["image_features"].shape == (2, 9, 32) and out["deepstack_features"].shape == (2, 2, 9, 32)


def _efficient_reference(m, rows, h, w, vit_rows, final):
    """SPEC 4.5 with explicit loops over cells. rows: processor rows [h*w,4704] (28-px cells in 2x2
    window order); vit_rows/final: what our ViT received and produced ([4hw,1176], [4hw,E])."""
    cell_of = {}  # (r, c) -> processor row
    for j in range(h * w):
        (win, inner), wpr = divmod(j, 4), w // 2
        cell_of[(win // wpr * 2 + inner // 2, win % wpr * 2 + inner % 2)] = rows[j].view(6, 28, 28)
    want_rows = [cell_of[(r, c)][:, sr * 14:sr * 14 + 14, sc * 14:sc * 14 + 14].reshape(-1)
                 for r in range(h) for c in range(w) for sr in range(2) for sc in range(2)]
    torch.testing.assert_close(vit_rows, torch.stack(want_rows))  # step 1: raster cells, 2x2 sub-patches
    mg, tok = m.visual.merger, lambda r, c: final[4 * (r * w + c):4 * (r * w + c) + 4]  # a cell's 4 ViT tokens
    deep = {(r, c): mg.mlp(mg.ln_q(tok(r, c)).reshape(-1)) for r in range(h) for c in range(w)}  # step 3
    main = [mg.mlp_deepstack(torch.cat([mg.ln_q_deepstack(tok(2 * br + dr, 2 * bc + dc)).reshape(-1)
                                        for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1))]))
            for br in range(h // 2) for bc in range(w // 2)]  # step 4
    raster = [deep[(r, c)] for r in range(h) for c in range(w)]
    groups = [[raster[4 * j + k] for j in range(len(main))] for k in range(4)]  # step 5: 1x4 raster strips
    return torch.stack(main), torch.stack([torch.stack(gk) for gk in groups]), deep


def test_deepstack_efficient_reproduces_the_released_permutation():
    m = tiny_model(deepstack="efficient", image_size=112)
    h, w = 4, 6  # cells of 28 px: the SPEC's example
    px = torch.randn(1, 3, 28 * h, 28 * w, generator=torch.Generator().manual_seed(5))
    rows = patch_rows(px, 28, 2, 2)  # [24,4704] as the processor sends them
    seen = {}
    hooks = [m.visual.patch_embed.register_forward_pre_hook(lambda mod, a: seen.__setitem__("in", a[0])),
             m.visual.blocks[-1].register_forward_hook(lambda mod, a, out: seen.__setitem__("out", out))]
    with torch.no_grad():
        out = m.encode_images(rows, torch.tensor([[1, h, w]]))
        main, groups, deep = _efficient_reference(m, rows, h, w, seen["in"], seen["out"].reshape(-1, 32))
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(out["image_features"][0], main, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out["deepstack_features"][:, 0], groups, atol=ATOL, rtol=1e-4)
    for k in range(4):  # main token 0 covers cells (0,0),(0,1),(1,0),(1,1) but receives (0,0),(0,1),(0,2),(0,3)
        torch.testing.assert_close(out["deepstack_features"][k, 0, 0], deep[(0, k)], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kind", ["none", "v1", "midlayers", "efficient"])
def test_fixed_size_pixels_and_patch_rows_give_the_same_features(kind):
    """[B,3,H,W] (patchified inside, batched attention) == processor rows + grid (masked attention)."""
    m = tiny_model(deepstack=kind, image_size=112)
    px = torch.randn(2, 3, 56, 112, generator=torch.Generator().manual_seed(6))
    pp = m.slimm_config.processor_patch
    rows = torch.cat([patch_rows(px[i:i + 1], pp, 2, 2) for i in range(2)])
    grid = torch.tensor([[1, 56 // pp, 112 // pp]] * 2)
    with torch.no_grad():
        a, b = m.encode_images(px), m.encode_images(rows, grid)
    if kind == "none":
        torch.testing.assert_close(a.reshape(-1, 32), b.reshape(-1, 32), atol=ATOL, rtol=1e-4)
        return
    for key in a:  # [B,N,D] vs [1,B*N,D]; groups [K,B,N,D] vs [K,1,B*N,D]
        torch.testing.assert_close(a[key].reshape(b[key].shape), b[key], atol=ATOL, rtol=1e-4)
    assert a["deepstack_features"].shape[0] == m.slimm_config.num_groups


# ----------------------------------------------------------------------------- processor
def dynamic_processor(**changes):
    cfg = replace(TINY, **{"dynamic": True, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16, **changes})
    return Processor(processor_spec(cfg), load_tiny("slimm-tiny").tokenizer), cfg


@pytest.mark.parametrize("size", [(4000, 3000), (6, 5), (28, 2000), (100, 100)])
def test_dynamic_resolution_respects_the_pixel_bounds(size):
    proc, cfg = dynamic_processor()
    b = proc([Image.new("RGB", size, (200, 30, 60))], ["Hi"])
    (t, gh, gw), = b["image_grid_thw"].tolist()
    h, w = gh * 14, gw * 14
    assert h % 28 == 0 and w % 28 == 0 and cfg.min_pixels <= h * w <= cfg.max_pixels
    assert b["pixel_values"].shape == (gh * gw, 1176)
    assert (b["input_ids"] == IMAGE_PAD).sum() == gh * gw // 4


def test_extreme_aspect_ratio_is_a_clear_error():
    with pytest.raises(VlmrtError, match="aspect ratio"):
        smart_resize(10, 2500, 28, 3136, 802816)


def test_patch_rows_match_transformers_image_processor():
    tr = pytest.importorskip("transformers")
    cls = getattr(tr, "Qwen2VLImageProcessorPil", None) or tr.Qwen2VLImageProcessor
    img = Image.fromarray(torch.randint(0, 256, (56, 84, 3), generator=torch.Generator().manual_seed(7)).byte().numpy())
    try:
        ref = cls(do_resize=False)(images=[img], return_tensors="pt")
    except Exception as e:  # e.g. a backend this environment lacks
        pytest.skip(f"transformers' image processor unavailable here: {e}")
    proc, _ = dynamic_processor(pre_resize=False, max_pixels=56 * 84)
    b = proc([img], ["Hi"])
    assert b["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist() == [[1, 4, 6]]
    torch.testing.assert_close(b["pixel_values"], ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_prompt_layout_and_stop_tokens(photo):
    loaded = load_tiny("slimm-tiny")
    spec, tok = loaded.spec, loaded.tokenizer
    assert spec.stop_token_ids == ((151645,), (151643,)) and not spec.add_bos
    b = Processor(spec, tok)([photo], ["What is this?"])
    ids = b["input_ids"][0].tolist()
    before, after = TEMPLATE.replace("{prompt}", "What is this?").split("<|image_pad|>")
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    assert ids == enc(before) + [IMAGE_PAD] * 9 + enc(after)
    assert ids[0] == 151644 and enc(before)[-1] == VISION_START and enc(after)[0] == VISION_END
    assert IM_END in enc(after)
    with pytest.raises(VlmrtError, match="must not contain"):
        Processor(spec, tok)([photo], ["look: <|image_pad|>"])


# ----------------------------------------------------------------------------- pipeline
def test_batch_rows_equal_single_runs_with_mixed_image_sizes(photo):
    """The dynamic path through the whole loop: two sizes in one batch, left padding, M-RoPE."""
    from vlmrt.pipeline import Pipeline

    proc, cfg = dynamic_processor()
    model = tiny_model(**{k: getattr(cfg, k) for k in ("dynamic", "min_pixels", "max_pixels")})
    loaded = LoadedModel(model, proc.tokenizer, proc.spec, "slimm-tiny-dynamic", "slimm", True, cfg,
                         torch.device("cpu"), torch.float32)
    pipe = Pipeline(loaded)
    images = [Image.open(photo).resize((200, 90)), Image.open(photo)]
    prompts = ["Hi", "A much longer question about this picture, please answer"]
    gen = pipe.generation_config(max_new_tokens=5)
    both = pipe(images, prompts, gen)
    for i in range(2):
        assert pipe([images[i]], [prompts[i]], gen).token_ids[0] == both.token_ids[i]


def test_cli_run_and_too_long_prompt(photo, capsys):
    from vlmrt.cli import main
    from vlmrt.pipeline import Pipeline

    assert main(["run", "--model", "slimm-tiny", "--image", str(photo), "--prompt", "Describe this image.",
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "slimm" and len(out["answers"][0]["token_ids"]) == 4
    with pytest.raises(VlmrtError, match="context"):
        Pipeline(load_tiny("slimm-tiny"))([photo], ["word " * 600])


# ----------------------------------------------------------------------------- release loader
def _write_tiny_release(folder, model, cfg_json: dict):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg_json))
    load_tiny("slimm-tiny").tokenizer.save_pretrained(str(folder))
    return folder


def slimm_config_json(**extra) -> dict:
    """A SliMM-Qwen2 style config.json (model_type qwen2, SliMM architecture) at slimm-tiny's shape."""
    d, v = TINY.decoder, TINY.vision
    return {"architectures": ["SliMMForConditionalGeneration"], "model_type": "qwen2", "vocab_size": d.vocab_size,
            "hidden_size": d.hidden_size, "num_hidden_layers": d.num_layers, "num_attention_heads": d.num_heads,
            "num_key_value_heads": d.num_kv_heads, "intermediate_size": d.intermediate_size, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "max_position_embeddings": 512, "tie_word_embeddings": True,
            "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]},
            "vision_config": {"depth": v.depth, "embed_dim": v.embed_dim, "num_heads": v.num_heads,
                              "mlp_ratio": v.mlp_ratio, "patch_size": 14, "spatial_merge_size": 2,
                              "temporal_patch_size": 2, "in_chans": 3},
            "use_deepstack": True, "deepstack_type": "midlayers", "deepstack_feature_idxs": [1, 2], **extra}


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slimm_release")
    return _write_tiny_release(folder, load_tiny("slimm-tiny").model, slimm_config_json())


def test_legacy_release_round_trip_with_deepstack(tiny_release, photo):
    src, loaded = load_tiny("slimm-tiny"), load_model(str(tiny_release))
    assert loaded.config.deepstack == "midlayers" and loaded.config.deepstack_taps == (1, 2)
    b = Processor(src.spec, src.tokenizer)([photo], ["What is this?"])
    with torch.no_grad():
        outs = [run_prefill(m, b["input_ids"], b["attention_mask"], b["position_ids"],
                            m.encode_images(b["pixel_values"]))[0] for m in (src.model, loaded.model)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_released_configs_are_read_without_a_hub():
    meta = lambda *s: torch.empty(s, device="meta")
    hf = {"architectures": ["SliMMForConditionalGeneration"], "model_type": "qwen2", "vocab_size": 151657,
          "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
          "intermediate_size": 4864, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
          "rope_scaling": {"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"},
          "tie_word_embeddings": True, "custom_visual_model": "menglc/DFN-Huge-Qwen2VL-7B", "use_deepstack": False}
    cfg = config_from_release(hf, {}, {"model.embed_tokens.weight": meta(1)})
    assert cfg == PRESETS["slimm-qwen2-0.5b"]
    m_keys = {"visual.merger.mlp_deepstack_list.0.2.weight": meta(1)}
    cfg = config_from_release({**hf, "use_deepstack": True, "deepstack_type": "midlayers"}, {}, m_keys)
    assert cfg == PRESETS["slimm-deepstackm-qwen2-0.5b"]
    text = {**hf, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "intermediate_size": 8960,
            "vocab_size": 151936, "rope_scaling": {"mrope_section": [16, 24, 24]}}
    e_hf = {"model_type": "qwen2_vl", "text_config": text,
            "vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4}}
    extras = {"generation_config.json": {"use_deepstack": True, "deepstack_type": "efficient"},
              "preprocessor_config.json": {"patch_size": 28, "min_pixels": 3136, "max_pixels": 1003520,
                                           "size": {"min_pixels": 3136, "max_pixels": 12845056}}}
    cfg = config_from_release(e_hf, extras, {"visual.merger.mlp_deepstack.0.weight": meta(5120, 20480)})
    assert cfg == PRESETS["slimm-deepstacke-qwen2vl-2b"] and cfg.processor_patch == 28


def _break(kind, folder):
    if kind == "no weights":
        (folder / "model.safetensors").unlink()
    elif kind == "corrupt weights":
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    elif kind == "corrupt config":
        (folder / "config.json").write_text('{"architectures": ["SliMMForConditionalGeneration"], ')
    elif kind == "no tokenizer":
        for f in folder.glob("tokenizer*"):
            f.unlink()
    elif kind == "missing key":
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        state.pop("visual.blocks.0.attn.qkv.bias")
        save_file(state, str(folder / "model.safetensors"))
    elif kind == "unknown vision model":
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("vision_config")
        (folder / "config.json").write_text(json.dumps({**cfg, "custom_visual_model": "someone/other-vit"}))
    elif kind == "deepstack mismatch":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "deepstack_type": "efficient"}))


@pytest.mark.parametrize("kind, message", [
    ("no weights", "no weights in"), ("corrupt weights", "corrupt"), ("corrupt config", "not valid JSON"),
    ("no tokenizer", "no tokenizer"), ("missing key", "missing 1 weight.*qkv.bias"),
    ("unknown vision model", "not one vlmrt carries"), ("deepstack mismatch", "config says deepstack 'efficient'"),
])
def test_release_errors_are_clear(tiny_release, tmp_path, kind, message):
    import shutil

    folder = tmp_path / "release"
    shutil.copytree(tiny_release, folder)
    _break(kind, folder)
    with pytest.raises(VlmrtError, match=message):
        load_model(str(folder))


def test_one_onnx_vision_graph_serves_every_image_size(tmp_path):
    """Dynamic presets export the vision stage over patch rows + image_grid_thw: no re-export per size."""
    ort = pytest.importorskip("onnxruntime")
    from vlmrt.export.onnx import export_model

    proc, cfg = dynamic_processor(image_size=112)
    m = tiny_model(**{k: getattr(cfg, k) for k in ("dynamic", "min_pixels", "max_pixels", "image_size")})
    loaded = LoadedModel(m, proc.tokenizer, proc.spec, "slimm-tiny-dynamic", "slimm", True, cfg,
                         torch.device("cpu"), torch.float32)
    export_model(loaded, tmp_path / "export", progress=None)
    sess = ort.InferenceSession(str(tmp_path / "export" / "vision.onnx"))
    g = torch.Generator().manual_seed(8)
    for sizes in ([(56, 112)], [(112, 56), (56, 56)]):
        rows = torch.cat([patch_rows(torch.randn(1, 3, h, w, generator=g), 14, 2, 2) for h, w in sizes])
        grid = torch.tensor([[1, h // 14, w // 14] for h, w in sizes])
        feed = {"pixel_values": rows.numpy(), "image_grid_thw": grid.numpy()}
        got = sess.run(["image_features", "deepstack_features"], feed)
        with torch.no_grad():
            want = m.encode_images(rows, grid)
        torch.testing.assert_close(torch.from_numpy(got[0]), want["image_features"], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(got[1]), want["deepstack_features"], atol=ATOL, rtol=1e-4)
