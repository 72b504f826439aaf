"""The ATen ops that take more than one Paddle call, for the lowered stages (vlmrt/runtimes/paddle_lower.py).

Each follows the ATen schema of the op it stands for (argument order and defaults), so the lowering
writes one call per node. Imported by the generated stage sources only.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

INT64_MAX = 2**63 - 1


def convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """aten.convolution (not transposed): conv1d/2d/3d by the weight's rank."""
    if transposed:
        raise NotImplementedError("transposed convolution is not lowered to Paddle")
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(weight.shape)]
    return conv(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def div_mode(a, b, dtype, rounding_mode=None):
    """aten.div.Tensor_mode: a / b rounded "trunc" or "floor", in `dtype` (integers through float64:
    exact below 2**53); a or b may be a Python number."""
    compute = "float64" if dtype.startswith(("int", "uint")) else dtype
    number = (int, float)  # a static program's tensors are not paddle.Tensor instances: test for numbers
    a = paddle.full([], a, compute) if isinstance(a, number) else paddle.cast(a, compute)
    b = paddle.full([], b, compute) if isinstance(b, number) else paddle.cast(b, compute)
    q = paddle.floor(a / b) if rounding_mode == "floor" else paddle.trunc(a / b)
    return paddle.cast(q, dtype)


def layer_norm(x, normalized_shape, weight, bias, eps):
    """aten.native_layer_norm -> (out, mean, rstd); only `out` is read by the models' graphs."""
    return F.layer_norm(x, normalized_shape, weight, bias, eps), None, None


def select(x, dim, index):
    """aten.select.int: x[..., index, ...] on `dim` (the dim dropped)."""
    return paddle.squeeze(slice(x, dim, index, index + 1 if index != -1 else INT64_MAX, 1), axis=dim)


def slice(x, dim, start=None, end=None, step=1):  # noqa: A001 (the ATen op's name)
    """aten.slice.Tensor: x[start:end:step] on `dim`; None and out-of-range bounds are clamped."""
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end
    return paddle.strided_slice(x, axes=[dim], starts=[start], ends=[end], strides=[step])


def index(x, indices):
    """aten.index.Tensor: x[..., i0, i1, ...] with integer index tensors on adjacent dims (None for
    the dims before them), broadcast together: out [x dims before, index shape, x dims after]."""
    dims = [i for i, t in enumerate(indices) if t is not None]
    p, k = dims[0], len(dims)
    if dims != list(range(p, p + k)):
        raise NotImplementedError("aten.index on non-adjacent dims is not lowered to Paddle")
    idx = [indices[d] for d in dims]
    if any(t.dtype == paddle.bool for t in idx):
        raise NotImplementedError("boolean indexing is not lowered to Paddle (data-dependent shape)")
    idx = paddle.broadcast_tensors(idx) if k > 1 else idx
    nd, r = len(x.shape), len(idx[0].shape)
    xt = paddle.transpose(x, list(range(p, p + k)) + list(range(p)) + list(range(p + k, nd))) if p else x
    out = paddle.gather_nd(xt, paddle.stack(idx, axis=-1))  # [*I, x dims before, x dims after]
    if p:
        out = paddle.transpose(out, list(range(r, r + p)) + list(range(r)) + list(range(r + p, r + nd - k)))
    return out


def max_dim(x, dim, keepdim=False):
    """aten.max.dim -> (values, indices)."""
    return paddle.max(x, axis=dim, keepdim=keepdim), paddle.argmax(x, axis=dim, keepdim=keepdim)
