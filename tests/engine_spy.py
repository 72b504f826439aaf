"""A runtime wrapper for engine tests: it keeps the logits one request gets at each engine call."""

from vlmrt.engine import Engine, EngineOptions


class LogitSpy:
    """A runtime whose engine calls keep the logits of one request (by id), in call order."""

    def __init__(self, runtime):
        self.runtime, self.engine, self.watch, self.logits = runtime, None, None, []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def run_step(self, step):
        out = self.runtime.run_step(step)
        s = self.engine._live.get(self.watch)
        if s is not None and s.slot >= 0 and step.start <= s.slot < step.stop:
            self.logits.append(out[s.slot - step.start].clone())
        return out


def spied(pipe, slots: int = 4) -> tuple[Engine, LogitSpy]:
    """An engine over a spy of `pipe`'s runtime (a 0.25 GiB pool of at most `slots` requests)."""
    spy = LogitSpy(pipe.runtime)
    spy.engine = Engine(spy, pipe.processor, pipe.generation_config(), EngineOptions(kv_cache_gib=0.25, max_slots=slots))
    return spy.engine, spy


class CallCounter:
    """A runtime that notes the engine's vision calls (images per call; "rows" for patch rows) and
    prefill calls ((start, stop, causal_prefill) each). Keyword arguments set capabilities
    (`vision_batch`, `prefill_rows`) over the runtime's own."""

    def __init__(self, runtime, **capabilities):
        self.runtime, self.vision, self.prefills = runtime, [], []
        self.__dict__.update(capabilities)

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def encode_images(self, pixel_values, **named):
        self.vision.append(pixel_values.shape[0] if pixel_values.dim() == 4 else "rows")
        return self.runtime.encode_images(pixel_values, **named)

    def run_step(self, step):
        if step.logits_at is not None:
            self.prefills.append((step.start, step.stop, step.causal_prefill))
        return self.runtime.run_step(step)
