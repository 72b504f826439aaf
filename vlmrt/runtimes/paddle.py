"""The paddle runtime: the three stages as Paddle static programs, driven by the shared generation
loop and the engine. A preset or release is lowered in process (vlmrt/runtimes/paddle_lower.py,
`paddle.jit.to_static`); a Paddle export folder (`vlmrt export --format paddle`) runs on
`paddle.inference` predictors with no vlmrt model code imported.

```
 encode_images  pixel_values (+ named inputs, static axes padded) ─► vision program ─► image_features
 embed          input_ids (+ image_features; text only: image_tokens = 0) ─► embedding program
 start(b, n)    cache = zeros [b,H_kv,n,hd] per layer: Paddle tensors, kept on the Paddle side
 decode         inputs_embeds [b,t,D], position_ids, attention_mask [b,n], cache_position [b,t],
                logits_index [b] = t-1, cache ─► decoder program ─► logits [b,1,V], cache (same shapes)
```

Every program takes dynamic batch, sequence and cache dims (None in its input specs), so it is
built once and serves every request. Stage outputs cross to torch (DLPack, then one copy) where the
loop reads them: image features, embeddings, logits; the cache never does in the lock-step loop.
The engine's pool stays in torch buffers (the engine compacts rows in place): a step copies the
attention window of its rows to Paddle and writes back only the positions it wrote.
"""

from __future__ import annotations

import torch

from vlmrt.errors import VlmrtError
from vlmrt.runtimes.lowered import LoweredRuntime

EXTRA_HINT = "install the extra: pip install 'vlmrt[paddle]' (paddlepaddle)"


def import_paddle():
    """The paddle module, or a VlmrtError naming the extra when it is not installed."""
    try:
        import paddle
    except ImportError:
        raise VlmrtError(f"--runtime paddle needs PaddlePaddle; {EXTRA_HINT}") from None
    return paddle


def to_paddle(t: torch.Tensor):
    """A torch tensor -> a Paddle tensor on the CPU (one host copy). Not DLPack: with Paddle tensors
    over torch's memory fed to the programs, the process hung twice inside Paddle's from_dlpack
    (`from_blob`) after some calls (Paddle 3.3.1; presumably torch's deleter, which takes the GIL,
    run on one of the executor's threads)."""
    paddle = import_paddle()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return paddle.to_tensor(t.float().numpy()).astype("bfloat16")
    return paddle.to_tensor(t.contiguous().numpy())


def to_torch(value) -> torch.Tensor:
    """A Paddle tensor -> a torch tensor of its own (one copy: the program may reuse its outputs'
    memory)."""
    return view_torch(value).clone()


def view_torch(value) -> torch.Tensor:
    """A Paddle tensor -> a torch tensor over the same memory (DLPack, no copy; Paddle's deleter
    needs no GIL), valid until the next call of the program that made it."""
    return torch.from_dlpack(value)


class _Predictor:
    """A saved stage program on a `paddle.inference` predictor: paddle tensors in, paddle tensors out."""

    def __init__(self, folder, info, threads: int):
        from paddle import inference

        stem = str(folder / info.file)[: -len(".json")]
        config = inference.Config(stem + ".json", stem + ".pdiparams")
        config.disable_gpu()
        config.disable_glog_info()
        config.disable_mkldnn()  # with oneDNN kernels (Paddle 3.3.1) the decoder's logits come out wrong
        # (max |diff| 14 on minigpt4-tiny) while its cache is right; Paddle's own CPU kernels match eager
        config.set_cpu_math_library_num_threads(threads)
        try:
            self.predictor = inference.create_predictor(config)
        except Exception as e:  # Paddle raises its own error types
            raise VlmrtError(f"Paddle Inference cannot load {stem}.json ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); re-export the model with --format paddle") from None

    def __call__(self, *tensors):
        return self.predictor.run(list(tensors))


class PaddleRuntime(LoweredRuntime):
    """Runs a model's stages on Paddle (see the module docstring and vlmrt/runtimes/lowered.py).

    Args:
        loaded: a `LoadedModel`: a preset or release (fp32 or fp16, on the CPU; lowered now, which
            takes torch.export's time once per stage) or a Paddle export folder.
        threads: CPU threads of Paddle's kernels (default: the cores this process may use).
    """

    name, framework, export_format = "paddle", "Paddle", "paddle"
    lowered_kind = "stages lowered from the model code, static programs (paddle.jit.to_static)"
    export_kind = "Paddle Inference predictors over {folder}"

    def fw(self):
        paddle = import_paddle()
        paddle.set_device("cpu")
        return paddle

    def set_threads(self, threads: int) -> None:
        import_paddle().base.core.set_num_threads(threads)  # the kernels of the in-process programs

    def to_fw(self, t: torch.Tensor):
        return to_paddle(t)

    def to_torch(self, value) -> torch.Tensor:
        return to_torch(value)

    def view_torch(self, value) -> torch.Tensor:
        return view_torch(value)

    def zeros(self, shape: list[int], dtype: str):
        return import_paddle().zeros(shape, dtype=dtype)

    def cat_rows(self, a, b):
        return import_paddle().concat([a, b])

    def take_rows(self, xs: list, rows: torch.Tensor) -> list:
        paddle = import_paddle()
        index = paddle.to_tensor(rows.cpu().numpy())
        return [paddle.index_select(x, index) for x in xs]

    def open_export(self, folder, manifest) -> tuple[dict, dict]:
        graphs = {g.stage: g.info for g in manifest.graphs}
        return graphs, {s: _Predictor(folder, info, self.threads) for s, info in graphs.items()}

    def lower_stages(self):
        from vlmrt.export.paddle import lower_stages

        return lower_stages
