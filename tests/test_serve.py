"""`vlmrt serve`: OpenAI-shaped answers equal to the Pipeline's, streaming, dynamic batching, every bad
input's 400, a worker failure's 500, and the command itself started and stopped with Ctrl-C."""

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from conftest import load_tiny
from vlmrt.pipeline import Pipeline
from vlmrt.serve import make_server

TOKENS = 8
QUESTION = "Describe this image."

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(load_tiny("minigpt4-tiny"))


@contextlib.contextmanager
def running(pipe, **batching):
    """A server on a free port, answering from a thread."""
    server = make_server(pipe, "127.0.0.1", 0, quiet=True, **batching)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def server(pipe):
    with running(pipe) as s:
        yield s


def data_url(path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def chat(url: str, text: str = QUESTION, **fields) -> dict:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "minigpt4-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": TOKENS, **fields}


def request(server, path: str, body=None, raw: bytes | None = None):
    """(status, headers, body bytes); a POST when there is a body."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post(server, body=None, raw=None) -> tuple[int, dict]:
    status, _, data = request(server, "/v1/chat/completions", body, raw)
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
    assert {"vision_ms", "prefill_ms", "ttft_ms", "ms_per_token"} <= out["vlmrt"]["timings"].keys()
    assert out["vlmrt"]["batch_size"] == 1


def test_image_as_a_path_or_file_url_and_max_completion_tokens(server, pipe, photo):
    ref = alone(pipe, photo, max_new_tokens=3).texts[0]
    for url in (str(photo), photo.as_uri()):
        status, out = post(server, {**chat(url, max_tokens=None), "max_completion_tokens": 3})
        assert status == 200 and out["choices"][0]["message"]["content"] == ref, url
        assert out["usage"]["completion_tokens"] == 3


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


def stream(server, body) -> tuple[list, str]:
    """The decoded `data:` events of a streamed answer, and the last raw event."""
    status, headers, data = request(server, "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
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


def post_together(server, bodies) -> list:
    """Send the bodies at the same moment from threads; the answers, in order."""
    answers = [None] * len(bodies)
    go = threading.Barrier(len(bodies))

    def send(i):
        go.wait()
        answers[i] = post(server, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def test_concurrent_requests_with_equal_settings_share_one_batch(pipe, photo):
    prompts = [QUESTION, "What is the person in the picture holding?"]  # different lengths: left padding
    with running(Pipeline(pipe.loaded), max_batch=2, batch_wait_ms=3000) as server:
        answers = post_together(server, [chat(data_url(photo), p) for p in prompts])
        assert server.worker.batches == 1 and server.worker.largest_batch == 2
    for (status, out), prompt in zip(answers, prompts):
        ref = alone(pipe, photo, prompt)
        assert status == 200 and out["vlmrt"]["batch_size"] == 2
        assert out["choices"][0]["message"]["content"] == ref.texts[0]
        assert out["usage"]["prompt_tokens"] == ref.prompt_tokens  # the row's own length, not the padded one


def test_a_bad_request_in_a_batch_fails_alone(pipe, photo):
    """A prompt too long for the context fails the whole batch; each row is then run alone."""
    with running(Pipeline(pipe.loaded), max_batch=2, batch_wait_ms=3000) as server:
        (good, good_out), (bad, bad_out) = post_together(server, [chat(data_url(photo)), chat(data_url(photo), "the " * 600)])
        assert server.worker.largest_batch == 2 and server.worker.batches == 3  # the batch, then each alone
    assert good == 200 and good_out["choices"][0]["message"]["content"] == alone(pipe, photo).texts[0]
    assert bad == 400 and "shorten the prompt" in bad_out["error"]["message"]


def test_requests_with_different_settings_run_in_separate_batches(pipe, photo):
    with running(Pipeline(pipe.loaded), max_batch=2, batch_wait_ms=200) as server:
        answers = post_together(server, [chat(data_url(photo), max_tokens=n) for n in (3, 4)])
        assert server.worker.batches == 2
    assert [out["usage"]["completion_tokens"] for _, out in answers] == [3, 4]
    assert all(out["vlmrt"]["batch_size"] == 1 for _, out in answers)


def _url(url: str):
    return lambda photo: chat(url)


def _two_images(photo) -> dict:
    body = chat(data_url(photo))
    body["messages"][0]["content"].append(body["messages"][0]["content"][1])
    return body


BAD = {  # case: (photo -> body, what the message says)
    "not JSON": (lambda photo: b"{not json", "not valid JSON"),
    "no messages": (lambda photo: {"max_tokens": 4}, "`messages` must be a non-empty list"),
    "no user message": (lambda photo: {"messages": [{"role": "system", "content": "hi"}]}, "no message has role `user`"),
    "no image": (lambda photo: {"messages": [{"role": "user", "content": "What is this?"}]}, "has no image"),
    "two images": (_two_images, "has 2 images"),
    "no question": (lambda photo: chat(data_url(photo), "  "), "has no question"),
    "undecodable image": (_url("data:image/png;base64," + base64.b64encode(b"not a picture").decode()), "does not hold an image"),
    "bad base64": (_url("data:image/png;base64,@@@@"), "not valid base64"),
    "missing file": (_url("/no/such/image.png"), "image not found"),
    "remote URL": (_url("https://example.com/cat.png"), "not fetched"),
    "prompt too long": (lambda photo: chat(data_url(photo), "the " * 600), "shorten the prompt"),
    "bad max_tokens": (lambda photo: chat(data_url(photo), max_tokens=0), "`max_tokens` must be an integer >= 1"),
    "bad temperature": (lambda photo: chat(data_url(photo), temperature="hot"), "`temperature` must be a number"),
    "n above 1": (lambda photo: chat(data_url(photo), n=2), "`n` is not supported"),
    "beams with sampling": (lambda photo: chat(data_url(photo), num_beams=3, temperature=0.7), "set `temperature` to 0"),
    "bad num_beams": (lambda photo: chat(data_url(photo), num_beams=0), "`num_beams` must be an integer in [1, 16]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_400_that_says_what_is_wrong(case, server, photo):
    body = BAD[case][0](photo)
    status, out = post(server, raw=body) if isinstance(body, bytes) else post(server, body)
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error" and BAD[case][1] in out["error"]["message"], out


def test_a_prompt_too_long_is_a_400_before_a_stream_starts(server, photo):
    status, headers, data = request(server, "/v1/chat/completions", chat(data_url(photo), "the " * 600, stream=True))
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert "shorten the prompt" in json.loads(data)["error"]["message"]


def test_unknown_path_is_a_404_and_wrong_method_a_405(server):
    status, _, data = request(server, "/v1/completions", {"prompt": "hi"})
    assert status == 404 and "POST /v1/chat/completions" in json.loads(data)["error"]["message"]
    assert request(server, "/v1/chat/completions")[0] == 405


def test_a_failing_batch_answers_500_and_the_server_lives_on(server, pipe, photo, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(pipe.runtime, "encode_images", broken)
    status, out = post(server, chat(data_url(photo)))
    assert status == 500 and out["error"]["type"] == "server_error" and "simulated fault" in out["error"]["message"]
    assert "Traceback" in capsys.readouterr().err  # the operator sees it
    monkeypatch.undo()
    status, out = post(server, chat(data_url(photo)))
    assert status == 200 and out["choices"][0]["message"]["content"] == alone(pipe, photo).texts[0]


def test_health_and_models(server):
    status, _, data = request(server, "/health")
    health = json.loads(data)
    assert status == 200 and health["status"] == "ok" and health["model"] == "minigpt4-tiny"
    assert health["synthetic_weights"] is True and health["batches"] >= 1 and health["queued"] == 0
    status, _, data = request(server, "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(data)["data"]] == ["minigpt4-tiny"]


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
