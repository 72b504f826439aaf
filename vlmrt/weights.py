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
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{name}" if mod_name else name
            g = torch.Generator(device=p.device).manual_seed((seed * 1_000_003 + zlib.crc32(full.encode())) % 2**63)
            p.normal_(0.0, std if is_norm(module) else synthetic_std(mod_name, module, name, p, std), generator=g)
            if is_norm(module) and name == "weight":
                p.add_(1.0)


def build_on(device: torch.device, dtype: torch.dtype, factory):
    """Construct `factory()` without allocating on the CPU first, then allocate it on `device`
    directly in `dtype` (cast while still on the meta device: a 7B fp16 model never exists in fp32).

    Tied parameters (e.g. lm_head.weight = embed_tokens.weight) stay tied: `to_empty` gives each
    module its own new tensor, so the aliases are restored afterwards.
    """
    with torch.device("meta"):
        model = factory()
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


def read_safetensors(path: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise VlmrtError(f"cannot read {path} ({e.__class__.__name__}: {e}); the file is corrupt or truncated; download it again") from None


def read_hf_weights(folder: str | os.PathLike) -> dict:
    """All tensors of a Hugging Face model folder: model.safetensors, sharded safetensors with an
    index, pytorch_model.bin, or sharded .bin with an index."""
    folder = Path(folder)
    for index_name, reader in (("model.safetensors.index.json", read_safetensors), ("pytorch_model.bin.index.json", read_pth)):
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise VlmrtError(f"{index} is corrupt ({e}); download it again") from None
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise VlmrtError(f"{folder} is missing weight shards listed in {index_name}: {', '.join(missing)}")
            state = {}
            for s in shards:
                state.update(reader(folder / s))
            return state
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors")
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
def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state` into `model`, strictly: every parameter must be given exactly once, with the
    right shape, and no key may be left over. Errors name the keys (and `what` they came from)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing:
        raise VlmrtError(f"{what}: missing {len(missing)} weight(s), e.g. {', '.join(missing[:5])}; the checkpoint is incomplete or of another model")
    if unexpected:
        raise VlmrtError(f"{what}: unexpected weight(s) {', '.join(unexpected[:5])}; the checkpoint is of another model or variant")
    for name, p in params.items():
        t = state[name]
        if tuple(t.shape) != tuple(p.shape):
            raise VlmrtError(f"{what}: weight {name} has shape {list(t.shape)}, expected {list(p.shape)}; the checkpoint is of another model size")
        p.copy_(t.to(p.dtype))
