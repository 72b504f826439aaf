"""Build Hugging Face transformers reference models with our tiny weights (for parity tests).

The renames follow transformers' BLIP-2 conversion (see ../shared/models/SPEC.md 1.10); the Llama
decoder needs none, our key names are Hugging Face's.
"""

import torch


def hf_llama(decoder_cfg, state: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = decoder_cfg
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.qkv_bias,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def hf_blip2_vision(vision_cfg, ln_eps, state: dict):
    """Blip2VisionModel == EVA-ViT-g + ln_vision; `state` is our `visual_encoder.*`/`ln_vision.*` dict."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    v = vision_cfg
    cfg = Blip2VisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_hidden, num_hidden_layers=v.depth, num_attention_heads=v.heads,
        image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.eps, qkv_bias=True, hidden_act="gelu",
    )
    model = Blip2VisionModel(cfg).eval()
    model.post_layernorm.eps = ln_eps  # ln_vision used PyTorch's default 1e-5 (SPEC 1.10)
    hf = {
        "embeddings.class_embedding": state["visual_encoder.cls_token"],
        "embeddings.position_embedding": state["visual_encoder.pos_embed"],
        "embeddings.patch_embedding.weight": state["visual_encoder.patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state["visual_encoder.patch_embed.proj.bias"],
        "post_layernorm.weight": state["ln_vision.weight"],
        "post_layernorm.bias": state["ln_vision.bias"],
    }
    for i in range(v.depth):
        src, dst = f"visual_encoder.blocks.{i}.", f"encoder.layers.{i}."
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            hf[dst + b + ".weight"] = state[src + a + ".weight"]
            hf[dst + b + ".bias"] = state[src + a + ".bias"]
        hf[dst + "self_attn.qkv.weight"] = state[src + "attn.qkv.weight"]
        q, vb = state[src + "attn.q_bias"], state[src + "attn.v_bias"]
        hf[dst + "self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), vb])
    model.load_state_dict(hf, strict=True)
    return model


def hf_qformer(q_cfg, image_width: int, state: dict):
    """Blip2QFormerModel; `state` holds our `Qformer.bert.*` keys."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(
        hidden_size=q_cfg.hidden, num_hidden_layers=q_cfg.layers, num_attention_heads=q_cfg.heads,
        intermediate_size=q_cfg.intermediate, cross_attention_frequency=q_cfg.cross_attention_freq,
        encoder_hidden_size=image_width, layer_norm_eps=q_cfg.eps, hidden_act="gelu",
    )
    model = Blip2QFormerModel(cfg).eval()
    hf = {}
    for k, v in state.items():
        if not k.startswith("Qformer.bert."):
            continue
        k = k[len("Qformer.bert."):].replace("embeddings.LayerNorm", "layernorm")
        hf[k.replace(".self.", ".attention.")] = v
    model.load_state_dict(hf, strict=True)
    return model
