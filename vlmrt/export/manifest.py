"""manifest.json: what an export folder holds and everything needed to run it without model code.

Schema (format_version 1; docs/export.md has a worked example):

```
 {
   "format": "vlmrt-onnx-export",        # fixed
   "format_version": 1,                   # FORMAT_VERSION; another value is refused
   "vlmrt_version": "0.2.0", "exporter": "torch.onnx TorchScript, torch 2.13.0", "opset": 17,
   "model": {"name", "family", "synthetic", "seed", "config_hash", "dtype", "weights"},  # weights: fp, int8, int4-g32-asym ...
   "kv_cache": {"num_layers", "num_kv_heads", "head_dim", "max_context"},
   "image_token_id": 0,
   "processor": ProcessorSpec.to_dict(),
   "tokenizer_files": ["tokenizer.json", ...],
   "stages": {"vision" | "embedding" | "decoder": {
       "file": "decoder.onnx", "external_data": "decoder.onnx.data" or null,
       "inputs":  [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "sequence", 4096]}, ...],
       "outputs": [...]}}
 }
```

A shape entry is an int (fixed) or a dimension name (dynamic), the names used in shape comments:
batch, sequence (T), past_sequence, total_sequence (S = past + T), image_tokens (N_img).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlmrt.errors import VlmrtError
from vlmrt.processor import ProcessorSpec

FORMAT = "vlmrt-onnx-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", ...
    shape: tuple  # each entry an int or a dimension name

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInfo":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))


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
    weights: str = "fp"  # the decoder's weight format (vlmrt.quantize.WeightConfig.tag): fp, int8, int4-g32-asym, ...

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
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
            exporter=d.get("exporter", ""), opset=int(d.get("opset", 0)), weights=str(m.get("weights", "fp")),
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
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise VlmrtError(f"{path} has format version {version}, newer than this vlmrt reads ({FORMAT_VERSION}); "
                             f"upgrade vlmrt, or {redo}")
        raise VlmrtError(f"{path} has format version {version!r}, older than this vlmrt reads ({FORMAT_VERSION}); {redo}")
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
        info = manifest.stages[stage]
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
