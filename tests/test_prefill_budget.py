"""The prefill budget controller (pure logic): decoders' inter-token time steers prompt rows per step."""

from __future__ import annotations

import numpy as np

from molink_lite.stage.sampling import SamplingParams
from molink_lite.serving.scheduler import MIN_PREFILL_ROWS, Pipeline
from molink_lite.serving.sequence import GenRequest, SeqState


def _pipe(chunk: int = 96) -> Pipeline:
    p = Pipeline(["ws://unused"], prefill_chunk=chunk)
    return p


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
