"""Static-shape ONNX exports, for graph compilers that take no dynamic dimension (Ascend's ATC:
`atc --framework=5` converts an ONNX graph at one fixed `--input_shape` into an offline .om model).

```
 StaticShapes: batch buckets, sequence buckets; S = the largest sequence bucket = KV-cache slots per row
 plan, per batch bucket B:
   vision.b{B}              pixel_values at the family's input size          ─► image_features
   embedding.b{B}.t{T}      input_ids [B,T] + image_features (prefill), T in the sequence buckets
   embedding.b{B}.t1        input_ids [B,1], text only (decode steps)
   decoder.b{B}.t{T}        the static-cache decoder (static_cache.py), T in the buckets and 1
 each graph: example inputs at exactly its shape ─► torch.onnx.export, no dynamic axes
   ─► ORT basic-level optimization, saved (constant folding: shape arithmetic the tracer recorded
      becomes constants; the result holds standard ONNX ops only)
   ─► onnx.checker + strict shape inference: not one symbolic dimension in any input, output or value_info
 manifest.json: `static` (the buckets), `graphs` (each bucket's graph and I/O, with the dimension
   names of each axis); README.md: one `atc` command line per graph
```

Example inputs come from the dynamic export's (vlmrt/export/onnx.py `default_io` and the family's
`export_io` hook), resized along their named axes: "batch" to B, "sequence" to T, and any other
named axis to the size the hook declares in `StageIO.static_sizes` (MiniCPM-V-2: its largest chunk
bucket), else kept. The onnx runtime pads a request along the same named axes (zeros; padded
rows and positions are dropped) and picks the smallest bucket that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import GraphInfo, Manifest, StageInfo, TensorInfo
from vlmrt.export.onnx import StageIO, StageModule, axes_for, default_io, export_stage
from vlmrt.export.static_cache import StaticCacheDecoder, example_inputs
from vlmrt.stages import INPUT_IDS, INPUTS_EMBEDS, POSITION_IDS


@dataclass(frozen=True)
class StaticShapes:
    """The buckets of a static export (`--batch 1,4 --seq 128,512`)."""

    batch: tuple[int, ...] = (1,)  # batch buckets; a request is padded to the smallest that fits
    sequence: tuple[int, ...] = (512,)  # prompt buckets; the largest is also S, the KV-cache slots per row

    @property
    def cache_len(self) -> int:
        return max(self.sequence)

    def check(self, max_context: int) -> "StaticShapes":
        for name, values in (("--batch", self.batch), ("--seq", self.sequence)):
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise VlmrtError(f"{name} {','.join(map(str, values))}: give positive integers, e.g. {name} 1,4")
        if self.cache_len > max_context:
            raise VlmrtError(f"--seq {self.cache_len} is longer than the model's context of {max_context}; "
                             f"give buckets up to {max_context}")
        return StaticShapes(tuple(sorted(set(self.batch))), tuple(sorted(set(self.sequence))))


def parse_buckets(text: str | None, flag: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """"1,4" -> (1, 4), with a clear error for anything else."""
    if text is None:
        return default
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise VlmrtError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 1,4") from None


# ----------------------------------------------------------------------------- example inputs at a bucket
def resize(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """x with `axis` tiled or cut to `size` (tiling keeps a packed structure such as MiniCPM's chunks)."""
    n = x.shape[axis]
    if n == size:
        return x
    if n == 0:
        return x.new_zeros(*x.shape[:axis], size, *x.shape[axis + 1:])
    return torch.cat([x] * -(-size // n), dim=axis).narrow(axis, 0, size)


def at_sizes(io: StageIO, sizes: dict[str, int]) -> StageIO:
    """`io`'s example inputs with each named axis resized to `sizes[name]` (unnamed sizes kept)."""
    out = {}
    for name, x in io.inputs.items():
        for axis, dim in axes_for(name, io.dynamic_axes).items():
            if dim in sizes:
                x = resize(x, axis, sizes[dim])
        out[name] = x.contiguous()
    return StageIO(out, io.dynamic_axes, dict(getattr(io, "static_sizes", {})))


def _hooked(model, stage: str, io: StageIO) -> StageIO:
    hook = getattr(model, "export_io", None)
    return (hook(stage, io) or io) if hook else io


def _dims(shape: torch.Size, axes: dict[int, str]) -> tuple:
    return tuple(axes.get(a, int(n)) for a, n in enumerate(shape))


# ----------------------------------------------------------------------------- folding
def fold_shapes(proto, folder: Path):
    """ONNX Runtime's basic-level optimizations (constant folding, no fused or contrib ops) on
    `proto`, so the shape arithmetic a trace records becomes constants and shape inference can fix
    every dimension. Weights go through `folder` as external data, one file."""
    import onnx

    from vlmrt.export.onnx import _move_weights_out
    from vlmrt.runtimes.onnx import import_onnxruntime

    ort = import_onnxruntime()
    src, dst = folder / "pruned.onnx", folder / "folded.onnx"
    _move_weights_out(proto, folder, folder / "pruned.onnx.data")
    onnx.save_model(proto, str(src))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "folded.onnx.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst), load_external_data=False)


def symbolic_dims(path: Path) -> list[str]:
    """Names of the tensors of the graph at `path` whose shape is not fully known after strict shape
    inference (inputs, outputs and value_info); empty for a static graph."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False), strict_mode=True)
    g = inferred.graph
    return [v.name for v in list(g.input) + list(g.output) + list(g.value_info)
            if not v.type.tensor_type.HasField("shape")
            or any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]


# ----------------------------------------------------------------------------- one bucket
def _graph(module, io: StageIO, out: Path, opset: int, progress, stem: str, stage: str, batch, seq, images) -> GraphInfo:
    info = export_stage(module, io, out, opset, progress, stem=stem, static=True, fold=fold_shapes)
    left = symbolic_dims(out / info.file)
    if left:
        raise VlmrtError(f"{info.file} still has dynamic dimensions after folding ({', '.join(left[:3])}); "
                         f"this family's {stage} stage cannot be exported with static shapes yet")
    axes = {**io.dynamic_axes}
    with_dims = lambda ts: tuple(TensorInfo(t.name, t.dtype, t.shape, _dims(t.shape, axes_for(t.name, axes)))
                                 for t in ts)
    info = StageInfo(info.file, info.external_data, with_dims(info.inputs), with_dims(info.outputs))
    return GraphInfo(stage, batch, seq, images, info)


def export_buckets(loaded, out: Path, shapes: StaticShapes, opset: int, progress, write=None) -> list[GraphInfo]:
    """Every graph of the plan (module docstring), for each batch bucket.

    Args:
        write: write(module, io, stem, stage, batch, sequence, images) -> GraphInfo, called once per
            graph with the stage module and its example inputs at the bucket (None: an ONNX graph;
            vlmrt/export/stablehlo.py passes its own).
    """
    if write is None:
        write = lambda module, io, stem, *where: _graph(module, io, out, opset, progress, stem, *where)
    model, graphs = loaded.model, []
    s = shapes.cache_len
    for b in shapes.batch:
        vio = _hooked(model, "vision", default_io("vision", loaded, {}))
        vio = at_sizes(vio, {"batch": b, **getattr(vio, "static_sizes", {})})
        vision = StageModule(model, "vision", list(vio.inputs), [])
        with torch.no_grad():
            outputs = vision(*vio.inputs.values())
        feats = dict(zip(vision.output_names, outputs))
        graphs.append(write(vision, vio, f"vision.b{b}", "vision", b, None, True))
        known = {k: axes_for(k, vio.dynamic_axes) for k in feats}
        for t, images in [(t, True) for t in shapes.sequence] + [(1, False)]:
            eio = _hooked(model, "embedding", default_io("embedding", loaded, feats if images else {}))
            eio.dynamic_axes = {**known, **eio.dynamic_axes}
            eio = at_sizes(eio, {"batch": b, "sequence": t})
            if not images:
                eio.inputs = {INPUT_IDS: eio.inputs[INPUT_IDS]}
            emb = StageModule(model, "embedding", list(eio.inputs), list(feats) if images else [])
            with torch.no_grad():
                embedded = emb(*eio.inputs.values())
            embedded = dict(zip(emb.output_names, embedded))
            stem = f"embedding.b{b}.t{t}"
            graphs.append(write(emb, eio, stem, "embedding", b, t, images))
            graphs.append(_decoder(loaded, embedded, eio.dynamic_axes, s, write, b, t))
    return graphs


def _decoder(loaded, embedded: dict, known: dict, s: int, write, b: int, t: int) -> GraphInfo:
    """The static-cache decoder at [b,t] on S = `s` slots, with the family's extra inputs."""
    model = loaded.model
    dio = _hooked(model, "decoder", default_io("decoder", loaded, {k: v.clone() for k, v in embedded.items()}))
    extras = {k: v for k, v in embedded.items() if k != INPUTS_EMBEDS}
    mrope = dio.inputs[POSITION_IDS].dim() == 3
    inputs = example_inputs(model, embedded[INPUTS_EMBEDS], s, extras, mrope=mrope)
    axes = {**known, **dio.dynamic_axes, "attention_mask": {0: "batch", 1: "cache_sequence"},
            "cache_position": {0: "batch", 1: "sequence"}, "logits_index": {0: "batch"}}
    for name in inputs:
        if name.startswith("past_key_values."):
            axes[name] = {0: "batch", 2: "cache_sequence"}
    for i in range(model.num_layers):
        for kv in ("key", "value"):
            axes[f"present.{i}.{kv}"] = {0: "batch", 2: "cache_sequence"}
    io = StageIO(inputs, axes)
    module = StaticCacheDecoder(model, list(inputs))
    module.stage = "decoder"
    return write(module, io, f"decoder.b{b}.t{t}", "decoder", b, t, True)


# ----------------------------------------------------------------------------- README with the ATC lines
def atc_command(graph: GraphInfo) -> str:
    """The `atc` line that converts one static graph to an offline model (.om) for an Ascend NPU."""
    shape = ";".join(f"{t.name}:{','.join(str(int(d)) for d in t.shape)}" for t in graph.info.inputs)
    stem = graph.info.file[:-len(".onnx")]
    return f'atc --model={graph.info.file} --framework=5 --input_shape="{shape}" --output={stem} --soc_version=<yours>'


def write_readme(out: Path, manifest: Manifest) -> Path:
    """README.md of a static export: the buckets, how the runtime pads, and one `atc` line per graph."""
    st = manifest.static
    lines = [f"# {manifest.name}: static-shape ONNX export", "",
             f"Batch buckets {st['batch']}, sequence buckets {st['sequence']}, KV cache {st['cache_len']} slots per row "
             f"({manifest.family}, {manifest.dtype}, opset {manifest.opset}). Every graph has fixed shapes only "
             "(checked with onnx.checker and strict shape inference at export).", "",
             "Run it with vlmrt (ONNX Runtime; requests are padded to the smallest bucket that fits):", "",
             "```sh", f"vlmrt run --model {out} --image photo.jpg --prompt \"What is this?\"", "```", "",
             "Convert each graph for an Ascend NPU with ATC (CANN toolkit; set --soc_version to your chip, "
             "e.g. the output of `npu-smi info`). ATC was not run here: the toolkit is not installable on this "
             "build machine.", "", "```sh"]
    lines += [atc_command(g) for g in manifest.graphs]
    lines += ["```", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- a whole model
def export_static_model(loaded, out: str | Path, shapes: StaticShapes, opset: int = 17, force: bool = False,
                        progress=None) -> Manifest:
    """Export a loaded model with static shapes only (see the module docstring).

    Args:
        loaded: a `LoadedModel` with model code.
        out: the export folder (absent or empty unless `force`).
        shapes: the batch and sequence buckets.
        opset: ONNX opset of the graphs.
        force: write into a non-empty folder, overwriting an earlier export there.
        progress: called with one line per step (None: silent).

    Returns:
        The manifest written to `out`/manifest.json (README.md beside it holds the ATC lines).
    """
    from vlmrt.export.manifest import MANIFEST, write_manifest
    from vlmrt.export.onnx import export_dtype, new_manifest, prepare_out

    dtype = export_dtype(loaded)
    if getattr(loaded.config, "dynamic", False):
        raise VlmrtError(f"{loaded.name} takes images at their own resolution (a dynamic patch count); export a "
                         "fixed-resolution preset with --static-shapes, or export without it")
    shapes = shapes.check(loaded.model.max_context)
    out, progress = Path(out), progress or (lambda _: None)
    prepare_out(out, force)
    progress(f"{loaded.name} ({loaded.family}, {dtype}, opset {opset}, static: batch {list(shapes.batch)}, "
             f"sequence {list(shapes.sequence)}) -> {out}")
    graphs = export_buckets(loaded, out, shapes, opset, progress)
    stages = {}
    for g in graphs:
        stages.setdefault(g.stage, g.info)
    static = {"batch": list(shapes.batch), "sequence": list(shapes.sequence), "cache_len": shapes.cache_len}
    manifest = new_manifest(loaded, stages, out, f"torch.onnx TorchScript exporter + ORT constant folding, torch "
                            f"{torch.__version__}", opset, static=static, graphs=tuple(graphs))
    write_readme(out, manifest)
    write_manifest(out, manifest)
    progress(f"done: {out / MANIFEST} ({len(graphs)} graphs; ATC command lines in {out / 'README.md'})")
    return manifest
