"""The step builder (serving/step_builder.py): sequences in, a typed StepFrame and its record out. No sockets, no
model: every frame also goes through the wire (encode -> decode_frame -> StepFrame.decode with a stage's limits)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from molink_lite.serving.sequence import GenRequest, SeqState
from molink_lite.serving.speculative import SpecState
from molink_lite.serving.step_builder import StepRecord, build_step
from molink_lite.wire.codec import decode_frame
from molink_lite.wire.protocol import FrameLimits, SamplingParams, StepError, StepFrame

FIRST = FrameLimits(n_seq_max=8, n_ctx=512, max_rows=512, n_vocab=1000, n_embd_inp=16, is_first=True, is_last=False)


def seq(prompt_len: int = 5, slot: int = 0, max_tokens: int = 16, params: SamplingParams = SamplingParams()) -> SeqState:
    s = SeqState(GenRequest(np.arange(1, prompt_len + 1, dtype=np.int32), params, max_tokens), events=asyncio.Queue())
    s.slot = slot
    return s


def decoding(slot: int, generated=(50,), prompt_len: int = 5) -> SeqState:
    """A sequence whose prompt is prefilled and that generated ``generated`` (its KV holds the positions before its
    last token)."""
    s = seq(prompt_len, slot)
    s.prefilled, s.started, s.generated = prompt_len, True, list(generated)
    s.kv_len = s.decode_pos
    return s


def wire(frame: StepFrame, lim: FrameLimits = FIRST) -> StepFrame:
    """The frame as a stage receives it: encoded, decoded, checked against the stage's limits."""
    meta, arrays = decode_frame(frame.encode())
    assert meta["type"] == "step" and meta["step"] == frame.step
    return StepFrame.decode(meta, arrays, lim)


def same(a: StepFrame, b: StepFrame) -> None:
    for name in ("seq", "pos", "tokens", "out"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.free, a.trim, a.lane, a.start) == (b.free, b.trim, b.lane, b.start)
    assert {k: v.tolist() for k, v in a.drafts.items()} == {k: v.tolist() for k, v in b.drafts.items()}


def snapshot(s: SeqState) -> tuple:
    return (s.kv_len, s.prefilled, s.started, s.in_flight, s.last_sent, s.spec)


def test_decode_only():
    seqs = [decoding(0, [50]), decoding(1, [60, 61]), decoding(2, [70])]
    before = [snapshot(s) for s in seqs]
    frame, rec = build_step(7, seqs, [])
    assert [snapshot(s) for s in seqs] == before  # building changes no sequence
    assert frame.seq.tolist() == [0, 1, 2] and frame.pos.tolist() == [5, 6, 5]
    assert frame.tokens.tolist() == [50, 61, 70] and frame.out.tolist() == [True] * 3
    assert not (frame.start or frame.trim or frame.drafts or frame.free)
    assert (rec.sid, rec.n_decode, rec.n_prefill, rec.rows, rec.lane) == (7, 3, 0, 3, 0)
    assert [w for _, w in rec.seqs] == [True] * 3 and rec.sent == [(0, 0), (1, 0), (2, 0)]
    same(wire(frame), frame)
    rec.mark_sent(12.5)
    assert rec.sent_at == 12.5
    assert [(s.kv_len, s.in_flight, s.last_sent) for s in seqs] == [(6, 1, 7), (7, 1, 7), (6, 1, 7)]


def test_decode_with_drafts_and_trim_after_rejected_drafts():
    a, b = decoding(3, [50]), decoding(4, [60])
    a.spec = SpecState.for_prompt(a.req.prompt, a.req.max_tokens, a.generated)
    a.kv_len = a.decode_pos + 3  # two drafts of the last step were rejected: the stages still hold them
    frame, rec = build_step(2, [a, b], [], drafts=[np.array([8, 9], np.int32), np.zeros(0, np.int32)])
    assert frame.seq.tolist() == [3, 3, 3, 4] and frame.pos.tolist() == [5, 6, 7, 5]
    assert frame.tokens.tolist() == [50, 8, 9, 60] and frame.out.all()
    assert frame.trim == {3: 5} and {k: v.tolist() for k, v in frame.drafts.items()} == {3: [8, 9]}
    same(wire(frame), frame)
    rec.mark_sent(0.0)
    assert a.kv_len == 5 + 1 + 2 and b.kv_len == 6 and a.spec.drafts.tolist() == [8, 9]
    stats = dict.fromkeys(("steps", "rows", "decode_rows", "prefill_rows", "spec_rounds", "drafted", "mixed_steps",
                           "spec_mixed_steps", "max_seqs_in_step", "max_inflight_seen"), 0)
    rec.count(stats, 3)
    assert stats == {"steps": 1, "rows": 4, "decode_rows": 4, "prefill_rows": 0, "spec_rounds": 1, "drafted": 2,
                     "mixed_steps": 0, "spec_mixed_steps": 1, "max_seqs_in_step": 2, "max_inflight_seen": 3}
    # the next step, drafts all accepted: nothing to trim
    a.generated += [8, 9, 10]
    frame, _ = build_step(3, [a], [])
    assert frame.trim == {} and frame.pos.tolist() == [8]


def test_prefill_chunks_want_a_token_only_on_a_finished_prompts_last_row():
    long, short = seq(10, slot=0), seq(3, slot=1)
    frame, rec = build_step(1, [], [(long, 4), (short, 3)])
    assert frame.seq.tolist() == [0] * 4 + [1] * 3 and frame.pos.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert frame.tokens.tolist() == [1, 2, 3, 4, 1, 2, 3]
    assert frame.out.tolist() == [False] * 4 + [False, False, True]
    assert set(frame.start) == {0, 1} and [w for _, w in rec.seqs] == [False, True] and rec.n_prefill == 7
    same(wire(frame), frame)
    rec.mark_sent(0.0)
    assert (long.prefilled, long.kv_len, long.started, long.in_flight) == (4, 4, True, 1)
    assert (short.prefilled, short.started) == (3, True) and not short.prefilling
    frame, rec = build_step(2, [], [(long, 4)])  # the next chunk: no start any more, no output
    assert frame.start == {} and frame.pos.tolist() == [4, 5, 6, 7] and not frame.out.any()
    same(wire(frame), frame)
    rec.mark_sent(0.0)
    frame, rec = build_step(3, [], [(long, 2)])  # the last chunk: its last row wants the first token
    assert frame.pos.tolist() == [8, 9] and frame.out.tolist() == [False, True] and rec.seqs[0][1]
    same(wire(frame), frame)


def test_mixed_step_decode_rows_first():
    d, p = decoding(0, [50]), seq(4, slot=1)
    frame, rec = build_step(5, [d], [(p, 4)])
    assert frame.seq.tolist() == [0, 1, 1, 1, 1] and rec.n_decode == 1 and rec.n_prefill == 4 and rec.rows == 5
    same(wire(frame), frame)


def test_first_step_after_a_replay_carries_history_and_spec():
    s = seq(4, slot=2, params=SamplingParams(temperature=0.7, seed=42))
    s.generated = [7, 8, 9]
    s.prepare_replay()
    s.slot = 5
    frame, rec = build_step(1, [], [(s, int(s.feed.shape[0]))], spec=True)
    assert frame.tokens.tolist() == [1, 2, 3, 4, 7, 8, 9] and frame.pos.tolist() == list(range(7))
    start = frame.start[5]
    assert start.history == (7, 8, 9) and start.spec and start.params.temperature == 0.7
    assert start == replace(s.start_params(), spec=True) and start.params.seed != 42  # a reseeded sampler
    assert s.spec is None  # made when the step is sent
    got = wire(frame)
    same(got, frame)
    assert got.start[5].history == (7, 8, 9) and got.spec == {5}
    rec.mark_sent(0.0)
    assert s.started and s.spec is not None and s.spec.length == 7
    assert rec.sent == [(5, 1)]  # the epoch after the replay


def test_frees_only_for_the_lane_with_lanes():
    lim = replace(FIRST, lanes=2)
    a, b = decoding(1, [50]), decoding(3, [60])
    frame, rec = build_step(4, [a, b], [], lane=1, lanes=2, pending_free=[0, 1, 2, 5, 6, 7])
    assert frame.free == [1, 5, 7] and frame.lane == 1 and rec.lane == 1
    assert frame.to_wire()[0]["lane"] == 1
    same(wire(frame, lim), frame)
    # a step carrying only frees (a lane with nothing to run)
    empty, rec = build_step(5, [], [], lane=0, lanes=2, pending_free=[0, 1, 2, 5, 6, 7])
    assert empty.free == [0, 2, 6] and empty.n == 0 and rec.seqs == [] and rec.rows == 0
    same(wire(empty, lim), empty)
    # one lane: every pending free goes, whatever its slot
    frame, _ = build_step(6, [], [], pending_free=[3, 4])
    assert frame.free == [3, 4] and "lane" not in frame.to_wire()[0]
    # the stage's lane rule refuses a sequence of another lane
    wrong, _ = build_step(7, [decoding(2, [50])], [], lane=1, lanes=2)
    with pytest.raises(StepError, match="not in lane 1"):
        wire(wrong, lim)


def test_record_speaks_only_for_sequences_not_replayed_since():
    a, b = decoding(0, [50]), decoding(1, [60])
    _, rec = build_step(1, [a, b], [])
    rec.mark_sent(0.0)
    a.prepare_replay()
    assert [s for s, _ in rec.landed()] == [b] and b.in_flight == 0 and a.in_flight == 0
    assert isinstance(rec, StepRecord)
