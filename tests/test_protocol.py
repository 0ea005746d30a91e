"""wire/protocol.py: the typed messages between gateway and stage, without sockets or a model."""

from __future__ import annotations

import numpy as np
import pytest

from molink_lite.wire.codec import decode_frame, encode_frame
from molink_lite.wire.protocol import (MAX_DRAFT, PROTOCOL_VERSION, SAMPLING_RANGES, Configure, FrameLimits, LinkDown,
                                       ProtocolError, ResultFrame, SamplingError, SamplingParams, SeqStart, StepError,
                                       StepErrorFrame, StepFrame, chain_mismatch, check_chain, lane_of)

FIRST = FrameLimits(n_seq_max=8, n_ctx=64, max_rows=32, n_vocab=100, n_embd_inp=4, is_first=True, is_last=False)
LATER = FrameLimits(n_seq_max=8, n_ctx=64, max_rows=32, n_vocab=100, n_embd_inp=4, is_first=False, is_last=True)


def _frame(**kw) -> StepFrame:
    base = dict(step=7, seq=np.array([0, 0, 0, 3], np.int32), pos=np.array([0, 1, 2, 5], np.int32),
                tokens=np.array([1, 2, 3, 4], np.int32), out=np.array([0, 0, 1, 1], bool))
    base.update(kw)
    return StepFrame(**base)


def test_a_step_frame_round_trips_through_the_binary_format():
    f = _frame(free=[5], start={0: SeqStart(SamplingParams(temperature=0.5, seed=3), (9, 8), spec=True)},
               trim={3: 5})
    meta, arrays = decode_frame(f.encode("f16"))
    g = StepFrame.decode(meta, arrays, FIRST)
    assert g.step == 7 and g.free == [5] and g.trim == {3: 5} and g.lane == 0
    assert g.start == {0: SeqStart(SamplingParams(temperature=0.5, seed=3), (9, 8), True)}
    assert g.spec == {0}
    np.testing.assert_array_equal(g.seq, f.seq)
    np.testing.assert_array_equal(g.tokens, f.tokens)
    np.testing.assert_array_equal(g.out, f.out)
    starts, ends = g.runs()
    assert starts.tolist() == [0, 3] and ends.tolist() == [2, 3]


def test_the_forwarded_step_carries_hidden_states_and_the_same_sequence_changes():
    f = _frame(start={3: SeqStart(SamplingParams(temperature=0.0))}, drafts={})
    h = np.arange(16, dtype=np.float32).reshape(4, 4)
    meta, arrays = decode_frame(f.forward(h).encode("f32"))
    assert "tokens" not in arrays
    g = StepFrame.decode(meta, arrays, LATER)
    np.testing.assert_array_equal(g.hidden, h)
    assert g.start[3].params.temperature == 0.0


def test_the_wire_format_is_the_one_stages_took_before_the_types():
    """Same meta keys as the hand-built dicts of protocol version 2 (version 3 changed only what a fork says:
    ``[parent, positions]``, so a stage of version 2 is refused at the hello rather than misreading a fork;
    version 4 only added the optional ring fields)."""
    f = _frame(free=[1], start={0: SeqStart(SamplingParams(), (4,))}, trim={3: 5}, drafts={3: np.array([4])},
               lane=0)
    meta, arrays = f.to_wire()
    assert meta["type"] == "step" and meta["step"] == 7 and meta["free"] == [1]
    assert meta["start"]["0"]["history"] == [4] and meta["start"]["0"]["temperature"] == 1.0
    assert meta["trim"] == {"3": 5} and meta["drafts"] == {"3": [4]} and "lane" not in meta
    assert set(arrays) == {"seq", "pos", "tokens", "out"} and arrays["out"].dtype == np.uint8
    assert PROTOCOL_VERSION == 4   # 4 added ring rounds: a stage of version 3 would ignore 'ring' and stall a ring
    meta, _ = _frame(fork={4: (2, 9)}).to_wire()
    assert meta["fork"] == {"4": [2, 9]}
    assert "ring" not in meta and "round" not in meta   # a step that does not ring looks as before


@pytest.mark.parametrize("change, message", [
    (dict(seq=np.array([0, 3, 0, 3], np.int32)), "contiguous"),
    (dict(pos=np.array([0, 2, 3, 5], np.int32)), "increase by one"),
    (dict(tokens=np.array([1, 2, 3, 100], np.int32)), "token ids"),
    (dict(seq=np.array([0, 0, 0, 8], np.int32)), "sequence ids"),
    (dict(free=[9]), "sequence ids"),
    (dict(drafts={0: np.array([3])}), "last 2 rows"),
    (dict(lane=1), "lane"),
])
def test_decode_rejects_what_breaks_the_protocol(change, message):
    meta, arrays = _frame(**change).to_wire()
    with pytest.raises(StepError, match=message):
        StepFrame.decode(meta, arrays, FIRST)


def test_decode_rejects_hostile_meta():
    meta, arrays = _frame().to_wire()
    for bad in ({"start": {"0": {"temperature": "hot"}}}, {"start": {"x": {}}}, {"trim": {"0": 99}},
                {"drafts": {"0": list(range(MAX_DRAFT + 1))}}, {"step": True}, {"free": "all"},
                {"start": {"0": {"history": [-1]}}}, {"start": {"0": {"spec": 1}}}):
        with pytest.raises(StepError):
            StepFrame.decode({**meta, **bad}, arrays, FIRST)
    with pytest.raises(StepError, match="unknown array"):
        StepFrame.decode(meta, {**arrays, "evil": np.zeros(1, np.int32)}, FIRST)
    with pytest.raises(StepError, match="hidden states"):
        StepFrame.decode(meta, arrays, LATER)


def test_the_lane_rule_lives_in_one_function():
    assert lane_of(5, 2) == 1 and lane_of(5, 1) == 0
    np.testing.assert_array_equal(lane_of(np.arange(6), 3), [0, 1, 2, 0, 1, 2])
    lim = FrameLimits(**{**FIRST.__dict__, "lanes": 2})
    meta, arrays = _frame(seq=np.array([1, 1, 1, 3], np.int32), lane=1).to_wire()
    assert StepFrame.decode(meta, arrays, lim).lane == 1
    with pytest.raises(StepError, match="not in lane 0"):
        StepFrame.decode({**meta, "lane": 0}, arrays, lim)


def test_sampling_params_have_one_range_per_field_checked_when_built():
    assert SamplingParams(temperature=2.0).temperature == 2.0
    for name, (lo, hi, open_lo) in SAMPLING_RANGES.items():
        with pytest.raises(SamplingError) as e:
            SamplingParams(**{name: hi + (1 if isinstance(hi, int) else 0.5)})
        assert e.value.field == name
        if open_lo:
            with pytest.raises(SamplingError):
                SamplingParams(**{name: lo})
    with pytest.raises(SamplingError, match="overflow"):
        SamplingParams(temperature=1e-9)
    with pytest.raises(SamplingError, match="integer"):
        SamplingParams(top_k=1.5)
    with pytest.raises(SamplingError, match="finite"):
        SamplingParams(top_p=float("nan"))
    assert SamplingParams.from_dict({"temperature": 0.0, "unknown": 1, "seed": None}) == SamplingParams(temperature=0.0)


def test_the_http_edge_and_the_stage_share_the_range():
    """temperature 2.5: a 400 at the edge, and a rejected step frame at the stage: the same range on both sides."""
    from molink_lite.serving.openai_schema import ApiError, parse_sampling

    with pytest.raises(ApiError) as e:
        parse_sampling({"temperature": 2.5})
    assert e.value.param == "temperature"
    meta, arrays = _frame(start={0: SeqStart(SamplingParams())}).to_wire()
    meta["start"]["0"]["temperature"] = 2.5
    with pytest.raises(StepError, match="temperature"):
        StepFrame.decode(meta, arrays, FIRST)
    assert parse_sampling({"top_p": 0, "temperature": 1e-9}).top_p > 0


def test_result_frames_are_checked_where_they_arrive():
    r = ResultFrame(3, np.array([0, 2], np.int32), np.array([5, 6], np.int32), np.array([0, 1], bool), ["a", "b"])
    meta, arrays = decode_frame(encode_frame(*r.to_wire()))
    g = ResultFrame.decode(meta, arrays)
    assert g.step == 3 and g.pieces == ["a", "b"] and g.eog.tolist() == [False, True]
    with pytest.raises(ProtocolError):
        ResultFrame.decode({**meta, "pieces": ["a"]}, arrays)
    with pytest.raises(ProtocolError):
        ResultFrame.decode(meta, {**arrays, "tokens": np.zeros(3, np.int32)})


def test_control_messages():
    assert Configure("ws://b:1", "f16", "g1", True).to_meta() == {"type": "configure", "next": "ws://b:1",
                                                                   "codec": "f16", "gateway": "g1", "takeover": True}
    assert LinkDown.decode(LinkDown("0-3", "ws://b", "x" * 1000).to_meta()).reason == "x" * 300
    assert StepErrorFrame.decode({"type": "step_error", "step": "no", "message": 5}).step == -1


def test_chain_checks():
    a = {"protocol": PROTOCOL_VERSION, "fingerprint": "f", "layer_start": 0, "layer_stop": 4, "n_layer_total": 8,
         "n_embd": 16, "n_embd_inp": 16, "url": "ws://a"}
    b = {**a, "layer_start": 4, "layer_stop": 8, "url": "ws://b"}
    assert check_chain([a, b]) is None
    assert "gap" in chain_mismatch(a, {**b, "layer_start": 5})
    assert "protocol" in check_chain([a, {**b, "protocol": 1}])
    assert "served by no stage" in check_chain([a])
