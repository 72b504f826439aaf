"""Export a model's three stages to ONNX graphs, plus the manifest, tokenizer and processor spec.

```
 LoadedModel ─► for stage in (vision, embedding, decoder):
                  default StageIO (example inputs by name + dynamic axes)
                  └► model.export_io(stage, io)      optional family hook (see below)
                  └► StageModule(model, stage, names) forward(*tensors) ─► tuple of outputs
                  └► torch.onnx.export ─► prune unused initializers ─► <stage>.onnx + .onnx.data
                  └► onnx.checker (by path, so external data is checked too)
                  the stage's outputs at the example feed the next stage's example
             ─► tokenizer.save_pretrained ─► manifest.json (written last)
```

Graph I/O (names from vlmrt/stages.py; dimension names as in the shape comments):

```
 vision     pixel_values [batch,3,H,W]                       ─► image_features [batch,image_tokens,D]
 embedding  input_ids [batch,sequence], image_features       ─► inputs_embeds [batch,sequence,D]
 decoder    inputs_embeds [batch,sequence,D], position_ids [batch,sequence] (M-RoPE [3,batch,sequence]),
            attention_mask [batch,cache_sequence], cache_position [batch,sequence], logits_index [batch],
            past_key_values.{i}.key|value [batch,H_kv,cache_sequence,hd]  (+ family extras by name)
            ─► logits [batch,1,V] (row b at logits_index[b]), present.{i}.key|value [batch,H_kv,cache_sequence,hd]
```

The decoder is the static-cache form (vlmrt/export/static_cache.py) with dynamic axes: every row
writes its new keys at its own `cache_position` slots of a fixed-size cache row (a scatter) and the
presents keep the pasts' size. So one graph serves prefill and decode, the lock-step loop (every
row at the same slots) and the engine (rows at their own positions, joining and leaving at any
step); the onnx runtime binds each present to its past's buffer, so the cache is written in place
(vlmrt/runtimes/onnx.py). The embedding graph is called with image_tokens = 0 for text only
(decode steps).

Family hook: a family's model class may define `export_io(self, stage, io) -> StageIO | None`.
It receives the default `StageIO` of a stage (example inputs, dynamic axes) and may add inputs,
replace examples or declare axes; it returns the new StageIO or None after editing it in place.
Inputs beyond the defaults reach the stage call by keyword: `encode_images(pixel_values, **extra)`,
`decode(inputs_embeds, position_ids, attention_mask, cache_position, cache, **extra)`; a stage that
returns a dict gets one graph output per key. Examples (not code here):
- SliMM: `embed` returns {inputs_embeds, deepstack_embeds}; the extra output becomes a decoder input
  of the same name automatically; the hook declares its axes and, for M-RoPE, sets
  `io.inputs["position_ids"]` to a [3,B,T] example with axes {1: "batch", 2: "sequence"}.
- MiniCPM-V-2: the vision hook gives `pixel_values` axes {0: "slices"} and adds its slice inputs.
For static exports (vlmrt/export/static.py) a hook may set `io.static_sizes` (dimension name ->
size) for named axes other than batch and sequence; MiniCPM-V-2 fixes its chunk axes there.
At run time an input the caller leaves out is fed as zeros whose named dimensions take the sizes
known at that call (batch, sequence, cache_sequence) and 0 otherwise, so a family's
extra inputs must treat zeros (or an empty axis) as "nothing to add". MiniGPT-4 needs no hook.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. It exports our compact
modules in about a second (the dynamo exporter takes ~10 s for the tiny decoder on 2 cores and
would make the test session slow), works the same on torch 2.11 and 2.13, takes dynamic axes by
name, and names nodes by module path (`/llama_model/model/layers.0/self_attn/q_proj/MatMul`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import MANIFEST, Manifest, StageInfo, TensorInfo, write_manifest
from vlmrt.stages import (ATTENTION_MASK, CACHE_POSITION, IMAGE_FEATURES, INPUT_IDS, INPUTS_EMBEDS, LOGITS,
                          LOGITS_INDEX, PIXEL_VALUES, POSITION_IDS, STAGES, past_key_name, past_value_name,
                          present_key_name, present_value_name)

DEFAULT_OPSET = 17
EXPORT_DTYPES = ("fp32", "fp16")
EXTERNAL_MIN_BYTES = 1024  # tensors this large or larger go to <stage>.onnx.data

DEFAULT_AXES = {  # name -> {axis: dimension name}; a family's hook may override any of them
    PIXEL_VALUES: {0: "batch"},
    IMAGE_FEATURES: {0: "batch", 1: "image_tokens"},
    INPUT_IDS: {0: "batch", 1: "sequence"},
    INPUTS_EMBEDS: {0: "batch", 1: "sequence"},
    POSITION_IDS: {0: "batch", 1: "sequence"},
    ATTENTION_MASK: {0: "batch", 1: "cache_sequence"},
    CACHE_POSITION: {0: "batch", 1: "sequence"},
    LOGITS_INDEX: {0: "batch"},
    LOGITS: {0: "batch"},  # [batch,1,V]: generation reads one position per row only
}
PAST_AXES = {0: "batch", 2: "cache_sequence"}  # past_key_values.{i}.key|value
PRESENT_AXES = {0: "batch", 2: "cache_sequence"}  # present.{i}.key|value: the same buffers, written

Progress = Callable[[str], None]


@dataclass
class StageIO:
    """Example inputs of one stage, by graph input name in order, and the dynamic axes by name."""

    inputs: dict[str, torch.Tensor]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # inputs and outputs
    static_sizes: dict[str, int] = field(default_factory=dict)  # static exports: dimension name -> size


def print_progress(message: str) -> None:
    print(f"vlmrt export: {message}", file=sys.stderr, flush=True)


def axes_for(name: str, known: dict) -> dict[int, str]:
    """Dynamic axes of a graph input or output: declared ones first, then the defaults."""
    if name in known:
        return known[name]
    if name.startswith("past_key_values."):
        return PAST_AXES
    if name.startswith("present."):
        return PRESENT_AXES
    return DEFAULT_AXES.get(name, {})


# ----------------------------------------------------------------------------- stage modules
def _flatten(out, default_name: str) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(out, dict):
        return list(out), list(out.values())
    return [default_name], [out]


class StageModule(nn.Module):
    """One stage of `model` with a positional forward over named inputs, for tracing.

    The whole model is held (no copy); the initializers the stage does not use are pruned from
    the graph after export, so the vision graph carries no LLM weights.
    """

    def __init__(self, model: nn.Module, stage: str, names: list[str], upstream_names: list[str]):
        super().__init__()
        self.model, self.stage, self.names = model, stage, names
        self.upstream_names = upstream_names  # the vision outputs, which `embed` takes as one argument
        self.output_names: list[str] = []

    def forward(self, *tensors):
        named = dict(zip(self.names, tensors))
        names, outs = getattr(self, f"_{self.stage}")(named)
        self.output_names = names
        return tuple(outs)

    def _vision(self, named):
        return _flatten(self.model.encode_images(named.pop(PIXEL_VALUES), **named), IMAGE_FEATURES)

    def _embedding(self, named):
        ids = named.pop(INPUT_IDS)
        feats = {k: named.pop(k) for k in self.upstream_names if k in named}
        arg = feats.get(IMAGE_FEATURES) if list(feats) == [IMAGE_FEATURES] else (feats or None)  # None: text only
        return _flatten(self.model.embed(ids, arg, **named), INPUTS_EMBEDS)

    def _decoder(self, named):
        from vlmrt.export.static_cache import ScatterKVCache  # model code: not imported to run an export

        embeds, positions, mask = named.pop(INPUTS_EMBEDS), named.pop(POSITION_IDS), named.pop(ATTENTION_MASK)
        slots, at = named.pop(CACHE_POSITION), named.pop(LOGITS_INDEX)  # [B,T], [B]
        n = self.model.num_layers
        cache = ScatterKVCache([named.pop(past_key_name(i)) for i in range(n)],  # each [B,H_kv,S,hd]
                               [named.pop(past_value_name(i)) for i in range(n)])
        logits = self.model.decode(embeds, positions, mask, slots, cache, logits_at=at, **named)  # [B,1,V]
        names, outs = [LOGITS], [logits]
        for i in range(n):
            names += [present_key_name(i), present_value_name(i)]
            outs += [cache.keys[i], cache.values[i]]  # [B,H_kv,S,hd]
        return names, outs


# ----------------------------------------------------------------------------- example inputs
def default_io(stage: str, loaded, upstream: dict[str, torch.Tensor]) -> StageIO:
    """The example inputs of `stage` for any family; `upstream` holds the previous stage's outputs."""
    m, dtype, dev = loaded.model, loaded.dtype, loaded.device
    if stage == "vision":
        s = loaded.spec.image_size
        gen = torch.Generator().manual_seed(0)
        return StageIO({PIXEL_VALUES: torch.randn(2, 3, s, s, generator=gen).to(dev, dtype)})
    if stage == "embedding":
        n = loaded.spec.num_image_tokens
        row = [1] + [loaded.spec.image_token_id] * n + [3, 4, 5]
        ids = torch.tensor([row, [1, 6] + row[1:-1]], device=dev)  # [2,T]: two rows, different text
        return StageIO({INPUT_IDS: ids, **upstream})
    from vlmrt.export.static_cache import example_inputs

    embedded = dict(upstream)  # the embedding stage's outputs: inputs_embeds [2,T,D] (+ extras)
    embeds = embedded.pop(INPUTS_EMBEDS)
    # a cache row longer than the prompt, the rows at different slots: the trace cannot tie S to T
    return StageIO(example_inputs(m, embeds, embeds.shape[1] + 5, embedded))


# ----------------------------------------------------------------------------- one graph
def _drop_unused_initializers(graph) -> int:
    """Remove initializers no node reads (e.g. LLM weights seen by the vision trace); returns bytes kept."""
    used = set(o.name for o in graph.output)

    def visit(g):
        for node in g.node:
            used.update(node.input)
            for attr in node.attribute:  # subgraphs of If / Loop
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)

    visit(graph)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return sum(_tensor_bytes(t) for t in keep)


def _tensor_bytes(t) -> int:
    from onnx import helper

    n = 1
    for d in t.dims:
        n *= d
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _move_weights_out(proto, src: Path, data_path: Path) -> bool:
    """Write every initializer of EXTERNAL_MIN_BYTES or more into one file, `data_path`.

    Tensors are inline, or (above 2 GB) in per-tensor files under `src` as the exporter leaves them;
    they are moved one at a time, so memory never holds more than one weight. Offsets are aligned
    (4 KiB for tensors of 1 MiB or more) so ONNX Runtime can map them. Returns True if any moved.
    """
    from onnx import TensorProto, numpy_helper
    from onnx import external_data_helper as ext

    offset = 0
    with open(data_path, "wb") as f:
        for t in proto.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                ext.load_external_data_for_tensor(t, str(src))
            if _tensor_bytes(t) < EXTERNAL_MIN_BYTES:
                continue
            if not t.HasField("raw_data"):  # typed fields (float_data, ...) -> raw bytes
                data = numpy_helper.to_array(t).tobytes()
                for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(name)
                t.raw_data = data
            pad = -offset % (4096 if len(t.raw_data) >= 2**20 else 64)
            f.write(b"\0" * pad)
            f.write(t.raw_data)
            ext.set_external_data(t, data_path.name, offset + pad, len(t.raw_data))
            offset += pad + len(t.raw_data)
            t.data_location = TensorProto.EXTERNAL
            t.ClearField("raw_data")
    return offset > 0


def _value_info(v) -> TensorInfo:
    from onnx import helper

    tt = v.type.tensor_type
    shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim)
    return TensorInfo(v.name, helper.tensor_dtype_to_np_dtype(tt.elem_type).name, shape)


def export_stage(module: StageModule, io: StageIO, out: Path, opset: int, progress: Progress,
                 stem: str | None = None, static: bool = False, fold: Callable | None = None) -> StageInfo:
    """Trace one stage to `out`/<stem>.onnx (+ .onnx.data), prune, save, check.

    Args:
        stem: the file name without .onnx (default: the stage name).
        static: no dynamic axes (every dimension fixed at the example's size).
        fold: `fold(proto, folder) -> proto` run on the pruned graph (static exports fold shapes).
    """
    import onnx

    stage, names = module.stage, list(io.inputs)
    axes = {} if static else {k: axes_for(k, io.dynamic_axes) for k in names + module.output_names}
    tmp = out / f".tmp-{stage}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(module, tuple(io.inputs.values()), str(tmp / "graph.onnx"), dynamo=False,
                          input_names=names, output_names=module.output_names,
                          dynamic_axes={k: v for k, v in axes.items() if v}, opset_version=opset,
                          do_constant_folding=True)
    proto = onnx.load(str(tmp / "graph.onnx"), load_external_data=False)
    kept = _drop_unused_initializers(proto.graph)
    if fold is not None:
        proto = fold(proto, tmp)
    proto.producer_name = "vlmrt"
    stem = stem or stage
    path, data = out / f"{stem}.onnx", f"{stem}.onnx.data"
    for f in (path, out / data):
        f.unlink(missing_ok=True)
    if not _move_weights_out(proto, tmp, out / data):
        (out / data).unlink()
    onnx.save_model(proto, str(path))
    shutil.rmtree(tmp, ignore_errors=True)
    del proto
    onnx.checker.check_model(str(path))  # by path: the external data is checked too
    graph = onnx.load(str(path), load_external_data=False).graph
    info = StageInfo(path.name, data if (out / data).exists() else None,
                     tuple(_value_info(v) for v in graph.input), tuple(_value_info(v) for v in graph.output))
    progress(f"{stage}: {path.name} written, {kept / 2**20:.1f} MiB of weights, "
             f"{len(graph.node)} nodes, {time.perf_counter() - t0:.1f} s")
    return info


# ----------------------------------------------------------------------------- a whole model
def config_hash(loaded) -> str:
    """Short hash of the model's config (a preset edited since the export gets a new hash)."""
    return hashlib.sha256(repr(loaded.config).encode()).hexdigest()[:16]


def prepare_out(out: Path, force: bool) -> None:
    """`out` must be absent or empty, unless `force` (then our files in it are overwritten)."""
    if out.exists() and not out.is_dir():
        raise VlmrtError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise VlmrtError(f"--out {out} is not empty; choose an empty folder or pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is unfinished until the new manifest lands


def export_model(loaded, out: str | Path, opset: int = DEFAULT_OPSET, force: bool = False,
                 progress: Progress | None = print_progress) -> Manifest:
    """Export a loaded model (a preset or a release) to `out`.

    Args:
        loaded: a `LoadedModel` with model code (not itself an export).
        out: the export folder; created if absent.
        opset: ONNX opset of the graphs.
        force: write into a non-empty folder, overwriting an earlier export there.
        progress: called with one line per step (None: silent).

    Returns:
        The manifest written to `out`/manifest.json.
    """
    from vlmrt.export.quantize_onnx import check_onnx_format, quantize_export
    from vlmrt.quantize import WeightConfig, is_quantized

    dtype = export_dtype(loaded)
    weights = loaded.weights or WeightConfig()
    check_onnx_format(weights)
    if is_quantized(loaded.model):  # ONNX Runtime's tools quantize the fp graph themselves
        raise VlmrtError(f"{loaded.name}'s weights were already swapped for a torch runtime; export from a fresh load")
    out, progress = Path(out), progress or (lambda _: None)
    prepare_out(out, force)
    model, stages, upstream, known_axes = loaded.model, {}, {}, {}
    progress(f"{loaded.name} ({loaded.family}, {dtype}, opset {opset}) -> {out}")
    for stage in STAGES:
        io = default_io(stage, loaded, upstream)
        hook = getattr(model, "export_io", None)
        io = (hook(stage, io) or io) if hook else io
        io.dynamic_axes = {**known_axes, **io.dynamic_axes}
        module = StageModule(model, stage, list(io.inputs), list(upstream) if stage == "embedding" else [])
        with torch.no_grad():
            outputs = module(*io.inputs.values())
        stages[stage] = export_stage(module, io, out, opset, progress)
        known_axes.update({k: axes_for(k, io.dynamic_axes) for k in module.output_names})
        upstream = {k: v.clone() for k, v in zip(module.output_names, outputs)}
    if not weights.is_fp:
        quantize_export(out, weights, progress)
        stages = {k: _restat(out, info) for k, info in stages.items()}
    manifest = new_manifest(loaded, stages, out, f"torch.onnx TorchScript exporter, torch {torch.__version__}", opset,
                            weights=weights.tag)
    write_manifest(out, manifest)
    progress(f"done: {out / MANIFEST}")
    return manifest


def export_dtype(loaded) -> str:
    """"fp32" or "fp16" of a loaded model, or a clear error."""
    from vlmrt.config import DTYPES

    if loaded.model is None:
        raise VlmrtError(f"{loaded.name} is already an export; run it with `vlmrt run --model {loaded.name}`")
    dtype = next((k for k, v in DTYPES.items() if v == loaded.dtype), str(loaded.dtype))
    if dtype not in EXPORT_DTYPES:
        raise VlmrtError(f"cannot export in {dtype}; use --dtype fp32 or fp16")
    return dtype


def new_manifest(loaded, stages: dict, out: Path, exporter: str, opset: int = 0, **more) -> Manifest:
    """The manifest of an export of `loaded` (the tokenizer is saved into `out` here); `more` sets
    the fields of static and AOTInductor exports (runtime, static, graphs)."""
    from vlmrt import __version__

    m = loaded.model
    return Manifest(
        name=loaded.name, family=loaded.family, synthetic=loaded.synthetic, seed=getattr(loaded, "seed", None),
        config_hash=config_hash(loaded), dtype=export_dtype(loaded), num_layers=m.num_layers,
        num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, max_context=m.max_context, image_token_id=m.image_token_id,
        processor=loaded.spec, stages=stages, tokenizer_files=_save_tokenizer(loaded.tokenizer, out),
        vlmrt_version=__version__, exporter=exporter, opset=opset, **more,
    )


def _restat(out: Path, info: StageInfo) -> StageInfo:
    """A stage's info after its graph was rewritten (the weights file may be new or gone)."""
    data = f"{info.file}.data"
    return StageInfo(info.file, data if (out / data).exists() else None, info.inputs, info.outputs)


def _save_tokenizer(tokenizer, out: Path) -> tuple[str, ...]:
    files = tokenizer.save_pretrained(str(out))
    return tuple(sorted(Path(f).name for f in files if Path(f).exists()))


# ----------------------------------------------------------------------------- the export cache
def cache_root() -> Path:
    """$VLMRT_CACHE, else ~/.cache/vlmrt."""
    return Path(os.environ.get("VLMRT_CACHE") or Path.home() / ".cache" / "vlmrt")


def cache_folder(loaded) -> Path:
    """exports/<preset>-<dtype>[-<weight format>]-seed<seed>-<vlmrt version> under the cache root
    (releases: folder name plus a hash of its path)."""
    from vlmrt import __version__
    from vlmrt.config import DTYPES

    dtype = next((k for k, v in DTYPES.items() if v == loaded.dtype), "x")
    name = loaded.name
    if not loaded.synthetic:
        name = f"{Path(name).name}-{hashlib.sha256(str(Path(name).resolve()).encode()).hexdigest()[:8]}"
    weights = "" if loaded.weights is None or loaded.weights.is_fp else f"-{loaded.weights.tag}"
    return cache_root() / "exports" / f"{name}-{dtype}{weights}-seed{getattr(loaded, 'seed', None) or 0}-{__version__}"


def ensure_export(loaded, progress: Progress | None = print_progress) -> Path:
    """The cached export of `loaded`, made now if missing, unfinished or stale (another vlmrt
    version, an edited preset, or a decoder of the earlier concatenating form)."""
    from vlmrt import __version__
    from vlmrt.export.manifest import read_manifest

    folder = cache_folder(loaded)
    if (folder / MANIFEST).exists():
        try:
            m = read_manifest(folder)
            weights = "fp" if loaded.weights is None else loaded.weights.tag
            slots = CACHE_POSITION in {t.name for t in m.stages["decoder"].inputs}  # not the concatenating form
            if m.vlmrt_version == __version__ and m.config_hash == config_hash(loaded) and m.weights == weights and slots:
                return folder
        except VlmrtError:
            pass
        if progress:
            progress(f"the cached export in {folder} is stale; rebuilding it")
    if loaded.weights is not None and not loaded.weights.is_fp:
        _quantize_cached(loaded, folder, progress)
    else:
        export_model(loaded, folder, force=True, progress=progress)
    return folder


def _quantize_cached(loaded, folder: Path, progress: Progress | None) -> None:
    """A quantized cached export: a copy of the fp one (made first if missing), quantized in place
    (tracing the model again would take minutes at real sizes)."""
    from vlmrt.export.manifest import read_manifest
    from vlmrt.export.quantize_onnx import check_onnx_format, quantize_export

    check_onnx_format(loaded.weights)
    fp = ensure_export(replace(loaded, weights=None), progress)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(fp, folder, ignore=shutil.ignore_patterns(MANIFEST))  # unfinished until the manifest lands
    quantize_export(folder, loaded.weights, progress)
    m = read_manifest(fp)
    stages = {k: _restat(folder, info) for k, info in m.stages.items()}
    write_manifest(folder, replace(m, weights=loaded.weights.tag, stages=stages))
