"""What the paddle and mindspore runtimes share: the three stages as another framework's compiled
graphs (lowered in process from torch.export programs, or loaded from an export folder), driven by
the shared generation loop and the engine. A subclass says how its framework makes, copies, joins
and picks tensors; everything else (inputs by name, the lock-step cache, engine steps, beam
search's reorder) is here, once.

```
 encode_images  pixel_values (+ named inputs, static axes padded) ─► vision graph ─► image_features
 embed          input_ids (+ image_features; text only: image_tokens = 0) ─► embedding graph
 start(b, n)    cache = zeros [b,H_kv,S,hd] per layer (S = n rounded up to seq_bucket, at most the
                context): framework tensors, kept on the framework's side
 decode         inputs_embeds [b,t,D], position_ids, attention_mask [b,S], cache_position [b,t],
                logits_index [b] = t-1, cache ─► decoder graph ─► logits [b,1,V], cache (same shapes)
 run_step       engine rows [a,b): their attention window of the pool (torch buffers, which the
                engine compacts in place) goes to the framework; only the positions the call
                wrote come back (write_slots), never whole rows
```
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

from vlmrt.errors import VlmrtError
from vlmrt.kv_cache import SlotKVCache, lockstep_inputs, write_slots
from vlmrt.stages import (ATTENTION_MASK, CACHE_POSITION, IMAGE_FEATURES, INPUTS_EMBEDS, LOGITS, LOGITS_INDEX,
                          POSITION_IDS, embedding_inputs, past_key_name, past_value_name)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


class LoweredRuntime:
    """A model's stages on a framework's graphs (see the module docstring). Subclasses set `name`,
    `framework`, `export_format`, `seq_bucket` and the framework hooks below.

    Args:
        loaded: a `LoadedModel`: a preset or release (fp32 or fp16, on the CPU; lowered now, which
            takes torch.export's time once per stage) or an export folder of this runtime.
        threads: CPU threads of the framework's kernels (default: the cores this process may use).
    """

    name = framework = export_format = ""
    lowered_kind = export_kind = ""  # how the start-up line describes the graphs (export_kind: with {folder})
    seq_bucket = 1  # lock-step cache slots are allocated in multiples of this
    vision_batch = None  # the engine's batches (vlmrt/engine_batch.py): any number of images a vision call
    prefill_rows = None  # and of rows a prefill call (the graphs' batch axis is dynamic)

    def __init__(self, loaded, threads: int | None = None):
        fw = self.fw()
        from vlmrt.config import cpu_threads

        self.threads = threads or cpu_threads() or len(os.sched_getaffinity(0))
        self.set_threads(self.threads)
        if getattr(loaded, "weights", None) is not None:
            raise VlmrtError(f"--runtime {self.name} runs the model's own weights; leave --quantize out")
        if loaded.device.type != "cpu":
            raise VlmrtError(f"--runtime {self.name} runs on the CPU; use --device cpu (got {loaded.device})")
        self.loaded, self.device, self.dtype = loaded, torch.device("cpu"), loaded.dtype
        if loaded.export_dir is not None:
            self._from_export(loaded.export_dir)
        else:
            self._lower(loaded)
        from vlmrt.runtimes.onnx import CacheGeometry

        self.model = CacheGeometry(self.num_layers, self.num_kv_heads, self.head_dim, self.max_context)  # the engine's
        self.keys: list = []
        self.values: list = []
        self.seq = self.past_len = 0
        self.pool: SlotKVCache | None = None
        print(f"{self.name} runtime: {self.framework} {fw.__version__} on the CPU, {self.kind}", file=sys.stderr)

    # ------------------------------------------------------------------------- framework hooks
    def fw(self):
        """The framework's module (a VlmrtError naming the extra when it is missing)."""
        raise NotImplementedError

    def set_threads(self, threads: int) -> None:
        raise NotImplementedError

    def to_fw(self, t: torch.Tensor):
        """A torch tensor -> a framework tensor (a host copy)."""
        raise NotImplementedError

    def to_torch(self, value) -> torch.Tensor:
        """A framework tensor -> a torch tensor of its own."""
        raise NotImplementedError

    def view_torch(self, value) -> torch.Tensor:
        """A framework tensor read by torch, valid until the next call of the graph that made it."""
        return self.to_torch(value)

    def zeros(self, shape: list[int], dtype: str):
        raise NotImplementedError

    def cat_rows(self, a, b):
        """Rows of a, then rows of b (axis 0)."""
        raise NotImplementedError

    def take_rows(self, xs: list, rows: torch.Tensor) -> list:
        """Each x[rows] on axis 0 (rows [n], made a framework index once for the whole list)."""
        raise NotImplementedError

    def open_export(self, folder, manifest) -> tuple[dict, dict]:
        """(stage -> graph info, stage -> callable graph) of an export folder."""
        raise NotImplementedError

    def lower_stages(self):
        """The function lowering a LoadedModel's stages (vlmrt.export.<format>.lower_stages)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- graphs
    def _from_export(self, folder) -> None:
        from vlmrt.export.manifest import read_manifest

        m = read_manifest(folder)
        if m.runtime != self.name:
            raise VlmrtError(f"{folder} is an {m.runtime} export; run it with --runtime {m.runtime} "
                             f"(or re-export with --format {self.export_format})")
        self.manifest, self.folder = m, folder
        self.graphs, self.programs = self.open_export(folder, m)
        self.num_layers, self.num_kv_heads, self.head_dim, self.max_context = (m.num_layers, m.num_kv_heads,
                                                                               m.head_dim, m.max_context)
        self.kind = self.export_kind.format(folder=folder)

    def _lower(self, loaded) -> None:
        model = loaded.model.eval()
        self._sources = tempfile.TemporaryDirectory(prefix=f"vlmrt-{self.name}-")  # the generated stage sources
        self.lowered = self.lower_stages()(loaded, self._sources.name,
                                           lambda line: print(f"{self.name} runtime: {line}", file=sys.stderr))
        self.graphs = {g.stage: g.info for g in self.lowered[0]}
        self.programs = dict(self.lowered[1])
        self.num_layers, self.num_kv_heads, self.head_dim, self.max_context = (model.num_layers, model.num_kv_heads,
                                                                               model.head_dim, model.max_context)
        self.kind = self.lowered_kind

    def _call(self, stage: str, values: dict, dims: dict[str, int]) -> dict:
        """Run one stage graph: inputs by name in the graph's order (missing ones are zeros of their
        named dims; static named axes padded with zeros); returns output name -> framework tensor."""
        from vlmrt.runtimes.onnx_static import pad_to

        info, args = self.graphs[stage], []
        for t in info.inputs:
            v = values.get(t.name)
            if v is None:
                v = self.zeros([d if isinstance(d, int) else dims.get(d, 0) for d in t.shape], t.dtype)
            elif isinstance(v, torch.Tensor):
                if t.name == POSITION_IDS and v.dim() == 2 and len(t.shape) == 3:  # text positions, M-RoPE graph
                    v = v[None].expand(3, -1, -1)  # [3,n,T]: the three components alike (as the model expands them)
                target = tuple(n if isinstance(d, str) else d for n, d in zip(v.shape, t.shape))
                v = pad_to(v, target, t.name, info.file) if v.dim() == len(t.shape) else v
                v = self.to_fw(v.to(TORCH_DTYPES[t.dtype]))
            args.append(v)
        outs = self.programs[stage](*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return dict(zip((t.name for t in info.outputs), outs))

    # ------------------------------------------------------------------------- the StageRunner interface
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        """pixel_values [B,...] (+ named vision inputs) -> image_features [B,N,D] (or a dict)."""
        from vlmrt.runtimes.onnx_static import cut_image_tokens

        values = {"pixel_values": pixel_values, **{k: v for k, v in vision_inputs.items() if v is not None}}
        outs = {k: self.to_torch(v) for k, v in self._call("vision", values, {"batch": pixel_values.shape[0]}).items()}
        outs = cut_image_tokens(self.graphs["vision"], values, outs)  # MiniCPM-V-2's padded chunks
        return outs[IMAGE_FEATURES] if list(outs) == [IMAGE_FEATURES] else outs

    def embed(self, input_ids: torch.Tensor, image_features) -> torch.Tensor:
        """input_ids [B,T] (+ image_features or a dict of them; None: text only) -> inputs_embeds [B,T,D]."""
        values = embedding_inputs(input_ids, image_features)
        dims = {"batch": input_ids.shape[0], "sequence": input_ids.shape[1]}
        outs = {k: self.to_torch(v) for k, v in self._call("embedding", values, dims).items()}  # missing: 0 image tokens
        return outs[INPUTS_EMBEDS] if list(outs) == [INPUTS_EMBEDS] else outs

    def _zeros(self, batch: int, seq: int) -> list:
        dtype = next(t.dtype for t in self.graphs["decoder"].inputs if t.name == past_key_name(0))
        return [self.zeros([batch, self.num_kv_heads, seq, self.head_dim], dtype) for _ in range(self.num_layers)]

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """A zeroed cache of `max_seq_len` slots (rounded up to seq_bucket, at most the context) for
        `batch_size` rows (framework tensors)."""
        if max_seq_len > self.max_context:
            raise VlmrtError(f"{max_seq_len} tokens do not fit the model's context of {self.max_context}")
        self.seq = min(self.max_context, -(-max_seq_len // self.seq_bucket) * self.seq_bucket)
        self.keys, self.values = self._zeros(batch_size, self.seq), self._zeros(batch_size, self.seq)
        self.past_len = 0

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [B,T,D] at slots `cache_position` [T] -> the last position's logits [B,1,V]."""
        b, t = inputs_embeds.shape[:2]
        mask, slots = lockstep_inputs(attention_mask, cache_position, self.seq, b)  # [B,S], [B,T]
        rows = self.keys[0].shape[0]
        keys, values = self.keys, self.values
        if b < rows:  # beam search prefills B prompts into a cache of B*K rows
            keys, values = [k[:b] for k in keys], [v[:b] for v in values]
        logits, keys, values = self._decoder(inputs_embeds, position_ids, mask, slots, torch.full((b,), t - 1),
                                             keys, values, extras)
        if b < rows:
            keys = [self.cat_rows(k, full[b:]) for full, k in zip(self.keys, keys)]
            values = [self.cat_rows(v, full[b:]) for full, v in zip(self.values, values)]
        self.keys, self.values = keys, values
        self.past_len = max(self.past_len, int(cache_position.max()) + 1)
        return logits

    def _decoder(self, embeds, positions, mask, slots, at, keys, values, extras):
        """One decoder call -> (logits [B,1,V] torch, keys, values: lists of framework tensors)."""
        named = {INPUTS_EMBEDS: embeds, POSITION_IDS: positions, ATTENTION_MASK: mask, CACHE_POSITION: slots,
                 LOGITS_INDEX: at, **extras}
        for i in range(self.num_layers):
            named[past_key_name(i)], named[past_value_name(i)] = keys[i], values[i]
        (b, t), s = embeds.shape[:2], keys[0].shape[2]
        outs = self._call("decoder", named, {"batch": b, "sequence": t, "cache_sequence": s})  # absent extras
        # (SliMM's deepstack_embeds after the prefill) are zeros of these dims
        keys = [outs[f"present.{i}.key"] for i in range(self.num_layers)]
        values = [outs[f"present.{i}.value"] for i in range(self.num_layers)]
        return self.to_torch(outs[LOGITS]), keys, values

    # ------------------------------------------------------------------ engine steps (vlmrt/engine.py)
    def allocate_slots(self, num_slots: int, max_seq: int) -> SlotKVCache:
        """The engine's KV pool (torch buffers, which the engine compacts in place): `num_slots` rows of
        `max_seq` positions (+ one scratch position)."""
        self.pool = SlotKVCache(self.num_layers, num_slots, self.num_kv_heads, max_seq, self.head_dim, self.dtype,
                                self.device)
        return self.pool

    def run_step(self, step) -> torch.Tensor:
        """One engine decoder call (`vlmrt.engine.StepInputs`) over pool rows [start, stop), any n rows
        and T tokens each -> logits [n,V]. The call attends over the window of positions in use
        (`vlmrt.engine.attention_window`): the rows' window goes to the framework (one copy of the
        window, not of whole rows), and only the T positions each row writes come back into the pool
        (`write_slots`), never whole rows."""
        from vlmrt.engine import attention_window

        pool, (a, b) = self.pool, (step.start, step.stop)
        n, t = step.inputs_embeds.shape[:2]
        w, slots = attention_window(step, pool.scratch)  # slots [n,T]
        at = torch.zeros(n, dtype=torch.long) if step.logits_at is None else step.logits_at.reshape(-1).expand(n)
        with torch.inference_mode(False):
            logits, keys, values = self._decoder(
                step.inputs_embeds, step.position_ids, step.attention_mask[:, :w], slots, at,
                [self.to_fw(k[a:b, :, :w]) for k in pool.keys], [self.to_fw(v[a:b, :, :w]) for v in pool.values],
                step.extras)  # each [n,H_kv,w,hd]
        index = slots[:, None, :, None].expand(n, self.num_kv_heads, t, self.head_dim)  # [n,H_kv,T,hd]
        for buf, new in zip(pool.keys + pool.values, keys + values):
            write_slots(buf[a:b], self.view_torch(new).gather(2, index), slots)  # the call's own writes only
        return logits[:, -1]  # [n,V]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n])."""
        self.keys, self.values = self.take_rows(self.keys, rows), self.take_rows(self.values, rows)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache of `layer`, each [B,H_kv,P,hd] (for parity checks)."""
        p = self.past_len
        return self.to_torch(self.keys[layer])[:, :, :p], self.to_torch(self.values[layer])[:, :, :p]

    def synchronize(self) -> None:
        """The frameworks' CPU kernels return when done."""
