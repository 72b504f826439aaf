"""The jax runtime: every family's three stages as JAX functions (torchax lowers the PyTorch model
code op by op to jax.numpy), XLA-compiled with `jax.jit`, with a preallocated KV cache of jax
arrays. Driven by the shared generation loop and the engine like the eager runtime.

```
 encode_images  pixel_values (+ named vision inputs) ─► jit(vision) ─► image_features
 embed          input_ids (+ image_features) ─► jit(embedding) ─► inputs_embeds
 start(b, n)    cache = zeros [b,H_kv,S,hd] per layer, S = n rounded up to a multiple of 128
 decode         inputs_embeds [b,t,D], position_ids, attention_mask [b,S], cache_position [b,t],
                logits_index [b] = t-1, cache ─► jit(static-cache decoder) ─► logits [b,1,V], cache
                (the cache arguments are donated: XLA writes the new keys into their buffers)
```

The decoder is the static-cache form of the exports (vlmrt/export/static_cache.py): every tensor
keeps its shape from step to step, so decode steps reuse one compiled executable per (b, S) and a
prefill compiles once per prompt length. Rounding S up lets requests of similar lengths share the
executables; the slots past a request's end are masked like the eager runtime's.

A stage whose code needs concrete values (SliMM's dynamic-resolution vision reads image_grid_thw
to size its patch grid) cannot be traced by `jax.jit`; it runs op by op on JAX instead (still
every op on JAX, no jit), and `stage_modes` says so.
"""

from __future__ import annotations

import os
import sys

import torch

from vlmrt.errors import VlmrtError
from vlmrt.export.static_cache import ScatterKVCache
from vlmrt.kv_cache import SlotKVCache, lockstep_inputs
from vlmrt.runtimes.torchax_bridge import import_jax, to_jax, to_torch
from vlmrt.stages import IMAGE_FEATURES, INPUTS_EMBEDS

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # for tests
SEQ_BUCKET = 128  # cache slots are allocated in multiples of this (requests share executables)


def _decoder_call(model, embeds, positions, mask, slots, at, keys, values, extras):
    """The static-cache decoder on the model (run inside torchax): -> logits [B,1,V], keys, values."""
    cache = ScatterKVCache(list(keys), list(values))
    logits = model.decode(embeds, positions, mask, slots, cache, logits_at=at, **extras)
    return logits, tuple(cache.keys), tuple(cache.values)


class JaxStages:
    """A model's methods as jax functions over one copy of its weights (jax arrays).

    Args:
        model: a family model (eval mode).
    """

    def __init__(self, model):
        self.jax, torchax = import_jax()
        from torchax.interop import JittableModule

        self.env = torchax.default_env()
        self.module = JittableModule(model)
        self.weights = self.env.t2j_copy({**self.module.buffers, **self.module.params})
        self._params = list(self.module.params)

    def function(self, method):
        """fn(weights, *args, **kwargs) -> outputs (jax pytrees) for `method` (a name, or a callable
        taking the model first)."""
        env, module, names = self.env, self.module, self._params

        def fn(weights, *args, **kwargs):
            params = {k: weights[k] for k in names}
            buffers = {k: v for k, v in weights.items() if k not in params}
            params, buffers, args, kwargs = env.j2t_iso((params, buffers, args, kwargs))
            with env:
                out = module.functional_call(method, params, buffers, *args, **kwargs)
            return env.t2j_iso(out)

        return fn


class _Stage:
    """One stage: jitted, or op by op when tracing needs concrete values (see the module docstring)."""

    def __init__(self, stages: JaxStages, method, name: str, donate: tuple = (), fast_compile: bool = False):
        jax = stages.jax
        self.name, self.stages = name, stages
        self.eager = stages.function(method)
        self.jitted = jax.jit(self.eager, donate_argnums=donate, compiler_options=FAST_COMPILE if fast_compile else None)
        self.mode = "jit"
        self.trace_errors = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                             jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)

    def __call__(self, *args, **kwargs):
        """Outside inference mode (the engine's steps run in it): under it, torch dispatches some
        ops to torchax without their default arguments (conv2d's padding, dilation, groups)."""
        with torch.inference_mode(False), torch.no_grad():
            return self._call(*args, **kwargs)

    def _call(self, *args, **kwargs):
        if self.mode == "jit":
            try:
                return self.jitted(self.stages.weights, *args, **kwargs)
            except self.trace_errors as e:
                self.mode = "op-by-op"
                print(f"jax runtime: {self.name} needs concrete values ({e.__class__.__name__}); "
                      "it runs op by op", file=sys.stderr)
        return self.eager(self.stages.weights, *args, **kwargs)


def _outputs(out, single: str):
    """A jax output (an array or a dict of them) -> torch, as the family's stage returns it."""
    if isinstance(out, dict):
        return {k: to_torch(v) for k, v in out.items()}
    return to_torch(out)


class JaxRuntime:
    """Runs a loaded model's stages on JAX (see the module docstring).

    Args:
        loaded: a `LoadedModel` (a preset or release; fp32, fp16 or bf16 weights) on the CPU.
        fast_compile: compile without XLA's backend optimizations (quicker compiles, slower steps),
            for tests.
    """

    name = "jax"
    vision_batch = None  # the engine's batches (vlmrt/engine_batch.py): any number of images a vision call and
    prefill_rows = None  # of rows a prefill call (each new shape compiles once, as each prompt length does)

    def __init__(self, loaded, fast_compile: bool = False):
        if loaded.export_dir is not None:
            raise VlmrtError(f"{loaded.export_dir} is an export folder; --runtime jax runs a preset or a release "
                             "(model code); run the folder with the runtime its manifest names")
        if loaded.device.type != "cpu":
            raise VlmrtError(f"--runtime jax runs on the device JAX picks, with the model loaded on the CPU; "
                             f"use --device cpu (got {loaded.device})")
        if getattr(loaded, "weights", None) is not None:
            raise VlmrtError("--runtime jax runs the model's own weights; leave --quantize out")
        self.loaded, self.model = loaded, loaded.model.eval()
        self.device, self.dtype = loaded.device, loaded.dtype
        stages = JaxStages(self.model)
        self.jax = stages.jax
        self.vision = _Stage(stages, "encode_images", "vision", fast_compile=fast_compile)
        self.embedding = _Stage(stages, "embed", "embedding", fast_compile=fast_compile)
        self.decoder = _Stage(stages, _decoder_call, "decoder", donate=(6, 7), fast_compile=fast_compile)  # args
        # after the weights: ..., keys 6, values 7
        self.keys: tuple = ()
        self.values: tuple = ()
        self.seq = self.past_len = 0
        self.pool = None
        platform = self.jax.devices()[0].platform
        threads = f", XLA's CPU threads: {len(os.sched_getaffinity(0))} (the process's CPU affinity; --threads " \
                  "does not reach XLA: pin with taskset)" if platform == "cpu" and hasattr(os, "sched_getaffinity") else ""
        print(f"jax runtime: jax {self.jax.__version__} on {platform}{threads}, {len(stages.weights)} weight tensors",
              file=sys.stderr)

    @property
    def stage_modes(self) -> dict[str, str]:
        """stage -> "jit" or "op-by-op" (after the stage first ran)."""
        return {s.name: s.mode for s in (self.vision, self.embedding, self.decoder)}

    # ------------------------------------------------------------------------- the StageRunner interface
    def encode_images(self, pixel_values: torch.Tensor, **vision_inputs):
        """pixel_values [B,...] (+ named vision inputs) -> image_features [B,N,D] (or a dict)."""
        kwargs = {k: to_jax(v) for k, v in vision_inputs.items() if v is not None}
        return _outputs(self.vision(to_jax(pixel_values.to(self.dtype)), **kwargs), IMAGE_FEATURES)

    def embed(self, input_ids: torch.Tensor, image_features) -> torch.Tensor:
        """input_ids [B,T] (+ image_features or a dict of them; None: text only) -> inputs_embeds [B,T,D]."""
        feats = image_features
        if isinstance(feats, dict):
            feats = {k: to_jax(v) for k, v in feats.items()}
        elif feats is not None:
            feats = to_jax(feats)
        return _outputs(self.embedding(to_jax(input_ids), feats), INPUTS_EMBEDS)

    def _zeros(self, batch: int, seq: int) -> tuple:
        m, jnp = self.model, self.jax.numpy
        shape, dtype = (batch, m.num_kv_heads, seq, m.head_dim), str(self.dtype).replace("torch.", "")
        return tuple(jnp.zeros(shape, dtype=dtype) for _ in range(m.num_layers))

    def start(self, batch_size: int, max_seq_len: int) -> None:
        """A zeroed cache of `max_seq_len` slots (rounded up, at most the context) for `batch_size` rows."""
        ctx = self.model.max_context
        if max_seq_len > ctx:
            raise VlmrtError(f"{max_seq_len} tokens do not fit the model's context of {ctx}")
        self.seq = min(ctx, -(-max_seq_len // SEQ_BUCKET) * SEQ_BUCKET)
        self.keys, self.values = self._zeros(batch_size, self.seq), self._zeros(batch_size, self.seq)
        self.past_len = 0

    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor:
        """inputs_embeds [B,T,D] at slots `cache_position` [T] -> the last position's logits [B,1,V]."""
        b, t = inputs_embeds.shape[:2]
        mask, slots = lockstep_inputs(attention_mask, cache_position, self.seq, b)  # [B,S], [B,T]
        logits = self._run_decoder(inputs_embeds, position_ids, mask, slots, torch.full((b,), t - 1), extras)
        self.past_len = max(self.past_len, int(cache_position.max()) + 1)
        return logits

    def _run_decoder(self, embeds, positions, mask, slots, at, extras) -> torch.Tensor:
        """One decoder call on the first B rows of the runtime's cache (replaced by the call's outputs;
        beam search prefills B prompts into a cache of B*K rows); logits [B,1,V]."""
        b, rows = embeds.shape[0], self.keys[0].shape[0]
        keys, values = self.keys, self.values
        if b < rows:
            keys, values = tuple(k[:b] for k in keys), tuple(v[:b] for v in values)
        logits, keys, values = self.decoder(
            to_jax(embeds.to(self.dtype)), to_jax(positions), to_jax(mask), to_jax(slots), to_jax(at),
            keys, values, {k: to_jax(v) for k, v in extras.items()})
        if b < rows:
            keys = tuple(full.at[:b].set(k) for full, k in zip(self.keys, keys))
            values = tuple(full.at[:b].set(v) for full, v in zip(self.values, values))
        self.keys, self.values = keys, values
        return to_torch(logits)

    # ------------------------------------------------------------------ engine steps (vlmrt/engine.py)
    def allocate_slots(self, num_slots: int, max_seq: int) -> SlotKVCache:
        """The engine's KV pool (torch buffers, which the engine compacts in place): `num_slots` rows of
        `max_seq` positions (+ one scratch position)."""
        m = self.model
        self.pool = SlotKVCache(m.num_layers, num_slots, m.num_kv_heads, max_seq, m.head_dim, self.dtype, self.device)
        return self.pool

    def run_step(self, step) -> torch.Tensor:
        """One engine decoder call (`vlmrt.engine.StepInputs`) over pool rows [start, stop) -> logits
        [n,V]. The rows' cache goes to JAX and back around the call (two host copies of those rows)."""
        pool, (a, b) = self.pool, (step.start, step.stop)
        n, t = step.inputs_embeds.shape[:2]
        at = torch.zeros(n, dtype=torch.long) if step.logits_at is None else step.logits_at.reshape(-1).expand(n)
        keys = tuple(to_jax(k[a:b]) for k in pool.keys)  # each [n,H_kv,S+1,hd]
        values = tuple(to_jax(v[a:b]) for v in pool.values)
        logits, keys, values = self.decoder(
            to_jax(step.inputs_embeds.to(self.dtype)), to_jax(step.position_ids), to_jax(step.attention_mask),
            to_jax(step.cache_position), to_jax(at), keys, values, {k: to_jax(v) for k, v in step.extras.items()})
        for buf, new in zip(pool.keys + pool.values, keys + values):
            buf[a:b].copy_(to_torch(new))
        return to_torch(logits)[:, -1]  # [n,V]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes a copy of row rows[i] (rows [n])."""
        index = to_jax(rows)
        self.keys = tuple(k[index] for k in self.keys)
        self.values = tuple(v[index] for v in self.values)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache of `layer`, each [B,H_kv,S,hd] (for parity checks)."""
        return to_torch(self.keys[layer]), to_torch(self.values[layer])

    def synchronize(self) -> None:
        for a in self.keys[:1]:
            a.block_until_ready()

