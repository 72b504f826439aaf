"""Tiny exports shared by the ONNX tests: each tiny preset is exported once per test session."""

from pathlib import Path

_EXPORTS: dict[str, Path] = {}


def exported(preset: str, tmp_path_factory) -> Path:
    """The export folder of tiny `preset` (fp32), made on first use."""
    from conftest import load_tiny
    from vlmrt.export import export_model

    if preset not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"onnx-{preset}")
        export_model(load_tiny(preset), out, force=True, progress=None)
        _EXPORTS[preset] = out
    return _EXPORTS[preset]
