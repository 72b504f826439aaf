"""`vlmrt serve`: an OpenAI-compatible HTTP server over the engine (continuous batching).

A thin adapter on an established ASGI stack (FastAPI, served by uvicorn; the `vlmrt[serve]`
extra): decode a request into (conversation, images, GenerationConfig), hand it to the engine loop
(vlmrt/serve_loop.py), encode the answer in the shape of OpenAI's chat completions API
(platform.openai.com/docs/api-reference/chat: the request fields, the `chat.completion` object,
`chat.completion.chunk` Server-Sent Events ending in `data: [DONE]`). Modelled on vLLM's OpenAI
server: abort on disconnect, `--allowed-local-media-path`, `--api-key`, `/metrics`.

```
 uvicorn (asyncio)                                            engine thread
 POST /v1/chat/completions
   body (size limit 413, read timeout 408) ─► JSON ─► ChatRequest:
     messages ─► Conversation (the family's template renders it), images in their user turns (data:
     URLs, or files under --allowed-local-media-path; up to the family's max_images),
     GenerationConfig                                                ─► EngineLoop.submit (503 if full)
   Answer (the ASGI response): watches the connection from submit to its last byte
   ◄── job.queue: ("text", (piece, logprobs))* then ("done", answer) | ("error", HttpError) ◄── engine.step()
   client gone or --request-timeout passed ─► EngineLoop.abort ─► engine.abort before the next step
```
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.processor import Conversation
from vlmrt.serve_logprobs import TokenPieces, choice_logprobs, requested_logprobs
from vlmrt.serve_loop import EngineLoop, HttpError, Job, http_error
from vlmrt.serve_media import MediaPolicy, load_image_url
from vlmrt.serve_options import ServeOptions  # noqa: F401 (part of this module's API)

CHAT_PATH = "/v1/chat/completions"
MAX_CHOICES = 16  # `n`: each choice is one engine request
EXTRA = "serve"  # pip install 'vlmrt[serve]'
_UNSUPPORTED = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
                "audio": None, "modalities": None, "prediction": None}


def require_serve_extra() -> None:
    """A clear error when the ASGI stack is missing."""
    import importlib

    missing = []
    for name in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise VlmrtError(f"vlmrt serve needs {', '.join(missing)}: pip install 'vlmrt[{EXTRA}]'")


# ---- request decoding (runs in a worker thread of the event loop; touches no model) ----


@dataclass
class ChatRequest:
    """One decoded chat completions request."""

    prompt: Conversation
    image: object  # RGB PIL image, a list of them (several, in order), or None (text only)
    config: GenerationConfig
    stream: bool
    include_usage: bool  # stream_options.include_usage: one more chunk, with usage
    n: int = 1  # choices: one engine request each (a sampled one with seed + i)


def parse_chat_request(body, pipeline, model_name: str, media: MediaPolicy | None = None) -> ChatRequest:
    """A parsed JSON body -> ChatRequest, its image read per `media`. Raises HttpError (400, or 404
    for another model)."""
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object with a `messages` list")
    model = body.get("model")
    if model is not None and model != model_name:
        raise HttpError(404, f"the model `{model}` does not exist; this server runs `{model_name}` "
                             "(GET /v1/models)", "invalid_request_error", "model_not_found")
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) not in (None, neutral):
            raise HttpError(400, f"`{name}` is not supported by vlmrt; leave it out (or set it "
                                 f"to {json.dumps(neutral)})")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise HttpError(400, "`response_format` is not supported by vlmrt (no JSON mode); leave it out or use "
                             '{"type": "text"}')
    conversation, urls = conversation_and_images(body.get("messages"), pipeline.processor.spec.max_images, model_name)
    config = generation_config(body, pipeline)
    stream = _field(body, "stream", False, bool, lambda v: True, "true or false")
    options = _field(body, "stream_options", {}, dict, lambda v: True, 'an object, e.g. {"include_usage": true}')
    images = [load_image_url(url, media) for url in urls]
    image = None if not images else images[0] if len(images) == 1 else images
    n = _field(body, "n", 1, int, lambda v: 1 <= v <= MAX_CHOICES, f"an integer in [1, {MAX_CHOICES}]")
    if n > 1 and config.num_beams > 1:
        raise HttpError(400, "`n` > 1 with `num_beams` > 1 is not served (beam search gives one answer); leave one out")
    return ChatRequest(conversation, image, config, stream, options.get("include_usage") is True, n)


def choice_config(config: GenerationConfig, index: int) -> GenerationConfig:
    """The settings of choice `index` of a request: a seeded sampled request's choice i samples
    with seed + i (reproducible, and different from each other); unseeded ones draw a seed each in
    the engine loop; greedy choices are all the same answer, as with OpenAI at temperature 0."""
    if index == 0 or not config.do_sample or config.seed is None:
        return config
    return replace(config, seed=(config.seed + index) % 2**63)


def conversation_and_images(messages, max_images: int = 1, model_name: str = "this model"
                            ) -> tuple[Conversation, list[str]]:
    """OpenAI messages -> a Conversation (system, user and assistant turns in order; each image in
    the turn of its message) and the URLs of its images, in order (none: text only).

    Args:
        messages: the request's `messages`.
        max_images: the most images the family places in one prompt (`ProcessorSpec.max_images`).
        model_name: named in the error for too many images.
    """
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, '`messages` must be a non-empty list, e.g. [{"role": "user", "content": [...]}]')
    systems, turns, urls, image_turns = [], [], [], []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise HttpError(400, f"unsupported message role {json.dumps(role)}; use system, user or assistant "
                                 "(tool calls are not supported)")
        texts, images = _content(m.get("content"), role)
        if role in ("system", "developer"):
            systems.append("\n".join(texts))
            continue
        image_turns += [len(turns)] * len(images)
        urls += images
        turns.append((role, "\n".join(t for t in texts if t.strip())))
    if not any(r == "user" for r, _ in turns):
        raise HttpError(400, "no message has role `user`; the last user message holds the question")
    if turns[-1][0] != "user":
        raise HttpError(400, "the last message must be the user's (the model answers it); drop the trailing "
                             "assistant message")
    if len(urls) > max_images:
        most = f"{max_images} image" + ("s" if max_images > 1 else "")
        raise HttpError(400, f"the messages have {len(urls)} images; {model_name} takes at most {most} per request "
                             "(in any user messages): send fewer {\"type\": \"image_url\"} parts, or split the "
                             "request")
    if not turns[-1][1]:
        raise HttpError(400, 'the last user message has no question; add a {"type": "text", "text": ...} part')
    system = "\n".join(systems) if systems else None
    if len(urls) > 1:
        return Conversation(tuple(turns), system, image_turns=tuple(image_turns)), urls
    return Conversation(tuple(turns), system, image_turns[0] if urls else -1), urls


def _content(content, role: str) -> tuple[list[str], list[str]]:
    """A message's content (a string or parts) -> its texts and image URLs (images: user messages only)."""
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise HttpError(400, "a message's `content` must be a string or a list of content parts")
    texts, urls = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            urls.append(_image_url(part))
        else:
            where = "" if role == "user" else f" in a {role} message (text only there)"
            raise HttpError(400, f"unsupported content part {json.dumps(part)[:80]}{where}; use "
                                 '{"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}')
    return texts, urls


def _image_url(part: dict) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value  # some clients send a bare string
    if not isinstance(url, str) or not url:
        raise HttpError(400, 'an image_url part needs {"image_url": {"url": "data:image/png;base64,..."}}')
    return url


def generation_config(body: dict, pipeline) -> GenerationConfig:
    """OpenAI sampling fields -> the model's GenerationConfig (a sampled request without `seed` has
    seed None: the engine loop draws one).

    Greedy unless `temperature` > 0 (OpenAI's default is 1.0; vlmrt's is greedy, as in `vlmrt run`).
    `top_k`, `repetition_penalty` and `num_beams` (beam search, greedy only) are accepted as
    extensions (as vLLM does for the first two). Fields that do not change a greedy answer are reset.
    """
    num = (int, float)
    max_new = _field(body, "max_tokens", GenerationConfig.max_new_tokens, int, lambda v: v >= 1, "an integer >= 1")
    max_new = _field(body, "max_completion_tokens", max_new, int, lambda v: v >= 1, "an integer >= 1")
    temperature = _field(body, "temperature", 0.0, num, lambda v: 0 <= v <= 2, "a number in [0, 2] (0 = greedy)")
    top_p = _field(body, "top_p", 1.0, num, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _field(body, "top_k", 0, int, lambda v: v >= 0, "an integer >= 0 (0 = off)")
    penalty = _field(body, "repetition_penalty", 1.0, num, lambda v: v > 0, "a number > 0 (1 = off)")
    beams = _field(body, "num_beams", 1, int, lambda v: 1 <= v <= 16, "an integer in [1, 16] (1 = no beam search)")
    seed = _field(body, "seed", None, int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")
    stops = _stop_strings(body.get("stop"))
    sample = temperature > 0
    if sample and beams > 1:
        raise HttpError(400, "`num_beams` > 1 searches deterministically; set `temperature` to 0 (or leave it out)")
    logprobs = requested_logprobs(body)
    if logprobs is not None and beams > 1:
        raise HttpError(400, "`logprobs` with `num_beams` > 1 is not served (beam search returns no token "
                             "log-probabilities); leave one out")
    config = pipeline.generation_config(
        max_new_tokens=max_new, do_sample=sample, temperature=float(temperature) if sample else 1.0,
        top_k=top_k if sample else 0, top_p=float(top_p) if sample else 1.0, repetition_penalty=float(penalty),
        num_beams=beams, logprobs=logprobs,
        seed=seed if sample else 0, stop_strings=tuple(pipeline.loaded.spec.stop_strings) + stops,
    )
    return config


def _field(body: dict, name: str, default, kind, ok, hint: str):
    """body[name] (default when absent or null), checked to be of `kind` and ok(value); else a 400."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool) or not ok(value):
        raise HttpError(400, f"`{name}` must be {hint}, got {json.dumps(value)[:40]}")
    return value


def _stop_strings(value) -> tuple[str, ...]:
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise HttpError(400, "`stop` must be a non-empty string or a list of up to 4 of them")
    return tuple(stops)


# ---- responses ----


def completion_json(answers: list[dict], model: str, pieces: TokenPieces | None = None) -> dict:
    """The engine answers of a request's choices -> OpenAI's `chat.completion` object, plus vlmrt's
    timings (per choice when there are several). The prompt counts once in `usage`. `pieces` turns
    the token ids of asked-for log-probabilities into text."""
    choices = [{"index": i, "message": {"role": "assistant", "content": a["text"]},
                "finish_reason": a["finish_reason"], "logprobs": choice_logprobs(pieces, a.get("logprobs"))}
               for i, a in enumerate(answers)]
    return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": total_usage(answers),
            "vlmrt": answers[0]["vlmrt"] if len(answers) == 1 else {"choices": [a["vlmrt"] for a in answers]}}


def total_usage(answers: list[dict]) -> dict:
    prompt, completion = answers[0]["usage"]["prompt_tokens"], sum(a["usage"]["completion_tokens"] for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunk_json(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None, index: int = 0,
               logprobs: dict | None = None, **extra) -> dict:
    """One `chat.completion.chunk` of a stream (of choice `index`); every chunk of a stream shares id
    and created. `logprobs`: those of the chunk's tokens (choice_logprobs)."""
    choices = [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices, **extra}


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


# ---- the ASGI app ----


def build_app(loop: EngineLoop, model_name: str, options: ServeOptions):
    """The FastAPI app: chat completions, models, health, metrics; JSON errors for every status."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="vlmrt", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "vlmrt"}
    media = MediaPolicy(options.allowed_local_media_path, tuple(d.lower() for d in options.allowed_media_domains),
                        options.image_fetch_timeout_s, int(options.max_body_mib * 2**20))
    pieces = TokenPieces(loop.pipeline.loaded.tokenizer)
    routes = f"POST {CHAT_PATH}, GET /v1/models, GET /v1/models/{{id}}, GET /health, GET /metrics"

    @app.exception_handler(HTTPException)
    async def _routing(request, exc):  # unknown path 404, wrong method 405: JSON too
        verb = "is not allowed on" if exc.status_code == 405 else "has no route"
        return error_response(HttpError(exc.status_code, f"{request.method} {verb} {request.url.path}; this server "
                                                         f"answers {routes}", "invalid_request_error"), close=True)

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        return error_response(http_error(exc))

    if options.api_key:
        app.add_middleware(ApiKey, key=options.api_key)

    async def health(request):
        e = loop.engine
        body = {"status": "ok" if loop.is_alive() and not loop.stopping else "stopping", "model": model_name,
                "runtime": getattr(e.runtime, "name", "?"), "device": str(loop.pipeline.loaded.device),
                "synthetic_weights": loop.pipeline.loaded.synthetic, "kv_slots": e.num_slots,
                "running": len(e.running), "queued": loop.waiting, "max_queue": options.max_queue,
                "steps": loop.steps, "requests": loop.served}
        return JSONResponse(body)

    async def metrics(request):
        return Response(loop.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(request):
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request):
        model_id = request.path_params["model_id"]
        if model_id != model_name:
            return error_response(HttpError(404, f"the model `{model_id}` does not exist; this server runs "
                                                 f"`{model_name}`", "invalid_request_error", "model_not_found"))
        return JSONResponse(card)

    async def chat(request):
        try:
            body = await _read_json(request, options)
            parsed = await run_in_threadpool(parse_chat_request, body, loop.pipeline, model_name, media)
            queue = asyncio.Queue()
            jobs = [Job(parsed.prompt, parsed.image, choice_config(parsed.config, i), parsed.stream,
                        asyncio.get_running_loop(), queue, index=i) for i in range(parsed.n)]
            loop.submit(*jobs)
        except HttpError as e:
            return error_response(e, close=e.status in (408, 411, 413))
        return Answer(loop, jobs, parsed.include_usage, model_name, options, pieces)

    for path, endpoint, method in (("/health", health, "GET"), ("/metrics", metrics, "GET"), ("/v1/models", models, "GET"),
                                   ("/v1/models/{model_id:path}", model, "GET"), (CHAT_PATH, chat, "POST")):
        app.add_route(path, endpoint, methods=[method])
    return app


def error_response(e: HttpError, close: bool = False):
    """An HttpError as OpenAI's JSON error body (an ASGI app)."""
    from fastapi.responses import JSONResponse

    headers = {**e.headers, **({"Connection": "close"} if close else {})}
    return JSONResponse(e.body(), e.status, headers=headers)


class ApiKey:
    """ASGI middleware: /v1/* needs `Authorization: Bearer KEY` (401 otherwise). Pure ASGI on
    purpose: Starlette's BaseHTTPMiddleware runs the app in a task behind a memory stream, which
    changes when the app's sends return and how it sees a client leave."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not secrets.compare_digest(given, self.expected):
                refuse = error_response(HttpError(401, "missing or wrong API key; send Authorization: Bearer KEY",
                                                  "authentication_error", "invalid_api_key"))
                return await refuse(scope, receive, send)
        await self.app(scope, receive, send)


async def _read_json(request, options: ServeOptions):
    """The body as JSON: a Content-Length, at most max_body_mib, whole within body_timeout_s."""
    from starlette.requests import ClientDisconnect

    limit = int(options.max_body_mib * 2**20)
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise HttpError(411, "send the JSON body with a Content-Length header (chunked bodies are not read)")
    if int(length) > limit:
        raise HttpError(413, f"the body is {int(length)} bytes, above the limit of {limit}; send a smaller image")
    try:
        raw = await asyncio.wait_for(request.body(), options.body_timeout_s)
    except asyncio.TimeoutError:
        raise HttpError(408, f"the body did not arrive within {options.body_timeout_s:g} s (shorter than its "
                             "Content-Length, or too slow); send it again") from None
    except ClientDisconnect:  # the answer goes nowhere; no traceback for the log
        raise HttpError(499, "the client closed the connection before its body arrived", "cancelled") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"the body is not valid JSON ({e}); send a chat completions request object") from None


def _timeout(options: ServeOptions) -> HttpError:
    return HttpError(504, f"the request ran past the server's --request-timeout of {options.request_timeout_s:g} s "
                          "and was stopped; ask for fewer tokens or retry later", "timeout")


class Answer:
    """The ASGI response of a submitted request (its `n` choices, one job each). From the moment it
    starts until its last byte it watches the connection: a client that leaves (while it waits for a
    slot, before its first token, mid-stream or while a plain answer is made) aborts its jobs, so
    their slots are free before the engine's next step. Streamed: Server-Sent Events (per choice a
    role chunk, one chunk per piece of text as the engine makes it final and a chunk with
    finish_reason; then a usage chunk if asked and `data: [DONE]`); an error before the first piece
    is a plain JSON answer, and an error of one choice ends the whole request.

    The abort never waits on an event generator's cleanup: a generator left suspended at a `yield`
    when its task is cancelled is closed only when the garbage collector finds it.
    """

    def __init__(self, loop: EngineLoop, jobs: list[Job], include_usage: bool, model: str, options: ServeOptions,
                 pieces: TokenPieces | None = None):
        self.loop, self.jobs, self.include_usage, self.model, self.options = loop, jobs, include_usage, model, options
        self.pieces = pieces
        self.deadline = jobs[0].submitted + options.request_timeout_s

    async def __call__(self, scope, receive, send):
        watcher = asyncio.ensure_future(self._abort_when_gone(receive))
        try:
            first = await self._next()
            if first[1] == "error":
                await error_response(first[2])(scope, receive, send)
            elif self.jobs[0].stream:
                await self._stream(first, send)
            else:
                await (await self._whole(first))(scope, receive, send)
        finally:
            watcher.cancel()
            self._abort()  # a no-op once finished; a cancelled handler stops its request

    def _abort(self) -> None:
        for job in self.jobs:
            self.loop.abort(job)

    async def _abort_when_gone(self, receive) -> None:
        """Returns once the client has gone (the body is read: the next ASGI message is the
        disconnect, or uvicorn's end of the response), aborting the request if still running."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self._abort()

    async def _next(self) -> tuple[int, str, object]:
        """The next event of any choice; past --request-timeout the request is aborted (504)."""
        try:
            return await asyncio.wait_for(self.jobs[0].queue.get(), max(self.deadline - time.perf_counter(), 0.001))
        except asyncio.TimeoutError:
            self._abort()
            return 0, "error", _timeout(self.options)

    async def _whole(self, event):
        """A plain answer once every choice is done (an error of one: that error, the others stopped)."""
        from fastapi.responses import JSONResponse

        answers = {}
        while True:
            index, kind, value = event
            if kind == "error":
                self._abort()
                return error_response(value)
            answers[index] = value
            if len(answers) == len(self.jobs):
                ordered = [answers[i] for i in range(len(self.jobs))]
                return JSONResponse(completion_json(ordered, self.model, self.pieces))
            event = await self._next()

    async def _stream(self, event, send) -> None:
        cid, created, started, answers, sent = _completion_id(), int(time.time()), set(), {}, {}

        async def body(data: bytes, more: bool = True):
            await send({"type": "http.response.body", "body": data, "more_body": more})

        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
        while True:
            index, kind, value = event
            if kind == "error":
                self._abort()
                return await body(_sse(value.body()), more=False)  # the stream ends without [DONE]
            if index not in started:
                started.add(index)
                await body(_sse(chunk_json(cid, created, self.model, {"role": "assistant", "content": ""}, None, index)))
            if kind == "text":  # (text, token logprobs or None)
                text, logprobs = value
                chunk_logprobs = choice_logprobs(self.pieces, logprobs, sent.get(index, 0))
                sent[index] = sent.get(index, 0) + len(logprobs or ())
                await body(_sse(chunk_json(cid, created, self.model, {"content": text}, None, index, chunk_logprobs)))
            else:
                answers[index] = value
                await body(_sse(chunk_json(cid, created, self.model, {}, value["finish_reason"], index,
                                           vlmrt=value["vlmrt"])))
                if len(answers) == len(self.jobs):
                    break
            event = await self._next()
        if self.include_usage:
            usage = total_usage(list(answers.values()))
            await body(_sse({**chunk_json(cid, created, self.model, {}), "choices": [], "usage": usage}))
        await body(b"data: [DONE]\n\n", more=False)


# ---- the server ----


class VlmrtServer:
    """uvicorn over the app, plus the engine loop. serve_forever() answers; shutdown() and
    server_close() stop both."""

    def __init__(self, sock: socket.socket, app, loop: EngineLoop, model_name: str, quiet: bool):
        import uvicorn

        self.sock, self.loop, self.model_name = sock, loop, model_name
        config = uvicorn.Config(app, log_level="warning", access_log=not quiet, timeout_keep_alive=5,
                                timeout_graceful_shutdown=5, lifespan="off")
        self.uvicorn = uvicorn.Server(config)
        self._finished = threading.Event()
        self._finished.set()

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._finished.clear()
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self._finished.set()

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        self._finished.wait(30)

    def server_close(self) -> None:
        self.loop.stop()
        self.sock.close()


def make_server(pipeline, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
                max_batch: int = 32) -> VlmrtServer:
    """Bind an HTTP server over `pipeline` and start its engine loop; serve_forever() then answers.

    Args:
        pipeline: a loaded `Pipeline`; from now on only the engine loop thread calls it.
        host: interface to listen on (127.0.0.1: this machine only).
        port: TCP port; 0 picks a free one (read it from `server.url`).
        options: limits, access, image cache (`ServeOptions`).
        max_batch: most requests decoded together (the engine's slots; the KV budget may allow fewer).

    Example:
        >>> server = make_server(Pipeline.load("minigpt4-tiny"), port=0)
        >>> threading.Thread(target=server.serve_forever, daemon=True).start()
        >>> ...  # POST f"{server.url}/v1/chat/completions"
        >>> server.shutdown(); server.server_close()
    """

    from vlmrt.engine import Engine
    from vlmrt.image_cache import CachedVision

    require_serve_extra()
    options = options or ServeOptions()
    options.check()
    if max_batch < 1:
        raise VlmrtError(f"--max-batch must be at least 1, got {max_batch}")
    try:
        sock = socket.create_server((host, port), backlog=2048)
    except OSError as e:
        raise VlmrtError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    cache = CachedVision(pipeline.runtime, int(options.image_cache_mib * 2**20))
    engine_options = replace(pipeline.engine_options, max_slots=max_batch)
    engine = Engine(cache, pipeline.processor, pipeline.generation_config(), engine_options)
    loaded = pipeline.loaded
    model_name = Path(loaded.name).name or loaded.name  # a release or export folder: its name
    loop = EngineLoop(pipeline, engine, options.max_queue, cache)
    server = VlmrtServer(sock, build_app(loop, model_name, options), loop, model_name, options.quiet)
    loop.start()
    return server
