"""Export to static graphs: `export(model, out)` writes ONNX graphs of the three stages plus a
manifest that `vlmrt run --model DIR` (the onnx runtime) runs with no model code.

See vlmrt/export/onnx.py for the graphs and the family hook, vlmrt/export/manifest.py for the
manifest schema, and docs/export.md for both in prose.
"""

from __future__ import annotations

from pathlib import Path

from vlmrt.export.manifest import FORMAT_VERSION, Manifest, is_export_folder, load_export, read_manifest
from vlmrt.export.onnx import DEFAULT_OPSET, EXPORT_DTYPES, StageIO, ensure_export, export_model, prepare_out, print_progress


def export(model: str, out: str | Path, dtype: str = "fp32", opset: int = DEFAULT_OPSET, force: bool = False,
           seed: int = 0, progress=print_progress, format: str = "onnx", static_shapes: bool = False,
           batch: str | None = None, seq: str | None = None, device: str = "cpu", weights=None) -> Manifest:
    """Export a preset or a release folder to `out` (manifest.json, the stages' graphs or packages,
    tokenizer files).

    Args:
        model: a preset name (`vlmrt models`) or a release folder.
        out: the export folder (absent or empty unless `force`).
        dtype: "fp32" or "fp16" (fp16 is for GPU providers; ONNX Runtime's CPU kernels are fp32).
        opset: ONNX opset of the graphs.
        force: overwrite an earlier export in a non-empty `out`.
        seed: seed of the synthetic weights (presets only).
        progress: called with one line per step (None: silent).
        format: "onnx" (graphs for ONNX Runtime), "aoti" (AOTInductor .pt2 packages), "paddle" (Paddle
            Inference model files, vlmrt/export/paddle.py), "mindir" (MindSpore MINDIR graphs,
            vlmrt/export/mindir.py) or "stablehlo" (jax.export artefacts per
            bucket, vlmrt/export/stablehlo.py; always static shapes).
        static_shapes: onnx only: fixed shapes, one graph per bucket (vlmrt/export/static.py).
        batch: static (and stablehlo) batch buckets, "1,4" (default 1).
        seq: static (and stablehlo) sequence buckets, "128,512" (default 512); the largest is the KV-cache size.
        device: where the model is built and, for aoti, what the packages run on.
        weights: a vlmrt.quantize.WeightConfig (int8 or int4: the decoder quantized with ONNX Runtime's
            tools; dynamic ONNX exports only); None: the model's own weights.
    """
    from vlmrt.errors import VlmrtError
    from vlmrt.export.quantize_onnx import check_onnx_format
    from vlmrt.models import load_model
    from vlmrt.quantize import with_weights

    if weights is not None:
        check_onnx_format(weights)
    if dtype not in EXPORT_DTYPES:
        raise VlmrtError(f"cannot export in {dtype!r}; use --dtype fp32 or fp16")
    if format not in ("onnx", "aoti", "paddle", "mindir", "stablehlo"):
        raise VlmrtError(f"unknown export format {format!r}; use --format onnx, aoti, paddle, mindir or stablehlo")
    if format == "paddle":
        from vlmrt.runtimes.paddle import import_paddle

        import_paddle()  # before loading the model: a missing extra is a one-line error
    if format == "mindir":
        from vlmrt.runtimes.mindspore import import_mindspore

        import_mindspore()
    if (batch or seq) and not static_shapes and format != "stablehlo":
        raise VlmrtError("--batch and --seq set the buckets of a static export; add --static-shapes")
    if static_shapes and format not in ("onnx", "stablehlo"):
        raise VlmrtError(f"--static-shapes is for --format onnx; {format} exports keep batch and sequence dynamic")
    shapes = None
    if static_shapes or format == "stablehlo":
        from vlmrt.export.static import StaticShapes, parse_buckets

        shapes = StaticShapes(parse_buckets(batch, "--batch", (1,)), parse_buckets(seq, "--seq", (512,)))
        shapes.check(10**9)  # the context is checked once the model is loaded
    out = Path(out)
    prepare_out(out, force)  # fail before spending time on loading the model
    loaded = with_weights(load_model(model, device=device, dtype=dtype, seed=seed), weights)
    if getattr(loaded, "weights", None) is not None and (format != "onnx" or static_shapes):
        raise VlmrtError(f"--quantize exports are dynamic ONNX graphs (ONNX Runtime's quantizers); drop --format {format} "
                         "or --static-shapes, or drop --quantize")
    if format == "paddle":
        from vlmrt.export.paddle import export_paddle_model

        return export_paddle_model(loaded, out, force=True, progress=progress)
    if format == "mindir":
        from vlmrt.export.mindir import export_mindir_model

        return export_mindir_model(loaded, out, force=True, progress=progress)
    if format == "aoti":
        from vlmrt.export.aoti import export_aoti_model

        return export_aoti_model(loaded, out, force=True, progress=progress)
    if format == "stablehlo":
        from vlmrt.export.stablehlo import export_stablehlo_model

        return export_stablehlo_model(loaded, out, shapes, force=True, progress=progress)
    if shapes is not None:
        from vlmrt.export.static import export_static_model

        return export_static_model(loaded, out, shapes, opset=opset, force=True, progress=progress)
    return export_model(loaded, out, opset=opset, force=True, progress=progress)


__all__ = ["FORMAT_VERSION", "Manifest", "StageIO", "ensure_export", "export", "export_model", "is_export_folder",
           "load_export", "read_manifest"]
