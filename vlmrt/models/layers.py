"""Blocks shared by more than one family: the Llama-style decoder (RMSNorm, rotary, grouped-query
attention over an explicit KV cache, SwiGLU), the attention mask, and image-feature splicing.

Module and parameter names follow Hugging Face's `LlamaForCausalLM` (`model.layers.{i}.self_attn.
q_proj`, ...), so a Llama/Vicuna checkpoint loads with a strict key match. Math follows the LLaMA
paper and transformers' Llama implementation (fp32 RMSNorm statistics, rotate-half rotary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048  # the context length: prompt + image tokens + answer
    qkv_bias: bool = False  # Qwen-style biases on q/k/v projections
    tie_word_embeddings: bool = False
    residual_multiplier: float = 1.0  # MiniCPM: scale_depth / sqrt(num_layers) on each sub-layer output
    logits_divisor: float = 1.0  # MiniCPM: hidden_size / dim_model_base, divides the final hidden state

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "DecoderConfig":
        """Read a Hugging Face Llama-style `config.json` dict (the only place it is read)."""
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            qkv_bias=bool(hf.get("attention_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """position_ids [B,T] -> cos, sin [B,T,hd], computed in fp32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B,T,hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B,T,hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,H,T,hd], cos/sin [B,T,hd]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def causal_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B,1,T,S]: query t sees key slot s when s is a valid token at or before it.

    attention_mask [B,S] marks valid key slots (0 for left padding and unwritten slots);
    cache_position is the slot of each query: [T] for every row alike (the lock-step loop), or [B,T]
    per row (the engine: rows at different lengths share a step). A query always sees its own slot,
    so padding rows attend to themselves instead of to nothing (a fully masked row would give NaN).
    """
    slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [S]
    q = cache_position[..., None]  # [T,1] or [B,T,1]
    if q.dim() == 2:
        q = q[None]  # [1,T,1]
    allowed = (slots <= q) & attention_mask[:, None, :].bool()  # [B,T,S]
    allowed = allowed | (slots == q)
    return allowed[:, None]  # [B,1,T,S]


def attention_bias(attention_mask: torch.Tensor, cache_position: torch.Tensor, dtype: torch.dtype,
                   causal_prefill: bool = False) -> torch.Tensor | None:
    """The mask the decoder's SDPA calls take: an additive float mask [B,1,T,S] (0 where
    `causal_mask` allows, -inf elsewhere, in the model's dtype), or None for plain causal attention
    (SDPA's is_causal over the T keys just written). A float mask or is_causal, not a bool mask, so
    that SDPA on a GPU may pick its flash (is_causal) or memory-efficient kernels.

    Args:
        attention_mask: [B,S] valid key slots.
        cache_position: [T] or [B,T] the slot of each query (see `causal_mask`).
        dtype: the queries' dtype (a float mask must match it).
        causal_prefill: the caller's promise that the T queries are each row's first T tokens, at
            slots 0..T-1, all valid, with nothing in the cache before them (a prompt prefilled alone
            or an unpadded batch): then None. The caller knows this without reading a tensor, so
            compiled and exported graphs keep one static branch.
    """
    if causal_prefill:
        return None
    allowed = causal_mask(attention_mask, cache_position)  # [B,1,T,S]
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


def is_fresh_prefill(attention_mask: torch.Tensor, cache_position: torch.Tensor) -> bool:
    """Whether a lock-step decoder call is a prefill `attention_bias(causal_prefill=True)` covers:
    T > 1 queries at slots 0..T-1 ([T] form) and every row valid there (no left padding). Reads
    the tensors (a host sync on a GPU, once per prefill): for eager callers, never inside a graph."""
    t = cache_position.shape[-1]
    if t < 2 or cache_position.dim() != 1:
        return False
    return bool(torch.equal(cache_position.cpu(), torch.arange(t))) and bool(attention_mask[:, :t].bool().all())


def splice_image_features(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Write image_features [B,N,D] at the image-placeholder positions of each row, in order.

    Row b's k-th placeholder receives image_features[b, k]. Written with gather/where (no boolean
    indexing) so the graph has static shapes and exports cleanly. N may be 0 (an exported embedding
    graph is called that way for text only): then, as for placeholders beyond the N-th, the token
    embedding is kept.
    """
    b, _, d = inputs_embeds.shape
    count = torch.cumsum((input_ids == image_token_id).long(), dim=1)  # [B,T]: placeholders so far
    is_image = (input_ids == image_token_id) & (count <= image_features.shape[1])  # [B,T]
    index = torch.where(is_image, count - 1, torch.zeros_like(count))  # [B,T] in [0, N)
    feats = torch.cat([image_features.to(inputs_embeds.dtype), inputs_embeds.new_zeros(b, 1, d)], dim=1)  # [B,N+1,D]: never empty
    gathered = torch.gather(feats, 1, index[..., None].expand(-1, -1, d))  # [B,T,D]
    return torch.where(is_image[..., None], gathered, inputs_embeds)


class GeluMlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2: the ViT MLP of EVA-ViT-g (MiniGPT-4) and SigLIP (MiniCPM-V-2)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PreNormViTBlock(nn.Module):
    """x += attn(norm1(x), *attn_args); x += mlp(norm2(x)): the block of EVA-ViT-g (MiniGPT-4) and
    SigLIP (MiniCPM-V-2), whose key names (norm1, attn, norm2, mlp.fc1/fc2) both releases share."""

    def __init__(self, width: int, eps: float, attn: nn.Module, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = GeluMlp(width, mlp_hidden)

    def forward(self, x, *attn_args):
        x = x + self.attn(self.norm1(x), *attn_args)
        return x + self.mlp(self.norm2(x))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.layer_idx = layer_idx

    def forward(self, x, cos, sin, mask, cache_position, cache):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,T,hd]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B,H_kv,T,hd]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys, values = cache.update(self.layer_idx, k, v, cache_position)  # [B,H_kv,S,hd]
        if mask is None:  # a fresh prefill (attention_bias): causal over the T keys just written, square
            keys, values = keys[:, :, :t], values[:, :, :t]  # [B,H_kv,T,hd]
        elif mask.is_floating_point() and mask.dtype != q.dtype:  # e.g. a weight format's activations
            mask = mask.to(q.dtype)
        sdpa = dict(attn_mask=mask, is_causal=mask is None)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and not torch.onnx.is_in_onnx_export():  # grouped-query attention in SDPA: no copies
            out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True, **sdpa)  # [B,H,T,hd]
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if groups > 1:  # ONNX export: repeat each kv head for its query heads (opsets have no GQA attention)
            s = keys.shape[2]
            keys = keys[:, :, None].expand(b, self.num_kv_heads, groups, s, self.head_dim).reshape(b, -1, s, self.head_dim)
            values = values[:, :, None].expand(b, self.num_kv_heads, groups, s, self.head_dim).reshape(b, -1, s, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, **sdpa)  # [B,H,T,hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, x, cos, sin, mask, cache_position, cache):
        r = self.residual_multiplier
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_position, cache) * r
        return x + self.mlp(self.post_attention_layernorm(x)) * r


def keep_position(h: torch.Tensor, logits_at: torch.Tensor | None) -> torch.Tensor:
    """h [B,T,D] -> h [B,1,D] at index `logits_at` ([1]: the same index for every row, or [B]: one
    per row, as the engine's right-padded prompts need), or all of h when None. A tensor, so a
    compiled graph serves every prompt length of a bucket. Generation needs only the last real
    position's logits: computing all T costs a [T,D]x[D,V] matmul and a [B,T,V] tensor (hundreds of
    MB at a 150k vocabulary) for nothing. Parity tests ask for all positions."""
    if logits_at is None:
        return h
    # A one-hot row per query picks its position with one batched matmul, [1 or B,1,T] x [B,T,D]: no
    # branch on a shape (an export with a dynamic batch keeps one graph) and no shape computed at run
    # time (an exported graph keeps its static 1). Exact: one term is 1 x h, the others 0 x h.
    pick = torch.arange(h.shape[1], device=h.device) == logits_at.view(-1, 1)  # [1 or B, T]
    return pick[:, None, :].to(h.dtype) @ h  # [B,1,D]


class LlamaModel(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder stage: inputs_embeds in, logits out, keys/values into an explicit cache."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, inputs_embeds, position_ids, attention_mask, cache_position, cache, logits_at=None,
                causal_prefill: bool = False) -> torch.Tensor:
        """inputs_embeds [B,T,D], position_ids [B,T], attention_mask [B,S], cache_position [T] or
        [B,T] (per row) -> logits [B,T,V], or [B,1,V] at `logits_at` [1] or [B] (see keep_position).
        `causal_prefill`: the call is a fresh, unpadded prefill (see attention_bias)."""
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        mask = attention_bias(attention_mask, cache_position, inputs_embeds.dtype, causal_prefill)
        h = inputs_embeds
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache_position, cache)
        return self.lm_head(self.model.norm(keep_position(h, logits_at)) / self.config.logits_divisor)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos, sin [B,T,hd] for the positions; families with other schemes (M-RoPE) override this."""
        cfg = self.config
        return rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, dtype)


# ----------------------------------------------------------------------------- resampler (Qwen-VL, MiniCPM-V-2)
class SplicedLlamaStages:
    """`embed` and `decode` of the stage contract for a family whose decoder is a LlamaForCausalLM at
    `self.language_model` and whose image features overwrite its `image_token_id` placeholders
    (MiniGPT-4, Qwen-VL)."""

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B,T] (+ image_features [B,N,D]) -> inputs_embeds [B,T,D]."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if image_features is None:
            return embeds
        return splice_image_features(embeds, input_ids, image_features, self.image_token_id)

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, cache, logits_at=None,
               causal_prefill: bool = False) -> torch.Tensor:
        return self.language_model(inputs_embeds, position_ids, attention_mask, cache_position, cache, logits_at,
                                   causal_prefill)


def sincos_2d_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The fixed 2D sin-cos table [grid_h*grid_w, dim] of MAE, as Qwen-VL's and MiniCPM-V-2's
    resamplers use it (../shared/models/SPEC.md 2.4): positions row-major; the first dim/2 channels
    encode the column, the last dim/2 the row; each half is [sin(p*w), cos(p*w)] with
    w_k = 1 / 10000^(k / (dim/4)). Computed in fp32, as the releases do."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4))  # [D/4]
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij")

    def half(p: torch.Tensor) -> torch.Tensor:  # [gh,gw] -> [gh*gw, D/2]
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([half(cols), half(rows)], dim=1)


def sincos_2d_at(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """`sincos_2d_pos_embed` at given positions: rows, cols [...] -> [..., dim] fp32, on their device.
    For batches whose items each have their own grid (MiniCPM-V-2's slices); export-friendly."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=rows.device, dtype=torch.float32) / (dim / 4))  # [D/4]

    def half(p: torch.Tensor) -> torch.Tensor:  # [...] -> [..., D/2]
        angles = p.float()[..., None] * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([half(cols), half(rows)], dim=-1)


class PackedMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention`'s parameters and names (`in_proj_weight` [3D,D] packed [Q;K;V],
    `in_proj_bias` [3D], `out_proj`) with a batch-first forward that has no fast-path branches, so
    it exports and compiles as plain matmuls + SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query [B,Q,D], key/value [B,N,D], key_mask [B,N] bool (True = attend; None = all) -> [B,Q,D]."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # [B,H,L,hd]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B,1,1,N]
        out = F.scaled_dot_product_attention(split(F.linear(query, wq, bq)), split(F.linear(key, wk, bk)),
                                             split(F.linear(value, wv, bv)), attn_mask=mask)  # [B,H,Q,hd]
        return self.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1))


class Resampler(nn.Module):
    """One cross-attention layer from learned queries to image tokens: Qwen-VL's `attn_pool` and
    the core of MiniCPM-V-2's `resampler` (same parameter names in both releases).

    ```
     x [B,N,kv_dim] ─► kv_proj ─► ln_kv ─► kv [B,N,D] ──┬──(+ key_pos [N,D])──► keys
                                                        └─────────────────────► values
     query [Q,D] ─► ln_q ─► + pos_embed [Q,D] ─► queries ─► attn ─► [B,Q,D]
    ```
    `key_pos` is the caller's: Qwen-VL resizes `pos_embed` to the ViT grid, MiniCPM-V-2 computes a
    sin-cos table for the slice's grid. `pos_embed` is a parameter because the releases store it.
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = PackedMultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor, key_pos: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,N,kv_dim], key_pos [N,D] or [B,N,D], key_mask [B,N] bool (None = all keys) -> [B,Q,D]."""
        kv = self.ln_kv(self.kv_proj(x))  # [B,N,D]
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)  # [B,Q,D]
        return self.attn(q, kv + key_pos.to(kv.dtype), kv, key_mask)
