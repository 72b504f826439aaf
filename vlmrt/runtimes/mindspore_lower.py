"""PyTorch stages as MindSpore graphs: a `torch.export` program, decomposed to core ATen, is written
out as a `mindspore.nn.Cell` whose `construct` calls MindSpore, one line per graph node (the walk is
vlmrt/runtimes/aten_lower.py, shared with the Paddle lowering); MindSpore's graph mode then parses
that source and compiles it. The one place that knows how an ATen op reads in MindSpore.

```
 stage module ─► torch.export (dynamic batch/sequence/cache dims) ─► run_decompositions() (core ATen)
   ─► per node: OPS[aten overload](args) ─► one line of MindSpore    weights ─► Parameters of the Cell
   ─► <stage>.py (class Graph(nn.Cell), construct(self, *inputs)) ─► GRAPH_MODE: compiled per input
      shape at its first call (cached after) ─► live calls, or mindspore.export to MINDIR
```

- Sizes (`sym_size.int`) become `x.shape[d]`: Python ints while a graph compiles, since MindSpore
  compiles one graph per input shape. So one source serves every batch, prompt length and cache length.
- ATen promotes dtypes implicitly and MindSpore's kernels want matching operands: every
  elementwise op casts its tensor operands to the dtype torch computed in, as the Paddle lowering does.
- An op missing from `OPS` is a VlmrtError naming it (and the stage), at lowering time.
- Nodes that need no kernel (same-shape views, permutes composed away, x * 1.0) or a cheaper one
  (a linear layer's weight read with transpose_b) are folded as they are written
  (vlmrt/runtimes/mindspore_fold.py); lines the return does not read are dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from vlmrt.runtimes import aten_lower
from vlmrt.runtimes.aten_lower import compute_dtype, dtype_name, is_tensor
from vlmrt.runtimes.mindspore_fold import bmm, matmul, permute, same_shape, shaped

TABLE = "vlmrt/runtimes/mindspore_lower.py OPS"
MS_DTYPES = {"bool": "ms.bool_"}  # torch dtype name -> MindSpore spelling where they differ


class Writer(aten_lower.Writer):
    """Renders node arguments as MindSpore source: dtypes as `ms.<dtype>`, lists as tuples (shapes
    and axes), sizes as the Python ints they are while a graph compiles."""

    framework = "MindSpore"
    cast_call = "ops.cast"
    sequence = "({})"

    def dtype(self, dtype: torch.dtype) -> str:
        name = dtype_name(dtype)
        return MS_DTYPES.get(name, f"ms.{name}")

    def size_cast(self, x, dtype: torch.dtype) -> str:
        return f"float({x.name})" if dtype.is_floating_point else x.name

    def value(self, x) -> str:
        if isinstance(x, float) and not math.isfinite(x):  # module constants: the graph parser reads them
            return "vops.NAN" if math.isnan(x) else ("vops.INF" if x > 0 else "(-vops.INF)")
        return super().value(x)


def _operand(w: Writer, x, dtype: torch.dtype) -> str:
    """x as a tensor operand of `dtype` (numbers as 0-D tensors)."""
    return w.cast(x, dtype) if is_tensor(x) else f"vops.scalar({w.cast(x, dtype)}, {w.dtype(dtype)})"


def _binary(fmt: str, compare: bool = False, identity=None):
    """An elementwise op of two operands: `fmt` with {a}, {b}, operands cast to the compute dtype;
    a itself when b is the op's `identity` number and the output is a's (x * 1.0: no kernel)."""
    def emit(w: Writer, node, a, b, alpha=1, **_):
        if identity is not None and isinstance(b, (int, float)) and not isinstance(b, bool) and b == identity \
                and same_shape(node, a):
            return w.value(a)
        dtype = compute_dtype([a, b]) if compare else node.meta["val"].dtype
        left, right = w.cast(a, dtype), w.cast(b, dtype)
        if alpha != 1:
            right = f"({right} * {w.value(alpha)})"
        if not is_tensor(a) and not is_tensor(b):
            return fmt.format(a=left, b=right)
        if not is_tensor(a):  # scalar first: a 0-D tensor of the compute dtype
            left = _operand(w, a, dtype)
        return fmt.format(a=left, b=right)
    return emit


def _logical(op: str):
    """aten.bitwise_{and,or}: logical on bool tensors (the models' masks), bitwise on integers."""
    def emit(w: Writer, node, a, b, **_):
        dtype = node.meta["val"].dtype
        fn = f"ops.logical_{op}" if dtype == torch.bool else f"ops.bitwise_{op}"
        return f"{fn}({_operand(w, a, dtype)}, {_operand(w, b, dtype)})"
    return emit


def _unary(fn: str):
    """A one-operand op, its operand cast to the output dtype (rsqrt of an integer tensor is a float)."""
    def emit(w: Writer, node, x, **_):
        return f"{fn}({w.cast(x, node.meta['val'].dtype)})"
    return emit


def _call(fmt: str):
    """`fmt` formatted with the rendered positional args {0}, {1}, ... and the output dtype {dtype}."""
    def emit(w: Writer, node, *args, **_):
        out = node.meta.get("val")
        dtype = w.dtype(out.dtype) if isinstance(out, torch.Tensor) else "None"
        return fmt.format(*[w.value(a) for a in args], dtype=dtype)
    return emit


def _where(w: Writer, node, cond, a, b, **_):
    dtype = node.meta["val"].dtype
    return f"ops.where({w.value(cond)}, {_operand(w, a, dtype)}, {_operand(w, b, dtype)})"


def _to_copy(w: Writer, node, x, dtype=None, **_):
    if same_shape(node, x):  # a copy to its own dtype: x itself
        return w.value(x)
    return f"ops.cast({w.value(x)}, {w.dtype(node.meta['val'].dtype)})"


def _arange(w: Writer, node, *args, **_):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (tuple(args) + (1,))[:3]
    return f"ops.arange({w.value(start)}, {w.value(end)}, {w.value(step)}, dtype={w.dtype(node.meta['val'].dtype)})"


def _full(w: Writer, node, size, value, **_):
    return f"ops.full({w.value(tuple(size))}, {w.value(value)}, dtype={w.dtype(node.meta['val'].dtype)})"


def _full_like(w: Writer, node, x, value, **_):
    return f"ops.full_like({w.value(x)}, {w.value(value)}, dtype={w.dtype(node.meta['val'].dtype)})"


def _reduce(fn: str):
    """A reduction fn(x, axis, keep) over `dim` (None: every dim), x cast to the output dtype."""
    def emit(w: Writer, node, x, dim=None, keepdim=False, **_):
        axis = "None" if dim is None else w.value(tuple(dim) if isinstance(dim, (list, tuple)) else dim)
        return f"{fn}({w.cast(x, node.meta['val'].dtype)}, {axis}, {keepdim!r})"
    return emit


def _any(w: Writer, node, x, dim=None, keepdim=False, **_):
    axis = "None" if dim is None else w.value(tuple(dim) if isinstance(dim, (list, tuple)) else dim)
    return f"ops.any(ops.cast({w.value(x)}, ms.bool_), {axis}, {keepdim!r})"


def _mm(w: Writer, node, a, b, **_):
    return matmul(w, a, b)


def _addmm(w: Writer, node, bias, a, b, beta=1, alpha=1, **_):
    mm = matmul(w, a, b)
    mm = mm if alpha == 1 else f"({mm} * {w.value(alpha)})"
    return f"({mm} + {w.value(bias)})" if beta == 1 else f"({mm} + {w.value(bias)} * {w.value(beta)})"


def _cumsum(w: Writer, node, x, dim, dtype=None, **_):
    return f"ops.cumsum({w.cast(x, node.meta['val'].dtype)}, {w.value(dim)})"


def _softmax(w: Writer, node, x, dim, half_to_float=False, **_):
    return f"ops.softmax({w.value(x)}, {w.value(dim)})"


def _gelu(w: Writer, node, x, approximate="none", **_):
    return f"ops.gelu({w.value(x)}, approximate={approximate!r})"


def _pow(w: Writer, node, a, b, **_):
    dtype = node.meta["val"].dtype
    return f"ops.pow({_operand(w, a, dtype)}, {w.cast(b, dtype)})"


def _div_mode(w: Writer, node, a, b, rounding_mode=None, **_):
    dtype = node.meta["val"].dtype
    compute = dtype if dtype.is_floating_point else torch.float64
    return f"vops.div_mode({w.value(a)}, {w.value(b)}, {w.dtype(dtype)}, {w.dtype(compute)}, {rounding_mode!r})"


OPS = {  # aten overload -> emitter(writer, node, *args, **kwargs) -> a MindSpore expression
    "aten._softmax.default": _softmax,
    "aten._to_copy.default": _to_copy,
    "aten._unsafe_view.default": shaped("ops.reshape"),
    "aten.abs.default": _unary("ops.abs"),
    "aten.add.Scalar": _binary("({a} + {b})"),
    "aten.add.Tensor": _binary("({a} + {b})"),
    "aten.addmm.default": _addmm,
    "aten.alias.default": _call("{0}"),
    "aten.amax.default": _reduce("ops.amax"),
    "aten.any.dim": _any,
    "aten.any.dims": _any,
    "aten.arange.default": _arange,
    "aten.arange.start": _arange,
    "aten.arange.start_step": _arange,
    "aten.bitwise_and.Tensor": _logical("and"),
    "aten.bitwise_not.default": _call("ops.logical_not({0})"),
    "aten.bitwise_or.Tensor": _logical("or"),
    "aten.bmm.default": bmm,
    "aten.cat.default": _call("ops.cat({0}, {1})"),
    "aten.ceil.default": _unary("ops.ceil"),
    "aten.clamp.default": _call("ops.clamp({0}, {1}, {2})"),
    "aten.clone.default": _call("{0}"),
    "aten.convolution.default": _call("vops.convolution({0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8})"),
    "aten.copy.default": _call("ops.cast({1}, {dtype})"),
    "aten.cos.default": _unary("ops.cos"),
    "aten.cumsum.default": _cumsum,
    "aten.div.Tensor": _binary("({a} / {b})"),
    "aten.div.Tensor_mode": _div_mode,
    "aten.embedding.default": _call("ops.gather({0}, {1}, 0)"),
    "aten.eq.Scalar": _binary("({a} == {b})", compare=True),
    "aten.eq.Tensor": _binary("({a} == {b})", compare=True),
    "aten.erf.default": _unary("ops.erf"),
    "aten.exp.default": _unary("ops.exp"),
    "aten.expand.default": shaped("ops.broadcast_to"),
    "aten.floor.default": _unary("ops.floor"),
    "aten.full.default": _full,
    "aten.full_like.default": _full_like,
    "aten.gather.default": _call("ops.gather_elements({0}, {1}, {2})"),
    "aten.ge.Scalar": _binary("({a} >= {b})", compare=True),
    "aten.ge.Tensor": _binary("({a} >= {b})", compare=True),
    "aten.gelu.default": _gelu,
    "aten.gt.Scalar": _binary("({a} > {b})", compare=True),
    "aten.gt.Tensor": _binary("({a} > {b})", compare=True),
    "aten.index.Tensor": _call("vops.index({0}, {1})"),
    "aten.le.Scalar": _binary("({a} <= {b})", compare=True),
    "aten.le.Tensor": _binary("({a} <= {b})", compare=True),
    "aten.log.default": _unary("ops.log"),
    "aten.logical_and.default": _call("ops.logical_and({0}, {1})"),
    "aten.logical_not.default": _call("ops.logical_not({0})"),
    "aten.logical_or.default": _call("ops.logical_or({0}, {1})"),
    "aten.lt.Scalar": _binary("({a} < {b})", compare=True),
    "aten.lt.Tensor": _binary("({a} < {b})", compare=True),
    "aten.max.dim": _call("vops.max_dim({0}, {1}, {2})"),
    "aten.maximum.default": _binary("ops.maximum({a}, {b})"),
    "aten.mean.dim": _reduce("ops.mean"),
    "aten.minimum.default": _binary("ops.minimum({a}, {b})"),
    "aten.mm.default": _mm,
    "aten.mul.Scalar": _binary("({a} * {b})", identity=1),
    "aten.mul.Tensor": _binary("({a} * {b})", identity=1),
    "aten.native_layer_norm.default": _call("vops.layer_norm({0}, {1}, {2}, {3}, {4})"),
    "aten.ne.Scalar": _binary("({a} != {b})", compare=True),
    "aten.ne.Tensor": _binary("({a} != {b})", compare=True),
    "aten.neg.default": _call("(-{0})"),
    "aten.permute.default": permute,
    "aten.pow.Scalar": _pow,
    "aten.pow.Tensor_Scalar": _pow,
    "aten.pow.Tensor_Tensor": _pow,
    "aten.prod.dim_int": _reduce("ops.prod"),
    "aten.reciprocal.default": _unary("ops.reciprocal"),
    "aten.remainder.Scalar": _binary("ops.remainder({a}, {b})"),
    "aten.remainder.Tensor": _binary("ops.remainder({a}, {b})"),
    "aten.repeat.default": _call("ops.tile({0}, {1})"),
    "aten.rsqrt.default": _unary("ops.rsqrt"),
    "aten.rsub.Scalar": _binary("({b} - {a})"),
    "aten.scalar_tensor.default": _call("vops.scalar({0}, {dtype})"),
    "aten.scatter.src": _call("ops.tensor_scatter_elements({0}, {2}, {3}, {1})"),
    "aten.select.int": _call("vops.select({0}, {1}, {2})"),
    "aten.sigmoid.default": _unary("ops.sigmoid"),
    "aten.silu.default": _unary("ops.silu"),
    "aten.sin.default": _unary("ops.sin"),
    "aten.slice.Tensor": _call("vops.slice({0}, {1}, {2}, {3}, {4})"),
    "aten.split_with_sizes.default": _call("ops.split({0}, {1}, {2})"),
    "aten.sqrt.default": _unary("ops.sqrt"),
    "aten.squeeze.dims": _call("vops.squeeze({0}, {1})"),
    "aten.sub.Tensor": _binary("({a} - {b})"),
    "aten.sum.dim_IntList": _reduce("ops.sum"),
    "aten.sym_size.int": _call("{0}.shape[{1}]"),
    "aten.tanh.default": _unary("ops.tanh"),
    "aten.unsqueeze.default": _call("ops.expand_dims({0}, {1})"),
    "aten.view.default": shaped("ops.reshape"),
    "aten.where.self": _where,
}


@dataclass(frozen=True)
class LoweredStage:
    """A stage as MindSpore source plus what the Cell needs around it."""

    source: str  # a module defining `class Graph(mindspore.nn.Cell)`
    weights: dict  # Parameter name -> torch tensor (the program's parameters, buffers and lifted constants)
    input_specs: list  # (name, dtype, shape with None for dynamic dims), in construct order
    output_names: list


HEADER = '''"""{stage} stage of {model}, lowered from its torch.export program (core ATen) by vlmrt; generated."""

import mindspore as ms
from mindspore import nn, ops

from vlmrt.runtimes import mindspore_ops as vops


class Graph(nn.Cell):
    def construct(self, {args}):
'''


def lower_program(ep, input_names: list[str], output_names: list[str], stage: str, model: str) -> LoweredStage:
    """A decomposed torch.export program -> MindSpore source (see the module docstring).

    Args:
        ep: the ExportedProgram, after `run_decompositions()`.
        input_names: the stage's input names, in the program's user-input order.
        output_names: its output names, in order.
        stage: the stage, for messages and the header.
        model: the model name, for the header.
    """
    weights, user, lines = aten_lower.lower_nodes(ep, Writer(), stage, OPS, TABLE, skip=aten_lower.folded_into_matmul)
    lines = live_lines(lines)
    specs = []
    for name, node in zip(input_names, user):
        val = node.meta["val"]
        specs.append((name, dtype_name(val.dtype), [int(d) if isinstance(d, int) else None for d in val.shape]))
    header = HEADER.format(stage=stage, model=model, args=", ".join(n.name for n in user))
    source = header + "".join(f"        {line}\n" for line in lines)
    return LoweredStage(source, weights, specs, list(output_names))


def live_lines(lines: list[str]) -> list[str]:
    """The lines the return reads, directly or not (`name = expr` lines, the last one `return (...)`):
    the nodes a fold made unused (a permute composed away, an expand read through) are dropped."""
    live, kept = set(re.findall(r"\w+", lines[-1])), [lines[-1]]
    for line in reversed(lines[:-1]):
        name, expr = line.split(" = ", 1)
        if name in live:
            live.update(re.findall(r"\w+", expr))
            kept.append(line)
    return kept[::-1]


def build_cell(lowered: LoweredStage, folder, stem: str, dynamic: bool = True):
    """The lowered stage as a MindSpore Cell: its source written to `folder`/<stem>.py and imported,
    the weights as Parameters (not trained). Compiled at its first call: once for every shape when
    `dynamic` (the dynamic dims None in `set_inputs`), else once per input shape."""
    import importlib.util
    import sys
    from pathlib import Path

    from vlmrt.runtimes.mindspore import import_mindspore, to_ms

    ms = import_mindspore()
    path = Path(folder) / f"{stem}.py"
    path.write_text(lowered.source)
    spec = importlib.util.spec_from_file_location(f"vlmrt_ms_{stem}_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # MindSpore's graph parser imports the module of `construct` by name
    spec.loader.exec_module(module)
    cell = module.Graph()
    for name, t in lowered.weights.items():
        setattr(cell, name, ms.Parameter(to_ms(t), name=name, requires_grad=False))
    cell.set_train(False)
    if dynamic:
        cell.set_inputs(*[ms.Tensor(shape=shape, dtype=ms_dtype(ms, dtype)) for _, dtype, shape in lowered.input_specs])
    return cell


def ms_dtype(ms, name: str):
    """"float32" -> ms.float32 ("bool" -> ms.bool_)."""
    return getattr(ms, MS_DTYPES.get(name, f"ms.{name}")[3:])
