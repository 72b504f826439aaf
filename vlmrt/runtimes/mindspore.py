"""The mindspore runtime: the three stages as MindSpore graphs (GRAPH_MODE), driven by the shared
generation loop and the engine. A preset or release is lowered in process
(vlmrt/runtimes/mindspore_lower.py); a MINDIR export folder (`vlmrt export --format mindir`) runs on
`mindspore.load` + `nn.GraphCell` with no vlmrt model code imported.

```
 encode_images  pixel_values (+ named inputs, static axes padded) ─► vision graph ─► image_features
 embed          input_ids (+ image_features; text only: image_tokens = 0) ─► embedding graph
 start(b, n)    cache = zeros [b,H_kv,S,hd] per layer, S = n rounded up to 128 (at most the context):
                MindSpore tensors, kept on the MindSpore side
 decode         inputs_embeds [b,t,D], position_ids, attention_mask [b,S], cache_position [b,t],
                logits_index [b] = t-1, cache ─► decoder graph ─► logits [b,1,V], cache (same shapes)
```

MindSpore compiles a graph per input shape (and keeps it): decode steps reuse one graph per
(batch, S), a prefill compiles once per prompt length; rounding S lets requests of similar length
share graphs. Stage outputs cross to torch (host copies) where the loop reads them: image features,
embeddings, logits; the cache never does in the lock-step loop. The engine's pool stays in torch
buffers (the engine compacts rows in place): each step copies its rows' cache to MindSpore and back.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

from vlmrt.errors import VlmrtError
from vlmrt.kv_cache import SlotKVCache, lockstep_inputs
from vlmrt.stages import (ATTENTION_MASK, CACHE_POSITION, IMAGE_FEATURES, INPUTS_EMBEDS, LOGITS, LOGITS_INDEX,
                          POSITION_IDS, embedding_inputs, past_key_name, past_value_name)

EXTRA_HINT = ("install the extra in its own virtual environment: pip install 'vlmrt[mindspore]' "
              "(mindspore, with numpy<2)")
SEQ_BUCKET = 128  # cache slots are allocated in multiples of this (requests share compiled graphs)
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def import_mindspore():
    """The mindspore module in graph mode on the CPU, or a VlmrtError naming the extra."""
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's log: errors only (its warnings go to stderr on every compile)
    try:
        import mindspore as ms
    except ImportError:
        raise VlmrtError(f"--runtime mindspore needs MindSpore; {EXTRA_HINT}") from None
    if int(np.__version__.split(".")[0]) >= 2:
        raise VlmrtError(f"MindSpore {ms.__version__} needs numpy<2 (numpy {np.__version__} is installed); "
                         f"{EXTRA_HINT}")
    if not getattr(import_mindspore, "ready", False):
        ms.set_device("CPU")
        ms.set_context(mode=ms.GRAPH_MODE)
        import_mindspore.ready = True
    return ms


def to_ms(t: torch.Tensor):
    """A torch tensor -> a MindSpore tensor (a host copy; bf16 through fp32)."""
    ms = import_mindspore()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return ms.Tensor(t.float().numpy()).astype(ms.bfloat16)
    return ms.Tensor(t.contiguous().numpy())


def to_torch(value) -> torch.Tensor:
    """A MindSpore tensor -> a torch tensor (a host copy)."""
    ms = import_mindspore()
    if value.dtype == ms.bfloat16:
        return torch.from_numpy(value.astype(ms.float32).asnumpy()).bfloat16()
    return torch.from_numpy(np.array(value.asnumpy()))


def load_graph(path):
    """A MINDIR file as a callable `nn.GraphCell` (a VlmrtError when MindSpore cannot read it)."""
    ms = import_mindspore()
    try:
        return ms.nn.GraphCell(ms.load(str(path)))
    except Exception as e:  # MindSpore raises its own error types
        raise VlmrtError(f"MindSpore cannot load {path} ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); re-export the model with --format mindir") from None


def load_graphs(folder, manifest) -> dict:
    """stage -> the GraphCell of its MINDIR file in the export folder."""
    return {stage: load_graph(folder / info.file) for stage, info in manifest.stages.items()}


class MindSporeRuntime:
    """Runs a model's stages on MindSpore (see the module docstring).

    Args:
        loaded: a `LoadedModel`: a preset or release (fp32 or fp16, on the CPU; lowered now, which
            takes torch.export's time once per stage) or a MINDIR export folder.
        threads: CPU threads of MindSpore's kernels (default: the cores this process may use).
    """

    name = "mindspore"

    def __init__(self, loaded, threads: int | None = None):
        ms = import_mindspore()
        from vlmrt.config import cpu_threads

        self.threads = threads or cpu_threads() or len(os.sched_getaffinity(0))
        set_threads(ms, self.threads)
        if getattr(loaded, "weights", None) is not None:
            raise VlmrtError("--runtime mindspore runs the model's own weights; leave --quantize out")
        if loaded.device.type != "cpu":
            raise VlmrtError(f"--runtime mindspore runs on the CPU; use --device cpu (got {loaded.device})")
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
        print(f"mindspore runtime: MindSpore {ms.__version__} on the CPU, {self.kind}", file=sys.stderr)

    def _from_export(self, folder) -> None:
        from vlmrt.export.manifest import read_manifest

        m = read_manifest(folder)
        if m.runtime != "mindspore":
            raise VlmrtError(f"{folder} is an {m.runtime} export; run it with --runtime {m.runtime} "
                             "(or re-export with --format mindir)")
        self.manifest, self.folder = m, folder
        self.graphs = {s: info for s, info in m.stages.items()}
        self.programs = load_graphs(folder, m)
        self.num_layers, self.num_kv_heads, self.head_dim, self.max_context = (m.num_layers, m.num_kv_heads,
                                                                               m.head_dim, m.max_context)
        self.kind = f"MINDIR graphs (mindspore.load + nn.GraphCell) over {folder}"

    def _lower(self, loaded) -> None:
        from vlmrt.export.mindir import lower_stages

        model = loaded.model.eval()
        self._sources = tempfile.TemporaryDirectory(prefix="vlmrt-mindspore-")  # the generated stage sources
        self.lowered = lower_stages(loaded, self._sources.name, lambda line: print(f"mindspore runtime: {line}",
                                                                                   file=sys.stderr))
        self.graphs = {g.stage: g.info for g in self.lowered[0]}
        self.programs = dict(self.lowered[1])
        self.num_layers, self.num_kv_heads, self.head_dim, self.max_context = (model.num_layers, model.num_kv_heads,
                                                                               model.head_dim, model.max_context)
        self.kind = "stages lowered from the model code, graph mode (one dynamic-shape graph per stage)"

    # ------------------------------------------------------------------------- running a graph
    def _call(self, stage: str, values: dict, dims: dict[str, int]) -> dict:
        """Run one stage graph: inputs by name in the graph's order (missing ones are zeros of their
        named dims; static named axes padded with zeros); returns output name -> MindSpore tensor."""
        from vlmrt.runtimes.onnx_static import pad_to

        ms, info, args = import_mindspore(), self.graphs[stage], []
        for t in info.inputs:
            v = values.get(t.name)
            if v is None:
                shape = tuple(d if isinstance(d, int) else dims.get(d, 0) for d in t.shape)
                v = ms.Tensor(np.zeros(shape, dtype=NP_DTYPES[t.dtype]))
            elif isinstance(v, torch.Tensor):
                if t.name == POSITION_IDS and v.dim() == 2 and len(t.shape) == 3:  # text positions, M-RoPE graph
                    v = v[None].expand(3, -1, -1)  # [3,n,T]: the three components alike (as the model expands them)
                target = tuple(n if isinstance(d, str) else d for n, d in zip(v.shape, t.shape))
                v = pad_to(v, target, t.name, info.file) if v.dim() == len(t.shape) else v
                v = to_ms(v.to(getattr(torch, t.dtype)))
            args.append(v)
        outs = self.programs[stage](*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return dict(zip((t.name for t in info.outputs), outs))

    @staticmethod
    def _one_or_dict(outs: dict, single: str):
        outs = {k: to_torch(v) for k, v in outs.items()}
        return outs[single] if list(outs) == [single] else outs

    # ------------------------------------------------------------------------- the StageRunner interface
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        """pixel_values [B,...] (+ named vision inputs) -> image_features [B,N,D] (or a dict)."""
        from vlmrt.runtimes.onnx_static import cut_image_tokens

        values = {"pixel_values": pixel_values, **{k: v for k, v in vision_inputs.items() if v is not None}}
        outs = {k: to_torch(v) for k, v in self._call("vision", values, {"batch": pixel_values.shape[0]}).items()}
        outs = cut_image_tokens(self.graphs["vision"], values, outs)  # MiniCPM-V-2's padded chunks
        return outs[IMAGE_FEATURES] if list(outs) == [IMAGE_FEATURES] else outs

    def embed(self, input_ids: torch.Tensor, image_features) -> torch.Tensor:
        """input_ids [B,T] (+ image_features or a dict of them; None: text only) -> inputs_embeds [B,T,D]."""
        values = embedding_inputs(input_ids, image_features)
        dims = {"batch": input_ids.shape[0], "sequence": input_ids.shape[1]}
        return self._one_or_dict(self._call("embedding", values, dims), INPUTS_EMBEDS)  # missing: 0 image tokens

    def _zeros(self, batch: int, seq: int) -> list:
        ms = import_mindspore()
        dtype = next(t.dtype for t in self.graphs["decoder"].inputs if t.name == past_key_name(0))
        shape = (batch, self.num_kv_heads, seq, self.head_dim)
        return [ms.Tensor(np.zeros(shape, dtype=NP_DTYPES[dtype])) for _ in range(self.num_layers)]

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """A zeroed cache of `max_seq_len` slots (rounded up, at most the context) for `batch_size` rows."""
        if max_seq_len > self.max_context:
            raise VlmrtError(f"{max_seq_len} tokens do not fit the model's context of {self.max_context}")
        self.seq = min(self.max_context, -(-max_seq_len // SEQ_BUCKET) * SEQ_BUCKET)
        self.keys, self.values = self._zeros(batch_size, self.seq), self._zeros(batch_size, self.seq)
        self.past_len = 0

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [B,T,D] at slots `cache_position` [T] -> the last position's logits [B,1,V]."""
        ms = import_mindspore()
        b, t = inputs_embeds.shape[:2]
        mask, slots = lockstep_inputs(attention_mask, cache_position, self.seq, b)  # [B,S], [B,T]
        rows = self.keys[0].shape[0]
        keys, values = self.keys, self.values
        if b < rows:  # beam search prefills B prompts into a cache of B*K rows
            keys, values = [k[:b] for k in keys], [v[:b] for v in values]
        logits, keys, values = self._decoder(inputs_embeds, position_ids, mask, slots, torch.full((b,), t - 1),
                                             keys, values, extras)
        if b < rows:
            keys = [ms.ops.cat((k, full[b:])) for full, k in zip(self.keys, keys)]
            values = [ms.ops.cat((v, full[b:])) for full, v in zip(self.values, values)]
        self.keys, self.values = keys, values
        self.past_len = max(self.past_len, int(cache_position.max()) + 1)
        return logits

    def _decoder(self, embeds, positions, mask, slots, at, keys, values, extras):
        """One decoder call -> (logits [B,1,V] torch, keys, values: lists of MindSpore tensors)."""
        named = {INPUTS_EMBEDS: embeds, POSITION_IDS: positions, ATTENTION_MASK: mask, CACHE_POSITION: slots,
                 LOGITS_INDEX: at, **extras}
        for i in range(self.num_layers):
            named[past_key_name(i)], named[past_value_name(i)] = keys[i], values[i]
        (b, t), s = embeds.shape[:2], keys[0].shape[2]
        outs = self._call("decoder", named, {"batch": b, "sequence": t, "cache_sequence": s})  # absent extras
        # (SliMM's deepstack_embeds after the prefill) are zeros of these dims
        keys = [outs[f"present.{i}.key"] for i in range(self.num_layers)]
        values = [outs[f"present.{i}.value"] for i in range(self.num_layers)]
        return to_torch(outs[LOGITS]), keys, values

    # ------------------------------------------------------------------ engine steps (vlmrt/engine.py)
    def allocate_slots(self, num_slots: int, max_seq: int) -> SlotKVCache:
        """The engine's KV pool (torch buffers, which the engine compacts in place): `num_slots` rows of
        `max_seq` positions (+ one scratch position)."""
        self.pool = SlotKVCache(self.num_layers, num_slots, self.num_kv_heads, max_seq, self.head_dim, self.dtype,
                                self.device)
        return self.pool

    def run_step(self, step) -> torch.Tensor:
        """One engine decoder call (`vlmrt.engine.StepInputs`) over pool rows [start, stop) -> logits
        [n,V]. The rows' cache goes to MindSpore and back around the call (two host copies of those rows)."""
        pool, (a, b) = self.pool, (step.start, step.stop)
        n = step.inputs_embeds.shape[0]
        at = torch.zeros(n, dtype=torch.long) if step.logits_at is None else step.logits_at.reshape(-1).expand(n)
        with torch.inference_mode(False):
            logits, keys, values = self._decoder(
                step.inputs_embeds, step.position_ids, step.attention_mask, step.cache_position, at,
                [to_ms(k[a:b]) for k in pool.keys], [to_ms(v[a:b]) for v in pool.values], step.extras)
        for buf, new in zip(pool.keys + pool.values, keys + values):
            buf[a:b].copy_(to_torch(new))
        return logits[:, -1]  # [n,V]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n])."""
        ms = import_mindspore()
        index = ms.Tensor(rows.cpu().numpy().astype(np.int64))
        self.keys = [ms.ops.gather(k, index, 0) for k in self.keys]
        self.values = [ms.ops.gather(v, index, 0) for v in self.values]

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache of `layer`, each [B,H_kv,P,hd] (for parity checks)."""
        p = self.past_len
        return to_torch(self.keys[layer])[:, :, :p], to_torch(self.values[layer])[:, :, :p]

    def synchronize(self) -> None:
        """MindSpore's CPU kernels return when done."""


def set_threads(ms, threads: int) -> None:
    """MindSpore's CPU kernel threads (once per process: MindSpore takes it before its runtime starts)."""
    if not getattr(set_threads, "done", False):
        ms.device_context.cpu.op_tuning.threads_num(threads)
        set_threads.done = True
