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
