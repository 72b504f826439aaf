"""KV caches: the static one the eager and compiled runtimes use, the slot pool the engine uses
(vlmrt/engine.py), and the concatenating one that an exported decoder graph uses (past in, present out).

All offer `update(layer, k, v, cache_position) -> (keys, values)`; the decoder's attention calls it
and attends over what it returns, so one decoder serves them all. `cache_position` is [T] (one slot
per query for every row: the lock-step loop of generate.py) or [B,T] (each row its own slots: the
engine, where rows join and leave at any step).

Static layout, per layer (gpt-fast style, preallocated once, written in place):

```
 keys[layer]   [B_max, H_kv, S_max, hd]   slot s holds the token at cache position s
 values[layer] [B_max, H_kv, S_max, hd]
```
"""

from __future__ import annotations

import torch

from vlmrt.errors import VlmrtError


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
        """Write k, v [B,H_kv,T,hd] at slots `cache_position` ([T], or [B,T] per row); return the
        whole buffers of the first B rows (views: written in place)."""
        batch = k.shape[0]
        keys, values = self.keys[layer][:batch], self.values[layer][:batch]
        write_slots(keys, k, cache_position)
        write_slots(values, v, cache_position)
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


def lockstep_inputs(attention_mask: torch.Tensor, cache_position: torch.Tensor, seq: int,
                    batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask and slots of a lock-step decoder call on a cache of `seq` slots (the jax, paddle and
    aoti runtimes' `decode`), after checking that the call's last slot fits.

    Args:
        attention_mask: [B,L] over the request so far (L may be under or over `seq`).
        cache_position: [T] (every row) or [B,T] slots of the call's tokens.
    Returns: mask [B,S] (cut or zero-padded to S = seq), slots [B,T].
    """
    t = cache_position.shape[-1]
    last = int(cache_position.reshape(-1, t)[:, -1].max())
    if last >= seq:
        raise VlmrtError(f"slot {last} is past the {seq} slots of this request's cache")
    mask = attention_mask[:, :seq]
    mask = torch.nn.functional.pad(mask, (0, seq - mask.shape[1]))  # [B,S]
    slots = cache_position.reshape(1, t).expand(batch, t) if cache_position.dim() == 1 else cache_position
    return mask, slots


def write_slots(buffer: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> None:
    """buffer [B,H_kv,S,hd] <- new [B,H_kv,T,hd] at slots cache_position [T] (all rows) or [B,T]
    (row b at its own slots), in place: no copy of the buffer, whatever the runtime."""
    if cache_position.dim() == 1:
        buffer.index_copy_(2, cache_position, new)
        return
    b, h, t, d = new.shape
    index = cache_position.view(b, 1, t, 1).expand(b, h, t, d)  # [B,H_kv,T,hd]
    buffer.scatter_(2, index, new)


class SlotView:
    """Some rows of a SlotKVCache as one decoder call's cache.

    Writes go straight into the pool (`index_put_` on its buffers, which a compiled graph turns into
    an in-place scatter on its input: no copy of a cache window). Reads are a view of the rows
    [start, start + n) when the call covers a contiguous range (`start` given), else the rows
    gathered (`index_select`, one copy: a compiled prefill whose row is a tensor, not a constant).

    Args:
        pool: the SlotKVCache.
        rows: [n] pool rows, on the pool's device (call i's row b is pool row rows[b]).
        start: rows[0] when rows is the range [start, start + n), else None.
        window: read key positions [0, window) only (None: the whole row, scratch included); the
            call's writes must fall inside it (vlmrt.engine.attention_window).
    """

    def __init__(self, pool: "SlotKVCache", rows: torch.Tensor, start: int | None, window: int | None = None):
        self.pool, self.rows, self.start = pool, rows, start
        self.window = pool.max_seq + 1 if window is None else window  # key positions [0, window) are read
        self.heads = torch.arange(pool.keys[0].shape[1], device=rows.device) if pool.keys else None  # [H_kv]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        """k, v [n,H_kv,T,hd] at positions cache_position [n,T] of their rows -> keys, values
        [n,H_kv,W,hd] of those rows (W = the window, S+1 by default)."""
        index = (self.rows[:, None, None], self.heads[None, :, None], cache_position[:, None, :])  # -> [n,H_kv,T]
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys.index_put_(index, k)
        values.index_put_(index, v)
        w = self.window
        if self.start is not None:
            n = self.rows.shape[0]
            return keys[self.start:self.start + n, :, :w], values[self.start:self.start + n, :, :w]
        return keys[:, :, :w].index_select(0, self.rows), values[:, :, :w].index_select(0, self.rows)


class SlotKVCache:
    """The engine's KV pool: one row ("slot") of `max_seq` cache positions per running request,
    plus one scratch position per row that padding rows and padding tokens write to.

    ```
     keys[layer]   [N_slots, H_kv, S + 1, hd]    row r = the request holding slot r
     values[layer] [N_slots, H_kv, S + 1, hd]    position S = scratch: never marked valid
    ```
    A decoder call covers a contiguous range of rows (`view(start, stop)`), so every write is in
    place and no row is gathered; rows of the range that are not part of the step are fed
    `cache_position = S` and an all-zero mask, so they only ever touch the scratch position.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_slots, num_kv_heads, max_seq + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_seq = num_slots, max_seq
        self.scratch = max_seq  # the position padding writes to

    def view(self, start: int, stop: int, window: int | None = None) -> SlotView:
        """Rows [start, stop), key positions [0, window), as one call's cache (made per call: cheap;
        compiled runtimes keep theirs)."""
        return SlotView(self, torch.arange(start, stop, device=self.keys[0].device), start, window)

    def move(self, src: int, dst: int, used: int) -> None:
        """Row `dst` <- row `src`, positions [0, used) of every layer (the engine's compaction)."""
        for buf in self.keys + self.values:
            buf[dst, :, :used].copy_(buf[src, :, :used])  # [H_kv,used,hd]


def slot_bytes(num_layers: int, num_kv_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one slot of a SlotKVCache takes: keys and values of every layer, scratch included."""
    return 2 * num_layers * num_kv_heads * (max_seq + 1) * head_dim * torch.empty((), dtype=dtype).element_size()


def default_kv_budget(device: torch.device) -> int:
    """The KV pool's budget when none is given: half the free GPU memory on CUDA; on a CPU a tenth
    of the machine's memory, at most 4 GiB (the CPU is shared with the weights and everything else)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return min(total // 10, 4 << 30)


def slots_for_budget(budget_bytes: int, per_slot: int, max_slots: int) -> int:
    """How many slots fit the budget, at most `max_slots`; 0 when not even one does."""
    return max(0, min(max_slots, budget_bytes // per_slot))
