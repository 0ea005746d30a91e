"""The prefix cache's logic (serving/prefix_cache.py, slots.py, scheduler.py, step_builder.py) against a simulated
stage that keeps every slot's KV as a list of tokens and answers with a token that depends on everything the
sequence's KV holds (a hash): a copy of the wrong positions, a position read past the shared prefix, a free or
eviction at the wrong time all change the answers. Frames go through the real encoder and the real stage check
(:func:`molink_lite.stage.validate.check_step`), with "any" and "whole" copies.

The same properties with llama.cpp and real processes: tests/test_prefix_cache_e2e.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Dict, List

import numpy as np
import pytest

from molink_lite.serving.pipeline import Pipeline
from molink_lite.serving.prefix_cache import MIN_REUSE, PrefixCache, common_prefix
from molink_lite.serving.router import Router
from molink_lite.serving.sequence import GenRequest, SeqState
from molink_lite.stage.validate import check_step
from molink_lite.wire.codec import decode_frame, encode_frame
from molink_lite.wire.protocol import FrameLimits, ResultFrame, SamplingParams, StepFrame, lane_of

VOCAB = 1000
GREEDY = SamplingParams(temperature=0.0)


class SimStage:
    """One stage (and the model): KV per slot as tokens; the sampled token hashes the sequence's whole KV."""

    def __init__(self, max_seqs: int, n_ctx: int, whole: bool, lanes: int = 1):
        self.kv: Dict[int, List[int]] = {s: [] for s in range(max_seqs)}
        self.lim = FrameLimits(n_seq_max=max_seqs, n_ctx=n_ctx, max_rows=256, n_vocab=VOCAB, n_embd_inp=16,
                               is_first=True, is_last=True, lanes=lanes)
        self.whole = whole
        self.lanes = lanes
        self.frames: List[StepFrame] = []

    def run(self, meta: dict, arrays: dict) -> ResultFrame:
        seq_len = np.asarray([len(self.kv[s]) for s in range(len(self.kv))], np.int64)
        f = check_step(meta, arrays, self.lim, seq_len, self.whole)
        self.frames.append(f)
        for s in f.free:
            self.kv[s] = []
        for s, p in f.trim.items():
            self.kv[s] = self.kv[s][:p]
        for c, (p, n) in f.fork.items():
            assert lane_of(c, self.lanes) == lane_of(p, self.lanes) == f.lane   # a copy stays in its lane
            self.kv[c] = list(self.kv[p][:n])
        out_seq, out_tok = [], []
        rows = zip(f.seq.tolist(), f.pos.tolist(), f.tokens.tolist(), f.out.tolist()) if f.n else ()
        for s, pos, tok, out in rows:
            assert pos == len(self.kv[s])
            self.kv[s].append(tok)
            if out:
                out_seq.append(s)
                out_tok.append(self.answer(self.kv[s]))
        return ResultFrame(f.step, np.asarray(out_seq, np.int32), np.asarray(out_tok, np.int32),
                           pieces=[f"<{t}>" for t in out_tok])

    @staticmethod
    def answer(tokens: List[int]) -> int:
        return int.from_bytes(hashlib.blake2b(np.asarray(tokens, np.int32).tobytes(), digest_size=4).digest(),
                              "little") % VOCAB


class Channel:
    def __init__(self):
        self.name, self.closed, self.sent = "stage sim", asyncio.Event(), []

    def send(self, meta, arrays=None, codec="f16"):
        self.sent.append(decode_frame(encode_frame(meta, arrays, codec=codec)))

    async def close(self):
        self.closed.set()


def pipeline(cache: bool, whole: bool = False, max_seqs: int = 8, n_ctx: int = 2048, budget: int = 0,
             chunk: int = 16, name: str = "p", lanes: int = 1) -> Pipeline:
    info = {"max_seqs": max_seqs, "n_ctx": n_ctx, "n_ctx_lane": n_ctx // lanes, "lanes": lanes, "max_rows": 256,
            "n_embd": 16, "n_vocab": VOCAB, "prefix_reuse": "whole" if whole else "any"}
    p = Pipeline([f"ws://{name}:9"], name=name, prefill_chunk=chunk, max_inflight=2, max_batch_tokens=256,
                 prefix_cache=cache, prefix_cache_cells=budget)
    p.chain.channels, p.chain.infos = [Channel()], [info]
    p._size_for([info])
    p.state = "up"
    p.sim = SimStage(max_seqs, n_ctx, whole, lanes)
    return p


def pump(p: Pipeline, until=lambda: False, max_turns: int = 10000) -> None:
    """schedule -> send -> the simulated stage -> apply, step by step (in order), until nothing is left."""
    ch = p.chain.channels[0]
    for _ in range(max_turns):
        if until():
            return
        p.slots.admit(p.waiting)
        picked = p._schedule()
        if picked is None:
            if not p.inflight:
                return
        else:
            p._send(*picked)
        while ch.sent:
            meta, arrays = ch.sent.pop(0)[:2]
            p._on_result(*p.sim.run(meta, arrays).to_wire())
    raise AssertionError("the pipeline never settled")


def submit(p: Pipeline, prompt, max_tokens: int = 6) -> SeqState:
    s = SeqState(GenRequest(np.asarray(prompt, np.int32), GREEDY, max_tokens, ignore_eos=True),
                 events=asyncio.Queue())
    p.add(s)
    return s


def reference(prompt: List[int], max_tokens: int) -> List[int]:
    """What the simulated model generates for a prompt prefilled alone."""
    kv, out = list(prompt), []
    for _ in range(max_tokens):
        t = SimStage.answer(kv)
        out.append(t)
        kv.append(t)
    return out[:max_tokens]


def toks(rng: random.Random, n: int) -> List[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


# ---------------------------------------------------------------------- pure helpers
def test_common_prefix():
    a = np.asarray([1, 2, 3, 4], np.int32)
    assert common_prefix(a, a) == 4
    assert common_prefix(a, a[:2]) == 2
    assert common_prefix(a, np.asarray([1, 2, 9], np.int32)) == 2
    assert common_prefix(a, np.asarray([9], np.int32)) == 0
    assert common_prefix(a, np.zeros(0, np.int32)) == 0


# ---------------------------------------------------------------------- exactness and what crosses the chain
@pytest.mark.parametrize("whole", [False, True])
def test_multi_turn_chats_equal_a_run_without_the_cache_and_prefill_only_what_is_new(whole):
    rng = random.Random(1)
    p_on, p_off = pipeline(True, whole), pipeline(False, whole)
    for conv in range(5):
        history: List[int] = toks(rng, 30)
        for turn in range(4):
            prompt = history + toks(rng, rng.randrange(3, 40))
            got = {}
            for p in (p_on, p_off):
                before = p.stats["prefill_rows"]
                s = submit(p, prompt)
                pump(p)
                assert s.finished and not s.cancelled
                got[p.name + str(p.slots.cache.enabled)] = (s.generated, p.stats["prefill_rows"] - before)
            (on, rows_on), (off, rows_off) = got["pTrue"], got["pFalse"]
            assert on == off == reference(prompt, 6)
            assert rows_off == len(prompt)
            if turn:   # the reply's last token and the new message are new; the rest comes from the cache
                assert rows_on == len(prompt) - len(history) + 1, (rows_on, len(prompt), len(history))
            history = prompt + on
    assert p_on.stats["prefix_hits"] >= 15 and p_on.stats["prefix_tokens_reused"] > 0


def test_a_follow_up_copies_the_entry_and_prefills_the_rest():
    p = pipeline(True)
    rng = random.Random(2)
    a = toks(rng, 40)
    s1 = submit(p, a, 4)
    pump(p)
    entry = p.slots.cache.entries[s1.slot]
    assert entry.tokens.tolist() == a + s1.generated[:3]          # the last token was never fed
    b = a + s1.generated + toks(rng, 5)
    s2 = submit(p, b, 4)
    pump(p)
    first = next(f for f in p.sim.frames if s2.slot in f.start)
    assert first.fork == {s2.slot: (s1.slot, 43)} and first.pos.min() == 43
    assert s2.generated == reference(b, 4)
    # a request that shares only part of the entry reads nothing past the shared part
    c = a[:20] + toks(rng, 10)
    s3 = submit(p, c, 4)
    pump(p)
    assert p.sim.kv[s3.slot][:20] == a[:20] and p.sim.kv[s3.slot][20:30] == c[20:]
    assert s3.generated == reference(c, 4)


def test_whole_copies_only_take_an_entry_that_is_all_prefix():
    p = pipeline(True, whole=True)
    rng = random.Random(3)
    a = toks(rng, 40)
    submit(p, a, 4)
    pump(p)
    rows = p.stats["prefill_rows"]
    c = a[:20] + toks(rng, 10)            # shares 20 of the entry's 43 positions: not reusable whole
    s = submit(p, c, 4)
    pump(p)
    assert p.stats["prefill_rows"] - rows == len(c) and s.generated == reference(c, 4)


def test_no_free_slot_left_the_sequence_takes_the_entry_itself():
    p = pipeline(True, max_seqs=1)
    rng = random.Random(4)
    a = toks(rng, 40)
    s1 = submit(p, a, 4)
    pump(p)
    b = a[:30] + toks(rng, 6)
    seen = len(p.sim.frames)
    s2 = submit(p, b, 4)
    pump(p)
    first = next(f for f in p.sim.frames[seen:] if s2.slot in f.start)
    assert s2.slot == s1.slot and first.trim == {s2.slot: 30} and not first.fork
    assert s2.generated == reference(b, 4)


# ---------------------------------------------------------------------- sharing with running sequences
@pytest.mark.parametrize("whole", [False, True])
def test_concurrent_users_of_one_system_prompt_share_one_prefill(whole):
    rng = random.Random(5)
    system = toks(rng, 200)
    prompts = [system + toks(rng, rng.randrange(5, 20)) for _ in range(7)]
    rows = {}
    for cache in (False, True):
        p = pipeline(cache, whole)
        seqs = [submit(p, x, 5) for x in prompts]
        pump(p)
        for s, x in zip(seqs, prompts):
            assert s.finished and s.generated == reference(x, 5)
        rows[cache] = p.stats["prefill_rows"]
    assert rows[True] <= rows[False] / 4, rows


def test_a_donor_that_leaves_before_the_copy_leaves_its_followers_to_prefill():
    p = pipeline(True, whole=True)
    rng = random.Random(6)
    system = toks(rng, 100)
    d = submit(p, system + [7, 8, 9], 4)
    f = submit(p, system + [5, 6], 4)
    p.slots.admit(p.waiting)
    assert f.reuse_donor is d
    p.cancel(d)
    pump(p)
    assert f.finished and f.generated == reference(system + [5, 6], 4)


# ---------------------------------------------------------------------- a live sequence always wins
def test_eviction_keeps_serving_and_the_budget_holds():
    rng = random.Random(7)
    p = pipeline(True, max_seqs=4, n_ctx=600, budget=300)
    cap = p.slots.cache
    for i in range(30):
        x = toks(rng, rng.randrange(20, 120))
        s = submit(p, x, 8)
        pump(p)
        assert s.finished and s.generated == reference(x, 8)
        assert cap.cells <= 300 and len(cap.entries) <= 4
    assert p.stats["prefix_evictions"] > 0
    # every slot and cell taken by entries: new requests still run, evicting them
    seqs = [submit(p, toks(rng, 100), 40) for _ in range(4)]
    pump(p)
    assert all(s.finished and not s.cancelled for s in seqs)


def test_the_cache_never_takes_cells_a_running_sequence_reserved():
    p = pipeline(True, max_seqs=8, n_ctx=400)
    rng = random.Random(8)
    long = submit(p, toks(rng, 100), 200)   # reserves 300 of 400 cells
    short = [submit(p, toks(rng, 40), 4) for _ in range(3)]
    pump(p, until=lambda: all(s.finished for s in short))
    assert p.slots.cache.cells + p.kv_reserved <= 400
    pump(p)
    assert long.finished


# ---------------------------------------------------------------------- replay and routing
def test_a_replay_onto_a_pipeline_without_the_prefix_prefills_it():
    rng = random.Random(9)
    a, b = pipeline(True, name="a"), pipeline(True, name="b")
    x = toks(rng, 50)
    s = submit(a, x, 10)
    pump(a, until=lambda: len(s.generated) >= 4)
    s.prepare_replay()
    b.add(s, front=True)
    pump(b)
    assert s.generated == reference(x, 10)


def test_the_router_sends_a_conversation_to_the_pipeline_holding_its_prefix():
    rng = random.Random(10)
    a, b = pipeline(True, name="a"), pipeline(True, name="b")
    r = Router([a, b])
    x = toks(rng, 60)
    s = r.submit(GenRequest(np.asarray(x, np.int32), GREEDY, 4, ignore_eos=True))
    first = s.pipeline
    pump(first)
    other = b if first is a else a
    for _ in range(3):   # the holder is no busier than the other: the next turn goes there
        y = x + s.generated + toks(rng, 8)
        s = r.submit(GenRequest(np.asarray(y, np.int32), GREEDY, 4, ignore_eos=True))
        assert s.pipeline is first
        pump(first)
        x = y
    assert first.stats["prefix_hits"] == 3 and other.stats["prefix_hits"] == 0
    # much busier: the least-loaded pipeline wins
    fill = [submit(first, toks(rng, 20), 50) for _ in range(4)]
    first.slots.admit(first.waiting)
    y = x + s.generated + toks(rng, 8)
    s2 = r.submit(GenRequest(np.asarray(y, np.int32), GREEDY, 4, ignore_eos=True))
    assert s2.pipeline is other
    pump(first)
    pump(other)
    assert all(f.finished for f in fill) and s2.generated == reference(y, 4)


def test_off_and_small_prompts():
    c = PrefixCache(enabled=False)
    c.size_for([{"prefix_reuse": "any"}], 100)
    assert c.match_len(np.arange(50, dtype=np.int32), []) == 0
    p = pipeline(True)
    s = submit(p, list(range(1, MIN_REUSE - 3)), 3)     # too short to be worth an entry
    pump(p)
    assert s.finished and not p.slots.cache.entries


def test_whole_copies_keep_a_branch_point_so_later_users_share_it():
    """Sliding-window stages copy whole sequences only: the second user of a system prompt keeps the shared part
    as an entry of its own when its prefill gets there, and every later user copies that entry."""
    rng = random.Random(11)
    system = toks(rng, 120)
    p = pipeline(True, whole=True)
    rows = []
    for i in range(6):
        x = system + toks(rng, 10)
        before = p.stats["prefill_rows"]
        s = submit(p, x, 4)
        pump(p)
        assert s.generated == reference(x, 4)
        rows.append(p.stats["prefill_rows"] - before)
    assert rows[0] == rows[1] == 130 and rows[2:] == [10] * 4, rows
    assert any(e.cells == 120 for e in p.slots.cache.entries.values())


@pytest.mark.parametrize("whole", [False, True])
def test_lanes_and_groups_with_cached_prefixes(whole):
    """Two lanes (a copy never crosses one) and n > 1 choices whose leader reuses a cached prefix: every answer
    equals the reference, and the prefix is prefilled once."""
    rng = random.Random(12)
    system = toks(rng, 64)
    p = pipeline(True, whole, max_seqs=16, n_ctx=4096, lanes=2)
    r = Router([p])
    first = [submit(p, system + toks(rng, 6), 4) for _ in range(4)]
    pump(p)
    x = system + toks(rng, 6)
    before = p.stats["prefill_rows"]
    seqs = r.submit_group(GenRequest(np.asarray(x, np.int32), GREEDY, 5, ignore_eos=True), 3)
    pump(p)
    assert all(s.generated == reference(x, 5) for s in seqs)
    assert all(s.generated == reference(list(s.req.prompt), 4) for s in first)
    assert p.stats["prefill_rows"] - before <= 6 + 3, p.stats["prefill_rows"] - before


def test_per_key_caches_share_nothing_between_keys():
    """--prefix-cache per-key: a cached prefix (or a running one) is reused only by requests of the same API key
    (a client can tell a hit by its speed: tenants who must not learn each other's prompts get caches of their
    own)."""
    rng = random.Random(13)
    system = toks(rng, 60)
    p = pipeline(True)
    p.slots.cache.per_key = True

    def ask(owner):
        s = SeqState(GenRequest(np.asarray(system + toks(rng, 5), np.int32), GREEDY, 3, ignore_eos=True,
                                owner=owner), events=asyncio.Queue())
        p.add(s)
        pump(p)
        return s

    ask("a")
    hits = p.stats["prefix_hits"]
    ask("b")
    assert p.stats["prefix_hits"] == hits              # b does not reuse a's prompt
    ask("a")
    assert p.stats["prefix_hits"] == hits + 1          # a does
    assert p.prefix_match(np.asarray(system + [1, 2], np.int32), "c") == 0
    assert p.prefix_match(np.asarray(system + [1, 2], np.int32), "a") == 60
