"""The eager runtime: the stages as plain PyTorch calls, with a static KV cache. The reference every
other runtime is compared with."""

from __future__ import annotations

import torch

from vlmrt.errors import VlmrtError
from vlmrt.kv_cache import SlotKVCache, StaticKVCache
from vlmrt.models.layers import is_fresh_prefill


class EagerRuntime:
    name = "eager"
    vision_batch = None  # the engine's batches (vlmrt/engine_batch.py): any number of images a vision call,
    prefill_rows = None  # and of rows a prefill call

    def __init__(self, loaded):
        """Args: loaded: a `vlmrt.models.LoadedModel`."""
        from vlmrt.quantize import prepare_model

        self.loaded = loaded
        self.model = prepare_model(loaded, self.name)  # linears swapped when a weight format is asked for
        self.device, self.dtype = loaded.device, loaded.dtype
        self.cache: StaticKVCache | None = None
        self.pool: SlotKVCache | None = None  # the engine's slots (allocate_slots)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        return self.model.encode_images(pixel_values.to(self.device, self.dtype), **vision_inputs)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        return self.model.embed(input_ids.to(self.device), image_features)

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """Make a cache for this batch; reuse the last one when it is big enough."""
        if max_seq_len > self.model.max_context:
            raise VlmrtError(f"{max_seq_len} tokens do not fit the model's context of {self.model.max_context}")
        c = self.cache
        if c is None or c.max_batch < batch_size or c.max_seq < max_seq_len:
            m = self.model
            self.cache = StaticKVCache(m.num_layers, batch_size, m.num_kv_heads, max_seq_len, m.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [B,T,D] at cache slots `cache_position` [T] -> the last position's logits [B,1,V]."""
        s = self.cache.max_seq
        mask = attention_mask.to(self.device)
        if mask.shape[1] < s:  # the loop's mask covers only the slots this request uses
            mask = torch.nn.functional.pad(mask, (0, s - mask.shape[1]))
        t = inputs_embeds.shape[1]
        last = torch.tensor([t - 1], device=self.device) if t > 1 else None  # logits of the last position only
        fresh = t > 1 and is_fresh_prefill(mask, cache_position)  # an unpadded prefill: SDPA's is_causal
        return self.model.decode(inputs_embeds, position_ids.to(self.device), mask, cache_position.to(self.device),
                                 self.cache, logits_at=last, **extras, **({"causal_prefill": True} if fresh else {}))  # [B,1,V]

    # ------------------------------------------------------------------ engine steps (vlmrt/engine.py)
    def allocate_slots(self, num_slots: int, max_seq: int) -> SlotKVCache:
        """The engine's KV pool: `num_slots` rows of `max_seq` positions (+ one scratch position)."""
        m = self.model
        self.pool = SlotKVCache(m.num_layers, num_slots, m.num_kv_heads, max_seq, m.head_dim, self.dtype, self.device)
        return self.pool

    @torch.inference_mode()
    def run_step(self, step) -> torch.Tensor:
        """One engine decoder call (`vlmrt.engine.StepInputs`) over pool rows [start, stop) -> logits
        [n,V] at `logits_at` (the only position when T = 1). A decode attends over the window of
        positions in use (`vlmrt.engine.attention_window`), not the whole slot."""
        from vlmrt.engine import attention_window

        w, slots = attention_window(step, self.pool.scratch)
        fresh = {"causal_prefill": True} if step.causal_prefill else {}
        logits = self.model.decode(step.inputs_embeds, step.position_ids, step.attention_mask[:, :w], slots,
                                   self.pool.view(step.start, step.stop, w), logits_at=step.logits_at, **step.extras,
                                   **fresh)
        return logits[:, -1]  # [n,V]

    @torch.inference_mode()
    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n] on any device), in place."""
        self.cache.reorder(rows.to(self.device))

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache buffers of `layer`, each [B_max,H_kv,S_max,hd] (for parity checks)."""
        return self.cache.keys[layer], self.cache.values[layer]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
