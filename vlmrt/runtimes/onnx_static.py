"""The onnx runtime on a static-shape export (vlmrt/export/static.py): every call is padded to the
smallest bucket that fits, and the KV cache is a fixed-size tensor per layer.

```
 encode_images  pixel_values [b,...] ─pad named axes─► vision.b{B} ─► image_features [B,...] ─► [:b]
 embed          input_ids [b,t] (+ image_features) ─pad─► embedding.b{B}.t{T} (text only: .t1) ─► [:b,:t]
 start(b, n)    B = the batch bucket >= b; pasts = zeros [B,H_kv,S,hd] per layer (n <= S)
 decode         inputs_embeds [b,t,D] at slots P..P+t-1 ─pad to [B,T]─► decoder.b{B}.t{T}
                  cache_position [B,T] = P + 0..T-1 (padded tokens take the slots after the real
                  ones: later tokens overwrite them before the mask opens them), logits_index = t-1,
                  attention_mask [b,n] ─► [B,S] (zeros: padded rows and slots see nothing)
                ─► logits [B,1,V] ─► [:b]; presents [B,H_kv,S,hd] become the next call's pasts
```

Padding is along the axes the manifest names (`dims` of each tensor: batch, sequence, and the
family's own axes such as MiniCPM-V-2's chunk axes); padded values are zeros and what they produce
is dropped, as in the compiled runtime's buckets.
"""

from __future__ import annotations

import numpy as np
import torch

from vlmrt.errors import VlmrtError
from vlmrt.runtimes.onnx import OnnxRuntime
from vlmrt.stages import (ATTENTION_MASK, CACHE_POSITION, IMAGE_FEATURES, INPUT_IDS, INPUTS_EMBEDS, LOGITS,
                          LOGITS_INDEX, POSITION_IDS)


def pad_to(x: torch.Tensor, shape: tuple, name: str, graph: str) -> torch.Tensor:
    """x padded with zeros at the end of each axis up to `shape`; a larger axis is an error."""
    if x.dim() != len(shape):
        raise VlmrtError(f"{name} has shape {tuple(x.shape)}, but {graph} takes {tuple(shape)}")
    if any(n > m for n, m in zip(x.shape, shape)):
        raise VlmrtError(f"{name} of shape {tuple(x.shape)} does not fit {graph} ({tuple(shape)}); "
                         "re-export with larger --batch / --seq buckets")
    pad = []
    for n, m in reversed(list(zip(x.shape, shape))):
        pad += [0, m - n]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def pick_graph(graphs, stage: str, batch: int, sequence: int | None, images: bool, first: int, cache_len: int):
    """The graph of `stage` with the smallest bucket that fits (and, for the decoder, whose padded
    slots stay inside the cache of `cache_len` slots), or a VlmrtError listing the buckets.

    Args:
        graphs: the manifest's GraphInfo per bucket.
        sequence: the call's tokens (None: any; vision has no sequence bucket).
        images: embedding only: the graph that takes image features (prefill) or not (text only).
        first: the first cache slot the call writes.
    """
    fits = [g for g in graphs if g.stage == stage and g.batch >= batch
            and (sequence is None or (g.sequence >= sequence and first + g.sequence <= cache_len))
            and (stage != "embedding" or g.images == images)]
    if not fits:
        have = sorted({(g.batch, g.sequence) for g in graphs if g.stage == stage})
        raise VlmrtError(f"no {stage} graph of this static export fits batch {batch}"
                         + (f", {sequence} tokens at slot {first}" if sequence else "")
                         + f" (buckets: {have}); re-export with larger --batch / --seq buckets")
    return min(fits, key=lambda g: (g.batch, g.sequence or 0))


def padded_fraction(inputs, values: dict) -> float:
    """The part of a family's own static axis (not batch or sequence) that a call fills: e.g.
    MiniCPM-V-2's chunks, 3 of the 10 the graph takes; 1.0 when no such axis is padded. The image
    tokens of the output scale with it (chunks x queries), so the caller cuts them to that part."""
    for t in inputs:
        v = values.get(t.name)
        for axis, dim in enumerate(t.dims or ()):
            if (isinstance(dim, str) and dim not in ("batch", "sequence") and isinstance(t.shape[axis], int)
                    and hasattr(v, "shape") and v.shape[axis] < t.shape[axis]):
                return v.shape[axis] / t.shape[axis]
    return 1.0


def cut_image_tokens(graph_info, values: dict, outs: dict) -> dict:
    """A vision call that fills only part of a padded family axis: its outputs' image_tokens axis
    cut to the same part (the rest is what the padding produced)."""
    part = padded_fraction(graph_info.inputs, values)
    if part < 1.0:
        for t in graph_info.outputs:
            if "image_tokens" in (t.dims or ()) and torch.is_tensor(outs.get(t.name)):
                axis = t.dims.index("image_tokens")
                outs[t.name] = outs[t.name].narrow(axis, 0, round(outs[t.name].shape[axis] * part))
    return outs

def cut_outputs(info, outs: dict, cut: dict[str, int], keep: str, to_torch) -> dict:
    """A bucket graph's outputs as torch tensors (`to_torch`), each named axis cut to `cut` (the
    request's real batch, sequence, ...); outputs whose name starts with `keep` (the presents: the
    next call's past) stay as the runtime gave them."""
    result = {}
    for t in info.outputs:
        if t.name.startswith(keep):
            result[t.name] = outs[t.name]
            continue
        x = to_torch(outs[t.name])
        for axis, dim in enumerate(t.dims or ()):
            if dim in cut:
                x = x.narrow(axis, 0, cut[dim])
        result[t.name] = x
    return result


def one_or_dict(outs: dict, single: str):
    """The one output `single`, or every output by name when a stage gives several."""
    return outs[single] if list(outs) == [single] else outs


class StaticOnnxRuntime(OnnxRuntime):
    """Runs a static-shape export (see the module docstring); a subclass of the onnx runtime that
    `OnnxRuntime(loaded)` becomes for such a folder."""

    def _sessions(self) -> dict:
        """graph file -> InferenceSession, for every bucket's graph."""
        self.static = self.manifest.static
        self.cache_len = int(self.static["cache_len"])
        self.batch = self.rows = 0
        return {g.info.file: self._session(g.info.file, g.stage) for g in self.manifest.graphs}

    def _pick(self, stage: str, batch: int, sequence: int | None = None, images: bool = True, first: int = 0):
        return pick_graph(self.manifest.graphs, stage, batch, sequence, images, first, self.cache_len)

    def _run_padded(self, graph, values: dict, cut: dict[str, int]) -> dict:
        """Pad every given input to its graph shape, run, cut outputs' named axes to `cut`."""
        info = graph.info
        padded = {}
        for t in info.inputs:
            v = values.get(t.name)
            if isinstance(v, self._ort.OrtValue):
                padded[t.name] = v  # a past from the last call: already at the graph's shape
            elif v is not None:
                padded[t.name] = pad_to(v.detach().cpu(), tuple(t.shape), t.name, info.file)
        outs = self.run_graph(info, self.sessions[info.file], padded, {})
        return cut_outputs(info, outs, cut, "present.", lambda v: torch.from_numpy(v.numpy()))  # presents stay OrtValues

    # ------------------------------------------------------------------------- the StageRunner interface
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        """pixel_values [b,...] (+ named vision inputs) -> image_features [b,N,D] (or a dict)."""
        b = pixel_values.shape[0]
        graph, values = self._pick("vision", b), {"pixel_values": pixel_values, **vision_inputs}
        outs = cut_image_tokens(graph.info, values, self._run_padded(graph, values, {"batch": b}))
        return one_or_dict(outs, IMAGE_FEATURES)

    def embed(self, input_ids: torch.Tensor, image_features) -> torch.Tensor:
        """input_ids [b,t] (+ image_features or a dict of them; None: text only) -> inputs_embeds [b,t,D]."""
        b, t = input_ids.shape
        values = {INPUT_IDS: input_ids}
        if isinstance(image_features, dict):
            values.update(image_features)
        elif image_features is not None:
            values[IMAGE_FEATURES] = image_features
        text_only = image_features is None and t == 1
        graph = self._pick("embedding", b, t, images=not text_only)
        return one_or_dict(self._run_padded(graph, values, {"batch": b, "sequence": t}), INPUTS_EMBEDS)

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """Zero the fixed-size cache of the smallest batch bucket that holds `batch_size` rows."""
        if max_seq_len > self.cache_len:
            raise VlmrtError(f"{max_seq_len} tokens do not fit this static export's KV cache of {self.cache_len} "
                             "slots; re-export with a larger --seq bucket")
        graph = self._pick("decoder", batch_size)
        self.batch, self.rows = graph.batch, batch_size
        self.past = {}
        for t in graph.info.inputs:
            if t.name.startswith("past_key_values."):
                self.past[t.name] = self._ort.OrtValue.ortvalue_from_numpy(np.zeros(t.shape, dtype=t.dtype))
        self.past_len = 0

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [b,t,D] at slots `cache_position` [t] (continuing the cache) -> logits [b,1,V]."""
        b, t = inputs_embeds.shape[:2]
        first = int(cache_position[0])
        if first != self.past_len:
            raise VlmrtError(f"the onnx runtime's cache holds {self.past_len} tokens, so decoding must continue at "
                             f"slot {self.past_len}, not {first}; call start() before a new prompt")
        graph = self._pick("decoder", max(b, self.batch), t, first=first)
        rows, seq = graph.batch, graph.sequence
        slots = first + torch.arange(seq).expand(rows, -1)  # [B,T]: distinct slots for the padded tokens too
        mask = attention_mask[:, :self.cache_len].long()  # [b,n] -> padded to [B,S] below
        values = {INPUTS_EMBEDS: inputs_embeds, POSITION_IDS: position_ids, ATTENTION_MASK: mask,
                  CACHE_POSITION: slots, LOGITS_INDEX: torch.full((rows,), t - 1, dtype=torch.long),
                  **self.past, **extras}
        outs = self._run_padded(graph, values, {"batch": b})
        self.past = {k.replace("present.", "past_key_values.", 1): v for k, v in outs.items() if k.startswith("present.")}
        self.past_len = first + t
        return outs[LOGITS]  # [b,1,V]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n], n <= the batch bucket)."""
        index = rows.cpu().numpy()
        new = {}
        for k, v in self.past.items():
            a = np.take(v.numpy(), index, axis=0)  # [n,H_kv,S,hd]
            full = np.zeros((self.batch, *a.shape[1:]), dtype=a.dtype)
            full[:len(index)] = a
            new[k] = full
        self._reordered = new  # a CPU OrtValue borrows its array
        self.past = {k: self._ort.OrtValue.ortvalue_from_numpy(a) for k, a in new.items()}

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of `layer` for the request's rows and slots, each [b,H_kv,P,hd]."""
        k, v = (torch.from_numpy(self.past[f"past_key_values.{layer}.{x}"].numpy()) for x in ("key", "value"))
        return k[:self.rows, :, :self.past_len], v[:self.rows, :, :self.past_len]
