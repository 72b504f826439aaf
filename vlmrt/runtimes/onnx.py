"""The onnx runtime: an export folder's three graphs (vlmrt/export) on ONNX Runtime, driven by the
shared generation loop exactly like the eager runtime. This is the only module that imports
onnxruntime.

```
 encode_images  pixel_values ─► vision.onnx ─► image_features
 embed          input_ids (+ image_features; image_tokens = 0 when None) ─► embedding.onnx ─► inputs_embeds
 decode         inputs_embeds, position_ids, attention_mask[:, :P+T], past_key_values.* (P slots)
                ─► decoder.onnx ─► logits, present.* (P+T slots) ─► kept as the next call's pasts
```

The cache lives in ONNX Runtime's own buffers (OrtValues bound with I/O binding), so the presents
of one step feed the next without a copy through numpy or torch; with the CUDA provider they stay
on the GPU. A loaded preset (not an export) is exported first into the export cache
(vlmrt/export/onnx.py `ensure_export`) and reused from there.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import read_manifest
from vlmrt.stages import ATTENTION_MASK, IMAGE_FEATURES, INPUTS_EMBEDS, LOGITS, POSITION_IDS, embedding_inputs

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


def _check_weights(manifest, asked, folder) -> None:
    """An export folder runs in the weight format it was exported with; asking for another is an error."""
    if asked is None:
        return
    want = asked.tag
    if want != manifest.weights:
        raise VlmrtError(f"{folder} holds {manifest.weights} weights, not {want}; export it again with "
                         f"`vlmrt export MODEL --out DIR --quantize {want}` (or leave --quantize out)")


class OnnxRuntime:
    """Runs an export with ONNX Runtime (see the module docstring).

    Args:
        loaded: a `LoadedModel` of an export folder, or of a preset / release (exported to the cache).
        providers: execution providers in order (default: from what is installed and the device).
        threads: intra-op threads (default: --threads, else the cores this process may use).
        prepacking: MLAS weight prepacking for the CPU decoder (None: off for fp graphs, on for quantized).
    """

    name = "onnx"

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
        from vlmrt.config import cpu_threads

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
        self.past: dict = {}  # past_key_values.* -> OrtValue [B,H_kv,P,hd]
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
        """Empty the cache for a new request of `batch_size` rows."""
        ctx = self.manifest.max_context
        if max_seq_len > ctx:
            raise VlmrtError(f"{max_seq_len} tokens do not fit the model's context of {ctx}")
        self.past, self.past_len = {}, 0

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [B,T,D] at cache slots `cache_position` [T] (which must continue the cache)
        -> the last position's logits [B,1,V]; the presents become the next call's pasts."""
        b, t = inputs_embeds.shape[:2]
        first = int(cache_position[0])
        if first != self.past_len:
            raise VlmrtError(f"the onnx runtime's cache holds {self.past_len} tokens, so decoding must continue at "
                             f"slot {self.past_len}, not {first}; call start() before a new prompt")
        total = self.past_len + t
        if attention_mask.shape[1] < total:
            raise VlmrtError(f"attention_mask covers {attention_mask.shape[1]} slots, fewer than the {total} in use")
        values = {INPUTS_EMBEDS: inputs_embeds, POSITION_IDS: position_ids,
                  ATTENTION_MASK: attention_mask[:, :total], **self.past, **extras}  # mask [B,S_max] -> [B,P+T]
        dims = {"batch": b, "sequence": t, "past_sequence": self.past_len, "total_sequence": total}
        outs = self.run("decoder", values, dims)
        self.past = {k.replace("present.", "past_key_values.", 1): v for k, v in outs.items() if k.startswith("present.")}
        self.past_len = total
        return torch.from_numpy(outs[LOGITS].numpy())[:, -1:]  # exports of vlmrt 0.1 kept every position

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n]). The pasts make a round
        trip through host memory (a copy to and from the GPU with the CUDA provider)."""
        index = rows.cpu().numpy()
        self._reordered = {k: np.take(v.numpy(), index, axis=0) for k, v in self.past.items()}  # [n,H_kv,P,hd]
        self.past = {k: self._ort.OrtValue.ortvalue_from_numpy(a, self.device_type, self.device_id)
                     for k, a in self._reordered.items()}  # a CPU OrtValue borrows its array: kept above

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of `layer`, each [B,H_kv,P,hd] (for parity checks)."""
        k, v = self.past[f"past_key_values.{layer}.key"], self.past[f"past_key_values.{layer}.value"]
        return torch.from_numpy(k.numpy()), torch.from_numpy(v.numpy())

    def synchronize(self) -> None:
        """Nothing to wait for: every run returns when its outputs are ready."""
