"""KV caches: the static one the eager and compiled runtimes use, and the concatenating one that
an exported decoder graph uses (past in, present out).

Both offer `update(layer, k, v, cache_position) -> (keys, values)`; the decoder's attention calls it
and attends over what it returns, so one decoder serves both.

Static layout, per layer (gpt-fast style, preallocated once, written in place):

```
 keys[layer]   [B_max, H_kv, S_max, hd]   slot s holds the token at cache position s
 values[layer] [B_max, H_kv, S_max, hd]
```
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """A preallocated cache for (max_batch, max_seq) tokens; no allocation while generating."""

    def __init__(
        self,
        num_layers: int,
        max_batch: int,
        num_kv_heads: int,
        max_seq: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (max_batch, num_kv_heads, max_seq, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_batch = max_batch
        self.max_seq = max_seq

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        """Write k, v [B,H_kv,T,hd] at slots `cache_position` [T]; return the whole buffers."""
        batch = k.shape[0]
        keys, values = self.keys[layer][:batch], self.values[layer][:batch]
        keys.index_copy_(2, cache_position, k)
        values.index_copy_(2, cache_position, v)
        return keys, values

    def reorder(self, rows: torch.Tensor, seq: int | None = None) -> None:
        """Beam search: row i becomes a copy of row rows[i] (rows [n], n <= max_batch), for slots
        [:seq] (None: all). In place: the buffers keep their addresses (CUDA graphs read them)."""
        n = rows.shape[0]
        for t in self.keys + self.values:
            src = t[:, :, :seq]  # [B_max,H_kv,S,hd]
            t[:n, :, :src.shape[2]].copy_(src.index_select(0, rows))  # gathered first: rows overlap the copy

    def reset(self) -> None:
        for t in self.keys + self.values:
            t.zero_()


class ConcatKVCache:
    """Past keys/values come in as tensors and the presents go out: the exported-graph form."""

    def __init__(self, past_keys: list[torch.Tensor], past_values: list[torch.Tensor]):
        self.keys = list(past_keys)  # each [B,H_kv,S_past,hd]
        self.values = list(past_values)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)  # [B,H_kv,S_past+T,hd]
        self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]
