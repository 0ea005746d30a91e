"""Handshake slots held by outsiders (issue 23, A): connections that never answer the challenge cannot lock the
gateway out of its stages.

Real stage processes (a tiny random model), a real gateway, real WebSockets. The "squatters" open WebSocket
connections to each stage from this process (so from 127.0.0.1, the address the gateway, the other stage and
relayed tunnels also come from) and never answer the challenge; a squatter the stage closes is reopened, so
they stay held for as long as the test wants.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Dict, List

import pytest
import websockets

from molink_lite.model.split import LayerRange, stage_gguf
from molink_lite.serving.launcher import start_stages, stop_stages
from molink_lite.stage.engine import StageEngine
from molink_lite.stage.conn_slots import address_key
from molink_lite.stage.server import StageServer
from molink_lite.wire.auth import new_secret

from serving import GatewayProcess, http

SECRET = new_secret()
SHAPE = dict(n_layer=4, n_embd=64, n_head=4, n_vocab=512)
STAGE_ARGS = ["--threads", "1", "--ctx", "1024", "--max-seqs", "4"]


class Squatters:
    """``n`` silent WebSocket connections to each URL, held open from a background thread; one the stage closes is
    opened again after ``reopen`` seconds."""

    def __init__(self, urls: List[str], n: int, reopen: float = 0.1):
        self.urls, self.n, self.reopen = urls, n, reopen
        self.open_now: Dict[str, int] = {u: 0 for u in urls}
        self.opened = 0
        self.closed_by_stage = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> "Squatters":
        self._thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(self.open_now.values()) < self.n:
            time.sleep(0.05)
        assert min(self.open_now.values()) >= min(self.n, 8), f"the squatters could not connect: {self.open_now}"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _main(self) -> None:
        tasks = [asyncio.ensure_future(self._hold(u)) for u in self.urls for _ in range(self.n)]
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _hold(self, url: str) -> None:
        while True:
            try:
                ws = await websockets.connect(url, open_timeout=10, ping_interval=None, close_timeout=0.5)
            except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException):
                await asyncio.sleep(self.reopen)
                continue
            self.opened += 1
            self.open_now[url] += 1
            try:
                await ws.wait_closed()  # never answers the challenge
                self.closed_by_stage += 1
            finally:
                self.open_now[url] -= 1
                await ws.close()
            await asyncio.sleep(self.reopen)


@pytest.fixture
def stages(tiny_models, tmp_path):
    model = tiny_models("llama", **SHAPE)
    secret_file = tmp_path / "cluster.key"
    secret_file.write_text(SECRET + "\n")
    procs = start_stages(model, [LayerRange(0, 2), LayerRange(2, 4)], extra_args=STAGE_ARGS, workdir=str(tmp_path),
                         secret=SECRET)
    try:
        yield procs, ["--secret-file", str(secret_file)]
    finally:
        stop_stages(procs)


def _serves(gw: GatewayProcess, n: int = 3) -> None:
    for i in range(n):
        status, body = http("POST", gw.url + "/v1/completions", {"prompt": f"hello {i}", "max_tokens": 8,
                                                                  "ignore_eos": True}, timeout=60)
        assert status == 200 and body["usage"]["completion_tokens"] == 8, body


def _stage_stats(gw: GatewayProcess) -> List[dict]:
    status, body = http("GET", gw.url + "/v1/stats", timeout=30)
    assert status == 200, body
    return body["pipelines"][0]["stages"]


@pytest.mark.slow
def test_ten_silent_connections_per_stage_do_not_lock_out_the_gateway(stages, tmp_path):
    """10 silent connections held open to each stage: the gateway still connects and serves, and a gateway
    restarted while they are held joins within its retry window."""
    procs, sec = stages
    with Squatters([sp.url for sp in procs], 10):
        gw = GatewayProcess([[sp.url for sp in procs]], extra=sec, log_dir=tmp_path)
        try:
            gw.wait_ready(90)
            _serves(gw)
        finally:
            gw.stop()
        # a restarted gateway while the squatters are still there
        gw = GatewayProcess([[sp.url for sp in procs]], extra=sec, log_dir=tmp_path)
        try:
            gw.wait_ready(90)
            _serves(gw)
        finally:
            gw.stop()
    for sp in procs:
        assert sp.proc.poll() is None, sp.log_tail()


@pytest.mark.slow
def test_a_full_handshake_table_gives_the_oldest_slot_to_a_newcomer(stages, tmp_path):
    """40 silent connections per stage (more than a stage keeps pending from one address), reopened as soon as the
    stage drops one: the stage evicts the oldest pending one for each newcomer, so the gateway (and stage 0's link
    to stage 1, from the same address) get through; the authenticated links are never evicted (no failure while
    the squatters churn)."""
    procs, sec = stages
    with Squatters([sp.url for sp in procs], 40, reopen=1.0) as sq:
        gw = GatewayProcess([[sp.url for sp in procs]], extra=sec, log_dir=tmp_path)
        try:
            gw.wait_ready(90)
            _serves(gw)
            time.sleep(3)  # churn: squatters evicted and reopened while the links stay up
            _serves(gw)
            status, body = http("GET", gw.url + "/v1/stats", timeout=30)
            p = body["pipelines"][0]
            assert p["state"] == "up" and p["failures"] == 0, p
            st = _stage_stats(gw)
            assert all(s["evicted_handshakes"] > 0 for s in st), st
            gw.stop()
            gw = GatewayProcess([[sp.url for sp in procs]], extra=sec, log_dir=tmp_path)
            gw.wait_ready(90)
            _serves(gw)
        finally:
            gw.stop()
        assert sq.closed_by_stage > 0
    for sp in procs:
        assert sp.proc.poll() is None, sp.log_tail()


# ---------------------------------------------------------------- the slot table itself (in process)
def test_slot_table_evicts_only_unanswered_handshakes_and_the_crowded_address_first(tiny_models, tmp_path):
    model = tiny_models("llama", **SHAPE)
    with StageEngine(stage_gguf(model, LayerRange(0, 2), str(tmp_path)), n_ctx=256, n_seq_max=4, n_threads=1) as e:
        srv = StageServer(e, max_connections=8, max_connections_per_address=6, max_handshakes=6,
                          max_handshakes_per_address=3)
        slots = srv.slots
        honest, _ = slots.enter("10.0.0.2")
        flood = [slots.enter("10.0.0.1")[0] for _ in range(10)]  # one address floods: it evicts its own oldest
        assert all(r is not None for r in flood)
        assert [r.evicted.is_set() for r in flood] == [True] * 7 + [False] * 3
        assert not honest.evicted.is_set() and srv.stats["evicted_handshakes"] == 7
        more = [slots.enter("10.0.0.3")[0] for _ in range(2)]  # 6 pending in all: the next one takes from the crowd
        newcomer, _ = slots.enter("10.0.0.4")
        assert newcomer is not None and flood[7].evicted.is_set() and not honest.evicted.is_set()
        assert not any(r.evicted.is_set() for r in more)
        # authenticated connections are never evicted: six from one address fill its table, a seventh is refused
        for r in [honest, *flood, *more, newcomer]:
            slots.release(r)
        assert slots.n_conn == 0 and not slots.pending and not slots.by_addr
        authed = []
        for _ in range(6):
            authed.append(slots.enter("10.0.0.5")[0])
            slots.unpend(authed[-1])  # it answered the challenge
        rec, why = slots.enter("10.0.0.5")
        assert rec is None and "authenticated" in why
        assert not any(r.evicted.is_set() for r in authed)
        # and the global table: 8 connections, all authenticated -> refused; a pending one among them -> evicted
        two = [slots.enter("10.0.0.6")[0] for _ in range(2)]
        slots.unpend(two[0])
        rec, _ = slots.enter("10.0.0.7")
        assert rec is not None and two[1].evicted.is_set() and not two[0].evicted.is_set()
        slots.unpend(rec)
        rec2, why = slots.enter("10.0.0.8")
        assert rec2 is None and why, why
    assert address_key(("2001:db8::1", 5, 0, 0)) == address_key(("2001:db8::2", 6, 0, 0)) == "2001:db8::/64"
    assert address_key(("::ffff:10.1.2.3", 7, 0, 0)) == "10.1.2.3"
