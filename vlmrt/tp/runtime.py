"""The tensor-parallel eager runtime: rank 0 schedules, the other ranks replay its decoder calls.

```
 rank 0: Engine / generate() / bench ─► LeaderRuntime ──┬─► its own EagerRuntime (shard 0) ─► logits
            vision, embedding, sampling: rank 0 only     │        all_reduce in o_proj, down_proj
                                                         └─► Channel: ("load", id, spec)
                                                                      ("call", id, method, args)
                                                                      ("move", id, src, dst, used)
 rank r: follow(): replays each message on its own EagerRuntime (shard r); its logits are dropped
```

Rank 0 sends the inputs of every decoder call (StepInputs of an engine step, or the lock-step
loop's decode arguments), not the requests: followers then need no scheduler, no processor, no
sampler and no vision, and nothing can drift between ranks (a request, its image, its sampling seed
and the time it arrives live on rank 0 only). Every call a follower must replay touches its KV
cache or runs the collectives: `start`, `decode`, `allocate_slots`, `run_step`, `reorder` and the
engine's slot moves; `encode_images` and `embed` run on rank 0 alone, on replicated weights.
"""

from __future__ import annotations

import itertools
from dataclasses import fields, is_dataclass, replace

import torch

from vlmrt.errors import VlmrtError
from vlmrt.tp.group import TPGroup
from vlmrt.tp.shard import Shard, check_row_scales, check_shardable, shard_model

REPLAYED = ("start", "decode", "allocate_slots", "run_step", "reorder", "warmup")  # methods followers run too
RUNTIMES = ("eager", "compiled")  # the runtimes a rank can run its shard on
_IDS = itertools.count()


def load_spec(loaded) -> dict:
    """What a follower needs to load the same model: load_model's arguments and the weight format."""
    from vlmrt.config import DTYPES

    if loaded.model is None:
        raise VlmrtError(f"{loaded.name} is an export: --tp runs a preset or a release folder on --runtime eager")
    dtype = next(k for k, v in DTYPES.items() if v == loaded.dtype)
    return {"name": loaded.name, "dtype": dtype, "seed": loaded.seed or 0, "weights": loaded.weights}


def sharded_runtime(loaded, group: TPGroup, runtime: str = "eager", options: dict | None = None):
    """The runtime `runtime` (eager or compiled) on this rank's shard of `loaded`: its weight format
    applied first (a whole model is then sliced), then the runtime built on the shard (the compiled
    runtime allocates its cache, with this rank's KV heads, when it is built)."""
    from vlmrt.quantize import prepare_model
    from vlmrt.runtimes import runtime_class

    if getattr(loaded.model, "tp_shard", None) == (group.rank, group.world):  # loaded as this rank's shard
        check_row_scales(loaded.model, loaded.weights)
    model = prepare_model(loaded, runtime)
    if getattr(model, "tp_shard", None) != (group.rank, group.world):  # two runtimes may share one model
        shard_model(model, group.rank, group.world)
    return runtime_class(runtime)(loaded, **(options or {}))


def portable(obj, device: torch.device | None = None):
    """`obj` with every tensor moved to `device` (None: the CPU, for the channel), through tuples,
    lists, dicts and dataclasses (StepInputs)."""
    if isinstance(obj, torch.Tensor):
        return obj.to("cpu" if device is None else device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: portable(v, device) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: portable(getattr(obj, f.name), device) for f in fields(obj)})
    return obj


class LeaderRuntime:
    """Rank 0's runtime: an eager or compiled runtime on shard 0 whose decoder calls every follower
    replays (the compiled one's warmup too: its graphs run the collectives).

    Args:
        loaded: the LoadedModel (whole, sliced here, or loaded as rank 0's shard).
        group: the active group (rank 0).
        runtime: "eager" or "compiled".
        options: the runtime's constructor options (compiled: CompiledOptions fields).
    """

    def __init__(self, loaded, group: TPGroup, runtime: str = "eager", options: dict | None = None):
        if runtime not in RUNTIMES:
            raise VlmrtError(f"--tp {group.world} runs on --runtime {' or '.join(RUNTIMES)}, not {runtime}; "
                             "use one of them or --tp 1")
        self.id, self.group, self.name = next(_IDS), group, runtime
        spec = load_spec(loaded)
        check_shardable(loaded.model, loaded.weights, group.world)  # refused here, before any follower loads
        group.channel.send(("load", self.id, spec, runtime, options or {}))  # followers load while rank 0 does
        self.inner = sharded_runtime(loaded, group, runtime, options)

    def __getattr__(self, name):  # model, device, dtype, kv, synchronize, encode_images, embed, ...
        if name == "warmup" and hasattr(self.inner, "warmup"):  # the compiled runtime's: graphs with collectives
            return lambda: self._replay("warmup")
        return getattr(self.inner, name)

    def _replay(self, method: str, *args, **kwargs):
        self.group.channel.send(("call", self.id, method, portable(args), portable(kwargs)))
        return getattr(self.inner, method)(*args, **kwargs)

    def start(self, batch_size: int, max_seq_len: int) -> None:
        self._replay("start", batch_size, max_seq_len)

    def decode(self, *args, **kwargs):
        return self._replay("decode", *args, **kwargs)

    def run_step(self, step):
        return self._replay("run_step", step)

    def reorder(self, rows):
        return self._replay("reorder", rows)

    def allocate_slots(self, num_slots: int, max_seq: int):
        pool = self._replay("allocate_slots", num_slots, max_seq)
        return MirroredPool(pool, self)


class MirroredPool:
    """Rank 0's SlotKVCache: a slot move (the engine's compaction) is replayed on every rank."""

    def __init__(self, pool, leader: LeaderRuntime):
        self.pool, self.leader = pool, leader

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def move(self, src: int, dst: int, used: int) -> None:
        self.leader.group.channel.send(("move", self.leader.id, src, dst, used))
        self.pool.move(src, dst, used)


def stop_followers(group: TPGroup) -> None:
    """Rank 0: tell the followers the command is over (they leave `follow`)."""
    group.channel.send(("stop",))


@torch.inference_mode()
def follow(group: TPGroup) -> None:
    """A follower's whole life: load what rank 0 loads, replay its decoder calls, until "stop"."""
    models, runtimes = {}, {}
    while True:
        message = group.channel.receive()
        kind = message[0]
        if kind == "stop":
            return
        if kind == "load":
            _, rid, spec, runtime, options = message
            runtimes[rid] = sharded_runtime(_model_for(spec, models, group), group, runtime, options)
        elif kind == "call":
            _, rid, method, args, kwargs = message
            if method not in REPLAYED:
                raise VlmrtError(f"tensor parallel: rank 0 asked for {method!r}, which followers do not run")
            getattr(runtimes[rid], method)(*portable(args, group.device), **portable(kwargs, group.device))
        elif kind == "move":
            _, rid, src, dst, used = message
            runtimes[rid].pool.move(src, dst, used)


def _model_for(spec: dict, models: dict, group: TPGroup):
    """A follower's LoadedModel for `spec`: its shard, loaded once per spec (without a tokenizer:
    followers never tokenize). Rank 0 may put one model on several runtimes; they share one shard here too."""
    from vlmrt.models import load_model
    from vlmrt.quantize import with_weights

    key = repr(sorted(spec.items()))
    if key not in models:
        weights = spec["weights"]
        shard = Shard(group.rank, group.world, row_absmax=weights is not None and weights.format == "int8")
        loaded = load_model(spec["name"], device=str(group.device), dtype=spec["dtype"], seed=spec["seed"],
                            tokenizer=False, shard=shard)
        models[key] = with_weights(loaded, spec["weights"])
    return models[key]
