"""The framework-neutral half of lowering a `torch.export` program (decomposed to core ATen) to
another framework's Python source, one line per graph node. Each framework brings its own op
table (aten overload -> emitter) and Writer; this module walks the graph.

```
 ExportedProgram ─► placeholders: weights (parameters, buffers, lifted constants) | user inputs
                 ─► call_function nodes: getitem / size arithmetic here, the rest through the table
                 ─► output node: `return (a, b, ...)`
```

Used by vlmrt/runtimes/paddle_lower.py and vlmrt/runtimes/mindspore_lower.py.
"""

from __future__ import annotations

import math
import operator

import torch

from vlmrt.errors import VlmrtError

SKIPPED = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default",
           "aten.sym_constrain_range.default", "aten._assert_async.msg"}  # checks only: no value
SYM_OPS = {operator.mul: "*", operator.add: "+", operator.sub: "-", operator.floordiv: "//"}  # on sizes


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32"."""
    return str(dtype).replace("torch.", "")


def meta(x):
    """A node's example value (None for a literal)."""
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else None


def is_tensor(x) -> bool:
    return isinstance(meta(x), torch.Tensor)


class Writer:
    """Renders node arguments as source (Nodes by name, scalars and lists as literals); a framework
    sets `framework`, `cast_call` and, where its dtypes are not strings, `dtype`."""

    framework = "the target framework"
    cast_call = "cast"  # cast_call(x, dtype)
    sequence = "[{}]"  # how a list argument reads

    def dtype(self, dtype: torch.dtype) -> str:
        return repr(dtype_name(dtype))

    def value(self, x) -> str:
        if isinstance(x, torch.fx.Node):
            return x.name
        if isinstance(x, (list, tuple)):
            items = ", ".join(self.value(v) for v in x)
            return self.sequence.format(items + ("," if len(x) == 1 and self.sequence.startswith("(") else ""))
        if isinstance(x, bool) or x is None:
            return repr(x)
        if isinstance(x, float):
            return repr(x) if math.isfinite(x) else f"float('{x}')"
        if isinstance(x, int):
            return repr(x)
        if isinstance(x, torch.dtype):
            return self.dtype(x)
        raise VlmrtError(f"cannot write {type(x).__name__} {x!r} as a {self.framework} argument")

    def cast(self, x, dtype: torch.dtype) -> str:
        """x cast to `dtype` when it is a tensor of another dtype (scalars stay Python numbers)."""
        m = meta(x)
        if isinstance(m, torch.Tensor) and m.dtype != dtype:
            return f"{self.cast_call}({x.name}, {self.dtype(dtype)})"
        if isinstance(m, (torch.SymInt, torch.SymFloat)):
            return self.size_cast(x, dtype)
        if isinstance(x, bool) and dtype.is_floating_point:
            return repr(float(x))
        return self.value(x)

    def size_cast(self, x, dtype: torch.dtype) -> str:
        """A symbolic size used as an operand (Paddle: a 0-D int64 tensor, cast like one)."""
        return f"{self.cast_call}({x.name}, {self.dtype(dtype)})"


def transposed(x):
    """The 2-D tensor `x` is the transpose of (x = permute(t, [1, 0])), else None."""
    if isinstance(x, torch.fx.Node) and str(x.target) == "aten.permute.default" and list(x.args[1]) == [1, 0]:
        return x.args[0]
    return None


def folded_into_matmul(node) -> bool:
    """A transpose every user of which reads it as the right operand of mm/addmm: a framework whose
    matmul reads its right operand transposed (transpose_y, transpose_b) writes those users on the
    transpose's source, and the transpose not at all (`lower_nodes(skip=...)`), so a linear layer's
    weight is not copied per call."""
    if transposed(node) is None or not node.users:
        return False
    right = {"aten.mm.default": 1, "aten.addmm.default": 2}
    return all(right.get(str(u.target)) is not None and u.args[right[str(u.target)]] is node
               and node not in u.args[:right[str(u.target)]] for u in node.users)


def compute_dtype(args) -> torch.dtype:
    """The dtype torch computes an elementwise op in, from its operands (tensors by their example value)."""
    probes = []
    for a in args:
        m = meta(a)
        if isinstance(m, torch.Tensor):
            probes.append(torch.empty((0,) * min(m.dim(), 1), dtype=m.dtype))
        elif isinstance(a, (bool, int, float)):
            probes.append(a)
        elif isinstance(m, (torch.SymInt, torch.SymFloat)):
            probes.append(1 if isinstance(m, torch.SymInt) else 1.0)
    if not any(isinstance(p, torch.Tensor) for p in probes):
        return torch.float32
    out = probes[0] if isinstance(probes[0], torch.Tensor) else torch.tensor(probes[0])
    dtype = out.dtype
    for p in probes[1:]:
        dtype = torch.result_type(torch.empty(out.shape, dtype=dtype), p)
        out = torch.empty(out.shape if not isinstance(p, torch.Tensor) or p.dim() <= out.dim() else p.shape, dtype=dtype)
    return dtype


def schema_args(node) -> tuple[list, dict]:
    """A node's args with the schema's defaults filled in for the missing trailing ones."""
    args, kwargs = list(node.args), dict(node.kwargs)
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            if a.kwarg_only or i < len(args) or a.name in kwargs:
                continue
            if not a.has_default_value():
                break
            args.append(a.default_value)
    return args, kwargs


def node_line(w: Writer, node, stage: str, ops: dict, table: str) -> str | None:
    """One node as `name = <expression>` (None: a check with no value).

    Args:
        w: the framework's Writer.
        node: a call_function node.
        stage: the stage, for messages.
        ops: the framework's table, aten overload name -> emitter(w, node, *args, **kwargs).
        table: where that table lives, for the message naming a missing op.
    """
    target = node.target
    if target is operator.getitem:
        return f"{node.name} = {node.args[0].name}[{node.args[1]}]"
    if target in SYM_OPS:
        a, b = node.args
        return f"{node.name} = {w.value(a)} {SYM_OPS[target]} {w.value(b)}"
    key = str(target)
    if key in SKIPPED:
        return None
    if key not in ops:
        raise VlmrtError(f"the {stage} stage uses {key}, which the {w.framework} lowering does not know yet "
                         f"({table}); run it on another runtime")
    args, kwargs = schema_args(node)
    return f"{node.name} = {ops[key](w, node, *args, **kwargs)}"


def lower_nodes(ep, w: Writer, stage: str, ops: dict, table: str, skip=None) -> tuple[dict, list, list[str]]:
    """Walk a decomposed program: (weights: placeholder name -> torch tensor, the user-input
    placeholder nodes in order, the body's source lines, weights read as `self.<name>`).
    `skip(node)` True: a node its users' emitters read through (e.g. a transpose folded into a
    matmul), not written."""
    sig = ep.graph_signature
    state = {**ep.state_dict, **getattr(ep, "constants", {})}
    weights, user, lines = {}, [], []
    for spec, node in zip(sig.input_specs, (n for n in ep.graph.nodes if n.op == "placeholder")):
        if spec.kind.name == "USER_INPUT":
            user.append(node)
        elif node.users:
            weights[node.name] = state[spec.target]
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in weights:
            lines.append(f"{node.name} = self.{node.name}")
        elif node.op == "call_function" and not (skip and skip(node)):
            line = node_line(w, node, stage, ops, table)
            if line:
                lines.append(line)
        elif node.op == "output":
            lines.append(f"return ({''.join(w.value(v) + ', ' for v in node.args[0])})")
    return weights, user, lines
