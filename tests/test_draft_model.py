"""--draft-model: a small model of the same vocabulary, run by the gateway, proposes the speculative drafts.

Real llama.cpp throughout. The draft's proposals are its own greedy continuation, kept right as the pipeline accepts
and rejects them (its KV trimmed to what the sequence really holds); through a real gateway over the demo model split
in two, drafts from a draft model change nothing in the text and bring several tokens per round trip; a draft of
another vocabulary is refused when the pipeline connects.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - import before numpy

import asyncio
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from molink_lite.stage.draft import DraftError, DraftModel
from molink_lite.serving.speculative import SpecState
from molink_lite.stage.engine import StageEngine
from molink_lite.model.split import LayerRange, stage_gguf
from molink_lite.serving.launcher import start_stages, stop_stages

from serving import GatewayProcess, free_port, http

SHAPE = dict(n_layer=2, n_embd=64, n_head=4, n_vocab=256)


def _greedy(path: str, tokens: np.ndarray, n: int) -> list:
    with StageEngine(path, n_ctx=256, n_seq_max=1, n_threads=1) as e:
        seq, pos, t, out = np.zeros(len(tokens), np.int32), np.arange(len(tokens), dtype=np.int32), tokens, []
        for _ in range(n):
            nxt = int(np.argmax(e.forward(seq, pos, tokens=t)[-1]))
            out.append(nxt)
            seq, pos, t = np.zeros(1, np.int32), np.array([pos[-1] + 1], np.int32), np.array([nxt], np.int32)
    return out


def _seq(tokens) -> types.SimpleNamespace:
    spec = SpecState.for_prompt(np.asarray(tokens, np.int32), 64)
    return types.SimpleNamespace(spec=spec)


def test_drafts_are_the_draft_models_greedy_continuation_as_the_sequence_moves(tiny_models):
    path = tiny_models("llama", **SHAPE)
    d = DraftModel(path, n_ctx=512, n_seq_max=4, n_threads=1)
    try:
        prompt = np.array([1, 5, 9, 200, 31], np.int32)
        s, other = _seq(prompt), _seq([7, 7, 44])
        asyncio.run(d.fill([s, other], 4, 5.0))
        assert s.spec.model_at == 5 and list(s.spec.model_drafts) == _greedy(path, prompt, 4)
        assert list(other.spec.model_drafts) == _greedy(path, np.array([7, 7, 44], np.int32), 4)
        assert list(s.spec.candidates(3, 4)) == list(s.spec.model_drafts)  # preferred over prompt lookup
        # the pipeline accepted 2 of the drafts, then the model said something else: the draft's KV holds 3 drafted
        # tokens it must drop; its next proposal continues the sequence as it really is
        real = list(prompt) + list(s.spec.model_drafts[:2]) + [(int(s.spec.model_drafts[2]) + 1) % 256]
        for t in real[5:]:
            s.spec.push(t)
        assert list(s.spec.candidates(3, 4)) != list(s.spec.model_drafts[:4]) or s.spec.model_at != s.spec.length
        asyncio.run(d.fill([s], 4, 5.0))
        assert s.spec.model_at == len(real)
        assert list(s.spec.model_drafts) == _greedy(path, np.array(real, np.int32), 4)
        assert d.stats["rounds"] == 2 and d.stats["tokens_read"] < len(prompt) + 3 + len(real)  # only new tokens read
    finally:
        d.close()


def test_sequences_share_the_drafts_kv_least_recently_used_first(tiny_models):
    """The draft's KV cache holds what it can: the sequence drafted for longest ago gives its cells
    up, and is read again when it comes back; the drafts stay the draft's greedy continuation."""
    path = tiny_models("llama", **SHAPE)
    d = DraftModel(path, n_ctx=64, n_seq_max=4, n_threads=1)
    try:
        rng = np.random.default_rng(5)
        n = d.engine.n_ctx // 2 - 2  # llama.cpp rounds the context up: two of these do not fit with their drafts
        a, b = rng.integers(3, 256, n).astype(np.int32), rng.integers(3, 256, n).astype(np.int32)
        sa, sb = _seq(a), _seq(b)
        for s, toks in ((sa, a), (sb, b), (sa, a)):
            s.spec.model_at = -1
            asyncio.run(d.fill([s], 4, 5.0))
            assert list(s.spec.model_drafts) == _greedy(path, toks, 4)
        assert d.stats["tokens_read"] == 3 * n  # a read twice: b took its cells
        too_long = _seq(rng.integers(3, 256, d.engine.n_ctx))
        asyncio.run(d.fill([too_long], 4, 5.0))
        assert too_long.spec.model_at == -1  # longer than the draft's context: prompt lookup for it
    finally:
        d.close()


def test_a_draft_of_another_vocabulary_or_a_stage_is_refused(tiny_models, tmp_path):
    path = tiny_models("llama", **SHAPE)
    d = DraftModel(path, n_ctx=128, n_seq_max=2, n_threads=1)
    try:
        assert d.check_vocab({"n_vocab": 256}) is None
        assert "256 tokens, the model 262144" in d.check_vocab({"n_vocab": 262144})
        assert "another vocabulary" in d.check_vocab({"n_vocab": 256, "eos": "<not-this>"})
    finally:
        d.close()
    with pytest.raises(DraftError, match="no such file"):
        DraftModel(str(tmp_path / "missing.gguf"))
    with pytest.raises(DraftError, match="stage of a split model"):
        DraftModel(str(stage_gguf(path, LayerRange(0, 1), str(tmp_path))), n_ctx=128, n_seq_max=2, n_threads=1)


def _complete(gw, prompt, n: int) -> dict:
    status, body = http("POST", gw.url + "/v1/completions",
                        {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    return body


@pytest.mark.slow
def test_a_draft_model_through_the_gateway_changes_nothing_and_brings_tokens(tiny_models, tmp_path):
    """A model drafting for itself (the most a draft can agree), split in two behind a gateway, stage 1 behind a
    30 ms relay: the same greedy tokens as without speculation, every draft accepted, several tokens per round
    trip. (An unquantized model: verifying drafts is a multi-row batch, and quantized CPU kernels are not batch
    invariant, which can flip a near-tie: tests/test_speculative_e2e.py.)"""
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=256)
    stages = start_stages(model, [LayerRange(0, 2), LayerRange(2, 4)], workdir=str(tmp_path),
                          extra_args=["--threads", "1", "--ctx", "1024", "--max-seqs", "4"])
    port = free_port()
    relay = subprocess.Popen([sys.executable, "-m", "molink_lite.cli", "link", "--listen", f"127.0.0.1:{port}",
                              "--to", f"127.0.0.1:{stages[1].port}", "--delay-ms", "30"])
    urls = [[stages[0].url, f"ws://127.0.0.1:{port}"]]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 12, 3)]
    try:
        time.sleep(1.0)
        plain = GatewayProcess(urls, extra=["--speculative", "off", "--prefix-cache", "off"], log_dir=tmp_path)
        try:
            plain.wait_ready()
            want = [_complete(plain, p, 24)["choices"][0]["text"] for p in prompts]
        finally:
            plain.stop()
        gw = GatewayProcess(urls, extra=["--speculative", "ngram", "--spec-k", "4", "--prefix-cache", "off",
                                         "--draft-model", model], log_dir=tmp_path)
        try:
            gw.wait_ready()
            got = [_complete(gw, p, 24)["choices"][0]["text"] for p in prompts]
            spec = http("GET", gw.url + "/v1/stats")[1]["pipelines"][0]["speculative"]
        finally:
            gw.stop()
    finally:
        relay.terminate()
        relay.wait(10)
        stop_stages(stages)
    print(spec)
    assert got == want
    assert spec["draft_model"]["rounds"] > 0 and spec["draft_model"]["path"] == model
    assert spec["acceptance"] > 0.9, spec
    assert spec["tokens_per_round_trip"] > 2.0, spec


@pytest.mark.slow
def test_a_draft_of_another_vocabulary_stops_the_gateway_with_the_reason(tiny_models, tmp_path):
    model = tiny_models("llama", **SHAPE)
    draft = tiny_models("llama", **{**SHAPE, "n_vocab": 320})
    stages = start_stages(model, [LayerRange(0, 1), LayerRange(1, 2)], workdir=str(tmp_path),
                          extra_args=["--threads", "1", "--ctx", "256", "--max-seqs", "2"])
    gw = GatewayProcess([[sp.url for sp in stages]], extra=["--speculative", "ngram", "--draft-model", draft],
                        log_dir=tmp_path)
    try:
        gw.proc.wait(120)
        assert gw.proc.returncode != 0
        assert "cannot draft for this model: the draft model has 320 tokens, the model 256" in gw.output()
    finally:
        gw.stop()
        stop_stages(stages)
