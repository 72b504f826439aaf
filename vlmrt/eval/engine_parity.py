"""Tensor-level parity on engine steps: a runtime's `run_step` calls against a reference's (eager
fp32), under the same schedule of requests.

```
 requests (different prompts and answer lengths: rows join, finish and are compacted)
   reference engine ─► every run_step: prefill [1,V] of each admitted request (a batched prefill
                       call [n,V] counts as its n rows, in slot order), decode [n,V] per step
   runtime engine   ─► the same calls, in the same order (same requests, same options: same schedule)
                 ▼                       ▼
   "engine_prefill_k" (k-th prefill)   "engine_decode_step_k" (k-th decode call, all its rows)
   both: the greedy tokens per request ─► "tokens" (identical ids)
```

Both engines sample their own tokens (greedy, stops off), so the calls answer the same questions
while the tokens agree; once they differ the "tokens" check fails and later logits are compared as
they come. Errors are those of `vlmrt.eval.tensor_parity` (rel = max |a - b| / max |reference|).
"""

from __future__ import annotations

from dataclasses import replace

from vlmrt.config import GenerationConfig
from vlmrt.eval.tensor_parity import RTOL, Check, ParityResult, tensor_error


class _StepSpy:
    """A runtime whose engine calls keep their logits (fp32, CPU), in call order."""

    def __init__(self, runtime):
        self.runtime, self.calls = runtime, []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def run_step(self, step):
        out = self.runtime.run_step(step)
        out_cpu = out.detach().float().cpu()  # [n,V]
        if step.logits_at is None:
            self.calls.append(("decode", out_cpu))
        else:  # a prefill call of n admitted requests counts as n prefills (runtimes batch them differently)
            self.calls.extend(("prefill", row[None]) for row in out_cpu)
        return out


def _engine_trace(target, processor, requests: list, options) -> tuple[list, list[list[int]]]:
    """Run `requests` on an engine over `target` (a runtime, or an Engine to reuse: a compiled one
    keeps its warmed-up graphs); return its run_step calls and each request's tokens."""
    from vlmrt.engine import Engine, EngineOptions

    engine = target if isinstance(target, Engine) else None
    if engine is None:
        engine = Engine(target, processor, GenerationConfig(), options or EngineOptions(max_slots=len(requests)))
    spy, runtime = _StepSpy(engine.runtime), engine.runtime
    engine.runtime = spy
    try:
        states = engine.run(requests)
    finally:
        engine.runtime = runtime
    return spy.calls, [s.row.tokens for s in states]


class EngineReference:
    """The reference's engine calls on some requests, computed once and compared with any runtime.

    Args:
        runtime: the reference runtime (eager fp32 as a rule; it needs `run_step`), or an Engine on it.
        processor: the model's Processor.
        requests: `vlmrt.engine.Request`s (their configs are made greedy with stops off; give
            different prompts and max_new_tokens, so that rows join and leave the batch).
        options: the EngineOptions of engines made here (None: one slot per request).
    """

    def __init__(self, runtime, processor, requests: list, options=None):
        greedy = lambda r: replace(r, config=replace(r.config or GenerationConfig(), do_sample=False,
                                                     stop_strings=(), stop_token_ids=(), num_beams=1))
        self.processor, self.options = processor, options
        self.requests = [greedy(r) for r in requests]
        self.calls, self.token_ids = _engine_trace(runtime, processor, self.requests, options)

    def compare(self, runtime, rtol: float = RTOL) -> ParityResult:
        """Run `runtime` (or an Engine on it, idle, with as many slots as the reference's) on the same
        requests under the same schedule; one check per call, then the tokens."""
        calls, ids = _engine_trace(runtime, self.processor, self.requests, self.options)
        checks, counts = [], {"prefill": 0, "decode": 0}
        for (kind, ref), (other_kind, out) in zip(self.calls, calls):
            counts[kind] += 1
            name = f"engine_{kind}_{counts[kind]}" if kind == "prefill" else f"engine_decode_step_{counts[kind]}"
            if kind != other_kind or ref.shape != out.shape:  # the schedules differ: a check that fails
                checks.append(Check(name, float("inf"), float("inf"), float("inf"), False))
                continue
            e = tensor_error(ref, out)
            checks.append(Check(name, e["max_abs"], e["mean_abs"], e["rel"], e["rel"] <= rtol))
        same = float(ids != self.token_ids or len(calls) != len(self.calls))
        checks.append(Check("tokens", same, same, same, not same))
        return ParityResult(checks, self.token_ids, ids, rtol)


def engine_parity(reference, runtime, processor, requests: list, rtol: float = RTOL, options=None) -> ParityResult:
    """`runtime` against `reference` on engine steps: `EngineReference(...).compare(runtime)`."""
    return EngineReference(reference, processor, requests, options).compare(runtime, rtol)

