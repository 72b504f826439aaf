"""The compiled runtime: the same three stages as `eager`, run with a cache allocated once,
`torch.compile` (Inductor) and, on CUDA, one CUDA graph per shape bucket. The GPU fast path.

Based on gpt-fast's recipe (static KV cache, a compiled decode-one-token step, fixed shapes) and on
PyTorch's CUDA-graph notes (`torch.cuda.graph`: static input buffers, warm-up on a side stream
before capture, one memory pool shared by graphs that never run at the same time).

```
 storage: StaticKVCache [B_max, H_kv, S_max, hd] per layer, allocated once in __init__
    └► window(Bb, S): writes index_put_ into storage, reads storage[:Bb, :, :S] views (no copy)

 encode_images  pixels [b,3,H,W] ─► compiled vision (+ CUDA graph per batch size) ─► features
 embed          eager (a table lookup and a splice; nothing to gain from compiling)
 decode, T > 1  prefill: embeds [b,T,D] ─pad rows to Bb, pad T on the right to Tb─►
                compiled decoder over window(Bb, S), logits_at = [T-1] ─► logits [Bb,1,V] ─► [:b]
 decode, T = 1  copy into static buffers (embeds [Bb,1,D], positions [...,Bb,1], mask [Bb,S],
                cache_position [1]) ─► replay the (Bb, S) CUDA graph (CPU: call the compiled step)
                ─► logits [Bb,1,V] ─► [:b]
```

Engine steps (vlmrt/engine.py), beside the lock-step path above:

```
 allocate_slots  SlotKVCache [N <= max_batch, H_kv, S+1, hd] per layer; decode buckets = batch buckets <= N
 warmup()        (after the engine's probe request compiled vision + prefill) one decode graph per
                 (batch bucket, window bucket)
 prefill         embeds [1,L,D] ─► one graph for every L (dynamic length, is_causal) ─► writes its row in place
 decode          rows [0,n) ─► static buffers of bucket Bb >= n (rows n..Bb-1: zero mask, scratch slot)
                 ─► the (Bb, W) graph, W the smallest window bucket >= the longest row + 1 (keys [0, W)
                 only; CUDA graph on GPU) ─► in-place index_put_ into the pool ─► logits [n,V]
```

Why the padding is harmless:
- Rows b..Bb-1 are zeros with an all-zero attention mask; a query always sees its own slot, so they
  stay finite, and rows never mix (attention and every matmul are per row). Their output is dropped.
- Right padding of the prompt writes keys for slots T..Tb-1. Real queries never see them (causal),
  and decode overwrites slot T+i before the mask marks it valid.
- Slots between the request's length and the window S are masked (attention_mask is 0 there).

Why manual CUDA graph capture rather than `mode="reduce-overhead"`: the cache is ours and explicit,
so static buffers and graph keys are too; capture needs no rules about mutated inputs or outputs
overwritten by the next replay (we copy logits out), and behaves the same on every torch version.
Inductor compiles the step (fusions); the graph removes launch and Python overhead.
"""

from __future__ import annotations

import itertools
import time
import types
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from vlmrt.errors import VlmrtError
from vlmrt.generate import split_embedded
from vlmrt.kv_cache import SlotKVCache, SlotView, StaticKVCache


@dataclass(frozen=True)
class CompiledOptions:
    """Knobs of the compiled runtime (`Pipeline(..., runtime_options={...})`)."""

    max_batch: int = 8  # cache rows, allocated once; a larger batch is an error
    max_seq: int | None = None  # cache slots, allocated once (None: the model's context)
    batch_buckets: tuple[int, ...] | None = None  # graph batch sizes (None: 1, 2, 4, ... and max_batch)
    seq_multiple: int = 128  # the attention window is the request's length rounded up to this
    prefill_multiple: int = 16  # prompts are right-padded to a multiple of this (one graph per bucket)
    compile_vision: bool = True  # False: the vision stage runs eagerly (saves its compile time)
    cuda_graphs: bool | None = None  # None: on when the model is on CUDA
    dynamic: bool | None = None  # None: a stage's first shape compiles static, a second one dynamic (reused after)
    backend: str = "inductor"  # torch.compile backend ("eager" / "aot_eager" to debug)
    mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    window_buckets: tuple[int, ...] = ()  # engine decode: attention windows (key positions), a graph each per
    # batch bucket, built in warmup(); a step attends over the smallest that holds every running row
    # (the whole slot is always one; empty: the whole slot only)


_COPIES = itertools.count()  # numbers the per-runtime copies of the step functions (see _own_copy)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (buckets sorted ascending; n <= buckets[-1] is checked by the caller)."""
    return next(b for b in buckets if b >= n)


class _Window:
    """The first `batch` rows and `seq` slots of a StaticKVCache's storage as one call's cache.

    Attends over `seq` slots instead of S_max, so decode reads only the part of the cache a request
    can use. Writes go into the whole storage buffers (`index_put_`, which Inductor turns into a
    store into its input) and reads are views of the window: writing through the window's strided
    view (`index_copy_`) made Inductor copy the whole window into a new buffer and back, for keys and
    values of every layer at every step (seen in its generated code).
    """

    def __init__(self, storage: StaticKVCache, batch: int, seq: int):
        self.storage, self.max_batch, self.max_seq = storage, batch, seq
        dev = storage.keys[0].device
        self.rows = torch.arange(batch, device=dev)[:, None, None]  # [Bb,1,1]
        self.heads = torch.arange(storage.keys[0].shape[1], device=dev)[None, :, None]  # [1,H_kv,1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        """k, v [b,H_kv,T,hd] at slots cache_position [T] (or [b,T]) -> keys, values [b,H_kv,S,hd] views."""
        b = k.shape[0]
        slots = cache_position[None, None, :] if cache_position.dim() == 1 else cache_position[:, None, :]  # [1 or b,1,T]
        index = (self.rows[:b], self.heads, slots)  # -> [b,H_kv,T]
        keys, values = self.storage.keys[layer], self.storage.values[layer]
        keys.index_put_(index, k)
        values.index_put_(index, v)
        return keys[:b, :, :self.max_seq], values[:b, :, :self.max_seq]


def _prefill_step(model, inputs_embeds, position_ids, attention_mask, cache_position, cache, logits_at, extras):
    """[Bb,Tb,D] -> logits [Bb,1,V] at index logits_at [1] (a tensor: one graph for every T of a bucket).
    Separate from the decode step so that each keeps its own compiled graphs (each runtime compiles
    its own copies, see _own_copy)."""
    return model.decode(inputs_embeds, position_ids, attention_mask, cache_position, cache, logits_at=logits_at, **extras)


def _fresh_prefill_step(model, inputs_embeds, position_ids, attention_mask, cache_position, cache, logits_at, extras):
    """The engine's prefill, one prompt alone at positions 0..T-1 of an empty row: plain causal
    attention (SDPA's is_causal, no mask tensor; vlmrt.models.layers.attention_bias)."""
    return model.decode(inputs_embeds, position_ids, attention_mask, cache_position, cache, logits_at=logits_at,
                        causal_prefill=True, **extras)


def _decode_step(model, inputs_embeds, position_ids, attention_mask, cache_position, cache):
    """[Bb,1,D] -> logits [Bb,1,V]."""
    return model.decode(inputs_embeds, position_ids, attention_mask, cache_position, cache)


def _vision_step(model, pixel_values):
    """[b,3,H,W] -> image_features [b,N,D] (or the family's dict of named outputs)."""
    return model.encode_images(pixel_values)


class _Graph:
    """One captured CUDA graph with its static inputs and output.

    The warm-up calls run the real step on the real inputs (already copied into the static
    buffers), so a decode step writes the same keys/values into the same slot three times: harmless.
    """

    def __init__(self, fn, inputs: tuple, pool):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, autotune and settle the allocator outside capture
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*inputs)
        self.inputs = inputs

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class CompiledRuntime:
    """Static cache + torch.compile + CUDA graphs; the interface of `EagerRuntime`."""

    name = "compiled"
    vision_batch = 1  # the engine's batches (vlmrt/engine_batch.py): warm-up builds batch-1 vision and a one-row
    prefill_rows = 1  # prefill graph; serving compiles nothing, so each image and prompt goes alone

    def __init__(self, loaded, **options):
        """Args:
            loaded: a `vlmrt.models.LoadedModel` (its device and dtype are the runtime's).
            **options: fields of `CompiledOptions`.
        """
        if loaded.model is None:
            raise VlmrtError(f"{loaded.name} is an ONNX export; the compiled runtime needs a preset or a release folder")
        self.options = _make_options(options)
        from vlmrt.quantize import prepare_model

        self.loaded, self.model = loaded, prepare_model(loaded, self.name)
        self.device, self.dtype = loaded.device, loaded.dtype
        o, m = self.options, self.model
        self.max_batch = o.max_batch
        self.max_seq = min(o.max_seq or m.max_context, m.max_context)
        self.batch_buckets = _batch_buckets(o)
        self.use_graphs = self.device.type == "cuda" if o.cuda_graphs is None else o.cuda_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise VlmrtError("cuda_graphs=True needs the model on a CUDA device; load it with --device cuda")
        _raise_recompile_limit(len(self.batch_buckets) * 16 * (len(o.window_buckets) + 1))  # a graph per window too
        compile_kw = {"backend": o.backend, "dynamic": o.dynamic, **({"mode": o.mode} if o.mode else {})}
        self._prefill = torch.compile(_own_copy(_prefill_step), **compile_kw)
        self._decode = torch.compile(_own_copy(_decode_step), **compile_kw)
        self._vision = torch.compile(_own_copy(_vision_step), **compile_kw) if o.compile_vision else _vision_step
        self.storage = StaticKVCache(m.num_layers, self.max_batch, m.num_kv_heads, self.max_seq, m.head_dim,
                                     self.dtype, self.device)  # the only cache allocation
        self._windows: dict = {}  # (Bb, S) -> _Window
        self._static: dict = {}  # graph inputs: (Bb, S, position rank) -> decode buffers; vision key -> pixels
        self._graphs: dict = {}  # ("decode", Bb, S, rank) or ("vision", shape) -> _Graph (None: not capturable)
        self._seen: set = set()  # shape keys already compiled (the path without graphs)
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._batch = self._seq = 0
        self.compile_s = 0.0  # wall time spent compiling (and capturing) new shapes, in total
        self.compile_by_stage = {"vision": 0.0, "prefill": 0.0, "decode": 0.0}  # the same, per stage (s)
        self.on_compile = None  # called as on_compile(what) before a new shape compiles; returns done(seconds)

    # ------------------------------------------------------------------ the StageRunner interface
    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        """pixel_values [b,3,H,W] -> image_features [b,N,D] (or the family's dict of named outputs).

        Not padded to a bucket: a family's outputs need not be batch-first (SliMM's DeepStack
        features are [K,b,N,D]), so graphs are per exact batch size; dynamo reuses one dynamic graph.
        """
        pixels = pixel_values.to(self.device, self.dtype)
        if vision_inputs:  # family-specific extra inputs (e.g. grids): shapes vary, run eagerly
            return self.model.encode_images(pixels, **vision_inputs)
        self._check_batch(pixels.shape[0])
        key = ("vision", tuple(pixels.shape))
        if not self.use_graphs:
            return self._first_call(key, lambda: self._vision(self.model, pixels))
        if key not in self._static:
            self._static[key] = torch.zeros_like(pixels)  # [b,3,H,W]: the address the graph reads
        static = self._static[key]
        static.copy_(pixels)
        return _clone(self._replay(key, self._vision, (self.model, static)))  # a replay overwrites its outputs

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None):
        """input_ids [b,T] (+ image_features [b,N,D]) -> inputs_embeds [b,T,D], eagerly."""
        return self.model.embed(input_ids.to(self.device), image_features)

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """Pick the attention window for a request; the cache itself was allocated in __init__."""
        self._check_batch(batch_size)
        if max_seq_len > self.max_seq:
            raise VlmrtError(
                f"the request needs {max_seq_len} cache slots (prompt + max_new_tokens) and the compiled "
                f"runtime's cache holds {self.max_seq}; ask for fewer new tokens or build the runtime with "
                f"runtime_options={{'max_seq': {max_seq_len}}} (at most the model's context, {self.model.max_context})")
        self._batch = batch_size
        self._seq = min(round_up(max_seq_len, self.options.seq_multiple), self.max_seq)

    @torch.inference_mode()
    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """Prefill (T > 1, or any extras) or one decode step (T = 1); the last position's logits [b,1,V]."""
        if inputs_embeds.shape[1] > 1 or extras:
            return self._prefill_call(inputs_embeds, position_ids, attention_mask, cache_position, extras)
        return self._decode_call(inputs_embeds, position_ids, attention_mask, cache_position)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache storage of `layer`, each [B_max,H_kv,S_max,hd] (for parity checks)."""
        return self.storage.keys[layer], self.storage.values[layer]

    @torch.inference_mode()
    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n]), over this request's
        window of slots. Copied into the same storage: the CUDA graphs keep reading its addresses."""
        self._check_started(rows.shape[0])
        self.storage.reorder(rows.to(self.device), self._seq)

    # ------------------------------------------------------------------ prefill and decode
    def _prefill_call(self, embeds, positions, mask, cache_position, extras):
        b, t = embeds.shape[:2]  # embeds [b,T,D], positions [...,b,T], mask [b,L]
        self._check_started(b)
        s, window = self._seq, self._window(pick_bucket(b, self.batch_buckets), self._seq)
        bb, tb = pick_bucket(b, self.batch_buckets), min(round_up(t, self.options.prefill_multiple), s)
        if extras:  # named extras (e.g. DeepStack [K,b,T,D]) have shapes we cannot pad: exact b and T
            bb, tb = b, t
        embeds = F.pad(embeds.to(self.device, self.dtype), (0, 0, 0, tb - t, 0, bb - b))  # [Bb,Tb,D]
        positions = F.pad(positions.to(self.device), (0, tb - t, 0, bb - b))  # [...,Bb,Tb]
        mask = F.pad(mask.to(self.device)[:, :s], (0, s - min(mask.shape[1], s), 0, bb - b))  # [Bb,S]
        slots = torch.arange(tb, device=self.device)  # cache_position [Tb]; the loop's is arange(T)
        last = torch.tensor([t - 1], device=self.device)  # the last real position, not the padding's
        key = ("prefill", bb, tb, s, positions.dim())
        logits = self._first_call(key, lambda: self._prefill(self.model, embeds, positions, mask, slots, window, last, extras))
        return logits[:b]  # [b,1,V]

    def _decode_call(self, embeds, positions, mask, cache_position):
        b = embeds.shape[0]  # embeds [b,1,D], positions [...,b,1], mask [b,L], cache_position [1]
        bb, s = pick_bucket(b, self.batch_buckets), self._seq
        self._check_started(b)
        st = self._static_inputs(bb, s, embeds, positions)
        st["embeds"][:b].copy_(embeds)
        st["positions"][..., :b, :].copy_(positions)
        width = min(mask.shape[1], s)
        st["mask"][:b, :width].copy_(mask[:, :width])
        if width < s:  # slots past this request's length: a previous, longer request may have set them
            st["mask"][:b, width:].zero_()
        st["slot"].copy_(cache_position)
        inputs = (self.model, st["embeds"], st["positions"], st["mask"], st["slot"], self._window(bb, s))
        key = ("decode", bb, s, positions.dim())
        if not self.use_graphs:
            return self._first_call(key, lambda: self._decode(*inputs))[:b]
        return self._replay(key, self._decode, inputs)[:b].clone()  # the next replay overwrites the output

    def _static_inputs(self, bb: int, s: int, embeds: torch.Tensor, positions: torch.Tensor) -> dict:
        """Static decode inputs per (Bb, S, position rank), allocated once (graphs read these addresses)."""
        key = (bb, s, positions.dim())
        if key not in self._static:
            dev = self.device
            self._static[key] = {
                "embeds": torch.zeros(bb, 1, embeds.shape[-1], dtype=self.dtype, device=dev),  # [Bb,1,D]
                "positions": torch.zeros(*positions.shape[:-2], bb, 1, dtype=torch.long, device=dev),  # [...,Bb,1]
                "mask": torch.zeros(bb, s, dtype=torch.long, device=dev),  # [Bb,S]
                "slot": torch.zeros(1, dtype=torch.long, device=dev),  # cache_position [1]
            }
        return self._static[key]

    def _window(self, bb: int, s: int) -> _Window:
        if (bb, s) not in self._windows:
            self._windows[(bb, s)] = _Window(self.storage, bb, s)
        return self._windows[(bb, s)]

    # ------------------------------------------------------------------ engine steps (vlmrt/engine.py)
    def allocate_slots(self, num_slots: int, max_seq: int) -> SlotKVCache:
        """The engine's KV pool: at most `max_batch` slots (the largest decode bucket) of at most this
        runtime's `max_seq` positions. Decode buckets are the batch buckets up to the slot count."""
        m, dev = self.model, self.device
        n, seq = min(num_slots, self.max_batch), min(max_seq, self.max_seq)
        self.pool = SlotKVCache(m.num_layers, n, m.num_kv_heads, seq, m.head_dim, self.dtype, dev)
        self.slot_buckets = tuple(sorted({b for b in self.batch_buckets if b < n} | {n}))
        whole = seq + 1  # the slot, scratch position included
        self.window_buckets = tuple(sorted({w for w in self.options.window_buckets if 1 <= w < whole} | {whole}))
        self._slot_views = {(nb, w): SlotView(self.pool, torch.arange(nb, device=dev), 0, w)
                            for nb in self.slot_buckets for w in self.window_buckets}
        self._prefill_row = torch.zeros(1, dtype=torch.long, device=dev)  # the row a prefill writes: an input
        self._prefill_view = SlotView(self.pool, self._prefill_row, None)
        o = self.options
        kw = {"backend": o.backend, **({"mode": o.mode} if o.mode else {})}
        self._engine_prefill = torch.compile(_own_copy(_fresh_prefill_step), dynamic=True, **kw)  # one graph for every T
        self._engine_decode = torch.compile(_own_copy(_decode_step), dynamic=False, **kw)  # one per bucket
        return self.pool

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile (and on CUDA capture) one decode graph per bucket now, on padding rows that only
        touch scratch positions. The engine runs a probe request first, which compiles the prefill
        graph (dynamic prompt length) with the family's real input kinds. After this, serving
        compiles no decoder graph (tests/test_engine_compiled.py checks with error_on_recompile)."""
        pool, dev = self.pool, self.device
        embeds, _ = split_embedded(self.embed(torch.zeros(1, 1, dtype=torch.long, device=dev), None))  # [1,1,D]
        mask = torch.zeros(0, pool.max_seq + 1, dtype=torch.long, device=dev)
        for nb in self.slot_buckets:
            for w in self.window_buckets:
                self._engine_decode_call(0, embeds[:0], None, mask, torch.zeros(0, 1, dtype=torch.long, device=dev),
                                         bucket=nb, window=w)

    @torch.inference_mode()
    def run_step(self, step) -> torch.Tensor:
        """One engine decoder call (`vlmrt.engine.StepInputs`) -> logits [n,V]. A prefill (one row,
        `logits_at` given) runs the dynamic-length graph; a decode over rows [0, n) runs the graph of
        the smallest bucket >= n, its rows past n padding (zero mask, scratch position)."""
        if step.logits_at is not None:
            if step.stop - step.start != 1 or not step.causal_prefill:
                raise VlmrtError("the compiled runtime prefills one request per call, alone in its row")
            return self._engine_prefill_call(step.start, step.inputs_embeds, step.position_ids, step.attention_mask,
                                             step.cache_position, step.logits_at, step.extras)
        if step.start != 0:
            raise VlmrtError("the compiled runtime decodes pool rows [0, n) only")
        w = pick_bucket(step.window or self.window_buckets[-1], self.window_buckets)
        slots = step.cache_position  # [n,1]; a padding row's scratch position moves inside the window
        if w < self.window_buckets[-1]:
            slots = torch.where(slots >= w, torch.full_like(slots, w - 1), slots)
        return self._engine_decode_call(step.stop, step.inputs_embeds, step.position_ids, step.attention_mask,
                                        slots, window=w)

    def _engine_prefill_call(self, row, embeds, positions, mask, cache_position, logits_at, extras):
        self._prefill_row.fill_(row)
        embeds = embeds.to(self.dtype)
        for t, dim in [(embeds, 1), (positions, -1), (cache_position, 1), *((x, -2) for x in extras.values())]:
            torch._dynamo.mark_dynamic(t, dim % t.dim())  # the prompt length: one graph for every T
        args = (self.model, embeds, positions, mask, cache_position, self._prefill_view, logits_at, extras)
        return self._first_call(("engine-prefill",), lambda: self._engine_prefill(*args))[:, -1]  # [1,V]

    def _engine_decode_call(self, n, embeds, positions, mask, cache_position, bucket: int | None = None,
                            window: int | None = None):
        """embeds [n,1,D], positions [n,1] (None: zeros), mask [n,S+1], cache_position [n,1] (inside the
        window) -> [n,V]: the graph of `bucket` (default the smallest that holds n rows) and `window`
        (one of window_buckets, default the whole slot), attending over key positions [0, window)."""
        nb = bucket or pick_bucket(max(n, 1), self.slot_buckets)
        whole = self.window_buckets[-1]
        w = window or whole
        st = self._engine_static(nb, embeds.shape[-1])
        st["embeds"][:n].copy_(embeds)
        st["embeds"][n:].zero_()
        st["positions"].zero_()
        if positions is not None:
            st["positions"][:n].copy_(positions)
        st["mask"][:n].copy_(mask)
        st["mask"][n:].zero_()
        st["slots"][:n].copy_(cache_position)
        st["slots"][n:].fill_(w - 1)  # padding rows (free rows): the scratch position, or the window's last
        mask_in = st["mask"] if w == whole else st["mask"][:, :w]  # [Bb,W]: a view of the static buffer
        inputs = (self.model, st["embeds"], st["positions"], mask_in, st["slots"], self._slot_views[(nb, w)])
        key = ("engine-decode", nb) if w == whole else ("engine-decode", nb, w)
        if not self.use_graphs:
            return self._first_call(key, lambda: self._engine_decode(*inputs))[:n, -1]
        return self._replay(key, self._engine_decode, inputs)[:n, -1].clone()  # the next replay overwrites it

    def _engine_static(self, nb: int, width: int) -> dict:
        """Static decode inputs per bucket, allocated once (CUDA graphs read these addresses)."""
        key = ("engine", nb)
        if key not in self._static:
            dev, s = self.device, self.pool.max_seq + 1
            self._static[key] = {
                "embeds": torch.zeros(nb, 1, width, dtype=self.dtype, device=dev),  # [Bb,1,D]
                "positions": torch.zeros(nb, 1, dtype=torch.long, device=dev),  # [Bb,1]
                "mask": torch.zeros(nb, s, dtype=torch.long, device=dev),  # [Bb,S+1]
                "slots": torch.zeros(nb, 1, dtype=torch.long, device=dev),  # cache_position [Bb,1]
            }
        return self._static[key]

    # ------------------------------------------------------------------ bookkeeping
    def _first_call(self, key, fn):
        """Run fn. The first time a shape key is seen, that call compiles: its wall time counts as compile
        time and it runs again, so the caller's stage time holds a run, not the compile. (Every stage call
        is a pure function of its inputs, or writes the same cache slots with the same values.)"""
        if key not in self._seen:
            self._seen.add(key)
            self._timed(fn, key)
        return fn()

    def _replay(self, key, fn, inputs: tuple):
        """Replay the CUDA graph of `key`, capturing it on first use. Should capture fail (an op that
        waits for the host, in some family's code), `key` runs as plain compiled calls from then on."""
        if key not in self._graphs:
            self._graphs[key] = self._timed(lambda: _capture(fn, inputs, self._pool, key[0]), key)
        graph = self._graphs[key]
        return graph.replay() if graph is not None else fn(*inputs)

    def _timed(self, fn, key: tuple):
        """Run fn (a compile or a capture for shape `key`), counting its wall time as compile time."""
        done = self.on_compile(describe_shape(key)) if self.on_compile else None
        self.synchronize()
        t0 = time.perf_counter()
        out = fn()
        self.synchronize()
        seconds = time.perf_counter() - t0
        self.compile_s += seconds
        self.compile_by_stage[shape_stage(key)] += seconds
        if done:
            done(seconds)
        return out

    def _check_batch(self, b: int) -> None:
        if b > self.max_batch:
            raise VlmrtError(
                f"batch of {b} is above the compiled runtime's cache maximum of {self.max_batch}; split the "
                f"batch or build the runtime with runtime_options={{'max_batch': {b}}} (vlmrt bench sizes it "
                f"to the largest --batch)")

    def _check_started(self, b: int) -> None:
        if b > self._batch or self._seq == 0:
            raise VlmrtError(f"call start(batch_size>={b}, max_seq_len) before decode (the generation loop does)")


def shape_stage(key: tuple) -> str:
    """The stage a shape key compiles: vision, prefill or decode (the engine's keys included)."""
    return key[0].removeprefix("engine-")


def describe_shape(key: tuple) -> str:
    """A shape key in words: ("prefill", Bb, Tb, S, rank) -> "prefill for batch 4, 64 tokens (cache 128)"."""
    if key[0] == "vision":
        return f"vision for pixels {'x'.join(map(str, key[1]))}"
    if key[0] == "prefill":
        return f"prefill for batch {key[1]}, {key[2]} tokens (cache {key[3]})"
    if key[0] == "engine-prefill":
        return "prefill for one request, any length (the engine's slot pool)"
    if key[0] == "engine-decode":
        window = f", keys [0, {key[2]})" if len(key) > 2 else ""
        return f"decode for {key[1]} engine rows (the slot pool{window})"
    return f"decode for batch {key[1]} (cache {key[2]})"


def _make_options(options: dict) -> CompiledOptions:
    known = {f.name for f in fields(CompiledOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise VlmrtError(f"unknown compiled-runtime option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    o = CompiledOptions(**options)
    if o.max_batch < 1 or o.seq_multiple < 1 or o.prefill_multiple < 1:
        raise VlmrtError("max_batch, seq_multiple and prefill_multiple must be at least 1")
    if not all(isinstance(w, int) and w >= 1 for w in o.window_buckets):
        raise VlmrtError(f"window_buckets are key positions per attention window, each at least 1 "
                         f"(e.g. (256, 1024)); got {o.window_buckets!r}")
    if o.mode in ("reduce-overhead", "max-autotune"):  # these modes capture CUDA graphs of their own
        raise VlmrtError(f"mode={o.mode!r} captures CUDA graphs itself, and this runtime already captures its "
                         "own; use mode='max-autotune-no-cudagraphs' (or leave mode unset)")
    return o


def _batch_buckets(o: CompiledOptions) -> tuple[int, ...]:
    if o.batch_buckets:
        buckets = sorted({b for b in o.batch_buckets if 1 <= b <= o.max_batch} | {o.max_batch})
    else:
        buckets = sorted({2**i for i in range(o.max_batch.bit_length()) if 2**i < o.max_batch} | {o.max_batch})
    return tuple(buckets)


def _capture(fn, inputs: tuple, pool, what: str) -> _Graph | None:
    try:
        return _Graph(fn, inputs, pool)
    except RuntimeError as e:
        torch.cuda.synchronize()
        warnings.warn(f"compiled runtime: the {what} stage cannot be captured in a CUDA graph ({e}); it runs "
                      "compiled without a graph (slower launches, same results)")
        return None


def _clone(out):
    """A copy of a stage output: a tensor, or a dict of named tensors."""
    if isinstance(out, dict):
        return {k: v.clone() for k, v in out.items()}
    return out.clone()


def _own_copy(fn):
    """`fn` with a code object of its own. Dynamo keeps compiled graphs (and counts recompiles) per
    code object; without this, every runtime in a process (other models, dtypes, backends) would
    share one cache, and past its recompile limit dynamo silently runs the function uncompiled."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_COPIES)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _raise_recompile_limit(n: int) -> None:
    """Each bucket is one compiled shape; let dynamo keep that many (its default is 8 per function)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)
