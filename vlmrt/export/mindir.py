"""MINDIR exports (`vlmrt export --format mindir`): each stage lowered to a MindSpore Cell
(vlmrt/runtimes/mindspore_lower.py) and saved with `mindspore.export` as MINDIR, which
`mindspore.load` + `nn.GraphCell` run with no vlmrt model code (`--runtime mindspore` over the folder).

```
 LoadedModel ─► per stage (the examples and dynamic dims of the AOTInductor export, vlmrt/export/aoti.py)
   torch.export ─► run_decompositions() ─► MindSpore source ─► Cell (weights as Parameters) ─► checked
   against eager on the examples ─► mindspore.export(cell, inputs with the dynamic dims as None)
   vision.mindir        pixel_values [batch,3,H,W] (+ family inputs) ─► image_features
   embedding.mindir     input_ids [batch,sequence], image_features ─► inputs_embeds
   decoder.mindir       the static-cache decoder: cache [batch,H_kv,cache_sequence,hd]
   (<stage>.py: the generated MindSpore source, for reading, when the export lowers the model itself)
 ─► tokenizer files, manifest.json ("runtime": "mindspore", `graphs` with each graph's I/O)
```
"""

from __future__ import annotations

import time
from pathlib import Path

from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import GraphInfo, Manifest, StageInfo

SUFFIX = ".mindir"


def check_cell(cell, args, expected, names, stage: str) -> None:
    """The Cell on the examples against eager's outputs (a VlmrtError naming the first that differs:
    fp32, rel 1e-4, the parity checks' measure)."""
    from vlmrt.eval.tensor_parity import first_mismatch
    from vlmrt.runtimes.mindspore import to_ms, to_torch

    got = cell(*[to_ms(a) for a in args])
    got = got if isinstance(got, (tuple, list)) else (got,)
    bad = first_mismatch(names, [to_torch(a).to(b.dtype) for a, b in zip(got, expected)], expected)
    if bad:
        raise VlmrtError(f"the MindSpore graph of the {stage} stage differs from eager at {bad}; "
                         "run the model on another runtime")


def lower_stages(loaded, folder: Path, progress=None) -> tuple[list[GraphInfo], dict]:
    """Every stage of `loaded` as a checked MindSpore Cell (see the module docstring).

    Args:
        loaded: a `LoadedModel` with model code, on the CPU.
        folder: where the generated sources go.
        progress: called with one line per stage (None: silent).

    Returns:
        (one GraphInfo per stage, naming <stage>.mindir; stage -> the Cell).
    """
    from vlmrt.export.aoti import _infos, export_graphs, export_program
    from vlmrt.runtimes.mindspore import import_mindspore
    from vlmrt.runtimes.mindspore_lower import build_cell, lower_program

    import_mindspore()
    if loaded.device.type != "cpu":
        raise VlmrtError(f"MindSpore lowering runs on the CPU; load the model with --device cpu (got {loaded.device})")
    progress, cells = progress or (lambda _: None), {}

    def compile(module, io, out, stem, stage, max_context, configs, progress_, images=True) -> GraphInfo:
        t0 = time.perf_counter()
        ep, expected = export_program(module, io, stage, max_context)
        ep = ep.run_decompositions()
        t1 = time.perf_counter()
        lowered = lower_program(ep, list(io.inputs), module.output_names, stage, loaded.name)
        cells[stage] = cell = build_cell(lowered, out, stem)
        check_cell(cell, list(io.inputs.values()), expected, module.output_names, stage)
        progress(f"{stage}: torch.export {t1 - t0:.1f} s, MindSpore graph (lowered, compiled, checked) "
                 f"{time.perf_counter() - t1:.1f} s ({lowered.source.count(chr(10))} lines)")
        args, axes = tuple(io.inputs.values()), io.dynamic_axes
        info = StageInfo(f"{stem}{SUFFIX}", None, _infos(list(io.inputs), args, axes),
                         _infos(module.output_names, expected, axes))
        return GraphInfo(stage, None, None, images, info)

    graphs = export_graphs(loaded, Path(folder), {}, progress, compile=compile)
    return graphs, cells


def abstract_inputs(info: StageInfo) -> list:
    """MindSpore input placeholders of a stage: its named (dynamic) dims as None."""
    from vlmrt.runtimes.mindspore import import_mindspore

    ms = import_mindspore()
    return [ms.Tensor(shape=[d if isinstance(d, int) else None for d in t.shape], dtype=getattr(ms, t.dtype if
                      t.dtype != "bool" else "bool_")) for t in info.inputs]


def export_mindir_model(loaded, out: str | Path, force: bool = False, progress=None,
                        lowered: tuple | None = None) -> Manifest:
    """Export a loaded model as MINDIR graphs (see the module docstring).

    Args:
        loaded: a `LoadedModel` with model code, on the CPU (fp32 or fp16).
        out: the export folder (absent or empty unless `force`).
        force: write into a non-empty folder, overwriting an earlier export there.
        progress: called with one line per step (None: silent).
        lowered: `lower_stages`' result for this model (e.g. a live MindSpore runtime's), to save
            without lowering again; None: lower now.

    Returns:
        The manifest written to `out`/manifest.json ("runtime": "mindspore").
    """
    from vlmrt.export.manifest import MANIFEST, write_manifest
    from vlmrt.export.onnx import export_dtype, new_manifest, prepare_out
    from vlmrt.runtimes.mindspore import import_mindspore

    ms = import_mindspore()
    dtype = export_dtype(loaded)
    out, progress = Path(out), progress or (lambda _: None)
    prepare_out(out, force)
    progress(f"{loaded.name} ({loaded.family}, {dtype}, MindSpore {ms.__version__}) -> {out}")
    graphs, cells = lowered or lower_stages(loaded, out, progress)
    for g in graphs:
        t0 = time.perf_counter()
        stem = str(out / Path(g.info.file).stem)
        try:
            ms.export(cells[g.stage], *abstract_inputs(g.info), file_name=stem, file_format="MINDIR")
        except Exception as e:  # MindSpore raises its own error types
            raise VlmrtError(f"mindspore.export failed for the {g.stage} stage ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        progress(f"{g.stage}: {g.info.file} written ({time.perf_counter() - t0:.1f} s)")
    stages = {g.stage: g.info for g in graphs}
    manifest = new_manifest(loaded, stages, out, f"torch.export + vlmrt MindSpore lowering, MindSpore {ms.__version__}",
                            runtime="mindspore", graphs=tuple(graphs))
    write_manifest(out, manifest)
    progress(f"done: {out / MANIFEST} ({len(graphs)} graphs)")
    return manifest
