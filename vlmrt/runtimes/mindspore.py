"""The mindspore runtime: the three stages as MindSpore graphs (GRAPH_MODE), driven by the shared
generation loop and the engine. A preset or release is lowered in process
(vlmrt/runtimes/mindspore_lower.py); a MINDIR export folder (`vlmrt export --format mindir`) runs on
`mindspore.load` + `nn.GraphCell` with no vlmrt model code imported.

```
 encode_images  pixel_values (+ named inputs, static axes padded) ─► vision graph ─► image_features
 embed          input_ids (+ image_features; text only: image_tokens = 0) ─► embedding graph
 start(b, n)    cache = zeros [b,H_kv,S,hd] per layer, S = n rounded up to 128 (at most the context):
                MindSpore tensors, kept on the MindSpore side
 decode         inputs_embeds [b,t,D], position_ids, attention_mask [b,S], cache_position [b,t],
                logits_index [b] = t-1, cache ─► decoder graph ─► logits [b,1,V], cache (same shapes)
```

Every graph takes dynamic batch, sequence and cache dims, so MindSpore compiles each stage once
and it serves every request; rounding the lock-step cache to 128 slots keeps its shapes few. Stage
outputs cross to torch (host copies) where the loop reads them: image features, embeddings,
logits; the cache never does in the lock-step loop. The engine's pool stays in torch buffers (the
engine compacts rows in place): a step copies the attention window of its rows to MindSpore and
writes back only the positions it wrote (vlmrt/runtimes/lowered.py).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from vlmrt.errors import VlmrtError
from vlmrt.runtimes.lowered import LoweredRuntime

EXTRA_HINT = ("install the extra in its own virtual environment: pip install 'vlmrt[mindspore]' "
              "(mindspore, with numpy<2)")
SEQ_BUCKET = 128  # cache slots are allocated in multiples of this (requests share compiled graphs)
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def import_mindspore():
    """The mindspore module in graph mode on the CPU, or a VlmrtError naming the extra."""
    before = os.environ.get("GLOG_v")
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's log: errors only (its warnings go to stderr on every compile)
    try:
        import mindspore as ms
    except ImportError as e:
        if "paddle" in sys.modules and "dnnl" in str(e):  # see vlmrt.runtimes.load_frameworks
            raise VlmrtError("MindSpore cannot load after Paddle in one process (their oneDNN builds clash: "
                             f"{e}); load mindspore first (one --runtime list does: eager,paddle,mindspore) "
                             "or run it in its own process") from None
        raise VlmrtError(f"--runtime mindspore needs MindSpore; {EXTRA_HINT}") from None
    finally:  # read at import; to Paddle's glog, loaded later in the process, GLOG_v=3 means verbose
        if before is None:
            os.environ.pop("GLOG_v", None)
    if int(np.__version__.split(".")[0]) >= 2:
        raise VlmrtError(f"MindSpore {ms.__version__} needs numpy<2 (numpy {np.__version__} is installed); "
                         f"{EXTRA_HINT}")
    if not getattr(import_mindspore, "ready", False):
        ms.set_device("CPU")
        ms.set_context(mode=ms.GRAPH_MODE)
        import_mindspore.ready = True
    return ms


def to_ms(t: torch.Tensor):
    """A torch tensor -> a MindSpore tensor (a host copy; bf16 through fp32)."""
    ms = import_mindspore()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return ms.Tensor(t.float().numpy()).astype(ms.bfloat16)
    return ms.Tensor(t.contiguous().numpy())


def to_torch(value) -> torch.Tensor:
    """A MindSpore tensor -> a torch tensor (a host copy)."""
    ms = import_mindspore()
    if value.dtype == ms.bfloat16:
        return torch.from_numpy(value.astype(ms.float32).asnumpy()).bfloat16()
    return torch.from_numpy(np.array(value.asnumpy()))


def load_graph(path):
    """A MINDIR file as a callable `nn.GraphCell` (a VlmrtError when MindSpore cannot read it)."""
    ms = import_mindspore()
    try:
        return ms.nn.GraphCell(ms.load(str(path)))
    except Exception as e:  # MindSpore raises its own error types
        raise VlmrtError(f"MindSpore cannot load {path} ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); re-export the model with --format mindir") from None


def load_graphs(folder, manifest) -> dict:
    """stage -> the GraphCell of its MINDIR file in the export folder."""
    return {stage: load_graph(folder / info.file) for stage, info in manifest.stages.items()}


class MindSporeRuntime(LoweredRuntime):
    """Runs a model's stages on MindSpore (see the module docstring and vlmrt/runtimes/lowered.py).

    Args:
        loaded: a `LoadedModel`: a preset or release (fp32 or fp16, on the CPU; lowered now, which
            takes torch.export's time once per stage) or a MINDIR export folder.
        threads: CPU threads of MindSpore's kernels (default: the cores this process may use).
    """

    name, framework, export_format = "mindspore", "MindSpore", "mindir"
    lowered_kind = "stages lowered from the model code, graph mode (one dynamic-shape graph per stage)"
    export_kind = "MINDIR graphs (mindspore.load + nn.GraphCell) over {folder}"
    seq_bucket = SEQ_BUCKET

    def fw(self):
        return import_mindspore()

    def set_threads(self, threads: int) -> None:
        set_threads(import_mindspore(), threads)

    def to_fw(self, t: torch.Tensor):
        return to_ms(t)

    def to_torch(self, value) -> torch.Tensor:
        return to_torch(value)

    def zeros(self, shape: list[int], dtype: str):
        return import_mindspore().Tensor(np.zeros(tuple(shape), dtype=NP_DTYPES[dtype]))

    def cat_rows(self, a, b):
        return import_mindspore().ops.cat((a, b))

    def take_rows(self, xs: list, rows: torch.Tensor) -> list:
        ms = import_mindspore()
        index = ms.Tensor(rows.cpu().numpy().astype(np.int64))
        return [ms.ops.gather(x, index, 0) for x in xs]

    def open_export(self, folder, manifest) -> tuple[dict, dict]:
        return dict(manifest.stages), load_graphs(folder, manifest)

    def lower_stages(self):
        from vlmrt.export.mindir import lower_stages

        return lower_stages


def set_threads(ms, threads: int) -> None:
    """MindSpore's CPU kernel threads (once per process: MindSpore takes it before its runtime starts)."""
    if not getattr(set_threads, "done", False):
        ms.device_context.cpu.op_tuning.threads_num(threads)
        set_threads.done = True
