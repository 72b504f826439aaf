"""StableHLO exports (`vlmrt export --format stablehlo`): every stage as a serialized
`jax.export.Exported` per shape bucket, the weights as arguments in one safetensors file, run by
`--runtime stablehlo` (vlmrt/runtimes/stablehlo.py) with jax only: no model code, no torchax.

```
 LoadedModel ─► torchax: the stage modules as jax functions over one copy of the weights
                (the same lowering `--runtime jax` jits, vlmrt/runtimes/jax.py)
 the bucket plan of the static ONNX export (vlmrt/export/static.py), per batch bucket B:
   vision.b{B}.shlo          fn(weights, {pixel_values}, {})                         ─► {image_features, ...}
   embedding.b{B}.t{T}.shlo  fn(weights, {input_ids, image_features, ...}, {})       ─► {inputs_embeds, ...}
   embedding.b{B}.t1.shlo    text only (decode steps)
   decoder.b{B}.t{T}.shlo    fn(weights, {inputs_embeds, position_ids, attention_mask, cache_position,
                             logits_index, ...}, {past_key_values.*}) ─► {logits, present.*}, T in buckets and 1
   each: jax.export.export(jax.jit(fn))(shapes of the bucket's example inputs) ─► .serialize() bytes
 weights.safetensors   every weight and buffer once, by name (the artefacts take them as arguments:
                       no constants baked in, so a large model stays one file and artefacts stay small)
 manifest.json         "runtime": "stablehlo", `static` (the buckets), `graphs` (each artefact's I/O)
```

Why per bucket: `jax.export` with symbolic shapes fails through torchax (its tensor wrapper needs
integer sizes), so each artefact has fixed shapes, as the static ONNX export's graphs do, and the
runtime pads each call to the smallest bucket that fits. Integer inputs are int32 (JAX's default
without x64). Exporting lowers to StableHLO only; XLA compiles each artefact when it first runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import GraphInfo, Manifest, StageInfo, TensorInfo
from vlmrt.export.onnx import StageIO, axes_for
from vlmrt.export.static import StaticShapes, export_buckets

ARTEFACT = ".shlo"  # the suffix of a serialized jax.export.Exported
WEIGHTS = "weights.safetensors"
PAST = "past_key_values."


def _tensor_infos(named: dict, axes: dict) -> tuple[TensorInfo, ...]:
    """TensorInfo per array (anything with .shape and .dtype), with its axes' dimension names."""
    out = []
    for name, a in named.items():
        named_axes = axes_for(name, axes)
        dims = tuple(named_axes.get(i, int(n)) for i, n in enumerate(a.shape))
        out.append(TensorInfo(name, str(np.dtype(a.dtype)), tuple(int(n) for n in a.shape), dims))
    return tuple(out)


class ArtefactWriter:
    """Writes one bucket's artefact (the `write` of `export_buckets`): the stage module as a jax
    function fn(weights, inputs, cache) -> outputs (dicts by name), exported at the bucket's shapes.

    Args:
        stages: `vlmrt.runtimes.jax.JaxStages` over the model (one copy of the weights).
        out: the export folder.
        progress: called with one line per artefact.
    """

    def __init__(self, stages, out: Path, progress):
        self.stages, self.jax, self.out, self.progress = stages, stages.jax, out, progress
        spec = lambda a: self.jax.ShapeDtypeStruct(a.shape, a.dtype)
        self.spec = lambda tree: self.jax.tree.map(spec, tree)
        self.weights_spec = self.spec(stages.weights)

    def function(self, module, names: list[str]):
        """fn(weights, inputs, cache) of a stage module whose forward takes `names` in order."""

        def call(model, inputs: dict, cache: dict):  # model: the reparametrized model (module holds it)
            named = {**inputs, **cache}
            outs = module(*[named[n] for n in names])
            return dict(zip(module.output_names, outs))

        return self.stages.function(call)

    def __call__(self, module, io: StageIO, stem: str, stage: str, batch: int, sequence, images: bool) -> GraphInfo:
        from vlmrt.runtimes.torchax_bridge import to_jax

        jax, names = self.jax, list(io.inputs)
        inputs = {n: to_jax(io.inputs[n]) for n in names if not n.startswith(PAST)}
        cache = {n: to_jax(io.inputs[n]) for n in names if n.startswith(PAST)}
        fn = self.function(module, names)
        with torch.inference_mode(False), torch.no_grad():
            try:
                exported = jax.export.export(jax.jit(fn))(self.weights_spec, self.spec(inputs), self.spec(cache))
            except Exception as e:  # tracing raises many types; name the stage
                raise VlmrtError(f"jax.export failed for {stem} ({e.__class__.__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
        path = self.out / f"{stem}{ARTEFACT}"
        path.write_bytes(exported.serialize())
        outputs = jax.tree.unflatten(exported.out_tree, exported.out_avals)  # {name: ShapedArray}
        ordered, axes = {**inputs, **cache}, io.dynamic_axes  # the decoder's names present.* too
        info = StageInfo(path.name, WEIGHTS, _tensor_infos({n: ordered[n] for n in names}, axes),
                         _tensor_infos(outputs, axes))
        self.progress(f"{stage}: {path.name} ({path.stat().st_size / 1024:.0f} KiB)")
        return GraphInfo(stage, batch, sequence, images, info)


def save_weights(weights: dict, path: Path) -> None:
    """The jax weights (name -> array) as one safetensors file."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in weights.items()}, str(path))


def export_stablehlo_model(loaded, out: str | Path, shapes: StaticShapes, force: bool = False,
                           progress=None) -> Manifest:
    """Export a loaded model as StableHLO artefacts per bucket (see the module docstring).

    Args:
        loaded: a `LoadedModel` with model code, on the CPU, fp32 or fp16.
        out: the export folder (absent or empty unless `force`).
        shapes: the batch and sequence buckets (`--batch`, `--seq`); the largest sequence bucket is
            the KV-cache slots per row.
        force: write into a non-empty folder, overwriting an earlier export there.
        progress: called with one line per step (None: silent).

    Returns:
        The manifest written to `out`/manifest.json ("runtime": "stablehlo").
    """
    from vlmrt.export.manifest import MANIFEST, write_manifest
    from vlmrt.export.onnx import export_dtype, new_manifest, prepare_out
    from vlmrt.runtimes.jax import JaxStages

    dtype = export_dtype(loaded)
    if getattr(loaded.config, "dynamic", False):
        raise VlmrtError(f"{loaded.name} takes images at their own resolution (a dynamic patch count); StableHLO "
                         "artefacts have fixed shapes: export a fixed-resolution preset")
    if loaded.device.type != "cpu":
        raise VlmrtError(f"--format stablehlo exports from a model on the CPU; use --device cpu (got {loaded.device})")
    shapes = shapes.check(loaded.model.max_context)
    out, progress = Path(out), progress or (lambda _: None)
    prepare_out(out, force)
    stages = JaxStages(loaded.model.eval())
    progress(f"{loaded.name} ({loaded.family}, {dtype}, StableHLO via torchax + jax {stages.jax.__version__}, "
             f"batch {list(shapes.batch)}, sequence {list(shapes.sequence)}) -> {out}")
    save_weights(stages.weights, out / WEIGHTS)
    graphs = export_buckets(loaded, out, shapes, 0, progress, write=ArtefactWriter(stages, out, progress))
    first = {}
    for g in graphs:
        first.setdefault(g.stage, g.info)
    static = {"batch": list(shapes.batch), "sequence": list(shapes.sequence), "cache_len": shapes.cache_len}
    exporter = (f"torchax + jax.export, jax {stages.jax.__version__}, torch {torch.__version__}, "
                f"platform {stages.jax.default_backend()}")
    manifest = new_manifest(loaded, first, out, exporter, runtime="stablehlo", static=static, graphs=tuple(graphs))
    write_manifest(out, manifest)
    progress(f"done: {out / MANIFEST} ({len(graphs)} artefacts, weights in {WEIGHTS})")
    return manifest
