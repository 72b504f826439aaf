"""The Qwen2-VL vision tower as SliMM uses it, with the DeepStack mergers: patch embedding (a Conv3d
over rows of 1176 values, run as a matmul), 2D rotary, pre-norm blocks with QuickGELU, attention
restricted to each image, and the 2x2 patch merger plus SliMM's v1 / midlayers / efficient mergers.

Facts from ../shared/models/SPEC.md 4.3-4.5; transformers' `qwen2_vl` (5.23) for the tower
(`Qwen2VisionTransformerPretrainedModel`, `Qwen2VLImageProcessor`'s patch order); github
MengLcool/SliMM (HEAD 18dfba4) `vision_encoder/{dfn_vit,merger}.py` and `slimm.py`
(`process_visual_embeddings`) for the taps, the mergers and DeepStack-E's regrouping. Module names are
the release's keys under `visual.`.

Units arrive in merge-window order (each m x m window of patches contiguous, windows in raster
order), per image, images concatenated. Every position, segment and regrouping is index arithmetic
on `grid` [I,3] (t, h, w per image) with elementwise ops, so the graph takes any image sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VisionConfig:
    """The Qwen2-VL ViT ("DFN-Huge", SPEC 4.3)."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    temporal_patch_size: int = 2  # a still image is two identical frames
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:  # values in one patch row: C * T * p * p = 1176
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf(cls, d: dict) -> "VisionConfig":
        return cls(depth=d["depth"], embed_dim=d["embed_dim"], num_heads=d["num_heads"],
                   mlp_ratio=d.get("mlp_ratio", 4),
                   patch_size=d.get("patch_size", d.get("spatial_patch_size", 14)),
                   temporal_patch_size=d.get("temporal_patch_size", 2),
                   spatial_merge_size=d.get("spatial_merge_size", 2),
                   in_channels=d.get("in_channels", d.get("in_chans", 3)))



# ----------------------------------------------------------------------------- index arithmetic
def unit_segments(grid: torch.Tensor, n: int):
    """Which image each of `n` units belongs to. grid [I,3] (t,h,w) counts units per image.

    Returns seg [n] (image index), local [n] (index within the image), hw [n,2] (that image's h, w).
    """
    counts = grid.prod(-1)  # [I]
    ends = counts.cumsum(0)  # [I]
    idx = torch.arange(n, device=grid.device)
    seg = (idx[:, None] >= ends[None, :]).sum(-1)  # [n]
    local = idx - (ends - counts)[seg]
    return seg, local, grid[seg][:, 1:]


def window_to_raster(local: torch.Tensor, h: torch.Tensor, w: torch.Tensor, m: int):
    """(row, col) of each unit listed in merge-window order: windows of m x m in raster order, units
    raster inside a window (Qwen2VLImageProcessor's patch order). All [n]."""
    f = local % (h * w)  # frames of a video repeat the same positions
    win, inner = f // (m * m), f % (m * m)
    wpr = w // m  # windows per row
    return (win // wpr) * m + inner // m, (win % wpr) * m + inner % m


def _image_start(grid: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    counts = grid.prod(-1)  # [I]
    return (counts.cumsum(0) - counts)[seg]  # [n]: first unit of each unit's image


def to_window_order(grid: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[n] gather index: x[index] lists in merge-window order the units x holds in raster order."""
    seg, local, hw = unit_segments(grid, n)
    h, w = hw[:, 0], hw[:, 1]
    r, c = window_to_raster(local, h, w, m)
    return _image_start(grid, seg) + (local // (h * w)) * h * w + r * w + c


def to_raster_order(grid: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[n] gather index: x[index] lists in raster order the units x holds in merge-window order."""
    seg, local, hw = unit_segments(grid, n)
    h, w = hw[:, 0], hw[:, 1]
    f, frame = local % (h * w), local // (h * w)
    r, c = f // w, f % w
    win = (r // m) * (w // m) + c // m
    return _image_start(grid, seg) + frame * h * w + win * m * m + (r % m) * m + c % m


# ----------------------------------------------------------------------------- vision tower
def vision_rotary(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float):
    """2D rotary of the Qwen2-VL ViT: head_dim/4 frequencies; angles = (row x freqs, col x freqs),
    duplicated to head_dim (rotate-half). rows/cols [N] -> cos, sin [N,hd], fp32."""
    d = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=rows.device, dtype=torch.float32) / d))  # [hd/4]
    angles = torch.cat([rows.float()[:, None] * inv_freq, cols.float()[:, None] * inv_freq], dim=-1)  # [N,hd/2]
    emb = torch.cat([angles, angles], dim=-1)  # [N,hd]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class VisionPatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, k, stride=k, bias=False)  # the release's key

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # a stride-equals-kernel Conv3d over one patch per row is a matmul: [N,1176] @ [1176,E]
        return F.linear(rows, self.proj.weight.flatten(1))  # [N,E]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)  # [Q;K;V] order
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x, cos, sin, mask):
        """x [G,n,E]; cos/sin [G,n,hd] fp32; mask [1,1,n,n] bool (same image) or None."""
        g, n, e = x.shape
        q, k, v = self.qkv(x).view(g, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # [G,H,n,hd]
        cos, sin = cos[:, None], sin[:, None]  # [G,1,n,hd]
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(v.dtype)  # rotary in fp32, as the release
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [G,H,n,hd]
        return self.proj(out.transpose(1, 2).reshape(g, n, e))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))
        self.fc2 = nn.Linear(int(cfg.embed_dim * cfg.mlp_ratio), cfg.embed_dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # QuickGELU


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = VisionMlp(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))  # keys .0, .2


class Merger(nn.Module):
    """PatchMerger and the three DeepStack mergers of the release (merger.py, SPEC 4.3 table).

    forward(x [N,E] final ViT states, taps: list of [N,E], grid [I,3] ViT patches) ->
    main [N/m^2,D] (fills the image slots) and groups [K,N/m^2,D] (None without DeepStack).
    """

    def __init__(self, v: VisionConfig, d: int, kind: str, taps: tuple[int, ...]):
        super().__init__()
        e, self.m = v.embed_dim, v.spatial_merge_size
        self.kind, self.hidden = kind, e * self.m ** 2
        self.ln_q = nn.LayerNorm(e, eps=1e-6)
        self.mlp = _mlp(self.hidden, self.hidden, d)
        if self.kind == "v1":  # ln_q_deepstack exists in the checkpoint but the release never uses it
            self.ln_q_deepstack, self.mlp_deepstack = nn.LayerNorm(e, eps=1e-6), _mlp(e, e, d)
        elif self.kind == "midlayers":
            self.ln_q_deepstack_list = nn.ModuleList(nn.LayerNorm(e, eps=1e-6) for _ in taps)
            self.mlp_deepstack_list = nn.ModuleList(_mlp(self.hidden, self.hidden, d) for _ in taps)
        elif self.kind == "efficient":
            self.ln_q_deepstack, self.mlp_deepstack = nn.LayerNorm(e, eps=1e-6), _mlp(4 * self.hidden, self.hidden, d)

    def window(self, ln, mlp, x):
        return mlp(ln(x).reshape(-1, self.hidden))  # [N,E] -> per m x m window [N/m^2,E*m^2] -> [N/m^2,D]

    def forward(self, x, taps, grid):
        main = self.window(self.ln_q, self.mlp, x)  # [N/m^2,D]
        if self.kind == "none":
            return main, None
        if self.kind == "v1":  # every ViT token is a DeepStack token: group k = k-th token of each window
            deep = self.mlp_deepstack(self.ln_q(x))  # [N,D]
            return main, deep.view(main.shape[0], -1, deep.shape[-1]).transpose(0, 1)  # [m^2,N/m^2,D]
        if self.kind == "midlayers":
            heads = zip(taps, self.ln_q_deepstack_list, self.mlp_deepstack_list)
            groups = [self.window(ln, mlp, t) for t, ln, mlp in heads]
            return main, torch.stack(groups)  # [K,N/m^2,D]
        return self.efficient(x, main, grid)

    def efficient(self, x, deep, grid):
        """DeepStack-E (SPEC 4.5): the plain merger's per-cell tokens become 4 groups; main tokens come
        from 2x2 blocks of cells (16 ViT tokens each). x [N,E] lists cells in raster order."""
        cells = x.reshape(-1, self.hidden)  # [C,4E], C = N/4 cells, raster order
        cell_grid = torch.cat([grid[:, :1], grid[:, 1:] // self.m], dim=-1)  # [I,3] in cells
        blocks = cells[to_window_order(cell_grid, cells.shape[0], 2)]  # [C,4E]: each 2x2 block of cells contiguous
        e = x.shape[-1]
        normed = self.ln_q_deepstack(blocks.view(-1, self.m ** 2, e))  # [C,4,E]: each ViT token
        main = self.mlp_deepstack(normed.reshape(-1, 4 * self.hidden))  # 16 tokens of a 2x2 block -> [C/4,D]
        # as released: group k, main token j <- cell 4j+k in raster order (a 1x4 strip, not the 2x2 block)
        return main, deep.view(main.shape[0], 4, -1).transpose(0, 1)  # [4,C/4,D]


class VisionTower(nn.Module):
    """The Qwen2-VL ViT with tapped block inputs (DeepStack-M) and the merger."""

    def __init__(self, v: VisionConfig, out_dim: int, deepstack: str = "none", taps: tuple[int, ...] = ()):
        """v: the ViT; out_dim: the LLM width; deepstack: merger variant; taps: midlayers' tapped blocks."""
        super().__init__()
        self.cfg = v
        self.taps = taps if deepstack == "midlayers" else ()
        self.patch_embed = VisionPatchEmbed(v)
        self.blocks = nn.ModuleList(VisionBlock(v) for _ in range(v.depth))
        self.merger = Merger(v, out_dim, deepstack, taps)

    def forward(self, rows: torch.Tensor, grid: torch.Tensor, batch: int = 1):
        """rows [N,P] in merge-window order, grid [I,3] patches per image.

        batch=1: all images in one sequence, attention masked to each image (any sizes).
        batch=B: B images of one size, N/B rows each, attention batched without a mask.
        """
        c = self.cfg
        x = self.patch_embed(rows.to(self.patch_embed.proj.weight.dtype))  # [N,E]
        seg, local, hw = unit_segments(grid, rows.shape[0])
        r, col = window_to_raster(local, hw[:, 0], hw[:, 1], c.spatial_merge_size)
        cos, sin = vision_rotary(r, col, c.head_dim, c.rope_theta)  # [N,hd]
        n = rows.shape[0] // batch
        x, cos, sin = x.view(batch, n, -1), cos.view(batch, n, -1), sin.view(batch, n, -1)  # [G,n,.]
        mask = (seg[:, None] == seg[None, :])[None, None] if batch == 1 else None  # [1,1,N,N]
        taps = []
        for i, blk in enumerate(self.blocks):
            if i in self.taps:
                taps.append(x.reshape(rows.shape[0], -1))  # the state entering block i
            x = blk(x, cos, sin, mask)
        return self.merger(x.reshape(rows.shape[0], -1), taps, grid)


def patch_rows(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """pixels [B,C,H,W] -> rows [B*(H/p)*(W/p), C*temporal*p*p] in merge-window order, each row a
    (C, temporal, p, p) block of `temporal` identical frames (Qwen2VLImageProcessor's layout)."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B,gh/m,gw/m,m,m,C,p,p]
    x = x.reshape(b * gh * gw, c, 1, patch, patch).expand(-1, -1, temporal, -1, -1)  # [B*gh*gw,C,T,p,p]: at most
    # 8 dims in any tensor (Paddle's limit, for the lowered programs of vlmrt/runtimes/paddle_lower.py)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def split_cells(rows: torch.Tensor, grid: torch.Tensor, v: VisionConfig):
    """DeepStack-E (SliMM process_visual_embeddings, SPEC 4.5): processor rows [C,4704] of 28-px
    cells in window order -> ViT rows [4C,1176]: cells in raster order, each split into its 2x2
    14-px sub-patches (cell row, cell col, sub-row, sub-col); grid in cells -> ViT grid (t,2h,2w)."""
    cells = rows[to_raster_order(grid, rows.shape[0], v.spatial_merge_size)]  # [C,4704]
    p, ct = v.patch_size, v.in_channels * v.temporal_patch_size
    x = cells.reshape(-1, ct, 2, p, 2, p).permute(0, 2, 4, 1, 3, 5)  # [C,2,2,C*T,p,p]
    return x.reshape(-1, v.patch_dim), grid * grid.new_tensor([1, 2, 2])
