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
           seed: int = 0, progress=print_progress, weights=None) -> Manifest:
    """Export a preset or a release folder to `out` (manifest.json, vision/embedding/decoder.onnx,
    tokenizer files).

    Args:
        model: a preset name (`vlmrt models`) or a release folder.
        out: the export folder (absent or empty unless `force`).
        dtype: "fp32" or "fp16" (fp16 is for GPU providers; ONNX Runtime's CPU kernels are fp32).
        opset: ONNX opset of the graphs.
        force: overwrite an earlier export in a non-empty `out`.
        seed: seed of the synthetic weights (presets only).
        progress: called with one line per step (None: silent).
        weights: a vlmrt.quantize.WeightConfig (int8 or int4: the decoder quantized with ONNX Runtime's
            tools); None: the model's own weights.
    """
    from vlmrt.errors import VlmrtError
    from vlmrt.export.quantize_onnx import check_onnx_format
    from vlmrt.models import load_model
    from vlmrt.quantize import with_weights

    if weights is not None:
        check_onnx_format(weights)
    if dtype not in EXPORT_DTYPES:
        raise VlmrtError(f"cannot export in {dtype!r}; use --dtype fp32 or fp16")
    out = Path(out)
    prepare_out(out, force)  # fail before spending time on loading the model
    loaded = with_weights(load_model(model, dtype=dtype, seed=seed), weights)
    return export_model(loaded, out, opset=opset, force=True, progress=progress)


__all__ = ["FORMAT_VERSION", "Manifest", "StageIO", "ensure_export", "export", "export_model", "is_export_folder",
           "load_export", "read_manifest"]
