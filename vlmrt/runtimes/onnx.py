"""The onnx runtime: an export folder's three graphs (vlmrt/export) on ONNX Runtime, driven by the
shared generation loop and by the engine (vlmrt/engine.py) exactly like the eager runtime. This is
the only module that imports onnxruntime.

```
 encode_images  pixel_values ─► vision.onnx ─► image_features
 embed          input_ids (+ image_features; image_tokens = 0 when None) ─► embedding.onnx ─► inputs_embeds
 decode         (the lock-step loop) inputs_embeds [B,T,D] at slots cache_position [T] of every row
                ─► decoder.onnx on this runtime's StaticKVCache [B,H_kv,S,hd] per layer ─► logits [B,1,V]
 run_step       (the engine) StepInputs over pool rows [start, stop): per-row positions and slots
                ─► decoder.onnx on those rows of the SlotKVCache [N,H_kv,S+1,hd] ─► logits [n,V]
```

The KV cache is torch memory allocated once (`start`, `allocate_slots`) and bound to the decoder
graph by pointer with I/O binding: `past_key_values.{i}.*` and `present.{i}.*` of a call are bound
to the same buffer (rows [start, stop) of the pool: a contiguous block, so no gather either).
The CPU provider's ScatterElements skips its input-to-output copy when the two are one buffer, so
a step writes only its new keys and values in place: nothing is concatenated, reallocated or copied
per step (bench/RESULTS.md has the figures; GPU providers were not measured). The engine's
compaction copies pool rows in torch.

Exports of earlier vlmrt versions (a decoder that concatenates pasts: no `cache_position` input)
still run the lock-step loop, with the presents of one step as the next step's pasts; they have no
engine steps (`allocate_slots` / `run_step` are absent: re-export to serve them on the engine).
A loaded preset (not an export) is exported first into the export cache
(vlmrt/export/onnx.py `ensure_export`) and reused from there.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import read_manifest
from vlmrt.kv_cache import SlotKVCache, StaticKVCache
from vlmrt.stages import (ATTENTION_MASK, CACHE_POSITION, IMAGE_FEATURES, INPUTS_EMBEDS, LOGITS, LOGITS_INDEX,
                          POSITION_IDS, embedding_inputs)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def import_onnxruntime():
    """onnxruntime, or a clear error when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        raise VlmrtError("onnxruntime is not installed; `pip install onnxruntime` (CPU) or onnxruntime-gpu "
                         "(CUDA) to use --runtime onnx, or use --runtime eager") from None
    return onnxruntime


def pick_providers(available: list[str], device: torch.device) -> list[str]:
    """TensorRT / CUDA (when installed) for a CUDA device, then CPU; CPU only for a CPU device."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if not gpu:
        raise VlmrtError(f"--device {device} asked for, but this onnxruntime has no GPU provider (it has "
                         f"{', '.join(available)}); install onnxruntime-gpu or use --device cpu")
    return gpu + ["CPUExecutionProvider"]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_shape(shape: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    """A manifest shape with named dimensions -> sizes; a name not in `dims` is 0 (empty)."""
    return tuple(d if isinstance(d, int) else dims.get(d, 0) for d in shape)


@dataclass(frozen=True)
class CacheGeometry:
    """What the engine reads of `runtime.model`: the decoder's KV cache geometry, from the manifest."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int


def _check_weights(manifest, asked, folder) -> None:
    """An export folder runs in the weight format it was exported with; asking for another is an error."""
    if asked is None:
        return
    want = asked.tag
    if want != manifest.weights:
        raise VlmrtError(f"{folder} holds {manifest.weights} weights, not {want}; export it again with "
                         f"`vlmrt export MODEL --out DIR --quantize {want}` (or leave --quantize out)")


class _engine_step:
    """A method of engine steps that exists only when the export's decoder takes per-row cache slots:
    for other exports (static-shape ones, those of earlier vlmrt versions) reading it raises
    AttributeError, so `hasattr(runtime, "run_step")` is False and Pipeline keeps the lock-step loop.
    A non-data descriptor: an instance attribute of the same name (a test's monkeypatch) wins."""

    def __init__(self, fn):
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, runtime, owner=None):
        if runtime is None:
            return self
        runtime._need_slot_decoder()
        return self.fn.__get__(runtime, owner)


class OnnxRuntime:
    """Runs an export with ONNX Runtime (see the module docstring).

    Args:
        loaded: a `LoadedModel` of an export folder, or of a preset / release (exported to the cache).
        providers: execution providers in order (default: from what is installed and the device).
        threads: intra-op threads (default: --threads, else the cores this process may use).
        prepacking: MLAS weight prepacking for the CPU decoder (None: off for fp graphs, on for quantized).
    """

    name = "onnx"
    vision_batch = None  # the engine's batches (vlmrt/engine_batch.py): the graphs' batch axis is dynamic, so
    prefill_rows = None  # any number of images a vision call and of rows a prefill call

    def __new__(cls, loaded, *args, **kwargs):
        """A static-shape export (manifest `static`) runs on the bucketed subclass."""
        if cls is OnnxRuntime and loaded.export_dir is not None and getattr(loaded.config, "static", None):
            from vlmrt.runtimes.onnx_static import StaticOnnxRuntime

            cls = StaticOnnxRuntime
        return super().__new__(cls)

    def __init__(self, loaded, providers: list[str] | None = None, threads: int | None = None,
                 prepacking: bool | None = None):
        ort = import_onnxruntime()
        self._ort = ort
        from vlmrt.config import DTYPES, cpu_threads

        folder = loaded.export_dir
        if folder is None:
            from vlmrt.export.onnx import ensure_export

            folder = ensure_export(loaded)
        self.folder = folder
        self.manifest = read_manifest(folder)
        _check_weights(self.manifest, loaded.weights, folder)
        self.providers = providers or pick_providers(ort.get_available_providers(), loaded.device)
        self.threads = threads or cpu_threads() or _cpu_count()
        self.prepacking = self.manifest.weights != "fp" if prepacking is None else prepacking
        self.sessions = self._sessions()
        self.providers = next(iter(self.sessions.values())).get_providers()  # what ONNX Runtime really uses
        on_gpu = self.providers[0] in GPU_PROVIDERS
        self.device_type, self.device_id = ("cuda", loaded.device.index or 0) if on_gpu else ("cpu", 0)
        print(f"onnx runtime: {', '.join(self.providers)}, {self.threads} threads, graphs in {folder}", file=sys.stderr)
        m = self.manifest
        self.model = CacheGeometry(m.num_layers, m.num_kv_heads, m.head_dim, m.max_context)
        self.dtype = DTYPES[m.dtype]
        self.device = torch.device(self.device_type, self.device_id) if on_gpu else torch.device("cpu")
        decoder = m.stages.get("decoder")
        self.slot_decoder = not m.static and decoder is not None and CACHE_POSITION in {t.name for t in decoder.inputs}
        self.cache: StaticKVCache | None = None  # the lock-step loop's buffers (slot decoder)
        self.pool: SlotKVCache | None = None  # the engine's slots (allocate_slots)
        self.past: dict = {}  # concatenating decoder: past_key_values.* -> OrtValue [B,H_kv,P,hd]
        self.past_len = 0

    def _sessions(self) -> dict:
        """stage -> InferenceSession."""
        return {stage: self._session(info.file, stage) for stage, info in self.manifest.stages.items()}

    def _session(self, file: str, stage: str):
        ort = self._ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if stage == "decoder" and self.providers[0] == "CPUExecutionProvider" and not self.prepacking:
            # Decoding multiplies one row by each weight: with MLAS's prepacked-GEMM layout that was ~20%
            # slower than the plain layout on a 7B-wide decoder here (2-core CPU), and packing copies weights.
            # Quantized graphs keep prepacking: MatMulNBits and MatMulInteger unpack every weight on every
            # call without it (int4 block 32 on a 0.5B decoder: ~2200 ms/token instead of ~50).
            so.add_session_config_entry("session.disable_prepacking", "1")
        try:
            return ort.InferenceSession(str(self.folder / file), sess_options=so, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise VlmrtError(f"ONNX Runtime cannot load {self.folder / file} ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); re-export the model") from None

    # ------------------------------------------------------------------------- running a graph
    def _ortvalue(self, value, dtype: str, keep: list):
        if isinstance(value, self._ort.OrtValue):
            return value
        arr = np.ascontiguousarray(value.detach().cpu().numpy().astype(dtype, copy=False))
        keep.append(arr)  # a CPU OrtValue borrows the array's memory
        return self._ort.OrtValue.ortvalue_from_numpy(arr, self.device_type, self.device_id)

    def run(self, stage: str, values: dict, dims: dict[str, int]) -> dict:
        """Run one graph. Inputs missing from `values` are zeros (named dims from `dims`, else 0).

        Returns: output name -> OrtValue.
        """
        return self.run_graph(self.manifest.stages[stage], self.sessions[stage], values, dims)

    def run_graph(self, info, sess, values: dict, dims: dict[str, int]) -> dict:
        """Run the graph `info` (a StageInfo) on session `sess`; see `run`."""
        binding, keep = sess.io_binding(), []
        for t in info.inputs:
            v = values.get(t.name)
            if v is None:
                v = torch.from_numpy(np.zeros(resolve_shape(t.shape, dims), dtype=t.dtype))
            binding.bind_ortvalue_input(t.name, self._ortvalue(v, t.dtype, keep))
        for t in info.outputs:
            binding.bind_output(t.name, self.device_type, self.device_id)
        sess.run_with_iobinding(binding)
        return dict(zip((t.name for t in info.outputs), binding.get_outputs()))

    @staticmethod
    def _tensors(outs: dict, single: str):
        """One output -> a torch tensor; several -> a dict of them (as the family's stage returns)."""
        t = {k: torch.from_numpy(v.numpy()) for k, v in outs.items()}
        return t[single] if list(t) == [single] else t

    # ------------------------------------------------------------------------- the StageRunner interface
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        """pixel_values [B,3,H,W] (+ named vision inputs) -> image_features [B,N_img,D] (or a dict)."""
        outs = self.run("vision", {"pixel_values": pixel_values, **vision_inputs}, {"batch": pixel_values.shape[0]})
        return self._tensors(outs, IMAGE_FEATURES)

    def embed(self, input_ids: torch.Tensor, image_features) -> torch.Tensor:
        """input_ids [B,T] (+ image_features [B,N,D] or a dict of them; None: text only) -> inputs_embeds."""
        values = embedding_inputs(input_ids, image_features)
        outs = self.run("embedding", values, {"batch": input_ids.shape[0], "sequence": input_ids.shape[1]})
        return self._tensors(outs, INPUTS_EMBEDS)

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """An empty cache for a new request of `batch_size` rows (the last buffers reused when big enough)."""
        ctx = self.manifest.max_context
        if max_seq_len > ctx:
            raise VlmrtError(f"{max_seq_len} tokens do not fit the model's context of {ctx}")
        self.past, self.past_len = {}, 0
        c, m = self.cache, self.model
        if self.slot_decoder and (c is None or c.max_batch < batch_size or c.max_seq < max_seq_len):
            self.cache = StaticKVCache(m.num_layers, batch_size, m.num_kv_heads, max_seq_len, m.head_dim, self.dtype,
                                       self.device)

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [B,T,D] at cache slots `cache_position` [T] (which must continue the cache)
        -> the last position's logits [B,1,V]."""
        b, t = inputs_embeds.shape[:2]
        first = int(cache_position[0])
        if first != self.past_len:
            raise VlmrtError(f"the onnx runtime's cache holds {self.past_len} tokens, so decoding must continue at "
                             f"slot {self.past_len}, not {first}; call start() before a new prompt")
        total = self.past_len + t
        if attention_mask.shape[1] < total:
            raise VlmrtError(f"attention_mask covers {attention_mask.shape[1]} slots, fewer than the {total} in use")
        if not self.slot_decoder:
            return self._concat_decode(inputs_embeds, position_ids, attention_mask[:, :total], extras)
        s = self.cache.max_seq
        mask = attention_mask[:, :s]
        mask = torch.nn.functional.pad(mask, (0, s - mask.shape[1]))  # [B,S]: slots past the loop's mask unused
        values = {INPUTS_EMBEDS: inputs_embeds, POSITION_IDS: position_ids, ATTENTION_MASK: mask,
                  CACHE_POSITION: cache_position.reshape(1, t).expand(b, t), LOGITS_INDEX: torch.full((b,), t - 1),
                  **extras}
        self.past_len = total
        return self._decode_rows(self.cache, 0, b, values)  # [B,1,V]

    def _concat_decode(self, inputs_embeds, position_ids, attention_mask, extras) -> torch.Tensor:
        """An export of an earlier vlmrt: pasts [B,H_kv,P,hd] in, presents [B,H_kv,P+T,hd] out."""
        b, t = inputs_embeds.shape[:2]
        values = {INPUTS_EMBEDS: inputs_embeds, POSITION_IDS: position_ids, ATTENTION_MASK: attention_mask,
                  **self.past, **extras}  # mask [B,S_max] -> [B,P+T]
        dims = {"batch": b, "sequence": t, "past_sequence": self.past_len, "total_sequence": self.past_len + t}
        outs = self.run("decoder", values, dims)
        self.past = {k.replace("present.", "past_key_values.", 1): v for k, v in outs.items() if k.startswith("present.")}
        self.past_len += t
        return torch.from_numpy(outs[LOGITS].numpy())[:, -1:]  # exports of vlmrt 0.1 kept every position

    def _decode_rows(self, cache, start: int, stop: int, values: dict) -> torch.Tensor:
        """The decoder on rows [start, stop) of `cache` (a StaticKVCache or SlotKVCache: torch buffers
        [N,H_kv,S,hd] per layer), each present bound to its past's memory, so the graph writes the
        new keys and values in place. Inputs missing from `values` are zeros. Returns logits [n,1,V]."""
        info, sess = self.manifest.stages["decoder"], self.sessions["decoder"]
        binding, keep = sess.io_binding(), []
        dims = {"batch": stop - start, "sequence": values[INPUTS_EMBEDS].shape[1], "cache_sequence": cache.keys[0].shape[2]}
        for t in info.inputs:
            if t.name.startswith("past_key_values."):
                self._bind_buffer(binding, t.name, _cache_rows(cache, t.name, start, stop))
                continue
            v = values.get(t.name)
            v = torch.zeros(resolve_shape(t.shape, dims), dtype=_torch_dtype(t.dtype)) if v is None else v
            if t.name == POSITION_IDS and v.dim() == 2 and len(t.shape) == 3:  # text positions, M-RoPE graph
                v = v[None].expand(3, -1, -1)  # [3,n,T]: the three components alike (as the model expands them)
            keep.append(v := v.to(_torch_dtype(t.dtype)).contiguous())  # alive until the run returns
            self._bind_buffer(binding, t.name, v)
        binding.bind_output(LOGITS, self.device_type, self.device_id)
        for t in info.outputs:
            if t.name.startswith("present."):
                name = t.name.replace("present.", "past_key_values.", 1)
                self._bind_buffer(binding, t.name, _cache_rows(cache, name, start, stop), output=True)
        sess.run_with_iobinding(binding)
        return torch.from_numpy(binding.get_outputs()[0].numpy())  # [n,1,V]

    def _bind_buffer(self, binding, name: str, x: torch.Tensor, output: bool = False) -> None:
        """Bind a contiguous torch tensor by pointer (no copy) as graph input or output `name`."""
        kind, index = ("cuda", x.device.index or 0) if x.device.type == "cuda" else ("cpu", 0)
        bind = binding.bind_output if output else binding.bind_input
        bind(name, kind, index, _numpy_dtype(x.dtype), list(x.shape), x.data_ptr())

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n]). Slot decoder: in place in
        the torch buffers. Concatenating decoder: the pasts make a round trip through host memory."""
        if self.slot_decoder:
            self.cache.reorder(rows.to(self.device))
            return
        index = rows.cpu().numpy()
        self._reordered = {k: np.take(v.numpy(), index, axis=0) for k, v in self.past.items()}  # [n,H_kv,P,hd]
        self.past = {k: self._ort.OrtValue.ortvalue_from_numpy(a, self.device_type, self.device_id)
                     for k, a in self._reordered.items()}  # a CPU OrtValue borrows its array: kept above

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of `layer`, each [B,H_kv,S,hd] (for parity checks)."""
        if self.slot_decoder:
            return self.cache.keys[layer], self.cache.values[layer]
        k, v = self.past[f"past_key_values.{layer}.key"], self.past[f"past_key_values.{layer}.value"]
        return torch.from_numpy(k.numpy()), torch.from_numpy(v.numpy())

    # ------------------------------------------------------------------ engine steps (vlmrt/engine.py)
    @_engine_step
    def allocate_slots(self, num_slots: int, max_seq: int) -> SlotKVCache:
        """The engine's KV pool: torch buffers [num_slots,H_kv,max_seq+1,hd] per layer, allocated once,
        that every step binds by pointer."""
        m = self.model
        self.pool = SlotKVCache(m.num_layers, num_slots, m.num_kv_heads, max_seq, m.head_dim, self.dtype, self.device)
        return self.pool

    @_engine_step
    def run_step(self, step) -> torch.Tensor:
        """One engine decoder call (`vlmrt.engine.StepInputs`) over pool rows [start, stop) -> logits
        [n,V] at `logits_at` (the only position when T = 1)."""
        n, t = step.stop - step.start, step.inputs_embeds.shape[1]
        at = torch.zeros(n, dtype=torch.long) if step.logits_at is None else step.logits_at.reshape(-1).expand(n)
        values = {INPUTS_EMBEDS: step.inputs_embeds, POSITION_IDS: step.position_ids, ATTENTION_MASK: step.attention_mask,
                  CACHE_POSITION: step.cache_position.reshape(n, t), LOGITS_INDEX: at, **step.extras}
        return self._decode_rows(self.pool, step.start, step.stop, values)[:, -1]  # [n,V]

    def _need_slot_decoder(self) -> None:
        if not self.slot_decoder:
            raise AttributeError(f"{self.folder}'s decoder takes no per-row cache slots (a static-shape export, or "
                                 "one of an earlier vlmrt); export the model again to run it on the engine")

    def synchronize(self) -> None:
        """Nothing to wait for: every run returns when its outputs are ready."""


def _cache_rows(cache, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the cache buffer behind graph input `past_key_values.{i}.key|value`: a
    view of contiguous memory (the rows are the leading axis)."""
    _, layer, kind = name.split(".")
    return (cache.keys if kind == "key" else cache.values)[int(layer)][start:stop]


@functools.lru_cache(maxsize=None)
def _torch_dtype(name: str) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=name)).dtype


@functools.lru_cache(maxsize=None)
def _numpy_dtype(dtype: torch.dtype):
    return torch.zeros(0, dtype=dtype).numpy().dtype.type
