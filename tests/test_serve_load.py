"""The server under load, on loopback with the official openai client (retries off): 64 concurrent
clients all answered, streamed and not; clients that disconnect free their slots; a short request
behind a long one with other settings finishes first. Bounded: short answers, a tiny model."""

import asyncio
import json
import threading
import time
import urllib.request

import pytest

from conftest import load_tiny
from serve_helpers import data_url, running
from vlmrt.pipeline import Pipeline

openai = pytest.importorskip("openai", reason="the test extra: pip install 'vlmrt[test]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install 'vlmrt[serve]'")

pytestmark = pytest.mark.usefixtures("one_thread")


PIPES = []  # the server's pipeline, for tests that pace its steps


@pytest.fixture(scope="module")
def server():
    PIPES.append(Pipeline(load_tiny("minigpt4-tiny")))
    with running(PIPES[-1], max_batch=16) as server:
        yield server


@pytest.fixture(scope="module")
def messages(photo):
    return [{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                         {"type": "image_url", "image_url": {"url": data_url(photo)}}]}]


def client(server, cls=openai.AsyncOpenAI, **kw):
    return cls(base_url=server.url + "/v1", api_key="none", max_retries=0, **kw)


def health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
        return json.loads(r.read())


async def _ask(c, messages, stream: bool, tokens: int) -> str:
    if not stream:
        r = await c.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=tokens)
        return r.choices[0].finish_reason
    s = await c.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=tokens, stream=True)
    reason = None
    async for chunk in s:
        reason = chunk.choices[0].finish_reason or reason if chunk.choices else reason
    return reason


def test_64_concurrent_clients_are_all_answered(server, messages):
    async def main():
        async with client(server, timeout=240) as c:
            return await asyncio.gather(*(_ask(c, messages, i % 2 == 1, 3) for i in range(64)),
                                        return_exceptions=True)

    reasons = asyncio.run(main())
    assert reasons == ["length"] * 64, [r for r in reasons if r != "length"][:3]


class Gate:
    """Holds the engine inside a step on demand (so a test, not the machine's speed, decides what
    happens between two steps) and counts the aborts the server asks for."""

    def __init__(self, loop, monkeypatch):
        self.loop, self.hold, self.held, self.release, self.aborted = loop, threading.Event(), threading.Event(), \
            threading.Event(), set()
        runtime, run_step, abort = loop.engine.runtime, loop.engine.runtime.run_step, loop.abort

        def gated(*args, **kwargs):
            if self.hold.is_set():
                self.held.set()
                assert self.release.wait(120), "the test never released the engine"
            return run_step(*args, **kwargs)

        def counted(job):
            self.aborted.add(id(job))
            abort(job)

        monkeypatch.setattr(runtime, "run_step", gated)
        monkeypatch.setattr(loop, "abort", counted)


async def until(check, what: str, timeout: float = 120):
    """Polls check() (not a timing assertion: a generous bound, for a clear failure)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


def _aborted(server) -> float:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    found = [line for line in text.splitlines() if line.startswith('vlmrt_requests_finished_total{reason="abort"}')]
    return float(found[0].split()[-1]) if found else 0.0


def test_clients_that_disconnect_free_their_slots(server, messages, monkeypatch):
    """8 clients leave in every state a request can be in: 4 streams after their first piece, 2
    plain requests while they run, 2 streams still queued behind a step (their abort lands before
    their add). The engine is held inside a step while they leave, so the test does not depend on
    the machine's speed: once released, that step ends, every abort applies before the next one,
    and no 390-token request runs on. A short request right after is answered at once."""
    loop = server.loop
    gate = Gate(loop, monkeypatch)
    before, first_pieces = _aborted(server), []

    async def stream(c, stay: asyncio.Event):
        s = await c.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=390, stream=True)
        async for _ in s:
            first_pieces.append(1)
            break
        await stay.wait()
        await s.close()

    async def main():
        async with client(server, timeout=120) as c:
            leave = asyncio.Event()
            streams = [asyncio.ensure_future(stream(c, leave)) for _ in range(4)]
            plain = [asyncio.ensure_future(c.chat.completions.create(model="minigpt4-tiny", messages=messages,
                                                                      max_tokens=390)) for _ in range(2)]
            await until(lambda: len(first_pieces) == 4 and len(loop.engine.running) == 6, "6 requests run")
            gate.hold.set()
            await until(gate.held.is_set, "the engine is held inside a step")
            queued = [asyncio.ensure_future(stream(c, leave)) for _ in range(2)]
            await until(lambda: loop.in_flight == 8, "2 more requests are submitted")
            leave.set()
            for task in plain + queued:
                task.cancel()  # the client closes the connection
            await asyncio.gather(*streams, *plain, *queued, return_exceptions=True)
            await until(lambda: len(gate.aborted) == 8, "the server has asked to abort all 8", 30)
            steps = loop.steps
            gate.hold.clear()
            gate.release.set()
            await until(lambda: loop.in_flight == 0, "every slot is free")
            assert loop.steps - steps <= 2  # the held step, then one that only reports the aborts
            short = await c.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=2)
            return short.choices[0].finish_reason, loop.steps - steps

    reason, steps = asyncio.run(main())
    assert reason == "length" and steps <= 4, steps  # the short one: its prefill and one step, nothing before it
    assert _aborted(server) - before == 8


def test_a_short_request_behind_a_long_one_finishes_first(server, messages):
    done = []

    async def long(c):
        s = await c.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=300, stream=True,
                                            temperature=0.8, seed=1)
        async for _ in s:
            started.set()
        done.append("long")

    async def short(c):
        await started.wait()  # the long one is running
        await c.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=4)
        done.append("short")

    async def main():
        async with client(server, timeout=240) as c:
            await asyncio.gather(long(c), short(c))

    started = asyncio.Event()
    asyncio.run(main())
    assert done == ["short", "long"]
