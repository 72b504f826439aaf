"""The three-stage contract every model family implements, and the fixed I/O names.

```
 pixel_values [B,3,H,W] ─► vision ─► image_features [B,N_img,D]
 input_ids [B,T], image_features ─► embedding ─► inputs_embeds [B,T,D]
 inputs_embeds, position_ids, attention_mask, cache_position, cache ─► decoder ─► logits [B,T,V]
```

The names below are used verbatim by exports, runtimes and benchmark labels.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

STAGES = ("vision", "embedding", "decoder")

PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
CACHE_POSITION = "cache_position"  # static-cache decoder: [B,T] slot of each new token in its row
LOGITS_INDEX = "logits_index"  # static-cache decoder: [B] which of the T positions gives the row's logits


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def embedding_inputs(input_ids, image_features) -> dict:
    """The embedding stage's named inputs: input_ids [B,T] plus image_features [B,N,D] (or a family's
    dict of named features; None: text only, the graph then gets 0 image tokens)."""
    values = {INPUT_IDS: input_ids}
    if isinstance(image_features, dict):
        values.update(image_features)
    elif image_features is not None:
        values[IMAGE_FEATURES] = image_features
    return values


@runtime_checkable
class VisionLanguageModel(Protocol):
    """What a family's model class provides (see models/minigpt4.py for a worked example).

    Attributes:
        num_layers, num_kv_heads, head_dim: the decoder's KV cache geometry.
        image_token_id: the placeholder id the embedding stage overwrites with image features.
        max_context: the longest sequence (prompt + image tokens + answer) the decoder accepts.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    image_token_id: int
    max_context: int

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> image_features [B,N_img,D]."""

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """[B,T] (+ [B,N_img,D]) -> inputs_embeds [B,T,D]."""

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache_position: torch.Tensor,
        cache,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B,T,D] -> logits [B,T,V], or [B,1,V] at index `logits_at` [1]; writes the new keys/values
        into `cache` at `cache_position`. Runtimes ask for the last position only."""


class VisionStage(nn.Module):
    """`vision` as a module of its own, for export and compilation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class EmbeddingStage(nn.Module):
    """`embedding` as a module of its own, for export and compilation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids, image_features)
