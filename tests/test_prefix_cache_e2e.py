"""Issue 27 end to end: the prefix cache over real stage processes (Gemma 3 270M split in two, whose sliding-window
attention makes its stages copy whole sequences only; f32 wire).

* multi-turn conversations: every turn's greedy reply and logprobs with the cache equal, bit for bit, those
  without it (the same batch composition: see the exactness section), and the later turns prefill only what is
  new (in process: Pipeline objects over real stages);
* two replicas: a conversation's next turn goes to the replica holding its prefix, and a kill -9 of that replica's
  stage mid-turn still completes the turn on the other (replay, prefilling the prefix there);
* 16 concurrent users of one 1,000-token system prompt through the gateway: stage 0's prefill rows in /metrics
  drop at least 10x against the cache off (a llama-architecture model; Gemma 3's sliding window: 5x);
* a small budget under pressure: every request is answered and the cached cells never exceed the budget.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import asyncio
import concurrent.futures as cf
import re

import numpy as np
import pytest

from molink_lite.model.split import LayerRange
from molink_lite.serving.launcher import start_stages, stop_stages
from molink_lite.serving.pipeline import Pipeline
from molink_lite.serving.sequence import GenRequest, SeqState
from molink_lite.wire.protocol import SamplingParams

from serving import GatewayProcess, http, replica_router, replica_stages

pytestmark = pytest.mark.slow
STAGE_ARGS = ["--ctx", "20480", "--max-seqs", "24", "--threads", "1", "--codec", "f32", "--flash-attn", "off"]
RANGES = [LayerRange(0, 9), LayerRange(9, 18)]
GREEDY = SamplingParams(temperature=0.0)
WORDS = ("river stone light garden winter paper music orange window market doctor silver forest engine letter "
         "harbor candle mountain teacher bridge").split()


def text(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n)) + "."


async def collect(s, timeout: float = 300):
    evs = []
    while True:
        ev = await asyncio.wait_for(s.events.get(), timeout)
        evs.append(ev)
        if ev.kind == "error":
            raise AssertionError(ev.message)
        if ev.kind == "done":
            return evs


def _stages(gemma3_path, tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    return start_stages(gemma3_path, RANGES, extra_args=STAGE_ARGS, workdir=str(d))


# ---------------------------------------------------------------------- exactness (in process)
# Bit for bit with the same batch composition. llama.cpp's CPU kernels are not batch invariant (Gemma 3 270M's
# logprobs for one prompt prefilled 64 rows at a time and 1 row at a time differ by up to 0.73 nats), and without
# flash attention the attention sums also depend on where a sequence's cells lie in the KV buffer (which other
# sequences, cached or running, move). So the comparison runs with flash attention (whose sums follow the cells in
# position order, wherever they lie: measured invariant) and one row per step on both pipelines, where a prefix
# computed in an earlier turn was computed exactly as a fresh prefill computes it: every logprob must be equal.
EXACT_ARGS = ["--ctx", "8192", "--max-seqs", "16", "--threads", "1", "--codec", "f32", "--flash-attn", "on"]


def test_twenty_conversations_reply_the_same_with_and_without_the_cache(gemma3_path, tmp_path):
    with replica_stages(gemma3_path, RANGES, EXACT_ARGS, tmp_path) as (a, b):
        asyncio.run(_conversations(a, b))


async def _conversations(a, b):
    on = Pipeline([sp.url for sp in a], codec="f32", name="on", prefix_cache=True, prefill_chunk=1)
    off = Pipeline([sp.url for sp in b], codec="f32", name="off", prefix_cache=False, prefill_chunk=1)
    await on.connect(60)
    await off.connect(60)
    try:
        assert on.prefix_stats()["copies"] == "whole sequences"     # sliding-window attention
        for conv in range(20):
            history = await on.tokenize(text(conv, 12))
            for turn in range(3):
                prompt = np.concatenate([history, await on.tokenize(" " + text(1000 * conv + turn, 5),
                                                                     add_special=False)])
                replies = []
                for p in (on, off):
                    before = p.stats["prefill_rows"]
                    s = run_on(p, prompt, max_tokens=6, logprobs=1)
                    lps = [(x.token, x.logprob) for e in await collect(s) if e.kind == "text" for x in e.logprobs]
                    replies.append((s.generated, lps, p.stats["prefill_rows"] - before))
                (got, lp_on, rows_on), (want, lp_off, rows_off) = replies
                assert got == want and lp_on == lp_off, (conv, turn)
                assert rows_off == len(prompt)
                if turn:   # only the new message and the reply's last token are prefilled
                    assert rows_on == len(prompt) - len(history) + 1, (conv, turn, rows_on, len(prompt))
                history = np.concatenate([prompt, np.asarray(got, np.int32)])
        st = on.prefix_stats()
        assert st["prefix_hits"] >= 40 and st["cells"] <= st["budget"]
    finally:
        await on.close()
        await off.close()


def run_on(p: Pipeline, prompt: np.ndarray, max_tokens: int = 8, logprobs: int = -1) -> SeqState:
    """A greedy request queued straight on one pipeline."""
    s = SeqState(GenRequest(prompt, GREEDY, max_tokens, ignore_eos=True, logprobs=logprobs), events=asyncio.Queue())
    p.add(s)
    return s


# ---------------------------------------------------------------------- two replicas, kill -9 mid-turn
def test_the_next_turn_goes_to_the_replica_holding_the_prefix_and_survives_its_loss(gemma3_path, tmp_path):
    with replica_stages(gemma3_path, RANGES, STAGE_ARGS, tmp_path) as (a, b):
        asyncio.run(_replicas(a, b))


async def _replicas(a, b):
    async with replica_router(a, b) as (pa, pb, r):
        prompt = await r.tokenize(text(7, 120))
        s = r.submit(GenRequest(prompt, GREEDY, 8, ignore_eos=True))
        holder = s.pipeline
        await collect(s)
        other = pb if holder is pa else pa
        prompt = np.concatenate([prompt, np.asarray(s.generated, np.int32), await r.tokenize(" " + text(8, 30),
                                                                                           add_special=False)])
        # the reference: the same turn on the other replica, alone (no cache there for it)
        alone = run_on(other, prompt, 24)
        await collect(alone)
        hits = holder.stats["prefix_hits"]
        s = r.submit(GenRequest(prompt, GREEDY, 24, ignore_eos=True))
        assert s.pipeline is holder
        while len(s.generated) < 6:
            await asyncio.sleep(0.01)
        assert holder.stats["prefix_hits"] == hits + 1
        (a if holder is pa else b)[1].proc.kill()
        await collect(s)
        assert s.replays == 1 and s.generated == alone.generated


# ---------------------------------------------------------------------- through the gateway: many users, pressure
def _prefill_rows(gw) -> float:
    status, body = http("GET", gw.url + "/metrics", timeout=30)
    assert status == 200
    text_ = body if isinstance(body, str) else body.decode()
    m = re.search(r'molink_pipeline_rows_total\{[^}]*kind="prefill"[^}]*\} ([0-9.e+]+)', text_)
    return float(m.group(1)) if m else 0.0


def _complete(gw, prompt: str, max_tokens: int = 4):
    status, resp = http("POST", gw.url + "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                              "temperature": 0}, timeout=600)
    assert status == 200, resp
    return resp


@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_sixteen_users_of_one_system_prompt_prefill_it_once(model, gemma3_path, tiny_models, tmp_path):
    """16 users at once, one 1,000-token system prompt, through the gateway (stage 0's prefill rows in /metrics).

    A llama-architecture model (any prefix can be copied): the prompt is prefilled once, more than 10x fewer
    rows. Gemma 3 (sliding-window attention: whole copies only): the first request's prefill runs past the shared
    part before the others arrive, so the second request prefills it too and keeps it (a branch point) for the
    other 14: about 2 prefills (more than 5x fewer rows)."""
    rng = np.random.default_rng(3)
    if model == "llama":
        path = tiny_models("llama", n_vocab=1000, n_ctx_train=32768)
        system = rng.integers(1, 1000, 1000).tolist()
        users = [system + rng.integers(1, 1000, 8).tolist() for _ in range(16)]
        need = 10
    else:
        path = gemma3_path
        system = text(42, 990)
        users = [system + " " + text(100 + i, 8) for i in range(16)]
        need = 5
    d = tmp_path / "s"
    d.mkdir()
    stages = start_stages(path, RANGES if model == "gemma3" else [LayerRange(0, 2), LayerRange(2, 4)],
                          extra_args=STAGE_ARGS, workdir=str(d))
    rows = {}
    try:
        for mode in ("off", "on"):
            gw = GatewayProcess([[s.url for s in stages]], extra=["--prefix-cache", mode], log_dir=tmp_path)
            try:
                gw.wait_ready()
                before = _prefill_rows(gw)
                with cf.ThreadPoolExecutor(16) as ex:
                    answers = list(ex.map(lambda u: _complete(gw, u), users))
                rows[mode] = _prefill_rows(gw) - before
                assert len(answers) == 16
                cached = sum(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers)
                assert (cached >= 10 * 900) if mode == "on" else cached == 0   # OpenAI's usage field says so
            finally:
                gw.stop()
    finally:
        stop_stages(stages)
    print(f"{model}: stage-0 prefill rows for 16 users of a 1,000-token system prompt: cache off {rows['off']:.0f}, "
          f"on {rows['on']:.0f} ({rows['off'] / max(1, rows['on']):.1f}x fewer)")
    assert rows["off"] >= 16 * 1000 and rows["on"] * need <= rows["off"], rows


def test_a_small_budget_under_pressure_answers_everything(gemma3_path, tmp_path):
    stages = _stages(gemma3_path, tmp_path, "p")
    try:
        gw = GatewayProcess([[s.url for s in stages]], extra=["--prefix-cache-cells", "600"], log_dir=tmp_path)
        try:
            gw.wait_ready()
            prompts = [text(500 + i, 60 + 7 * i) for i in range(40)]
            with cf.ThreadPoolExecutor(8) as ex:
                futs = [ex.submit(_complete, gw, p, 6) for p in prompts]
                peak = 0
                while not all(f.done() for f in futs):
                    status, st = http("GET", gw.url + "/v1/stats", timeout=30)
                    pc = st["pipelines"][0]["prefix_cache"]
                    peak = max(peak, pc["cells"])
                    assert pc["cells"] <= pc["budget"] <= 600
                for f in futs:
                    assert f.result()["choices"][0]["finish_reason"] in ("length", "stop")
            status, st = http("GET", gw.url + "/v1/stats", timeout=30)
            pc = st["pipelines"][0]["prefix_cache"]
            assert pc["evictions"] > 0 and 0 < pc["cells"] <= 600 and peak <= 600
        finally:
            gw.stop()
    finally:
        stop_stages(stages)


def test_speculation_and_n_choices_on_cached_prefixes(gemma3_path, tmp_path):
    """A conversation that repeats itself (prompt lookup drafts plenty) through a gateway that speculates, with
    the cache on and off over the same stages: the replies are the same (a repeating text: wide margins), the
    later turns come from the cache, drafts were sent and accepted, and n = 3 seeded choices on a cached prefix
    repeat themselves."""
    d = tmp_path / "t"
    d.mkdir()
    stages = start_stages(gemma3_path, RANGES, workdir=str(d),
                          extra_args=["--threads", "1", "--ctx", "4096", "--max-seqs", "8", "--codec", "f32"])
    line = "The cat sat on the mat. The dog sat on the log. "
    replies = {}
    try:
        for mode in ("off", "on"):
            gw = GatewayProcess([[s.url for s in stages]], log_dir=tmp_path,
                                extra=["--prefix-cache", mode, "--speculative", "ngram", "--codec", "f32"])
            try:
                gw.wait_ready()
                text_, out, cached = line * 3, [], []
                for turn in range(3):
                    status, r = http("POST", gw.url + "/v1/completions",
                                     {"prompt": text_, "max_tokens": 24, "temperature": 0}, timeout=300)
                    assert status == 200, r
                    out.append(r["choices"][0]["text"])
                    cached.append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
                    text_ += out[-1] + " " + line
                spec = http("GET", gw.url + "/v1/stats")[1]["pipelines"][0]["speculative"]
                assert spec["drafted"] > 0 and spec["accepted"] > 0, spec
                group = [http("POST", gw.url + "/v1/completions",
                              {"prompt": text_, "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 3},
                              timeout=300)[1] for _ in range(2)]
                assert [c["text"] for c in group[0]["choices"]] == [c["text"] for c in group[1]["choices"]]
                replies[mode] = out
                if mode == "on":
                    assert all(c > 0 for c in cached[1:]), cached
                else:
                    assert cached == [0, 0, 0]
            finally:
                gw.stop()
    finally:
        stop_stages(stages)
    assert replies["on"] == replies["off"]
