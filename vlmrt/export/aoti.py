"""AOTInductor exports: each stage through `torch.export` and `torch._inductor.aoti_compile_and_package`
into a `.pt2` package that runs with no vlmrt model code (`--runtime aoti`, vlmrt/runtimes/aoti.py).

```
 LoadedModel ─► per graph: example inputs (vlmrt/export/onnx.py default_io + the family hook)
   vision.pt2          pixel_values [batch,3,H,W] (+ family inputs)     ─► image_features
   embedding.pt2       input_ids [batch,sequence], image_features [batch,image_tokens,D] ─► inputs_embeds
                       (text only, decode steps: image_tokens = 0)
   decoder.pt2         the static-cache decoder (static_cache.py): cache [batch,H_kv,cache_sequence,hd]
   each: torch.export.export(module, args, dynamic_shapes={batch, sequence, image_tokens, cache_sequence})
         ─► aoti_compile_and_package(ep, <graph>.pt2, inductor_configs) ─► run once against eager
 ─► tokenizer files, manifest.json ("runtime": "aoti", `graphs` with each package's I/O)
```

Dynamic dimensions: batch, sequence, image_tokens and cache_sequence are named `torch.export.Dim`s
(min 1; image_tokens min 0, so one embedding package serves text-only calls too); any other named axis (MiniCPM-V-2's packed chunk axes) is exported static at the size the
family hook declares in `StageIO.static_sizes` (the runtime pads to it, as for static ONNX exports).
The AOTInductor runtime allocates the cache per request at [B,H_kv,max_seq,hd], so the attention
covers only the slots a request can use.

Compile time: Inductor writes and compiles C++ for every package (tens of seconds each on two
cores). `fast_compile=True` builds without C++ optimization or vectorization (`-O0`), for tests;
the default keeps Inductor's optimized build, for benchmarks.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import GraphInfo, Manifest, StageInfo, TensorInfo
from vlmrt.export.onnx import StageIO, StageModule, axes_for, default_io
from vlmrt.export.static import _hooked, at_sizes
from vlmrt.export.static_cache import StaticCacheDecoder, example_inputs
from vlmrt.stages import INPUTS_EMBEDS, POSITION_IDS

DYNAMIC_DIMS = ("batch", "sequence", "image_tokens", "cache_sequence")
FAST_COMPILE = {"aot_inductor.debug_compile": True, "cpp.vec_isa_ok": False}  # -O0, scalar kernels


def _dim(name: str, max_context: int):
    from torch.export import Dim

    top = {"batch": 1024, "image_tokens": 65536}.get(name, max_context)
    return Dim(name, min=0 if name == "image_tokens" else 1, max=top)


def _dynamic_shapes(io: StageIO, dims: dict) -> tuple:
    """One dict per input, {axis: Dim} for the dynamic named axes (a tuple: forward takes *tensors)."""
    shapes = []
    for name in io.inputs:
        axes = axes_for(name, io.dynamic_axes)
        shapes.append({a: dims[d] for a, d in axes.items() if d in dims} or None)
    return (tuple(shapes),)


def _infos(names, tensors, axes: dict) -> tuple[TensorInfo, ...]:
    out = []
    for name, t in zip(names, tensors):
        named = axes_for(name, axes)
        dims = tuple(named.get(a, int(n)) for a, n in enumerate(t.shape))
        shape = tuple(d if d in DYNAMIC_DIMS else int(t.shape[a]) for a, d in enumerate(dims))
        out.append(TensorInfo(name, str(t.dtype).replace("torch.", ""), shape, dims))
    return tuple(out)


def export_program(module, io: StageIO, stage: str, max_context: int):
    """torch.export `module` at `io`'s examples with the named dynamic dimensions -> (program,
    the module's outputs on the examples)."""
    dims = {d: _dim(d, max_context) for d in DYNAMIC_DIMS}
    args = tuple(io.inputs.values())
    with torch.no_grad():
        expected = module(*args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ep = torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(io, dims), strict=False)
            except Exception as e:  # torch.export raises many types; name the stage
                raise VlmrtError(f"torch.export failed for the {stage} stage ({e.__class__.__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return ep, expected


def compile_graph(module, io: StageIO, out: Path, stem: str, stage: str, max_context: int, configs: dict,
                  progress, images: bool = True) -> GraphInfo:
    """torch.export one module at `io`'s examples, AOTInductor-compile it to `out`/<stem>.pt2, and
    check the package against the module on the examples."""
    args = tuple(io.inputs.values())
    t0 = time.perf_counter()
    ep, expected = export_program(module, io, stage, max_context)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t1 = time.perf_counter()
            path = out / f"{stem}.pt2"
            path.unlink(missing_ok=True)
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)
    from vlmrt.eval.tensor_parity import first_mismatch

    bad = first_mismatch(module.output_names, torch._inductor.aoti_load_package(str(path))(*args), expected)
    if bad:
        raise VlmrtError(f"{path.name}: an output differs from eager after compilation ({bad})")
    axes = io.dynamic_axes
    info = StageInfo(path.name, None, _infos(list(io.inputs), args, axes), _infos(module.output_names, expected, axes))
    progress(f"{stage}: {path.name} written, export {t1 - t0:.1f} s, AOTInductor {time.perf_counter() - t1:.1f} s")
    return GraphInfo(stage, None, None, images, info)  # batch and sequence are dynamic


def _decoder_io(loaded, embedded: dict, known: dict) -> StageIO:
    model = loaded.model
    dio = _hooked(model, "decoder", default_io("decoder", loaded, {k: v.clone() for k, v in embedded.items()}))
    extras = {k: v for k, v in embedded.items() if k != INPUTS_EMBEDS}
    b, t = embedded[INPUTS_EMBEDS].shape[:2]
    seq = max(24, t + 2 * b)  # every example row's slots (rows start 2 apart): a dynamic-resolution prompt is longer
    inputs = example_inputs(model, embedded[INPUTS_EMBEDS], seq, extras, mrope=dio.inputs[POSITION_IDS].dim() == 3)
    axes = {**known, **dio.dynamic_axes, "attention_mask": {0: "batch", 1: "cache_sequence"},
            "cache_position": {0: "batch", 1: "sequence"}, "logits_index": {0: "batch"}}
    for name in list(inputs) + [f"present.{i}.{kv}" for i in range(model.num_layers) for kv in ("key", "value")]:
        if name.startswith(("past_key_values.", "present.")):
            axes[name] = {0: "batch", 2: "cache_sequence"}
    return StageIO(inputs, axes)


def export_graphs(loaded, out: Path, configs: dict, progress, compile=compile_graph) -> list[GraphInfo]:
    """The three packages of the module docstring (`compile`: what makes each stage's artefact from
    its module and example inputs; the Paddle export passes its own)."""
    model, ctx, graphs = loaded.model, loaded.model.max_context, []
    vio = _hooked(model, "vision", default_io("vision", loaded, {}))
    vio = at_sizes(vio, dict(vio.static_sizes))
    vision = StageModule(model, "vision", list(vio.inputs), [])
    with torch.no_grad():
        outputs = vision(*vio.inputs.values())
    feats = dict(zip(vision.output_names, outputs))
    graphs.append(compile(vision, vio, out, "vision", "vision", ctx, configs, progress))
    known = {k: axes_for(k, vio.dynamic_axes) for k in feats}
    eio = _hooked(model, "embedding", default_io("embedding", loaded, feats))
    eio.dynamic_axes = {**known, **eio.dynamic_axes}
    emb = StageModule(model, "embedding", list(eio.inputs), list(feats))
    with torch.no_grad():
        outputs = emb(*eio.inputs.values())  # sets emb.output_names
    embedded = dict(zip(emb.output_names, outputs))
    known.update(eio.dynamic_axes)
    graphs.append(compile(emb, eio, out, "embedding", "embedding", ctx, configs, progress))
    dio = _decoder_io(loaded, embedded, known)
    decoder = StaticCacheDecoder(model, list(dio.inputs))
    graphs.append(compile(decoder, dio, out, "decoder", "decoder", ctx, configs, progress))
    return graphs


def export_aoti_model(loaded, out: str | Path, fast_compile: bool = False, force: bool = False,
                      progress=None) -> Manifest:
    """Export a loaded model as AOTInductor packages (see the module docstring).

    Args:
        loaded: a `LoadedModel` with model code, on CPU (or CUDA for CUDA packages).
        out: the export folder (absent or empty unless `force`).
        fast_compile: build the C++ without optimization (tests; slower to run).
        force: write into a non-empty folder, overwriting an earlier export there.
        progress: called with one line per step (None: silent).

    Returns:
        The manifest written to `out`/manifest.json ("runtime": "aoti").
    """
    from vlmrt.export.manifest import MANIFEST, write_manifest
    from vlmrt.export.onnx import export_dtype, new_manifest, prepare_out

    dtype = export_dtype(loaded)
    out, progress = Path(out), progress or (lambda _: None)
    prepare_out(out, force)
    configs = dict(FAST_COMPILE) if fast_compile else {}
    progress(f"{loaded.name} ({loaded.family}, {dtype}, AOTInductor on {loaded.device.type}"
             f"{', fast compile' if fast_compile else ''}) -> {out}")
    graphs = export_graphs(loaded, out, configs, progress)
    stages = {}
    for g in graphs:
        stages.setdefault(g.stage, g.info)
    manifest = new_manifest(loaded, stages, out, f"torch.export + AOTInductor, torch {torch.__version__}"
                            f"{' (fast compile)' if fast_compile else ''}", runtime="aoti", graphs=tuple(graphs))
    write_manifest(out, manifest)
    progress(f"done: {out / MANIFEST} ({len(graphs)} packages)")
    return manifest


def ensure_aoti_export(loaded, progress=None) -> Path:
    """The cached AOTInductor export of `loaded` (optimized build), made now if missing or stale."""
    from vlmrt import __version__
    from vlmrt.export.manifest import MANIFEST, read_manifest
    from vlmrt.export.onnx import cache_folder, config_hash, print_progress

    folder = cache_folder(loaded).with_name(cache_folder(loaded).name + f"-aoti-{loaded.device.type}")
    if (folder / MANIFEST).exists():
        try:
            m = read_manifest(folder)
            if m.vlmrt_version == __version__ and m.config_hash == config_hash(loaded) and m.runtime == "aoti":
                return folder
        except VlmrtError:
            pass
    export_aoti_model(loaded, folder, force=True, progress=progress or print_progress)
    return folder
