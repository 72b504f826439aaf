"""The model registry: a table from family name to its class, and `load_model`.

A family class (models/<family>.py) provides: `presets` (name -> config), a constructor taking a
config, `synthetic_tokenizer(config)`, `processor_spec` and `is_release_folder(folder)`; its module
provides `load_release(folder, device, dtype, shard=None) -> (model, tokenizer, config)` (a `shard`: one
tensor-parallel rank's slices of the decoder only, vlmrt.tp.shard). Adding a family is one file, one line here and one test entry
(tests/families.py); `python -m vlmrt.catalog` then refreshes models/presets.json, the preset list
`vlmrt models` reads without importing torch (tests/test_registry.py fails while it is stale).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmrt.config import DTYPES, resolve_device
from vlmrt.errors import VlmrtError
from vlmrt.processor import ProcessorSpec

FAMILIES = {  # family -> "module:Class", alphabetical
    "minicpmv": "vlmrt.models.minicpmv:MiniCPMVForConditionalGeneration",
    "minigpt4": "vlmrt.models.minigpt4:MiniGPT4ForConditionalGeneration",
    "qwen_vl": "vlmrt.models.qwen_vl:QWenLMHeadModel",
    "slimm": "vlmrt.models.slimm:SliMMForConditionalGeneration",
}


@dataclass
class LoadedModel:
    """A model ready for a runtime: the stage implementation plus what processing needs."""

    model: torch.nn.Module | None  # None for an export folder (its graphs run on the onnx runtime)
    tokenizer: object
    spec: ProcessorSpec
    name: str  # preset name or folder path
    family: str
    synthetic: bool  # True: weights drawn from a seed, the text is meaningless
    config: object  # the family's config, or an export's Manifest
    device: torch.device
    dtype: torch.dtype
    seed: int | None = None  # seed of the synthetic weights (presets)
    export_dir: Path | None = None  # set for an export folder
    weights: object = None  # a vlmrt.quantize.WeightConfig the runtime applies (None: the weights as loaded)

    @property
    def max_context(self) -> int:
        """The longest sequence (prompt + image tokens + answer) the decoder accepts."""
        return self.model.max_context if self.model is not None else self.config.max_context


def family_class(family: str):
    if family not in FAMILIES:
        raise VlmrtError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}")
    module, cls = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), cls)


def all_presets() -> dict[str, tuple[str, object]]:
    """preset name -> (family, config), over every registered family."""
    return {name: (fam, cfg) for fam in FAMILIES for name, cfg in family_class(fam).presets.items()}


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "fp32", seed: int = 0,
               tokenizer: bool = True, shard=None) -> LoadedModel:
    """Build a preset with synthetic weights, or load a release folder from local files.

    Args:
        name_or_path: a preset name (`vlmrt models` lists them), a folder holding a release, or an
            export folder (manifest.json; loaded with model=None for the onnx runtime, in its own dtype).
        device: "cpu" or "cuda".
        dtype: "fp32", "fp16" or "bf16".
        seed: seed of the synthetic weights (presets only).
        tokenizer: False: a preset comes without its tokenizer (None; a tensor-parallel follower needs none).
        shard: a vlmrt.tp.shard.Shard: the model holds that rank's shard of the decoder (docs/tp.md
            "Loading"); a release folder is read for that shard only, a preset is drawn whole and sliced.
    """
    from vlmrt.weights import build_on, init_synthetic

    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise VlmrtError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    tdtype = DTYPES[dtype]
    if (Path(name_or_path) / "manifest.json").is_file():  # an export folder: no model code imported at all
        from vlmrt.export.manifest import load_export

        return load_export(Path(name_or_path), device)
    presets = all_presets()
    if name_or_path in presets:
        family, cfg = presets[name_or_path]
        cls = family_class(family)
        model = build_on(dev, tdtype, lambda: cls(cfg))
        init_synthetic(model, seed)  # whole on every rank: each parameter's values come from its own seed
        if shard is not None:
            from vlmrt.tp.shard import shard_model

            shard_model(model, shard.rank, shard.world)
        return LoadedModel(model.eval(), cls.synthetic_tokenizer(cfg) if tokenizer else None, model.processor_spec, name_or_path,
                           family, True, cfg, dev, tdtype, seed=seed)
    path = Path(name_or_path)
    if not path.exists():
        raise VlmrtError(f"unknown model {name_or_path!r}: not a preset and no such folder; presets: {', '.join(presets)}")
    for family in FAMILIES:
        cls = family_class(family)
        if cls.is_release_folder(path):
            model, tokenizer, cfg = importlib.import_module(cls.__module__).load_release(path, dev, tdtype, shard)
            return LoadedModel(model, tokenizer, model.processor_spec, str(path), family, False, cfg, dev, tdtype)
    raise VlmrtError(f"{path} is not a model folder vlmrt recognizes (families: {', '.join(FAMILIES)}); see README 'Real checkpoints'")
