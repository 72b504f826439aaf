"""`vlmrt serve`: an OpenAI-compatible HTTP server over a Pipeline, with dynamic batching.

A thin adapter (standard library only): decode a request into (image, question, GenerationConfig),
let the one worker thread that owns the Pipeline run it, encode the answer in the shape of OpenAI's
chat completions API (platform.openai.com/docs/api-reference/chat: the request fields, the
`chat.completion` object, `chat.completion.chunk` Server-Sent Events ending in `data: [DONE]`).

```
 HTTP threads (one per connection)                  worker thread (owns the Pipeline)
 POST /v1/chat/completions
   JSON ─► ChatRequest (image decoded, config) ─► inbox ─► take the oldest request, then up to
                                                  (queue)   max_batch-1 more with equal settings,
                                                            waiting at most batch_wait_ms; others
                                                            wait, in order, for a later batch
                                                                 │
                                                  pipeline(images, prompts, config, on_text)
                                                                 │ one left-padded batch
   ◄── job.events: ("text", piece) per on_text(row, piece) ◄─────┤ (streamed requests only)
   ◄── job.events: ("done", answer) or ("error", HttpError) ◄────┘
```

Limits: one image and one question per request, taken from the last user message (earlier turns
and system messages are ignored: the prompt is the model's own template). Images come inline as
base64 data: URLs or as paths on the server's disk; http(s) URLs are refused, nothing is downloaded.
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import io
import json
import queue
import random
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError

CHAT_PATH = "/v1/chat/completions"
MAX_BODY_BYTES = 32 * 2**20  # base64 inflates an image file by 4/3
_STOP = object()  # put on the inbox to wake the worker for shutdown
_UNSUPPORTED = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "logit_bias": {}}


class HttpError(Exception):
    """An answer other than 200: HTTP status, message, OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": None}}


# ---- request decoding (runs on the HTTP threads; touches no model) ----


@dataclass
class ChatRequest:
    """One decoded chat completions request."""

    image: object  # RGB PIL image
    prompt: str
    config: GenerationConfig
    seeded: bool  # sampled with the client's own seed: runs alone (see batch_key)
    stream: bool
    include_usage: bool  # stream_options.include_usage: one more chunk, with usage


def parse_chat_request(body, pipeline) -> ChatRequest:
    """A parsed JSON body -> ChatRequest. Raises HttpError (400) or VlmrtError (bad image file)."""
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object with a `messages` list")
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) not in (None, neutral):
            raise HttpError(400, f"`{name}` is not supported by vlmrt; leave it out (or set it to {json.dumps(neutral)})")
    prompt, url = question_and_image(body.get("messages"))
    config, seeded = generation_config(body, pipeline)
    stream = _field(body, "stream", False, bool, lambda v: True, "true or false")
    options = _field(body, "stream_options", {}, dict, lambda v: True, 'an object, e.g. {"include_usage": true}')
    return ChatRequest(load_image_url(url), prompt, config, seeded, stream, options.get("include_usage") is True)


def question_and_image(messages) -> tuple[str, str]:
    """The last user message's text (text parts joined by newlines) and its one image URL."""
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, '`messages` must be a non-empty list, e.g. [{"role": "user", "content": [...]}]')
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise HttpError(400, "no message has role `user`; the last user message holds the question and the image")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise HttpError(400, "a message's `content` must be a string or a list of content parts")
    texts, urls = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            urls.append(_image_url(part))
        else:
            raise HttpError(400, f"unsupported content part {json.dumps(part)[:80]}; use "
                                 '{"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}')
    if len(urls) != 1:
        raise HttpError(400, f"the last user message has {len(urls) or 'no'} image{'s' * (len(urls) != 1)}; vlmrt "
                             'answers about one image per request: add exactly one {"type": "image_url"} part')
    prompt = "\n".join(t for t in texts if t.strip())
    if not prompt:
        raise HttpError(400, 'the last user message has no question; add a {"type": "text", "text": ...} part')
    return prompt, urls[0]


def _image_url(part: dict) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value  # some clients send a bare string
    if not isinstance(url, str) or not url:
        raise HttpError(400, 'an image_url part needs {"image_url": {"url": "data:image/png;base64,..."}}')
    return url


def load_image_url(url: str):
    """A base64 data: URL, a file:// URL or a path on the server -> RGB PIL image. Never downloads."""
    from vlmrt.processor import load_image

    if url.startswith("data:"):
        return _decode_data_url(url)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise HttpError(400, "image URLs over http(s) are not fetched (vlmrt never downloads); send the image "
                             "inline as data:image/jpeg;base64,... or give a path on the server's disk")
    if scheme == "file":
        return load_image(unquote(urlparse(url).path))
    if len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise HttpError(400, f"unsupported image URL scheme '{scheme}:'; use a data: URL, a file:// URL or a path")
    if len(url) > 4096:  # not a path: most likely base64 sent without its data: prefix
        raise HttpError(400, "the image URL is not a data: URL and too long for a path; send data:image/png;base64,...")
    return load_image(url)


def _decode_data_url(url: str):
    from PIL import Image

    from vlmrt.processor import to_rgb

    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise HttpError(400, "an image data: URL must be base64, e.g. data:image/png;base64,iVBORw0KGgo...")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "the image data: URL's payload is not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise HttpError(400, f"the image data: URL does not hold an image PIL can read (JPEG, PNG, WebP ...): {e}") from None
    return to_rgb(img)


def generation_config(body: dict, pipeline) -> tuple[GenerationConfig, bool]:
    """OpenAI sampling fields -> the model's GenerationConfig, and whether a sampled request has its seed.

    Greedy unless `temperature` > 0 (OpenAI's default is 1.0; vlmrt's is greedy, as in `vlmrt run`).
    `top_k`, `repetition_penalty` and `num_beams` (beam search, greedy only) are accepted as
    extensions (as vLLM does for the first two). Fields that do not
    change a greedy answer are reset for greedy requests, so those share batches.
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
    config = pipeline.generation_config(
        max_new_tokens=max_new, do_sample=sample, temperature=float(temperature) if sample else 1.0,
        top_k=top_k if sample else 0, top_p=float(top_p) if sample else 1.0, repetition_penalty=float(penalty),
        num_beams=beams,
        seed=(seed or 0) if sample else 0, stop_strings=tuple(pipeline.loaded.spec.stop_strings) + stops,
    )
    return config, sample and seed is not None


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


# ---- the worker: one thread owns the Pipeline and runs requests in batches ----


def batch_key(request: ChatRequest):
    """Requests with equal keys may share a batch: equal settings, any image and prompt.

    A sampled request with its own seed runs alone: the rows of a batch draw from one random
    generator, so its answer would depend on its neighbours and the seed would not reproduce it.
    """
    return (request.config, id(request)) if request.seeded else request.config


@dataclass
class _Job:
    request: ChatRequest
    key: object
    events: queue.Queue = field(default_factory=queue.Queue)  # ("text", str)*, then ("done", dict) | ("error", HttpError)
    submitted: float = field(default_factory=time.perf_counter)
    queue_ms: float = 0.0
    streamed: bool = False  # text already went out (a failed batch is then not retried row by row)


class BatchWorker(threading.Thread):
    """Owns the Pipeline (models are not thread-safe) and runs queued requests as dynamic batches."""

    def __init__(self, pipeline, max_batch: int = 8, batch_wait_ms: float = 5.0):
        super().__init__(name="vlmrt-batch-worker", daemon=True)
        self.pipeline, self.max_batch, self.batch_wait = pipeline, max_batch, batch_wait_ms / 1e3
        self.inbox: queue.Queue = queue.Queue()
        self.pending: collections.deque = collections.deque()  # taken from the inbox, waiting for their settings' batch
        self.stopping = False
        self.lock = threading.Lock()
        self.batches = self.requests = self.largest_batch = 0  # counters for /health (and tests)

    def submit(self, request: ChatRequest) -> _Job:
        job = _Job(request, batch_key(request))
        with self.lock:
            if self.stopping:
                job.events.put(("error", HttpError(503, "the server is shutting down; retry once it is back", "server_error")))
            else:
                self.inbox.put(job)
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running batch, answer waiting requests with 503, end the thread."""
        with self.lock:
            self.stopping = True
        self.inbox.put(_STOP)
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        while not self.stopping:
            batch = self._next_batch()
            if batch:
                self._run_batch(batch)
        with self.lock:  # submit() adds nothing more; the worker is the inbox's only reader
            left = list(self.pending) + [self.inbox.get_nowait() for _ in range(self.inbox.qsize())]
        for job in (j for j in left if j is not _STOP):
            job.events.put(("error", HttpError(503, "the server shut down before this request ran; send it again", "server_error")))

    def _next_batch(self) -> list[_Job]:
        """The oldest waiting request, plus up to max_batch-1 more with the same key that are already
        waiting or arrive within batch_wait_ms. Requests with other keys keep their place in `pending`."""
        first = self.pending.popleft() if self.pending else self.inbox.get()
        if first is _STOP:
            return []
        batch = [first]
        for job in [j for j in self.pending if j.key == first.key][: self.max_batch - 1]:
            self.pending.remove(job)
            batch.append(job)
        deadline = time.perf_counter() + self.batch_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self.inbox.get(timeout=remaining) if remaining > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                break  # stop() set `stopping`: this batch still runs, then the loop ends
            (batch if job.key == first.key else self.pending).append(job)
        return batch

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            result = self._generate(batch)
        except Exception as e:  # the server outlives any one batch
            if len(batch) > 1 and not any(j.streamed for j in batch):
                for job in batch:  # find the request at fault: each alone gets its own answer or error
                    self._run_batch([job])
                return
            error = _http_error(e)
            for job in batch:
                job.events.put(("error", error))
            return
        for row, job in enumerate(batch):
            job.events.put(("done", self._answer(result, row, batch)))

    def _generate(self, batch: list[_Job]):
        config = batch[0].request.config
        if config.do_sample and not batch[0].request.seeded:
            config = replace(config, seed=random.randrange(2**31))  # unseeded sampling varies, as OpenAI's does
        started = time.perf_counter()
        for job in batch:
            job.queue_ms = (started - job.submitted) * 1e3
        self.batches, self.requests = self.batches + 1, self.requests + len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        images, prompts = [j.request.image for j in batch], [j.request.prompt for j in batch]
        return self.pipeline(images, prompts, config, on_text=functools.partial(_route_text, batch))

    def _answer(self, result, row: int, batch: list[_Job]) -> dict:
        job = batch[row]
        prompt_tokens = result.row_prompt_tokens[row]  # its own length, not the batch's padded one
        completion_tokens = len(result.token_ids[row])
        return {
            "text": result.texts[row], "finish_reason": result.finish_reasons[row],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "vlmrt": {"timings": result.timings, "queue_ms": job.queue_ms, "batch_size": len(batch), "notes": result.notes},
        }


def _route_text(batch: list[_Job], row: int, text: str) -> None:
    """The Pipeline's on_text(row, text): hand the piece to that row's request, if it streams."""
    job = batch[row]
    if job.request.stream:
        job.streamed = True
        job.events.put(("text", text))


def _http_error(e: Exception) -> HttpError:
    if isinstance(e, VlmrtError):
        return HttpError(400, str(e))
    traceback.print_exc(file=sys.stderr)
    return HttpError(500, f"internal error ({type(e).__name__}: {e}); the server is still up and its log has the "
                          "traceback", "server_error")


# ---- responses ----


def completion_json(answer: dict, model: str) -> dict:
    """A worker answer -> OpenAI's `chat.completion` object, plus vlmrt's stage timings."""
    return {
        "id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["text"]},
                     "finish_reason": answer["finish_reason"], "logprobs": None}],
        "usage": answer["usage"], "vlmrt": answer["vlmrt"],
    }


def chunk_json(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    """One `chat.completion.chunk` of a stream; every chunk of a stream shares id and created."""
    choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices, **extra}


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


class _Handler(BaseHTTPRequestHandler):
    """Decodes requests, hands them to the worker, writes answers (JSON, or SSE when streaming)."""

    server: "VlmrtServer"
    protocol_version = "HTTP/1.1"  # keep-alive for JSON answers; a stream ends by closing its connection
    server_version = "vlmrt"

    def do_GET(self) -> None:
        routes = {"/health": self.server.health, "/v1/models": self.server.models}
        path = urlparse(self.path).path.rstrip("/")
        if path in routes:
            self._send_json(200, routes[path]())
        else:
            self._send_error(_no_route("GET", path, routes))

    def do_POST(self) -> None:
        path = urlparse(self.path).path.rstrip("/")
        if path != CHAT_PATH:
            self.close_connection = True  # the body is left unread
            return self._send_error(_no_route("POST", path, {"/health": 0, "/v1/models": 0}))
        try:
            request = parse_chat_request(self._read_json(), self.server.worker.pipeline)
        except HttpError as e:
            return self._send_error(e)
        except VlmrtError as e:  # an unreadable image file
            return self._send_error(HttpError(400, str(e)))
        except Exception as e:  # a bug: answer 500 rather than drop the connection
            return self._send_error(_http_error(e))
        job = self.server.worker.submit(request)
        if request.stream:
            self._stream(job, request.include_usage)
            return
        kind, value = job.events.get()
        if kind == "error":
            return self._send_error(value)
        self._send_json(200, completion_json(value, self.server.model_name))

    def _read_json(self):
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            if not length.isdigit():
                raise HttpError(411, "send the JSON body with a Content-Length header (chunked bodies are not read)")
            raise HttpError(413, f"the body is {int(length)} bytes, above the limit of {MAX_BODY_BYTES}; send a smaller image")
        try:
            return json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(400, f"the body is not valid JSON ({e}); send a chat completions request object") from None

    def _stream(self, job: _Job, include_usage: bool) -> None:
        """Server-Sent Events: a role chunk, one chunk per piece of text as the model writes it, a chunk
        with finish_reason (and vlmrt timings), a usage chunk if asked, then `data: [DONE]`."""
        kind, value = job.events.get()
        if kind == "error":  # nothing went out yet (e.g. a prompt too long): a plain JSON error
            return self._send_error(value)
        self.send_response(200)
        for name, header in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("Connection", "close")):
            self.send_header(name, header)
        self.end_headers()
        self.close_connection = True
        chunk = functools.partial(chunk_json, _completion_id(), int(time.time()), self.server.model_name)
        try:
            self._event(chunk({"role": "assistant", "content": ""}))
            while kind == "text":
                self._event(chunk({"content": value}))
                kind, value = job.events.get()
            if kind == "error":
                return self._event(value.body())  # the stream ends without [DONE]
            self._event(chunk({}, value["finish_reason"], vlmrt=value["vlmrt"]))
            if include_usage:
                self._event({**chunk({}), "choices": [], "usage": value["usage"]})
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; its row still finishes with its batch

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")  # wfile is unbuffered: out at once

    def _send_json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_error(self, e: HttpError) -> None:
        self._send_json(e.status, e.body())

    def log_message(self, format: str, *args) -> None:
        if not self.server.quiet and not self.server.closing:  # no writes to stderr while the process exits
            super().log_message(format, *args)


def _no_route(method: str, path: str, get_routes) -> HttpError:
    known = [f"POST {CHAT_PATH}"] + [f"GET {r}" for r in get_routes]
    if path in get_routes or path == CHAT_PATH:
        return HttpError(405, f"{method} is not allowed on {path}; this server answers " + ", ".join(known))
    return HttpError(404, f"no route {method} {path or '/'}; this server answers " + ", ".join(known))


class VlmrtServer(ThreadingHTTPServer):
    """The HTTP server plus its batch worker. serve_forever() answers; shutdown() and server_close()
    stop both (the running batch finishes first)."""

    daemon_threads = True
    block_on_close = False  # server_close() joins the handler threads itself, with a deadline

    def __init__(self, address: tuple[str, int], worker: BatchWorker, quiet: bool = False):
        super().__init__(address, _Handler)
        self.worker, self.quiet = worker, quiet
        self.closing = False
        self._handlers: set[threading.Thread] = set()  # threads answering a connection now
        self._handlers_lock = threading.Lock()
        loaded = worker.pipeline.loaded
        self.model_name = Path(loaded.name).name or loaded.name  # a release or export folder: its name
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict:
        w, loaded = self.worker, self.worker.pipeline.loaded
        return {
            "status": "ok" if w.is_alive() and not w.stopping else "stopping", "model": self.model_name,
            "runtime": getattr(w.pipeline.runtime, "name", "?"), "device": str(loaded.device),
            "synthetic_weights": loaded.synthetic, "max_batch": w.max_batch, "batch_wait_ms": w.batch_wait * 1e3,
            "batches": w.batches, "requests": w.requests, "largest_batch": w.largest_batch,
            "queued": w.inbox.qsize() + len(w.pending),
        }

    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "vlmrt"}
        return {"object": "list", "data": [card]}

    def shutdown(self) -> None:
        super().shutdown()
        self.worker.stop()

    def process_request_thread(self, request, client_address) -> None:
        me = threading.current_thread()
        with self._handlers_lock:
            self._handlers.add(me)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._handlers_lock:
                self._handlers.discard(me)

    def server_close(self, timeout: float = 3.0) -> None:
        """Stop accepting, finish the running batch, then let handler threads end (up to `timeout`
        s): a daemon thread still writing when the interpreter exits aborts the process."""
        self.closing = True
        super().server_close()
        self.worker.stop()
        deadline = time.monotonic() + timeout
        with self._handlers_lock:
            handlers = list(self._handlers)
        for t in handlers:
            t.join(max(0.0, deadline - time.monotonic()))


def make_server(pipeline, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                batch_wait_ms: float = 5.0, quiet: bool = False) -> VlmrtServer:
    """Bind an HTTP server over `pipeline` and start its batch worker; serve_forever() then answers.

    Args:
        pipeline: a loaded `Pipeline`; from now on only the worker thread calls it.
        host: interface to listen on (127.0.0.1: this machine only).
        port: TCP port; 0 picks a free one (read it from `server.url`).
        max_batch: most requests run as one batch.
        batch_wait_ms: how long the oldest waiting request waits for others to join its batch.
        quiet: no access log lines on stderr.

    Example:
        >>> server = make_server(Pipeline.load("minigpt4-tiny"), port=0)
        >>> threading.Thread(target=server.serve_forever, daemon=True).start()
        >>> ...  # POST f"{server.url}/v1/chat/completions"
        >>> server.shutdown(); server.server_close()
    """
    check_batching(max_batch, batch_wait_ms)
    worker = BatchWorker(pipeline, max_batch, batch_wait_ms)
    try:
        server = VlmrtServer((host, port), worker, quiet)
    except OSError as e:
        raise VlmrtError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    worker.start()
    return server


def check_batching(max_batch: int, batch_wait_ms: float) -> None:
    if max_batch < 1:
        raise VlmrtError(f"--max-batch must be at least 1, got {max_batch}")
    if batch_wait_ms < 0:
        raise VlmrtError(f"--batch-wait-ms must be 0 or more, got {batch_wait_ms}")

