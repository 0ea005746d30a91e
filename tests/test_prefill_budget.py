"""The prefill budget controller (pure logic): decoders' inter-token time steers prompt rows per step."""

from __future__ import annotations

import numpy as np

from molink_lite.stage.sampling import SamplingParams
from molink_lite.serving.scheduler import MIN_PREFILL_ROWS, PrefillBudget, is_long, plan_step
from molink_lite.serving.sequence import GenRequest, SeqState


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
    s.slot, s.started, s.in_flight = 3, True, True
    s.prepare_replay()
    assert s.feed.tolist() == [0, 1, 2, 3, 4, 7, 8, 9] and s.prefilled == 0 and s.prefilling
    assert s.slot == -1 and not s.started and not s.in_flight and s.replays == 1
    assert s.decode_pos == 7                                        # the next decode feeds token 9's successor
    assert s.start_params()["history"] == [7, 8, 9]
