"""The aoti runtime: an AOTInductor export's packages (vlmrt/export/aoti.py) loaded with
`torch._inductor.aoti_load_package` and driven by the shared generation loop. No vlmrt model code
is imported: the manifest gives every package's inputs and outputs by name.

```
 encode_images  pixel_values (+ named inputs, static axes padded) ─► vision.pt2 ─► image_features
 embed          input_ids (+ image_features; text only: image_tokens = 0) ─► embedding.pt2
 start(b, n)    pasts = zeros [b,H_kv,n,hd] per layer (the cache_sequence dimension is dynamic)
 decode         inputs_embeds [b,t,D], position_ids, attention_mask [b,n],
                cache_position [b,t] (the loop's slots for every row), logits_index = t-1
                ─► decoder.pt2 ─► logits [b,1,V], presents [b,H_kv,n,hd] ─► the next call's pasts
```

A preset or release (model code loaded) is exported into the export cache first (optimized build,
minutes on a small CPU) and reused from there.
"""

from __future__ import annotations

import sys

import torch

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import read_manifest
from vlmrt.kv_cache import lockstep_inputs
from vlmrt.stages import (ATTENTION_MASK, CACHE_POSITION, IMAGE_FEATURES, INPUTS_EMBEDS, LOGITS, LOGITS_INDEX,
                          POSITION_IDS, embedding_inputs)


def _load_package(path):
    try:
        from torch._inductor import aoti_load_package
    except ImportError:
        raise VlmrtError(f"this torch ({torch.__version__}) has no AOTInductor; use torch >= 2.6 or --runtime onnx") from None
    try:
        return aoti_load_package(str(path))
    except Exception as e:  # the loader raises RuntimeError and others
        raise VlmrtError(f"cannot load {path} ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "re-export the model with --format aoti") from None


class AotiRuntime:
    """Runs an AOTInductor export (see the module docstring).

    Args:
        loaded: a `LoadedModel` of an aoti export folder, or of a preset / release (exported to the cache).
    """

    name = "aoti"

    def __init__(self, loaded):
        folder = loaded.export_dir
        if folder is None:
            from vlmrt.export.aoti import ensure_aoti_export

            folder = ensure_aoti_export(loaded)
        self.folder, self.device = folder, loaded.device
        self.manifest = read_manifest(folder)
        if self.manifest.runtime != "aoti":
            raise VlmrtError(f"{folder} is an ONNX export; run it with --runtime onnx (or re-export with --format aoti)")
        self.graphs = {(g.stage, g.images): g.info for g in self.manifest.graphs}
        self.packages = {key: _load_package(folder / info.file) for key, info in self.graphs.items()}
        print(f"aoti runtime: {len(self.packages)} packages in {folder}", file=sys.stderr)
        self.past: dict[str, torch.Tensor] = {}
        self.past_len = self.seq = 0

    def _call(self, key, values: dict, dims: dict[str, int]) -> dict:
        """Run one package: inputs by name in manifest order (missing ones are zeros; static named
        axes padded with zeros); returns output name -> tensor."""
        from vlmrt.runtimes.onnx_static import pad_to

        info, args = self.graphs[key], []
        for t in info.inputs:
            v = values.get(t.name)
            shape = tuple(d if isinstance(d, int) else dims.get(d, 0) for d in t.shape)
            if v is None:
                v = torch.zeros(shape, dtype=getattr(torch, t.dtype), device=self.device)
            else:
                target = tuple(n if isinstance(d, str) else d for n, d in zip(v.shape, t.shape))
                v = pad_to(v.to(self.device), target, t.name, info.file) if v.dim() == len(t.shape) else v
            args.append(v.contiguous())
        outs = self.packages[key](*args)
        return dict(zip((t.name for t in info.outputs), outs))

    @staticmethod
    def _one_or_dict(outs: dict, single: str):
        return outs[single] if list(outs) == [single] else outs

    # ------------------------------------------------------------------------- the StageRunner interface
    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        """pixel_values [B,...] (+ named vision inputs) -> image_features [B,N,D] (or a dict)."""
        from vlmrt.runtimes.onnx_static import cut_image_tokens

        values = {"pixel_values": pixel_values, **vision_inputs}
        outs = self._call(("vision", True), values, {"batch": pixel_values.shape[0]})
        outs = cut_image_tokens(self.graphs[("vision", True)], values, outs)  # MiniCPM-V-2's padded chunks
        return self._one_or_dict(outs, IMAGE_FEATURES)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, image_features) -> torch.Tensor:
        """input_ids [B,T] (+ image_features or a dict of them; None: text only) -> inputs_embeds [B,T,D]."""
        values = embedding_inputs(input_ids, image_features)
        dims = {"batch": input_ids.shape[0], "sequence": input_ids.shape[1]}
        return self._one_or_dict(self._call(("embedding", True), values, dims), INPUTS_EMBEDS)  # missing: 0 tokens

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """A zeroed cache of `max_seq_len` slots for `batch_size` rows."""
        m = self.manifest
        if max_seq_len > m.max_context:
            raise VlmrtError(f"{max_seq_len} tokens do not fit the model's context of {m.max_context}")
        shape = (batch_size, m.num_kv_heads, max_seq_len, m.head_dim)
        dtype = getattr(torch, next(t.dtype for t in self.graphs[("decoder", True)].inputs
                                    if t.name.startswith("past_key_values.")))
        self.past = {t.name: torch.zeros(shape, dtype=dtype, device=self.device)
                     for t in self.graphs[("decoder", True)].inputs if t.name.startswith("past_key_values.")}
        self.past_len, self.seq = 0, max_seq_len

    @torch.inference_mode()
    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [B,T,D] at slots `cache_position` [T] -> the last position's logits [B,1,V]."""
        b, t = inputs_embeds.shape[:2]
        mask, slots = lockstep_inputs(attention_mask, cache_position, self.seq, b)  # [B,S], [B,T]
        values = {INPUTS_EMBEDS: inputs_embeds, POSITION_IDS: position_ids, ATTENTION_MASK: mask.to(self.device),
                  CACHE_POSITION: slots.to(self.device),
                  LOGITS_INDEX: torch.full((b,), t - 1, dtype=torch.long, device=self.device), **self.past, **extras}
        outs = self._call(("decoder", True), values, {"batch": b, "sequence": t, "cache_sequence": self.seq})
        self.past = {k.replace("present.", "past_key_values.", 1): v for k, v in outs.items() if k.startswith("present.")}
        self.past_len = max(self.past_len, int(cache_position[-1]) + 1)
        return outs[LOGITS]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n])."""
        self.past = {k: v.index_select(0, rows.to(self.device)) for k, v in self.past.items()}

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of `layer`, each [B,H_kv,P,hd] (for parity checks)."""
        p = self.past_len
        return self.past[f"past_key_values.{layer}.key"][:, :, :p], self.past[f"past_key_values.{layer}.value"][:, :, :p]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
