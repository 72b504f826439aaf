"""vlmrt: run vision-language models fast, on interchangeable runtimes, and prove it.

Library API (the CLI is a thin layer over it):
    load_model(name_or_path, device, dtype, seed) -> LoadedModel
    Pipeline.load(model, runtime, device, dtype)  -> callable: (images, prompts) -> Result
    GenerationConfig                              sampling and stopping
    export(model, out, dtype, opset)              ONNX graphs of the three stages + manifest.json

The names are imported on first use, so `import vlmrt` (and `vlmrt --help`) costs no torch import.
"""

from importlib import import_module

__version__ = "0.2.0"
_LAZY = {  # public name -> the module that defines it
    "GenerationConfig": "vlmrt.config",
    "RunOptions": "vlmrt.config",
    "VlmrtError": "vlmrt.errors",
    "export": "vlmrt.export",
    "load_model": "vlmrt.models",
    "Pipeline": "vlmrt.pipeline",
    "Result": "vlmrt.pipeline",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmrt' has no attribute {name!r}")
