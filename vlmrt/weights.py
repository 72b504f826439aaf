"""Weights: synthetic ones from a seed (so nothing is downloaded), and strict reading of released
checkpoint files (.pth, .bin, safetensors, sharded Hugging Face folders).

Synthetic weights are drawn per parameter from a generator seeded with (seed, parameter name), so
a model is the same on every run and does not depend on construction order. Values (LeCun normal,
the fan-in scaling nn.Linear's own init and most LLM recipes follow):

| parameter | value |
|---|---|
| a matrix or kernel (Linear, Conv, packed in_proj, ...) [out, in, ...] | normal(0, 1/sqrt(in x kernel)) |
| an embedding table or any other >= 2-D tensor (positions, queries, CLS) [..., D] | normal(0, 1/sqrt(D)) |
| the decoder's attention `q_proj` / `k_proj` | twice the matrix value (see below) |
| a norm scale | 1 + normal(0, 0.02) |
| a bias or other vector | normal(0, 0.02) |

At real widths this is what a freshly initialised model looks like (1/sqrt(4096) = 0.016); at tiny
widths (D = 32: 0.18) it keeps unit-scale activations through every layer, so logits have real
spread and the answer depends on everything that reaches the decoder: the image, each position, each
cache slot, the mask. A fixed std of 0.02 gave tiny models nearly flat logits whose greedy tokens
ignored all of that, so tests could not see bugs there. Query and key projections get a gain of 2
(attention logits of std ~4 instead of ~1): at unit scale attention is almost uniform over a
prompt's ~60 slots, and one masked slot hardly moved the answer; trained models attend far more
sharply. The text a model with synthetic weights writes is meaningless; its timings and runtime
parity are real.

A tensor-parallel rank (vlmrt.tp) reads only its shard of a release checkpoint:

```
 build the model on meta ─► shard it there (vlmrt.tp.shard: each sliced linear knows its Part)
 read the files lazily:  safetensors ─► LazyTensor (narrow/chunk select, read() = get_slice[rows, cols])
                         .bin / .pth ─► torch.load(mmap=True): a narrowed view touches its pages only
 assign_weights: each parameter copies its Part of the source (replicated ones: the whole tensor)
```
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from torch import nn

from vlmrt.errors import VlmrtError

_NORMS = (nn.LayerNorm,)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")


BAR_ABOVE = 200_000_000  # parameters: loads of bigger models show a progress bar (on a terminal)
_KERNELS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_GAINS = {"q_proj": 2.0, "k_proj": 2.0}  # module name -> gain on its matrix (sharper attention)


def synthetic_std(module_name: str, module: nn.Module, name: str, p: torch.Tensor, std: float) -> float:
    """The std of parameter `name` of `module` (see the module docstring); `std` for vectors."""
    if p.dim() < 2:
        return std
    if isinstance(module, _KERNELS) or name.endswith("weight"):  # [out, in, *kernel]: fan-in scaled
        gain = _GAINS.get(module_name.rpartition(".")[2], 1.0)
        return gain * (p.numel() // p.shape[0]) ** -0.5
    return p.shape[-1] ** -0.5  # an embedding table, position table or learned queries [..., D]


@torch.no_grad()
def init_synthetic(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every parameter of `model` in place, deterministically from `seed` (see the module
    docstring for the values; `std` is that of vectors: biases and norm offsets)."""
    from vlmrt.progress import bar

    total = sum(p.numel() for p in model.parameters())
    with bar(total, "synthetic weights", unit="param", show=total > BAR_ABOVE, unit_scale=True, leave=False) as shown:
        for mod_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{name}" if mod_name else name
                g = torch.Generator(device=p.device).manual_seed((seed * 1_000_003 + zlib.crc32(full.encode())) % 2**63)
                p.normal_(0.0, std if is_norm(module) else synthetic_std(mod_name, module, name, p, std), generator=g)
                if is_norm(module) and name == "weight":
                    p.add_(1.0)
                shown.update(p.numel())


def build_on(device: torch.device, dtype: torch.dtype, factory, shard=None):
    """Construct `factory()` without allocating on the CPU first, then allocate it on `device`
    directly in `dtype` (cast while still on the meta device: a 7B fp16 model never exists in fp32).

    Tied parameters (e.g. lm_head.weight = embed_tokens.weight) stay tied: `to_empty` gives each
    module its own new tensor, so the aliases are restored afterwards. A `shard` (vlmrt.tp.shard.Shard)
    shards the decoder while it is on meta: only that rank's slices are ever allocated.
    """
    with torch.device("meta"):
        model = factory()
    if shard is not None:
        from vlmrt.tp.shard import shard_model

        shard_model(model, shard.rank, shard.world)
    first: dict[int, str] = {}
    aliases = {}  # alias name -> name of the first module holding the same parameter
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    model = model.to(dtype).to_empty(device=device)
    for name, target in aliases.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(target))
    return model


def read_pth(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True, with clear errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise VlmrtError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        try:  # mmap needs the zip format; legacy files load without it
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise VlmrtError(f"cannot read checkpoint {path} ({e.__class__.__name__}: {e}); the file is corrupt or not a PyTorch checkpoint; download it again") from None


class LazyTensor:
    """One tensor of a safetensors file, read only when and as far as it is needed: `narrow` and
    `chunk` select a box of it (rows of Qwen-VL's fused c_attn, a rank's rows or columns) without
    reading; `read()` reads that box alone (`safe_open(...).get_slice(key)[rows, cols]`), opening the
    file for that read only so that no mapping of the file outlives it.

    Args:
        path: the .safetensors file.
        key: the tensor's name in it.
        box: (start, stop) per dimension: the part of the stored tensor this one is.
    """

    def __init__(self, path: Path, key: str, box: tuple[tuple[int, int], ...]):
        self.path, self.key, self.box = path, key, box

    @property
    def shape(self) -> torch.Size:
        return torch.Size(b - a for a, b in self.box)

    def dim(self) -> int:
        return len(self.box)

    def narrow(self, dim: int, start: int, length: int) -> "LazyTensor":
        a, b = self.box[dim]
        if not 0 <= start <= start + length <= b - a:
            raise IndexError(f"narrow({dim}, {start}, {length}) outside {list(self.shape)}")
        box = list(self.box)
        box[dim] = (a + start, a + start + length)
        return LazyTensor(self.path, self.key, tuple(box))

    def chunk(self, n: int, dim: int = 0) -> tuple["LazyTensor", ...]:
        size = -(-self.shape[dim] // n)
        return tuple(self.narrow(dim, i, min(size, self.shape[dim] - i)) for i in range(0, self.shape[dim], size))

    def read(self) -> torch.Tensor:
        import safetensors

        try:
            with safetensors.safe_open(str(self.path), framework="pt") as f:
                return f.get_slice(self.key)[tuple(slice(a, b) for a, b in self.box)]
        except Exception as e:
            raise VlmrtError(f"cannot read {self.key} from {self.path} ({e.__class__.__name__}: {e}); the file is "
                             "corrupt or truncated; download it again") from None


def materialize(t) -> torch.Tensor:
    """A tensor of a state dict, read if it is a LazyTensor."""
    return t.read() if isinstance(t, LazyTensor) else t


def read_safetensors(path: str | os.PathLike, lazy: bool = False) -> dict:
    """Every tensor of a .safetensors file (lazy: as LazyTensors, nothing read but the header)."""
    import safetensors
    from safetensors.torch import load_file

    try:
        if not lazy:
            return load_file(str(path))
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {k: LazyTensor(Path(path), k, tuple((0, n) for n in f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:
        raise VlmrtError(f"cannot read {path} ({e.__class__.__name__}: {e}); the file is corrupt or truncated; download it again") from None


def read_hf_weights(folder: str | os.PathLike, lazy: bool = False) -> dict:
    """All tensors of a Hugging Face model folder: model.safetensors, sharded safetensors with an
    index, pytorch_model.bin, or sharded .bin with an index.

    Args:
        folder: the model folder.
        lazy: safetensors come as LazyTensors (read when assigned; a tensor-parallel rank reads its
            slices only); .bin shards are memory-mapped either way, so a slice reads its pages only.
    """
    folder = Path(folder)
    st = lambda path: read_safetensors(path, lazy)
    for index_name, reader in (("model.safetensors.index.json", st), ("pytorch_model.bin.index.json", read_pth)):
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise VlmrtError(f"{index} is corrupt ({e}); download it again") from None
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise VlmrtError(f"{folder} is missing weight shards listed in {index_name}: {', '.join(missing)}")
            from vlmrt.progress import bar

            state = {}
            with bar(len(shards), f"reading {folder.name}", unit="shard", show=len(shards) > 1, leave=False) as shown:
                for s in shards:
                    state.update(reader(folder / s))
                    shown.update(1)
            return state
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors", lazy)
    if (folder / "pytorch_model.bin").exists():
        return read_pth(folder / "pytorch_model.bin")
    raise VlmrtError(f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a sharded index")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VlmrtError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise VlmrtError(f"{path} is not valid JSON ({e}); restore the file") from None


@torch.no_grad()
def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str, shard=None) -> None:
    """Copy `state` into `model`, strictly: every parameter must be given exactly once, with the
    right shape, and no key may be left over. Errors name the keys (and `what` they came from).

    A model sharded by `build_on(..., shard)` takes each sliced parameter's part of its full tensor
    (state values may be LazyTensors: only that part is read).

    Args:
        model: the model (allocated, maybe sharded).
        state: full tensors by the unsharded model's names.
        what: the source, for errors.
        shard: the vlmrt.tp.shard.Shard `model` was built with (its `row_absmax`: int8 scales).
    """
    if shard is None:
        parts = {}
    else:
        from vlmrt.tp.shard import shard_parts

        parts = shard_parts(model)
    params = dict(model.named_parameters())
    source = {name: parts[name].source if name in parts else name for name in params}
    missing = sorted(set(source.values()) - set(state))
    unexpected = sorted(set(state) - set(source.values()))
    if missing:
        raise VlmrtError(f"{what}: missing {len(missing)} weight(s), e.g. {', '.join(missing[:5])}; the checkpoint is incomplete or of another model")
    if unexpected:
        raise VlmrtError(f"{what}: unexpected weight(s) {', '.join(unexpected[:5])}; the checkpoint is of another model or variant")
    for name, p in params.items():
        part, t = parts.get(name), state[source[name]]
        shape = part.shape if part else tuple(p.shape)
        if tuple(t.shape) != shape:
            raise VlmrtError(f"{what}: weight {source[name]} has shape {list(t.shape)}, expected {list(shape)}; the checkpoint is of another model size")
        if part is not None:
            if part.dim == 1 and shard.row_absmax:
                model.get_submodule(name.rpartition(".")[0]).row_absmax = full_row_absmax(t, p.dtype, shard.world).to(p.device)
            t = t.narrow(part.dim, part.start, part.stop - part.start)  # a view or a LazyTensor: nothing read yet
        p.copy_(materialize(t).to(p.dtype))


def full_row_absmax(t, dtype: torch.dtype, blocks: int) -> torch.Tensor:
    """Each row's absmax [N] of a full weight [N,K] as `dtype` holds it, read in `blocks` row blocks
    (each no bigger than a rank's column slice of it)."""
    size = -(-t.shape[0] // blocks)
    return torch.cat([materialize(t.narrow(0, i, min(size, t.shape[0] - i))).to(dtype).float().abs().amax(1)
                      for i in range(0, t.shape[0], size)])
