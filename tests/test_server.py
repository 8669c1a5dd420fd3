"""The OpenAI-compatible HTTP server, end to end: a real `dgemma serve` subprocess on the tiny preset, driven by
the official openai client and raw httpx (errors, SSE, the drafts extension, auth, metrics, disconnects, drain)."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest

from server_utils import ServerProcess, assert_openai_error, metric_value, sse_events

openai = pytest.importorskip("openai")

FAST = {"max_denoising_steps": 4}  # extra_body: keep the tiny model quick
SLOW = {"max_denoising_steps": 1000, "stability_threshold": 1_000_000}  # one canvas takes many seconds
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a haiku about diffusion."}]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from dgemma.presets import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("server-tiny") / "tiny")


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = ServerProcess(tiny_ckpt, tmp_path_factory.mktemp("server-log") / "server.log",
                        "--model-name", "dgemma-tiny")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base, timeout=60) as c:
        yield c


def _healthy(server) -> None:
    r = httpx.get(server.base + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text


# ==============================================================================================================
# models, completions, chat
# ==============================================================================================================
def test_models(client, http):
    models = client.models.list().data
    assert [m.id for m in models] == ["dgemma-tiny"]
    assert models[0].owned_by == "dgemma" and models[0].object == "model"
    assert client.models.retrieve("dgemma-tiny").id == "dgemma-tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert_openai_error(http.get("/v1/models/gpt-4"), 404, "gpt-4", "dgemma-tiny")


def test_completion_and_usage(client, tiny_ckpt):
    from dgemma.tokenizer import Tokenizer

    n_prompt = len(Tokenizer.from_dir(tiny_ckpt).encode("Once upon a time"))
    r = client.completions.create(model="dgemma-tiny", prompt="Once upon a time", max_tokens=40, seed=3,
                                  extra_body=FAST)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "dgemma-tiny"
    assert isinstance(r.created, int) and len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and isinstance(c.text, str)
    u = r.usage
    assert u.prompt_tokens == n_prompt
    assert 0 <= u.completion_tokens <= 40 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    if c.finish_reason == "length":
        assert u.completion_tokens == 40
    # token-id prompt; temperature 0 (clamped to a floor by the engine) is accepted
    r2 = client.completions.create(model="dgemma-tiny", prompt=[2, 300, 301, 302], max_tokens=8, seed=1,
                                   temperature=0, extra_body=FAST)
    assert r2.usage.prompt_tokens == 4


@pytest.mark.parametrize("max_tokens", [1, 15, 17, 33])
def test_max_tokens_exact(client, max_tokens):
    r = client.completions.create(model="dgemma-tiny", prompt="Hello", max_tokens=max_tokens, seed=7,
                                  extra_body=FAST)
    n = r.usage.completion_tokens
    assert n <= max_tokens
    if r.choices[0].finish_reason == "length":
        assert n == max_tokens


def test_completion_stream_equals_non_stream(client):
    kw = dict(model="dgemma-tiny", prompt="The morning fog", max_tokens=40, seed=11, extra_body=FAST)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(ch.id == chunks[0].id for ch in chunks) and chunks[0].id.startswith("cmpl-")
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert "".join(texts) == full.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    # at most one content chunk per committed canvas (canvas_length 16), plus held-back text at the end
    assert len([t for t in texts if t]) <= -(-full.usage.completion_tokens // 16) + 1


def test_chat_stream_equals_non_stream(client):
    kw = dict(model="dgemma-tiny", messages=CHAT, max_tokens=48, seed=5, extra_body=FAST)
    full = client.chat.completions.create(**kw)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 10 and full.usage.completion_tokens <= 48
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(ch.usage is None for ch in chunks)  # no include_usage: no usage chunk
    # max_completion_tokens is honoured too; content given as text parts works
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    r = client.chat.completions.create(model="dgemma-tiny", messages=parts, max_completion_tokens=5, seed=1,
                                       extra_body=FAST)
    assert r.usage.completion_tokens <= 5


def test_stop_strings(client):
    base = dict(model="dgemma-tiny", prompt="A train left the station", max_tokens=48, seed=21, extra_body=FAST)
    text = client.completions.create(**base).choices[0].text
    m = re.search(r"[a-z]{3}", text[4:])
    if m is None:
        pytest.skip(f"no ASCII word in the sample to stop at: {text!r}")
    stop = m.group(0)
    cut = text.find(stop)
    r = client.completions.create(stop=[stop, "\x00never"], **base)
    out = r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    assert stop not in out and text.startswith(out) and len(out) <= cut
    assert r.usage.completion_tokens < 48
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(stop=stop, stream=True, **base)
                       if ch.choices)
    assert streamed == out


def test_drafts_extension(server, http):
    body = {"model": "dgemma-tiny", "messages": CHAT, "max_tokens": 32, "seed": 2, "stream": True,
            "stream_drafts": True, "max_denoising_steps": 3}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    drafts = [c["choices"][0] for c in chunks if "draft" in c["choices"][0]]
    assert drafts, chunks
    for d in drafts:
        assert d["delta"] == {} and d["finish_reason"] is None
        assert set(d["draft"]) == {"text", "step", "canvas"} and isinstance(d["draft"]["text"], str)
        assert 1 <= d["draft"]["step"] <= 3 and d["draft"]["canvas"] in (0, 1)
    assert 0 in {d["draft"]["canvas"] for d in drafts}
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    plain = dict(body, stream=False, stream_drafts=False)
    assert streamed == http.post("/v1/chat/completions", json=plain).json()["choices"][0]["message"]["content"]
    # completions: drafts carry text ""
    body = {"prompt": "Hello", "max_tokens": 16, "seed": 2, "stream": True, "stream_drafts": True,
            "max_denoising_steps": 2}
    with http.stream("POST", "/v1/completions", json=body) as r:
        chunks = [e for e in sse_events(r) if e != "[DONE]"]
    drafts = [c["choices"][0] for c in chunks if "draft" in c["choices"][0]]
    assert drafts and all(d["text"] == "" for d in drafts)


# ==============================================================================================================
# errors
# ==============================================================================================================
LONG_PROMPT = [2] + [300] * 4089  # 4090 tokens; + 16 > the 4096 context

BAD_REQUESTS = [
    # (method, path, json body or raw bytes, status, message needles, param)
    ("POST", "/v1/completions", b'{"prompt": "x",', 400, ["parse", "JSON"], None),
    ("POST", "/v1/completions", b"", 400, ["empty"], None),
    ("POST", "/v1/completions", [1, 2], 400, ["JSON object"], None),
    ("POST", "/v1/completions", {"model": "dgemma-tiny"}, 400, ["prompt"], "prompt"),
    ("POST", "/v1/chat/completions", {"model": "dgemma-tiny"}, 400, ["messages"], "messages"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "8"}, 400, ["max_tokens", "integer"], "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, ["stream", "boolean"], "stream"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, ["prompt"], "prompt"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, ["messages", "array"], "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, ["messages[0].content"],
     "messages[0].content"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, ["gpt-4", "does not exist"], "model"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, ["max_tokens", "at least 1"],
     "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, ["max_tokens"], "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, ["max_tokens", "context", "4096"],
     "max_tokens"),
    ("POST", "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 16}, 400, ["4090", "4096"], "<any>"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, ["temperature"], "temperature"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 2}, 400, ["n=2", "not supported"], "n"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, 400,
     ["not supported"], "n"),
    ("POST", "/v1/completions", {"prompt": "x", "top_p": 0.9}, 400, ["top_p", "not supported"], "top_p"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, ["batched prompts", "not supported"], "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, ["stop", "4"], "stop"),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 2}, 400, ["logprobs", "not supported"], "logprobs"),
    ("POST", "/v1/completions", {"prompt": [5, 99999]}, 400, ["99999", "vocabulary"], "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "entropy_bound": -1}, 400, ["entropy_bound"], "<any>"),
    ("POST", "/v1/completions", {"prompt": "x", "max_denoising_steps": 0}, 400, ["max_denoising_steps"], "<any>"),
    ("POST", "/v1/completions", {"prompt": "x", "sampler": "greedy"}, 400, ["sampler", "'fast'", "'reference'"],
     "sampler"),
    ("POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     400, ["image_url", "not supported", "text-only"], "messages[0].content[1]"),
    ("POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, ["tools", "not supported"], "tools"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, ["alternate"],
     "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, ["wizard"],
     "messages[0].role"),
    # the body itself: nesting, encoding, numbers (issue 15)
    ("POST", "/v1/completions", b"[" * 100_000, 400, ["nested too deeply", "64"], None),
    ("POST", "/v1/completions", b'{"prompt": "x", "metadata": ' + b"[" * 70 + b"]" * 70 + b"}", 400,
     ["nested too deeply"], None),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 4}', 400, ["'prompt'", "surrogate", "\\ud800"],
     "prompt"),
    ("POST", "/v1/completions", b'{"prompt": ["ab\\udfff"]}', 400, ["surrogate"], "prompt[0]"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', 400,
     ["'messages[0].content'", "surrogate", "character 3"], "messages[0].content"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', 400, ["surrogate"],
     "messages[0].content[0].text"),
    ("POST", "/v1/completions", b'{"prompt": "x", "stop": "\\ud800"}', 400, ["'stop'", "surrogate"], "stop"),
    ("POST", "/v1/completions", b'{"prompt": "x", "stop": ["ok", "\\ud800"]}', 400, ["surrogate"], "stop[1]"),
    ("POST", "/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', 400, ["surrogate"], "model"),
    ("POST", "/v1/completions", b'{"prompt": "x", "t_max": 1e999}', 400, ["1e999", "range"], None),
    ("POST", "/v1/completions", b'{"prompt": "x", "t_max": NaN}', 400, ["NaN"], None),
    # the prompt
    ("POST", "/v1/completions", {"prompt": ""}, 400, ["empty string", "[2]"], "prompt"),
    ("POST", "/v1/completions", {"prompt": [""]}, 400, ["empty string"], "prompt"),
    ("POST", "/v1/completions", {"prompt": []}, 400, ["empty"], "prompt"),
    # degenerate sampler settings: refused at validation, not aborted by the engine (503)
    ("POST", "/v1/completions", {"prompt": "x", "t_min": 0, "t_max": 1e-300}, 400,
     ["t_max=1e-300", "last step's temperature", "at least 1e-06"], "t_max"),
    ("POST", "/v1/completions", {"prompt": "x", "t_min": 0, "t_max": 1e-300, "sampler": "reference"}, 400,
     ["last step's temperature"], "t_max"),
    ("POST", "/v1/completions", {"prompt": "x", "t_min": 0, "t_max": 1e-4, "temperature": 0}, 400,
     ["last step's temperature", "scaled by temperature=0"], "t_max"),
    ("POST", "/v1/completions", {"prompt": "x", "t_min": 1e300, "t_max": 2e300}, 400, ["t_max", "1e+06"], "t_max"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": 2, "t_max": 1e6}, 400, ["1e+06", "temperature=2"],
     "t_max"),
    ("POST", "/v1/completions", {"prompt": "x", "t_min": -0.1}, 400, ["t_min", ">= 0"], "t_min"),
    ("POST", "/v1/completions", {"prompt": "x", "confidence_threshold": 0}, 400, ["confidence_threshold"],
     "confidence_threshold"),
    ("POST", "/v1/completions", {"prompt": "x", "stability_threshold": -1}, 400, ["stability_threshold"],
     "stability_threshold"),
    ("POST", "/v1/completions", {"prompt": "x", "max_denoising_steps": 2**64}, 400, ["at most 1024"],
     "max_denoising_steps"),
    ("POST", "/v1/completions", {"prompt": "x", "max_denoising_steps": 1.5}, 400, ["integer"],
     "max_denoising_steps"),
    ("GET", "/v1/nothing-here", None, 404, ["unknown route", "/v1/nothing-here"], None),
    ("GET", "/v1/completions", None, 405, ["GET", "not allowed"], None),
    ("DELETE", "/v1/models", None, 405, ["not allowed"], None),
]


@pytest.mark.parametrize("method,path,body,status,needles,param", BAD_REQUESTS,
                         ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD_REQUESTS)])
def test_errors(server, http, method, path, body, status, needles, param):
    if isinstance(body, bytes):
        r = http.request(method, path, content=body, headers={"content-type": "application/json"})
    elif body is None:
        r = http.request(method, path)
    else:
        r = http.request(method, path, json=body)
    assert_openai_error(r, status, *needles, param=param)
    _healthy(server)


def test_body_over_the_limit_is_refused_before_parsing(server, http):
    """413 by Content-Length, and by counting a chunked body (no Content-Length); the server stays healthy."""
    from dgemma.server.app import MAX_BODY_BYTES

    big = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert_openai_error(r, 413, "too large", f"{len(big):,} bytes", "8 MiB", param=None)
    assert r.json()["error"]["code"] == "body_too_large"

    def chunked():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 2**20 + 1):
            yield b"a" * 2**20
        yield b'"}'

    r = http.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, "too large", "more than", param=None)
    _healthy(server)
    # just under the limit is parsed (and then refused for its length, not its size)
    ids = "[" + ",".join(["5"] * 5000) + "]"
    r = http.post("/v1/completions", content=f'{{"prompt": {ids}, "max_tokens": 4}}'.encode(),
                  headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "5000", "4096", param="<any>")
    _healthy(server)


def test_any_content_type_is_parsed_as_json(http):
    """As OpenAI's API does, the body is read as JSON whatever the Content-Type says (documented)."""
    body = b'{"prompt": "hi", "max_tokens": 4, "seed": 1, "max_denoising_steps": 2}'
    want = http.post("/v1/completions", content=body, headers={"content-type": "application/json"}).json()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        r = http.post("/v1/completions", content=body, headers={"content-type": ctype} if ctype else {})
        assert r.status_code == 200, (ctype, r.text)
        assert r.json()["choices"] == want["choices"]


@pytest.mark.parametrize("sampler", ["fast", "reference"])
def test_extreme_but_valid_sampler_settings_are_served(server, http, sampler):
    """Values beyond fp32's range that the sampler treats as 'always' (accept every position, always confident,
    never stable) are served, and a surrogate pair (one character) is valid text."""
    body = {"prompt": "hi \U0001f600", "max_tokens": 4, "seed": 3, "max_denoising_steps": 3, "sampler": sampler,
            "entropy_bound": 1e300, "confidence_threshold": 1e300, "stability_threshold": 2**64,
            "t_min": 1e-6, "t_max": 2e-6}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    _healthy(server)


def test_openai_client_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="dgemma-tiny", prompt="x", n=2)
    assert "not supported" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    # an error in a streaming request is answered before the stream starts
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="dgemma-tiny", prompt="x", max_tokens=0, stream=True)
    _healthy(server)


def test_unknown_fields_are_ignored(http):
    body = {"model": "dgemma-tiny", "prompt": "x", "max_tokens": 4, "seed": 1, "user": "u1", "some_future_field": 1,
            "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None, "top_p": 1, "n": 1, "echo": False,
            "max_denoising_steps": 2}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


# ==============================================================================================================
# metrics, logging, disconnects
# ==============================================================================================================
def test_metrics_and_request_log(server, client, http):
    r = client.completions.create(model="dgemma-tiny", prompt="metrics", max_tokens=16, seed=1, extra_body=FAST)
    text = http.get("/metrics").text
    for name in ("dgemma_requests_total", "dgemma_prompt_tokens_total", "dgemma_completion_tokens_total",
                 "dgemma_denoising_steps_per_canvas_bucket", "dgemma_tokens_per_forward_bucket",
                 "dgemma_iteration_latency_seconds_bucket", "dgemma_request_latency_seconds_bucket",
                 "dgemma_requests_waiting", "dgemma_requests_running", "dgemma_kv_cache_usage_ratio",
                 "dgemma_kv_cache_blocks_used", "dgemma_kv_cache_blocks_total", "dgemma_requests_rejected_total"):
        assert name in text, name
    assert re.search(r'^dgemma_requests_total\{finish_reason="(length|stop)"\} [1-9]', text, re.MULTILINE)
    assert metric_value(text, "dgemma_completion_tokens_total") >= r.usage.completion_tokens
    assert metric_value(text, "dgemma_kv_cache_blocks_total") > 0
    deadline = time.monotonic() + 5
    while r.id not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(ln for ln in server.log().splitlines() if r.id in ln)
    assert "dgemma.server" in line and f"prompt_tokens={r.usage.prompt_tokens}" in line
    assert f"completion_tokens={r.usage.completion_tokens}" in line and "canvases=" in line
    assert "steps=" in line and "latency_ms=" in line and f"finish_reason={r.choices[0].finish_reason}" in line


def _wait_idle(server, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(server.base + "/metrics", timeout=5).text
        if metric_value(text, "dgemma_requests_running") == 0 and metric_value(text, "dgemma_requests_waiting") == 0:
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_frees_the_slot(server, http):
    """A request of 1000 denoising steps (~10 s) is abandoned by its client: the server closes the engine stream
    and the engine frees the slot within moments (streaming and non-streaming)."""
    body = {"prompt": "Hello", "max_tokens": 16, "seed": 1, "stream": True, "stream_drafts": True, **SLOW}
    with http.stream("POST", "/v1/completions", json=body) as r:
        first = next(sse_events(r))
        assert "draft" in first["choices"][0]
    t0 = time.monotonic()
    assert _wait_idle(server), "the engine kept generating for a disconnected streaming client"
    assert time.monotonic() - t0 < 5
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/completions", json=dict(body, stream=False, stream_drafts=False),
                   timeout=httpx.Timeout(10, read=1.0))
    assert _wait_idle(server), "the engine kept generating for a disconnected client"
    assert server.log().count("cancelled (client disconnected)") >= 2
    _healthy(server)


# ==============================================================================================================
# auth, queue full, SIGTERM drain (a second server: API key, one slot, a queue of one, 1.5 s drain timeout)
# ==============================================================================================================
@pytest.fixture(scope="module")
def limited_server(tiny_ckpt, tmp_path_factory):
    srv = ServerProcess(tiny_ckpt, tmp_path_factory.mktemp("server-log") / "limited.log", "--api-key", "sekret",
                        "--max-num-seqs", "1", "--max-queue", "1", "--drain-timeout", "1.5")
    try:
        yield srv
    finally:
        srv.stop()


def test_auth(limited_server):
    base = limited_server.base
    ok = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0, timeout=60)
    r = ok.completions.create(model="tiny", prompt="Hi", max_tokens=4, seed=1, extra_body=FAST)
    assert r.usage.completion_tokens <= 4  # default model name: the checkpoint directory's name
    assert [m.id for m in ok.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_openai_error(httpx.get(base + "/v1/models"), 401, "API key")
    assert_openai_error(httpx.post(base + "/v1/completions", json={"prompt": "x"},
                                   headers={"Authorization": "Bearer nope"}), 401, "Incorrect API key")
    assert_openai_error(httpx.get(base + "/v1/unknown", headers={"Authorization": "Basic sekret"}), 401)
    assert httpx.get(base + "/health").status_code == 200  # open
    assert "dgemma_requests_total" in httpx.get(base + "/metrics").text  # open (documented)


def test_queue_full_then_sigterm_drain(limited_server):
    srv, auth = limited_server, {"Authorization": "Bearer sekret"}
    slow = {"model": "tiny", "prompt": "Hello", "max_tokens": 16, "seed": 1, **SLOW}
    results: dict[str, object] = {}

    # A: a long streaming request holds the only slot
    a_events: list = []
    a_started = threading.Event()

    def run_a() -> None:
        try:
            with httpx.stream("POST", srv.base + "/v1/completions", json=dict(slow, stream=True, stream_drafts=True),
                              headers=auth, timeout=60) as r:
                results["a_status"] = r.status_code
                for ev in sse_events(r):
                    a_events.append(ev)
                    a_started.set()
        except httpx.HTTPError as e:
            results["a_error"] = repr(e)
        finally:
            a_started.set()

    # B: waits in the queue (non-streaming)
    def run_b() -> None:
        try:
            results["b"] = httpx.post(srv.base + "/v1/completions", json=slow, headers=auth, timeout=60)
        except httpx.HTTPError as e:
            results["b"] = repr(e)

    ta = threading.Thread(target=run_a, daemon=True)
    ta.start()
    assert a_started.wait(30) and a_events, results
    tb = threading.Thread(target=run_b, daemon=True)
    tb.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric_value(httpx.get(srv.base + "/metrics").text, "dgemma_requests_waiting") == 1:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"B never queued: {results}")

    # C: the queue is full -> 429 with Retry-After
    r = httpx.post(srv.base + "/v1/completions", json=slow, headers=auth, timeout=30)
    assert_openai_error(r, 429, "queue")
    assert int(r.headers["retry-after"]) >= 1

    # SIGTERM: health turns 503, new requests get 503, A and B end (aborted after the 1.5 s drain), exit 0
    srv.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while httpx.get(srv.base + "/health").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.02)
    h = httpx.get(srv.base + "/health")
    assert h.status_code == 503 and h.json() == {"status": "draining"}
    r = httpx.post(srv.base + "/v1/completions", json=dict(slow, max_tokens=1), headers=auth, timeout=30)
    assert_openai_error(r, 503, "shutting down")
    assert "retry-after" in r.headers

    assert srv.wait(30) == 0, srv.log()
    ta.join(10)
    tb.join(10)
    assert not ta.is_alive() and not tb.is_alive()
    # A either completed or ended with an error chunk, then [DONE]
    assert results.get("a_status") == 200 and "a_error" not in results, results
    assert a_events[-1] == "[DONE]"
    last = a_events[-2]
    if "error" in last:
        assert last["choices"][0]["finish_reason"] is None
        assert "shutting down" in last["error"]["message"]
    else:
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
    # B either completed or was answered with a 503 error
    b = results["b"]
    assert isinstance(b, httpx.Response), b
    if b.status_code != 200:
        assert_openai_error(b, 503, "aborted")
    assert "drained" in srv.log()
