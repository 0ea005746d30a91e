"""The HTTP gateway on an open network: API keys, validation at the edge, limits, and an API fuzz.

Real stage processes and a real gateway process (Gemma 3 270M on loopback), called over real HTTP
with the official openai SDK and raw sockets.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import asyncio
import collections
import concurrent.futures as cf
import http.client
import json
import random
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from molink_lite.serving.auth import ApiKeys, load_api_keys

from serving import NO_CACHE, GatewayProcess

KEY1 = "test-key-0123456789abcdef"
KEY2 = "second-key-from-a-file-42"
MODEL = "gemma-3-270m-q4_k_m"
# the options of the gemma_stages fixture (conftest.py)
STAGE_ARGS = ["--threads", "1", "--ctx", "2048", "--max-seqs", "8", "--flash-attn", "off"]
GREEDY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
HEADER_TIMEOUT = 2.0


# ---------------------------------------------------------------------- helpers
def request(port: int, method: str, path: str, body: Any = None, *, raw: Optional[bytes] = None,
            key: Optional[str] = KEY1, headers: Optional[Dict[str, str]] = None,
            timeout: float = 120) -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers, body bytes) of one HTTP request on a fresh connection."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(port: int, path: str, body: Any, **kw) -> Tuple[int, Any]:
    status, _, data = request(port, "POST", path, body, **kw)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


def greedy_text(port: int) -> str:
    status, body = post(port, "/v1/completions", GREEDY)
    assert status == 200, body
    return body["choices"][0]["text"]


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gateway(gemma_stages, tmp_path_factory):
    d = tmp_path_factory.mktemp("gw")
    key_file = d / "keys.txt"
    key_file.write_text(f"# API keys of the test\n\n{KEY2}\n")
    gw = GatewayProcess([[s.url for s in gemma_stages]], log_dir=d,
                        extra=[*NO_CACHE, "--api-key", KEY1, "--api-key-file", str(key_file),
                               "--header-timeout", str(HEADER_TIMEOUT), "--max-connections", "64"])
    gw.wait_ready()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def baseline(gateway) -> str:
    """The greedy completion before anything odd was sent."""
    text = greedy_text(gateway.port)
    assert text
    return text


def _client(gateway, key: str):
    from openai import OpenAI

    return OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=120)


# ---------------------------------------------------------------------- API keys
def test_load_api_keys(tmp_path):
    f = tmp_path / "k.txt"
    f.write_text(f"# comment\n\n  {KEY2}  \n{KEY1}\n")
    assert load_api_keys([KEY1], str(f), env={"MOLINK_API_KEY": f" {KEY1}, third-key-abcdefghijk "}) == [
        KEY1, KEY2, "third-key-abcdefghijk"]
    assert load_api_keys([], None, env=False) == []
    assert load_api_keys(None, None, env={"MOLINK_API_KEY": "  "}) == []
    with pytest.raises(ValueError, match="cannot read API key file"):
        load_api_keys([], str(tmp_path / "missing.txt"), env=False)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no keys"):
        load_api_keys([], str(tmp_path / "empty.txt"), env=False)
    with pytest.raises(ValueError, match="too short"):
        load_api_keys(["short"], None, env=False)
    with pytest.raises(ValueError, match="printable ASCII"):
        load_api_keys(["a key with spaces in it"], None, env=False)
    with pytest.raises(ValueError, match="MOLINK_API_KEY"):
        load_api_keys([], None, env={"MOLINK_API_KEY": ",,"})
    keys = ApiKeys([KEY1, KEY2])
    assert keys.check(KEY1) and keys.check(KEY2) and not keys.check(KEY1 + "x") and not keys.check(None)
    assert ApiKeys.bearer(f"Bearer {KEY1}") == KEY1 and ApiKeys.bearer(f"bearer  {KEY1} ") == KEY1
    assert ApiKeys.bearer("Basic abc") is None and ApiKeys.bearer("Bearer ") is None


@pytest.mark.slow
def test_openai_sdk_with_keys(gateway, baseline):
    import openai

    for key in (KEY1, KEY2):
        r = _client(gateway, key).completions.create(**GREEDY)
        assert r.choices[0].text == baseline
    with pytest.raises(openai.AuthenticationError):
        _client(gateway, "wrong-key-0123456789abcdef").completions.create(**GREEDY)
    with pytest.raises(openai.AuthenticationError):
        _client(gateway, KEY1).completions.create(**GREEDY, extra_headers={"Authorization": openai.Omit()})
    with pytest.raises(openai.AuthenticationError):
        _client(gateway, "nope").models.list()
    assert [m.id for m in _client(gateway, KEY1).models.list().data] == [MODEL]


@pytest.mark.slow
def test_only_health_is_open(gateway):
    port = gateway.port
    # open, but without the key it says only up/down: stage addresses, relay tokens and errors need the key
    status, _, body = request(port, "GET", "/health", key=None)
    assert status == 200 and json.loads(body) == {"status": "ok"}, body
    status, _, body = request(port, "GET", "/health")
    assert status == 200 and json.loads(body)["pipelines"][0]["stages"], body
    for path in ("/v1/models", "/v1/stats", "/metrics", "/v1/nothing-here"):
        status, headers, body = request(port, "GET", path, key=None)
        assert status == 401, (path, body)
        err = json.loads(body)["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error" and "param" in err
        assert headers.get("www-authenticate", "").startswith("Bearer")
        assert request(port, "GET", path, key="wrong-key-0123456789abcdef")[0] == 401
    assert request(port, "GET", "/v1/models")[0] == 200
    assert request(port, "GET", "/v1/stats")[0] == 200
    status, body = post(port, "/v1/completions", GREEDY, key=None)
    assert status == 401
    status, body = post(port, "/v1/completions", GREEDY, headers={"Authorization": f"Basic {KEY1}"})
    assert status == 401


# ---------------------------------------------------------------------- validation regressions
BAD_REQUESTS = [
    # (path, body, code, param)
    ("/v1/completions", {"prompt": "hi", "top_k": 1e300}, "invalid_value", "top_k"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**31}, "invalid_value", "top_k"),
    ("/v1/completions", {"prompt": "hi", "top_k": 4.5}, "invalid_value", "top_k"),
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, "invalid_value", "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": True}, "invalid_value", "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "NaN"}, "invalid_value", "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "invalid_value", "top_p"),
    ("/v1/completions", {"prompt": "hi", "min_p": -0.1}, "invalid_value", "min_p"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, "invalid_value", "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -1e308}, "invalid_value", "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "repeat_penalty": 0}, "invalid_value", "repeat_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 11}, "invalid_value", "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "invalid_value", "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": "1"}, "invalid_value", "seed"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**31}, "invalid_value", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_completion_tokens": 0}, "invalid_value", "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1e308}, "invalid_value", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "invalid_value", "stream"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": "yes"}, "invalid_value", "stream_options"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "invalid_value",
     "stream_options"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "y"}}, "invalid_value",
     "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "hi", "stop": ["x" * 1025]}, "invalid_value", "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "invalid_value", "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a"] * 17}, "invalid_value", "stop"),
    ("/v1/completions", {"prompt": "hi", "model": 5}, "invalid_value", "model"),
    ("/v1/completions", {"prompt": []}, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": [[1, 2]]}, "unsupported_parameter", "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "unsupported_parameter", "prompt"),
    ("/v1/completions", {"prompt": [2, 2**63]}, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": [2, 18446744073709551616]}, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": [2, True]}, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": [2, -1]}, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "invalid_value", "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "invalid_value", "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": 1}, "invalid_value", "echo"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "invalid_value", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "unsupported_parameter", "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "unsupported_parameter", "best_of"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "invalid_value", "n"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "invalid_value", "n"),
    ("/v1/completions", {"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "unsupported_parameter", "tools"),
    ("/v1/completions", {"prompt": "hi", "grammar": "root ::= ("}, "invalid_value", "grammar"),
    ("/v1/completions", {"prompt": "hi", "grammar": "root ::= " + "(" * 5000 + '"a"' + ")" * 5000},
     "invalid_value", "grammar"),
    ("/v1/completions", {"prompt": "hi", "grammar": "root ::= root"}, "invalid_value", "grammar"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"50256": -100}}, "unsupported_parameter", "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": 1}, "invalid_value", "ignore_eos"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "invalid_value", "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "unsupported_parameter", "messages[0].content[0].type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]}, "invalid_value",
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "invalid_value",
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value",
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": 3}]}, "invalid_value",
     "messages[0].name"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "stream_options": "yes"}, "invalid_value", "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": "f"},
     "invalid_value", "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]},
     "unsupported_parameter", "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "xml"}}, "invalid_value", "response_format.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1},
     "invalid_value", "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
     "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None}]}, "invalid_value",
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "invalid_value",
     "messages[0].tool_calls[0].function"),
]


@pytest.mark.slow
@pytest.mark.parametrize("path,body,code,param", BAD_REQUESTS, ids=[f"{i}" for i in range(len(BAD_REQUESTS))])
def test_bad_fields_answer_400(gateway, path, body, code, param):
    status, resp = post(gateway.port, path, {"max_tokens": 2, **body}, timeout=30)
    assert status == 400, resp
    err = resp["error"]
    assert err["code"] == code and err["param"] == param and err["message"], err
    assert err["type"] == "invalid_request_error"


@pytest.mark.slow
def test_top_k_1e300_does_not_disturb_other_requests(gateway, baseline):
    """The reproduction: 'top_k': 1e300 once reached the stages. Now a 400, and a greedy request
    running at the same time (and one after) gives the same text as before."""
    port = gateway.port
    bad = {**GREEDY, "temperature": 0.7, "top_k": 1e300}
    with cf.ThreadPoolExecutor(6) as ex:
        goods = [ex.submit(greedy_text, port) for _ in range(2)]
        bads = [ex.submit(post, port, "/v1/completions", bad) for _ in range(4)]
        assert [f.result()[0] for f in bads] == [400] * 4
        assert [f.result() for f in goods] == [baseline] * 2
    assert greedy_text(port) == baseline


@pytest.mark.slow
def test_accepted_odd_but_valid_values(gateway):
    port = gateway.port
    ok = [
        {"prompt": "Hello", "top_k": 40.0, "seed": 2**64 - 1, "temperature": 1e-300},
        {"prompt": "Hello", "seed": -(2**63), "top_p": 0, "temperature": 2},
        {"prompt": "Hello", "repeat_penalty": 1e-300, "min_p": 1, "temperature": 0.5},
        {"prompt": "Hello", "stream": None, "stream_options": None, "n": 1, "best_of": 1, "logprobs": None,
         "echo": False, "logit_bias": {}, "user": "u", "metadata": {"a": "b"}, "store": False},
        {"prompt": [2, 651, 5279], "stop": "x" * 1024},
    ]
    for body in ok:
        status, resp = post(port, "/v1/completions", {"max_tokens": 3, **body})
        assert status == 200, (body, resp)
    status, resp = post(port, "/v1/chat/completions", {
        "max_completion_tokens": 3, "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
             "name": "bob"}],
        "response_format": {"type": "text"}, "tools": None, "tool_choice": "none", "logprobs": False})
    assert status == 200, resp


@pytest.mark.slow
def test_body_too_large_is_413(gateway):
    big = b'{"prompt": "' + b"a" * (8 * 1024 * 1024) + b'"}'
    status, _, body = request(gateway.port, "POST", "/v1/completions", raw=big)
    assert status == 413
    err = json.loads(body)["error"]
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
    # just under the cap: refused by its size, before stage 0 spends seconds tokenizing it
    for path, body in (("/v1/completions", {"prompt": "a " * (3 * 1024 * 1024)}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a " * (3 * 1024 * 1024)}]})):
        t0 = time.monotonic()
        status, resp = post(gateway.port, path, {"max_tokens": 2, **body})
        assert status == 400 and resp["error"]["code"] == "context_length_exceeded", resp
        assert time.monotonic() - t0 < 3


# ---------------------------------------------------------------------- streams and disconnects
def _sse(port: int, body: dict) -> bytes:
    status, headers, data = request(port, "POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), data
    return data


@pytest.mark.slow
def test_stream_ends_with_done_and_disconnect_is_quiet(gateway):
    port = gateway.port
    data = _sse(port, {**GREEDY, "stream": True, "stream_options": {"include_usage": True}})
    assert data.endswith(b"data: [DONE]\n\n")
    # a client that goes away mid-stream is not an error in the gateway's log
    body = json.dumps({"prompt": "Tell me a long story.", "max_tokens": 200, "stream": True}).encode()
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY1}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data: ") < 3:
            chunk = s.recv(65536)
            assert chunk
            got += chunk
        s.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, _, h = request(port, "GET", "/health")
        if json.loads(h)["pipelines"][0]["load"] == 0:
            break
        time.sleep(0.2)
    assert json.loads(h)["pipelines"][0]["load"] == 0
    log = gateway.log.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


# ---------------------------------------------------------------------- connection limits
@pytest.mark.slow
def test_slow_headers_are_cut_off(gateway):
    port = gateway.port
    t0 = time.monotonic()
    a = socket.create_connection(("127.0.0.1", port))
    a.sendall(b"POST /v1/completions HT")               # half a request line, then nothing
    b = socket.create_connection(("127.0.0.1", port))
    b.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    closed = {}

    def trickle(sock, name):                          # one header byte every 0.3 s: not reset by data
        sock.settimeout(0.3)
        try:
            for i in range(60):
                try:
                    sock.sendall(b"X-Slow: 1\r\n"[i % 11:i % 11 + 1])
                    if sock.recv(1024) == b"":
                        break
                except socket.timeout:
                    continue
        except OSError:
            pass
        closed[name] = time.monotonic() - t0

    def wait_closed(sock, name):
        sock.settimeout(20)
        try:
            while sock.recv(1024):
                pass
        except OSError:
            pass
        closed[name] = time.monotonic() - t0

    threads = [threading.Thread(target=wait_closed, args=(a, "a")), threading.Thread(target=trickle, args=(b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    a.close()
    b.close()
    assert set(closed) == {"a", "b"}
    assert all(HEADER_TIMEOUT * 0.8 <= v < HEADER_TIMEOUT + 5 for v in closed.values()), closed
    assert request(port, "GET", "/health", key=None)[0] == 200   # the gateway serves on


class InProcessGateway:
    """A Gateway without pipelines served by serve_app on a background event loop (limits, TLS)."""

    def __init__(self, **serve_kw):
        from molink_lite.serving.gateway import Gateway, serve_app
        from molink_lite.serving.router import Router

        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def run():
            self.runner, self.site = await serve_app(Gateway(Router([]), api_keys=[KEY1]).app(), "127.0.0.1", 0, **serve_kw)
            started.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(run()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.port = self.site.port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return out
        out += chunk


def test_connection_cap_in_process():
    """Connections beyond max_connections get a 503 at once and are closed; a freed slot is usable again."""
    gw = InProcessGateway(max_connections=4, header_timeout=10)
    try:
        held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(4)]
        time.sleep(0.3)
        t0 = time.monotonic()
        extra = socket.create_connection(("127.0.0.1", gw.port))
        extra.settimeout(5)
        reply = _read_all(extra)
        assert time.monotonic() - t0 < 2
        assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply, reply
        extra.close()
        held.pop().close()
        time.sleep(0.3)
        status, _, body = request(gw.port, "GET", "/v1/models")
        assert status == 200, body
        assert gw.site.guard.refused == 1
        for s in held:
            s.close()
    finally:
        gw.close()


def _self_signed(tmp_path):
    """The project's own self-signed certificate (wire/tls.py), as a server context."""
    from molink_lite.wire.tls import self_signed, server_context

    return server_context(*self_signed(tmp_path))


def test_https_in_process(tmp_path):
    """ssl_context serves HTTPS (keys checked as over HTTP); a client stuck before the TLS handshake is closed."""
    import ssl

    gw = InProcessGateway(ssl_context=_self_signed(tmp_path), header_timeout=1.5)
    try:
        assert gw.site.name.startswith("https://")
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        for key, want in ((KEY1, 200), ("wrong-key-0123456789abcdef", 401)):
            conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=client, timeout=10)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert conn.getresponse().status == want
            conn.close()
        t0 = time.monotonic()
        idle = socket.create_connection(("127.0.0.1", gw.port))   # TCP only, never starts the handshake
        idle.settimeout(10)
        assert _read_all(idle) == b""
        assert 1.0 <= time.monotonic() - t0 < 6
        idle.close()
    finally:
        gw.close()


# ---------------------------------------------------------------------- the fuzz
ODD_VALUES: List[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 0.5, -0.5, 1e308, -1e308, 5e-324, 1e-300, 2**31, 2**31 - 1, 2**63,
    -(2**63), 2**64 - 1, 2**64, 2**70, 1.5, 40.0, "NaN", "Infinity", "-inf", "1", "", "x" * 3000, [], {}, [1], [None],
    {"a": 1}, "\u0000", "\U0001F600", "\ud800 lone", "é" * 50, "\u202e\u200b", [[1]], {"type": "text"}, {"include_usage": True},
    {"include_usage": "yes"}, ["stop", "\n"], [""] , ["a"] * 20,
]
FIELDS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "repeat_penalty", "seed", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options", "n",
          "model", "logit_bias", "response_format", "tools", "tool_choice", "user", "ignore_eos", "logprobs",
          "top_logprobs", "echo", "suffix", "best_of", "parallel_tool_calls", "functions", "metadata", "store",
          "unknown_field", "grammar", "json_schema"]
WORDS = ["hello", "world", "Paris", "<start_of_turn>", "<bos>", "\n", "😀", "\u0000", "ünï", "  ", "def", "{", "\t",
         "<eos>", "\\", "\"", "日本語", "\u202e", "\ufeff"]


def _text(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, n)))


def _deep(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


def _deep_schema(depth: int) -> dict:
    v: dict = {"type": "integer"}
    for i in range(depth):
        v = {"type": "array", "items": v} if i % 2 else {"type": "object", "properties": {"a": v}, "required": ["a"]}
    return v


_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}
_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
# hostile grammars, schemas and tools: refused (400) or served, never a server error
GRAMMARS = ['root ::= "yes" | "no"', "root ::= (", "root ::= root", 'root ::= "a"*', "a ::= [", "\u0000",
            "root ::= " + "(" * 3000 + '"a"' + ")" * 3000, 'root ::= "\\x"', "root ::= [^]+", "x" * 3000,
            'root ::= [a-z]{0,4000}', 'root ::= "a" ' * 2000]
SCHEMAS: List[Any] = [_SCHEMA, {"type": "wat"}, {"$ref": "#/nowhere"}, {"$ref": "#"}, _deep_schema(300),
                      {"type": "string", "pattern": "(((a)" + ")" * 50}, {"type": "string", "pattern": "[" * 500},
                      {"type": "object", "properties": {str(i): {"type": "integer"} for i in range(500)}},
                      {"type": "string", "minLength": 10**9}, {"anyOf": [{"type": "integer"}] * 300}, True, []]
TOOLS: List[Any] = [[_TOOL], [_TOOL, {"type": "function", "function": {"name": "f"}}], [{"type": "function"}],
                    [{"type": "x"}], ["x"], [{"type": "function", "function": {"name": "g", "parameters": s}}
                                         for s in (_deep_schema(200), {"type": "wat"})],
                    [{"type": "function", "function": {"name": "f" * 3000}}],
                    [_TOOL] * 300]
TOOL_CHOICES: List[Any] = ["none", "auto", "required", {"type": "function", "function": {"name": "get_weather"}},
                           {"type": "function", "function": {"name": "nope"}}, {"type": "function"}, "sometimes"]

# extreme but valid values: the request must still generate
VALID_VALUES: Dict[str, List[Any]] = {
    "temperature": [0, 1e-300, 5e-324, 2, 0.8], "top_p": [0, 1e-300, 1, 0.5], "top_k": [0, 1, 40.0, 2**31 - 1],
    "min_p": [0, 1, 1e-300], "presence_penalty": [-2, 2, 0.0], "frequency_penalty": [-2, 2, 1e-300],
    "repetition_penalty": [1e-300, 10, 1.1], "repeat_penalty": [1e-300, 10, 0.9],
    "seed": [0, -1, 2**32 - 1, 2**64 - 1, -(2**63), 12.0], "stop": ["\n", ["a", "b"], "x" * 1024, []],
    "stream": [False, None], "stream_options": [None], "n": [1, None, 2, 3, 16], "model": [MODEL, None],
    "logit_bias": [{}, None],
    "response_format": [{"type": "text"}, None, {"type": "json_object"},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": _SCHEMA}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[4]}},
                        {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}, {"type": "xml"}],
    "tools": [None, []] + TOOLS, "tool_choice": TOOL_CHOICES + [None], "user": ["u" * 100, ""],
    "ignore_eos": [True, False], "logprobs": [None, 0, 5, 20, True, False], "top_logprobs": [None, 0, 3, 20],
    "echo": [False, None, True], "suffix": [None, ""], "best_of": [1, None], "parallel_tool_calls": [None, True, False],
    "functions": [None], "metadata": [{"k": "v"}, None], "store": [False, True],
    "unknown_field": [{"x": [1, 2]}, "\U0001F600"], "grammar": GRAMMARS + [None], "json_schema": SCHEMAS + [None],
}


def _odd(rng: random.Random, key: str) -> Any:
    if key in ("max_tokens", "max_completion_tokens"):
        # never absent/null: a chat request would then default to 1024 tokens (slow on 2 cores)
        return rng.choice([0, -1, 1e308, 2**31, 2**64, "4", True, 1.5, [], 2, 3, 4.0])
    if rng.random() < 0.5:
        return rng.choice(VALID_VALUES[key])
    return rng.choice(ODD_VALUES)


def _message(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.6:
        return {"role": rng.choice(["user", "user", "system", "assistant"]), "content": _text(rng)}
    if r < 0.75:
        return {"role": "user", "content": [rng.choice([
            {"type": "text", "text": _text(rng)}, {"type": "text", "text": 5}, {"type": "image_url", "image_url": {}},
            {"type": "text"}, "text", None, {"type": 7}])]}
    return rng.choice([{"role": "user"}, {"content": "x"}, {"role": 3, "content": "x"}, [], "hi",
                       {"role": "user", "content": None}, {"role": "tool", "content": "x"},
                       {"role": "user", "content": "x", "name": rng.choice(ODD_VALUES)},
                       {"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]},
                       {"role": rng.choice(["developer", "wizard", ""]), "content": _text(rng)}])


def _fuzz_case(rng: random.Random, i: int) -> Dict[str, Any]:
    """One odd request: {path, method, raw bytes, key, stream?}."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    key: Optional[str] = KEY1
    r = rng.random()
    if r < 0.03:
        key = rng.choice([None, "wrong-key-0123456789abcdef", KEY2])
    body: Dict[str, Any] = {"max_tokens": rng.randint(1, 4)}
    if chat and rng.random() < 0.7:
        body["messages"] = [{"role": "user", "content": rng.choice([
            _text(rng), [{"type": "text", "text": _text(rng)}, {"type": "text", "text": _text(rng)}]])}]
    elif chat:
        body["messages"] = [_message(rng) for _ in range(rng.randint(1, 3))] if rng.random() < 0.9 else \
            rng.choice([[], None, "hi", [[]], {"role": "user"}])
    elif rng.random() < 0.7:
        body["prompt"] = rng.choice([_text(rng) + " x", [_text(rng) + " x"],
                                     [rng.randint(0, 262143) for _ in range(rng.randint(1, 8))]])
    else:
        body["prompt"] = rng.choice([
            _text(rng), [rng.choice([0, -1, 262144, 2**31, 2**63, 2**64, 1e300, True, "a", None])], [], "", None, 12,
            [["a"]], ["a", "b"], {"text": "x"}, _deep(rng.randint(2, 50))])
    if rng.random() < 0.3:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = rng.choice([{"include_usage": True}, {"include_usage": False}, "yes", None])
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 4])):
        k = rng.choice(FIELDS)
        body[k] = _odd(rng, k)
    if rng.random() < 0.15:  # the issue 26 features together (and hostile values of them)
        k = rng.choice(["grammar", "json_schema", "response_format", "tools", "tool_choice"])
        body[k] = rng.choice(VALID_VALUES[k])
        if chat and rng.random() < 0.5:
            body.update(logprobs=True, top_logprobs=rng.choice([0, 2, 20]))
        elif not chat and rng.random() < 0.5:
            body.update(logprobs=rng.choice([0, 3]), echo=rng.random() < 0.5)
            if body["echo"] and rng.random() < 0.3:
                body["max_tokens"] = 0
        if rng.random() < 0.4:
            body["n"] = rng.choice([2, 3, 4])
    if rng.random() < 0.4:   # mostly plausible sampling values, so many requests really generate
        body.update(temperature=rng.choice([0, 0.7, 1.0, 2]), top_p=rng.choice([0.9, 1, 0]),
                    top_k=rng.choice([0, 1, 40]), seed=rng.randint(-5, 2**40))
    # lone surrogates: escaped (\\ud800) with ensure_ascii, else raw surrogate bytes (invalid UTF-8)
    raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    kind = rng.random()
    if kind < 0.04:
        raw = raw[:rng.randint(0, len(raw))]                                  # truncated JSON
    elif kind < 0.07:
        raw = raw.replace(b"4", b"NaN", 1).replace(b"1", b"Infinity", 1)   # non-JSON literals
    elif kind < 0.09:
        raw = b'{"prompt": "\\ud800 lone", "max_tokens": 2}' if rng.random() < 0.5 else \
            b'{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 2}'
    elif kind < 0.11:
        raw = b'{"prompt": "\xff\xfe invalid utf-8", "max_tokens": 2}'
    elif kind < 0.13:
        raw = b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}"            # deeper than any parser allows
    elif kind < 0.15:
        raw = json.dumps(rng.choice([[1, 2], "x", 5, None, True])).encode()
    elif kind < 0.17:
        raw = b'{"prompt": "hi", "max_tokens": 2, "max_tokens": 1e999}'
    if kind > 0.95:   # llama-server's tokenizer endpoints
        path = rng.choice(["/tokenize", "/detokenize"])
        tb: Any = rng.choice([
            {"content": _text(rng), "add_special": rng.choice([True, False, None, 1]),
             "with_pieces": rng.choice([True, False, "y"]), "parse_special": rng.choice([None, True, False])},
            {"tokens": [rng.randint(0, 262143) for _ in range(rng.randint(0, 20))]},
            {"tokens": rng.choice([[-1], [2**63], [True], "1", None, [[1]], [1.5], list(range(200000))])},
            {"content": rng.choice(ODD_VALUES)}, {"tokens": rng.choice(ODD_VALUES)}, rng.choice(ODD_VALUES)])
        raw = json.dumps(tb, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    case = {"path": path, "method": "POST", "raw": raw, "key": key, "stream": body.get("stream") is True}
    if kind > 0.985:
        case.update(method=rng.choice(["GET", "PUT", "DELETE"]))
    elif kind > 0.975:
        case.update(path=rng.choice(["/v1/embeddings", "/v1/../health", "/v1/completions/x", "//", "/%00"]))
    return case


def _send(port: int, case: Dict[str, Any]) -> Tuple[Any, bytes, str]:
    try:
        status, headers, data = request(port, case["method"], case["path"], raw=case["raw"], key=case["key"],
                                        timeout=120)
        return status, data, headers.get("content-type", "")
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        return f"conn:{type(e).__name__}", b"", ""


def _send_huge(port: int, n: int, chunked: bool) -> Any:
    body = b'{"prompt": "' + b"x" * n + b'", "max_tokens": 2}'
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        headers = {"Authorization": f"Bearer {KEY1}", "Content-Type": "application/json"}
        if chunked:
            conn.request("POST", "/v1/completions", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                         headers=headers, encode_chunked=True)
        else:
            conn.request("POST", "/v1/completions", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        return r.status
    except (ConnectionError, OSError) as e:
        return f"conn:{type(e).__name__}"
    finally:
        conn.close()


@pytest.mark.slow
def test_api_fuzz(gateway, baseline):
    port = gateway.port
    rng = random.Random(20240601)
    cases = [_fuzz_case(rng, i) for i in range(994)]
    counts: collections.Counter = collections.Counter()
    codes: collections.Counter = collections.Counter()
    bad: List[str] = []
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(_send, port, c) for c in cases]
        futs += [ex.submit(_send_huge, port, 9 * 1024 * 1024 + k, k % 2 == 1) for k in range(6)]
        for i, f in enumerate(futs):
            res = f.result()
            status = res if not isinstance(res, tuple) else res[0]
            counts[status] += 1
            if isinstance(status, str) or status >= 500 and status != 503:
                bad.append(f"{status}: {cases[i]['raw'][:300] if i < len(cases) else 'huge body'}")
                continue
            if isinstance(res, tuple) and status == 400:
                try:
                    err = json.loads(res[1])["error"]
                    codes[f"{err['code']}:{err['param']}"] += 1
                except (ValueError, KeyError, TypeError):
                    codes["(not JSON)"] += 1
            if isinstance(res, tuple) and status == 200 and res[2].startswith("text/event-stream"):
                counts["(200 streamed)"] += 1
                events = [ln for ln in res[1].split(b"\n\n") if ln]
                if not res[1].endswith(b"data: [DONE]\n\n"):
                    bad.append(f"stream without [DONE]: {cases[i]['raw'][:300]} -> {res[1][-300:]}")
                for ev in events[:-1]:
                    json.loads(ev[len(b"data: "):])
    print(f"\nfuzz: {len(futs)} requests in {time.monotonic() - t0:.1f} s; status counts: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))))
    print("most common 400s: " + ", ".join(f"{k} x{v}" for k, v in codes.most_common(12)))
    assert not bad, bad[:10]
    assert counts[200] >= 200        # plenty of the odd requests were valid and generated text
    status, _, _ = request(port, "GET", "/health", key=None)
    assert status == 200
    assert greedy_text(port) == baseline
    log = gateway.log.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert KEY1 not in log and KEY2 not in log
