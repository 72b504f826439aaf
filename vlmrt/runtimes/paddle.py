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

import os
import sys
import tempfile

import torch

from vlmrt.errors import VlmrtError
from vlmrt.kv_cache import SlotKVCache, lockstep_inputs, write_slots
from vlmrt.stages import (ATTENTION_MASK, CACHE_POSITION, IMAGE_FEATURES, INPUTS_EMBEDS, LOGITS, LOGITS_INDEX,
                          POSITION_IDS, embedding_inputs, past_key_name, past_value_name)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


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


class PaddleRuntime:
    """Runs a model's stages on Paddle (see the module docstring).

    Args:
        loaded: a `LoadedModel`: a preset or release (fp32 or fp16, on the CPU; lowered now, which
            takes torch.export's time once per stage) or a Paddle export folder.
        threads: CPU threads of Paddle's kernels (default: the cores this process may use).
    """

    name = "paddle"
    vision_batch = None  # the engine's batches (vlmrt/engine_batch.py): any number of images a vision call
    prefill_rows = None  # and of rows a prefill call (the programs' batch axis is dynamic)

    def __init__(self, loaded, threads: int | None = None):
        paddle = import_paddle()
        from vlmrt.config import cpu_threads

        self.threads = threads or cpu_threads() or len(os.sched_getaffinity(0))
        paddle.set_device("cpu")
        paddle.base.core.set_num_threads(self.threads)  # the kernels of the in-process programs
        if getattr(loaded, "weights", None) is not None:
            raise VlmrtError("--runtime paddle runs the model's own weights; leave --quantize out")
        if loaded.device.type != "cpu":
            raise VlmrtError(f"--runtime paddle runs on the CPU; use --device cpu (got {loaded.device})")
        self.loaded, self.device, self.dtype = loaded, torch.device("cpu"), loaded.dtype
        if loaded.export_dir is not None:
            self._from_export(loaded.export_dir)
        else:
            self._lower(loaded)
        from vlmrt.runtimes.onnx import CacheGeometry

        self.model = CacheGeometry(self.num_layers, self.num_kv_heads, self.head_dim, self.max_context)  # the engine's
        self.keys: list = []
        self.values: list = []
        self.seq = self.past_len = 0
        self.pool: SlotKVCache | None = None
        print(f"paddle runtime: Paddle {paddle.__version__} on the CPU, {self.kind}", file=sys.stderr)

    def _from_export(self, folder) -> None:
        from vlmrt.export.manifest import read_manifest

        m = read_manifest(folder)
        if m.runtime != "paddle":
            raise VlmrtError(f"{folder} is an {m.runtime} export; run it with --runtime {m.runtime} "
                             "(or re-export with --format paddle)")
        self.manifest, self.folder = m, folder
        self.graphs = {g.stage: g.info for g in m.graphs}
        self.programs = {s: _Predictor(folder, info, self.threads) for s, info in self.graphs.items()}
        self.num_layers, self.num_kv_heads, self.head_dim, self.max_context = (m.num_layers, m.num_kv_heads,
                                                                               m.head_dim, m.max_context)
        self.kind = f"Paddle Inference predictors over {folder}"

    def _lower(self, loaded) -> None:
        from vlmrt.export.paddle import lower_stages

        model = loaded.model.eval()
        self._sources = tempfile.TemporaryDirectory(prefix="vlmrt-paddle-")  # the generated stage sources
        self.lowered = lower_stages(loaded, self._sources.name, lambda line: print(f"paddle runtime: {line}",
                                                                                   file=sys.stderr))
        self.graphs = {g.stage: g.info for g in self.lowered[0]}
        self.programs = dict(self.lowered[1])
        self.num_layers, self.num_kv_heads, self.head_dim, self.max_context = (model.num_layers, model.num_kv_heads,
                                                                               model.head_dim, model.max_context)
        self.kind = "stages lowered from the model code, static programs (paddle.jit.to_static)"

    # ------------------------------------------------------------------------- running a program
    def _call(self, stage: str, values: dict, dims: dict[str, int]) -> dict:
        """Run one stage program: inputs by name in the program's order (missing ones are zeros of
        their named dims; static named axes padded with zeros); returns output name -> Paddle tensor."""
        from vlmrt.runtimes.onnx_static import pad_to

        paddle, info, args = import_paddle(), self.graphs[stage], []
        for t in info.inputs:
            v = values.get(t.name)
            if v is None:
                shape = [d if isinstance(d, int) else dims.get(d, 0) for d in t.shape]
                v = paddle.zeros(shape, dtype=t.dtype)
            elif isinstance(v, torch.Tensor):
                target = tuple(n if isinstance(d, str) else d for n, d in zip(v.shape, t.shape))
                v = pad_to(v, target, t.name, info.file) if v.dim() == len(t.shape) else v
                v = to_paddle(v.to(TORCH_DTYPES[t.dtype]))
            args.append(v)
        outs = self.programs[stage](*args)
        return dict(zip((t.name for t in info.outputs), outs))

    @staticmethod
    def _one_or_dict(outs: dict, single: str):
        outs = {k: to_torch(v) for k, v in outs.items()}
        return outs[single] if list(outs) == [single] else outs

    # ------------------------------------------------------------------------- the StageRunner interface
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        """pixel_values [B,...] (+ named vision inputs) -> image_features [B,N,D] (or a dict)."""
        from vlmrt.runtimes.onnx_static import cut_image_tokens

        values = {"pixel_values": pixel_values, **{k: v for k, v in vision_inputs.items() if v is not None}}
        outs = {k: to_torch(v) for k, v in self._call("vision", values, {"batch": pixel_values.shape[0]}).items()}
        outs = cut_image_tokens(self.graphs["vision"], values, outs)  # MiniCPM-V-2's padded chunks
        return outs[IMAGE_FEATURES] if list(outs) == [IMAGE_FEATURES] else outs

    def embed(self, input_ids: torch.Tensor, image_features) -> torch.Tensor:
        """input_ids [B,T] (+ image_features or a dict of them; None: text only) -> inputs_embeds [B,T,D]."""
        values = embedding_inputs(input_ids, image_features)
        dims = {"batch": input_ids.shape[0], "sequence": input_ids.shape[1]}
        return self._one_or_dict(self._call("embedding", values, dims), INPUTS_EMBEDS)  # missing: 0 image tokens

    def _zeros(self, batch: int, seq: int) -> list:
        paddle = import_paddle()
        shape = [batch, self.num_kv_heads, seq, self.head_dim]
        dtype = next(t.dtype for t in self.graphs["decoder"].inputs if t.name == past_key_name(0))
        return [paddle.zeros(shape, dtype=dtype) for _ in range(self.num_layers)]

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """A zeroed cache of `max_seq_len` slots for `batch_size` rows (Paddle tensors)."""
        if max_seq_len > self.max_context:
            raise VlmrtError(f"{max_seq_len} tokens do not fit the model's context of {self.max_context}")
        self.keys, self.values = self._zeros(batch_size, max_seq_len), self._zeros(batch_size, max_seq_len)
        self.seq, self.past_len = max_seq_len, 0

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [B,T,D] at slots `cache_position` [T] -> the last position's logits [B,1,V]."""
        b, t = inputs_embeds.shape[:2]
        mask, slots = lockstep_inputs(attention_mask, cache_position, self.seq, b)  # [B,S], [B,T]
        rows = self.keys[0].shape[0]
        keys, values = self.keys, self.values
        if b < rows:  # beam search prefills B prompts into a cache of B*K rows
            keys, values = [k[:b] for k in keys], [v[:b] for v in values]
        logits, keys, values = self._decoder(inputs_embeds, position_ids, mask, slots, torch.full((b,), t - 1),
                                             keys, values, extras)
        if b < rows:
            paddle = import_paddle()
            keys = [paddle.concat([k, full[b:]]) for full, k in zip(self.keys, keys)]
            values = [paddle.concat([v, full[b:]]) for full, v in zip(self.values, values)]
        self.keys, self.values = keys, values
        self.past_len = max(self.past_len, int(cache_position.max()) + 1)
        return logits

    def _decoder(self, embeds, positions, mask, slots, at, keys, values, extras):
        """One decoder call -> (logits [B,1,V] torch, keys, values: lists of Paddle tensors)."""
        named = {INPUTS_EMBEDS: embeds, POSITION_IDS: positions, ATTENTION_MASK: mask, CACHE_POSITION: slots,
                 LOGITS_INDEX: at, **extras}
        for i in range(self.num_layers):
            named[past_key_name(i)], named[past_value_name(i)] = keys[i], values[i]
        (b, t), s = embeds.shape[:2], keys[0].shape[2]
        outs = self._call("decoder", named, {"batch": b, "sequence": t, "cache_sequence": s})  # absent extras
        # (SliMM's deepstack_embeds after the prefill) are zeros of these dims
        keys = [outs[f"present.{i}.key"] for i in range(self.num_layers)]
        values = [outs[f"present.{i}.value"] for i in range(self.num_layers)]
        return to_torch(outs[LOGITS]), keys, values

    # ------------------------------------------------------------------ engine steps (vlmrt/engine.py)
    def allocate_slots(self, num_slots: int, max_seq: int) -> SlotKVCache:
        """The engine's KV pool (torch buffers, which the engine compacts in place): `num_slots` rows of
        `max_seq` positions (+ one scratch position)."""
        self.pool = SlotKVCache(self.num_layers, num_slots, self.num_kv_heads, max_seq, self.head_dim, self.dtype,
                                self.device)
        return self.pool

    def run_step(self, step) -> torch.Tensor:
        """One engine decoder call (`vlmrt.engine.StepInputs`) over pool rows [start, stop), any n rows
        and T tokens each -> logits [n,V]. The call attends over the window of positions in use
        (`vlmrt.engine.attention_window`): the rows' window goes to Paddle (one copy of the window,
        not of whole rows), and only the T positions each row writes come back into the pool
        (`write_slots` of the presents read in place through DLPack), never whole rows."""
        from vlmrt.engine import attention_window

        pool, (a, b) = self.pool, (step.start, step.stop)
        n, t = step.inputs_embeds.shape[:2]
        w, slots = attention_window(step, pool.scratch)  # slots [n,T]
        at = torch.zeros(n, dtype=torch.long) if step.logits_at is None else step.logits_at.reshape(-1).expand(n)
        with torch.inference_mode(False):
            logits, keys, values = self._decoder(
                step.inputs_embeds, step.position_ids, step.attention_mask[:, :w], slots, at,
                [to_paddle(k[a:b, :, :w]) for k in pool.keys], [to_paddle(v[a:b, :, :w]) for v in pool.values],
                step.extras)  # each [n,H_kv,w,hd]
        index = slots[:, None, :, None].expand(n, self.num_kv_heads, t, self.head_dim)  # [n,H_kv,T,hd]
        for buf, new in zip(pool.keys + pool.values, keys + values):
            write_slots(buf[a:b], view_torch(new).gather(2, index), slots)  # the call's own writes only
        return logits[:, -1]  # [n,V]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n])."""
        paddle = import_paddle()
        index = paddle.to_tensor(rows.cpu().numpy())
        self.keys = [paddle.index_select(k, index) for k in self.keys]
        self.values = [paddle.index_select(v, index) for v in self.values]

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache of `layer`, each [B,H_kv,P,hd] (for parity checks)."""
        p = self.past_len
        return to_torch(self.keys[layer])[:, :, :p], to_torch(self.values[layer])[:, :, :p]

    def synchronize(self) -> None:
        """Paddle's CPU kernels return when done."""
