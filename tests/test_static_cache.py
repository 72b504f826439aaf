"""The static-cache decoder (vlmrt/export/static_cache.py) against the eager runtime: fixed-size
pasts in, presents out, per-row slots and positions (tiny presets, fp32, CPU)."""

import pytest
import torch
from PIL import Image

from conftest import ASSETS, load_tiny
from families import FAMILY_TESTS
from vlmrt.export.static_cache import StaticCacheDecoder, static_decoder_names
from vlmrt.generate import prompt_positions, split_embedded
from vlmrt.pipeline import Pipeline

FAMILIES = sorted(FAMILY_TESTS)
RTOL, ATOL = 1e-4, 1e-5  # fp32
S = 160  # cache slots per row


def _prompt(family, n=2):
    loaded = load_tiny(FAMILY_TESTS[family]["tiny"])
    pipe = Pipeline(loaded, "eager")
    photo = Image.open(ASSETS / "astronaut.jpg").convert("RGB").resize((128, 128))
    batch = pipe.processor([photo, photo.transpose(Image.FLIP_LEFT_RIGHT)][:n], ["Hi", "What is in this picture?"][:n])
    rt = pipe.runtime
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values", "position_ids")}
    embedded = rt.embed(batch["input_ids"], rt.encode_images(batch["pixel_values"], **vision))
    return loaded, rt, batch, embedded


def _run_static(model, embeds, positions, mask, slots, last, extras, pasts=None):
    b = embeds.shape[0]
    names = static_decoder_names(model.num_layers)[0] + list(extras)
    zeros = lambda: torch.zeros(b, model.num_kv_heads, S, model.head_dim)
    pasts = pasts or {n: zeros() for n in names if n.startswith("past_key_values.")}
    values = {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask, "cache_position": slots,
              "logits_index": last, **pasts, **extras}
    with torch.no_grad():
        out = StaticCacheDecoder(model, names)(*(values[n] for n in names))
    return out[0], out[1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_match_the_eager_cache(family):
    loaded, rt, batch, embedded = _prompt(family)
    b, t = batch["input_ids"].shape
    embeds, extras = split_embedded(embedded)
    positions = prompt_positions(batch)
    mask = torch.zeros(b, S, dtype=torch.long)
    mask[:, :t] = batch["attention_mask"]
    rt.start(b, S)
    ref = rt.decode(embeds, positions, mask, torch.arange(t), **extras)  # [B,1,V]
    slots = torch.arange(t).expand(b, -1)  # [B,T]
    logits, presents = _run_static(loaded.model, embeds, positions, mask, slots, torch.full((b,), t - 1), extras)
    torch.testing.assert_close(logits, ref, rtol=RTOL, atol=ATOL)
    for i in range(loaded.model.num_layers):
        torch.testing.assert_close(presents[2 * i], rt.cache.keys[i][:b], rtol=RTOL, atol=ATOL)
    token = ref[:, -1].argmax(-1)  # one decode step at slot T, both ways
    step, _ = split_embedded(rt.embed(token[:, None], None))
    mask[:, t] = 1
    pos = (positions.amax(0) if positions.dim() == 3 else positions)[:, -1:] + 1  # [B,1]
    ref = rt.decode(step, pos, mask, torch.tensor([t]))
    names = static_decoder_names(loaded.model.num_layers)[0]
    pasts = dict(zip([n for n in names if n.startswith("past_key_values.")], presents))
    logits, _ = _run_static(loaded.model, step, pos, mask, torch.full((b, 1), t), torch.zeros(b, dtype=torch.long),
                            {}, pasts)
    torch.testing.assert_close(logits, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_has_its_own_slots_and_logits_index(family):
    """Row 1 of a batch, written at slots 7.. and right-padded by 3 tokens, gives the logits and
    keys it gives alone at slots 0.. (per-row scatter and per-row causal mask)."""
    loaded, rt, batch, embedded = _prompt(family, n=1)
    t = batch["input_ids"].shape[1]
    embeds, extras = split_embedded(embedded)
    positions = prompt_positions(batch)
    alone_mask = torch.zeros(1, S, dtype=torch.long)
    alone_mask[:, :t] = 1
    alone, alone_kv = _run_static(loaded.model, embeds, positions, alone_mask, torch.arange(t)[None],
                                  torch.tensor([t - 1]), extras)
    pad, off = 3, 7
    two = lambda x, d: torch.cat([torch.zeros_like(x), x], dim=d)  # row 0: a dummy, row 1: the prompt
    padded = lambda x, d: torch.cat([x, x.narrow(d, 0, pad)], dim=d)  # pad T on the right
    pos_dim = positions.dim() - 1
    mask = torch.zeros(2, S, dtype=torch.long)
    mask[1, off:off + t] = 1
    slots = torch.stack([torch.arange(t + pad), off + torch.arange(t + pad)])  # [2,T+pad]
    extras2 = {k: two(padded(v, 2), 1) for k, v in extras.items()}  # deepstack_embeds [K,B,T,D]
    logits, kv = _run_static(loaded.model, two(padded(embeds, 1), 0), two(padded(positions, pos_dim), pos_dim - 1),
                             mask, slots, torch.tensor([0, t - 1]), extras2)
    torch.testing.assert_close(logits[1:], alone, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(kv[0][1:, :, off:off + t], alone_kv[0][:, :, :t], rtol=RTOL, atol=ATOL)
