"""Pipeline: processor + runtime + generation loop. Images and questions in, answers out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.generate import StreamCallback, generate
from vlmrt.processor import Processor


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

    def __init__(self, loaded, runtime: str | None = "eager", runtime_options: dict | None = None):
        """Args:
            loaded: a `vlmrt.models.LoadedModel`.
            runtime: "eager", "compiled" or "onnx"; None: eager, or onnx for an export folder. An
                export asked to run on "eager" runs on onnx, and `notes` says so.
            runtime_options: the runtime's constructor options.
        """
        from vlmrt.runtimes import runtime_class

        self.loaded = loaded
        self.processor = Processor(loaded.spec, loaded.tokenizer)
        self.notes: list[str] = []  # what the user asked for and did not get (one line each)
        if loaded.model is None:  # an export folder holds graphs only: the runtime its manifest names runs them
            own = getattr(loaded.config, "runtime", "onnx")
            if runtime not in (None, "eager", own):
                kind = "an AOTInductor" if own == "aoti" else "an ONNX"
                raise VlmrtError(f"{loaded.name} is {kind} export; it runs on --runtime {own}, not {runtime}")
            if runtime == "eager":
                self.notes.append(f"{loaded.name} is {'an AOTInductor' if own == 'aoti' else 'an ONNX'} export: it runs on "
                                  f"{own}, not eager (--runtime {own} says so)")
            runtime = own
        self.runtime = runtime_class(runtime or "eager")(loaded, **(runtime_options or {}))

    @classmethod
    def load(cls, model: str, runtime: str | None = "eager", device: str = "cpu", dtype: str = "fp32",
             seed: int = 0, weights=None) -> "Pipeline":
        """Load `model` (a preset or a release folder) and put it on `runtime`.

        Args:
            weights: a vlmrt.quantize.WeightConfig (int8, int4, ...); None: the weights as loaded.
        """
        from vlmrt.models import load_model
        from vlmrt.quantize import with_weights

        return cls(with_weights(load_model(model, device=device, dtype=dtype, seed=seed), weights), runtime)

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
            images: paths or PIL images.
            prompts: one question per image.
            config: sampling and stopping (default: `generation_config()`, greedy, 64 tokens).
            on_text: streaming callback, called as on_text(row, new_text).
        """
        config = config or self.generation_config()
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
