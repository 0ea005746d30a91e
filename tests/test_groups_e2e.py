"""Issue 26 end to end, in process (Pipeline + Router over real stages, Gemma 3 270M, f32 wire): n > 1 choices
share one prefill (stage 0 counts it once), logprobs and prompt scoring (echo), a group surviving a failover."""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import asyncio

import pytest

from molink_lite.model.split import LayerRange
from molink_lite.serving.pipeline import Pipeline
from molink_lite.serving.router import Router
from molink_lite.serving.sequence import GenRequest
from molink_lite.wire.protocol import SamplingParams

from serving import replica_router, replica_stages

pytestmark = pytest.mark.slow
STAGE_ARGS = ["--ctx", "2048", "--max-seqs", "16", "--threads", "1", "--codec", "f32", "--flash-attn", "off"]
GREEDY = SamplingParams(temperature=0.0)


async def collect(s, timeout: float = 120):
    evs = []
    while True:
        ev = await asyncio.wait_for(s.events.get(), timeout)
        evs.append(ev)
        if ev.kind in ("done", "error"):
            return evs


def test_groups_logprobs_and_echo(gemma_stages):
    asyncio.run(_groups(gemma_stages))


async def _groups(stages):
    p = Pipeline([sp.url for sp in stages], codec="f32", name="A")
    await p.connect(60)
    r = Router([p])
    try:
        prompt = await r.tokenize("The capital of France is Paris. The capital of Germany is")
        n_prompt = int(prompt.shape[0])
        one = r.submit(GenRequest(prompt, GREEDY, 8, ignore_eos=True))
        await collect(one)
        rows0 = (await p.stage_stats())[0]["rows"]
        seqs = r.submit_group(GenRequest(prompt, GREEDY, 8, ignore_eos=True), 4)
        assert [e[-1].finish_reason for e in await asyncio.gather(*(collect(s) for s in seqs))] == ["length"] * 4
        assert all(s.generated == one.generated for s in seqs)
        # stage 0: the prompt but its last token once, the last token once per choice, then 7 decode rows each
        assert (await p.stage_stats())[0]["rows"] - rows0 == (n_prompt - 1) + 4 + 4 * 7
        assert p.stats["forks"] == 3

        s = r.submit(GenRequest(prompt, GREEDY, 6, ignore_eos=True, logprobs=3))
        lps = [x for e in await collect(s) if e.kind == "text" for x in e.logprobs]
        assert [x.token for x in lps] == s.generated and b"".join(x.bytes for x in lps).decode() == s.text
        assert all(len(x.top) == 3 and x.top[0][0] == x.token for x in lps)      # greedy: the best is the one taken

        s = r.submit(GenRequest(prompt, GREEDY, 0, logprobs=1, echo=True))
        evs = await collect(s)
        assert [e.kind for e in evs] == ["prompt_logprobs", "done"] and evs[-1].finish_reason == "length"
        alone = evs[0].logprobs
        assert [x.token for x in alone] == prompt.tolist() and alone[0].logprob is None
        assert all(x.logprob <= 0 and len(x.top) == 1 for x in alone[1:])

        seqs = r.submit_group(GenRequest(prompt, GREEDY, 3, logprobs=0, echo=True), 2)
        for evs in await asyncio.gather(*(collect(s) for s in seqs)):
            assert evs[0].kind == "prompt_logprobs" and [e.kind for e in evs].count("prompt_logprobs") == 1
            assert [round(x.logprob, 3) for x in evs[0].logprobs[1:]] == [round(x.logprob, 3) for x in alone[1:]]
    finally:
        await p.close()


def test_a_group_replays_member_by_member(gemma3_path, tmp_path):
    with replica_stages(gemma3_path, [LayerRange(0, 9), LayerRange(9, 18)], STAGE_ARGS, tmp_path) as (a, b):
        asyncio.run(_failover(a, b))


async def _failover(a, b):
    async with replica_router(a, b) as (pa, pb, r):
        prompt = await r.tokenize("The capital of France is")
        pb.state = "connecting"   # the group starts on A
        seqs = r.submit_group(GenRequest(prompt, GREEDY, 32, ignore_eos=True, logprobs=0, echo=True), 3)
        pb.state = "up"
        while min(len(s.generated) for s in seqs) < 8:
            await asyncio.sleep(0.01)
        a[1].proc.kill()
        evs = await asyncio.gather(*(collect(s) for s in seqs))
        assert [e[-1].finish_reason for e in evs] == ["length"] * 3
        for s, e in zip(seqs, evs):
            assert s.replays == 1 and s.pipeline is pb
            assert [x.kind for x in e].count("prompt_logprobs") == 1       # not scored again by the replay
            assert "".join(x.text for x in e if x.kind == "text") == s.text
            assert [t.token for x in e if x.kind == "text" for t in x.logprobs] == s.generated
            k = int(s.feed.shape[0]) - int(prompt.shape[0])   # replayed alone: prompt + its tokens
            ref = r.submit(GenRequest(s.feed.copy(), GREEDY, 32 - k, ignore_eos=True))
            await collect(ref)
            assert ref.generated == s.generated[k:]
