"""Static-shape and AOTInductor exports shared by the tests: each made once per test session."""

from pathlib import Path

BATCH, SEQ = (4,), (192,)  # one bucket each: 5 graphs per family; the shared prompts + 32 tokens fit 192
_EXPORTS: dict[tuple, Path] = {}


def static_exported(preset: str, tmp_path_factory) -> Path:
    """The static-shape ONNX export of tiny `preset` (fp32, batch bucket 4, sequence bucket 192)."""
    from conftest import load_tiny
    from vlmrt.export.static import StaticShapes, export_static_model

    key = ("static", preset)
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"static-{preset}")
        export_static_model(load_tiny(preset), out, StaticShapes(BATCH, SEQ), force=True, progress=None)
        _EXPORTS[key] = out
    return _EXPORTS[key]


def aoti_exported(preset: str, tmp_path_factory) -> Path:
    """The AOTInductor export of tiny `preset` (fp32, CPU, fast compile: -O0 C++)."""
    from conftest import load_tiny
    from vlmrt.export.aoti import export_aoti_model

    key = ("aoti", preset)
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"aoti-{preset}")
        export_aoti_model(load_tiny(preset), out, fast_compile=True, force=True, progress=None)
        _EXPORTS[key] = out
    return _EXPORTS[key]
