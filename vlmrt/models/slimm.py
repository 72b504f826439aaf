"""SliMM: the Qwen2-VL vision tower (dynamic resolution, 2D rotary, 2x2 patch merger) + a Qwen2
decoder with M-RoPE + DeepStack (extra image-feature groups added to the hidden states of the
first decoder layers), on the three-stage contract.

Facts from ../shared/models/SPEC.md section 4; github MengLcool/SliMM (HEAD 18dfba4):
`slimm/model/slimm.py` (process_visual_embeddings), `vision_encoder/{dfn_vit,merger}.py`,
`language_model/qwen2vl.py` (the DeepStack loop); transformers' `qwen2_vl` (5.23: vision tower,
M-RoPE, get_rope_index, Qwen2VLImageProcessor's smart_resize and patch layout); DeepStack paper
arXiv 2406.04334. Module names are the release's legacy state-dict keys (`model.layers.0...`,
`visual.blocks.0...`, `visual.merger...`, tied `lm_head`), so loading is a strict key match.

```
 patch rows [N,1176] + image_grid_thw [I,3]      (or pixel_values [B,3,S,S], patchified here)
   └► visual.patch_embed (Conv3d as a matmul) ─► [N,1280]
   └► 32 blocks (2D rotary, attention within each image) ──taps (midlayers)──┐
   └► visual.merger: ln_q + 2x2 concat + mlp ─► image_features [.,N/4,D]     ▼
                     DeepStack mergers ─────────► deepstack_features [K,.,N/4,D]
 embed: image_features at <|image_pad|> slots; deepstack_features ─► deepstack_embeds [K,B,T,D]
 decode: M-RoPE position_ids [3,B,T]; before layer start+k (k < K): h += deepstack_embeds[k]
```

Dynamic in the graphs: the number of patch rows N and of images I (vision), the sequence (decoder).
Everything else is static: attention within an image is a block-diagonal mask built from
`image_grid_thw` with elementwise ops (cost O(N^2) over all images of a call), positions are index
arithmetic, no boolean-mask indexing, no data-dependent Python branches in a forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vlmrt.errors import VlmrtError
from vlmrt.models.layers import DecoderConfig, LlamaForCausalLM, attention_bias, keep_position
from vlmrt.models.slimm_vision import VisionConfig, VisionTower, patch_rows, split_cells
from vlmrt.processor import ChatTemplate, Processor, ProcessorSpec, image_to_pixels, load_image

QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")  # ids 151643..151656
ENDOFTEXT, IM_END, IMAGE_PAD = 151643, 151645, 151655
TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")
CHAT = ChatTemplate("<|im_start|>user\n{content}<|im_end|>\n", "<|im_start|>assistant\n{content}<|im_end|>\n",
                    "<|im_start|>assistant\n", "<|vision_start|><|image_pad|><|vision_end|>",
                    "<|im_start|>system\n{content}<|im_end|>\n", "You are a helpful assistant.")  # Qwen2-VL's
DEEPSTACK_TYPES = ("none", "v1", "midlayers", "efficient")

# The 0.5B releases name `custom_visual_model` and fetch its config from a hub at construction
# time; an offline loader carries it (menglc/DFN-Huge-Qwen2VL-7B/config.json, SPEC 4.3).
EMBEDDED_VISION = {"menglc/DFN-Huge-Qwen2VL-7B": VisionConfig()}


@dataclass(frozen=True)
class SliMMConfig:
    vision: VisionConfig
    decoder: DecoderConfig
    mrope_section: tuple[int, int, int] = (8, 12, 12)  # rotary frequencies per (t, h, w) axis; sums to head_dim/2
    deepstack: str = "none"  # merger variant (SPEC 4.3): none, v1, midlayers, efficient
    deepstack_taps: tuple[int, ...] = (8, 16, 24, 30)  # midlayers: ViT blocks whose *input* is tapped
    deepstack_start: int = 1  # local_features_start: the first decoder layer that receives a group
    deepstack_interval: int = 1  # local_features_interval: consecutive layers per group
    image_size: int = 448  # fixed presets: every image is resized to S x S; dynamic: the nominal [B,3,S,S] size
    dynamic: bool = True  # smart_resize within [min_pixels, max_pixels] (else the fixed S x S)
    min_pixels: int = 3136
    max_pixels: int = 802816  # 14*14*4*1024: at most 1024 image tokens (SliMM training script)
    pre_resize: bool = True  # qwen_vl_utils' first smart_resize to multiples of 28 (SPEC 4.5)

    def __post_init__(self):
        if self.deepstack not in DEEPSTACK_TYPES:
            raise VlmrtError(f"unknown deepstack type {self.deepstack!r}; one of {', '.join(DEEPSTACK_TYPES)}")
        if 2 * sum(self.mrope_section) != self.decoder.head_dim:
            raise VlmrtError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = "
                             f"{self.decoder.head_dim // 2}")

    @property
    def processor_patch(self) -> int:  # DeepStack-E's processor cells are 2x2 ViT patches (28 px)
        return self.vision.patch_size * (2 if self.deepstack == "efficient" else 1)

    @property
    def unit(self) -> int:  # image sides are multiples of this: 28 px (56 for DeepStack-E)
        return self.processor_patch * self.vision.spatial_merge_size

    @property
    def num_groups(self) -> int:  # K, the DeepStack groups
        m2 = self.vision.spatial_merge_size ** 2
        return {"none": 0, "v1": m2, "midlayers": len(self.deepstack_taps), "efficient": 4}[self.deepstack]

    @property
    def num_image_tokens(self) -> int:  # at the (nominal) size image_size x image_size
        return (self.image_size // self.unit) ** 2


_QWEN2_05B = DecoderConfig(vocab_size=151657, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                           intermediate_size=4864, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                           qkv_bias=True, tie_word_embeddings=True)
_QWEN2VL_2B = replace(_QWEN2_05B, vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12,
                      intermediate_size=8960)
PRESETS = {  # SPEC 4.6
    "slimm-qwen2-0.5b": SliMMConfig(VisionConfig(), _QWEN2_05B),
    "slimm-deepstackm-qwen2-0.5b": SliMMConfig(VisionConfig(), _QWEN2_05B, deepstack="midlayers"),
    "slimm-deepstacke-qwen2vl-2b": SliMMConfig(VisionConfig(), _QWEN2VL_2B, (16, 24, 24), deepstack="efficient",
                                               max_pixels=1003520),
    "slimm-tiny": SliMMConfig(
        VisionConfig(depth=3, embed_dim=32, num_heads=4, mlp_ratio=2.0),
        DecoderConfig(vocab_size=151657, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, rope_theta=1e6, max_position_embeddings=512, qkv_bias=True,
                      tie_word_embeddings=True),
        (2, 3, 3), deepstack="midlayers", deepstack_taps=(1, 2), image_size=84, dynamic=False, pre_resize=False),
}


# ----------------------------------------------------------------------------- decoder
class Qwen2VLDecoder(LlamaForCausalLM):
    """The Qwen2 decoder (q/k/v biases, tied embeddings) with M-RoPE and DeepStack additions.

    M-RoPE (transformers' Qwen2VLRotaryEmbedding): the head_dim/2 rotary frequencies are split
    `mrope_section` = (t, h, w) ways; frequency i turns with the position id of its axis.
    DeepStack (SliMM's CustomQwen2.forward, SPEC 4.4): before layer l, when start <= l < start + K *
    interval, hidden += deepstack_embeds[(l - start) // interval]; the embeds are zero at text
    positions, so this equals the release's masked addition at the image slots.
    """

    def __init__(self, cfg: SliMMConfig):
        super().__init__(cfg.decoder)
        self.mrope_section = cfg.mrope_section
        self.deepstack_start, self.deepstack_interval = cfg.deepstack_start, cfg.deepstack_interval

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [3,B,T] (or [B,T]: text only, all axes equal) -> cos, sin [B,T,hd]."""
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        hd = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, device=position_ids.device).float() / hd))
        parts, start = [], 0
        for axis, n in enumerate(self.mrope_section):
            parts.append(position_ids[axis].float()[..., None] * inv_freq[start:start + n])  # [B,T,n]
            start += n
        freqs = torch.cat(parts, dim=-1)  # [B,T,hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [B,T,hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def deepstack_group(self, layer: int, num_groups: int) -> int | None:
        k = layer - self.deepstack_start
        return k // self.deepstack_interval if 0 <= k < num_groups * self.deepstack_interval else None

    def forward(self, inputs_embeds, position_ids, attention_mask, cache_position, cache, deepstack_embeds=None,
                logits_at=None, causal_prefill: bool = False):
        """inputs_embeds [B,T,D], position_ids [3,B,T], attention_mask [B,S], cache_position [T] or [B,T],
        deepstack_embeds [K,B,T,D] (prefill only) -> logits [B,T,V] ([B,1,V] with `logits_at` [1]).
        `causal_prefill`: a fresh, unpadded prefill (vlmrt.models.layers.attention_bias)."""
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        mask = attention_bias(attention_mask, cache_position, inputs_embeds.dtype, causal_prefill)
        h = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            g = None if deepstack_embeds is None else self.deepstack_group(i, deepstack_embeds.shape[0])
            if g is not None:
                h = h + deepstack_embeds[g].to(h.dtype)
            h = layer(h, cos, sin, mask, cache_position, cache)
        return self.lm_head(self.model.norm(keep_position(h, logits_at)))


# ----------------------------------------------------------------------------- the model
def image_slots(input_ids: torch.Tensor, image_token_id: int, m: int):
    """The k-th placeholder of the batch (row-major) takes feature row k; placeholders beyond m and
    text take row m (a zero row the caller appends). Returns is_image [B,T], index [B,T]."""
    is_image = input_ids == image_token_id  # [B,T]
    count = is_image.flatten().long().cumsum(0).view_as(input_ids)  # placeholders so far
    is_image = is_image & (count <= m)
    return is_image, torch.where(is_image, count - 1, torch.full_like(count, m))


class SliMMForConditionalGeneration(Qwen2VLDecoder):
    """SliMM on the stage contract; as in the release, the decoder (`model.*`, `lm_head`) plus `visual`.

    Worked example (slimm-qwen2-0.5b): a 512x512 photo stays 504x504 after smart_resize (factor 28),
    i.e. a 36x36 grid of 14-px patches: the processor sends 1296 rows of 1176 values and
    image_grid_thw [[1,36,36]]; the prompt holds 324 `<|image_pad|>` ids between vision start/end and
    M-RoPE positions that give those 324 slots an 18x18 (h, w) grid. `encode_images` returns
    [1,324,896]; `embed` writes them over the 324 slots; `decode` runs the Qwen2 decoder. With
    DeepStack, vision also returns deepstack_features [4,1,324,896] and embed deepstack_embeds
    [4,B,T,896] (zero at text), added before decoder layers 1..4 at prefill.
    """

    image_token_id = IMAGE_PAD
    presets = PRESETS

    @staticmethod
    def is_release_folder(folder: Path) -> bool:
        cfg = folder / "config.json"
        if not (folder.is_dir() and cfg.is_file()):
            return False
        text = cfg.read_text(errors="replace")  # a raw look: a corrupt file is still ours to report
        return "SliMMForConditionalGeneration" in text or '"qwen2_vl"' in text

    def __init__(self, cfg: SliMMConfig):
        super().__init__(cfg)
        self.slimm_config = cfg
        self.visual = VisionTower(cfg.vision, cfg.decoder.hidden_size, cfg.deepstack, cfg.deepstack_taps)
        d = cfg.decoder
        self.num_layers, self.num_kv_heads, self.head_dim = d.num_layers, d.num_kv_heads, d.head_dim
        self.max_context = d.max_position_embeddings

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None):
        """Patch rows [N,P] with image_grid_thw [I,3] (any sizes) -> image_features [1,sum N_img,D];
        or pixel_values [B,3,H,W] (sides multiples of 28, 56 for DeepStack-E) -> [B,N_img,D].
        With DeepStack: a dict {image_features, deepstack_features [K,.,N_img,D]}."""
        cfg, v = self.slimm_config, self.slimm_config.vision
        if pixel_values.dim() == 4:
            if pixel_values.shape[-1] % cfg.unit or pixel_values.shape[-2] % cfg.unit:
                raise VlmrtError(f"image sides must be multiples of {cfg.unit}, got {list(pixel_values.shape[-2:])}")
            batch = pixel_values.shape[0]
            rows = patch_rows(pixel_values, v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
            grid = torch.tensor([1, pixel_values.shape[-2] // v.patch_size, pixel_values.shape[-1] // v.patch_size],
                                device=rows.device).expand(batch, 3)  # [B,3]
        else:
            if image_grid_thw is None:
                raise VlmrtError("patch rows [N,P] need image_grid_thw [I,3]; the SliMM processor makes both")
            rows, grid, batch = pixel_values, image_grid_thw.to(pixel_values.device).long(), 1
            if cfg.deepstack == "efficient":
                rows, grid = split_cells(rows, grid, v)
        main, groups = self.visual(rows, grid, batch)
        main = main.view(batch, -1, main.shape[-1])  # [B,N_img,D] or [1,sum N_img,D]
        if groups is None:
            return main
        return {"image_features": main, "deepstack_features": groups.view(groups.shape[0], batch, -1, main.shape[-1])}

    def embed(self, input_ids, image_features=None, deepstack_features=None):
        """input_ids [B,T] (+ image_features [.,N,D], deepstack_features [K,.,N,D]) -> inputs_embeds
        [B,T,D]; with DeepStack always {inputs_embeds, deepstack_embeds [K,B,T,D]}, zero at text
        (and all zero for text only), so eager and exported graphs give the same outputs."""
        if isinstance(image_features, dict):
            deepstack_features = image_features.get("deepstack_features", deepstack_features)
            image_features = image_features.get("image_features")
        embeds = self.model.embed_tokens(input_ids)  # [B,T,D]
        k, d = self.slimm_config.num_groups, embeds.shape[-1]
        if image_features is not None:
            feats = image_features.reshape(-1, d).to(embeds.dtype)  # [M,D]
            is_image, index = image_slots(input_ids, self.image_token_id, feats.shape[0])
            feats = torch.cat([feats, feats.new_zeros(1, d)])  # [M+1,D]: never empty
            embeds = torch.where(is_image[..., None], feats[index], embeds)
        if k == 0:
            return embeds
        if image_features is None or deepstack_features is None:
            return {"inputs_embeds": embeds, "deepstack_embeds": embeds.new_zeros(k, *embeds.shape)}
        deep = deepstack_features.reshape(k, -1, d).to(embeds.dtype)  # [K,M,D]
        deep = torch.cat([deep, deep.new_zeros(k, 1, d)], dim=1)[:, index]  # [K,B,T,D]; text -> zero row
        return {"inputs_embeds": embeds, "deepstack_embeds": deep}

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, cache, deepstack_embeds=None,
               logits_at=None, causal_prefill: bool = False):
        return self(inputs_embeds, position_ids, attention_mask, cache_position, cache, deepstack_embeds, logits_at,
                    causal_prefill)

    def export_io(self, stage: str, io):
        """Hook of vlmrt/export/onnx.py: patch rows + image_grid_thw for dynamic presets (one graph for
        every image size), M-RoPE positions [3,B,T], DeepStack axes."""
        cfg, ax = self.slimm_config, io.dynamic_axes
        if stage == "vision" and cfg.dynamic:
            px = io.inputs["pixel_values"]  # [2,3,S,S]
            g = cfg.image_size // cfg.processor_patch
            io.inputs = {"pixel_values": patch_rows(px, cfg.processor_patch, cfg.vision.spatial_merge_size,
                                                    cfg.vision.temporal_patch_size),
                         "image_grid_thw": torch.tensor([[1, g, g]] * px.shape[0], device=px.device)}
            ax.update({"pixel_values": {0: "patches"}, "image_grid_thw": {0: "images"},
                       "image_features": {1: "image_tokens"}})
        ax["deepstack_features"] = {1: "batch", 2: "image_tokens"} if not cfg.dynamic else {2: "image_tokens"}
        ax["deepstack_embeds"] = {1: "batch", 2: "sequence"}
        if stage == "decoder":
            io.inputs["position_ids"] = io.inputs["position_ids"][None].expand(3, -1, -1).contiguous()  # [3,B,T]
            ax["position_ids"] = {1: "batch", 2: "sequence"}
        return io

    @property
    def processor_spec(self) -> ProcessorSpec:
        return processor_spec(self.slimm_config)

    @staticmethod
    def synthetic_tokenizer(cfg: SliMMConfig):
        from vlmrt.tokenizer import build_synthetic_tokenizer

        special = {ENDOFTEXT + i: t for i, t in enumerate(QWEN2_SPECIAL)}
        return build_synthetic_tokenizer(cfg.decoder.vocab_size, special, bos=None, eos="<|im_end|>",
                                         unk="<|endoftext|>", pad="<|endoftext|>")


# ----------------------------------------------------------------------------- processing
MAX_IMAGES = 4  # per prompt: each its own <|vision_start|>..<|vision_end|> span and M-RoPE grid (Qwen2-VL's layout)


def processor_spec(cfg: SliMMConfig) -> ProcessorSpec:
    """The chat template, stop ids 151645/151643, and the batch hook's options."""
    v = cfg.vision
    options = {"dynamic": cfg.dynamic, "patch_size": cfg.processor_patch, "merge_size": v.spatial_merge_size,
               "temporal_patch_size": v.temporal_patch_size, "min_pixels": cfg.min_pixels,
               "max_pixels": cfg.max_pixels, "pre_resize": cfg.pre_resize}
    return ProcessorSpec(
        image_size=cfg.image_size, template=TEMPLATE, image_placeholder="<|image_pad|>",
        image_token_id=IMAGE_PAD, num_image_tokens=cfg.num_image_tokens, add_bos=False,
        stop_token_ids=((IM_END,), (ENDOFTEXT,)), batch_hook="vlmrt.models.slimm:build_batch",
        hook_options=tuple(options.items()), chat=CHAT, max_images=MAX_IMAGES,
    )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's rule (transformers qwen2_vl `smart_resize`): sides rounded to multiples of
    `factor`, area brought into [min_pixels, max_pixels], aspect ratio kept as far as possible."""
    if max(height, width) / min(height, width) > 200:
        raise VlmrtError(f"image of {width}x{height} px: the aspect ratio must be below 200 (Qwen2-VL's limit); "
                         "crop it")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    h, w = max(h, factor), max(w, factor)
    if h * w > max_pixels:  # a thin image whose short side was raised to `factor` (the rule alone overshoots)
        if h <= w:
            w = max(factor, max_pixels // h // factor * factor)
        else:
            h = max(factor, max_pixels // w // factor * factor)
    return h, w


def image_pixels(img, spec: ProcessorSpec) -> torch.Tensor:
    """RGB PIL image -> normalized pixels [3,H,W]: S x S (fixed presets) or dynamic resolution."""
    from PIL import Image

    o = dict(spec.hook_options)
    if not o["dynamic"]:
        return image_to_pixels(img, spec)
    if o["pre_resize"]:  # qwen_vl_utils.fetch_image, which SliMM's inference runs first (PIL's default filter)
        h, w = smart_resize(img.height, img.width, 28, 4 * 28 * 28, 16384 * 28 * 28)
        img = img if (h, w) == (img.height, img.width) else img.resize((w, h))
    h, w = smart_resize(img.height, img.width, o["patch_size"] * o["merge_size"], o["min_pixels"], o["max_pixels"])
    img = img.resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3,H,W]
    return (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]


def mrope_position_ids(input_ids, attention_mask, grids, merge: int, image_token_id: int = IMAGE_PAD) -> torch.Tensor:
    """M-RoPE position ids [3,B,T] (Qwen2-VL's get_rope_index, images only): text counts up on all
    three axes; an image's N = t*h*w/merge^2 slots get (t, h, w) grid indices offset by the text
    before it; the text after restarts at the image's largest position + 1. Padding gets 1.

    grids: (t, h, w) in patches per image, in batch order (row-major over the placeholders)."""
    out = torch.ones(3, *input_ids.shape, dtype=torch.long)
    it = iter(grids)
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        ids, cols, cur, i = input_ids[row][keep].tolist(), [], 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                j = next((k for k in range(i, len(ids)) if ids[k] == image_token_id), len(ids))
                cols.append(torch.arange(j - i).expand(3, -1) + cur)
                cur, i = cur + j - i, j
                continue
            t, h, w = next(it, (0, 0, 0))
            h, w = h // merge, w // merge
            if t * h * w == 0:
                raise VlmrtError("more image placeholders than images in the batch")
            grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            cols.append(torch.stack(grid).reshape(3, -1) + cur)  # [3,t*h*w]
            cur, i = cur + max(t, h, w), i + t * h * w
        out[:, row, keep] = torch.cat(cols, dim=1)
    return out


def build_batch(processor: Processor, images: list, prompts: list[str]) -> dict:
    """The SliMM processor (ProcessorSpec.batch_hook): per image, pixels at its own resolution; the
    prompt with grid/merge^2 `<|image_pad|>` ids per image (a row's image may be a list: several, in
    a batch of one row); M-RoPE position_ids [3,B,T]; patch rows [N,P] +
    image_grid_thw [B,3] (dynamic presets) or pixel_values [B,3,S,S] (fixed presets). Left-padded."""
    spec = processor.spec
    o = dict(spec.hook_options)
    p, m = o["patch_size"], o["merge_size"]
    per_row = [im if isinstance(im, list) else [im] for im in images]  # a list: one prompt's several images
    pixels = [image_pixels(load_image(im), spec) for row in per_row for im in row]  # each [3,H,W]
    grids = [(1, x.shape[1] // p, x.shape[2] // p) for x in pixels]
    rows, next_grid = [], iter(grids)
    enc = lambda s: processor.tokenizer(s, add_special_tokens=False).input_ids if s else []
    for prompt, row in zip(prompts, per_row):
        parts = processor.render(prompt).split(spec.image_placeholder)
        if len(parts) != len(row) + 1:
            raise VlmrtError(f"the prompt must not contain {spec.image_placeholder}; the image goes where the "
                             "template puts it")
        ids = enc(parts[0])
        for part in parts[1:]:  # each image's grid/merge^2 slots, in order
            t, h, w = next(next_grid)
            ids += [spec.image_token_id] * (t * h * w // (m * m)) + enc(part)
        rows.append(ids)
    n = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), n), processor.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, n - len(r):], attention_mask[i, n - len(r):] = torch.tensor(r), 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "position_ids": mrope_position_ids(input_ids, attention_mask, grids, m, spec.image_token_id)}
    if not o["dynamic"]:
        return {**batch, "pixel_values": torch.stack(pixels)}
    patches = [patch_rows(x[None], p, m, o["temporal_patch_size"]) for x in pixels]
    return {**batch, "pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids)}


# ----------------------------------------------------------------------------- loading the release
def _release_deepstack(hf: dict, extras: dict, state: dict, embed_dim: int) -> str:
    """The merger variant, from the weights; a config that says otherwise is an error."""
    if any(k.startswith("visual.merger.mlp_deepstack_list.") for k in state):
        found = "midlayers"
    elif "visual.merger.mlp_deepstack.0.weight" in state:
        found = "efficient" if state["visual.merger.mlp_deepstack.0.weight"].shape[1] != embed_dim else "v1"
    else:
        found = "none"
    src = next((d for d in (hf, extras.get("generation_config.json", {})) if "use_deepstack" in d), None)
    if src is not None:
        declared = {"deepstack": "v1"}.get(src.get("deepstack_type", "v1"), src.get("deepstack_type", "v1"))
        declared = declared if src["use_deepstack"] else "none"
        if declared != found:
            raise VlmrtError(f"config says deepstack {declared!r} but the weights hold the {found!r} merger")
    return found


def _release_vision(hf: dict) -> VisionConfig:
    if isinstance(hf.get("vision_config"), dict):
        return VisionConfig.from_hf(hf["vision_config"])
    hub_id = hf.get("custom_visual_model")
    if hub_id in EMBEDDED_VISION:
        return EMBEDDED_VISION[hub_id]
    raise VlmrtError(f"config.json has no vision_config and its custom_visual_model {hub_id!r} is not one vlmrt "
                     f"carries ({', '.join(EMBEDDED_VISION)}); add a vision_config to config.json")


def config_from_release(hf: dict, extras: dict, state: dict) -> SliMMConfig:
    """Read config.json (SliMM's qwen2 layout or a qwen2_vl one, legacy flat or nested `text_config`),
    generation_config.json and preprocessor_config.json once; the weights decide the merger."""
    text = {**hf, **hf.get("text_config", {})}
    tie = bool(text.get("tie_word_embeddings", False)) or "lm_head.weight" not in state
    decoder = replace(DecoderConfig.from_hf(text), qkv_bias=True, tie_word_embeddings=tie)
    vision = _release_vision(hf)
    vision = replace(vision, spatial_merge_size=hf.get("spatial_merge_size", vision.spatial_merge_size),
                     temporal_patch_size=hf.get("temporal_patch_size", vision.temporal_patch_size))
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    section = rope.get("mrope_section") or ([16, 24, 24] if 2 * 64 <= decoder.head_dim else [8, 12, 12])
    kind = _release_deepstack(hf, extras, state, vision.embed_dim)
    pre = extras.get("preprocessor_config.json", {})
    size = pre.get("size") or {}
    cfg = SliMMConfig(
        vision, decoder, tuple(section), deepstack=kind,
        deepstack_taps=tuple(hf.get("deepstack_feature_idxs", (8, 16, 24, 30))),  # hard-coded in the release
        deepstack_start=hf.get("local_features_start", 1), deepstack_interval=hf.get("local_features_interval", 1),
        min_pixels=pre.get("min_pixels") or size.get("min_pixels") or size.get("shortest_edge") or 3136,
        max_pixels=pre.get("max_pixels") or size.get("max_pixels") or size.get("longest_edge")
        or (1003520 if kind == "efficient" else 802816),  # the top-level value first (SPEC 4.5)
    )
    if pre.get("patch_size", cfg.processor_patch) != cfg.processor_patch:
        raise VlmrtError(f"preprocessor_config.json has patch_size {pre['patch_size']}, but this {kind} model "
                         f"needs {cfg.processor_patch}")
    return cfg


def release_state(state: dict) -> dict:
    """Legacy key names: newer transformers' `model.language_model.*` -> `model.*`, `model.visual.*`
    -> `visual.*`; rotary buffers (old saves) are dropped."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        if not k.endswith("rotary_emb.inv_freq"):
            out[k] = v
    return out


def _release_tokenizer(folder: Path):
    from vlmrt.tokenizer import load_tokenizer

    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        return load_tokenizer(folder)
    if not ((folder / "vocab.json").exists() and (folder / "merges.txt").exists()):
        raise VlmrtError(f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt")
    from transformers import AutoTokenizer

    try:  # config.json's model_type (qwen2 / qwen2_vl) picks Qwen2's byte-level BPE
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise VlmrtError(f"cannot load the tokenizer in {folder}: {e.__class__.__name__}: {e}") from None


def load_release(folder: str | Path, device: torch.device, dtype: torch.dtype, shard=None):
    """Load a SliMM release folder: config.json, model.safetensors (or shards), the tokenizer, and
    optionally generation_config.json and preprocessor_config.json. No network, no remote code.

    Returns (model, tokenizer, config). Errors name the file or the key at fault.
    """
    from vlmrt.weights import assign_weights, build_on, read_hf_weights, read_json

    folder = Path(folder)
    hf = read_json(folder / "config.json")
    optional = ("generation_config.json", "preprocessor_config.json")
    extras = {f: read_json(folder / f) for f in optional if (folder / f).exists()}
    state = release_state(read_hf_weights(folder, lazy=shard is not None))
    cfg = config_from_release(hf, extras, state)
    if cfg.decoder.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tokenizer = _release_tokenizer(folder)
    model = build_on(device, dtype, lambda: SliMMForConditionalGeneration(cfg), shard)
    assign_weights(model, state, f"SliMM release in {folder}", shard)
    return model.eval(), tokenizer, cfg
