"""`vlmrt serve`: OpenAI-shaped answers equal to the Pipeline's, streaming, conversations, every bad
input's 400 (and 404, 408, 413, 503, 504), local files only under the allowed folder, auth, metrics,
the image cache, a failed step's 500, and the command itself started and stopped with Ctrl-C."""

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import serve_helpers
from conftest import ASSETS, load_tiny
from serve_helpers import data_url
from vlmrt.errors import VlmrtError
from vlmrt.pipeline import Pipeline
from vlmrt.serve import ServeOptions, make_server

pytest.importorskip("fastapi", reason="the serve extra: pip install 'vlmrt[serve]'")

TOKENS = 8
QUESTION = "Describe this image."

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(load_tiny("minigpt4-tiny"))


@contextlib.contextmanager
def running(pipe, max_batch: int = 32, **options):
    """A server on a free port, answering from a thread; local files allowed under the assets."""
    with serve_helpers.running(pipe, max_batch, **{"allowed_local_media_path": str(ASSETS), **options}) as server:
        yield server


@pytest.fixture(scope="module")
def server(pipe):
    with running(pipe) as s:
        yield s


def chat(url: str, text: str = QUESTION, **fields) -> dict:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "minigpt4-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": TOKENS, **fields}


def request(server, path: str, body=None, raw: bytes | None = None, method=None, headers=None):
    """(status, headers, body bytes); a POST when there is a body."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post(server, body=None, raw=None, headers=None) -> tuple[int, dict]:
    status, _, data = request(server, "/v1/chat/completions", body, raw, headers=headers)
    return status, json.loads(data)


def alone(pipe, photo, text=QUESTION, **overrides):
    return pipe([photo], [text], pipe.generation_config(**{"max_new_tokens": TOKENS, **overrides}))


def test_answer_equals_the_pipeline_s_in_openai_shape(server, pipe, photo):
    status, out = post(server, chat(data_url(photo)))
    ref = alone(pipe, photo)
    assert status == 200 and out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == "minigpt4-tiny" and isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ref.texts[0]} and ref.texts[0]
    assert choice["finish_reason"] == ref.finish_reasons[0]
    n = len(ref.token_ids[0])
    assert out["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": n, "total_tokens": ref.prompt_tokens + n}
    assert {"queue_and_ttft_ms", "decode_ms", "ms_per_token"} <= out["vlmrt"]["timings"].keys()


def test_stop_strings_cut_the_answer(server, pipe, photo):
    words = alone(pipe, photo).texts[0].split(" ")
    status, out = post(server, chat(data_url(photo), stop=[" " + words[2]]))
    assert status == 200 and out["choices"][0]["message"]["content"] == " ".join(words[:2])
    assert out["choices"][0]["finish_reason"] == "stop"


def test_num_beams_answers_with_beam_search(server, pipe, photo):
    ref = alone(pipe, photo, num_beams=3, repetition_penalty=1.2)
    status, out = post(server, chat(data_url(photo), num_beams=3, repetition_penalty=1.2))
    assert status == 200 and out["choices"][0]["message"]["content"] == ref.texts[0]
    assert out["usage"]["completion_tokens"] == len(ref.token_ids[0])


def test_a_seed_reproduces_a_sampled_answer(server, photo):
    body = chat(data_url(photo), temperature=1.0, top_p=0.9, seed=7)
    answers = {post(server, body)[1]["choices"][0]["message"]["content"] for _ in range(2)}
    assert len(answers) == 1


def test_n_choices_are_n_seeded_requests_streamed_or_not(server, photo):
    body = chat(data_url(photo), temperature=1.0, seed=7)
    singles = [post(server, {**body, "seed": 7 + i})[1] for i in range(3)]
    status, out = post(server, {**body, "n": 3})
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in out["choices"]] == [s["choices"][0]["message"]["content"] for s in singles]
    assert out["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]  # the prompt counts once
    assert out["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    chunks, last = stream(server, {**body, "n": 3, "stream_options": {"include_usage": True}})
    pieces = {i: "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                         if c["choices"] and c["choices"][0]["index"] == i) for i in range(3)}
    assert last == "data: [DONE]" and pieces == {i: c["message"]["content"] for i, c in enumerate(out["choices"])}
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]) == 3
    assert chunks[-1]["usage"] == out["usage"]


def stream(server, body) -> tuple[list, str]:
    """The decoded `data:` events of a streamed answer, and the last raw event."""
    status, headers, data = request(server, "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]], events[-1]


def test_stream_chunks_add_up_to_the_answer_and_end_with_done(server, photo):
    body = chat(data_url(photo), stream_options={"include_usage": True})
    chunks, last = stream(server, body)
    _, whole = post(server, body)
    assert last == "data: [DONE]"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(bool(p) for p in pieces) > 1  # more than one piece: streamed, not sent whole
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def _url(url: str):
    return lambda photo: chat(url)


def _five_images(photo) -> dict:  # minigpt4 takes at most 4 per prompt
    body = chat(data_url(photo))
    body["messages"][0]["content"] += [body["messages"][0]["content"][1]] * 4
    return body


def _last(role: str):
    return lambda photo: {"messages": chat(data_url(photo))["messages"] + [{"role": role, "content": "hi"}]}


BAD = {  # case: (photo -> body, what the message says)
    "not JSON": (lambda photo: b"{not json", "not valid JSON"),
    "no messages": (lambda photo: {"max_tokens": 4}, "`messages` must be a non-empty list"),
    "no user message": (lambda photo: {"messages": [{"role": "system", "content": "hi"}]}, "no message has role `user`"),
    "assistant last": (_last("assistant"), "the last message must be the user's"),
    "tool message": (_last("tool"), "unsupported message role"),
    "five images": (_five_images, "have 5 images; minigpt4-tiny takes at most 4 images per request"),
    "no question": (lambda photo: chat(data_url(photo), "  "), "has no question"),
    "undecodable image": (_url("data:image/png;base64," + base64.b64encode(b"not a picture").decode()), "does not hold an image"),
    "bad base64": (_url("data:image/png;base64,@@@@"), "not valid base64"),
    "remote URL": (_url("https://example.com/cat.png"), "--allowed-media-domains HOST"),
    "prompt too long": (lambda photo: chat(data_url(photo), "the " * 600), "shorten the prompt"),
    "bad max_tokens": (lambda photo: chat(data_url(photo), max_tokens=0), "`max_tokens` must be an integer >= 1"),
    "bad temperature": (lambda photo: chat(data_url(photo), temperature="hot"), "`temperature` must be a number"),
    "bad n": (lambda photo: chat(data_url(photo), n=0), "`n` must be an integer in [1, 16]"),
    "n with beams": (lambda photo: chat(data_url(photo), n=2, num_beams=2), "beam search gives one answer"),
    "tools": (lambda photo: chat(data_url(photo), tools=[{"type": "function", "function": {"name": "f"}}]),
              "`tools` is not supported"),
    "response_format": (lambda photo: chat(data_url(photo), response_format={"type": "json_object"}),
                        "`response_format` is not supported"),
    "beams with sampling": (lambda photo: chat(data_url(photo), num_beams=3, temperature=0.7), "set `temperature` to 0"),
    "bad num_beams": (lambda photo: chat(data_url(photo), num_beams=0), "`num_beams` must be an integer in [1, 16]"),
    "empty stop": (lambda photo: chat(data_url(photo), stop=[""]), "`stop` must be"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_400_that_says_what_is_wrong(case, server, photo):
    body = BAD[case][0](photo)
    status, out = post(server, raw=body) if isinstance(body, bytes) else post(server, body)
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error" and BAD[case][1] in out["error"]["message"], out
    assert " object at 0x" not in out["error"]["message"], out  # no Python object reprs in what a client reads


def test_an_unknown_model_is_a_404_model_not_found(server, photo):
    status, out = post(server, {**chat(data_url(photo)), "model": "gpt-4o"})
    assert status == 404 and out["error"]["code"] == "model_not_found" and "minigpt4-tiny" in out["error"]["message"]
    status, _, data = request(server, "/v1/models/gpt-4o")
    assert status == 404 and json.loads(data)["error"]["code"] == "model_not_found"


def test_local_files_only_under_the_allowed_folder_and_missing_looks_like_forbidden(server, pipe, photo, tmp_path):
    ref = alone(pipe, photo, max_new_tokens=3).texts[0]
    for url in (str(photo), photo.as_uri(), photo.name):  # a relative path is taken under the folder
        status, out = post(server, {**chat(url, max_tokens=None), "max_completion_tokens": 3})
        assert status == 200 and out["choices"][0]["message"]["content"] == ref, url
    (tmp_path / "secret.png").write_bytes(photo.read_bytes())
    answers = set()
    for path in ("/etc/passwd", str(tmp_path / "secret.png"), str(ASSETS / "missing.png"), "../../etc/passwd"):
        status, out = post(server, chat(path))
        assert status == 400, path
        answers.add(out["error"]["message"].replace(path, "PATH"))
    assert len(answers) == 1 and "--allowed-local-media-path" in answers.pop()


def test_without_the_folder_no_local_file_is_read(pipe, photo):
    with running(pipe, allowed_local_media_path="") as server:
        status, out = post(server, chat(str(photo)))
    assert status == 400 and "not available" in out["error"]["message"]


@contextlib.contextmanager
def image_host(photo):
    """A loopback HTTP server: /photo.jpg, /slow.jpg (trickles for 2 s), /big.jpg, /moved, /missing."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                self._answer()
            except OSError:  # the fetcher gave up and closed the connection
                pass

        def _answer(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/photo.jpg")
                self.end_headers()
                return
            body = {"/photo.jpg": photo.read_bytes(), "/slow.jpg": b"x" * 20, "/big.jpg": b"x" * 300_000}.get(self.path)
            if body is None:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 1 if self.path == "/slow.jpg" else len(body)):
                self.wfile.write(body[i:i + (1 if self.path == "/slow.jpg" else len(body))])
                self.wfile.flush()
                if self.path == "/slow.jpg":
                    time.sleep(0.1)

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host.daemon_threads, host.block_on_close = True, False
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{host.server_address[1]}"
    finally:
        host.shutdown()
        host.server_close()


def test_http_images_only_from_allowed_hosts_with_a_timeout_and_a_size_limit(pipe, photo):
    ref = alone(pipe, photo).texts[0]
    with image_host(photo) as url, running(pipe, allowed_media_domains=("127.0.0.1",), image_fetch_timeout_s=0.5,
                                           max_body_mib=0.25) as server:
        status, out = post(server, chat(url + "/photo.jpg"))
        assert status == 200 and out["choices"][0]["message"]["content"] == ref
        for path, message in (("/slow.jpg", "took longer than 0.5 s"), ("/big.jpg", "larger than 262144 bytes"),
                              ("/moved", "answered HTTP 302"), ("/missing", "answered HTTP 404")):
            status, out = post(server, chat(url + path))
            assert status == 400 and message in out["error"]["message"], (path, out)
        status, out = post(server, chat(url.replace("127.0.0.1", "localhost") + "/photo.jpg"))
        assert status == 400 and "'localhost' is not in the server's --allowed-media-domains" in out["error"]["message"]


def test_history_and_a_system_message_go_through_the_family_s_template(server, pipe, photo):
    from vlmrt.processor import Conversation

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(photo)}},
                                             {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A photo."}, {"role": "user", "content": "Of whom?"}]
    status, out = post(server, {"messages": messages, "max_tokens": TOKENS})
    conv = Conversation((("user", "What is this?"), ("assistant", "A photo."), ("user", "Of whom?")), "Be brief.", 0)
    ref = pipe([photo], [conv], pipe.generation_config(max_new_tokens=TOKENS))
    assert status == 200 and out["choices"][0]["message"]["content"] == ref.texts[0]
    assert out["usage"]["prompt_tokens"] == ref.row_prompt_tokens[0]
    last_only = pipe([photo], [Conversation((("user", "Of whom?"),), "Be brief.", 0)], pipe.generation_config(max_new_tokens=1))
    assert ref.row_prompt_tokens[0] > last_only.row_prompt_tokens[0] + 4  # the history is in the prompt
    assert ref.row_prompt_tokens[0] < alone(pipe, photo, "Of whom?").row_prompt_tokens[0]  # the short system replaced the default


def test_images_in_two_user_messages_go_each_in_its_turn(server, pipe):
    from vlmrt.processor import Conversation
    from vlmrt.serve_media import load_image_url

    urls = [_noise_url(5), _noise_url(6)]  # images no other test sends: both miss the image cache
    before = request(server, "/metrics")[2].decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[0]}},
                                             {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A photo."},
                {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                             {"type": "image_url", "image_url": {"url": urls[1]}}]}]
    status, out = post(server, {"messages": messages, "max_tokens": TOKENS})
    conv = Conversation((("user", "What is this?"), ("assistant", "A photo."), ("user", "And this?")), image_turns=(0, 2))
    images = [load_image_url(u) for u in urls]
    ref = pipe([images], [conv], pipe.generation_config(max_new_tokens=TOKENS))
    assert status == 200 and out["choices"][0]["message"]["content"] == ref.texts[0]
    assert out["usage"]["prompt_tokens"] == ref.row_prompt_tokens[0]
    after = request(server, "/metrics")[2].decode()
    assert _metric(after, "vlmrt_image_cache_misses") - _metric(before, "vlmrt_image_cache_misses") == 2  # one each
    one = pipe([images[0]], [Conversation(conv.turns, image_turn=0)], pipe.generation_config(max_new_tokens=1))
    assert ref.row_prompt_tokens[0] > one.row_prompt_tokens[0] + pipe.processor.spec.num_image_tokens  # both images in


def test_a_text_only_chat_is_answered(server, pipe):
    from vlmrt.processor import Conversation

    status, out = post(server, {"messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 3})
    ref = pipe([None], [Conversation((("user", "Hello?"),))], pipe.generation_config(max_new_tokens=3))
    assert status == 200 and out["choices"][0]["message"]["content"] == ref.texts[0]


def test_a_prompt_too_long_is_a_400_before_a_stream_starts(server, photo):
    status, headers, data = request(server, "/v1/chat/completions", chat(data_url(photo), "the " * 600, stream=True))
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert "shorten the prompt" in json.loads(data)["error"]["message"]


def test_unknown_path_is_a_404_and_wrong_method_a_405_both_json(server):
    status, _, data = request(server, "/v1/completions", {"prompt": "hi"})
    assert status == 404 and "POST /v1/chat/completions" in json.loads(data)["error"]["message"]
    for method in ("GET", "DELETE"):
        status, headers, data = request(server, "/v1/chat/completions", method=method)
        assert status == 405 and headers["Content-Type"] == "application/json"
        assert json.loads(data)["error"]["message"]


def test_a_body_above_the_limit_is_a_413(pipe, photo):
    with running(pipe, max_body_mib=0.01) as server:
        status, out = post(server, chat(data_url(photo)))
    assert status == 413 and "above the limit" in out["error"]["message"]


def test_a_short_body_times_out_with_a_408(pipe):
    import socket

    with running(pipe, body_timeout_s=0.5) as server:
        host, port = server.sock.getsockname()[:2]
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"messages\":")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
            answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive" in answer


def test_a_full_queue_is_a_503_with_retry_after(pipe, photo):
    with running(pipe, max_batch=1, max_queue=0) as server:
        body = chat(data_url(photo), max_tokens=300, stream=True)
        req = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as long:
            long.readline()  # the long request holds the only slot
            status, headers, data = request(server, "/v1/chat/completions", chat(data_url(photo)))
        too_many = post(server, chat(data_url(photo), n=2))  # never fits: a 400, not a retry
    assert status == 503 and headers["Retry-After"] == "1" and "at capacity" in json.loads(data)["error"]["message"]
    assert too_many[0] == 400 and "more than this server ever holds" in too_many[1]["error"]["message"]


def test_a_request_past_its_timeout_is_stopped_with_a_504(pipe, photo):
    with running(pipe, request_timeout_s=0.5) as server:
        status, out = post(server, chat(data_url(photo), max_tokens=390))
        assert status == 504 and "--request-timeout" in out["error"]["message"]
        for _ in range(100):  # the abort lands with the engine's next step
            metrics = request(server, "/metrics")[2].decode()
            if 'reason="abort"' in metrics:
                break
            time.sleep(0.1)
        health = json.loads(request(server, "/health")[2])
    assert re.search(r'vlmrt_requests_finished_total\{reason="abort"\} 1\.0', metrics), metrics
    assert health["running"] == 0 and health["steps"] < 300  # stopped long before its 390 tokens


def test_an_api_key_is_required_when_set(pipe, photo):
    with running(pipe, api_key="sesame") as server:
        assert post(server, chat(data_url(photo)))[0] == 401
        assert post(server, chat(data_url(photo)), headers={"Authorization": "Bearer nope"})[0] == 401
        assert post(server, chat(data_url(photo)), headers={"Authorization": "Bearer sesame"})[0] == 200
        assert request(server, "/health")[0] == 200  # health and metrics stay open, as in vLLM


def _noise_url(seed: int) -> str:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_failing_step_answers_500_and_the_server_lives_on(server, pipe, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(pipe.runtime, "encode_images", broken)
    status, out = post(server, chat(_noise_url(1)))  # an image not in the cache
    assert status == 500 and out["error"]["type"] == "server_error" and "simulated fault" in out["error"]["message"]
    assert "Traceback" in capsys.readouterr().err  # the operator sees it
    monkeypatch.undo()
    status, out = post(server, chat(_noise_url(1)))
    assert status == 200 and out["usage"]["completion_tokens"] == TOKENS


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_metrics_count_tokens_and_image_cache_hits(server):
    before = request(server, "/metrics")[2].decode()
    for _ in range(2):
        assert post(server, chat(_noise_url(2)))[0] == 200
    after = request(server, "/metrics")[2].decode()
    assert _metric(after, "vlmrt_image_cache_misses") - _metric(before, "vlmrt_image_cache_misses") == 1
    assert _metric(after, "vlmrt_image_cache_hits") - _metric(before, "vlmrt_image_cache_hits") == 1
    assert _metric(after, "vlmrt_generation_tokens_total") - _metric(before, "vlmrt_generation_tokens_total") == 2 * TOKENS
    assert _metric(after, "vlmrt_time_to_first_token_seconds_count") >= 2
    assert _metric(after, "vlmrt_kv_slots_total") >= 1 and "vlmrt_inter_token_latency_seconds_bucket" in after
    assert _metric(after, "vlmrt_requests_running") >= 0 and _metric(after, "vlmrt_requests_waiting") >= 0


def test_a_cached_image_gives_the_same_answer(server, photo):
    answers = {post(server, chat(data_url(photo)))[1]["choices"][0]["message"]["content"] for _ in range(2)}
    assert len(answers) == 1


def test_health_and_models(server):
    status, _, data = request(server, "/health")
    health = json.loads(data)
    assert status == 200 and health["status"] == "ok" and health["model"] == "minigpt4-tiny"
    assert health["synthetic_weights"] is True and health["requests"] >= 1 and health["queued"] == 0
    status, _, data = request(server, "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(data)["data"]] == ["minigpt4-tiny"]
    status, _, data = request(server, "/v1/models/minigpt4-tiny")
    assert status == 200 and json.loads(data)["id"] == "minigpt4-tiny"


@pytest.mark.parametrize("options, message", [
    ({"body_timeout_s": 0}, "--body-timeout must be above 0"),
    ({"max_queue": -1}, "--max-queue"),
    ({"allowed_local_media_path": "/no/such/folder"}, "is not a folder"),
    ({"allowed_media_domains": ("https://example.com",)}, "takes host names"),
])
def test_bad_server_options_are_refused_before_listening(pipe, options, message):
    with pytest.raises(VlmrtError, match=message):
        make_server(pipe, "127.0.0.1", 0, ServeOptions(**options))


def test_without_the_serve_extra_the_error_names_it(monkeypatch):
    from vlmrt.serve import require_serve_extra

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails
    with pytest.raises(VlmrtError, match=r"uvicorn: pip install 'vlmrt\[serve\]'"):
        require_serve_extra()


def test_the_command_prints_its_url_answers_and_stops_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "vlmrt", "serve", "--model", "minigpt4-tiny", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        banner = proc.stderr.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", banner)
        assert url and "synthetic weights" in banner and "meaningless" in banner, banner
        with urllib.request.urlopen(url.group() + "/health", timeout=120) as r:  # generous: CI machines are shared
            assert json.loads(r.read())["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0  # not -6: handler threads are joined before the interpreter exits
        assert "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
