"""Runtimes execute the three stages; the generation loop (vlmrt/generate.py) drives them.

A runtime offers `encode_images`, `embed`, `start(batch, max_seq)`, `decode(...)` and
`synchronize()` (see `generate.StageRunner`), for the lock-step loop; a runtime that executes engine
steps (vlmrt/engine.py) adds `allocate_slots(num_slots, max_seq)` and `run_step(StepInputs)`, and a
compiled one `warmup()`. `build_runtime` makes one; in a tensor-parallel process (vlmrt/tp) the
eager or compiled runtime it makes is rank 0's LeaderRuntime. Runtimes are looked up in a table and imported lazily,
so the library imports without optional packages (onnxruntime) or a GPU.
"""

from __future__ import annotations

import importlib

from vlmrt.errors import VlmrtError

RUNTIMES = {  # name -> "module:Class", alphabetical
    "aoti": "vlmrt.runtimes.aoti:AotiRuntime",
    "compiled": "vlmrt.runtimes.compiled:CompiledRuntime",
    "eager": "vlmrt.runtimes.eager:EagerRuntime",
    "jax": "vlmrt.runtimes.jax:JaxRuntime",
    "mindspore": "vlmrt.runtimes.mindspore:MindSporeRuntime",
    "onnx": "vlmrt.runtimes.onnx:OnnxRuntime",
    "paddle": "vlmrt.runtimes.paddle:PaddleRuntime",
    "stablehlo": "vlmrt.runtimes.stablehlo:StableHloRuntime",
}


def runtime_class(name: str):
    if name not in RUNTIMES:
        raise VlmrtError(f"unknown runtime {name!r}; available: {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_frameworks(names) -> None:
    """Import the frameworks of the runtimes `names` in an order that lets them share one process.

    MindSpore's CPU kernels link against MindSpore's own oneDNN build: once Paddle's oneDNN is in
    the process, its plugin fails to load (`undefined symbol: dnnl_threadpool_interop_stream_create`);
    loaded first, both work. A framework that is not installed is left for its runtime to report.
    """
    if "mindspore" in names and "paddle" in names:
        from vlmrt.runtimes.mindspore import import_mindspore

        try:
            import_mindspore()
        except VlmrtError:
            pass


def build_runtime(name: str, loaded, **options):
    """The runtime `name` over `loaded`: in a tensor-parallel group (`vlmrt.tp.active()`, more than
    one rank), rank 0's sharded eager or compiled runtime, whose decoder calls the other ranks replay."""
    from vlmrt.tp.group import active

    group = active()
    if group is None or group.world == 1:
        return runtime_class(name)(loaded, **options)
    from vlmrt.tp.runtime import LeaderRuntime

    return LeaderRuntime(loaded, group, name, options)
