"""The decoder verb with per-row positions and cache slots, and the compiled-path fixes: KV writes in
place into the slot pool, grouped-query attention without copies, weights built in their dtype."""

import torch
from torch import nn

from vlmrt.kv_cache import SlotKVCache
from vlmrt.models.layers import DecoderConfig, LlamaAttention, causal_mask, keep_position, rotary_cos_sin
from vlmrt.weights import build_on


def test_per_row_causal_mask_follows_each_rows_slots():
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])  # [B=2,S=5]
    mask = causal_mask(valid, torch.tensor([[2], [4]]))[:, 0, 0]  # [B,S]: one query per row
    assert mask.tolist() == [[True, True, True, False, False], [True, False, False, False, True]]  # own slot always
    lock_step = causal_mask(valid, torch.tensor([2]))  # [T] form: every row at slot 2
    assert lock_step[:, 0, 0].tolist() == [[True, True, True, False, False], [True, False, True, False, False]]


def test_keep_position_per_row():
    h = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)  # [B,T,D]
    assert torch.equal(keep_position(h, torch.tensor([1, 3])), torch.stack([h[0, 1:2], h[1, 3:4]]))
    assert torch.equal(keep_position(h, torch.tensor([2])), h[:, 2:3])


def test_slot_pool_writes_in_place_at_each_rows_positions():
    pool = SlotKVCache(1, 3, 2, 6, 4, torch.float32, "cpu")
    ptr = pool.keys[0].data_ptr()
    k = torch.randn(2, 2, 1, 4)  # rows 1 and 2, one token each
    view = pool.view(1, 3)
    keys, _ = view.update(0, k, k * 2, torch.tensor([[4], [0]]))
    assert pool.keys[0].data_ptr() == ptr and keys.data_ptr() == pool.keys[0][1].data_ptr()  # a view: no copy
    assert torch.equal(pool.keys[0][1, :, 4], k[0, :, 0]) and torch.equal(pool.values[0][2, :, 0], 2 * k[1, :, 0])
    assert pool.keys[0][0].abs().sum() == 0 and pool.keys[0][1, :, :4].abs().sum() == 0  # nothing else written


def test_grouped_query_attention_matches_repeated_heads():
    cfg = DecoderConfig(vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=8)
    torch.manual_seed(0)
    attn = LlamaAttention(cfg, 0)
    pool = SlotKVCache(1, 2, 2, 8, cfg.head_dim, torch.float32, "cpu")
    x = torch.randn(2, 5, 32)
    positions = torch.arange(5).expand(2, 5)
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    valid = torch.zeros(2, 9, dtype=torch.long)
    valid[:, :5] = 1
    out = attn(x, cos, sin, causal_mask(valid, positions), positions, pool.view(0, 2))
    # reference: every kv head repeated for its two query heads, plain causal attention
    q = attn.q_proj(x).view(2, 5, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(2, 5, 2, 8).transpose(1, 2)
    v = attn.v_proj(x).view(2, 5, 2, 8).transpose(1, 2)
    from vlmrt.models.layers import apply_rotary

    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    ref = nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, attn.o_proj(ref.transpose(1, 2).reshape(2, 5, -1)))


def test_weights_are_allocated_in_the_target_dtype(monkeypatch):
    seen = []
    real = nn.Module.to_empty

    def spy(self, *, device, recurse=True):
        seen.extend(p.dtype for p in self.parameters())
        return real(self, device=device, recurse=recurse)

    monkeypatch.setattr(nn.Module, "to_empty", spy)
    model = build_on(torch.device("cpu"), torch.float16, lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    assert seen and set(seen) == {torch.float16}  # already fp16 when memory is allocated: no fp32 copy first
    assert {p.dtype for p in model.parameters()} == {torch.float16} and model[0].weight.device.type == "cpu"
