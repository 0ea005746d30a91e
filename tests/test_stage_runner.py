"""The stage's parts in process (no sockets): the step runner's lanes and reports, the configure request, fencing,
the next-stage link's notices, and the counters the ``stats`` frame carries."""

from __future__ import annotations

import llama_cpp  # noqa: F401

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from molink_lite.model.split import LayerRange, stage_gguf
from molink_lite.stage.engine import StageEngine
from molink_lite.stage.fencing import Fencing
from molink_lite.stage.next_link import NextLink
from molink_lite.stage.runner import StepRunner
from molink_lite.stage.server import StageServer
from molink_lite.wire.codec import decode_frame
from molink_lite.wire.protocol import Configure, ProtocolError, ResultFrame, SamplingParams, SeqStart, StepFrame

SHAPE = dict(n_layer=4, n_embd=64, n_head=4, n_vocab=256)
# every counter the stats frame has carried (tests and dashboards read them)
STATS_KEYS = {"steps", "rows", "max_seqs_in_step", "max_queued", "max_in_flight", "errors", "frees", "busy_s",
              "refused_links", "rejected_frames", "trims", "drafted", "accepted", "busy_refusals",
              "evicted_handshakes", "next_link_losses", "next_link_reconnects", "epoch", "takeovers",
              "refused_configures", "ring_rounds", "inline_steps"}


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("llama", **SHAPE)


_NO_LANE = object()


def _step(step, seq, pos, tokens, lane=_NO_LANE, **fields):
    """A first-stage step built through the protocol type; a ``lane`` that is no integer is put on the wire as
    given (a hostile frame)."""
    typed = isinstance(lane, int) and not isinstance(lane, bool)
    meta, arrays = StepFrame(step, np.asarray(seq, np.int32), np.asarray(pos, np.int32),
                             tokens=np.asarray(tokens, np.int32), out=np.ones(len(seq), bool),
                             lane=lane if typed else 0, **fields).to_wire()
    if not typed and lane is not _NO_LANE:
        meta["lane"] = lane
    return meta, arrays


def test_the_server_keeps_every_stats_counter(tiny, tmp_path):
    with StageEngine(stage_gguf(tiny, LayerRange(0, 2), str(tmp_path)), n_ctx=256, n_seq_max=4, n_threads=1) as e:
        srv = StageServer(e)
        try:
            assert set(srv.stats) == STATS_KEYS
            assert srv.describe()["next"] is None and srv.describe()["codec"] == "f16"
            assert srv.kv_usage() == (0, 0) and srv.timeline is srv.runner.timeline
        finally:
            srv.runner.close()


def test_steps_go_to_their_lane_and_a_bad_lane_is_reported_with_nothing_applied(tiny, tmp_path):
    async def main(e):
        delivered, reports = [], []
        r = StepRunner(e, None, {}, codec="f32", deliver=lambda f, out: delivered.append((f, out)),
                       report=lambda step, msg: reports.append((step, msg)))
        r.start()
        try:
            r.submit(*_step(1, [0, 0], [0, 1], [5, 6]))
            r.submit(*_step(2, [1], [0], [7], lane=1))
            for bad in (2, -1, True, "0", 0.0, None):   # routed loosely, rejected by the check
                r.submit(*_step(3, [1], [1], [8], lane=bad))
            r.submit(*_step(4, [3], [0], [8], lane=0))  # sequence 3 lives in lane 1
            meta, _ = StepFrame(9, lane=7).to_wire()
            r.submit({**meta, "step": [9]}, {})  # no step id, an unknown lane, no arrays
            for _ in range(200):
                if r.in_flight == 0:
                    break
                await asyncio.sleep(0.02)
            assert r.in_flight == 0
            delivered.sort(key=lambda d: d[0].step)  # lanes run side by side
            assert [f.step for f, _ in delivered] == [1, 2]
            meta, arrays = decode_frame(delivered[0][1])  # the forwarded step: same rows, hidden states
            assert meta["type"] == "step" and meta["step"] == 1 and arrays["hidden"].shape == (2, 64)
            assert arrays["seq"].tolist() == [0, 0] and "tokens" not in arrays
            assert decode_frame(delivered[1][1])[0]["lane"] == 1
            assert [s for s, _ in reports] == [3] * 6 + [4, None]
            assert all("rejected step: 'lane' must be" in m for _, m in reports[:6]), reports
            assert "sequence 3 is not in lane 0" in reports[6][1]
            assert r.seq_len.tolist() == [2, 1, 0, 0]  # the rejected steps applied nothing
            assert r.stats["rejected_frames"] == 8 and r.stats["steps"] == 2 and r.stats["max_in_flight"] >= 9
            r.reset_all()
            r.submit(*_step(5, [1], [0], [9], lane=1))  # after the reset sequence 1 starts over
            for _ in range(200):
                if r.in_flight == 0 and len(delivered) == 3:
                    break
                await asyncio.sleep(0.02)
            assert [f.step for f, _ in delivered] == [1, 2, 5] and r.seq_len.tolist() == [0, 1, 0, 0]
        finally:
            r.close()

    with StageEngine(stage_gguf(tiny, LayerRange(0, 2), str(tmp_path)), n_ctx=256, n_seq_max=4, n_threads=1,
                     lanes=2) as e:
        asyncio.run(main(e))


def _run_steps(e, steps, paced: bool = True):
    """Run ``steps`` (meta, arrays) through a StepRunner on ``e``; returns the events in order: ("run", step, the
    thread that ran the forward pass), ("sent", step) when a task other than the runner's took the delivered
    frame (as the stage's send task does), and the runner's stats. ``paced``: each step is submitted 2 ms after the
    previous one was delivered (one sequence going round a pipeline); else all are queued at once (a backlog)."""
    events = []
    forward = e.forward

    def traced(seq, pos, **kw):
        events.append(("run", int(pos[0]), threading.current_thread().name))
        return forward(seq, pos, **kw)

    async def main():
        out: asyncio.Queue = asyncio.Queue()
        r = StepRunner(e, None, {}, codec="f32", deliver=lambda f, o: out.put_nowait(f.step),
                       report=lambda step, msg: events.append(("report", step, msg)))
        todo = list(steps)

        async def sender():
            while True:
                k = await out.get()
                events.append(("sent", k))
                if paced and todo:
                    await asyncio.sleep(0.002)   # the rest of the round: the other stages, the links
                    r.submit(*todo.pop(0))
        task = asyncio.ensure_future(sender())
        r.start()
        try:
            for st in ([todo.pop(0)] if paced else [todo.pop(0) for _ in range(len(todo))]):
                r.submit(*st)
            for _ in range(500):
                if r.in_flight == 0 and out.empty() and not todo:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
            return dict(r.stats)
        finally:
            task.cancel()
            r.close()

    e.forward = traced
    try:
        return events, asyncio.run(main())
    finally:
        del e.forward


def test_small_steps_run_on_the_loop_thread_when_nothing_else_waits(tiny, tmp_path, monkeypatch):
    """A decode-sized step of an otherwise idle stage runs on the event loop's thread once the lane's steps are
    known to be short (no two thread hand-offs per step). The first step, a backlog of queued steps (the loop
    keeps reading frames while llama.cpp runs), frames that come right after the previous step ended, a step over
    INLINE_MAX_ROWS, a slow lane, MOLINK_INLINE_STEPS=0 and two lanes keep the llama thread; every delivered frame
    leaves before the next step runs."""
    import molink_lite.stage.runner as runner_mod
    path = stage_gguf(tiny, LayerRange(0, 2), str(tmp_path))
    steps = [_step(k, [0], [k], [5 + k]) for k in range(6)]
    main = threading.main_thread().name

    def threads(events):
        return [ev[2] == main for ev in events if ev[0] == "run"]

    with StageEngine(path, n_ctx=256, n_seq_max=4, n_threads=1) as e:
        events, stats = _run_steps(e, steps)
    runs = [ev for ev in events if ev[0] == "run"]
    assert [ev[1] for ev in runs] == list(range(6)) and not [ev for ev in events if ev[0] == "report"]
    assert threads(events) == [False] + [True] * 5 and stats["inline_steps"] == 5 and stats["steps"] == 6

    with StageEngine(path, n_ctx=256, n_seq_max=4, n_threads=1) as e:   # a backlog: all queued at once
        events, stats = _run_steps(e, steps, paced=False)
    assert threads(events)[:5] == [False] * 5, events
    order = [(ev[0], ev[1]) for ev in events]
    for k in range(5):   # step k's frame went out before step k + 1 ran
        assert order.index(("sent", k)) < order.index(("run", k + 1)), order

    monkeypatch.setattr(runner_mod, "INLINE_IDLE_S", 1.0)   # frames that come soon after a step: the thread
    with StageEngine(path, n_ctx=256, n_seq_max=4, n_threads=1) as e:
        events, stats = _run_steps(e, steps)
    assert not any(threads(events)) and stats["inline_steps"] == 0
    monkeypatch.undo()

    monkeypatch.setattr(runner_mod, "INLINE_MAX_ROWS", 2)   # a step of more rows takes the thread
    big = [_step(0, [0], [0], [5]), _step(1, [0], [1], [6]), _step(2, [0, 0, 0], [2, 3, 4], [7, 8, 9]),
           _step(3, [0], [5], [5])]
    with StageEngine(path, n_ctx=256, n_seq_max=4, n_threads=1) as e:
        events, _ = _run_steps(e, big)
    assert threads(events) == [False, True, False, True]

    monkeypatch.setattr(runner_mod, "INLINE_MAX_S", 0.0)    # a lane whose steps take long keeps the thread
    with StageEngine(path, n_ctx=256, n_seq_max=4, n_threads=1) as e:
        events, stats = _run_steps(e, steps)
    assert not any(threads(events)) and stats["inline_steps"] == 0
    monkeypatch.undo()

    monkeypatch.setenv("MOLINK_INLINE_STEPS", "0")
    with StageEngine(path, n_ctx=256, n_seq_max=4, n_threads=1) as e:
        events, stats = _run_steps(e, steps)
    assert not any(threads(events)) and stats["inline_steps"] == 0
    monkeypatch.delenv("MOLINK_INLINE_STEPS")
    with StageEngine(path, n_ctx=256, n_seq_max=4, n_threads=1, lanes=2) as e:   # lanes run side by side: threads
        events, stats = _run_steps(e, steps)
    assert not any(threads(events)) and stats["inline_steps"] == 0


def test_the_engine_counts_the_decodes_that_reused_llama_cpps_graph(tiny, tmp_path):
    """Same-shaped decode steps run on the graph llama.cpp built for the first (no rebuild: a CUDA build replays
    it as a CUDA graph); the stage's stats carry the count next to the engine's steps."""
    with StageEngine(stage_gguf(tiny, LayerRange(0, 2), str(tmp_path)), n_ctx=256, n_seq_max=4, n_threads=1) as e:
        assert e.graphs_reused() == 0
        for p in range(4):
            e.forward(np.array([0], np.int32), np.array([p], np.int32), tokens=np.array([5], np.int32))
        assert e.graphs_reused() == 3
        srv = StageServer(e)
        try:
            replies = []
            ch = SimpleNamespace(role="gateway", reply=lambda req, meta, arrays=None: replies.append(meta))
            asyncio.run(srv._handle(ch, {"type": "stats", "rid": 1}, {}))
            assert replies[0]["engine_graphs_reused"] == 3 and replies[0]["engine_steps"] == 4
        finally:
            srv.runner.close()


def test_the_last_stage_answers_a_result_frame(tiny, tmp_path):
    with StageEngine(stage_gguf(tiny, LayerRange(0, 4), str(tmp_path)), n_ctx=256, n_seq_max=4, n_threads=1) as e:
        srv = StageServer(e, codec="f32")
        try:
            r = srv.runner
            out = r.run(r.check(*_step(7, [2, 2, 2], [0, 1, 2], [1, 2, 3],
                                       start={2: SeqStart(SamplingParams(temperature=0.0))})))
            assert isinstance(out, ResultFrame) and out.step == 7 and out.seq.tolist() == [2, 2, 2]
            meta, arrays = out.to_wire()
            assert meta["type"] == "result" and len(meta["pieces"]) == 3 and arrays["eog"].dtype == np.uint8
            assert r.seq_len[2] == 3 and 2 in r.samplers
            empty = r.run(r.check(*StepFrame(8, free=[2]).to_wire()))
            assert empty.to_wire()[0] == {"type": "result", "step": 8} and r.seq_len[2] == 0 and 2 not in r.samplers
        finally:
            srv.runner.close()


def test_configure_requests_are_checked_before_anything_is_applied():
    assert Configure.decode({"type": "configure"}, "f32") == Configure(None, "f32", "", False)
    assert Configure.decode({"next": "ws://b:1", "codec": "int8", "gateway": "g", "takeover": True}, "f16") \
        == Configure("ws://b:1", "int8", "g", True)
    assert Configure.decode({"next": "", "takeover": "yes"}, "f16") == Configure(None, "f16", "", False)
    for meta, msg in (({"codec": "f8"}, "unknown codec"), ({"gateway": ""}, "'gateway'"),
                      ({"gateway": "x" * 65}, "'gateway'"), ({"gateway": 5}, "'gateway'"),
                      ({"next": 5}, "'next'"), ({"next": "http://b:1"}, "'next'")):
        with pytest.raises(ProtocolError, match=msg):
            Configure.decode(meta, "f16")


class _Head:
    """A connected head whose WebSocket answers pings (or not)."""

    def __init__(self, alive: bool):
        self.name, self.closed, self._alive = "head", asyncio.Event(), alive
        self.ws = SimpleNamespace(ping=self._ping)

    async def _ping(self):
        if not self._alive:
            raise ConnectionError("gone")
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def test_fencing_refuses_another_gateway_while_the_controller_answers():
    async def main():
        stats: dict = {}
        f = Fencing(stats, "0-1")
        ch = SimpleNamespace(name="new")
        assert await f.admit("g1", False, ch, None) == (None, False)
        assert f.take("g1", ch, False, replacing=False).startswith("fenced off") and f.epoch == 1
        refusal, forced = await f.admit("g2", False, ch, _Head(alive=True))
        assert refusal["code"] == "fenced" and refusal["epoch"] == 1 and "--takeover" in refusal["message"]
        assert not forced and stats["refused_configures"] == 1 and f.epoch == 1
        assert await f.admit("g2", True, ch, _Head(alive=True)) == (None, True)
        f.take("g2", ch, True, replacing=True)
        assert f.epoch == 2 and stats["takeovers"] == 1 and stats["epoch"] == 2
        assert await f.admit("g3", False, ch, _Head(alive=False)) == (None, False)  # a controller gone: restart
        assert await f.admit("g2", False, ch, _Head(alive=True)) == (None, False)   # the same gateway
        assert f.take("g2", ch, False, replacing=True) == "replaced by a newer link of the same gateway"
        assert f.epoch == 2

    asyncio.run(main())


def test_the_head_hears_of_a_lost_next_link_once():
    async def main():
        told: list = []
        link = NextLink(None, {}, "0-1", describe=dict, tell_head=told.append)
        assert link.send(b"x") == "stage 0-1 has no connection to the next stage" and told == []
        link.ch = SimpleNamespace(closed=asyncio.Event(), close_reason="reset")
        link.url = "ws://b:1"
        link.ch.closed.set()
        assert link.send(b"x") and link.send(b"y")
        assert told == [{"type": "link_down", "stage": "0-1", "to": "ws://b:1", "reason": "reset"}]
        assert await link.probe(1 << 20, 1 << 20) == {"type": "probe", "rtt_s": None, "mbit": None}

    asyncio.run(main())
