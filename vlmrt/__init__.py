"""vlmrt: run vision-language models fast, on interchangeable runtimes, and prove it.

Library API (the CLI is a thin layer over it):
    load_model(name_or_path, device, dtype, seed) -> LoadedModel
    Pipeline.load(model, runtime, device, dtype)  -> callable: (images, prompts) -> Result
    GenerationConfig                              sampling and stopping
    export(model, out, dtype, opset)              ONNX graphs of the three stages + manifest.json
"""

from vlmrt.config import GenerationConfig, RunOptions
from vlmrt.errors import VlmrtError
from vlmrt.models import load_model
from vlmrt.pipeline import Pipeline, Result

__version__ = "0.2.0"
__all__ = ["GenerationConfig", "RunOptions", "VlmrtError", "export", "load_model", "Pipeline", "Result", "__version__"]


def __getattr__(name):
    if name == "export":  # imported on first use: onnx is not needed to run models
        from vlmrt.export import export

        return export
    raise AttributeError(f"module 'vlmrt' has no attribute {name!r}")
