"""What a step of n rows costs a stage (issue 28): measured when the stage starts, carried in its hello, read by the
gateway's speculation (serving/speculative.py StepCost), and checked like anything else off the network.

In-process stage servers on a tiny model (real llama.cpp, real forward steps); the hello's values are attacked
with malformed tables.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401

import math

import numpy as np
import orjson
import pytest

from molink_lite.serving.speculative import StepCost
from molink_lite.stage import step_costs
from molink_lite.wire.protocol import SamplingParams, SeqStart, StepFrame, parse_step_costs

from spec_chain import close, kv_max_pos, run_step, servers_for
from testmodels import write_random_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("costs") / "tiny.gguf")
    write_random_gguf(path, "llama", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=256,
                      qtype="f32")
    return path


def test_a_stage_measures_its_steps_then_serves_with_an_empty_cache(tiny):
    servers = servers_for(tiny, [2], n_ctx=256, n_seq_max=4)
    try:
        for srv in servers:
            srv.measure_step_costs(0.5)
            table = srv.step_costs
            rows = [n for n, _ in table]
            assert rows[0] == 1 and rows == sorted(rows) and len(rows) >= 8, rows
            assert all(s > 0 for _, s in table)
            assert kv_max_pos(srv, 0) == -1          # the probe's KV is gone: the stage starts empty
            hello = orjson.loads(orjson.dumps(srv.describe()))   # as the gateway receives it
            got = parse_step_costs(hello["step_costs"])
            assert [n for n, _ in got] == rows
            assert all(math.isclose(a, b, abs_tol=1e-6) for (_, a), (_, b) in zip(got, table))
        # the stage serves as before: a prefill step through both stages gives a token
        st = StepFrame(1, seq=np.zeros(3, np.int32), pos=np.arange(3, dtype=np.int32),
                       tokens=np.array([5, 6, 7], np.int32), out=np.array([0, 0, 1], bool),
                       start={0: SeqStart(SamplingParams(temperature=0.0))})
        seq, toks = run_step(servers, *st.to_wire())
        assert seq.tolist() == [0] and 0 <= int(toks[0]) < 256
    finally:
        close(servers)


def test_the_time_budget_bounds_the_probe(tiny):
    servers = servers_for(tiny, [], n_ctx=64, n_seq_max=1)
    try:
        eng = servers[0].engine
        assert [n for n, _ in step_costs.measure(eng, 0.0)] == [1]          # no time: the first count only
        got = step_costs.measure(eng, 5.0, rows=(1, 2, 4, 500))
        assert [n for n, _ in got] == [1, 2, 4]                              # 500 rows do not fit 64 cells
    finally:
        close(servers)


@pytest.mark.parametrize("bad", [
    None, "1,2", {}, [], [[1, 0.01]] * 65, [[1, 0.01], [1, 0.02]], [[0, 0.01]], [[1 << 17, 0.01]], [[1, 0.0]],
    [[1, -1.0]], [[1, 601.0]], [[True, 0.01]], [[1, True]], [[1.5, 0.01]], [["1", 0.01]], [[1, "0.01"]],
    [[1, 0.01, 2]], [[1]], [1, 0.01], [[1, float("nan")]], [[1, float("inf")]], [[[1], 0.01]],
])
def test_a_malformed_table_off_the_network_is_ignored(bad):
    assert parse_step_costs(bad) == []


def test_the_gateway_models_a_step_from_the_stages_or_falls_back_to_its_fit():
    c = StepCost(0.03, 0.001)
    c.set_stages([[(1, 0.006), (8, 0.028)], [(1, 0.012), (8, 0.055)]], 0.021)
    assert math.isclose(c.seconds(1), 0.021 + 0.006 + 0.012)
    assert math.isclose(c.seconds(8, 2), max(0.055, (0.021 + 0.028 + 0.055) / 2))   # slowest stage bounds 2 steps
    assert c.seconds(16) > c.seconds(8)                                             # past the table: rising
    c.set_stages([[(1, 0.006)], []], 0.021)     # a stage without a table (older, or it could not measure)
    assert not c.stages and math.isclose(c.seconds(4), 0.03 + 0.004)
