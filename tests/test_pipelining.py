"""Weak-link features with real processes: micro-batches overlap, chunked prefill interleaves with
decode, and the prefill chunk is chosen from the link measured through a ``molink-lite link`` relay."""

from __future__ import annotations

import llama_cpp  # noqa: F401

import concurrent.futures as cf
import json
import subprocess
import sys
import time

import pytest

from molink_lite.serving.scheduler import chunk_for_link

from serving import GatewayProcess, free_port, http

STAGE_ARGS = ["--threads", "1", "--ctx", "4096", "--max-seqs", "8"]  # of the gemma_stages fixture (conftest.py)


def _stats(gw, timeline: bool = False) -> dict:
    return http("GET", gw.url + "/v1/stats" + ("?timeline=1" if timeline else ""))[1]["pipelines"][0]


def _complete(gw, prompt: str, n: int) -> dict:
    status, body = http("POST", gw.url + "/v1/completions",
                        {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    return body


def _overlaps(a, b) -> int:
    """Pairs of different steps whose compute intervals on two stages overlap in time."""
    return sum(1 for sa, a0, a1 in a for sb, b0, b1 in b if sa != sb and a0 < b1 and b0 < a1)


def _run_load(gw, n: int = 8, tokens: int = 12) -> None:
    with cf.ThreadPoolExecutor(n) as ex:
        done = list(ex.map(lambda i: _complete(gw, f"Tell me about the number {i}.", tokens), range(n)))
    assert all(d["usage"]["completion_tokens"] == tokens for d in done)


@pytest.mark.slow
def test_micro_batches_overlap_across_stages(gemma_stages, tmp_path):
    """With 2 micro-batches, stage 0 computes one step while stage 1 computes another; with 1, never."""
    urls = [s.url for s in gemma_stages]
    seen = {}
    for mb in (1, 2):
        gw = GatewayProcess([urls], extra=["--micro-batches", str(mb)], log_dir=tmp_path)
        try:
            gw.wait_ready()
            t_start = time.perf_counter()
            _run_load(gw)
            st = _stats(gw, timeline=True)
        finally:
            gw.stop()
        s0, s1 = ([e for e in s["timeline"] if e[1] >= t_start] for s in st["stages"])
        assert s0 and s1
        seen[mb] = (_overlaps(s0, s1), st["scheduler"]["max_inflight_seen"])
    assert seen[1] == (0, 1), seen
    overlaps, inflight = seen[2]
    assert inflight == 2 and overlaps > 0, seen


@pytest.mark.slow
def test_long_prompt_chunks_travel_the_chain_together(gemma_stages, tmp_path):
    """A lone long prompt with 2 micro-batches: stage 0 computes chunk k+1 while stage 1 computes chunk k (the
    next chunk does not wait for the previous one to come back), and the reply is the one of 1 micro-batch."""
    urls = [s.url for s in gemma_stages]
    seen = {}
    for mb in (1, 2):
        gw = GatewayProcess([urls], extra=["--micro-batches", str(mb), "--prefill-chunk", "64"], log_dir=tmp_path)
        try:
            gw.wait_ready()
            t_start = time.perf_counter()
            body = _complete(gw, "word " * 300, 6)
            st = _stats(gw, timeline=True)
        finally:
            gw.stop()
        s0, s1 = ([e for e in s["timeline"] if e[1] >= t_start] for s in st["stages"])
        seen[mb] = (body["choices"][0]["text"], _overlaps(s0, s1), st["scheduler"]["max_inflight_seen"])
    assert seen[1][1:] == (0, 1), seen
    assert seen[2][0] == seen[1][0]
    assert seen[2][2] == 2 and seen[2][1] > 0, seen


@pytest.mark.slow
def test_chunked_prefill_interleaves_with_decode(gemma_stages, tmp_path):
    """A long prompt goes in chunks; decoding requests keep getting tokens while it is prefilled."""
    gw = GatewayProcess([[s.url for s in gemma_stages]], extra=["--prefill-chunk", "64"], log_dir=tmp_path)
    try:
        gw.wait_ready()
        before = _stats(gw)["scheduler"]
        stamps: list = []

        def decode(i: int) -> None:
            body = json.dumps({"prompt": f"Count slowly {i}:", "max_tokens": 60, "temperature": 0,
                               "ignore_eos": True, "stream": True}).encode()
            import urllib.request

            req = urllib.request.Request(gw.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                for line in r:
                    if line.startswith(b"data: {"):
                        stamps.append(time.perf_counter())

        with cf.ThreadPoolExecutor(5) as ex:
            futs = [ex.submit(decode, i) for i in range(4)]
            time.sleep(1.0)
            t_long = time.perf_counter()
            long = ex.submit(_complete, gw, "word " * 700, 1)
            long_done = long.result()
            t_long_end = time.perf_counter()
            for f in futs:
                f.result()
        after = _stats(gw)["scheduler"]
    finally:
        gw.stop()
    n_prompt = long_done["usage"]["prompt_tokens"]
    assert n_prompt > 600
    assert after["mixed_steps"] - before["mixed_steps"] >= 5  # steps carrying prompt chunks and decode rows
    assert after["prefill_rows"] - before["prefill_rows"] >= n_prompt
    during = [t for t in stamps if t_long < t < t_long_end]
    assert len(during) >= 8, f"decoders got {len(during)} tokens while the long prompt was prefilled"


def test_chunk_for_link():
    # 100 Mbit/s, 10 ms one way, gemma3-270m (n_embd 640) rows in f16: 12.5 MB/s x 10 ms / 1296 B
    assert chunk_for_link(0.020, 100, 640, "f16") == 96
    assert chunk_for_link(0.020, 100, 640, "f32") == 48
    assert chunk_for_link(0.0004, 10_000, 640, "f16", max_tokens=512) == 512  # loopback: capped
    assert chunk_for_link(0.001, 1, 4096, "f16") == 32  # very slow link: floor


@pytest.mark.slow
def test_prefill_chunk_chosen_from_link_through_relay(gemma_stages, tmp_path):
    """The gateway measures stage 0 -> stage 1 through a 10 ms / 100 Mbit relay and sizes chunks from it."""
    port = free_port()
    relay = subprocess.Popen([sys.executable, "-m", "molink_lite.cli", "link", "--listen", f"127.0.0.1:{port}",
                              "--to", f"127.0.0.1:{gemma_stages[1].port}", "--delay-ms", "10", "--rate-mbit", "100"])
    gw = None
    try:
        time.sleep(1.0)
        gw = GatewayProcess([[gemma_stages[0].url, f"ws://127.0.0.1:{port}"]], log_dir=tmp_path)
        gw.wait_ready()
        st = _stats(gw)
        (link,) = st["links"]
        assert link["rtt_ms"] >= 20.0  # two crossings of the 10 ms relay
        assert link["mbit"] < 100 * 1.2
        assert st["prefill_chunk"] == chunk_for_link(link["rtt_ms"] / 1e3, link["mbit"], 640, "f16")
        assert 32 <= st["prefill_chunk"] <= 160
        assert _complete(gw, "The capital of France is", 4)["usage"]["completion_tokens"] == 4
    finally:
        if gw is not None:
            gw.stop()
        relay.terminate()
        relay.wait(10)


def _relay(port_to: int, delay_ms: str, mbit: str):
    port = free_port()
    relay = subprocess.Popen([sys.executable, "-m", "molink_lite.cli", "link", "--listen", f"127.0.0.1:{port}",
                              "--to", f"127.0.0.1:{port_to}", "--delay-ms", delay_ms, "--rate-mbit", mbit])
    time.sleep(1.0)
    return relay, port


@pytest.mark.slow
@pytest.mark.parametrize("codec_opt,want", [("auto", "int8"), ("f16", "f16")])
def test_codec_chosen_from_the_link(gemma_stages, tmp_path, codec_opt, want):
    """--codec auto (the default) over a 10 Mbit/s link: a full decode round of f16 hidden states (8 x 640) would take
    8 ms, over the 5 ms budget, so the stages are switched to int8, and say so; a fixed --codec is kept."""
    relay, port = _relay(gemma_stages[1].port, "1", "10")
    gw = None
    try:
        # auto: the links are also measured again every second while up (ChainLifecycle.relink), under load
        extra = ["--relink-interval", "1"] if codec_opt == "auto" else ["--codec", codec_opt]
        gw = GatewayProcess([[gemma_stages[0].url, f"ws://127.0.0.1:{port}"]], extra=extra, log_dir=tmp_path)
        gw.wait_ready()
        st = _stats(gw)
        assert st["codec"] == want and st["link_choice"]["codec"] == want
        assert ("over the 5 ms budget" in st["link_choice"]["why"]) == (codec_opt == "auto")
        assert [s["codec"] for s in st["stages"]] == [want, want]  # the stages were told
        # CPU stages: one micro-batch per stage, whatever the link
        assert st["micro_batches"] == 2 and st["link_choice"]["micro_batches"] == 2
        assert _complete(gw, "The capital of France is", 6)["usage"]["completion_tokens"] == 6
        time.sleep(2.5)
        _run_load(gw, n=4, tokens=8)  # while the links are measured again
        st = _stats(gw)
        assert st["codec"] == want and st["state"] == "up" and st["failures"] == 0
        status = subprocess.run([sys.executable, "-m", "molink_lite.cli", "status", gw.url],
                                capture_output=True, text=True, timeout=60)
        assert f"links: codec {want}" in status.stdout, status.stdout
    finally:
        if gw is not None:
            gw.stop()
        relay.terminate()
        relay.wait(10)
