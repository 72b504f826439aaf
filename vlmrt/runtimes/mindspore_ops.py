"""The ATen ops that take more than one MindSpore call, for the lowered stages
(vlmrt/runtimes/mindspore_lower.py).

Each follows the ATen schema of the op it stands for (argument order and defaults), so the lowering
writes one call per node. MindSpore's graph compiler parses these functions with the stage source;
shapes are known when a graph compiles (one graph per input shape), so sizes and bounds are plain
Python ints here. Imported by the generated stage sources only.
"""

from __future__ import annotations

from mindspore import ops

INF, NAN = float("inf"), float("nan")  # the lowered sources' non-finite literals
matmul_t = ops.MatMul(transpose_b=True)  # a [M,K] @ b [N,K]^T: a linear layer on its [out,in] weight, uncopied


def scalar(value, dtype):
    """A 0-D tensor (a Python number as an operand where MindSpore wants a tensor)."""
    return ops.scalar_to_tensor(value, dtype)


def bounds(n, start, end, step):
    """ATen's slice bounds on a dim of size n: None and out-of-range values clamped."""
    start = 0 if start is None else start
    end = n if end is None else end
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    start = min(max(start, 0), n)
    end = min(max(end, start), n)
    return start, end, step


def slice(x, dim, start=None, end=None, step=1):  # noqa: A001 (the ATen op's name)
    """aten.slice.Tensor: x[start:end:step] on `dim`."""
    shape = x.shape
    nd = len(shape)
    dim = dim + nd if dim < 0 else dim
    start, end, step = bounds(shape[dim], start, end, step)
    begin = (0,) * dim + (start,) + (0,) * (nd - dim - 1)
    stop = tuple(shape[:dim]) + (end,) + tuple(shape[dim + 1:])
    strides = (1,) * dim + (step,) + (1,) * (nd - dim - 1)
    return ops.strided_slice(x, begin, stop, strides)


def select(x, dim, index):
    """aten.select.int: x[..., index, ...] on `dim` (the dim dropped)."""
    nd = len(x.shape)
    dim = dim + nd if dim < 0 else dim
    index = index + x.shape[dim] if index < 0 else index
    return ops.squeeze(slice(x, dim, index, index + 1, 1), dim)


def squeeze(x, dims):
    """aten.squeeze.dims: drop the listed dims of size 1 (others stay, as in torch)."""
    nd = len(x.shape)
    drop = ()
    for d in dims:
        d = d + nd if d < 0 else d
        if x.shape[d] == 1:
            drop = drop + (d,)
    if not drop:
        return x
    return ops.squeeze(x, drop)


def layer_norm(x, normalized_shape, weight, bias, eps):
    """aten.native_layer_norm -> (out, mean, rstd) over the last len(normalized_shape) dims; only
    `out` is read by the models' graphs."""
    axes = tuple(range(len(x.shape) - len(normalized_shape), len(x.shape)))
    mean = ops.mean(x, axes, True)
    centred = x - mean
    var = ops.mean(centred * centred, axes, True)
    rstd = ops.rsqrt(var + eps)
    out = centred * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


def convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """aten.convolution, 2-D and not transposed (the models' patch embeddings); the bias added
    after the convolution."""
    if transposed or len(weight.shape) != 4:
        raise NotImplementedError("only 2-D, not transposed, convolutions are lowered to MindSpore")
    out = ops.conv2d(x, weight, None, tuple(stride), "pad", tuple(padding), tuple(dilation), groups)  # padding (h, w)
    if bias is not None:
        out = out + ops.reshape(bias, (1, -1, 1, 1))
    return out


def div_mode(a, b, dtype, compute, rounding_mode=None):
    """aten.div.Tensor_mode: a / b rounded "trunc" or "floor", in `dtype`, computed in `compute`
    (integers through float64: exact below 2**53); a or b may be a Python number."""
    a = scalar(a, compute) if isinstance(a, (int, float)) else ops.cast(a, compute)
    b = scalar(b, compute) if isinstance(b, (int, float)) else ops.cast(b, compute)
    q = a / b
    q = ops.floor(q) if rounding_mode == "floor" else ops.trunc(q)
    return ops.cast(q, dtype)


def index(x, indices):
    """aten.index.Tensor: x[..., i0, i1, ...] with integer index tensors on adjacent dims (None for
    the dims before them), broadcast together: out [x dims before, index shape, x dims after]."""
    dims = ()
    for i in range(len(indices)):
        if indices[i] is not None:
            dims = dims + (i,)
    p, k = dims[0], len(dims)
    if k == 1:
        return ops.gather(x, indices[p], p)
    if dims != tuple(range(p, p + k)):
        raise NotImplementedError("aten.index on non-adjacent dims is not lowered to MindSpore")
    idx = broadcast([indices[d] for d in dims])
    nd, r = len(x.shape), len(idx[0].shape)
    xt = ops.transpose(x, tuple(range(p, p + k)) + tuple(range(p)) + tuple(range(p + k, nd))) if p else x
    out = ops.gather_nd(xt, ops.stack(idx, -1))  # [*I, x dims before, x dims after]
    if p:
        out = ops.transpose(out, tuple(range(r, r + p)) + tuple(range(r)) + tuple(range(r + p, r + nd - k)))
    return out


def broadcast(tensors):
    """Tensors broadcast to their common shape (a list)."""
    rank = 0
    for t in tensors:
        rank = max(rank, len(t.shape))
    shape = (1,) * rank
    for t in tensors:
        s = (1,) * (rank - len(t.shape)) + tuple(t.shape)
        merged = ()
        for i in range(rank):
            merged = merged + (max(shape[i], s[i]),)
        shape = merged
    return [ops.broadcast_to(t, shape) for t in tensors]


def max_dim(x, dim, keepdim=False):
    """aten.max.dim -> (values, indices)."""
    return ops.amax(x, dim, keepdim), ops.argmax(x, dim, keepdim)
