"""manifest.json: what an export folder holds and everything needed to run it without model code.

Schema (format_version 2; version 1, the dynamic ONNX export without the fields marked v2, is
still written for it and read; docs/export.md has a worked example):

```
 {
   "format": "vlmrt-onnx-export",        # fixed (also for AOTInductor packages)
   "format_version": 1 or 2,              # 2 when a v2 field is used; other values are refused
   "runtime": "onnx" | "aoti" | "paddle" | "mindspore" | "stablehlo",  # v2: the runtime that runs the folder (default "onnx")
   "vlmrt_version": "0.2.0", "exporter": "torch.onnx TorchScript, torch 2.13.0", "opset": 17,
   "model": {"name", "family", "synthetic", "seed", "config_hash", "dtype", "weights"},  # weights: fp, int8, int4-g32-asym ...
   "kv_cache": {"num_layers", "num_kv_heads", "head_dim", "max_context"},
   "image_token_id": 0,
   "processor": ProcessorSpec.to_dict(),
   "tokenizer_files": ["tokenizer.json", ...],
   "stages": {"vision" | "embedding" | "decoder": {
       "file": "decoder.onnx", "external_data": "decoder.onnx.data" or null,
       "inputs":  [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "sequence", 4096]}, ...],
       "outputs": [...]}},
   "static": {"batch": [1], "sequence": [512], "cache_len": 512},   # v2: static-shape exports only
   "graphs": [{"stage": "decoder", "batch": 1, "sequence": 512, "images": false,   # v2: every bucket's
               "file": ..., "inputs": [..., "dims": ["batch", "sequence", 32]], ...}]  # graph; `dims`: the
 }                                                                    # dimension names of a static shape
```

A shape entry is an int (fixed) or a dimension name (dynamic), the names used in shape comments:
batch, sequence (T), cache_sequence (S: KV-cache slots per row), image_tokens (N_img); exports of earlier
versions name past_sequence and total_sequence (S = past + T) instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlmrt.errors import VlmrtError
from vlmrt.processor import ProcessorSpec

FORMAT = "vlmrt-onnx-export"
FORMAT_VERSION = 2  # the newest this vlmrt reads and writes
MIN_FORMAT_VERSION = 1  # the oldest it reads (and what a dynamic ONNX export still writes)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", ...
    shape: tuple  # each entry an int or a dimension name
    dims: tuple | None = None  # static exports: each axis's dimension name (or its size), for padding

    def to_dict(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        return d if self.dims is None else {**d, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInfo":
        dims = tuple(d["dims"]) if d.get("dims") is not None else None
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]), dims)


@dataclass(frozen=True)
class StageInfo:
    file: str  # the graph, relative to the export folder
    external_data: str | None  # its weights file (tensors of 1 KiB and more), None when all inline
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def to_dict(self) -> dict:
        return {"file": self.file, "external_data": self.external_data,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "StageInfo":
        return cls(d["file"], d.get("external_data"), tuple(TensorInfo.from_dict(t) for t in d["inputs"]),
                   tuple(TensorInfo.from_dict(t) for t in d["outputs"]))


@dataclass(frozen=True)
class GraphInfo:
    """One graph of a static-shape (or AOTInductor) export: its stage, its bucket and its I/O."""

    stage: str
    batch: int | None  # None: a dynamic dimension
    sequence: int | None  # None for vision, or dynamic
    images: bool  # embedding: takes image features (prefill) or not (text only: decode steps)
    info: StageInfo

    def to_dict(self) -> dict:
        return {"stage": self.stage, "batch": self.batch, "sequence": self.sequence, "images": self.images,
                **self.info.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "GraphInfo":
        return cls(str(d["stage"]), d.get("batch"), d.get("sequence"), bool(d.get("images", True)),
                   StageInfo.from_dict(d))


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json of an export folder."""

    name: str  # the preset or release folder it came from
    family: str
    synthetic: bool  # weights drawn from a seed: the text is meaningless
    seed: int | None
    config_hash: str  # of the model config; a changed preset invalidates a cached export
    dtype: str  # "fp32" or "fp16"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    image_token_id: int
    processor: ProcessorSpec
    stages: dict  # stage name -> StageInfo
    tokenizer_files: tuple[str, ...] = ()
    vlmrt_version: str = ""
    exporter: str = ""
    opset: int = 0
    runtime: str = "onnx"  # the runtime that runs this folder: "onnx", "aoti", "paddle", "mindspore" or "stablehlo"
    static: dict | None = None  # static-shape exports: {"batch": [...], "sequence": [...], "cache_len": S}
    graphs: tuple = ()  # GraphInfo per bucket (static, aoti and stablehlo exports); `stages` holds the first of each
    weights: str = "fp"  # the decoder's weight format (vlmrt.quantize.WeightConfig.tag): fp, int8, int4-g32-asym, ...

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION if (self.runtime != "onnx" or self.static or self.graphs) else MIN_FORMAT_VERSION

    def to_dict(self) -> dict:
        v2 = {"runtime": self.runtime, "static": self.static, "graphs": [g.to_dict() for g in self.graphs]}
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            **(v2 if self.format_version > MIN_FORMAT_VERSION else {}),
            "vlmrt_version": self.vlmrt_version,
            "exporter": self.exporter,
            "opset": self.opset,
            "model": {"name": self.name, "family": self.family, "synthetic": self.synthetic, "seed": self.seed,
                      "config_hash": self.config_hash, "dtype": self.dtype, "weights": self.weights},
            "kv_cache": {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                         "head_dim": self.head_dim, "max_context": self.max_context},
            "image_token_id": self.image_token_id,
            "processor": self.processor.to_dict(),
            "tokenizer_files": list(self.tokenizer_files),
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        m, kv = d["model"], d["kv_cache"]
        return cls(
            name=m["name"], family=m["family"], synthetic=bool(m["synthetic"]), seed=m.get("seed"),
            config_hash=m.get("config_hash", ""), dtype=m["dtype"],
            num_layers=int(kv["num_layers"]), num_kv_heads=int(kv["num_kv_heads"]), head_dim=int(kv["head_dim"]),
            max_context=int(kv["max_context"]), image_token_id=int(d["image_token_id"]),
            processor=ProcessorSpec.from_dict(d["processor"]),
            stages={k: StageInfo.from_dict(v) for k, v in d["stages"].items()},
            tokenizer_files=tuple(d.get("tokenizer_files", ())), vlmrt_version=d.get("vlmrt_version", ""),
            exporter=d.get("exporter", ""), opset=int(d.get("opset", 0)), runtime=str(d.get("runtime", "onnx")),
            static=d.get("static"), graphs=tuple(GraphInfo.from_dict(g) for g in d.get("graphs", ())),
            weights=str(m.get("weights", "fp")),
        )


def is_export_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write manifest.json (the last file an export writes: a folder without one is unfinished)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_manifest(folder: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate `folder`/manifest.json.

    Args:
        folder: an export folder (written by `vlmrt export`).
        check_files: also check that every graph and weights file it names is there.

    Raises:
        VlmrtError: no manifest, not JSON, another format version, a missing field or file.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    redo = f"re-export it with `vlmrt export --model MODEL --out {folder} --force`"
    if not path.is_file():
        raise VlmrtError(f"{folder} has no {MANIFEST}, so it is not a finished vlmrt export; {redo}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise VlmrtError(f"{path} is corrupt (not valid JSON: {e}); {redo}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise VlmrtError(f"{path} is not a vlmrt export manifest (no \"format\": \"{FORMAT}\"); {redo}")
    version = data.get("format_version")
    if not (isinstance(version, int) and MIN_FORMAT_VERSION <= version <= FORMAT_VERSION):
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise VlmrtError(f"{path} has format version {version}, newer than this vlmrt reads ({FORMAT_VERSION}); "
                             f"upgrade vlmrt, or {redo}")
        raise VlmrtError(f"{path} has format version {version!r}, older than this vlmrt reads "
                         f"({MIN_FORMAT_VERSION}); {redo}")
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise VlmrtError(f"{path} is corrupt (bad or missing field {e}); {redo}") from None
    if check_files:
        check_export_files(folder, manifest)
    return manifest


def check_export_files(folder: Path, manifest: Manifest) -> None:
    """Every stage's graph and weights file must exist."""
    from vlmrt.stages import STAGES

    redo = f"re-export it with `vlmrt export --model MODEL --out {folder} --force`"
    for stage in STAGES:
        if stage not in manifest.stages:
            raise VlmrtError(f"{folder / MANIFEST} names no {stage} graph; {redo}")
    for stage, info in [(s, manifest.stages[s]) for s in STAGES] + [(g.stage, g.info) for g in manifest.graphs]:
        for name in (info.file, info.external_data):
            if name and not (folder / name).is_file():
                raise VlmrtError(f"export folder {folder} is missing {name} (the {stage} stage); {redo}")


def load_export(folder: str | Path, device: str = "cpu"):
    """An export folder as a `LoadedModel` with no model code: model is None, geometry in `config`.

    Args:
        folder: an export folder.
        device: where the onnx runtime runs it ("cpu" or "cuda").
    """
    from vlmrt.config import DTYPES, resolve_device
    from vlmrt.models import LoadedModel
    from vlmrt.tokenizer import load_tokenizer

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.dtype not in DTYPES:
        raise VlmrtError(f"{folder / MANIFEST} is corrupt (unknown dtype {manifest.dtype!r}); re-export it")
    return LoadedModel(None, load_tokenizer(folder), manifest.processor, str(folder), manifest.family,
                       manifest.synthetic, manifest, resolve_device(device), DTYPES[manifest.dtype],
                       seed=manifest.seed, export_dir=folder)
