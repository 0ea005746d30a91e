"""The prefill budget controller (pure logic): decoders' inter-token time steers prompt rows per step."""

from __future__ import annotations

import numpy as np

from molink_lite.serving.scheduler import MIN_PREFILL_ROWS, PrefillBudget, is_long, plan_step
from molink_lite.serving.sequence import GenRequest, SeqState
from molink_lite.wire.protocol import SamplingParams


class _Pipe:
    """The two things the controller reads from a pipeline: its sequences and its chunk."""

    def __init__(self, chunk: int = 96):
        self.chunk = chunk
        self.budget = PrefillBudget(chunk)
        self.active = {}

    @property
    def prefill_budget(self) -> int:
        return self.budget.rows

    @property
    def t_decode_step(self):
        return self.budget.t_decode_step

    def _adapt_budget(self, itl):
        running = any(is_long(s, self.chunk) and s.prefilling and not s.finished for s in self.active.values())
        self.budget.update(itl, running)


def _pipe(chunk: int = 96) -> _Pipe:
    return _Pipe(chunk)


def _seq(prompt_len: int, prefilled: int) -> SeqState:
    s = SeqState(req=GenRequest(np.arange(prompt_len, dtype=np.int32), SamplingParams(), 8), events=None)
    s.prefilled = prefilled
    return s


def test_baseline_then_halving_then_growth():
    p = _pipe()
    p.active = {0: _seq(10, 10)}                   # one decoder, no prompt in progress
    for _ in range(10):
        p._adapt_budget(0.100)
    assert abs(p.t_decode_step - 0.100) < 1e-9
    start = p.prefill_budget
    p.active[1] = _seq(4000, 64)                   # a long prompt is being prefilled
    p._adapt_budget(0.500)                         # decoders slowed 5x: halve
    assert p.prefill_budget == max(MIN_PREFILL_ROWS, start // 2)
    for _ in range(50):
        p._adapt_budget(0.500)
    assert p.prefill_budget == MIN_PREFILL_ROWS     # never below the floor: the prompt still progresses
    for _ in range(50):
        p._adapt_budget(0.150)                     # within 2x: grow back, capped by the chunk
    assert p.prefill_budget == 96
    assert abs(p.t_decode_step - 0.100) < 1e-9     # the baseline is not polluted by prefill-time samples


def test_no_decoders_no_change():
    p = _pipe()
    before = p.prefill_budget
    p._adapt_budget(None)
    assert p.prefill_budget == before and p.t_decode_step is None


def test_plan_step_shares_decoders_and_throttles_long_prompts():
    decoders = [_seq(4, 4) for _ in range(6)]
    for i, s in enumerate(decoders):
        s.generated = [1]
        s.last_sent = i
    long_prompt = _seq(1000, 0)
    plan = plan_step(decoders + [long_prompt], micro_batches=2, max_batch_tokens=512, prefill_chunk=96,
                     prefill_budget=16)
    assert [s.last_sent for s in plan.decode] == [0, 1, 2]       # half of them, least recently sent first
    assert plan.prefill == [(long_prompt, 16)]                     # throttled while others decode
    alone = plan_step([_seq(1000, 0)], micro_batches=2, max_batch_tokens=512, prefill_chunk=96, prefill_budget=16)
    assert alone.prefill[0][1] == 96                                # nobody decoding: a whole chunk


def test_replay_prefills_prompt_and_generated_tokens():
    s = _seq(5, 5)
    s.generated = [7, 8, 9]
    s.slot, s.started, s.in_flight = 3, True, 2
    s.prepare_replay()
    assert s.feed.tolist() == [0, 1, 2, 3, 4, 7, 8, 9] and s.prefilled == 0 and s.prefilling
    assert s.slot == -1 and not s.started and not s.in_flight and s.replays == 1 and s.epoch == 1
    assert s.decode_pos == 7                                        # the next decode feeds token 9's successor
    assert s.start_params().history == (7, 8, 9)


def test_next_prompt_chunk_goes_while_the_previous_is_in_flight():
    """Chunks of one prompt travel the chain together (stages take steps in order); nothing else is sent twice."""
    p = _seq(300, 64)
    p.in_flight = 1                                   # chunk 0 still in flight, 236 rows to go
    last = _seq(300, 300)
    last.in_flight = 1                                # its final chunk is in flight: it waits for the token
    dec = _seq(4, 4)
    dec.generated, dec.in_flight = [1], 1             # a decoder in flight gets no second row
    plan = plan_step([p, last, dec], micro_batches=2, max_batch_tokens=512, prefill_chunk=64, prefill_budget=64)
    assert plan.decode == [] and plan.prefill == [(p, 64)]


def test_a_step_speaks_only_for_sequences_not_replayed_since():
    from molink_lite.serving.pipeline import _Step

    a, b = _seq(300, 128), _seq(10, 10)
    a.slot, b.slot, a.in_flight, b.in_flight = 1, 2, 2, 1
    st = _Step(7, [(a, False), (b, True)], 0.0, sent=[(1, 0), (2, 0)])
    a.prepare_replay()                                # an earlier step of a failed: a went back to be replayed
    a.slot = 5                                        # ... and runs elsewhere now
    assert [(s, slot) for s, slot in st.landed()] == [(b, 2)]
    assert b.in_flight == 0 and a.in_flight == 0 and a.slot == 5
