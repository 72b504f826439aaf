"""A cache of vision outputs: the same image asked again skips the vision stage.

A runtime wrapper (every attribute but `encode_images` is the runtime's own), so the engine uses
it as its runtime and nothing in the engine changes. The key is a hash of the vision inputs'
bytes (the preprocessed pixels plus any named vision inputs, e.g. MiniCPM-V's patch coordinates):
equal image bytes give equal pixels, hence one entry. Least recently used entries go first once
the outputs held pass `max_bytes`.

```
 encode_images(pixel_values, **named) ─► key = blake2b(shape, dtype, bytes of every input)
     hit  ─► the stored output (moved to the back of the LRU)
     miss ─► runtime.encode_images(...) ─► store (evict from the front past max_bytes)
 a batch of images (pixel_values [n,3,H,W], named inputs [n,...]: the engine's batched admission)
     ─► one key per image ─► the misses through the runtime as one batch ─► each image's output
        stored alone ─► the n outputs joined on their image axis (vlmrt/engine_batch.py)
```
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def content_key(pixel_values: torch.Tensor, named: dict) -> bytes:
    """A digest of the vision inputs: shapes, dtypes and bytes, named inputs by name."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in [("pixel_values", pixel_values), *sorted(named.items())]:
        h.update(name.encode())
        for x in _tensors(t):
            x = x.detach().contiguous().cpu()
            h.update(f"{tuple(x.shape)}{x.dtype}".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


class CachedVision:
    """`runtime` with an LRU of vision outputs in front of its `encode_images`.

    Args:
        runtime: the runtime to wrap.
        max_bytes: most bytes of vision outputs held (0: the wrapper passes every call through).
    """

    def __init__(self, runtime, max_bytes: int):
        self.runtime, self.max_bytes = runtime, max_bytes
        self.entries: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self.lock = threading.Lock()  # /metrics reads the counters from another thread

    def __getattr__(self, name):  # everything else is the runtime's
        return getattr(self.runtime, name)

    def encode_images(self, pixel_values, **named):
        if self.max_bytes <= 0:
            return self.runtime.encode_images(pixel_values, **named)
        n = pixel_values.shape[0]
        if pixel_values.dim() == 4 and n > 1 and all(torch.is_tensor(v) and v.shape[:1] == (n,) for v in named.values()):
            return self._encode_each(pixel_values, named)
        return self._encode_one(pixel_values, named)

    def _encode_each(self, pixel_values, named: dict):
        """n images [n,3,H,W] (+ named [n,...]): a key and an entry per image; the misses in one call."""
        from vlmrt.engine_batch import cat_batch, split_batch

        n = pixel_values.shape[0]
        image = lambda i: (pixel_values[i:i + 1], {k: v[i:i + 1] for k, v in named.items()})
        keys = [content_key(*image(i)) for i in range(n)]
        found: dict[bytes, object] = {}
        with self.lock:
            for key in keys:
                if key in self.entries:
                    self.entries.move_to_end(key)
                    found[key] = self.entries[key][0]
            missing = list(dict.fromkeys(k for k in keys if k not in found))  # an image twice: one run
            self.misses += len(missing)
            self.hits += n - len(missing)
        if missing:
            index = torch.tensor([keys.index(k) for k in missing], device=pixel_values.device)
            batch = self.runtime.encode_images(pixel_values.index_select(0, index),
                                               **{k: v.index_select(0, index.to(v.device)) for k, v in named.items()})
            for key, out in zip(missing, split_batch(batch, len(missing))):
                found[key] = self._store(key, _copy(out))
        return cat_batch([found[k] for k in keys])

    def _encode_one(self, pixel_values, named: dict):
        key = content_key(pixel_values, named)
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
                return self.entries[key][0]
            self.misses += 1
        return self._store(key, self.runtime.encode_images(pixel_values, **named))

    def _store(self, key: bytes, out):
        """Keep `out` under `key` (evicting the least recently used past max_bytes); return it."""
        size = sum(t.numel() * t.element_size() for t in _tensors(out))
        if size <= self.max_bytes:
            with self.lock:
                self.entries[key] = (out, size)
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, (_, freed) = self.entries.popitem(last=False)
                    self.bytes -= freed
        return out


def _copy(out):
    """An output cut from a batch's, as its own memory (a view would keep the whole batch alive)."""
    if isinstance(out, dict):
        return {k: v.clone() for k, v in out.items()}
    return out.clone()
