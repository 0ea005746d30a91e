"""Issue 26 over HTTP: grammars (JSON schema), logprobs, echo, n choices, tools, /tokenize and /detokenize.

The shapes are checked in process (fake sequences through :mod:`molink_lite.serving.responses`); the rest runs real
stage processes (the demo model split in two) and a real gateway process, called over HTTP, with the openai SDK
and, where installed, langchain-openai and litellm.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import asyncio
import concurrent.futures as cf
import json
from typing import Dict, List, Optional

import jsonschema
import pytest
from jsonschema import validate

from molink_lite.serving.openai_schema import (ApiError, OutputOptions, StreamOptions, check_common,
                                               check_completion_only, parse_chat_output, parse_completion_output,
                                               parse_max_tokens, parse_messages)
from molink_lite.serving.sequence import Event, TokenLogprob

from serving import NO_CACHE, GatewayProcess, http

MODEL = "gemma-3-270m-q4_k_m"
# the options of the gemma_stages fixture (conftest.py)
STAGE_ARGS = ["--threads", "1", "--ctx", "4096", "--max-seqs", "8", "--flash-attn", "off"]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"},
                                           "pet": {"enum": ["cat", "dog", "none"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}


# ---------------------------------------------------------------------- the schema check: jsonschema
def test_validator():
    validate({"name": "Ann", "age": 3, "pet": "cat"}, PERSON)
    for bad in ({"name": "Ann", "age": 3}, {"name": "Ann", "age": 3.5, "pet": "cat"},
                {"name": "x" * 13, "age": 3, "pet": "cat"}, {"name": "A", "age": 3, "pet": "cow"},
                {"name": "A", "age": 3, "pet": "cat", "x": 1}, {"name": "A", "age": True, "pet": "cat"}):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, PERSON)


# ---------------------------------------------------------------------- parsing (in process)
def _param(fn, *a) -> Optional[str]:
    with pytest.raises(ApiError) as e:
        fn(*a)
    assert e.value.status == 400
    return e.value.param


def test_parse_new_fields():
    assert parse_completion_output({}) == OutputOptions(1, -1, False)
    assert parse_completion_output({"n": 3, "logprobs": 0, "echo": True}) == OutputOptions(3, 0, True)
    assert parse_completion_output({"logprobs": 20.0}).logprobs == 20
    for body, param in (({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"logprobs": -1}, "logprobs"),
                        ({"echo": 1}, "echo"), ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 2.5}, "n"),
                        ({"n": True}, "n")):
        assert _param(parse_completion_output, body) == param
    assert parse_chat_output({"logprobs": True, "top_logprobs": 5, "n": 2}) == OutputOptions(2, 5, False)
    assert parse_chat_output({"logprobs": True}).logprobs == 0
    assert parse_chat_output({"logprobs": False, "top_logprobs": 0}).logprobs == -1
    for body, param in (({"logprobs": 1}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
                        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")):
        assert _param(parse_chat_output, body) == param
    # max_tokens 0: only to score the prompt (echo)
    assert parse_max_tokens({"max_tokens": 0, "echo": True}, 16, lo=0) == 0
    assert _param(parse_max_tokens, {"max_tokens": 0}, 16) == "max_tokens"
    assert _param(check_completion_only, {"best_of": 2}) == "best_of"
    assert _param(check_completion_only, {"tools": [WEATHER_TOOL]}) == "tools"
    assert _param(check_common, {"functions": [{"name": "f"}]}) == "functions"
    check_common({"n": 4, "tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}})
    check_completion_only({"best_of": 1, "echo": True})


def test_parse_tool_messages():
    msgs = parse_messages({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
    assert msgs[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}
    assert msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    for m, param in (({"role": "user", "content": "x", "tool_calls": []}, "messages[0].tool_calls"),
                     ({"role": "assistant", "content": None}, "messages[0].content"),
                     ({"role": "assistant", "tool_calls": [{"function": {}}]}, "messages[0].tool_calls[0].function"),
                     ({"role": "assistant", "tool_calls": "x"}, "messages[0].tool_calls"),
                     ({"role": "user", "content": "x", "tool_call_id": "1"}, "messages[0].tool_call_id")):
        assert _param(parse_messages, {"messages": [m]}) == param


# ---------------------------------------------------------------------- response shapes (in process)
class _Seq:
    """What responses.py reads of a sequence: its events, generated tokens, prompt tokens from the prefix cache."""

    def __init__(self, events: List[Event], generated: int):
        self.events: asyncio.Queue = asyncio.Queue()
        for ev in events:
            self.events.put_nowait(ev)
        self.generated = [0] * generated
        self.reuse_len = 0


def _tl(tok: int, b: bytes, lp: Optional[float], *alts) -> TokenLogprob:
    return TokenLogprob(tok, b, lp, tuple(alts))


class _Call:
    def __init__(self, id: str, name: str, arguments: str):
        self.id, self.name, self.arguments = id, name, arguments


class _Parser:
    """A stand-in ToolCallParser: text after '<call>' is one call's arguments, given at the end."""

    def __init__(self):
        self.buf, self.calling = "", False

    def feed(self, text):
        if self.calling:
            self.buf += text
            return "", []
        if "<call>" in text:
            before, after = text.split("<call>", 1)
            self.calling, self.buf = True, after
            return before, []
        return text, []

    def finish(self):
        return ("", [(0, _Call("call_x", "get_weather", self.buf))]) if self.calling else ("", [])


def _answer(chat: bool, opts: OutputOptions, echo_text: str = "", parser: bool = False):
    from molink_lite.serving.responses import Answer

    return Answer(chat, "id-1", 1, MODEL, opts, 3, echo_text, _Parser if parser else None)


def _events(n_choices: int = 1, prompt: bool = False) -> List[List[Event]]:
    out = []
    for i in range(n_choices):
        evs = []
        if prompt:
            evs.append(Event("prompt_logprobs", logprobs=[_tl(2, b"", None), _tl(5, b"Hi", -1.5, (5, b"Hi", -1.5)),
                                                          _tl(6, b" you", -0.7, (6, b" you", -0.7))]))
        evs += [Event("text", "A\u00e9", logprobs=[_tl(7, b"A", -0.1, (7, b"A", -0.1), (8, b"B", -2.5)),
                                                   _tl(9, b"\xc3", -0.2, (9, b"\xc3", -0.2)),
                                                   _tl(10, b"\xa9", -0.3, (10, b"\xa9", -0.3))]),
                Event("text", "", logprobs=[]),
                Event("done", finish_reason="length")]
        out.append(evs)
    return out


async def _collect(answer, evs) -> dict:
    from molink_lite.serving.responses import collect

    resp = await collect(answer, [_Seq(e, 3) for e in evs])
    return json.loads(resp.body)


async def _stream(answer, evs, usage=True) -> List[dict]:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from molink_lite.serving.responses import stream

    async def handler(request):
        return await stream(request, answer, [_Seq(e, 3) for e in evs], StreamOptions(True, usage))

    app = web.Application()
    app.router.add_post("/", handler)
    async with TestClient(TestServer(app)) as client:
        r = await client.post("/")
        data = await r.read()
    assert data.endswith(b"data: [DONE]\n\n")
    return [json.loads(x[6:]) for x in data.split(b"\n\n") if x and x != b"data: [DONE]"]


def test_completion_shapes():
    body = asyncio.run(_collect(_answer(False, OutputOptions(2, 1)), _events(2)))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    c = body["choices"][0]
    assert c["text"] == "A\u00e9" and c["finish_reason"] == "length"
    lp = c["logprobs"]
    assert lp["tokens"] == ["A", "\ufffd", "\ufffd"] and lp["token_logprobs"] == [-0.1, -0.2, -0.3]
    assert lp["top_logprobs"][0] == {"A": -0.1, "B": -2.5} and lp["text_offset"] == [0, 1, 1]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    # echo: the prompt's text and logprobs first (its first token has none)
    body = asyncio.run(_collect(_answer(False, OutputOptions(1, 0, True), "Hi you"), _events(1, prompt=True)))
    c = body["choices"][0]
    assert c["text"] == "Hi youA\u00e9"
    assert c["logprobs"]["tokens"] == ["", "Hi", " you", "A", "\ufffd", "\ufffd"]
    assert c["logprobs"]["token_logprobs"][0] is None and c["logprobs"]["top_logprobs"][0] is None
    assert c["logprobs"]["text_offset"] == [0, 0, 2, 6, 7, 7]
    # streamed: the same pieces, choices by index
    chunks = asyncio.run(_stream(_answer(False, OutputOptions(1, 0, True), "Hi you"), _events(1, prompt=True)))
    assert chunks[0]["choices"][0]["text"] == "Hi you" and chunks[0]["choices"][0]["logprobs"]["tokens"][1] == "Hi"
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == "Hi youA\u00e9"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(ch["object"] == "text_completion" for ch in chunks)


def test_chat_shapes():
    body = asyncio.run(_collect(_answer(True, OutputOptions(1, 1)), _events(1)))
    c = body["choices"][0]
    assert c["message"] == {"role": "assistant", "content": "A\u00e9"}
    first = c["logprobs"]["content"][0]
    assert first == {"token": "A", "logprob": -0.1, "bytes": [65],
                     "top_logprobs": [{"token": "A", "logprob": -0.1, "bytes": [65]},
                                      {"token": "B", "logprob": -2.5, "bytes": [66]}]}
    assert c["logprobs"]["content"][1]["bytes"] == [0xC3]
    body = asyncio.run(_collect(_answer(True, OutputOptions(1, -1)), _events(1)))
    assert body["choices"][0]["logprobs"] is None and body["object"] == "chat.completion"
    chunks = asyncio.run(_stream(_answer(True, OutputOptions(2, 0)), _events(2)))
    assert {ch["choices"][0]["index"] for ch in chunks if ch["choices"]} == {0, 1}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    for i in (0, 1):
        mine = [ch["choices"][0] for ch in chunks if ch["choices"] and ch["choices"][0]["index"] == i]
        assert "".join(p["delta"].get("content") or "" for p in mine) == "A\u00e9"
        assert [e["token"] for p in mine if p["logprobs"] for e in p["logprobs"]["content"]] == ["A", "\ufffd", "\ufffd"]
        assert mine[-1]["finish_reason"] == "length"


def test_tool_call_shapes():
    evs = [[Event("text", " \n<call>{\"city\": "), Event("text", "\"Paris\"}"), Event("done", finish_reason="stop")]]
    body = asyncio.run(_collect(_answer(True, OutputOptions(), parser=True), evs))
    c = body["choices"][0]
    assert c["finish_reason"] == "tool_calls"
    assert c["message"]["tool_calls"] == [{"id": "call_x", "type": "function",
                                           "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]
    assert c["message"]["content"] is None   # only calls (and whitespace)
    chunks = asyncio.run(_stream(_answer(True, OutputOptions(), parser=True), evs))
    deltas = [ch["choices"][0] for ch in chunks if ch["choices"]]
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert calls == [{"index": 0, "id": "call_x", "type": "function",
                      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]
    assert deltas[-1]["finish_reason"] == "tool_calls"


def test_openai_sdk_reads_the_shapes():
    """The SDK's own types take our chunks (its stream accumulator included)."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types import Completion

    ChatCompletion.model_validate(asyncio.run(_collect(_answer(True, OutputOptions(1, 2), parser=True), [[
        Event("text", "<call>{}", logprobs=[_tl(7, b"A", -0.1, (7, b"A", -0.1))]),
        Event("done", finish_reason="stop")]])))
    # (not with echo: the prompt's first token has a null logprob, as OpenAI and vLLM answer, which the SDK's
    # types do not declare; its client does not validate answers)
    Completion.model_validate(asyncio.run(_collect(_answer(False, OutputOptions(2, 3)), _events(2))))
    for ch in asyncio.run(_stream(_answer(True, OutputOptions(2, 0), parser=True), _events(2))):
        ChatCompletionChunk.model_validate(ch)


# ---------------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def gateway(gemma_stages, tmp_path_factory):
    # without the prefix cache: these tests repeat seeded requests and compare streamed with whole answers, and
    # llama.cpp's logits move (by up to a few hundredths of a nat here) with where a request's KV cells lie among
    # other sequences' cells, which cached entries change (tests/test_prefix_cache_e2e.py covers the cache)
    gw = GatewayProcess([[s.url for s in gemma_stages]], extra=NO_CACHE,
                        log_dir=tmp_path_factory.mktemp("gw"))
    gw.wait_ready()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway):
    from openai import OpenAI

    return OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _post(gateway, path: str, body: dict, timeout: float = 300):
    return http("POST", gateway.url + path, body, timeout=timeout)


@pytest.mark.slow
def test_json_schema_50_samples(gateway):
    """50 completions sampled at temperature 1 under a JSON schema, through the 2-stage split: all parse and follow
    the schema (the grammar, not luck: an unconstrained 270M model rarely writes this JSON)."""
    body = {"model": MODEL, "max_tokens": 96, "temperature": 1.0, "n": 5,
            "messages": [{"role": "user", "content": "Describe a person as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}

    def one(seed: int) -> List[dict]:
        status, resp = _post(gateway, "/v1/chat/completions", {**body, "seed": seed})
        assert status == 200, resp
        return resp["choices"]

    with cf.ThreadPoolExecutor(4) as ex:
        choices = [c for cs in ex.map(one, range(10)) for c in cs]
    assert len(choices) == 50
    texts = []
    for c in choices:
        assert c["finish_reason"] == "stop", c
        value = json.loads(c["message"]["content"])
        validate(value, PERSON)
        texts.append(c["message"]["content"])
    assert len(set(texts)) > 5   # really sampled
    # a completion under llama-server's json_schema field, and a GBNF grammar
    status, resp = _post(gateway, "/v1/completions", {"prompt": "A person:", "max_tokens": 96, "temperature": 1,
                                                      "seed": 3, "json_schema": PERSON})
    assert status == 200, resp
    validate(json.loads(resp["choices"][0]["text"]), PERSON)
    status, resp = _post(gateway, "/v1/completions", {"prompt": "Yes or no?", "max_tokens": 8, "temperature": 1,
                                                      "grammar": 'root ::= ("yes" | "no") "."'})
    assert status == 200 and resp["choices"][0]["text"] in ("yes.", "no."), resp


@pytest.mark.slow
def test_bad_grammars_are_400(gateway):
    for body, param in (({"grammar": "root ::= ( unclosed"}, "grammar"),
                        ({"grammar": "root ::= undefined_rule"}, "grammar"),
                        ({"grammar": "root ::= root"}, "grammar"),   # left recursion: llama.cpp's own refusal
                        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}},
                         "response_format"),
                        ({"response_format": {"type": "xml"}}, "response_format"),
                        ({"json_schema": {"type": "wat"}}, "json_schema")):
        for _ in range(2):   # the second answer comes from the cache
            status, resp = _post(gateway, "/v1/completions", {"prompt": "x", "max_tokens": 2, **body})
            assert status == 400 and resp["error"]["param"].startswith(param), (body, resp)
            assert resp["error"]["code"] == "invalid_value"


def _check_completion_logprobs(choice: dict, k: int) -> None:
    lp = choice["logprobs"]
    n = len(lp["tokens"])
    assert n and len(lp["token_logprobs"]) == n == len(lp["top_logprobs"]) == len(lp["text_offset"])
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert v <= 0 and isinstance(top, dict) and k <= len(top) <= k + 1
        assert abs(max(top.values()) - v) < 1e-4 and top[tok] == v   # greedy: the chosen token is the likeliest
    assert lp["text_offset"] == sorted(lp["text_offset"])


def _check_chat_logprobs(choice: dict, k: int) -> None:
    content = choice["logprobs"]["content"]
    assert content
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) == k
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
        assert abs(max(t["logprob"] for t in e["top_logprobs"]) - e["logprob"]) < 1e-4
        assert e["top_logprobs"][0]["token"] == e["token"]


@pytest.mark.slow
def test_logprobs_completions_and_chat(gateway, client):
    base = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 3}
    status, whole = _post(gateway, "/v1/completions", base)
    assert status == 200, whole
    _check_completion_logprobs(whole["choices"][0], 3)
    assert "".join(whole["choices"][0]["logprobs"]["tokens"]) == whole["choices"][0]["text"]
    # streamed: the same tokens and logprobs, chunk by chunk
    parts = [c.choices[0] for c in client.completions.create(**base, stream=True) if c.choices]
    tokens = [t for p in parts if p.logprobs for t in p.logprobs.tokens]
    values = [v for p in parts if p.logprobs for v in p.logprobs.token_logprobs]
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]
    assert values == pytest.approx(whole["choices"][0]["logprobs"]["token_logprobs"], abs=1e-5)
    # chat
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
            "temperature": 0, "logprobs": True, "top_logprobs": 4}
    status, whole = _post(gateway, "/v1/chat/completions", chat)
    assert status == 200, whole
    _check_chat_logprobs(whole["choices"][0], 4)
    r = client.chat.completions.create(**chat)
    assert [e.token for e in r.choices[0].logprobs.content] == [e["token"] for e in whole["choices"][0]["logprobs"]["content"]]
    streamed = [e for c in client.chat.completions.create(**chat, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e["token"] for e in whole["choices"][0]["logprobs"]["content"]]
    assert [e.logprob for e in streamed] == pytest.approx([e["logprob"] for e in whole["choices"][0]["logprobs"]["content"]],
                                                          abs=1e-5)


@pytest.mark.slow
def test_echo_scores_the_prompt(gateway):
    prompt = "The quick brown fox jumps over the lazy dog"
    status, resp = _post(gateway, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert status == 200, resp
    c = resp["choices"][0]
    assert c["text"] == prompt and c["finish_reason"] == "length"
    lp = c["logprobs"]
    n = resp["usage"]["prompt_tokens"]
    assert resp["usage"]["completion_tokens"] == 0 and len(lp["tokens"]) == n > 5
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:]) and all(len(t) >= 2 for t in lp["top_logprobs"][1:])
    assert "".join(lp["tokens"][1:]) == prompt
    # echo with generation, and echo without logprobs
    status, resp = _post(gateway, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 0,
                                                      "temperature": 0})
    assert status == 200 and resp["choices"][0]["text"].startswith(prompt), resp
    assert len(resp["choices"][0]["logprobs"]["tokens"]) == n + 4
    status, resp = _post(gateway, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True})
    assert status == 200 and resp["choices"][0]["text"] == prompt and resp["choices"][0]["logprobs"] is None
    status, resp = _post(gateway, "/v1/completions", {"prompt": prompt, "max_tokens": 0})
    assert status == 400 and resp["error"]["param"] == "max_tokens"


def _stage0_rows(gateway) -> int:
    status, stats = http("GET", gateway.url + "/v1/stats")
    return int(stats["pipelines"][0]["stages"][0]["rows"])


@pytest.mark.slow
def test_n_choices_share_one_prefill(gateway, client):
    prompt = "Write a short story about a lighthouse keeper. " * 12
    kw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, seed=42, n=4)
    before = _stage0_rows(gateway)
    a = client.completions.create(**kw)
    rows = _stage0_rows(gateway) - before
    p = a.usage.prompt_tokens
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert a.usage.completion_tokens == 24
    assert rows < 2 * p, (rows, p)    # one prefill of the prompt, not four
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    # streamed: every choice, by index
    texts: Dict[int, str] = {}
    for ch in client.completions.create(**kw, stream=True):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in a.choices}
    # chat with n
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], n=3,
                                       max_tokens=4, temperature=1, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]


@pytest.mark.slow
def test_sdk_parse_and_tools(client):
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int

    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
                                      response_format=Person, max_tokens=60, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Person)

    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_TOOL], tool_choice=choice,
                                           parallel_tool_calls=False, max_tokens=60, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        # streamed: the same calls
        calls: Dict[int, Dict[str, str]] = {}
        finish = None
        for ch in client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_TOOL], tool_choice=choice,
                                                 parallel_tool_calls=False, max_tokens=60, temperature=0, stream=True):
            for cc in ch.choices:
                finish = cc.finish_reason or finish
                for tc in cc.delta.tool_calls or []:
                    d = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                    d["name"] += (tc.function.name or "") if tc.function else ""
                    d["arguments"] += (tc.function.arguments or "") if tc.function else ""
        assert finish == "tool_calls"
        assert [calls[i] for i in sorted(calls)] == [{"name": t.function.name, "arguments": t.function.arguments}
                                                     for t in c.message.tool_calls]
    # the answer goes back into the conversation
    follow = msgs + [c.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    r = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER_TOOL], max_tokens=16,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.slow
def test_tokenize_detokenize_and_models(gateway, client):
    text = "Hello world, ünïcode 😀!"
    status, resp = _post(gateway, "/tokenize", {"content": text})
    assert status == 200 and all(isinstance(t, int) for t in resp["tokens"]), resp
    tokens = resp["tokens"]
    status, resp = _post(gateway, "/detokenize", {"tokens": tokens})
    assert status == 200 and resp == {"content": text}
    status, resp = _post(gateway, "/tokenize", {"content": text, "add_special": True, "with_pieces": True})
    assert status == 200 and [t["id"] for t in resp["tokens"]][1:] == tokens
    assert "".join(p["piece"] for p in resp["tokens"][1:] if isinstance(p["piece"], str)) == text
    for body, param in (({"content": 5}, "content"), ({"content": "x", "with_pieces": "y"}, "with_pieces")):
        status, resp = _post(gateway, "/tokenize", body)
        assert status == 400 and resp["error"]["param"] == param
    for body in ({"tokens": [-1]}, {"tokens": [10**9]}, {"tokens": "1"}, {"tokens": [True]}):
        status, resp = _post(gateway, "/detokenize", body)
        assert status == 400 and resp["error"]["param"] == "tokens", resp
    m = client.models.list().data[0]
    assert m.id == MODEL and 0 < m.meta["n_ctx"] <= 4096 and m.meta["n_vocab"] > 1000


@pytest.mark.slow
def test_langchain_and_litellm(gateway, monkeypatch):
    # LiteLLM fetches a price list from GitHub at import unless told to use its bundled copy
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class City(BaseModel):
        city: str = Field(max_length=20)

    llm = lc.ChatOpenAI(base_url=gateway.url + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=60)
    out = llm.with_structured_output(City, method="json_schema").invoke("Name a city in France.")
    assert isinstance(out, City)
    bound = llm.bind_tools([WEATHER_TOOL], tool_choice="get_weather", parallel_tool_calls=False)
    msg = bound.invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(model=f"openai/{MODEL}", api_base=gateway.url + "/v1", api_key="unused",
                           messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0,
                           logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content is not None and r.choices[0].logprobs
