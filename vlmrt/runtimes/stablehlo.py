"""The stablehlo runtime: a StableHLO export (vlmrt/export/stablehlo.py) run with jax alone. Each
artefact is loaded with `jax.export.deserialize` and XLA-compiled on first use; the weights come
from the export's safetensors file. No vlmrt model code and no torchax is imported.

```
 weights.safetensors ─► weights: name -> jax array (once)
 encode_images  pixel_values [b,...] ─pad to the bucket─► vision.b{B} ─► image_features ─► [:b]
 embed          input_ids [b,t] (+ image_features) ─pad─► embedding.b{B}.t{T} (text only: .t1) ─► [:b,:t]
 start(b, n)    B = the batch bucket >= b; cache = zeros [B,H_kv,S,hd] per layer, jax arrays (n <= S)
 decode         inputs_embeds [b,t,D] at slots P..P+t-1 ─pad to [B,T]─► decoder.b{B}.t{T}
                (weights, inputs, cache) ─► logits [B,1,V] ─► [:b]; presents: the next call's cache
                (the cache argument is donated: XLA writes the new keys into its buffers)
```

Padding follows the static ONNX runtime (vlmrt/runtimes/onnx_static.py): along the axes each
tensor's manifest `dims` names, with zeros; padded rows and positions are dropped, padded tokens
take slots after the real ones (later tokens overwrite them before the mask opens them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import read_manifest
from vlmrt.runtimes.onnx_static import cut_image_tokens, cut_outputs, one_or_dict, pad_to, pick_graph
from vlmrt.stages import (ATTENTION_MASK, CACHE_POSITION, IMAGE_FEATURES, INPUTS_EMBEDS, LOGITS, LOGITS_INDEX,
                          POSITION_IDS, embedding_inputs)

WEIGHTS = "weights.safetensors"  # as vlmrt/export/stablehlo.py writes it (not imported: model-side code)
PAST, PRESENT = "past_key_values.", "present."
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # for tests


def import_jax():
    """jax alone (this runtime needs no torchax), or a VlmrtError naming the extra."""
    try:
        import jax
    except ImportError:
        raise VlmrtError("--runtime stablehlo needs JAX; install the extra: pip install 'vlmrt[jax]'") from None
    return jax


def _redo(folder: Path) -> str:
    return f"re-export it with `vlmrt export --model MODEL --format stablehlo --out {folder} --force`"


def load_weights(path: Path, jax) -> dict:
    """name -> jax array from the export's safetensors file, with a clear error when it is unreadable."""
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a truncated or garbled file
        raise VlmrtError(f"cannot read {path} ({e.__class__.__name__}: {e}); {_redo(path.parent)}") from None
    return {k: jax.device_put(v) for k, v in arrays.items()}


def load_artefact(path: Path, jax, compiler_options: dict | None):
    """A deserialized artefact, jitted: fn(weights, inputs, cache) -> outputs, the cache donated."""
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # flatbuffers and jax raise many types for bytes that are not an Exported
        raise VlmrtError(f"cannot load {path} as a jax.export artefact ({e.__class__.__name__}); "
                         f"{_redo(path.parent)}") from None
    here = jax.default_backend()  # "cpu", "gpu" (artefacts name "cuda" or "rocm"), "tpu"
    if not ({here} | ({"cuda", "rocm"} if here == "gpu" else set())) & set(exported.platforms):
        raise VlmrtError(f"{path.name} was exported for {', '.join(exported.platforms)}, and jax here runs on "
                         f"{here}; export it on a machine where jax runs on {here}")
    return jax.jit(exported.call, donate_argnums=(2,), compiler_options=compiler_options)


class StableHloRuntime:
    """Runs a StableHLO export (see the module docstring).

    Args:
        loaded: a `LoadedModel` of a stablehlo export folder (`vlmrt.models.load_model(DIR)`).
        fast_compile: compile without XLA's backend optimizations (quicker compiles, slower steps),
            for tests.
    """

    name = "stablehlo"

    def __init__(self, loaded, fast_compile: bool = False):
        folder = loaded.export_dir
        if folder is None:
            raise VlmrtError(f"--runtime stablehlo runs a StableHLO export folder; make one with `vlmrt export "
                             f"--model {loaded.name} --format stablehlo --out DIR`, then `vlmrt run --model DIR`")
        self.jax = jax = import_jax()
        self.folder, self.manifest = Path(folder), read_manifest(folder)
        if self.manifest.runtime != "stablehlo":
            raise VlmrtError(f"{folder} is not a StableHLO export (its runtime is {self.manifest.runtime}); "
                             f"run it with --runtime {self.manifest.runtime}")
        self.static, self.graphs = self.manifest.static, self.manifest.graphs
        self.cache_len = int(self.static["cache_len"])
        self.weights = load_weights(self.folder / WEIGHTS, jax)
        options = FAST_COMPILE if fast_compile else None
        self.calls = {g.info.file: load_artefact(self.folder / g.info.file, jax, options) for g in self.graphs}
        self.device, self.dtype = torch.device("cpu"), loaded.dtype
        self.cache: dict = {}
        self.batch = self.rows = self.past_len = 0
        print(f"stablehlo runtime: jax {jax.__version__} on {jax.devices()[0].platform}, {len(self.calls)} "
              f"artefacts, {len(self.weights)} weight tensors in {folder}", file=sys.stderr)

    def _pick(self, stage: str, batch: int, sequence: int | None = None, images: bool = True, first: int = 0):
        return pick_graph(self.graphs, stage, batch, sequence, images, first, self.cache_len)

    def _run(self, graph, values: dict, cut: dict[str, int]) -> dict:
        """Pad every input to its artefact's shape (zeros for one not given), run, cut outputs'
        named axes to `cut`; the presents stay jax arrays (the next call's cache)."""
        info, inputs, cache = graph.info, {}, {}
        for t in info.inputs:
            v = values.get(t.name)
            if t.name.startswith(PAST):
                cache[t.name] = v  # a jax array at the artefact's shape
            elif v is None:
                inputs[t.name] = np.zeros(t.shape, dtype=t.dtype)
            else:
                inputs[t.name] = pad_to(v.detach().cpu(), tuple(t.shape), t.name, info.file).numpy().astype(t.dtype)
        outs = self.calls[info.file](self.weights, inputs, cache)
        return cut_outputs(info, outs, cut, PRESENT, lambda v: torch.from_numpy(np.array(v)))  # presents stay jax arrays

    # ------------------------------------------------------------------------- the StageRunner interface
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        """pixel_values [b,...] (+ named vision inputs) -> image_features [b,N,D] (or a dict)."""
        b = pixel_values.shape[0]
        graph, values = self._pick("vision", b), {"pixel_values": pixel_values, **vision_inputs}
        outs = cut_image_tokens(graph.info, values, self._run(graph, values, {"batch": b}))
        return one_or_dict(outs, IMAGE_FEATURES)

    def embed(self, input_ids: torch.Tensor, image_features) -> torch.Tensor:
        """input_ids [b,t] (+ image_features or a dict of them; None: text only) -> inputs_embeds [b,t,D]."""
        b, t = input_ids.shape
        values = embedding_inputs(input_ids, image_features)
        graph = self._pick("embedding", b, t, images=not (image_features is None and t == 1))
        return one_or_dict(self._run(graph, values, {"batch": b, "sequence": t}), INPUTS_EMBEDS)

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """Zeroed cache arrays (jax) of the smallest batch bucket that holds `batch_size` rows."""
        if max_seq_len > self.cache_len:
            raise VlmrtError(f"{max_seq_len} tokens do not fit this StableHLO export's KV cache of {self.cache_len} "
                             "slots; re-export with a larger --seq bucket")
        graph = self._pick("decoder", batch_size)
        self.batch, self.rows = graph.batch, batch_size
        jnp = self.jax.numpy
        self.cache = {t.name: jnp.zeros(t.shape, dtype=t.dtype) for t in graph.info.inputs if t.name.startswith(PAST)}
        self.past_len = 0

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [b,t,D] at slots `cache_position` [t] (continuing the cache) -> logits [b,1,V]."""
        b, t = inputs_embeds.shape[:2]
        first = int(cache_position[0])
        if first != self.past_len:
            raise VlmrtError(f"the stablehlo runtime's cache holds {self.past_len} tokens, so decoding must continue "
                             f"at slot {self.past_len}, not {first}; call start() before a new prompt")
        graph = self._pick("decoder", max(b, self.batch), t, first=first)
        rows, seq = graph.batch, graph.sequence
        slots = first + torch.arange(seq).expand(rows, -1)  # [B,T]: distinct slots for the padded tokens too
        values = {INPUTS_EMBEDS: inputs_embeds, POSITION_IDS: position_ids,
                  ATTENTION_MASK: attention_mask[:, :self.cache_len], CACHE_POSITION: slots,
                  LOGITS_INDEX: torch.full((rows,), t - 1), **self.cache, **extras}
        outs = self._run(graph, values, {"batch": b})
        self.cache = {k.replace(PRESENT, PAST, 1): v for k, v in outs.items() if k.startswith(PRESENT)}
        self.past_len = first + t
        return outs[LOGITS]  # [b,1,V]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n], n <= the batch bucket)."""
        index = self.jax.numpy.asarray(rows.cpu().numpy())
        self.cache = {k: self.jax.numpy.zeros_like(v).at[:len(index)].set(v[index]) for k, v in self.cache.items()}

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of `layer` for the request's rows and slots, each [b,H_kv,P,hd]."""
        k, v = (torch.from_numpy(np.array(self.cache[f"{PAST}{layer}.{x}"])) for x in ("key", "value"))
        return k[:self.rows, :, :self.past_len], v[:self.rows, :, :self.past_len]

    def synchronize(self) -> None:
        for a in list(self.cache.values())[:1]:
            a.block_until_ready()
