"""MiniCPM-V-2: SigLIP-so400m (`vpm`) + perceiver resampler + MiniCPM-2.4B (`llm`), with the
release's image slicing, on the three-stage contract.

Facts from ../shared/models/SPEC.md section 2, restated there from the `openbmb/MiniCPM-V-2` remote
code (commit 3d0e971: modeling_minicpmv.py, resampler.py, modeling_minicpm.py), timm 0.9.10
`vit_so400m_patch14_siglip_384` and `resample_abs_pos_embed`, and PyTorch's antialiased resize
(`_compute_weights_aa` in aten UpSampleKernel). Module names are the release's key names
(`vpm.blocks.0.attn.qkv`, `resampler.attn.in_proj_weight`, `llm.model.layers.0...`): loading is a
strict key match with no renaming.

One image becomes 1 + rows*cols chunks (an overview plus a grid of slices, SPEC 2.3), each of
about S x S pixels but with its own patch grid. The release encodes chunk by chunk; we batch them:

```
 image ─► slice_image: source + cells (row-major), sides multiples of 14, ~S² px each
   each chunk ─► its gh x gw patches packed in raster order into a fixed canvas of
                 canvas_rows x S/14 patches (the rest: padding, masked) ─► chunks padded to a bucket K
 pixel_values [B,3,Hc,K*Wc]   patch_coords [B,K*L,2] (row, col; -1 = padding)
                              patch_pos_weights [B,K*L,2*G]  (antialiased bicubic weights, per token)
   └► K canvases per row ─► [N=B*K,3,Hc,Wc]
   └► vpm: patch_embed ─► + pos_embed (G x G table resized per token) ─► 26 blocks (key mask) ─► norm
   └► resampler: 64 queries x-attend ln_kv(kv_proj(x)) + sincos(row, col) (key mask) ─► ln_post ─► @ proj
   └► image_features [B,K*64,D]: row b's chunk j fills its j-th `<image>` block of 64 `<unk>`
 embed: embed_tokens(ids) * scale_emb, then the (unscaled) features over the `<unk>` placeholders
 decode: Llama decoder, each sub-layer output * scale_depth/sqrt(layers), logits = lm_head(h / (D/256))
```
Masked padding makes the batch numerically the release's per-chunk encode (up to summation
order); only chunks with more patches than the canvas holds (aspect beyond ~1:50) are shrunk.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmrt.errors import VlmrtError
from vlmrt.models.layers import DecoderConfig, LlamaForCausalLM, PreNormViTBlock, Resampler, sincos_2d_at, splice_image_features
from vlmrt.processor import ChatTemplate, ProcessorSpec

IMAGE_TOKEN_ID = 0  # `<unk>`: the release fills the <unk> runs between <image> and </image>
MARKUP = ("<image>", "</image>", "<slice>", "</slice>")
SPECIAL_TOKENS = {0: "<unk>", 1: "<s>", 2: "</s>", 101: "<image>", 102: "</image>", 103: "<ref>", 104: "</ref>",
                  105: "<box>", 106: "</box>", 107: "<quad>", 108: "</quad>", 109: "<point>", 110: "</point>",
                  111: "<slice>", 112: "</slice>"}  # SPEC 2.6
TEMPLATE = "<用户>(<image>./</image>)\n{prompt}<AI>"  # the placeholder is the July 2024 processor's marker
PLACEHOLDER = "(<image>./</image>)"
MAX_IMAGES = 4  # per prompt, each with its own slices (the July 2024 processor's markers, one per image)
CHAT = ChatTemplate("<用户>{content}", "<AI>{content}", "<AI>", PLACEHOLDER + "\n")  # no system role (SPEC 2.6)


@dataclass(frozen=True)
class SiglipConfig:
    width: int = 1152
    depth: int = 26  # so400m has 27 blocks; the release drops the last (drop_vision_last_layer)
    heads: int = 16
    mlp_hidden: int = 4304  # int(1152 * 3.7362)
    patch_size: int = 14
    pos_grid: int = 27  # the learned pos_embed is a 27 x 27 table (384 px / 14)
    eps: float = 1e-6


@dataclass(frozen=True)
class SliceConfig:
    """What the processor needs (plain data: it travels in ProcessorSpec.hook_options)."""

    scale_resolution: int = 448  # S: every chunk is resized to about S x S pixels
    patch_size: int = 14
    max_slices: int = 9
    pos_grid: int = 27
    query_num: int = 64  # image tokens per chunk
    canvas_rows: int = 35  # canvas = canvas_rows x S/p patches (1120 at S 448: every chunk up to aspect 1:50)
    chunk_buckets: tuple[int, ...] = (1, 3, 5, 7, 10)  # chunks per image are padded up to one of these

    @property
    def canvas_cols(self) -> int:
        return self.scale_resolution // self.patch_size

    @property
    def capacity(self) -> int:
        return self.canvas_rows * self.canvas_cols

    @classmethod
    def from_options(cls, options) -> "SliceConfig":
        d = dict(options)
        d["chunk_buckets"] = tuple(d["chunk_buckets"])
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class MiniCPMVConfig:
    vision: SiglipConfig
    decoder: DecoderConfig  # residual_multiplier = scale_depth/sqrt(layers), logits_divisor = hidden/dim_model_base
    query_num: int = 64
    resampler_heads: int = 18  # embed_dim // 128 in the release
    scale_emb: float = 12.0  # text embeddings only
    scale_resolution: int = 448
    max_slices: int = 9
    canvas_rows: int = 35
    chunk_buckets: tuple[int, ...] = (1, 3, 5, 7, 10)

    @property
    def slicing(self) -> SliceConfig:
        v = self
        return SliceConfig(v.scale_resolution, v.vision.patch_size, v.max_slices, v.vision.pos_grid, v.query_num,
                           v.canvas_rows, v.chunk_buckets)


def _minicpm_decoder(vocab, hidden, layers, heads, inter, ctx) -> DecoderConfig:
    """MiniCPM's scalings as DecoderConfig knobs (SPEC 2.5): scale_depth 1.4, dim_model_base 256."""
    return DecoderConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                         intermediate_size=inter, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=ctx,
                         residual_multiplier=1.4 / math.sqrt(layers), logits_divisor=hidden / 256)


PRESETS = {
    "minicpm-v-2": MiniCPMVConfig(SiglipConfig(), _minicpm_decoder(122753, 2304, 40, 36, 5760, 4096)),
    "minicpm-v-tiny": MiniCPMVConfig(
        SiglipConfig(width=32, depth=2, heads=4, mlp_hidden=64, pos_grid=3),
        _minicpm_decoder(4096, 32, 2, 4, 64, 1024),
        query_num=8, resampler_heads=4, scale_resolution=56, canvas_rows=5,
    ),
}


# ----------------------------------------------------------------------------- vision tower (timm names)
class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)  # [Q;K;V]
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x, mask):
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B,H,N,hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)


class SiglipVisionTower(nn.Module):
    """timm `forward_features` of so400m without its head: patches + resized pos_embed, blocks, norm."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.pos_grid ** 2, cfg.width))
        self.blocks = nn.ModuleList(  # MLP: exact (erf) GELU, as timm builds so400m
            PreNormViTBlock(cfg.width, cfg.eps, SiglipAttention(cfg), cfg.mlp_hidden) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.pos_grid = cfg.pos_grid

    def forward(self, pixel_values, pos_weights, valid):
        """pixel_values [N,3,H,W], pos_weights [N,L,2G], valid [N,L] bool -> [N,L,W], L = (H/p)(W/p)."""
        x = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)  # [N,L,W]
        x = x + self.resampled_pos_embed(pos_weights).to(x.dtype)
        mask = valid[:, None, None, :]  # [N,1,1,L]: padding patches are never attended to
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)

    def resampled_pos_embed(self, weights):
        """Token l gets sum_ab rows[l,a] cols[l,b] table[a,b]: timm's resize of the G x G table to the
        chunk's grid (fp32, as timm), evaluated at the token's own row and column."""
        rows, cols = weights.float().split(self.pos_grid, dim=-1)  # [N,L,G] each
        outer = (rows[..., :, None] * cols[..., None, :]).flatten(-2)  # [N,L,G*G]
        return outer @ self.pos_embed[0].float()  # [N,L,W]


class MiniCPMVResampler(Resampler):
    """The shared resampler plus MiniCPM-V's own `ln_post` and `proj` (x @ proj, no bias)."""

    def __init__(self, cfg: MiniCPMVConfig):
        d = cfg.decoder.hidden_size
        super().__init__(cfg.query_num, d, cfg.resampler_heads, cfg.vision.width)
        self.ln_post = nn.LayerNorm(d, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(d, d))

    def forward(self, x, key_pos, key_mask):
        return self.ln_post(super().forward(x, key_pos, key_mask)) @ self.proj  # [N,Q,D]


# ----------------------------------------------------------------------------- per-chunk inputs
def _keys_cubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def antialias_bicubic_weights(out_size: int, in_size: int) -> tuple[tuple[float, ...], ...]:
    """[out][in] weights of `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`
    along one axis (PyTorch `_compute_weights_aa`): Keys' cubic with a = -0.5, stretched by the
    scale when shrinking, normalised per output. Also an upscale differs from antialias=False
    (a = -0.75, clamped borders) — timm always passes antialias=True."""
    scale = in_size / out_size
    support, inv = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    table = []
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        w = [0.0] * in_size
        for j in range(lo, hi):
            w[j] = _keys_cubic((j - center + 0.5) * inv)
        total = sum(w)
        table.append(tuple(x / total for x in w) if total else tuple(w))
    return tuple(table)


def chunk_inputs(gh: int, gw: int, pos_grid: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A gh x gw chunk in a canvas of `capacity` patches -> patch_coords [capacity,2] (row, col; -1
    for padding) and patch_pos_weights [capacity,2*pos_grid] (row weights, then column weights)."""
    n = gh * gw
    rows, cols = [i // gw for i in range(n)], [i % gw for i in range(n)]
    coords = torch.full((capacity, 2), -1.0)
    coords[:n] = torch.tensor([rows, cols], dtype=torch.float32).T
    wr, wc = antialias_bicubic_weights(gh, pos_grid), antialias_bicubic_weights(gw, pos_grid)
    weights = torch.zeros(capacity, 2 * pos_grid)
    weights[:n] = torch.tensor([wr[r] + wc[c] for r, c in zip(rows, cols)], dtype=torch.float32).reshape(n, -1)
    return coords, weights


# ----------------------------------------------------------------------------- the model
class MiniCPMVForConditionalGeneration(nn.Module):
    """MiniCPM-V-2 on the stage contract (see vlmrt/stages.py).

    Worked example (minicpm-v-2): a 1024x768 photo and "What is this?" give grid [2,2]: 5 chunks
    (source 518x392 and four 518x392 cells), bucket K = 5. The prompt renders to
    `<s><用户><image>{64 x <unk>}</image><slice><image>..</image><image>..</image>\\n<image>..</image>`
    `<image>..</image></slice>\\nWhat is this?<AI>`; `encode_images` turns pixel_values [1,3,490,2240]
    (+ patch_coords, patch_pos_weights) into image_features [1,320,2304]; `embed` writes them over
    the 320 `<unk>` ids in order. A plain [B,3,H,W] without the extra inputs is one chunk per row at
    its own grid, as the release encodes a single image.
    """

    image_token_id = IMAGE_TOKEN_ID
    presets = PRESETS

    @staticmethod
    def is_release_folder(folder: Path) -> bool:
        """A folder whose config.json names the MiniCPMV architecture."""
        config = folder / "config.json"
        return folder.is_dir() and config.is_file() and '"MiniCPMV"' in config.read_text(errors="replace")

    def __init__(self, cfg: MiniCPMVConfig):
        super().__init__()
        self.config = cfg
        self.vpm = SiglipVisionTower(cfg.vision)
        self.resampler = MiniCPMVResampler(cfg)
        self.llm = LlamaForCausalLM(cfg.decoder)
        d = cfg.decoder
        self.num_layers, self.num_kv_heads, self.head_dim = d.num_layers, d.num_kv_heads, d.head_dim
        self.max_context = d.max_position_embeddings

    def encode_images(self, pixel_values, patch_coords=None, patch_pos_weights=None) -> torch.Tensor:
        """pixel_values [B,3,Hc,K*Wc] (+ patch_coords [B,K*L,2], patch_pos_weights [B,K*L,2G]) ->
        image_features [B,K*Q,D]. Without the extra inputs: [B,3,H,W] is one chunk per row."""
        b, c, h, w = pixel_values.shape
        p = self.config.vision.patch_size
        if patch_coords is None:  # from shapes only (constants in an exported graph), broadcast over rows
            coords, weights = chunk_inputs(h // p, w // p, self.config.vision.pos_grid, (h // p) * (w // p))
            coords, weights = coords[None].to(pixel_values.device), weights[None].to(pixel_values.device)  # [1,L,..]
            k = 1
        else:
            k = w // (self.config.slicing.canvas_cols * p)
            coords = patch_coords.to(pixel_values.device).reshape(b * k, -1, 2)  # [N,L,2]; runtimes may pass CPU tensors
            weights = patch_pos_weights.to(pixel_values.device).reshape(b * k, coords.shape[1], -1)  # [N,L,2G]
        x = pixel_values.view(b, c, h, k, w // k).permute(0, 3, 1, 2, 4).reshape(b * k, c, h, w // k)  # [N,3,Hc,Wc]
        first = torch.arange(coords.shape[1], device=coords.device) == 0
        valid = (coords[..., 0] >= 0) | first  # [N,L]; a padding chunk keeps one key (no empty softmax)
        x = self.vpm(x, weights, valid)  # [N,L,W]
        key_pos = sincos_2d_at(coords[..., 0].clamp(min=0), coords[..., 1].clamp(min=0), self.config.decoder.hidden_size)
        feats = self.resampler(x, key_pos, valid)  # [N,Q,D]
        return feats.reshape(b, k * feats.shape[1], feats.shape[2])

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B,T] (+ image_features [B,N,D]) -> inputs_embeds [B,T,D]; only text is scaled."""
        embeds = self.llm.model.embed_tokens(input_ids) * self.config.scale_emb
        if image_features is None:
            return embeds
        return splice_image_features(embeds, input_ids, image_features, self.image_token_id)

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, cache, logits_at=None,
               causal_prefill: bool = False) -> torch.Tensor:
        return self.llm(inputs_embeds, position_ids, attention_mask, cache_position, cache, logits_at, causal_prefill)

    def export_io(self, stage: str, io):
        """Hook of vlmrt/export/onnx.py: the vision graph takes packed chunks and their per-patch
        inputs; the example is 2 rows x 2 chunks (a full grid and a smaller one), and the canvas
        width and patch axes are dynamic (K = width / canvas width varies per batch)."""
        if stage != "vision":
            return io
        px, s = io.inputs["pixel_values"], self.config.slicing
        chunks = [chunk_inputs(g, g, s.pos_grid, s.capacity) for g in (s.canvas_cols, s.canvas_cols - 1)]
        h, w = s.canvas_rows * s.patch_size, s.canvas_cols * s.patch_size
        gen = torch.Generator().manual_seed(0)
        io.inputs = {
            "pixel_values": torch.randn(2, 3, h, 2 * w, generator=gen).to(px.device, px.dtype),  # [2,3,Hc,2*Wc]
            "patch_coords": torch.cat([c for c, _ in chunks])[None].repeat(2, 1, 1).to(px.device),  # [2,2L,2]
            "patch_pos_weights": torch.cat([wt for _, wt in chunks])[None].repeat(2, 1, 1).to(px.device),  # [2,2L,2G]
        }
        io.dynamic_axes.update({"pixel_values": {0: "batch", 3: "canvas_width"}, "patch_coords": {0: "batch", 1: "patches"},
                                "patch_pos_weights": {0: "batch", 1: "patches"}})
        k = max(s.chunk_buckets)  # static exports: the largest chunk bucket (padding chunks are ignored)
        io.static_sizes = {"canvas_width": k * w, "patches": k * s.capacity}
        return io

    @property
    def processor_spec(self) -> ProcessorSpec:
        cfg = self.config
        return ProcessorSpec(
            image_size=cfg.scale_resolution, template=TEMPLATE, image_placeholder=PLACEHOLDER,
            image_token_id=self.image_token_id, num_image_tokens=cfg.query_num,
            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), stop_token_ids=((2,),),
            batch_hook="vlmrt.models.minicpmv:build_batch", hook_options=tuple(asdict(cfg.slicing).items()), chat=CHAT,
            max_images=MAX_IMAGES,
        )

    @staticmethod
    def synthetic_tokenizer(cfg: MiniCPMVConfig):
        from vlmrt.tokenizer import build_synthetic_tokenizer

        return build_synthetic_tokenizer(cfg.decoder.vocab_size, SPECIAL_TOKENS, bos="<s>", eos="</s>")


# ----------------------------------------------------------------------------- slicing (SPEC 2.3)
def ensure_divide(length: float, p: int) -> int:
    return max(round(length / p) * p, p)


def best_resize(w: float, h: float, s: SliceConfig, allow_upscale: bool) -> tuple[int, int]:
    """The release's find_best_resize: keep the aspect, area about S², sides multiples of p."""
    if w * h > s.scale_resolution ** 2 or allow_upscale:
        r = w / h
        h = int(s.scale_resolution / math.sqrt(r))
        w = int(h * r)
    return ensure_divide(w, s.patch_size), ensure_divide(h, s.patch_size)


def plan_slices(width: int, height: int, s: SliceConfig):
    """(source size, grid (cols, rows) or None, cell size or None), sizes as (w, h), by the
    release's rule: e.g. 1024x768 -> (518,392), [2,2], (518,392)."""
    multiple = min(math.ceil(width * height / s.scale_resolution ** 2), s.max_slices)
    if multiple <= 1:
        return best_resize(width, height, s, allow_upscale=True), None, None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= s.max_slices]
    grids = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
    log_ratio = math.log(width / height)
    grid = min(grids, key=lambda g: abs(log_ratio - math.log(g[0] / g[1])))  # first minimum wins
    cols, rows = grid
    cell = best_resize(ensure_divide(width, cols) / cols, ensure_divide(height, rows) / rows, s, allow_upscale=True)
    return best_resize(width, height, s, allow_upscale=False), grid, cell


def fit_canvas(size: tuple[int, int], s: SliceConfig) -> tuple[int, int]:
    """Shrink a chunk whose patch grid exceeds the canvas (only aspect ratios beyond ~1:50)."""
    gw, gh = size[0] // s.patch_size, size[1] // s.patch_size
    if gw * gh <= s.capacity:
        return size
    f = math.sqrt(s.capacity / (gw * gh))
    if gw >= gh:
        gh = max(1, int(gh * f))
        gw = min(gw, s.capacity // gh)
    else:
        gw = max(1, int(gw * f))
        gh = min(gh, s.capacity // gw)
    return gw * s.patch_size, gh * s.patch_size


def slice_image(img, s: SliceConfig):
    """RGB PIL image -> ([source, cell(0,0), cell(0,1), ...], grid or None), PIL bicubic as the release."""
    from PIL import Image

    source, grid, cell = plan_slices(img.width, img.height, s)
    chunks = [img.resize(fit_canvas(source, s), Image.BICUBIC)]
    if grid is not None:
        (cols, rows), (cw, ch) = grid, fit_canvas(cell, s)
        refined = img.resize((cw * cols, ch * rows), Image.BICUBIC)
        chunks += [refined.crop((c * cw, r * ch, (c + 1) * cw, (r + 1) * ch)) for r in range(rows) for c in range(cols)]
    return chunks, grid


def image_markup(grid, query_num: int) -> str:
    """`<image>` + query_num `<unk>` + `</image>`, then for a grid `<slice>` rows joined by \\n `</slice>`."""
    one = "<image>" + "<unk>" * query_num + "</image>"
    if grid is None:
        return one
    cols, rows = grid
    return one + "<slice>" + "\n".join(one * cols for _ in range(rows)) + "</slice>"


def pack_chunk(img, s: SliceConfig, spec: ProcessorSpec):
    """One chunk -> canvas [3,Hc,Wc] (its patches in raster order, then zeros), coords, weights."""
    p, gw, gh = s.patch_size, img.width // s.patch_size, img.height // s.patch_size
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3,gh*p,gw*p]
    x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    patches = x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p)  # raster order
    canvas = torch.zeros(s.capacity, 3, p, p)
    canvas[: gh * gw] = patches
    canvas = canvas.view(s.canvas_rows, s.canvas_cols, 3, p, p).permute(2, 0, 3, 1, 4)  # [3,R,p,C,p]
    coords, weights = chunk_inputs(gh, gw, s.pos_grid, s.capacity)
    return canvas.reshape(3, s.canvas_rows * p, s.canvas_cols * p), coords, weights


def _prompt_ids(processor, prompt: str, grids: list, n_chunks: int, s: SliceConfig) -> list[int]:
    """The rendered prompt's ids, its k-th image placeholder written as the k-th image's markup."""
    spec, tok = processor.spec, processor.tokenizer
    if any(m in prompt for m in (*MARKUP, "<unk>")):
        raise VlmrtError("the prompt contains MiniCPM-V image markup (<image>, </image>, <slice>, </slice>, <unk>); remove it")
    parts = processor.render(prompt).split(spec.image_placeholder)
    if len(parts) != len(grids) + 1:
        raise VlmrtError(f"the prompt places {len(parts) - 1} images but {len(grids)} were given")
    text = parts[0] + "".join(image_markup(g, s.query_num) + p for g, p in zip(grids, parts[1:]))
    bos = [tok.bos_token_id] if spec.add_bos and tok.bos_token_id is not None else []
    ids = bos + tok(text, add_special_tokens=False).input_ids
    found = sum(i == spec.image_token_id for i in ids)
    if found != n_chunks * s.query_num:
        raise VlmrtError(f"the tokenizer turned the image markup into {found} placeholders, expected "
                         f"{n_chunks * s.query_num}; it lacks MiniCPM-V's special tokens (<image>, <slice>, <unk>)")
    return ids


def build_batch(processor, images: list, prompts: list[str]) -> dict:
    """The processor hook (ProcessorSpec.batch_hook): slice every image, pack and pad its chunks to
    a common bucket K, write the markup. Returns input_ids, attention_mask [B,T] (left-padded),
    pixel_values [B,3,Hc,K*Wc], patch_coords [B,K*L,2], patch_pos_weights [B,K*L,2G]."""
    from vlmrt.processor import load_image

    s = SliceConfig.from_options(processor.spec.hook_options)
    if not images:
        raise VlmrtError("no images given; pass at least one image")
    if isinstance(images[0], list):  # one prompt, several images
        return _several_images(processor, images[0], prompts[0], s)
    rows, packed = [], []
    for image, prompt in zip(images, prompts):
        chunks, grid = slice_image(load_image(image), s)
        rows.append(_prompt_ids(processor, prompt, [grid], len(chunks), s))
        packed.append([pack_chunk(c, s, processor.spec) for c in chunks])
    return {**processor.left_pad(rows), **_pack(packed, s)}


def _several_images(processor, images: list, prompt, s: SliceConfig) -> dict:
    """One prompt with N images: input_ids [1,T] with each image's markup in its place, the images as
    N vision rows (pixel_values [N,3,Hc,K*Wc] ...) and image_tokens [N] (real chunks x query_num)."""
    from vlmrt.processor import load_image

    sliced = [slice_image(load_image(im), s) for im in images]
    ids = _prompt_ids(processor, prompt, [g for _, g in sliced], sum(len(c) for c, _ in sliced), s)
    packed = [[pack_chunk(c, s, processor.spec) for c in chunks] for chunks, _ in sliced]
    counts = torch.tensor([len(chunks) * s.query_num for chunks, _ in sliced])
    return {**processor.left_pad([ids]), **_pack(packed, s), "image_tokens": counts}


def _pack(packed: list, s: SliceConfig) -> dict:
    """Chunks per vision row -> padded to a common bucket K: pixel_values [R,3,Hc,K*Wc],
    patch_coords [R,K*L,2], patch_pos_weights [R,K*L,2G]."""
    most = max(len(c) for c in packed)
    k = min((n for n in s.chunk_buckets if n >= most), default=most)  # static shapes: few K values
    p = s.patch_size
    pad = (torch.zeros(3, s.canvas_rows * p, s.canvas_cols * p), torch.full((s.capacity, 2), -1.0),
           torch.zeros(s.capacity, 2 * s.pos_grid))
    padded = [c + [pad] * (k - len(c)) for c in packed]
    return {
        "pixel_values": torch.stack([torch.cat([c[0] for c in row], dim=2) for row in padded]),  # [B,3,Hc,K*Wc]
        "patch_coords": torch.stack([torch.cat([c[1] for c in row]) for row in padded]),  # [B,K*L,2]
        "patch_pos_weights": torch.stack([torch.cat([c[2] for c in row]) for row in padded]),  # [B,K*L,2G]
    }


# ----------------------------------------------------------------------------- loading the release
def config_from_release(hf: dict, state: dict, folder) -> MiniCPMVConfig:
    """config.json (read once, here) plus the vision shapes the weights carry (config.json names the
    timm model instead of giving its sizes)."""
    if "MiniCPMV" not in (hf.get("architectures") or []):
        raise VlmrtError(f"{folder}/config.json: architectures {hf.get('architectures')} is not MiniCPMV")
    if "vpm.pos_embed" not in state:
        raise VlmrtError(f"{folder}: no vpm.pos_embed in the weights; this is not a MiniCPM-V-2 checkpoint")
    try:
        d = DecoderConfig.from_hf(hf)
        d = replace(d, residual_multiplier=hf["scale_depth"] / math.sqrt(d.num_layers),
                    logits_divisor=d.hidden_size / hf["dim_model_base"])
        scale_emb = float(hf["scale_emb"])
    except KeyError as e:
        raise VlmrtError(f"{folder}/config.json has no {e.args[0]!r}; it is not a MiniCPM-V config") from None
    width, grid = state["vpm.pos_embed"].shape[-1], math.isqrt(state["vpm.pos_embed"].shape[1])
    depth = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("vpm.blocks.")), default=-1)
    for base in PRESETS.values():
        if (base.vision.width, base.vision.pos_grid, base.decoder.hidden_size) == (width, grid, d.hidden_size):
            vision = replace(base.vision, depth=depth, patch_size=hf.get("patch_size", base.vision.patch_size))
            return replace(base, vision=vision, decoder=d, scale_emb=scale_emb,
                           query_num=hf.get("query_num", base.query_num),
                           scale_resolution=hf.get("scale_resolution", base.scale_resolution),
                           max_slices=hf.get("max_slice_nums", base.max_slices))
    raise VlmrtError(f"{folder}: no MiniCPM-V variant has a {width}-wide {grid}x{grid} vision tower and a "
                     f"{d.hidden_size}-wide LLM; check the files")


def _release_tokenizer(folder: Path):
    """The release names a remote-code class (`tokenizer_class` MiniCPMVTokenizer + `auto_map`, a
    LlamaTokenizer subclass), which AutoTokenizer would offer to run (and prompt on stdin for):
    read tokenizer.json verbatim, else convert the SentencePiece tokenizer.model as Llama's."""
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    if (folder / "tokenizer.json").is_file():
        cls = PreTrainedTokenizerFast
    elif (folder / "tokenizer.model").is_file():
        cls = LlamaTokenizer
    else:
        raise VlmrtError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model there")
    try:
        tok = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken files
        raise VlmrtError(f"cannot load the tokenizer in {folder}: {e.__class__.__name__}: {e}") from None
    missing = [t for t in MARKUP if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if tok.unk_token_id != IMAGE_TOKEN_ID or missing:
        raise VlmrtError(f"the tokenizer in {folder} is not MiniCPM-V's: <unk> is id {tok.unk_token_id} (expected 0)"
                         + (f", no special token for {', '.join(missing)}" if missing else ""))
    return tok


def load_release(folder: str | Path, device: torch.device, dtype: torch.dtype, shard=None):
    """Load a MiniCPM-V-2 release folder: config.json, model-0000x-of-0000y.safetensors with
    model.safetensors.index.json (or one model.safetensors), tokenizer.json or tokenizer.model.
    No remote code runs. Returns (model, tokenizer, config); errors name the file or key at fault."""
    from vlmrt.weights import assign_weights, build_on, read_hf_weights, read_json

    folder = Path(folder)
    hf = read_json(folder / "config.json")
    state = {k: v for k, v in read_hf_weights(folder, lazy=shard is not None).items() if not k.endswith(".rotary_emb.inv_freq")}
    cfg = config_from_release(hf, state, folder)
    tokenizer = _release_tokenizer(folder)
    model = build_on(device, dtype, lambda: MiniCPMVForConditionalGeneration(cfg), shard)
    assign_weights(model, state, f"MiniCPM-V release in {folder}", shard)
    return model.eval(), tokenizer, cfg
