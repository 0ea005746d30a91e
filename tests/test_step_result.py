"""Results in (serving/step_result.py), the slot table (serving/slots.py), the lane choice (scheduler.next_step),
the lifecycle's control frames (serving/chain_lifecycle.py) and one Pipeline turn through a fake first stage: no
sockets, no model."""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
import pytest

from molink_lite.serving.chain import PipelineError
from molink_lite.serving.pipeline import Pipeline
from molink_lite.serving.scheduler import next_step
from molink_lite.serving.sequence import GenRequest, SeqState
from molink_lite.serving.slots import SlotTable
from molink_lite.serving.speculative import SpecState
from molink_lite.serving.step_builder import build_step
from molink_lite.serving.step_result import apply_result, apply_step_error
from molink_lite.wire.codec import decode_frame, encode_frame
from molink_lite.wire.protocol import FrameLimits, LinkDown, LinkUp, ResultFrame, SamplingParams, StepFrame

OWNER = object()


def seq(prompt_len: int = 5, slot: int = 0, max_tokens: int = 16) -> SeqState:
    s = SeqState(GenRequest(np.arange(1, prompt_len + 1, dtype=np.int32), SamplingParams(), max_tokens),
                 events=asyncio.Queue())
    s.slot, s.pipeline = slot, OWNER
    return s


def decoding(slot: int, generated=(50,)) -> SeqState:
    s = seq(5, slot)
    s.prefilled, s.started, s.generated = 5, True, list(generated)
    s.kv_len = s.decode_pos
    s.t_first = s.t_last = 1.0
    return s


def result(step: int, seqs, tokens, eog=None, pieces=None) -> ResultFrame:
    """A result as the gateway receives it (through the wire)."""
    m = len(seqs)
    frame = ResultFrame(step, np.asarray(seqs, np.int32), np.asarray(tokens, np.int32),
                        None if eog is None else np.asarray(eog, bool), pieces or [f"<{t}>" for t in tokens][:m])
    return ResultFrame.decode(*decode_frame(encode_frame(*frame.to_wire())))


class Sink:
    """The pipeline side of applying a result: counters, finish and release, an observer."""

    def __init__(self):
        self.stats = dict.fromkeys(("decode_entries", "decode_tokens", "accepted", "completed"), 0)
        self.finished, self.released, self.calls = [], [], []

    def finish(self, s, reason):
        s.end(reason)
        self.finished.append((s, reason))

    def release(self, s, keep=False):
        if not keep:
            s.finished = True
        self.released.append((s, keep))

    # observer
    def first_token(self, dt):
        self.calls.append("first")

    def token_gap(self, dt):
        self.calls.append("gap")

    def tokens(self, n):
        self.calls.append(("tokens", n))

    def apply(self, rec, res, now=3.0):
        return apply_result(rec, res, now, owner=OWNER, stats=self.stats, finish=self.finish, release=self.release,
                            observer=self)


def sent(decode=(), prefill=(), sid=1, drafts=None):
    _, rec = build_step(sid, list(decode), list(prefill), drafts=drafts)
    rec.mark_sent(0.0)
    return rec


# ---------------------------------------------------------------------- results
def test_tokens_taken_finish_and_timings():
    a, b = decoding(0), decoding(1)
    p = seq(3, slot=2)
    rec = sent([a, b], [(p, 3)])
    sink = Sink()
    itl = sink.apply(rec, result(1, [0, 1, 2], [51, 2, 70], eog=[0, 1, 0]))
    assert itl == pytest.approx(2.0)                      # now (3.0) - last token (1.0)
    assert a.generated == [50, 51] and not a.finished and a.text == "<51>"
    assert b.finished and sink.finished == [(b, "stop")]  # end of generation
    assert p.generated == [70] and p.t_first == 3.0
    assert sink.calls == ["gap", "gap", "first", ("tokens", 3)]
    assert sink.stats["decode_entries"] == 2 and sink.stats["decode_tokens"] == 2
    assert a.in_flight == 0 and p.in_flight == 0


def test_speculative_acceptance_counted_and_drafts_cleared():
    a = decoding(0)
    a.spec = SpecState.for_prompt(a.req.prompt, a.req.max_tokens, a.generated)
    rec = sent([a], drafts=[np.array([8, 9, 10], np.int32)])
    assert a.spec.drafts.tolist() == [8, 9, 10]
    sink = Sink()
    sink.apply(rec, result(1, [0, 0], [8, 42]))             # one draft accepted, then the model's own token
    assert a.generated == [50, 8, 42] and sink.stats["accepted"] == 1 and sink.stats["decode_tokens"] == 2
    assert a.spec.drafts.shape == (0,) and a.spec.drafted == 3 and a.spec.accepted == 1
    assert a.kv_len > a.decode_pos                          # the next step trims the rejected drafts
    frame, _ = build_step(2, [a], [])
    assert frame.trim == {0: a.decode_pos}


def test_stale_moved_and_cancelled_sequences():
    a, b, c = decoding(0), decoding(1), decoding(2)
    rec = sent([a, b, c])
    a.prepare_replay()                   # handed back since: this step is not its own any more
    b.pipeline = object()                # runs on another pipeline now
    c.cancelled = True
    sink = Sink()
    sink.apply(rec, result(1, [0, 1, 2], [5, 6, 7]))
    assert a.generated == [50] and b.generated == [50] and c.generated == [50]
    assert sink.released == [(c, False)] and c.finished and sink.calls == [("tokens", 0)]


def test_a_step_error_hands_live_sequences_back():
    a, b, c = decoding(0), decoding(1), decoding(2)
    rec = sent([a, b, c])
    b.cancelled = True
    c.finished = True
    sink = Sink()
    assert apply_step_error(rec, sink.release) == [a]
    assert sink.released == [(a, True), (b, False)] and not a.finished


def test_a_malformed_result_fails_the_pipeline_instead_of_raising():
    p = Pipeline(["ws://127.0.0.1:9"], name="p")
    p.state = "up"
    p._on_result({"type": "result", "step": 1, "pieces": ["a"]}, {"seq": np.array([1, 2], np.int32),
                                                                 "tokens": np.array([1], np.int32)})
    assert p.state == "down" and "malformed result" in p.error and p.stats["failures"] == 1


# ---------------------------------------------------------------------- slots and lanes
def test_slot_table_admit_release_and_frees_per_lane():
    t = SlotTable()
    t.size_for([{"max_seqs": 4, "n_ctx": 400, "n_ctx_lane": 200, "lanes": 2}])
    assert (t.max_seqs, t.lanes, t.n_ctx_lane, t.n_ctx) == (4, 2, 200, 400)
    waiting = deque(seq(96, max_tokens=4) for _ in range(3))   # 100 cells each
    t.admit(waiting)
    assert sorted(t.active) == [0, 1, 2] and t.kv_lane == [200, 100] and t.kv_reserved == 300 and not waiting
    assert [[s.slot for s in lane] for lane in t.by_lane()] == [[0, 2], [1]]
    s0, s1 = t.active[0], t.active[1]
    s0.started = True
    t.release(s0)
    t.release(s1)   # never started: nothing to free on the stages
    t.release(s1)   # twice: nothing more
    assert t.pending_free == [0] and t.lanes_freeing() == [True, False] and t.kv_lane == [100, 0]
    assert sorted(t.free_slots) == [0, 1, 3]
    t.freed([0])
    assert t.pending_free == []
    assert [x.slot for x in t.clear()] == [2] and t.kv_lane == [0, 0] and not t.active
    with pytest.raises(PipelineError, match="different --lanes"):
        t.size_for([{"max_seqs": 4, "n_ctx": 400, "lanes": 2}, {"max_seqs": 4, "n_ctx": 400, "lanes": 1}])


def test_next_step_prefers_the_least_busy_lane_and_sends_frees_alone():
    a, b = decoding(0), decoding(1)
    lane, plan = next_step([[a], [b]], busy=[1, 0], freeing=[False, False], micro_batches=2, max_batch_tokens=64,
                           prefill_chunk=32, prefill_budget=32)
    assert lane == 1 and plan.decode == [b]
    assert next_step([[], []], [0, 1], [False, True], 2, 64, 32, 32) is None      # lane 1 frees after its step
    lane, plan = next_step([[], []], [0, 0], [False, True], 2, 64, 32, 32)
    assert lane == 1 and not plan.decode and not plan.prefill


# ---------------------------------------------------------------------- control frames
class FakeChannel:
    """What the pipeline uses of a link to its first stage: frames sent go to ``sent``."""

    def __init__(self, name: str = "stage ws://fake"):
        self.name, self.closed, self.sent = name, asyncio.Event(), []

    def send(self, meta, arrays=None, codec="f16"):
        self.sent.append(decode_frame(encode_frame(meta, arrays, codec=codec)))

    async def close(self):
        self.closed.set()


def test_link_down_drain_and_link_up_frames():
    async def run():
        p = Pipeline(["ws://127.0.0.1:9"], name="p")
        ch = FakeChannel()
        p.chain.channels = [ch]
        p.state = "up"
        life = p.lifecycle
        await life._on_frame(ch, LinkUp("0-2", "ws://b").to_meta(), {})
        assert life._kick.is_set() and p.state == "up"
        await life._on_frame(ch, LinkDown("0-2", "ws://b", "reset by peer").to_meta(), {})
        assert p.state == "down" and "lost its link to the next stage ws://b: reset by peer" in p.error
        assert list(p.events)[-1]["event"] == "down"
        p.state = "up"
        await life._on_frame(ch, {"type": "drain"}, {})
        assert p.state == "down" and "shutting down (drain)" in p.error and p.stats["failures"] == 2

    asyncio.run(run())


# ---------------------------------------------------------------------- one turn of the loop
INFO = {"max_seqs": 4, "n_ctx": 256, "lanes": 1, "max_rows": 64, "n_embd": 16, "n_vocab": 100}
LIM = FrameLimits(n_seq_max=4, n_ctx=256, max_rows=64, n_vocab=100, n_embd_inp=16, is_first=True, is_last=False)


def test_schedule_send_apply_through_a_fake_first_stage():
    # (without the prefix cache: a finished sequence's slot is freed; with it, test_prefix_cache.py)
    p = Pipeline(["ws://127.0.0.1:9"], name="p", prefill_chunk=8, max_inflight=1, prefix_cache=False)
    ch = FakeChannel()
    p.chain.channels, p.chain.infos = [ch], [INFO]
    p._size_for([INFO])
    p.state = "up"
    s = SeqState(GenRequest(np.arange(1, 11, dtype=np.int32), SamplingParams(temperature=0.0), 2),
                 events=asyncio.Queue())
    p.add(s)

    def turn():
        """schedule -> send; the stage's frame back as a StepFrame."""
        p.slots.admit(p.waiting)
        picked = p._schedule()
        assert picked is not None
        p._send(*picked)
        return StepFrame.decode(*ch.sent[-1][:2], LIM)

    f1 = turn()
    assert f1.pos.tolist() == list(range(8)) and set(f1.start) == {s.slot} and not f1.out.any()
    assert p.inflight and p.stats["prefill_rows"] == 8
    p._on_result(*ResultFrame(f1.step).to_wire())    # a prompt chunk yields no token
    f2 = turn()
    assert f2.pos.tolist() == [8, 9] and f2.out.tolist() == [False, True] and not f2.start
    p._on_result(*ResultFrame(f2.step, np.array([s.slot], np.int32), np.array([42], np.int32)).to_wire())
    assert s.generated == [42] and not s.finished
    f3 = turn()
    assert f3.pos.tolist() == [10] and f3.tokens.tolist() == [42]
    p._on_result(*ResultFrame(f3.step, np.array([s.slot], np.int32), np.array([43], np.int32)).to_wire())
    assert s.finished and s.generated == [42, 43] and p.stats["completed"] == 1 and not p.active
    f4 = turn()                                         # the finished sequence's slot is freed on the stages
    assert f4.n == 0 and f4.free == [s.slot] and p.pending_free == []
    assert p._schedule() is None and p.stats["steps"] == 4
