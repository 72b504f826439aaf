"""Weight formats: a linear layer's weights are swapped for a packed, lower-precision copy at load
time, so every family keeps its own modules and int8/int4 are independent of them.

```
 LoadedModel (fp32 weights) + WeightConfig(format, group_size, symmetric, lm_head, vision)
   └► quantize_model(model, cfg): for each nn.Linear picked by `select_linears`
        decoder:  {lm}.model.** (attention q/k/v/o, MLP gate/up/down)  + {lm}.lm_head (cfg.lm_head)
        vision:   every other nn.Linear                                 (cfg.vision only)
        nn.Linear [N,K] ─► LinearMethod.quantize(weight) ─► QuantizedLinear(method, packed buffers, bias)
   embeddings, norms, convolutions and attention stay at the model dtype
```

`{lm}` is the module that holds `lm_head` (the language model); a tied lm_head is quantized as a
copy and the embedding table keeps its own precision. With int4 the lm_head is int8 by default
(`head`), as llama.cpp keeps `output.weight` at 6 bits (q6_K) in its q4_0 models and AWQ/GPTQ
checkpoints keep it at 16 bits: logits take the head's rounding error directly, with no layer after
it to average it out. `int4-head4` quantizes it to int4 too; `-nohead` keeps it at the model dtype.

Formats (one LinearMethod each; the kernels are PyTorch's own CPU packed matmuls, which read
bf16 activations: x is cast to bf16 for the matmul and the result back to the model dtype):
- fp16 / bf16: the weight stored in 16 bits, matmul in that dtype (half the bytes of fp32).
- int8: symmetric per output channel, q = round(w / s) in [-127, 127], s = max|w| / 127;
  `torch._weight_int8pack_mm`. `int8-gN`: one scale per group of N input columns instead (as
  llama.cpp's q8_0 at N = 32); the same kernel once per group (it takes one scale per channel),
  the partial products summed in fp32.
- int4: per group of `group_size` input columns, asymmetric (min/max, 16 levels) or symmetric
  (s = max|w| / 7, q in [-8, 7]); `torch._convert_weight_to_int4pack_for_cpu` +
  `torch._weight_int4pack_mm_for_cpu`, whose dequantization is (q - 8) * scale + zero.
The onnx runtime quantizes with ONNX Runtime's own tools instead (vlmrt/export/quantize_onnx.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmrt.errors import VlmrtError

FORMATS = ("fp", "fp16", "bf16", "int8", "int4")  # "fp": the model's own weights, untouched
HEAD_FORMATS = ("int8", "int4")  # what an int4 model's lm_head may be
INT4_HEAD = "int8"  # an int4 model's default lm_head format (see the module docstring)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
INT8_GROUP_SIZES = (32, 64, 128, 256)  # int8-gN (0: one scale per output channel, the default)
DEFAULT_GROUP = {"int4": 32, "int8": 0}
WEIGHTS_ATTR = "_vlmrt_weight_config"  # set on a model once its linears are swapped


@dataclass(frozen=True)
class WeightConfig:
    """How a model's linear layers store their weights.

    Args:
        format: one of FORMATS.
        group_size: int4 and int8: input columns sharing one scale (and zero); must divide every width.
            0: the format's default (int4: 32; int8: one scale per output channel). Resolved at construction.
        symmetric: int4 only: scale only, no zero point (int8 is always symmetric per channel).
        lm_head: also quantize the output projection (tied or not).
        vision: also quantize the vision stage's linear layers (tower, bridge, projector).
        head: the output projection's format when `lm_head`: "" for the default (int8 with int4, the
            format itself otherwise), or "int8" / "int4" with int4. Resolved at construction.
    """

    format: str = "fp"
    group_size: int = 0
    symmetric: bool = False
    lm_head: bool = True
    vision: bool = False
    head: str = ""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise VlmrtError(f"unknown weight format {self.format!r}; choose one of {', '.join(FORMATS[1:])} "
                             "(or leave --quantize out for the model's own weights)")
        object.__setattr__(self, "group_size", self.group_size or DEFAULT_GROUP.get(self.format, 0))
        sizes = {"int4": INT4_GROUP_SIZES, "int8": INT8_GROUP_SIZES}.get(self.format, ())
        if self.group_size and self.group_size not in sizes:
            raise VlmrtError(f"{self.format} block size {self.group_size} is not supported; choose one of "
                             f"{', '.join(map(str, sizes))}" if sizes else
                             f"{self.format} weights take no block size (int8 and int4 do)")
        default = INT4_HEAD if self.format == "int4" else self.format
        if self.head not in ("", default) and not (self.format == "int4" and self.head in HEAD_FORMATS):
            raise VlmrtError(f"lm_head format {self.head!r} with {self.format}: only int4 weights take a head format "
                             f"({', '.join(HEAD_FORMATS)}); use -nohead to keep lm_head at the model dtype")
        object.__setattr__(self, "head", self.head or default)  # "" and the default compare equal

    @property
    def is_fp(self) -> bool:
        return self.format == "fp"

    @property
    def tag(self) -> str:
        """A short name for cache folders and labels, e.g. "int4-g32-asym-head8"."""
        if self.is_fp:
            return "fp"
        tag = self.format
        if self.format == "int8" and self.group_size:
            tag += f"-g{self.group_size}"
        if self.format == "int4":
            tag += f"-g{self.group_size}-{'sym' if self.symmetric else 'asym'}"
            if self.lm_head:
                tag += f"-head{self.head[3:]}"
        if not self.lm_head:
            tag += "-nohead"
        return tag + ("-vision" if self.vision else "")


# ----------------------------------------------------------------------------- formats
class LinearMethod:
    """One weight format: how a weight [N,K] is packed and how y = x W^T + b is computed from it."""

    name = "fp"

    def __init__(self, cfg: WeightConfig):
        self.cfg = cfg

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """weight [N,K] (any float dtype) -> named buffers of the packed weight."""
        raise NotImplementedError

    def dequantize(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The weight [N,K] in fp32 that `apply` multiplies by (for tests and error bounds)."""
        raise NotImplementedError

    def apply(self, packed: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [M,K] -> x W^T [M,N], in x's dtype (no bias); a format may return padding columns past N."""
        raise NotImplementedError


class HalfLinear(LinearMethod):
    """fp16 / bf16 weights; the matmul runs in that dtype."""

    def __init__(self, cfg: WeightConfig):
        super().__init__(cfg)
        self.name = cfg.format
        self.dtype = torch.float16 if cfg.format == "fp16" else torch.bfloat16

    def quantize(self, weight):
        return {"weight": weight.to(self.dtype).contiguous()}

    def dequantize(self, packed, shape):
        return packed["weight"].float()

    def apply(self, packed, x):
        return F.linear(x.to(self.dtype), packed["weight"]).to(x.dtype)


class Int8Linear(LinearMethod):
    """int8 weights (symmetric), one fp scale per output channel, or per group of `group_size` input
    columns (`int8-gN`)."""

    name = "int8"

    def quantize(self, weight, absmax: torch.Tensor | None = None):
        """`absmax` [N]: each row's absmax over the full width, for a row-parallel slice of the weight
        (vlmrt.tp), whose per-channel scales are those of its full rows."""
        w = weight.float()
        gs = self.cfg.group_size or w.shape[1]
        g = w.reshape(w.shape[0], -1, gs)  # [N,G,gs]
        if absmax is not None and self.cfg.group_size:
            raise VlmrtError("a row-parallel slice has per-channel int8 scales only, not int8-gN")
        amax = g.abs().amax(-1) if absmax is None else absmax.float().reshape(-1, 1)  # [N,G]
        scale = (amax / 127).clamp(min=1e-12).to(torch.bfloat16)  # [N,G], as the kernel reads it
        q = torch.round(g / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)  # [N,G,gs]
        if not self.cfg.group_size:
            return {"qweight": q.reshape(w.shape).contiguous(), "scales": scale[:, 0].contiguous()}
        return {"qweight": q.transpose(0, 1).contiguous(), "scales": scale.T.contiguous()}  # [G,N,gs], [G,N]

    def dequantize(self, packed, shape):
        if not self.cfg.group_size:
            return packed["qweight"].float() * packed["scales"].float()[:, None]
        deq = packed["qweight"].float() * packed["scales"].float()[..., None]  # [G,N,gs]
        return deq.transpose(0, 1).reshape(shape)

    def apply(self, packed, x):
        xb = x.to(torch.bfloat16)
        if not self.cfg.group_size:
            return torch._weight_int8pack_mm(xb, packed["qweight"], packed["scales"]).to(x.dtype)
        q, s, gs = packed["qweight"], packed["scales"], self.cfg.group_size  # [G,N,gs], [G,N]
        y = torch.zeros(x.shape[0], q.shape[1], dtype=torch.float32)  # [M,N]
        for j in range(q.shape[0]):  # one scale per channel per call: a call per group
            y += torch._weight_int8pack_mm(xb[:, j * gs:(j + 1) * gs].contiguous(), q[j], s[j])
        return y.to(x.dtype)


class Int4Linear(LinearMethod):
    """int4 weights in groups of `group_size` input columns, each with a scale and a zero."""

    name = "int4"

    def _levels(self, w: torch.Tensor):
        """w [N,K] fp32 -> q [N,K] int32 in [0,15], scale [N,G], zero [N,G] with w ~ (q - 8) * scale + zero."""
        n, k = w.shape
        g = w.reshape(n, k // self.cfg.group_size, self.cfg.group_size)  # [N,G,gs]
        bf16 = lambda t: t.to(torch.bfloat16).float()  # levels are computed with the scales the kernel reads
        if self.cfg.symmetric:  # q - 8 in [-8, 7]; zero = 0
            scale = bf16((g.abs().amax(-1) / 7).clamp(min=1e-12))  # [N,G]
            zero = torch.zeros_like(scale)
        else:  # 16 levels from the group's min to its max
            lo, hi = g.amin(-1), g.amax(-1)
            scale = bf16(((hi - lo) / 15).clamp(min=1e-12))
            zero = bf16(lo + 8 * scale)
        q = torch.round((g - zero[..., None]) / scale[..., None]).clamp(-8, 7) + 8  # [N,G,gs] in [0,15]
        return q.reshape(n, k).to(torch.int32), scale, zero

    def quantize(self, weight):
        w = weight.float()
        pad = -w.shape[0] % 16  # the packed layout holds rows in tiles of 16: pad with zero rows
        q, scale, zero = self._levels(F.pad(w, (0, 0, 0, pad)))  # [N+pad,K]
        packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # [N,K/2] uint8
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [G,N,2]
        return {"qweight": packed, "scales_zeros": scales_zeros.to(torch.bfloat16), "levels": q.to(torch.uint8)}

    def dequantize(self, packed, shape):
        n, k = shape
        sz = packed["scales_zeros"].float().transpose(0, 1)  # [N,G,2]
        q = packed["levels"].float()[:n].reshape(n, k // self.cfg.group_size, self.cfg.group_size)
        return ((q - 8) * sz[:n, :, :1] + sz[:n, :, 1:]).reshape(n, k)

    def apply(self, packed, x):  # -> [M,N+pad]: QuantizedLinear drops the padding rows
        return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed["qweight"], self.cfg.group_size,
                                                 packed["scales_zeros"]).to(x.dtype)


METHODS = {"fp16": HalfLinear, "bf16": HalfLinear, "int8": Int8Linear, "int4": Int4Linear}


def linear_method(cfg: WeightConfig) -> LinearMethod:
    return METHODS[cfg.format](cfg)


def head_config(cfg: WeightConfig) -> WeightConfig:
    """The WeightConfig of the lm_head linear under `cfg` (its own format when `cfg.head` differs;
    an int4 model's int8 head is per output channel)."""
    from dataclasses import replace

    if cfg.head == cfg.format:
        return cfg
    return replace(cfg, format=cfg.head, head="", group_size=cfg.group_size if cfg.head == "int4" else 0)


class QuantizedLinear(nn.Module):
    """An nn.Linear whose weight is held by a LinearMethod (packed buffers); the bias stays fp."""

    def __init__(self, method: LinearMethod, linear: nn.Linear):
        super().__init__()
        self.method, self.in_features, self.out_features = method, linear.in_features, linear.out_features
        self._names = []
        absmax = getattr(linear, "row_absmax", None)  # a row-parallel slice (vlmrt.tp): its full rows' absmax
        w = linear.weight.detach()
        packed = method.quantize(w, absmax) if absmax is not None and isinstance(method, Int8Linear) else method.quantize(w)
        for name, t in packed.items():
            if name == "levels":  # unpacked int4 levels, for dequantize() in tests: not kept
                continue
            self.register_buffer(name, t, persistent=False)
            self._names.append(name)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def packed(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.method.apply(self.packed(), x.reshape(-1, self.in_features))  # [M,N] (int4: [M,N+pad])
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed().values())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.method.name}"


# ----------------------------------------------------------------------------- the swap
def language_model_prefix(model: nn.Module) -> str:
    """The name of the module holding `lm_head` ("" when it is the model itself), plus a dot."""
    heads = [n for n, m in model.named_modules() if n.rpartition(".")[2] == "lm_head" and isinstance(m, (nn.Linear, QuantizedLinear))]
    if len(heads) != 1:
        raise VlmrtError(f"cannot find the language model of {type(model).__name__} (expected one lm_head linear "
                         f"layer, found {len(heads)}); quantization supports the registered families only")
    owner = heads[0].rpartition(".")[0]
    return f"{owner}." if owner else ""


def select_linears(model: nn.Module, cfg: WeightConfig) -> list[str]:
    """Names of the nn.Linear modules `cfg` quantizes (see the module docstring)."""
    lm = language_model_prefix(model)
    picked = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if name == f"{lm}lm_head":
            take = cfg.lm_head
        else:
            take = name.startswith(f"{lm}model.") or cfg.vision
        if take:
            picked.append(name)
    return picked


def check_supported(cfg: WeightConfig, device: torch.device, runtime: str) -> None:
    """A clear error when `runtime` has no kernel for this format on `device`."""
    if cfg.format in ("int8", "int4") and device.type != "cpu":
        raise VlmrtError(f"--quantize {cfg.format} on the {runtime} runtime runs on CPU only (PyTorch's packed "
                         f"weight-only kernels); use --device cpu, or --runtime onnx")


def check_widths(model: nn.Module, names: list[str], cfg: WeightConfig) -> None:
    if cfg.format not in ("int4", "int8") or not cfg.group_size:
        return
    sizes = INT4_GROUP_SIZES if cfg.format == "int4" else INT8_GROUP_SIZES
    for name in names:
        k = model.get_submodule(name).in_features
        if k % cfg.group_size:
            fits = [g for g in sizes if all(model.get_submodule(n).in_features % g == 0 for n in names)]
            raise VlmrtError(f"{cfg.format} block size {cfg.group_size} does not divide the width {k} of {name}; "
                             f"choose one of {', '.join(map(str, fits)) or '(none fits this model)'}")


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: WeightConfig, runtime: str = "eager") -> nn.Module:
    """Swap `model`'s linear layers for QuantizedLinear in place (see the module docstring).

    Idempotent for the same config; a model already swapped to another format is an error.

    Args:
        model: a family model (fp weights).
        cfg: the weight format.
        runtime: the runtime's name, for error messages.

    Returns:
        The same model.
    """
    done = getattr(model, WEIGHTS_ATTR, None)
    if done is not None:
        if done != cfg:
            raise VlmrtError(f"this model's weights are already {done.tag}, not {cfg.tag}; load it again")
        return model
    if cfg.is_fp:
        return model
    device = next(model.parameters()).device
    check_supported(cfg, device, runtime)
    names = select_linears(model, cfg)
    check_widths(model, names, cfg)
    method, head = linear_method(cfg), linear_method(head_config(cfg))
    lm_head = f"{language_model_prefix(model)}lm_head"
    for name in names:
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        setattr(parent, attr, QuantizedLinear(head if name == lm_head else method, getattr(parent, attr)))
    setattr(model, WEIGHTS_ATTR, cfg)
    return model


def is_quantized(model: nn.Module | None) -> bool:
    return model is not None and getattr(model, WEIGHTS_ATTR, None) is not None


def decoder_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights one decode step reads: every decoder layer's linears and norms, the final
    norm and lm_head (the embedding table is read one row per token, so it is left out)."""
    lm = language_model_prefix(model)
    total, seen = 0, set()
    for name, m in model.named_modules():
        in_decoder = name.startswith(f"{lm}model.") or name == f"{lm}lm_head"
        if not in_decoder or name.endswith("embed_tokens"):
            continue
        if isinstance(m, QuantizedLinear):
            total += m.weight_bytes()
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total



# ----------------------------------------------------------------------------- specs and runtimes
def parse_weights(spec: str | None, vision: bool = False) -> WeightConfig:
    """A `--quantize` value -> WeightConfig: FORMAT[-gN][-sym|-asym][-head8|-head4|-nohead], e.g.
    "int8" (per output channel), "int8-g32" (a scale per 32 input columns), "int4" (block 32,
    asymmetric, lm_head int8), "int4-g128-sym", "int4-head4" (lm_head int4 too), "int8-nohead"
    (lm_head kept fp); None or "fp": none.

    Args:
        spec: the value.
        vision: also quantize the vision stage (`--quantize-vision`).
    """
    if spec is None or spec == "fp":
        if vision:
            raise VlmrtError("--quantize-vision needs a format, e.g. --quantize int8 --quantize-vision")
        return WeightConfig()
    head, *parts = spec.strip().lower().split("-")
    fields = {"format": head, "vision": vision}
    for part in parts:
        if part in ("sym", "asym"):
            fields["symmetric"] = part == "sym"
        elif part == "nohead":
            fields["lm_head"] = False
        elif part in ("head8", "head4"):
            fields["head"] = f"int{part[4:]}"
        elif part[:1] == "g" and part[1:].isdigit():
            fields["group_size"] = int(part[1:])
        else:
            raise VlmrtError(f"cannot read {spec!r} as a weight format: {part!r} is not gN (block size), sym, asym, "
                             f"head8, head4 or nohead; e.g. int8, int8-g32, int4, int4-g64-sym")
    if head != "int4" and ("symmetric" in fields or "head" in fields):
        raise VlmrtError(f"{spec!r}: a symmetry or head format applies to int4 only (int8 is symmetric)")
    if head not in ("int4", "int8") and "group_size" in fields:
        raise VlmrtError(f"{spec!r}: a block size applies to int8 and int4 only")
    return WeightConfig(**fields)


def parse_runtime_spec(spec: str, default: WeightConfig) -> tuple[str, WeightConfig]:
    """"eager" -> ("eager", default); "onnx:int4-g64" -> ("onnx", that format)."""
    name, sep, fmt = spec.partition(":")
    return name.strip(), (parse_weights(fmt, default.vision) if sep else default)


def with_weights(loaded, cfg: WeightConfig | None):
    """`loaded` marked to run with `cfg`'s weight format (runtimes apply it; the model is not touched here)."""
    from dataclasses import replace

    if cfg is None or cfg.is_fp:
        return loaded
    return replace(loaded, weights=cfg)


def prepare_model(loaded, runtime: str) -> nn.Module:
    """The model a torch runtime runs: `loaded.model` with its linears swapped to `loaded.weights`."""
    cfg = getattr(loaded, "weights", None)
    if cfg is None or cfg.is_fp:
        return loaded.model
    return quantize_model(loaded.model, cfg, runtime)


def loaded_for(base, runtime: str, cfg: WeightConfig, pool: dict, reload=None):
    """The LoadedModel `runtime` should get for `cfg`, next to other runtimes on the same weights.

    A torch runtime swaps linears in place, so each quantized format gets its own copy of the
    model (loaded again, kept in `pool` by format); the onnx runtime quantizes its export and
    reads the fp model, so it shares `base`. `reload` makes the copy (default: load_model of
    base's name, device, dtype and seed).
    """
    from vlmrt.config import DTYPES
    from vlmrt.models import load_model

    if cfg.is_fp:
        return base
    if runtime == "onnx" or base.model is None:
        return with_weights(base, cfg)
    if cfg.tag not in pool:
        dtype = next(k for k, v in DTYPES.items() if v == base.dtype)
        fresh = reload() if reload else load_model(base.name, device=str(base.device), dtype=dtype, seed=base.seed or 0)
        pool[cfg.tag] = with_weights(fresh, cfg)
    return pool[cfg.tag]


def weights_from_args(args) -> WeightConfig:
    """The WeightConfig of the parsed --quantize / --quantize-vision (also sets --threads)."""
    from vlmrt.config import set_threads

    set_threads(getattr(args, "threads", None))
    return parse_weights(getattr(args, "quantize", None), getattr(args, "quantize_vision", False))
