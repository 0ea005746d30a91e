"""Issue 26, the gateway's side: grammars and logprobs through the pipeline, logprob entries on events, prompt
scoring (echo), and n > 1 choices sharing one prefill (fork). No sockets, no model: frames go through the wire
(encode -> decode -> StepFrame.decode with a stage's limits) and results come back as a last stage would send
them."""

from __future__ import annotations

import asyncio
from typing import List, Optional

import numpy as np
import pytest

from molink_lite.serving.pipeline import Pipeline, RequestError
from molink_lite.serving.router import Router
from molink_lite.serving.sequence import Event, GenRequest, SeqState, TokenLogprob
from molink_lite.serving.speculative import SpecConfig, StepCost, plan_drafts
from molink_lite.serving.step_builder import build_step
from molink_lite.serving.step_result import apply_result, apply_step_error
from molink_lite.wire.codec import decode_frame, encode_frame
from molink_lite.wire.protocol import FrameLimits, ResultFrame, SamplingParams, StepFrame

OWNER = object()
FIRST = FrameLimits(n_seq_max=8, n_ctx=512, max_rows=512, n_vocab=1000, n_embd_inp=16, is_first=True, is_last=False)


def wire(frame: StepFrame, lim: FrameLimits = FIRST) -> StepFrame:
    meta, arrays = decode_frame(frame.encode())
    return StepFrame.decode(meta, arrays, lim)


def req(prompt_len: int = 5, max_tokens: int = 16, **kw) -> GenRequest:
    params = kw.pop("params", SamplingParams())
    return GenRequest(np.arange(1, prompt_len + 1, dtype=np.int32), params, max_tokens, **kw)


def seq(prompt_len: int = 5, slot: int = 0, max_tokens: int = 16, **kw) -> SeqState:
    s = SeqState(req(prompt_len, max_tokens, **kw), events=asyncio.Queue())
    s.slot, s.pipeline = slot, OWNER
    return s


def events(s: SeqState) -> List[Event]:
    out = []
    while not s.events.empty():
        out.append(s.events.get_nowait())
    return out


def hexb(text: str) -> str:
    return text.encode().hex()


def result(step: int, seqs, tokens, pieces=None, eog=None, logprob=None, top_ids=None, top_logprobs=None,
           token_bytes=None, top_bytes=None, **score) -> ResultFrame:
    """A result as the gateway receives it (through the wire)."""
    f = ResultFrame(step, np.asarray(seqs, np.int32), np.asarray(tokens, np.int32),
                    None if eog is None else np.asarray(eog, bool), list(pieces or [f"<{t}>" for t in tokens]),
                    None if logprob is None else np.asarray(logprob, np.float32),
                    None if top_ids is None else np.asarray(top_ids, np.int32),
                    None if top_logprobs is None else np.asarray(top_logprobs, np.float32),
                    token_bytes=token_bytes, top_bytes=top_bytes)
    for k, v in score.items():
        setattr(f, k, v if k.endswith("bytes") else np.asarray(v))
    return ResultFrame.decode(*decode_frame(f.encode()))


class Sink:
    def __init__(self):
        self.stats = dict.fromkeys(("decode_entries", "decode_tokens", "accepted"), 0)
        self.finished = []

    def finish(self, s, reason):
        s.end(reason)
        s.finished = True
        self.finished.append((s, reason))

    def release(self, s, keep=False):
        if not keep:
            s.finished = True

    def apply(self, rec, res, owner=OWNER):
        return apply_result(rec, res, 1.0, owner=owner, stats=self.stats, finish=self.finish, release=self.release)


# ---------------------------------------------------------------------- grammar and logprobs through the pipeline
def test_seq_start_carries_grammar_triggers_logprobs_and_never_spec_under_a_grammar():
    g = seq(5, slot=0, grammar='root ::= "a"', triggers=("<tool>",), logprobs=3)
    p = seq(5, slot=1, logprobs=0)
    frame, rec = build_step(1, [], [(g, 5), (p, 5)], spec=True)
    got = wire(frame).start
    assert got[0].grammar == 'root ::= "a"' and got[0].triggers == ("<tool>",) and got[0].logprobs == 3
    assert got[0].spec is False                      # a grammar sequence never speculates
    assert got[1].grammar == "" and got[1].logprobs == 0 and got[1].spec is True
    rec.mark_sent(0.0)
    assert g.spec is None and p.spec is not None     # no speculation record for the grammar sequence
    plain = seq(5, slot=2)
    assert wire(build_step(2, [], [(plain, 5)])[0]).start[2].logprobs == -1


def test_a_replay_refeeds_history_so_the_grammar_resumes():
    g = seq(5, slot=0, grammar="root ::= [a-z]+", logprobs=-1)
    g.generated = [7, 8]
    g.prepare_replay()
    g.slot = 3
    st = wire(build_step(1, [], [(g, 7)])[0]).start[3]
    assert st.history == (7, 8) and st.grammar == "root ::= [a-z]+" and not st.spec


def test_no_drafts_for_grammar_sequences():
    rep = np.array([5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6], np.int32)  # a repeating prompt: n-gram drafts galore
    g = SeqState(GenRequest(rep, SamplingParams(), 32, grammar="root ::= x"), events=asyncio.Queue())
    f = SeqState(GenRequest(rep, SamplingParams(), 32), events=asyncio.Queue())
    for i, s in enumerate((g, f)):
        s.slot, s.prefilled, s.started, s.generated = i, rep.shape[0], True, [7]
        s.kv_len = s.decode_pos
    drafts = plan_drafts([g, f], 0, SpecConfig(mode="ngram"), StepCost(0.05, 0.0001), 512, 0)
    assert drafts[0].shape == (0,) and g.spec is None
    assert drafts[1].shape[0] > 0
    frame, _ = build_step(1, [g, f], [], drafts=drafts, spec=True)
    assert 0 not in wire(frame).drafts and 1 in frame.drafts


# ---------------------------------------------------------------------- logprobs on events
def lp_result(step, slot, tokens, pieces, eog=None, k=2):
    m = len(tokens)
    return result(step, [slot] * m, tokens, pieces, eog=eog, logprob=[-0.5 - i for i in range(m)],
                  top_ids=[[t, 999] + [-1] * (k - 2) for t in tokens],
                  top_logprobs=[[-0.5 - i, -3.0] + [0.0] * (k - 2) for i in range(m)],
                  token_bytes=[hexb(p) for p in pieces], top_bytes=[[hexb(p), hexb("z")] for p in pieces])


def decoding(slot=0, **kw) -> SeqState:
    s = seq(5, slot, **kw)
    s.prefilled, s.started, s.generated = 5, True, [50]
    s.kv_len = s.decode_pos
    return s


def text_and_tokens(evs):
    """(text, tokens behind it) per text event."""
    return [(e.text, [x.token for x in e.logprobs]) for e in evs if e.kind == "text"]


def test_logprob_entries_ride_with_their_text():
    s = decoding(logprobs=1)
    sink = Sink()
    _, rec = build_step(1, [s], [])
    rec.mark_sent(0.0)
    sink.apply(rec, lp_result(1, 0, [10, 11], ["Hel", "lo"]))
    evs = events(s)
    assert text_and_tokens(evs) == [("Hel", [10]), ("lo", [11])]
    e = evs[0].logprobs[0]
    assert e == TokenLogprob(10, b"Hel", -0.5, ((10, b"Hel", -0.5),))  # top trimmed to the 1 asked for


def test_logprobs_aligned_with_stop_string_hold_back_and_partial_utf8():
    s = decoding(logprobs=0, stop=("END",))
    sink = Sink()
    for step, (toks, pieces) in enumerate([([10], ["ab"]), ([11], ["E"]), ([12], [""]), ([13], ["é"]),
                                           ([14], ["xE"]), ([15], ["N"]), ([16], ["Dzz"])], 1):
        _, rec = build_step(step, [s], [])
        rec.mark_sent(0.0)
        sink.apply(rec, lp_result(step, 0, toks, pieces))
    evs = events(s)
    # 2 chars held back ("END" minus one): entries come once their token's text is sent; the empty piece (12) with
    # the character it is part of; the tokens that formed "END" on a last event
    assert text_and_tokens(evs) == [("a", []), ("b", [10]), ("Eé", [11, 12, 13]), ("x", []), ("", [14, 15, 16])]
    assert s.text == "abEéx" and sink.finished == [(s, "stop")] and evs[-1].kind == "done"
    assert all(x.top == () for e in evs if e.kind == "text" for x in e.logprobs)   # logprobs 0: no alternatives
    joined = b"".join(x.bytes for e in evs if e.kind == "text" for x in e.logprobs)
    assert joined.decode().startswith(s.text)


def test_length_end_flushes_held_text_with_its_entries_and_eog_has_none():
    s = decoding(logprobs=2, stop=("ZZZ",), max_tokens=3)
    sink = Sink()
    _, rec = build_step(1, [s], [])
    rec.mark_sent(0.0)
    sink.apply(rec, lp_result(1, 0, [10, 11], ["a", "b"]))   # 3 tokens in all (50 came before): "length"
    assert sink.finished == [(s, "length")]
    assert text_and_tokens(events(s)) == [("ab", [10, 11])]
    e = decoding(logprobs=2)
    _, rec = build_step(1, [e], [])
    rec.mark_sent(0.0)
    sink.apply(rec, lp_result(1, 0, [10, 2], ["a", ""], eog=[0, 1]))
    assert text_and_tokens(events(e)) == [("a", [10])] and e.generated == [50, 10, 2]


def test_no_logprobs_asked_no_entries():
    s = decoding()
    sink = Sink()
    _, rec = build_step(1, [s], [])
    rec.mark_sent(0.0)
    sink.apply(rec, result(1, [0], [10], ["hi"], logprob=[float("nan")]))
    assert [(e.kind, e.text, e.logprobs) for e in events(s)] == [("text", "hi", None)]
    assert s._lp == []


# ---------------------------------------------------------------------- echo: prompt scoring
def score(slots, lps, **kw):
    return dict(score_seq=np.asarray(slots, np.int32), score_logprob=np.asarray(lps, np.float32), **kw)


def test_echo_marks_prompt_rows_out_with_score_targets_and_delivers_prompt_logprobs_first():
    s = seq(10, slot=1, logprobs=1, echo=True)
    sink = Sink()
    f1, r1 = build_step(1, [], [(s, 4)])
    w1 = wire(f1)
    assert w1.out.tolist() == [True] * 4 and w1.score[1].tolist() == [2, 3, 4, 5]
    r1.mark_sent(0.0)
    f2, r2 = build_step(2, [], [(s, 6)])
    w2 = wire(f2)
    # rows 4..9: rows 4..8 predict prompt tokens 6..10, row 9 (the last token) samples
    assert w2.out.tolist() == [True] * 6 and w2.score[1].tolist() == [6, 7, 8, 9, 10]
    r2.mark_sent(0.0)
    sink.apply(r1, result(1, [], [], **score([1] * 4, [-1, -2, -3, -4], score_top_ids=np.array([[7]] * 4),
                                             score_top_logprobs=np.array([[-0.1]] * 4),
                                             score_bytes=[hexb("b")] * 4, score_top_bytes=[[hexb("q")]] * 4)))
    assert events(s) == [] and s.prompt_logprobs is None        # not the whole prompt yet
    sink.apply(r2, result(2, [1], [77], ["x"], logprob=[-0.25], top_ids=[[77]], top_logprobs=[[-0.25]],
                          token_bytes=[hexb("x")], top_bytes=[[hexb("x")]],
                          **score([1] * 5, [-5, -6, -7, -8, -9])))
    evs = events(s)
    assert [e.kind for e in evs] == ["prompt_logprobs", "text"]
    plp = evs[0].logprobs
    assert [x.token for x in plp] == list(range(1, 11)) and plp[0].logprob is None and plp[0].bytes == b""
    assert [x.logprob for x in plp[1:]] == [-1, -2, -3, -4, -5, -6, -7, -8, -9]
    assert plp[1].bytes == b"b" and plp[1].top == ((7, b"q", pytest.approx(-0.1)),)
    assert s.prompt_logprobs is plp and evs[1].logprobs[0].token == 77
    # a replay prefills again but does not score the prompt again
    s.prepare_replay()
    s.slot = 1
    f3, _ = build_step(3, [], [(s, 11)])
    assert f3.score == {} and f3.out.tolist() == [False] * 10 + [True]


def test_echo_with_max_tokens_0_scores_only_and_ends_with_length():
    s = seq(4, slot=0, max_tokens=0, logprobs=0, echo=True)
    f, rec = build_step(1, [], [(s, 4)])
    w = wire(f)
    assert w.out.tolist() == [True, True, True, False] and w.score[0].tolist() == [2, 3, 4]
    rec.mark_sent(0.0)
    sink = Sink()
    sink.apply(rec, result(1, [], [], **score([0] * 3, [-1, -2, -3])))
    evs = events(s)
    assert [e.kind for e in evs] == ["prompt_logprobs", "done"] and evs[1].finish_reason == "length"
    assert [x.token for x in evs[0].logprobs] == [1, 2, 3, 4] and s.generated == []


def test_echo_of_a_one_token_prompt():
    s = seq(1, slot=0, max_tokens=0, logprobs=0, echo=True)
    f, rec = build_step(1, [], [(s, 1)])
    assert f.out.tolist() == [False] and f.score == {}
    rec.mark_sent(0.0)
    Sink().apply(rec, result(1, [], []))
    evs = events(s)
    assert [e.kind for e in evs] == ["prompt_logprobs", "done"] and evs[0].logprobs == [TokenLogprob(1, b"", None)]


def test_max_tokens_0_needs_echo():
    p = Pipeline(["ws://127.0.0.1:9"], name="p")
    p.check(req(3, 0, echo=True))
    with pytest.raises(RequestError, match="at least 1"):
        p.check(req(3, 0))


# ---------------------------------------------------------------------- n > 1: one prefill, forked
class FakeChannel:
    def __init__(self):
        self.name, self.closed, self.sent = "stage ws://fake", asyncio.Event(), []

    def send(self, meta, arrays=None, codec="f16"):
        self.sent.append(decode_frame(encode_frame(meta, arrays, codec=codec)))

    async def close(self):
        self.closed.set()


def pipeline(lanes: int = 1, max_seqs: int = 8, max_inflight: int = 4, prefix_cache: bool = True) -> Pipeline:
    info = {"max_seqs": max_seqs, "n_ctx": 512 * lanes, "n_ctx_lane": 512, "lanes": lanes, "max_rows": 64,
            "n_embd": 16, "n_vocab": 1000, "prefix_reuse": "any"}
    p = Pipeline(["ws://127.0.0.1:9"], name="p", prefill_chunk=8, max_inflight=max_inflight,
                 prefix_cache=prefix_cache)
    p.chain.channels, p.chain.infos = [FakeChannel()], [info]
    p._size_for([info])
    p.state = "up"
    return p


def lim(p: Pipeline) -> FrameLimits:
    return FrameLimits(n_seq_max=p.max_seqs, n_ctx=512, max_rows=64, n_vocab=1000, n_embd_inp=16, is_first=True,
                       is_last=False, lanes=p.lanes)


def turn(p: Pipeline) -> Optional[StepFrame]:
    p.slots.admit(p.waiting)
    picked = p._schedule()
    if picked is None:
        return None
    p._send(*picked)
    return StepFrame.decode(*p.channels[0].sent[-1][:2], lim(p))


def back(p: Pipeline, f: StepFrame, tokens: dict) -> None:
    """The last stage's answer to step ``f``: ``tokens`` maps slot -> token."""
    slots = list(tokens)
    p._on_result(*ResultFrame(f.step, np.asarray(slots, np.int32), np.asarray([tokens[x] for x in slots], np.int32),
                              pieces=[f"<{tokens[x]}>" for x in slots]).to_wire())


def test_group_of_4_prefills_once_then_forks_and_decodes_in_one_batch():
    p = pipeline(max_inflight=1)
    r = Router([p])
    seqs = r.submit_group(req(20, 4, params=SamplingParams(temperature=0.8, seed=7)), 4)
    assert [s.req.params.seed for s in seqs] == [7, 8, 9, 10]
    assert len({id(s.req) for s in seqs}) == 4 and r.queued == 4     # queued on the pipeline now
    steps = []
    while True:
        f = turn(p)
        if f is None or f.fork:
            break
        steps.append(f)
    # the leader prefilled the prompt but its last token (chunks of 8), nothing else
    rows = np.concatenate([x.pos for x in steps]).tolist()
    assert rows == list(range(19)) and all(set(x.seq.tolist()) == {seqs[0].slot} for x in steps)
    assert not any(x.out.any() for x in steps)
    leader = seqs[0].slot
    assert f.fork == {s.slot: (leader, 19) for s in seqs[1:]}
    assert f.seq.tolist() == [s.slot for s in seqs] and f.pos.tolist() == [19] * 4 and f.tokens.tolist() == [20] * 4
    assert f.out.all() and set(f.start) == {s.slot for s in seqs[1:]}
    assert [f.start[s.slot].params.seed for s in seqs[1:]] == [8, 9, 10]
    assert p.stats["prefill_rows"] == 19 + 4 and p.stats["forks"] == 3
    assert all(s.fork_from is None and s.prefilled == 20 for s in seqs) and seqs[0].kids == []
    for x in steps:
        back(p, x, {})
    back(p, f, {s.slot: 100 + i for i, s in enumerate(seqs)})
    d = turn(p)                                          # all four decode in one step
    assert sorted(d.seq.tolist()) == sorted(s.slot for s in seqs) and d.pos.tolist() == [20] * 4
    assert not d.fork and not d.start
    assert [s.generated for s in seqs] == [[100], [101], [102], [103]]


def test_group_stays_in_one_lane_with_lanes():
    p = pipeline(lanes=2, max_seqs=8)
    r = Router([p])
    other = r.submit(req(3, 2))                          # takes a slot of lane 0 first
    turn(p)
    seqs = r.submit_group(req(6, 2), 4)
    fork = None
    for _ in range(6):
        f = turn(p)
        if f is None:
            break
        if f.fork:
            fork = f
            break
    lanes = {s.slot % 2 for s in seqs}
    assert len(lanes) == 1 and other.slot % 2 == 0 and lanes != {0} and min(s.slot for s in seqs) >= 0
    assert fork is not None and fork.lane == lanes.pop() and len(fork.fork) == 3


def test_one_token_prompt_no_fork():
    p = pipeline()
    r = Router([p])
    seqs = r.submit_group(req(1, 2), 3)
    assert all(s.fork_from is None and not s.kids for s in seqs)
    f = turn(p)
    assert not f.fork and sorted(f.seq.tolist()) == sorted(s.slot for s in seqs) and f.out.all()


def test_group_too_big_for_a_lane_runs_as_independent_sequences():
    p = pipeline(lanes=2, max_seqs=4)                    # 2 slots per lane
    r = Router([p])
    seqs = r.submit_group(req(6, 2), 3)
    assert all(s.fork_from is None and not s.kids for s in seqs)


@pytest.mark.parametrize("cached", [False, True])
def test_replay_of_a_group_member_prefills_prompt_and_its_tokens_alone(cached):
    """Without the prefix cache the replayed choice prefills its prompt and its token itself; with it, it copies
    the prompt from its leader (still running) and prefills only its own token."""
    p = pipeline(prefix_cache=cached)
    r = Router([p])
    seqs = r.submit_group(req(10, 8), 3)
    f = turn(p)
    while not f.fork:
        back(p, f, {})
        f = turn(p)
    back(p, f, {s.slot: 40 + i for i, s in enumerate(seqs)})
    kid = seqs[2]
    p.slots.release(kid)
    kid.prepare_replay()
    p.add(kid, front=True)
    pos, toks, starts = [], [], {}
    for _ in range(6):
        g = turn(p)
        if g is None:
            break
        if cached and g.fork:
            assert g.fork == {kid.slot: (seqs[0].slot, 10)}
        else:
            assert not g.fork
        rows = g.seq == kid.slot
        pos += g.pos[rows].tolist()
        toks += g.tokens[rows].tolist()
        starts.update(g.start)
    if cached:
        assert pos == [10] and toks == [42]                              # its token: the prompt was copied
    else:
        assert pos == list(range(11)) and toks == list(range(1, 11)) + [42]   # its prompt and its token, alone
    assert starts[kid.slot].history == (42,)


def test_leader_lost_before_the_fork_lets_its_choices_prefill_themselves():
    p = pipeline()
    r = Router([p])
    seqs = r.submit_group(req(20, 4), 3)
    f = turn(p)                                          # the leader's first chunk
    assert f.seq.tolist() == [seqs[0].slot] * 8
    p._hand_back(apply_step_error(p.inflight.pop(f.step), p._release), "stage error")   # the chunk failed
    assert all(s.fork_from is None and not s.kids for s in seqs)
    g = turn(p)
    assert not g.fork and {int(x) for x in g.seq} >= {seqs[1].slot, seqs[2].slot}


def test_cancelling_a_group_cancels_all():
    p = pipeline()
    r = Router([p])
    seqs = r.submit_group(req(20, 4), 4)
    turn(p)
    for s in seqs:
        r.cancel(s)
    assert all(s.cancelled for s in seqs)
    assert all(s.finished for s in seqs[1:]) and seqs[0].in_flight   # the leader ends once its step is back


def test_group_echo_prompt_logprobs_reach_every_choice():
    p = pipeline()
    r = Router([p])
    seqs = r.submit_group(req(5, 2, logprobs=0, echo=True), 2)
    f = turn(p)
    assert f.pos.tolist() == [0, 1, 2, 3] and f.out.all() and f.score[seqs[0].slot].tolist() == [2, 3, 4, 5]
    g = turn(p)
    assert g.fork and g.score == {} and g.out.all()
    res = ResultFrame(f.step, score_seq=np.array([seqs[0].slot] * 4, np.int32),
                      score_logprob=np.array([-1, -2, -3, -4], np.float32))
    p._on_result(*res.to_wire())
    for s in seqs:
        evs = events(s)
        assert [e.kind for e in evs] == ["prompt_logprobs"] and [x.token for x in evs[0].logprobs] == [1, 2, 3, 4, 5]
