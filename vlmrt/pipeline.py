"""Pipeline: processor + runtime + engine. Images and questions in, answers out.

```
 images, prompts ─► one Request per row ─► Engine (vlmrt/engine.py): continuous batching
                                             └► events ─► on_text(row, text) ─► Result
 beam search, or a runtime without engine steps ─► generate() (the lock-step loop) ─► Result
```
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.engine import Engine, EngineOptions, Request
from vlmrt.generate import StreamCallback, generate
from vlmrt.processor import Processor

EXPORT_KINDS = {"aoti": "an AOTInductor", "onnx": "an ONNX", "paddle": "a Paddle", "stablehlo": "a StableHLO"}  # manifest runtime -> words


@dataclass
class Result:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    timings: dict  # preprocess_ms, vision_ms, prefill_ms, ttft_ms, decode_ms, ms_per_token, tokens_per_s
    prompt_tokens: int  # per row, padded, image tokens included
    notes: list[str] = field(default_factory=list)
    row_prompt_tokens: list[int] = field(default_factory=list)  # each row's own length (padding left out)


class Pipeline:
    """Runs a loaded model on a runtime.

    Example:
        >>> pipe = Pipeline.load("minigpt4-tiny")
        >>> pipe(["photo.jpg"], ["Describe this image."]).texts[0]
    """

    def __init__(self, loaded, runtime: str | None = "eager", runtime_options: dict | None = None,
                 engine_options: EngineOptions | None = None):
        """Args:
            loaded: a `vlmrt.models.LoadedModel`.
            runtime: "eager", "compiled", "onnx", "aoti", "jax", "paddle" or "stablehlo"; None: eager, or the runtime an export
                folder's manifest names. An export asked to run on "eager" runs on its own runtime,
                and `notes` says so.
            runtime_options: the runtime's constructor options.
            engine_options: the engine's KV pool (budget, slots); default `EngineOptions()`.
        """
        from vlmrt.runtimes import build_runtime

        self.loaded = loaded
        self.engine_options = engine_options or EngineOptions()
        self._engine: Engine | None = None
        self.processor = Processor(loaded.spec, loaded.tokenizer)
        self.notes: list[str] = []  # what the user asked for and did not get (one line each)
        if loaded.model is None:  # an export folder holds graphs only: the runtime its manifest names runs them
            own = getattr(loaded.config, "runtime", "onnx")
            kind = EXPORT_KINDS.get(own, f"a {own}")
            if runtime not in (None, "eager", own):
                raise VlmrtError(f"{loaded.name} is {kind} export; it runs on --runtime {own}, not {runtime}")
            if runtime == "eager":
                self.notes.append(f"{loaded.name} is {kind} export: it runs on {own}, not eager (--runtime {own} says so)")
            runtime = own
        self.runtime = build_runtime(runtime or "eager", loaded, **(runtime_options or {}))

    @classmethod
    def load(cls, model: str, runtime: str | None = "eager", device: str = "cpu", dtype: str = "fp32",
             seed: int = 0, weights=None, kv_cache_gib: float | None = None) -> "Pipeline":
        """Load `model` (a preset or a release folder) and put it on `runtime`.

        Args:
            weights: a vlmrt.quantize.WeightConfig (int8, int4, ...); None: the weights as loaded.
            kv_cache_gib: the engine's KV pool budget (None: `vlmrt.kv_cache.default_kv_budget`).
        """
        from vlmrt.models import load_model
        from vlmrt.quantize import with_weights
        from vlmrt.tp.shard import this_rank

        shard = this_rank(weights)  # in a tensor-parallel group: this rank's shard only
        return cls(with_weights(load_model(model, device=device, dtype=dtype, seed=seed, shard=shard), weights), runtime,
                   engine_options=EngineOptions(kv_cache_gib=kv_cache_gib))

    def generation_config(self, **overrides) -> GenerationConfig:
        """The model's own stop strings and stop tokens, plus the given overrides."""
        spec = self.loaded.spec
        base = GenerationConfig(
            stop_strings=spec.stop_strings, stop_token_ids=spec.stop_token_ids, pad_token_id=self.processor.pad_token_id
        )
        return replace(base, **overrides)

    def __call__(self, images: list, prompts: list[str], config: GenerationConfig | None = None,
                 on_text: StreamCallback | None = None) -> Result:
        """Answer one question per image; rows of a batch finish independently.

        Args:
            images: paths or PIL images; a row's entry may be a list of them (several images in
                its prompt, each in the family's markup; the engine path, num_beams 1).
            prompts: one question (or `Conversation`) per row.
            config: sampling and stopping (default: `generation_config()`, greedy, 64 tokens).
            on_text: streaming callback, called as on_text(row, new_text).
        """
        config = config or self.generation_config()
        if config.num_beams == 1 and hasattr(self.runtime, "run_step"):
            return self._on_engine(images, prompts, config, on_text)
        if any(isinstance(im, (list, tuple)) and len(im) > 1 for im in images):
            raise VlmrtError("several images per prompt run on the engine only (num_beams 1, a runtime with "
                             "engine steps); use num_beams 1 or one image")
        t0 = time.perf_counter()
        batch = self.processor(images, prompts)
        batch = {k: v.to(self.loaded.device) if hasattr(v, "to") else v for k, v in batch.items()}  # loop runs on the model's device
        preprocess_ms = (time.perf_counter() - t0) * 1e3
        t = batch["input_ids"].shape[1]
        ctx = self.loaded.max_context
        notes = []
        if t >= ctx:
            images = int((batch["input_ids"] == self.loaded.spec.image_token_id).sum(-1).max())  # slices included
            raise VlmrtError(
                f"the prompt is {t} tokens ({images} of them image tokens) and the model's context is {ctx}; "
                "shorten the prompt"
            )
        if t + config.max_new_tokens > ctx:
            notes.append(f"max_new_tokens cut from {config.max_new_tokens} to {ctx - t} to fit the context of {ctx}")
            config = replace(config, max_new_tokens=ctx - t)
        compiled_before = dict(getattr(self.runtime, "compile_by_stage", {}))
        out = generate(self.runtime, batch, config, self.loaded.tokenizer, on_text)
        timings = {"preprocess_ms": preprocess_ms, **out.timings}
        if compiled_before:
            timings = without_compile(timings, compiled_before, self.runtime.compile_by_stage)
        total_new = sum(len(ids) for ids in out.token_ids)
        timings["tokens_per_s"] = total_new / ((timings["ttft_ms"] + timings["decode_ms"]) / 1e3)
        rows = batch["attention_mask"].sum(-1).tolist()
        return Result(out.texts, out.token_ids, out.finish_reasons, timings, t, notes, rows)

    @property
    def engine(self) -> Engine:
        """The engine over this pipeline's runtime (made on first use: it allocates the KV pool)."""
        if self._engine is None:
            self._engine = Engine(self.runtime, self.processor, self.generation_config(), self.engine_options)
        return self._engine

    def _on_engine(self, images: list, prompts: list[str], config: GenerationConfig, on_text) -> Result:
        """One engine request per row; the rows run (and finish) independently."""
        if len(images) != len(prompts):
            raise VlmrtError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        engine = self.engine  # made (and a compiled runtime warmed up) before the compile clock below
        compiled_before = dict(getattr(self.runtime, "compile_by_stage", {}))
        result = run_on_engine(engine, [Request(p, im, config) for im, p in zip(images, prompts)], on_text)
        if compiled_before:
            result.timings = without_compile(result.timings, compiled_before, self.runtime.compile_by_stage)
        return result


def run_on_engine(engine: Engine, requests: list[Request], on_text: StreamCallback | None = None) -> Result:
    """Run `requests` on `engine` until they all finish, as one batch: a Result with one row per
    request (`Pipeline`, `vlmrt bench`'s batch table and `vlmrt eval parity` all run this).

    Args:
        engine: the engine (requests already in it keep running alongside).
        requests: one per row; all or nothing: a request refused at `add` takes the batch with it.
        on_text: streaming callback, called as on_text(row, new_text).
    """
    t0 = time.perf_counter()
    before = dict(engine.timers)
    ids = []
    try:
        for r in requests:
            ids.append(engine.add(r))
    except VlmrtError:
        for rid in ids:  # all or nothing: a refused row takes its batch with it
            engine.abort(rid)
        raise
    states = [engine._live[rid] for rid in ids]
    row_of = {rid: i for i, rid in enumerate(ids)}
    start = time.perf_counter()
    try:
        _drain(engine, states, row_of, on_text)
    except BaseException:
        for rid in ids:  # nothing of this call stays in the engine
            engine.abort(rid)
        engine.pending = [ev for ev in engine.pending if ev.request_id not in row_of]
        raise
    end = max((s.finished_at for s in states), default=start)
    return _engine_result(states, engine.timers, before, (start - t0) * 1e3, start, end)


def _drain(engine, states, row_of, on_text) -> None:
    while any(s.row.finished is None for s in states):
        for ev in engine.step():
            if ev.request_id in row_of:
                states[row_of[ev.request_id]].finished_at = ev.time
                if ev.text and on_text:
                    on_text(row_of[ev.request_id], ev.text)


def _engine_result(states, timers: dict, before: dict, preprocess_ms: float, start: float, end: float) -> Result:
    """A Result from finished engine requests; stage times are the engine's over this call."""
    ms = {k: (timers[k] - before[k]) * 1e3 for k in ("vision_s", "prefill_s", "decode_s")}
    steps = timers["decode_steps"] - before["decode_steps"]
    first = max(s.first_token for s in states)
    timings = {"preprocess_ms": preprocess_ms, "vision_ms": ms["vision_s"], "prefill_ms": ms["prefill_s"],
               "ttft_ms": (first - start) * 1e3, "decode_ms": (end - first) * 1e3, "decode_steps": steps,
               "ms_per_token": ms["decode_s"] / steps if steps else 0.0}
    token_ids = [list(s.row.tokens) for s in states]
    timings["tokens_per_s"] = sum(map(len, token_ids)) / max(end - start, 1e-9)
    notes = list(dict.fromkeys(n for s in states for n in s.notes))
    lengths = [s.length for s in states]
    return Result([s.row.text for s in states], token_ids, [s.row.finished for s in states], timings,
                  max(lengths), notes, lengths)

def without_compile(timings: dict, before: dict, after: dict) -> dict:
    """Stage times with the compile time of new shapes taken out, and that time as `compile_ms`
    (per stage, and `total`). `before` / `after`: a runtime's `compile_by_stage` (seconds) around the run."""
    spent = {stage: (after[stage] - before.get(stage, 0.0)) * 1e3 for stage in after}
    t = dict(timings)
    t["vision_ms"] -= spent.get("vision", 0.0)
    t["prefill_ms"] -= spent.get("prefill", 0.0)
    t["ttft_ms"] = t["vision_ms"] + t["prefill_ms"]
    t["decode_ms"] -= spent.get("decode", 0.0)
    t["ms_per_token"] = t["decode_ms"] / t["decode_steps"] if t["decode_steps"] else 0.0
    t["compile_ms"] = {**spent, "total": sum(spent.values())}
    return t
