"""MiniGPT-4 (and MiniGPT-v2): EVA-ViT-g + ln_vision + Q-Former (or 4-token concat) + llama_proj +
a Llama/Vicuna decoder, on the three-stage contract.

Facts from the MiniGPT-4 release (Vision-CAIR/MiniGPT-4), LAVIS' BLIP-2 and ../shared/models/SPEC.md
section 1: EVA-ViT-g at 224 px with 39 blocks, fused qkv without bias plus separate q_bias/v_bias,
ln_vision with eps 1e-5; a BERT-base Q-Former with 32 queries and cross-attention in every other
layer; Vicuna v0 / Llama-2 templates and stop tokens. Module names mirror the release's state-dict
keys (`visual_encoder.blocks.0.attn.qkv.weight`, `Qformer.bert.encoder.layer.0.attention.self.query`,
`llama_proj`, `llama_model.model.layers.0...`), so loading is a strict key match.

```
 pixel_values [B,3,S,S]
   └► visual_encoder (EVA-ViT-g) ─► [B,1+P,1408] ─► ln_vision
        ├─ Q-Former variants: Qformer(query_tokens [1,32,768] x-attn image) ─► [B,32,768]
        └─ Llama-2 / v2:      drop CLS, concat 4 consecutive tokens ─► [B,P/4,5632]
   └► llama_proj ─► image_features [B,N_img,D_llm]
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmrt.errors import VlmrtError
from vlmrt.models.layers import DecoderConfig, LlamaForCausalLM, PreNormViTBlock, SplicedLlamaStages
from vlmrt.processor import ChatTemplate, ProcessorSpec


@dataclass(frozen=True)
class EvaViTConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39  # EVA-CLIP-g has 40 blocks; BLIP-2 drops the last
    heads: int = 16
    mlp_hidden: int = 6144  # int(1408 * 4.3637)
    eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class QFormerConfig:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    eps: float = 1e-12
    cross_attention_freq: int = 2  # cross-attention in layers 0, 2, 4, ...
    num_query_tokens: int = 32


@dataclass(frozen=True)
class MiniGPT4Config:
    vision: EvaViTConfig
    qformer: QFormerConfig | None  # None: the Llama-2 / v2 path (4 consecutive tokens concatenated)
    decoder: DecoderConfig
    template: str  # key of TEMPLATES
    ln_vision_eps: float = 1e-5

    @property
    def num_image_tokens(self) -> int:
        return self.qformer.num_query_tokens if self.qformer else self.vision.num_patches // 4

    @property
    def proj_in(self) -> int:
        return self.qformer.hidden if self.qformer else 4 * self.vision.width


_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
    "provide it to you. Please answer my questions."
)
TEMPLATES = {  # the release's conversation templates, one user turn each (SPEC 1.8)
    "vicuna0": _SYSTEM + "###Human: <Img><ImageHere></Img> {prompt}###Assistant: ",
    "llama2": _SYSTEM + "<s>[INST] <Img><ImageHere></Img> {prompt} [/INST] ",
    "minigptv2": "<s>[INST] <Img><ImageHere></Img> {prompt} [/INST]",
}
CHATS = {  # the same formats over many turns (conversation.py: roles, separator, system)
    "vicuna0": ChatTemplate("###Human: {content}", "###Assistant: {content}", "###Assistant: ",
                            "<Img><ImageHere></Img> ", "{content}", _SYSTEM),
    "llama2": ChatTemplate("<s>[INST] {content}", " [/INST] {content}", " [/INST] ", "<Img><ImageHere></Img> ",
                           "{content}", _SYSTEM),
    "minigptv2": ChatTemplate("<s>[INST] {content}", " [/INST]{content}", " [/INST]", "<Img><ImageHere></Img> ",
                              "{content}"),
}
MAX_IMAGES = 4  # per prompt: <Img><ImageHere></Img> each, 32 tokens each (the release's chat takes several)
# `###` is id 835 and also the pair (2277 `##`, 29937 `#`) in the Llama vocabulary; 2 is </s>.
STOP_TOKEN_IDS = ((835,), (2277, 29937), (2,))
LLAMA_PINNED = {835: "\u2581###", 2277: "##", 29937: "#"}

_VICUNA7B = DecoderConfig(vocab_size=32001, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                          intermediate_size=11008, rms_norm_eps=1e-6, max_position_embeddings=2048)
_VICUNA13B = replace(_VICUNA7B, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824)
_LLAMA2_7B = replace(_VICUNA7B, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096)

PRESETS = {
    "minigpt4-7b": MiniGPT4Config(EvaViTConfig(), QFormerConfig(), _VICUNA7B, "vicuna0"),
    "minigpt4-13b": MiniGPT4Config(EvaViTConfig(), QFormerConfig(), _VICUNA13B, "vicuna0"),
    "minigpt4-llama2-7b": MiniGPT4Config(EvaViTConfig(), None, _LLAMA2_7B, "llama2"),
    "minigptv2-7b": MiniGPT4Config(EvaViTConfig(image_size=448), None, _LLAMA2_7B, "minigptv2"),
    "minigpt4-tiny": MiniGPT4Config(
        EvaViTConfig(image_size=56, width=32, depth=2, heads=4, mlp_hidden=64),
        QFormerConfig(hidden=32, layers=2, heads=4, intermediate=64, num_query_tokens=8),
        DecoderConfig(vocab_size=32001, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=512),
        "vicuna0",
    ),
}
PRESETS["minigpt4-llama2-tiny"] = replace(PRESETS["minigpt4-tiny"], qformer=None, template="llama2")


# ----------------------------------------------------------------------------- EVA-ViT-g
class PatchEmbed(nn.Module):
    def __init__(self, cfg: EvaViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B,3,S,S] -> [B,P,W]


class EvaAttention(nn.Module):
    def __init__(self, cfg: EvaViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))  # the key projection has no bias
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        b, n, w = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = (self.qkv(x) + bias).view(b, n, 3, self.heads, w // self.heads)  # a call, so a weight format can swap qkv
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B,H,N,hd]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class EvaViT(nn.Module):
    """EVA-ViT-g as BLIP-2 uses it: no pre-norm, no final norm; all 1+P tokens out."""

    def __init__(self, cfg: EvaViTConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(
            PreNormViTBlock(cfg.width, cfg.eps, EvaAttention(cfg), cfg.mlp_hidden) for _ in range(cfg.depth)
        )

    def forward(self, pixel_values):
        x = self.patch_embed(pixel_values)  # [B,P,W]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # [B,1+P,W]
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return x


class FP32LayerNorm(nn.LayerNorm):
    """ln_vision: evaluated in fp32, cast back (as the release does under fp16)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


# ----------------------------------------------------------------------------- Q-Former (BERT names)
class BertSelfAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(kv_width, cfg.hidden)
        self.value = nn.Linear(kv_width, cfg.hidden)

    def forward(self, x, context):
        b, n, h = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, h // self.heads).transpose(1, 2)  # [B,H,N,hd]
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)), split(self.value(context)))
        return out.transpose(1, 2).reshape(b, n, h)


class BertOutput(nn.Module):
    """dense -> (+ residual) -> LayerNorm: BERT's post-norm."""

    def __init__(self, d_in: int, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertOutput(cfg.hidden, cfg)

    def forward(self, x, context):
        return self.output(self.self(x, context), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, image_width: int, has_cross: bool):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden)
        self.crossattention = BertAttention(cfg, image_width) if has_cross else None
        self.intermediate_query = BertIntermediate(cfg)
        self.output_query = BertOutput(cfg.intermediate, cfg)

    def forward(self, q, image):
        q = self.attention(q, q)
        if self.crossattention is not None:
            q = self.crossattention(q, image)
        return self.output_query(self.intermediate_query(q), q)


class QFormerEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, image_width: int):
        super().__init__()
        self.layer = nn.ModuleList(
            QFormerLayer(cfg, image_width, i % cfg.cross_attention_freq == 0) for i in range(cfg.layers)
        )


class QFormerBert(nn.Module):
    def __init__(self, cfg: QFormerConfig, image_width: int):
        super().__init__()
        self.embeddings = QFormerEmbeddings(cfg)
        self.encoder = QFormerEncoder(cfg, image_width)


class QFormer(nn.Module):
    """The query path of BLIP-2's Q-Former: queries -> LayerNorm -> layers (self, cross, FFN)."""

    def __init__(self, cfg: QFormerConfig, image_width: int):
        super().__init__()
        self.bert = QFormerBert(cfg, image_width)

    def forward(self, query_tokens, image_embeds):
        q = self.bert.embeddings.LayerNorm(query_tokens)  # [B,Q,768]
        for layer in self.bert.encoder.layer:
            q = layer(q, image_embeds)
        return q


# ----------------------------------------------------------------------------- the model
class MiniGPT4ForConditionalGeneration(SplicedLlamaStages, nn.Module):
    """MiniGPT-4 on the stage contract (see vlmrt/stages.py).

    Worked example (minigpt4-7b): the question "What is this?" renders to
    `<system>###Human: <Img><ImageHere></Img> What is this?###Assistant: `; the processor tokenizes
    the text before `<ImageHere>` with BOS, the text after it without, and puts 32 copies of
    `image_token_id` between them. `encode_images` turns pixels [1,3,224,224] into image_features
    [1,32,4096]; `embed` looks up the text ids and writes the 32 feature rows over the 32
    placeholders; `decode` runs Vicuna on the result.
    """

    image_token_id = 0  # <unk>: Llama's byte fallback never produces it from text
    presets = PRESETS

    @staticmethod
    def is_release_folder(folder: Path) -> bool:
        """A folder with eva_vit_g.pth or a *minigpt*.pth checkpoint is taken as a MiniGPT-4 release."""
        return folder.is_dir() and ((folder / "eva_vit_g.pth").exists() or any(folder.glob("*minigpt*.pth")))

    def __init__(self, cfg: MiniGPT4Config):
        super().__init__()
        self.config = cfg
        self.visual_encoder = EvaViT(cfg.vision)
        self.ln_vision = FP32LayerNorm(cfg.vision.width, eps=cfg.ln_vision_eps)
        if cfg.qformer is not None:
            self.query_tokens = nn.Parameter(torch.zeros(1, cfg.qformer.num_query_tokens, cfg.qformer.hidden))
            self.Qformer = QFormer(cfg.qformer, cfg.vision.width)
        self.llama_proj = nn.Linear(cfg.proj_in, cfg.decoder.hidden_size)
        self.llama_model = LlamaForCausalLM(cfg.decoder)
        d = cfg.decoder
        self.num_layers, self.num_kv_heads, self.head_dim = d.num_layers, d.num_kv_heads, d.head_dim
        self.max_context = d.max_position_embeddings

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B,3,S,S] -> image_features [B,N_img,D]."""
        x = self.ln_vision(self.visual_encoder(pixel_values))  # [B,1+P,W]
        if self.config.qformer is not None:
            x = self.Qformer(self.query_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x)  # [B,Q,768]
        else:
            x = x[:, 1:].reshape(x.shape[0], -1, 4 * x.shape[-1])  # [B,P/4,4W]: 4 consecutive tokens
        return self.llama_proj(x)

    @property
    def language_model(self) -> LlamaForCausalLM:
        return self.llama_model

    @property
    def processor_spec(self) -> ProcessorSpec:
        cfg = self.config
        return ProcessorSpec(
            image_size=cfg.vision.image_size,
            template=TEMPLATES[cfg.template],
            image_placeholder="<ImageHere>",
            image_token_id=self.image_token_id,
            num_image_tokens=cfg.num_image_tokens,
            stop_strings=("###",) if cfg.template == "vicuna0" else (),
            stop_token_ids=STOP_TOKEN_IDS,
            chat=CHATS[cfg.template],
            max_images=MAX_IMAGES,
        )

    @staticmethod
    def synthetic_tokenizer(cfg: MiniGPT4Config):
        from vlmrt.tokenizer import build_synthetic_tokenizer

        return build_synthetic_tokenizer(
            cfg.decoder.vocab_size, {0: "<unk>", 1: "<s>", 2: "</s>"}, LLAMA_PINNED, bos="<s>", eos="</s>"
        )


def resize_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[1,1+P0,W] -> [1,1+P,W]: bicubic resize of the patch grid in fp32, CLS entry kept (SPEC 1.3)."""
    if pos.shape[1] == num_patches + 1:
        return pos
    g0, g = math.isqrt(pos.shape[1] - 1), math.isqrt(num_patches)
    grid = pos[:, 1:].float().reshape(1, g0, g0, -1).permute(0, 3, 1, 2)  # [1,W,g0,g0]
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g * g, -1).to(pos.dtype)
    return torch.cat([pos[:, :1], grid], dim=1)


# ----------------------------------------------------------------------------- loading the release
# Keys of the release files that belong to parts MiniGPT-4 does not use (LAVIS loads these files
# non-strictly); every other key under a prefix we read must match our modules exactly.
_EVA_UNUSED = ("norm.", "fc_norm.", "head.", "lm_head.", "rel_pos_bias.")
_QFORMER_UNUSED = ("embeddings.word_embeddings.", "embeddings.position_embeddings.", "embeddings.position_ids")
_LLM_UNUSED = (".rotary_emb.inv_freq",)


def _release_files(folder: Path) -> dict:
    """Find the release's files in one folder (symlinks welcome)."""
    if not folder.is_dir():
        raise VlmrtError(f"model folder not found: {folder}")
    proj = sorted(p for p in folder.glob("*.pth") if "minigpt" in p.name.lower())
    llm = sorted(p.parent for p in folder.glob("*/config.json"))
    files = {"eva": folder / "eva_vit_g.pth", "blip2": folder / "blip2_pretrained_flant5xxl.pth"}
    if not files["eva"].exists():
        raise VlmrtError(f"{folder}: missing eva_vit_g.pth (the EVA-ViT-g weights from the BLIP-2 release)")
    if len(proj) != 1:
        found = ", ".join(p.name for p in proj) or "none"
        raise VlmrtError(f"{folder}: expected exactly one MiniGPT-4 checkpoint (e.g. pretrained_minigpt4_7b.pth), found {found}")
    if len(llm) != 1:
        raise VlmrtError(f"{folder}: expected exactly one LLM subfolder with config.json (Vicuna or Llama-2 in Hugging Face layout), found {len(llm)}")
    return {**files, "proj": proj[0], "llm": llm[0]}


def _model_dict(obj, path: Path) -> dict:
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise VlmrtError(f"{path} does not hold a state dict")
    return state


def _take(state: dict, prefix: str, unused: tuple[str, ...], out_prefix: str, max_block: int | None = None) -> dict:
    """Keys under `prefix`, renamed to `out_prefix`, minus the documented unused parts."""
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if any(u in rest if u.startswith(".") else rest.startswith(u) for u in unused):
            continue
        if max_block is not None and rest.startswith("blocks.") and int(rest.split(".")[1]) >= max_block:
            continue  # EVA-CLIP's 40th block, dropped by BLIP-2
        out[out_prefix + rest] = v
    return out


def _qformer_keys(blip2: dict) -> dict:
    out = _take(blip2, "Qformer.bert.", _QFORMER_UNUSED, "Qformer.bert.")
    # each layer's text-only FFN (`layer.{i}.intermediate`, `layer.{i}.output`) is unused by the query path
    return {k: v for k, v in out.items()
            if not (k.startswith("Qformer.bert.encoder.layer.") and k.split(".")[5] in ("intermediate", "output"))}


def _merge_lora(state: dict, proj: dict) -> None:
    """MiniGPT-v2: fold PEFT LoRA (q_proj, v_proj; alpha 16) into the decoder weights."""
    from vlmrt.weights import materialize

    for k, a in proj.items():
        if not k.endswith("lora_A.default.weight"):
            continue
        base = k.replace("llama_model.base_model.model.", "llama_model.").replace(".lora_A.default.weight", ".weight")
        b = proj[k.replace("lora_A", "lora_B")]
        if base not in state:
            raise VlmrtError(f"LoRA tensor {k} targets {base}, which the LLM does not have")
        state[base] = materialize(state[base]).float() + (b.float() @ a.float()) * (16.0 / a.shape[0])  # whole, even on a shard


def _vision_state(eva: dict, files: dict, cfg: MiniGPT4Config) -> dict:
    from vlmrt.weights import read_pth

    state = _take(eva, "", _EVA_UNUSED, "visual_encoder.", max_block=cfg.vision.depth)
    if "visual_encoder.pos_embed" in state:
        state["visual_encoder.pos_embed"] = resize_pos_embed(state["visual_encoder.pos_embed"], cfg.vision.num_patches)
    if cfg.qformer is None:  # never trained in these variants: stays at its initial values (SPEC 1.4)
        state["ln_vision.weight"] = torch.ones(cfg.vision.width)
        state["ln_vision.bias"] = torch.zeros(cfg.vision.width)
        return state
    if not files["blip2"].exists():
        raise VlmrtError(f"{files['blip2'].parent}: missing blip2_pretrained_flant5xxl.pth (the BLIP-2 Q-Former weights), needed by the Vicuna variants")
    blip2 = _model_dict(read_pth(files["blip2"]), files["blip2"])
    state.update(_qformer_keys(blip2))
    state.update({k: blip2[k] for k in ("query_tokens", "ln_vision.weight", "ln_vision.bias") if k in blip2})
    return state


def _match_preset(eva: dict, proj: dict, decoder: DecoderConfig, folder) -> MiniGPT4Config:
    """The preset whose shapes the files have. Facts the files do not store (head counts, eps,
    image size) come from it; the decoder's come from the LLM's config.json."""
    if "pos_embed" not in eva or "llama_proj.weight" not in proj:
        raise VlmrtError(f"{folder}: eva_vit_g.pth has no pos_embed or the MiniGPT-4 checkpoint has no llama_proj.weight; these are not MiniGPT-4 release files")
    width, proj_in = eva["pos_embed"].shape[-1], proj["llama_proj.weight"].shape[1]
    is_v2 = any("lora_A" in k for k in proj)
    for cfg in PRESETS.values():
        if (cfg.vision.width, cfg.proj_in, cfg.template == "minigptv2") == (width, proj_in, is_v2):
            return replace(cfg, decoder=decoder)
    raise VlmrtError(f"{folder}: no MiniGPT-4 variant has a {width}-wide ViT and a {proj_in}-input llama_proj; check the files")


def load_release(folder: str | Path, device: torch.device, dtype: torch.dtype, shard=None):
    """Load a MiniGPT-4 release from one folder: eva_vit_g.pth, blip2_pretrained_flant5xxl.pth (Vicuna
    variants), one *minigpt*.pth checkpoint (llama_proj, LoRA for v2), and the LLM as a Hugging Face
    folder (config.json, safetensors or .bin shards, tokenizer).

    Returns (model, tokenizer, config). Errors name the file and the key at fault.
    """
    from vlmrt.tokenizer import load_tokenizer
    from vlmrt.weights import assign_weights, build_on, read_hf_weights, read_json, read_pth

    files = _release_files(Path(folder))
    proj = _model_dict(read_pth(files["proj"]), files["proj"])
    eva = _model_dict(read_pth(files["eva"]), files["eva"])
    decoder = DecoderConfig.from_hf(read_json(files["llm"] / "config.json"))
    cfg = _match_preset(eva, proj, decoder, folder)
    state = _vision_state(eva, files, cfg)
    state.update({k: v for k, v in proj.items() if k.startswith("llama_proj.")})
    llm = read_hf_weights(files["llm"], lazy=shard is not None)
    state.update({"llama_model." + k: v for k, v in llm.items() if not any(k.endswith(u) for u in _LLM_UNUSED)})
    if decoder.tie_word_embeddings:
        state.pop("llama_model.lm_head.weight", None)
    if cfg.template == "minigptv2":
        _merge_lora(state, proj)
    model = build_on(device, dtype, lambda: MiniGPT4ForConditionalGeneration(cfg), shard)
    assign_weights(model, state, f"MiniGPT-4 release in {folder}", shard)
    return model.eval(), load_tokenizer(files["llm"]), cfg
