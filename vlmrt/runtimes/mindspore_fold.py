"""Fewer MindSpore kernels per graph: ATen nodes that need no kernel of their own, or a cheaper one,
when the lowering writes them (vlmrt/runtimes/mindspore_lower.py).

A dynamic-shape MindSpore graph infers every kernel's output shape on every call, and a shape
argument made from sizes (`x.shape[d]`, products of them) is a chain of scalar kernels run before
it: on tiny widths that per-kernel cost, not arithmetic, is the step's time. So:

```
 view / expand to the shape it has          ─► x itself (no kernel)
 view with one size-dependent dim           ─► that dim -1 (a constant shape: no scalar kernels)
 expand keeping a size-dependent dim        ─► that dim -1 (MindSpore's "keep this dim")
 permute of a permute                       ─► one transpose of the composition (none when identity)
 mm / addmm of permute(w, [1, 0])           ─► MatMul(transpose_b) on w (the weight is not copied)
 bmm of expand(y [K,N], [s,K,N])            ─► a broadcasting matmul on y (no broadcast kernel)
```
"""

from __future__ import annotations

import torch

from vlmrt.runtimes.aten_lower import meta, transposed

ALIASES = {"aten.clone.default", "aten.alias.default"}  # written as the operand itself
SHAPED = {"aten.view.default", "aten._unsafe_view.default", "aten.expand.default"}


def same_shape(node, x) -> bool:
    """The node's output has x's shape and dtype (symbolic sizes compared as expressions)."""
    out, src = meta(node), meta(x)
    return (isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and out.dtype == src.dtype
            and [str(d) for d in out.shape] == [str(d) for d in src.shape])


def source(x):
    """The node whose value x is written as: through clones, aliases and views/expands to the same
    shape (each is `name = operand` in the source)."""
    while isinstance(x, torch.fx.Node) and x.op == "call_function" and (
            str(x.target) in ALIASES or (str(x.target) in SHAPED and same_shape(x, x.args[0]))):
        x = x.args[0]
    return x


def _kind(x) -> str:
    return str(x.target) if isinstance(x, torch.fx.Node) and x.op == "call_function" else ""


def _reshape_dims(dims: list) -> list:
    """A view's target: the one size-dependent dim as -1 when every other dim is a positive int."""
    sized = [i for i, d in enumerate(dims) if isinstance(d, torch.fx.Node)]
    fixed = [d for d in dims if not isinstance(d, torch.fx.Node)]
    if len(sized) == 1 and all(isinstance(d, int) and d > 0 for d in fixed):
        dims[sized[0]] = -1
    return dims


def _broadcast_dims(node, x, dims: list) -> list:
    """An expand's target: size-dependent dims that keep x's dim (aligned from the right) as -1."""
    out, src = meta(node).shape, meta(x).shape
    lead = len(out) - len(src)
    for i, d in enumerate(dims):
        if isinstance(d, torch.fx.Node) and i >= lead and str(out[i]) == str(src[i - lead]):
            dims[i] = -1
    return dims


def shaped(fn: str):
    """A view (`fn` ops.reshape) or expand (ops.broadcast_to): x itself when the output has its
    shape already, else `fn` with as few size-dependent dims as the rules above leave."""
    def emit(w, node, x, shape, **_):
        if same_shape(node, x):
            return w.value(x)
        dims = list(shape)
        dims = _broadcast_dims(node, x, dims) if fn == "ops.broadcast_to" else _reshape_dims(dims)
        return f"{fn}({w.value(x)}, {w.value(tuple(dims))})"
    return emit


def permute(w, node, x, dims, **_):
    """aten.permute: permutes of permutes composed into one transpose (x itself when the
    composition is the identity)."""
    n = len(meta(node).shape)
    order, src = [d % n for d in dims], source(x)
    while _kind(src) == "aten.permute.default":
        inner = [d % n for d in src.args[1]]
        order, src = [inner[j] for j in order], source(src.args[0])
    if order == list(range(n)):
        return w.value(src)
    return f"ops.transpose({w.value(src)}, {w.value(tuple(order))})"


def matmul(w, a, b) -> str:
    """a @ b of mm/addmm; when b is a transpose (a linear layer's `permute(weight, [1, 0])`), MatMul
    reads its source with transpose_b, so the weight is not copied per call (the LM head's [V,D]
    weight is the decoder's largest tensor: copying it was most of a tiny model's decode step)."""
    src = transposed(b)
    if src is not None:
        return f"vops.matmul_t({w.value(a)}, {w.value(src)})"
    return f"ops.matmul({w.value(a)}, {w.value(b)})"


def bmm(w, node, a, b, **_):
    """aten.bmm a [s,M,K] @ b [s,K,N]; b an expand of a 2-D y [K,N] (torch's matmul of a 3-D
    tensor by a weight): a broadcasting matmul on y, with no broadcast kernel."""
    src = source(b)
    if _kind(src) == "aten.expand.default":
        y = src.args[0]
        if meta(y) is not None and meta(y).dim() == 2 and [str(d) for d in meta(src).shape[1:]] == \
                [str(d) for d in meta(y).shape]:
            return f"ops.matmul({w.value(a)}, {w.value(y)})"
    return f"ops.matmul({w.value(a)}, {w.value(b)})"
