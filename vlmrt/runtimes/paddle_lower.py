"""PyTorch stages as Paddle programs: a `torch.export` program, decomposed to core ATen, is written
out as Python source that calls Paddle, one line per graph node; `paddle.jit.to_static` then turns
that source into a static graph. The one place that knows how an ATen op reads in Paddle.

```
 stage module ─► torch.export (dynamic batch/sequence/cache dims) ─► run_decompositions() (core ATen)
   ─► per node: OPS[aten overload](args) ─► one line of Paddle      weights ─► persistable buffers
   ─► <stage>.py (class Graph(paddle.nn.Layer), forward(self, *inputs)) ─► paddle.jit.to_static(
      input_spec: the dynamic dims as None) ─► a static program: live calls, or paddle.jit.save
```

- Symbolic sizes (`sym_size.int`) become `paddle.shape(x)[d]`, 0-D tensors inside the program, so
  one program serves every batch, prompt length and cache length.
- ATen promotes dtypes implicitly and Paddle does not: every elementwise op casts its tensor
  operands to the dtype torch computed in (read from the node's example value), so the Paddle
  program computes in the dtypes the PyTorch one did.
- The weights are the Layer's persistable buffers (in `.pdiparams` once saved), never constants
  folded into the program.
- An op missing from `OPS` is a VlmrtError naming it (and the stage), at lowering time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmrt.runtimes import aten_lower
from vlmrt.runtimes.aten_lower import dtype_name, folded_into_matmul, transposed


class Writer(aten_lower.Writer):
    """Renders node arguments as Paddle source (dtypes as Paddle's strings)."""

    framework = "Paddle"
    cast_call = "paddle.cast"


_meta, _is_tensor, _compute_dtype, _defaults = (aten_lower.meta, aten_lower.is_tensor, aten_lower.compute_dtype,
                                                aten_lower.schema_args)


def _binary(fmt: str, compare: bool = False):
    """An elementwise op of two operands: `fmt` with {a}, {b}, operands cast to the compute dtype."""
    def emit(w: Writer, node, a, b, alpha=1, **_):
        dtype = _compute_dtype([a, b]) if compare else node.meta["val"].dtype
        left, right = w.cast(a, dtype), w.cast(b, dtype)
        if alpha != 1:
            right = f"({right} * {w.value(alpha)})"
        if not _is_tensor(a) and not _is_tensor(b):
            return fmt.format(a=left, b=right)
        if not _is_tensor(a):  # scalar first: Paddle's operators want the tensor on the left or a full tensor
            left = f"paddle.full([], {left}, {dtype_name(dtype)!r})"
        return fmt.format(a=left, b=right)
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
        dtype = repr(dtype_name(out.dtype)) if isinstance(out, torch.Tensor) else "None"
        return fmt.format(*[w.value(a) for a in args], dtype=dtype)
    return emit


def _where(w: Writer, node, cond, a, b, **_):
    dtype = node.meta["val"].dtype
    full = lambda v: w.cast(v, dtype) if _is_tensor(v) else f"paddle.full([], {w.cast(v, dtype)}, {dtype_name(dtype)!r})"
    return f"paddle.where({w.value(cond)}, {full(a)}, {full(b)})"


def _to_copy(w: Writer, node, x, dtype=None, **_):
    return w.cast(x, node.meta["val"].dtype)  # no op when x has that dtype already (a device or layout copy)


def _arange(w: Writer, node, *args, **_):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (tuple(args) + (1,))[:3]
    return f"paddle.arange({w.value(start)}, {w.value(end)}, {w.value(step)}, dtype={dtype_name(node.meta['val'].dtype)!r})"


def _full(w: Writer, node, size, value, **_):
    return f"paddle.full({w.value(size)}, {w.value(value)}, {dtype_name(node.meta['val'].dtype)!r})"


def _full_like(w: Writer, node, x, value, **_):
    return f"paddle.full_like({w.value(x)}, {w.value(value)}, {dtype_name(node.meta['val'].dtype)!r})"


def _reduce(fn: str):
    def emit(w: Writer, node, x, dim=None, keepdim=False, **_):
        dtype = node.meta["val"].dtype
        axis = "None" if dim is None else w.value(dim)
        return f"{fn}({w.cast(x, dtype)}, axis={axis}, keepdim={keepdim!r})"
    return emit


def _any(w: Writer, node, x, dim=None, keepdim=False, **_):
    axis = "None" if dim is None else w.value(dim)
    return f"paddle.any(paddle.cast({w.value(x)}, 'bool'), axis={axis}, keepdim={keepdim!r})"


def _matmul(w: Writer, a, b) -> str:
    """a @ b; when b is a transpose (a linear layer's `permute(weight, [1, 0])`), the matmul reads
    its source with transpose_y (BLAS transposes on the fly), so the weight is never copied."""
    src = transposed(b)
    if src is not None:
        return f"paddle.matmul({w.value(a)}, {w.value(src)}, transpose_y=True)"
    return f"paddle.matmul({w.value(a)}, {w.value(b)})"


def _mm(w: Writer, node, a, b, **_):
    return _matmul(w, a, b)


def _addmm(w: Writer, node, bias, a, b, beta=1, alpha=1, **_):
    mm = _matmul(w, a, b)
    mm = mm if alpha == 1 else f"({mm} * {w.value(alpha)})"
    return f"({mm} + {w.value(bias)})" if beta == 1 else f"({mm} + {w.value(bias)} * {w.value(beta)})"


def _cumsum(w: Writer, node, x, dim, dtype=None, **_):
    return f"paddle.cumsum({w.cast(x, node.meta['val'].dtype)}, axis={w.value(dim)})"


def _softmax(w: Writer, node, x, dim, half_to_float=False, **_):
    return f"F.softmax({w.value(x)}, axis={w.value(dim)})"


def _gelu(w: Writer, node, x, approximate="none", **_):
    return f"F.gelu({w.value(x)}, approximate={approximate == 'tanh'!r})"


def _pow(w: Writer, node, a, b, **_):
    dtype = node.meta["val"].dtype
    if not _is_tensor(a):
        return f"paddle.pow(paddle.full([], {w.cast(a, dtype)}, {dtype_name(dtype)!r}), {w.cast(b, dtype)})"
    return f"paddle.pow({w.cast(a, dtype)}, {w.cast(b, dtype)})"


def _div_mode(w: Writer, node, a, b, rounding_mode=None, **_):
    return f"ops.div_mode({w.value(a)}, {w.value(b)}, {dtype_name(node.meta['val'].dtype)!r}, {rounding_mode!r})"


OPS = {  # aten overload -> emitter(writer, node, *args, **kwargs) -> a Paddle expression
    "aten._softmax.default": _softmax,
    "aten._to_copy.default": _to_copy,
    "aten.abs.default": _unary("paddle.abs"),
    "aten.add.Scalar": _binary("({a} + {b})"),
    "aten.add.Tensor": _binary("({a} + {b})"),
    "aten.addmm.default": _addmm,
    "aten.alias.default": _call("{0}"),
    "aten.amax.default": _reduce("paddle.amax"),
    "aten.any.dim": _any,
    "aten.any.dims": _any,
    "aten.arange.default": _arange,
    "aten.arange.start": _arange,
    "aten.arange.start_step": _arange,
    "aten.bitwise_and.Tensor": _binary("paddle.bitwise_and({a}, {b})", compare=True),
    "aten.bitwise_not.default": _call("paddle.bitwise_not({0})"),
    "aten.bitwise_or.Tensor": _binary("paddle.bitwise_or({a}, {b})", compare=True),
    "aten.bmm.default": _call("paddle.matmul({0}, {1})"),
    "aten.cat.default": _call("paddle.concat({0}, axis={1})"),
    "aten.ceil.default": _unary("paddle.ceil"),
    "aten.clamp.default": _call("paddle.clip({0}, {1}, {2})"),
    "aten.clone.default": _call("{0}"),
    "aten.convolution.default": _call("ops.convolution({0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8})"),
    "aten.copy.default": _call("paddle.cast({1}, {dtype})"),
    "aten.cos.default": _unary("paddle.cos"),
    "aten.cumsum.default": _cumsum,
    "aten.div.Tensor": _binary("({a} / {b})"),
    "aten.div.Tensor_mode": _div_mode,
    "aten.embedding.default": _call("F.embedding({1}, {0})"),
    "aten.eq.Scalar": _binary("({a} == {b})", compare=True),
    "aten.eq.Tensor": _binary("({a} == {b})", compare=True),
    "aten.erf.default": _unary("paddle.erf"),
    "aten.exp.default": _unary("paddle.exp"),
    "aten.expand.default": _call("paddle.expand({0}, {1})"),
    "aten.floor.default": _unary("paddle.floor"),
    "aten.full.default": _full,
    "aten.full_like.default": _full_like,
    "aten.gather.default": _call("paddle.take_along_axis({0}, {2}, axis={1}, broadcast=False)"),
    "aten.ge.Scalar": _binary("({a} >= {b})", compare=True),
    "aten.ge.Tensor": _binary("({a} >= {b})", compare=True),
    "aten.gelu.default": _gelu,
    "aten.gt.Scalar": _binary("({a} > {b})", compare=True),
    "aten.gt.Tensor": _binary("({a} > {b})", compare=True),
    "aten.index.Tensor": _call("ops.index({0}, {1})"),
    "aten.le.Scalar": _binary("({a} <= {b})", compare=True),
    "aten.le.Tensor": _binary("({a} <= {b})", compare=True),
    "aten.log.default": _unary("paddle.log"),
    "aten.logical_and.default": _call("paddle.logical_and({0}, {1})"),
    "aten.logical_not.default": _call("paddle.logical_not({0})"),
    "aten.logical_or.default": _call("paddle.logical_or({0}, {1})"),
    "aten.lt.Scalar": _binary("({a} < {b})", compare=True),
    "aten.lt.Tensor": _binary("({a} < {b})", compare=True),
    "aten.max.dim": _call("ops.max_dim({0}, {1}, {2})"),
    "aten.maximum.default": _binary("paddle.maximum({a}, {b})"),
    "aten.mean.dim": _reduce("paddle.mean"),
    "aten.minimum.default": _binary("paddle.minimum({a}, {b})"),
    "aten.mm.default": _mm,
    "aten.mul.Scalar": _binary("({a} * {b})"),
    "aten.mul.Tensor": _binary("({a} * {b})"),
    "aten.native_layer_norm.default": _call("ops.layer_norm({0}, {1}, {2}, {3}, {4})"),
    "aten.ne.Scalar": _binary("({a} != {b})", compare=True),
    "aten.ne.Tensor": _binary("({a} != {b})", compare=True),
    "aten.neg.default": _call("(-{0})"),
    "aten.permute.default": _call("paddle.transpose({0}, {1})"),
    "aten.pow.Scalar": _pow,
    "aten.pow.Tensor_Scalar": _pow,
    "aten.pow.Tensor_Tensor": _pow,
    "aten.prod.dim_int": _reduce("paddle.prod"),
    "aten.reciprocal.default": _unary("paddle.reciprocal"),
    "aten.remainder.Scalar": _binary("({a} % {b})"),
    "aten.remainder.Tensor": _binary("({a} % {b})"),
    "aten.repeat.default": _call("paddle.tile({0}, {1})"),
    "aten.rsqrt.default": _unary("paddle.rsqrt"),
    "aten.rsub.Scalar": _binary("({b} - {a})"),
    "aten.scalar_tensor.default": _call("paddle.full([], {0}, {dtype})"),
    "aten.scatter.src": _call("paddle.put_along_axis({0}, {2}, {3}, axis={1}, reduce='assign', broadcast=False)"),
    "aten.select.int": _call("ops.select({0}, {1}, {2})"),
    "aten.sigmoid.default": _unary("F.sigmoid"),
    "aten.silu.default": _unary("F.silu"),
    "aten.sin.default": _unary("paddle.sin"),
    "aten.slice.Tensor": _call("ops.slice({0}, {1}, {2}, {3}, {4})"),
    "aten.split_with_sizes.default": _call("paddle.split({0}, {1}, axis={2})"),
    "aten.sqrt.default": _unary("paddle.sqrt"),
    "aten.squeeze.dims": _call("paddle.squeeze({0}, axis={1})"),
    "aten.sub.Tensor": _binary("({a} - {b})"),
    "aten.sum.dim_IntList": _reduce("paddle.sum"),
    "aten.tanh.default": _unary("paddle.tanh"),
    "aten.unsqueeze.default": _call("paddle.unsqueeze({0}, {1})"),
    "aten.view.default": _call("paddle.reshape({0}, {1})"),
    "aten._unsafe_view.default": _call("paddle.reshape({0}, {1})"),
    "aten.where.self": _where,
    "aten.sym_size.int": _call("paddle.shape({0})[{1}]"),
}
TABLE = "vlmrt/runtimes/paddle_lower.py OPS"


def node_line(w: Writer, node, stage: str) -> str | None:
    """One node as `name = <paddle expression>` (None: a check with no value)."""
    return aten_lower.node_line(w, node, stage, OPS, TABLE)


@dataclass(frozen=True)
class LoweredStage:
    """A stage as Paddle source plus what the Layer needs around it."""

    source: str  # a module defining `class Graph(paddle.nn.Layer)`
    weights: dict  # buffer name -> torch tensor (the program's parameters, buffers and lifted constants)
    input_specs: list  # (name, dtype, shape with None for dynamic dims), in forward order
    output_names: list


HEADER = '''"""{stage} stage of {model}, lowered from its torch.export program (core ATen) by vlmrt; generated."""

import paddle
import paddle.nn.functional as F

from vlmrt.runtimes import paddle_ops as ops


class Graph(paddle.nn.Layer):
    def forward(self, {args}):
'''


def lower_program(ep, input_names: list[str], output_names: list[str], stage: str, model: str) -> LoweredStage:
    """A decomposed torch.export program -> Paddle source (see the module docstring).

    Args:
        ep: the ExportedProgram, after `run_decompositions()`.
        input_names: the stage's input names, in the program's user-input order.
        output_names: its output names, in order.
        stage: the stage, for messages and the header.
        model: the model name, for the header.
    """
    weights, user, lines = aten_lower.lower_nodes(ep, Writer(), stage, OPS, TABLE, skip=folded_into_matmul)
    specs = []
    for name, node in zip(input_names, user):
        val = node.meta["val"]
        specs.append((name, dtype_name(val.dtype), [int(d) if isinstance(d, int) else None for d in val.shape]))
    header = HEADER.format(stage=stage, model=model, args=", ".join(n.name for n in user))
    source = header + "".join(f"        {line}\n" for line in lines)
    return LoweredStage(source, weights, specs, list(output_names))


# ----------------------------------------------------------------------------- Paddle programs
def build_layer(lowered: LoweredStage, folder, stem: str):
    """The lowered stage as a static Paddle program: its source written to `folder`/<stem>.py and
    imported, the weights as persistable buffers, `paddle.jit.to_static` over input specs whose
    dynamic dims are None (one program for every shape), built now."""
    import importlib.util
    from pathlib import Path

    from vlmrt.runtimes.paddle import import_paddle, to_paddle

    paddle = import_paddle()
    path = Path(folder) / f"{stem}.py"
    path.write_text(lowered.source)
    spec = importlib.util.spec_from_file_location(f"vlmrt_paddle_{stem}_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    layer = module.Graph()
    for name, t in lowered.weights.items():
        layer.register_buffer(name, to_paddle(t), persistable=True)
    layer.eval()
    specs = [paddle.static.InputSpec(shape, dtype, name) for name, dtype, shape in lowered.input_specs]
    static = paddle.jit.to_static(layer, input_spec=specs, full_graph=True)
    static.forward.concrete_program  # noqa: B018 (traces the source into the program now)
    return static
