"""The static-cache decoder: a fixed-size KV cache as graph inputs and outputs, written per row.

The form of the decoder that static exports (`vlmrt export --static-shapes`, `--format aoti`) and
slot-based runtimes share. Every tensor keeps its size from step to step, so graph compilers
(Ascend ATC, AOTInductor, XLA-style jit runtimes) see the same shapes at every call:

```
 inputs_embeds [B,T,D]  position_ids [B,T] (M-RoPE [3,B,T])  cache_position [B,T]  logits_index [B]
 attention_mask [B,S]   past_key_values.{i}.key|value [B,H_kv,S,hd]        (+ family extras by name)
        │
        ▼  decoder layers; layer i: k, v [B,H_kv,T,hd] of the new tokens
        ▼  present_i = past_i.scatter(2, cache_position, k)   out of place: row b, slot cache_position[b,t]
        ▼  attention over all S slots of present_i, mask per row (below)
 logits [B,1,V] at position logits_index[b] of row b    present.{i}.key|value [B,H_kv,S,hd]
```

Conventions (the same as the engine's slot-mapped cache):
- Each row owns cache row b of S slots; `cache_position[b,t]` is the slot of its t-th new token and
  `position_ids` its rotary position (they differ under left padding or M-RoPE).
- `attention_mask[b,s]` marks valid slots of row b. Query t of row b sees slot s when
  s <= cache_position[b,t] and attention_mask[b,s]; it always sees its own slot
  (vlmrt.models.layers.causal_mask with a [B,T] cache_position).
- Padding a request to a shape bucket is harmless: padded tokens of a row get slots after its real
  ones (distinct slots), which later real tokens overwrite before the mask marks them valid; padded
  rows have an all-zero mask and their outputs are dropped.
- `logits_index[b]` picks the position of row b whose logits come out (its last real token when
  the prompt is right-padded to the bucket). The decoder is asked for logits at the B positions
  (`logits_at` [B], [B,B,V]) and row b keeps its own: B rows of the LM head, not T.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmrt.stages import (ATTENTION_MASK, CACHE_POSITION, INPUTS_EMBEDS, LOGITS, LOGITS_INDEX, POSITION_IDS,
                          past_key_name, past_value_name, present_key_name, present_value_name)


class ScatterKVCache:
    """Fixed-size pasts in, presents of the same size out; new keys written at per-row slots."""

    def __init__(self, past_keys: list[torch.Tensor], past_values: list[torch.Tensor]):
        self.keys = list(past_keys)  # each [B,H_kv,S,hd]
        self.values = list(past_values)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        """k, v [B,H_kv,T,hd] at slots cache_position [B,T] -> the whole presents [B,H_kv,S,hd]."""
        index = cache_position[:, None, :, None].expand_as(k)  # [B,H_kv,T,hd]
        self.keys[layer] = self.keys[layer].scatter(2, index, k)
        self.values[layer] = self.values[layer].scatter(2, index, v)
        return self.keys[layer], self.values[layer]


def static_decoder_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's fixed inputs (family extras follow them) and outputs, in order."""
    inputs = [INPUTS_EMBEDS, POSITION_IDS, ATTENTION_MASK, CACHE_POSITION, LOGITS_INDEX]
    outputs = [LOGITS]
    for i in range(num_layers):
        inputs += [past_key_name(i), past_value_name(i)]
        outputs += [present_key_name(i), present_value_name(i)]
    return inputs, outputs


class StaticCacheDecoder(nn.Module):
    """`model.decode` on a ScatterKVCache, with a positional forward over named inputs (for
    torch.onnx.export and torch.export). The whole model is held, not copied.

    Args:
        model: a family model (the stage contract of vlmrt/stages.py).
        names: the graph inputs in order: `static_decoder_names(...)[0]` plus family extras.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, list(names)
        self.output_names = static_decoder_names(model.num_layers)[1]

    def forward(self, *tensors):
        named = dict(zip(self.names, tensors))
        embeds, positions, mask = named.pop(INPUTS_EMBEDS), named.pop(POSITION_IDS), named.pop(ATTENTION_MASK)
        slots, at = named.pop(CACHE_POSITION), named.pop(LOGITS_INDEX)  # [B,T], [B]
        n = self.model.num_layers
        cache = ScatterKVCache([named.pop(past_key_name(i)) for i in range(n)],
                               [named.pop(past_value_name(i)) for i in range(n)])
        logits = self.model.decode(embeds, positions, mask, slots, cache, logits_at=at, **named)  # [B,1,V]: row b at at[b]
        outs = [logits]
        for i in range(n):
            outs += [cache.keys[i], cache.values[i]]
        return tuple(outs)


def example_inputs(model, embeds: torch.Tensor, seq_len: int, extras: dict | None = None,
                   mrope: bool = False) -> dict[str, torch.Tensor]:
    """Example inputs of the static-cache decoder for embeds [B,T,D] on a cache of `seq_len` slots:
    row b's tokens at slots 2b.. (rows differ, so a trace cannot fold them), the mask open up to them.

    Args:
        model: the family model (cache geometry).
        embeds: inputs_embeds [B,T,D].
        seq_len: S, the cache slots per row.
        extras: family inputs by name (e.g. SliMM's deepstack_embeds), appended after the pasts.
        mrope: position_ids as [3,B,T].
    """
    b, t = embeds.shape[:2]
    dev = embeds.device
    start = torch.arange(b, device=dev)[:, None] * min(2, max(seq_len - t, 0) // max(b, 1))  # [B,1]
    slots = start + torch.arange(t, device=dev)  # [B,T]
    positions = slots[None].expand(3, -1, -1).contiguous() if mrope else slots.clone()  # never the same tensor:
    # torch.export merges an input passed twice into one, and the graph would read positions as slots
    mask = (torch.arange(seq_len, device=dev)[None] <= slots[:, -1:]).long()  # [B,S]
    gen = torch.Generator().manual_seed(1)
    kv = lambda: torch.randn(b, model.num_kv_heads, seq_len, model.head_dim, generator=gen).to(dev, embeds.dtype)
    inputs = {INPUTS_EMBEDS: embeds, POSITION_IDS: positions, ATTENTION_MASK: mask, CACHE_POSITION: slots,
              LOGITS_INDEX: torch.full((b,), t - 1, dtype=torch.long, device=dev)}
    for i in range(model.num_layers):
        inputs[past_key_name(i)], inputs[past_value_name(i)] = kv(), kv()
    return {**inputs, **(extras or {})}
