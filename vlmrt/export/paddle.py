"""Paddle exports (`vlmrt export --format paddle`): each stage lowered to a Paddle static program
(vlmrt/runtimes/paddle_lower.py) and saved with `paddle.jit.save` as Paddle Inference model files,
which `paddle.inference` predictors run with no vlmrt model code (vlmrt/runtimes/paddle_inference.py).

```
 LoadedModel ─► per stage (the examples and dynamic dims of the AOTInductor export, vlmrt/export/aoti.py)
   torch.export ─► run_decompositions() ─► Paddle source ─► to_static program ─► checked against eager
   vision.json + vision.pdiparams          pixel_values [batch,3,H,W] (+ family inputs) ─► image_features
   embedding.json + embedding.pdiparams    input_ids [batch,sequence], image_features ─► inputs_embeds
   decoder.json + decoder.pdiparams        the static-cache decoder: cache [batch,H_kv,cache_sequence,hd]
   (<stage>.py: the generated Paddle source, for reading, when the export lowers the model itself)
 ─► tokenizer files, manifest.json ("runtime": "paddle", `graphs` with each program's I/O)
```
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import GraphInfo, Manifest, StageInfo

def _check(static, args, expected, names, stage: str) -> None:
    from vlmrt.eval.tensor_parity import first_mismatch
    from vlmrt.runtimes.paddle import to_paddle

    got = [torch.from_numpy(a.numpy()).to(b.dtype) for a, b in zip(static(*[to_paddle(a) for a in args]), expected)]
    bad = first_mismatch(names, got, expected)  # the examples, fp32: rel 1e-4, as the parity checks
    if bad:
        raise VlmrtError(f"the Paddle program of the {stage} stage differs from eager at {bad}; "
                         "run the model on another runtime")


def lower_stages(loaded, folder: Path, progress=None) -> tuple[list[GraphInfo], dict]:
    """Every stage of `loaded` as a checked static Paddle program (see the module docstring).

    Args:
        loaded: a `LoadedModel` with model code, on the CPU.
        folder: where the generated sources go.
        progress: called with one line per stage (None: silent).

    Returns:
        (one GraphInfo per stage, naming <stage>.json / .pdiparams; stage -> the static program).
    """
    from vlmrt.export.aoti import _infos, export_graphs, export_program
    from vlmrt.runtimes.paddle import import_paddle
    from vlmrt.runtimes.paddle_lower import build_layer, lower_program

    import_paddle()
    if loaded.device.type != "cpu":
        raise VlmrtError(f"Paddle lowering runs on the CPU; load the model with --device cpu (got {loaded.device})")
    progress, programs = progress or (lambda _: None), {}

    def compile(module, io, out, stem, stage, max_context, configs, progress_, images=True) -> GraphInfo:
        t0 = time.perf_counter()
        ep, expected = export_program(module, io, stage, max_context)
        ep = ep.run_decompositions()
        t1 = time.perf_counter()
        lowered = lower_program(ep, list(io.inputs), module.output_names, stage, loaded.name)
        programs[stage] = static = build_layer(lowered, out, stem)
        _check(static, list(io.inputs.values()), expected, module.output_names, stage)
        progress(f"{stage}: torch.export {t1 - t0:.1f} s, Paddle program {time.perf_counter() - t1:.1f} s "
                 f"({lowered.source.count(chr(10))} lines)")
        args, axes = tuple(io.inputs.values()), io.dynamic_axes
        info = StageInfo(f"{stem}.json", f"{stem}.pdiparams", _infos(list(io.inputs), args, axes),
                         _infos(module.output_names, expected, axes))
        return GraphInfo(stage, None, None, images, info)

    graphs = export_graphs(loaded, Path(folder), {}, progress, compile=compile)
    return graphs, programs


def export_paddle_model(loaded, out: str | Path, force: bool = False, progress=None,
                        lowered: tuple | None = None) -> Manifest:
    """Export a loaded model as Paddle Inference model files (see the module docstring).

    Args:
        loaded: a `LoadedModel` with model code, on the CPU (fp32 or fp16).
        out: the export folder (absent or empty unless `force`).
        force: write into a non-empty folder, overwriting an earlier export there.
        progress: called with one line per step (None: silent).
        lowered: `lower_stages`' result for this model (e.g. a live Paddle runtime's), to save
            without lowering again; None: lower now.

    Returns:
        The manifest written to `out`/manifest.json ("runtime": "paddle").
    """
    from vlmrt.export.manifest import MANIFEST, write_manifest
    from vlmrt.export.onnx import export_dtype, new_manifest, prepare_out
    from vlmrt.runtimes.paddle import import_paddle

    paddle = import_paddle()
    dtype = export_dtype(loaded)
    out, progress = Path(out), progress or (lambda _: None)
    prepare_out(out, force)
    progress(f"{loaded.name} ({loaded.family}, {dtype}, Paddle {paddle.__version__}) -> {out}")
    graphs, programs = lowered or lower_stages(loaded, out, progress)
    for g in graphs:
        paddle.jit.save(programs[g.stage], str(out / Path(g.info.file).stem))
        progress(f"{g.stage}: {g.info.file} + {g.info.external_data} written")
    stages = {g.stage: g.info for g in graphs}
    manifest = new_manifest(loaded, stages, out, f"torch.export + vlmrt Paddle lowering, Paddle {paddle.__version__}",
                            runtime="paddle", graphs=tuple(graphs))
    write_manifest(out, manifest)
    progress(f"done: {out / MANIFEST} ({len(graphs)} programs)")
    return manifest
