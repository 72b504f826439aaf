"""Megatron-style sharding of the decoder, in place: after the weight format is applied, or on the
meta device before a release checkpoint is read into it (vlmrt.weights.build_on).

```
 every decoder layer (LlamaAttention + LlamaMLP: all four families; Qwen-VL's fused c_attn is
 split into q/k/v and w1/w2 named gate/up when it loads)
   q_proj, k_proj, v_proj  column-parallel: rank r keeps its heads' rows (and biases: Qwen2/SliMM)
   o_proj                  row-parallel: rank r keeps the same heads' columns ─► all_reduce
   gate_proj, up_proj      column-parallel: rows [r*I/N, (r+1)*I/N)
   down_proj               row-parallel: those columns ─► all_reduce
 KV heads go with their query heads: H_kv >= N splits them, H_kv < N (N a multiple of H_kv)
 gives each rank the one KV head its query heads read (replicated on N / H_kv ranks)
 replicated: embedding, norms, lm_head, the vision stage (it runs on rank 0 only)
```

A linear is sliced as it is stored: an nn.Linear's weight, or a QuantizedLinear's packed buffers.
int8 scales are per output row, so a column slice keeps its rows' scales and a row slice keeps
every scale: each rank holds exactly the slice of the tp=1 int8 weight. fp16/bf16 slice like fp.
int4 packs rows in tiles the CPU kernel owns, so it is refused, and so is int8-gN (its
[G,N,gs] layout is not sliced here) (quantize after sharding would need
the group size to divide every slice width: not done yet).

An fp row-parallel slice keeps its rows' absmax over the full width (`row_absmax`), so that int8
applied to the slice later picks the tp=1 scales.

The same slicing serves the loaders (vlmrt.weights): a release checkpoint is read into a model
sharded on the meta device, each sliced linear saying where its part lies in the full tensor
(`tp_part`, `shard_parts`), so a rank reads its rows or columns only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmrt.errors import VlmrtError
from vlmrt.models.layers import LlamaAttention, LlamaMLP
from vlmrt.quantize import WEIGHTS_ATTR, QuantizedLinear, language_model_prefix
from vlmrt.tp.group import all_reduce


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's columns of the weight, then the sum over ranks. A bias
    (none in the registered families) is added once, after the sum.

    int8 takes care: its kernel rounds each output to bf16, so summing the ranks' rounded partial
    sums would differ from tp=1 by a bf16 step (tokens diverge within 32 on the tiny presets). Here
    each rank's fp32 partial sum of x_bf16 * q is reduced first, then scaled and rounded once, as the
    tp=1 kernel does: tp=N matches tp=1 int8 up to fp32 summation order. The cost: this rank's int8
    columns are widened to fp32 for the matmul (CPU int8 decode is about correctness here, not speed).
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.bias = inner.bias
        inner.bias = None

    @property
    def int8(self) -> bool:  # read at every call: a shard loaded fp is quantized after it is wrapped
        return isinstance(self.inner, QuantizedLinear) and self.inner.method.name == "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [...,K/N] -> [...,D]
        if self.int8:
            y = self._int8(x)
        else:
            y = all_reduce(self.inner(x).contiguous())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        q = self.inner
        acc = x.reshape(-1, q.in_features).to(torch.bfloat16).float() @ q.qweight.float().t()  # [M,D] fp32
        y = (all_reduce(acc) * q.scales.float()).to(torch.bfloat16).to(x.dtype)  # rounded once, as at tp=1
        return y.reshape(*x.shape[:-1], q.out_features)


@dataclass(frozen=True)
class Shard:
    """The part of the decoder one rank loads (vlmrt.models.load_model).

    Args:
        rank: this rank.
        world: ranks in the group.
        row_absmax: also read each row-parallel weight's per-row absmax over its full rows, in
            blocks no bigger than the shard (int8 scales are per row over the full width).
    """

    rank: int
    world: int
    row_absmax: bool = False


@dataclass(frozen=True)
class Part:
    """Where a sharded parameter lies in the checkpoint's full tensor."""

    source: str  # the parameter's name in the unsharded model
    dim: int  # 0: rows (column-parallel), 1: columns (row-parallel)
    start: int
    stop: int
    shape: tuple[int, ...]  # the full tensor's


def this_rank(weights=None) -> Shard | None:
    """The Shard this process loads: its rank's in an active group of several ranks, else None.

    Args:
        weights: the vlmrt.quantize.WeightConfig the runtime will apply (int8 needs `row_absmax`).
    """
    from vlmrt.tp.group import active

    group = active()
    if group is None or group.world == 1:
        return None
    return Shard(group.rank, group.world, row_absmax=weights is not None and weights.format == "int8")


def check_plan(num_heads: int, num_kv_heads: int, intermediate: int, world: int) -> None:
    """A clear error when `world` ranks cannot split this decoder."""
    fixes = [n for n in range(1, num_heads + 1) if fits(num_heads, num_kv_heads, intermediate, n)]
    if not fits(num_heads, num_kv_heads, intermediate, world):
        raise VlmrtError(f"--tp {world} does not split this decoder ({num_heads} query heads, {num_kv_heads} KV heads, "
                         f"MLP width {intermediate}): the ranks must divide the query heads and the MLP width, and "
                         f"divide the KV heads or be a multiple of them; choose --tp in {', '.join(map(str, fixes))}")


def fits(num_heads: int, num_kv_heads: int, intermediate: int, world: int) -> bool:
    kv_ok = num_kv_heads % world == 0 or world % num_kv_heads == 0
    return num_heads % world == 0 and intermediate % world == 0 and kv_ok


def head_rows(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[range, range]:
    """(query heads, KV heads) rank `rank` holds."""
    q = num_heads // world
    queries = range(rank * q, (rank + 1) * q)
    if num_kv_heads >= world:
        kv = num_kv_heads // world
        return queries, range(rank * kv, (rank + 1) * kv)
    first = queries.start // (num_heads // num_kv_heads)  # the KV head these query heads share
    return queries, range(first, first + 1)


@torch.no_grad()
def slice_linear(linear: nn.Module, dim: int, start: int, stop: int) -> nn.Module:
    """The part [start, stop) of `linear` along its output (dim 0: column-parallel) or input (dim 1:
    row-parallel) features, as a module of the same kind."""
    if isinstance(linear, QuantizedLinear):
        return _slice_quantized(linear, dim, start, stop)
    w = linear.weight.narrow(dim, start, stop - start).clone()  # [N/n,K] or [N,K/n]
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    out.weight.copy_(w)
    if linear.bias is not None:
        out.bias.copy_(linear.bias[start:stop] if dim == 0 else linear.bias)
    out.tp_part = (dim, start, stop, tuple(linear.weight.shape))
    if dim == 1 and not w.is_meta:  # int8 later: the scales of the full rows (a loader reads them itself)
        out.row_absmax = linear.weight.float().abs().amax(1)  # [N]
    return out.requires_grad_(False)


def _slice_quantized(q: QuantizedLinear, dim: int, start: int, stop: int) -> QuantizedLinear:
    name = q.method.name
    if name == "int8" and q.method.cfg.group_size:
        name = q.method.cfg.tag
    if name not in ("int8", "fp16", "bf16"):
        raise VlmrtError(f"--tp with --quantize {name} is not supported (its packed layout does not slice); "
                         "use --quantize int8, fp16 or bf16, or no --quantize")
    out = QuantizedLinear.__new__(QuantizedLinear)
    nn.Module.__init__(out)
    out.method, out._names = q.method, list(q._names)
    out.in_features, out.out_features = (q.in_features, stop - start) if dim == 0 else (stop - start, q.out_features)
    for n in q._names:
        t = getattr(q, n)
        if n == "scales" and dim == 1:  # int8 row-parallel: every output row keeps its own scale
            part = t.clone()
        else:
            part = t.narrow(0 if n == "scales" else dim, start, stop - start).clone()
        out.register_buffer(n, part.contiguous(), persistent=False)
    out.bias = None
    if q.bias is not None:
        out.bias = nn.Parameter((q.bias[start:stop] if dim == 0 else q.bias).clone(), requires_grad=False)
    return out


def shard_attention(attn: LlamaAttention, rank: int, world: int) -> None:
    hd, h, hkv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    queries, kv = head_rows(h, hkv, rank, world)
    attn.q_proj = slice_linear(attn.q_proj, 0, queries.start * hd, queries.stop * hd)
    attn.k_proj = slice_linear(attn.k_proj, 0, kv.start * hd, kv.stop * hd)
    attn.v_proj = slice_linear(attn.v_proj, 0, kv.start * hd, kv.stop * hd)
    attn.o_proj = RowParallel(slice_linear(attn.o_proj, 1, queries.start * hd, queries.stop * hd))
    attn.num_heads, attn.num_kv_heads = len(queries), len(kv)


def shard_mlp(mlp: LlamaMLP, rank: int, world: int) -> None:
    width = mlp.gate_proj.out_features // world
    part = (rank * width, (rank + 1) * width)
    mlp.gate_proj = slice_linear(mlp.gate_proj, 0, *part)
    mlp.up_proj = slice_linear(mlp.up_proj, 0, *part)
    mlp.down_proj = RowParallel(slice_linear(mlp.down_proj, 1, *part))


def shard_parts(model: nn.Module) -> dict[str, Part]:
    """Every sliced parameter of a sharded fp `model` (its name) -> where it lies in the full tensor.
    A row-parallel weight sits in `RowParallel.inner`; its bias (on RowParallel) is whole."""
    parts = {}
    for name, m in model.named_modules():
        if getattr(m, "tp_part", None) is None:
            continue
        dim, start, stop, shape = m.tp_part
        source = name.removesuffix(".inner")
        parts[f"{name}.weight"] = Part(f"{source}.weight", dim, start, stop, shape)
        if m.bias is not None:  # column-parallel only: a row-parallel bias moved to RowParallel
            parts[f"{name}.bias"] = Part(f"{source}.bias", 0, start, stop, shape[:1])
    return parts


def decoder_layers(model: nn.Module) -> tuple[list[LlamaAttention], list[LlamaMLP]]:
    """The attention and MLP modules of `model`'s decoder layers, in order."""
    lm = language_model_prefix(model)
    mods = [m for n, m in model.named_modules() if n.startswith(f"{lm}model.layers.")]
    attns, mlps = [m for m in mods if isinstance(m, LlamaAttention)], [m for m in mods if isinstance(m, LlamaMLP)]
    if not attns or len(attns) != len(mlps):
        raise VlmrtError(f"cannot shard {type(model).__name__}: tensor parallelism knows Llama-style decoder layers only")
    return attns, mlps


def check_shardable(model: nn.Module, weights, world: int) -> None:
    """Every check `shard_model` makes, before any rank loads anything: the split and the weight format.

    Args:
        model: the family model (fp weights).
        weights: the vlmrt.quantize.WeightConfig the runtime applies (None: fp).
        world: ranks in the group.
    """
    if weights is not None and weights.format == "int4":
        raise VlmrtError("--tp with --quantize int4 is not supported (its packed layout does not slice); "
                         "use --quantize int8, fp16 or bf16, or no --quantize")
    if weights is not None and weights.format == "int8" and weights.group_size:
        raise VlmrtError(f"--tp with --quantize {weights.tag} is not supported (grouped int8 scales do not slice "
                         "here); use --quantize int8 (one scale per channel)")
    attns, mlps = decoder_layers(model)
    a = attns[0]
    if getattr(model, "tp_shard", None) is None:
        check_plan(a.num_heads, a.num_kv_heads, mlps[0].gate_proj.out_features, world)


def check_row_scales(model: nn.Module, weights) -> None:
    """A clear error when int8 would quantize a row-parallel shard loaded without its full rows'
    absmax (its scales would be those of its own columns, not tp=1's)."""
    if weights is None or weights.format != "int8" or getattr(model, WEIGHTS_ATTR, None) is not None:
        return
    rows = [m.inner for m in model.modules() if isinstance(m, RowParallel) and isinstance(m.inner, nn.Linear)]
    if any(getattr(linear, "row_absmax", None) is None for linear in rows):
        raise VlmrtError("--quantize int8 on a tensor-parallel shard loaded without its row scales; load it with "
                         "vlmrt.tp.shard.Shard(..., row_absmax=True) (vlmrt.tp.shard.this_rank(weights) does)")


def shard_model(model: nn.Module, rank: int, world: int) -> nn.Module:
    """Keep rank `rank`'s shard of every decoder layer of `model` (a family model), in place; the
    model's `num_kv_heads` becomes this rank's (the KV caches it allocates hold its heads only).

    Args:
        model: a family model, its weight format already applied (vlmrt.quantize).
        rank: this rank.
        world: ranks in the group.
    """
    attns, mlps = decoder_layers(model)
    a = attns[0]
    check_plan(a.num_heads, a.num_kv_heads, mlps[0].gate_proj.out_features, world)
    for attn in attns:
        shard_attention(attn, rank, world)
    for mlp in mlps:
        shard_mlp(mlp, rank, world)
    model.num_kv_heads = attns[0].num_kv_heads
    model.tp_shard = (rank, world)
    return model
