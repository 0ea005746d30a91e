"""End to end: stage processes + gateway process on loopback, called with the official openai client."""

from __future__ import annotations

import llama_cpp  # noqa: F401

import concurrent.futures as cf
import json
import socket
import time

import pytest

from molink_lite.serving.launcher import start_stages, stop_stages
from molink_lite.model.split import LayerRange

from serving import NO_CACHE, GatewayProcess, http, run_gateway_expect_failure

pytestmark = pytest.mark.slow  # real stage and gateway processes
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are"]
# the options of the gemma_stages fixture (conftest.py); llama-cpp-python's Llama (the reference) runs without
# flash attention: the stages must match it
STAGE_ARGS = ["--threads", "1", "--ctx", "4096", "--max-seqs", "8", "--flash-attn", "off"]


@pytest.fixture(scope="module")
def gateway(gemma_stages, tmp_path_factory):
    # f32 hidden states on the wire: the split model reproduces the whole model exactly (the f16
    # default is tested against the whole model in test_serving_f16.py)
    gw = GatewayProcess([[s.url for s in gemma_stages]], extra=["--codec", "f32", *NO_CACHE],
                        log_dir=tmp_path_factory.mktemp("gw"))
    gw.wait_ready()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway):
    from openai import OpenAI

    return OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def whole(gemma3_path):
    llm = llama_cpp.Llama(model_path=gemma3_path, n_ctx=512, n_threads=1, verbose=False)
    yield llm
    llm.close()


def _whole_greedy(llm, prompt: str, n: int) -> str:
    llm.reset()  # no prompt-prefix reuse from the previous call: evaluate the prompt as one batch
    return llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, repeat_penalty=1.0)["choices"][0]["text"]


def test_models_and_health(client, gateway):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["gemma-3-270m-q4_k_m"]
    status, body = http("GET", gateway.url + "/health")
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_matches_whole_model(client, whole, prompt):
    r = client.completions.create(model="gemma-3-270m-q4_k_m", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == _whole_greedy(whole, prompt, 24)
    assert r.usage.completion_tokens == 24
    assert r.usage.prompt_tokens == len(whole.tokenize(prompt.encode(), add_bos=True, special=True))
    assert r.choices[0].finish_reason == "length"


def test_streaming_completion_equals_non_streaming(client, whole):
    prompt = PROMPTS[1]
    parts = [c.choices[0].text for c in client.completions.create(
        model="gemma-3-270m-q4_k_m", prompt=prompt, max_tokens=24, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == _whole_greedy(whole, prompt, 24)
    assert len(parts) > 5  # it really streamed


def test_chat_matches_whole_model_and_streams(client, whole):
    from molink_lite.serving.chat import render_chat

    messages = [{"role": "user", "content": "Name three fruits."}]
    r = client.chat.completions.create(model="gemma-3-270m-q4_k_m", messages=messages, max_tokens=20, temperature=0)
    rendered = render_chat(messages, template=None, arch="gemma3")
    assert rendered.text.startswith("<start_of_turn>user")
    ref = _whole_greedy(whole, rendered.text, 20)
    # the reference may run past an end-of-turn token; ours stops there
    assert r.choices[0].message.content == ref[:len(r.choices[0].message.content)]
    assert r.choices[0].message.content
    stream = client.chat.completions.create(model="gemma-3-270m-q4_k_m", messages=messages, max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_strings_and_seeded_sampling(client):
    r = client.completions.create(model="gemma-3-270m-q4_k_m", prompt="1, 2, 3, 4,", max_tokens=30,
                                  temperature=0, stop=[" 7"])
    assert " 7" not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    kw = dict(model="gemma-3-270m-q4_k_m", prompt="My favourite animal is", max_tokens=16, temperature=0.9,
              top_p=0.95, seed=1234, extra_body={"top_k": 40, "min_p": 0.01, "repeat_penalty": 1.1})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_concurrent_requests_share_batches(client, gateway):
    prompts = [f"Write a sentence about the number {i}." for i in range(8)]
    with cf.ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(client.completions.create, model="gemma-3-270m-q4_k_m", prompt=p, max_tokens=16,
                          temperature=0) for p in prompts]
        results = [f.result() for f in futs]
    # Every request completes in full. (Texts are not compared with single-sequence runs: llama.cpp's CPU
    # matmul takes another kernel for multi-row batches, so batched logits differ in the last bits.)
    assert all(r.usage.completion_tokens == 16 and r.choices[0].text for r in results)
    status, stats = http("GET", gateway.url + "/v1/stats")
    assert status == 200
    stage_stats = stats["pipelines"][0]["stages"]
    assert all(s["max_seqs_in_step"] >= 4 for s in stage_stats), stage_stats


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, "invalid_json"),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), 404, "model_not_found"),
    (json.dumps({"prompt": "hi", "max_tokens": -5}).encode(), 400, "invalid_value"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), 400, "invalid_value"),
    (json.dumps({"prompt": "hi " * 5000, "max_tokens": 8}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"prompt": "hi", "max_tokens": 100000}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"prompt": [1, 2, 99999999]}).encode(), 400, "invalid_value"),
    (json.dumps({"prompt": 12}).encode(), 400, "invalid_value"),
    (json.dumps([1, 2]).encode(), 400, "invalid_json"),
])
def test_bad_completion_requests(gateway, body, status, code):
    got, resp = http("POST", gateway.url + "/v1/completions", raw=body, timeout=30)
    assert got == status, resp
    assert resp["error"]["code"] == code and resp["error"]["message"]


def test_bad_chat_requests(gateway):
    got, resp = http("POST", gateway.url + "/v1/chat/completions", {"messages": []}, timeout=30)
    assert got == 400 and "messages" in resp["error"]["message"]
    got, resp = http("POST", gateway.url + "/v1/chat/completions", {"messages": [{"content": "x"}]}, timeout=30)
    assert got == 400


def _stats(gateway):
    return http("GET", gateway.url + "/v1/stats")[1]["pipelines"][0]


def test_client_disconnect_frees_sequence_everywhere(gateway):
    """A client that goes away mid-stream stops its sequence; its KV is freed on every stage, or kept there as a
    prefix cache entry (which any request that needs the room evicts): either way the stages hold nothing else."""
    st = _stats(gateway)
    before = [s["frees"] for s in st["stages"]]
    body = json.dumps({"prompt": "Tell me a long story.", "max_tokens": 2000, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", gateway.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 5:
        got += s.recv(65536)
    s.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = _stats(gateway)
        frees = [x["frees"] for x in st["stages"]]
        status, health = http("GET", gateway.url + "/health")
        if health["pipelines"][0]["load"] == 0 and st["running"] == 0:
            break
        time.sleep(0.2)
    time.sleep(0.5)   # frees travel with the next (empty) step
    st = _stats(gateway)
    frees, pc = [x["frees"] for x in st["stages"]], st["prefix_cache"]
    assert health["pipelines"][0]["load"] == 0
    assert all(a > b for a, b in zip(frees, before)) or pc["entries"] > 0, (before, frees, pc)
    assert all(x["live_seqs"] == pc["entries"] and x["kv_positions"] == pc["cells"] for x in st["stages"]), st


def test_gateway_refuses_chain_with_gap(gemma_stages):
    r = run_gateway_expect_failure([[gemma_stages[0].url]])
    assert r.returncode == 2
    assert "layers 9-17 are served by no stage" in r.stderr


def test_gateway_refuses_mixed_models(gemma_stages, tiny_models, tmp_path):
    tiny = tiny_models("llama", n_layer=4)
    other = start_stages(tiny, [LayerRange(2, 4)], extra_args=["--threads", "1", "--ctx", "256"],
                         workdir=str(tmp_path))
    try:
        r = run_gateway_expect_failure([[gemma_stages[0].url, other[0].url]])
    finally:
        stop_stages(other)
    assert r.returncode == 2
    assert "different model" in r.stderr
