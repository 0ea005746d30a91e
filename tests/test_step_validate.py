"""Step-frame validation at the stage's edge (pure logic: no model, no sockets)."""

from __future__ import annotations

import numpy as np
import pytest

from molink_lite.stage.validate import StepError, StepLimits, check_step
from molink_lite.wire.protocol import SamplingParams, SeqStart, StepFrame

FIRST = StepLimits(n_seq_max=16, n_ctx=256, max_rows=64, n_vocab=100, n_embd_inp=8, is_first=True, is_last=False)
LATER = StepLimits(n_seq_max=16, n_ctx=256, max_rows=64, n_vocab=1, n_embd_inp=8, is_first=False, is_last=True)


def wire(seq=(), pos=(), tokens=None, hidden=None, out=None, step=0, **fields):
    """A step frame as it travels, (meta, arrays), built through the protocol type."""
    return StepFrame(step, np.asarray(seq, np.int32), np.asarray(pos, np.int32),
                     tokens=None if tokens is None else np.asarray(tokens, np.int32),
                     hidden=None if hidden is None else np.asarray(hidden, np.float32),
                     out=None if out is None else np.asarray(out, bool), **fields).to_wire()


def arrays(seq, pos, tokens=None, hidden=None, out=None):
    """The arrays of a step frame (see :func:`wire`)."""
    return wire(seq, pos, tokens, hidden, out)[1]


def hostile_meta(**fields):
    """The meta of an empty step frame with ``fields`` put on the wire as given (malformed or out of range)."""
    meta, _ = StepFrame(0).to_wire()
    meta.update(fields)
    return meta


def test_a_normal_step_passes_and_reports_runs():
    held = np.zeros(16, np.int64)
    held[3] = 5
    plan = check_step(*wire([3, 0, 0, 0], [5, 0, 1, 2], tokens=[1, 2, 3, 4], out=[1, 0, 0, 1], step=1, free=[2],
                            start={0: SeqStart(SamplingParams(temperature=0.0))}), FIRST, held)
    assert plan.free == [2] and list(plan.start) == [0] and plan.start[0].params.temperature == 0.0
    starts, ends = plan.runs()
    assert starts.tolist() == [0, 1] and ends.tolist() == [0, 3]
    assert plan.out.dtype == bool


@pytest.mark.parametrize("meta,arr,msg", [
    ({"free": [256]}, arrays([], []), "sequence ids"),
    ({"free": [-1]}, arrays([], []), "sequence ids"),
    ({"free": [True]}, arrays([], []), "sequence ids"),
    ({"free": "0"}, arrays([], []), "list"),
    ({"start": {"99": {}}}, arrays([], []), "start"),
    ({"start": {"1": {"top_k": 1e300}}}, arrays([], []), "top_k"),
    ({"start": {"1": {"temperature": "hot"}}}, arrays([], []), "temperature"),
    ({"start": {"1": {"seed": 2 ** 40}}}, arrays([], []), "seed"),
    ({"start": {"1": 5}}, arrays([], []), "object"),
    ({"step": "x"}, arrays([], []), "step"),
    ({}, arrays([0], [2 ** 31 - 1], tokens=[1]), "positions"),
    ({}, arrays([0], [256], tokens=[1]), "positions"),
    ({}, arrays([0], [-1], tokens=[1]), "positions"),
    ({}, arrays([16], [0], tokens=[1]), "sequence ids"),
    ({}, arrays([0, 0], [0, 2], tokens=[1, 1]), "increase by one"),
    ({}, arrays([0, 1, 0], [0, 0, 1], tokens=[1, 1, 1]), "contiguous"),
    ({}, arrays([0], [3], tokens=[1]), "holds 0 positions"),
    ({}, arrays([0], [0], tokens=[100]), "token ids"),
    ({}, arrays([0], [0]), "tokens"),
    ({}, arrays([0], [0], tokens=[1], hidden=np.zeros((1, 8))), "hidden states"),
    ({}, arrays([0] * 65, list(range(65)), tokens=[1] * 65), "at most 64"),
    ({}, {**arrays([0], [0], tokens=[1]), "pos": np.zeros(2, np.int32)}, "rows"),
    ({}, {**arrays([0], [0]), "seq": np.zeros((1, 1), np.int32)}, "1-D"),
    ({}, {**arrays([0], [0]), "seq": np.zeros(1, np.float32)}, "integer"),
    ({}, {**arrays([0], [0], tokens=[1]), "evil": np.zeros(1, np.int32)}, "unknown array"),
    ({}, {**arrays([0], [0], tokens=[1]), "out": np.array([2], np.uint8)}, "'out'"),
])
def test_bad_first_stage_frames_are_rejected(meta, arr, msg):
    with pytest.raises(StepError, match=msg):
        check_step(hostile_meta(**meta), arr, FIRST, np.zeros(16, np.int64))


@pytest.mark.parametrize("hidden,msg", [
    (np.full((1, 8), np.nan), "NaN"),
    (np.full((1, 8), np.inf), "NaN"),
    (np.zeros((1, 7)), "hidden"),
    (None, "hidden"),
])
def test_bad_hidden_rows_are_rejected(hidden, msg):
    with pytest.raises(StepError, match=msg):
        check_step(*wire([0], [0], hidden=hidden), LATER, np.zeros(16, np.int64))


def test_free_in_the_same_step_restarts_a_sequence():
    held = np.zeros(16, np.int64)
    held[4] = 10
    with pytest.raises(StepError):
        check_step(*wire([4], [0], tokens=[1]), FIRST, held)
    plan = check_step(*wire([4], [0], tokens=[1], free=[4]), FIRST, held)
    assert plan.n == 1 and held[4] == 10  # the check never changes the caller's state


def test_frame_size_limit_follows_the_configuration():
    assert FIRST.max_frame_bytes() == 64 * (8 * 4 + 16) + (1 << 20)


# ---------------------------------------------------------------- speculative decoding: trim, drafts, spec
def test_trim_then_drafts_continue_where_the_trim_leaves_the_sequence():
    held = np.zeros(16, np.int64)
    held[4] = 12  # 9 accepted positions + 3 rejected drafts
    plan = check_step(*wire([4, 4, 4], [9, 10, 11], tokens=[6, 7, 8], out=[1, 1, 1], trim={4: 9},
                            drafts={4: np.array([7, 8], np.int32)}), FIRST, held)
    assert plan.trim == {4: 9} and plan.drafts[4].tolist() == [7, 8]
    with pytest.raises(StepError, match="holds 12 positions"):   # without the trim the positions do not continue
        check_step(*wire([4], [9], tokens=[6]), FIRST, held)
    # a later stage has no vocabulary: draft ids are only checked for range there
    hid = np.zeros((3, 8), np.float32)
    plan = check_step(*wire([4, 4, 4], [9, 10, 11], hidden=hid, out=[1, 1, 1], trim={4: 9},
                            drafts={4: np.array([70000, 8], np.int32)}), LATER, held)
    assert plan.drafts[4].tolist() == [70000, 8]


@pytest.mark.parametrize("meta,arr,msg", [
    ({"trim": {"4": 13}}, arrays([], []), "holds only 12"),
    ({"trim": {"4": True}}, arrays([], []), "position"),
    ({"trim": {"4": 2.5}}, arrays([], []), "position"),
    ({"trim": {"x": 1}}, arrays([], []), "sequence id"),
    ({"free": [4], "trim": {"4": 3}}, arrays([], []), "holds only 0"),
    ({"drafts": {"4": [1]}}, arrays([], []), "without rows"),
    ({"drafts": {"4": [1] * 33}}, arrays([4] * 34, list(range(12, 46)), tokens=[1] * 34, out=[1] * 34), "1..32"),
    ({"drafts": {"4": [1, 2]}}, arrays([4, 4, 4], [12, 13, 14], tokens=[0, 1, 2]), "needs an 'out'"),
    ({"drafts": {"4": [1, 2]}}, arrays([4, 4, 4], [12, 13, 14], tokens=[0, 1, 3], out=[1, 1, 1]), "differ"),
    ({"drafts": {"4": [1, 2]}}, arrays([4, 4], [12, 13], tokens=[1, 2], out=[1, 1]), "at least 3"),
    ({"drafts": {"4": [1, 200]}}, arrays([4, 4, 4], [12, 13, 14], tokens=[0, 1, 200], out=[1, 1, 1]), "token ids"),
    ({"drafts": {"4": "12"}}, arrays([4, 4], [12, 13], tokens=[1, 2], out=[1, 1]), "token ids"),
    ({"start": {"5": {"temperature": 0.5, "spec": 1}}}, arrays([], []), "'spec'"),
])
def test_hostile_speculation_fields_are_rejected(meta, arr, msg):
    held = np.zeros(16, np.int64)
    held[4] = 12
    before = held.copy()
    with pytest.raises(StepError, match=msg):
        check_step(hostile_meta(**meta), arr, FIRST, held)
    assert np.array_equal(held, before)
