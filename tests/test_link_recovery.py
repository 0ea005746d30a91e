"""Links that are lost are rebuilt, and two gateways do not fight over stages (issue 23, B and C).

Real stage processes (a tiny random model), real gateways, real WebSockets, on loopback:

* B: a stage whose link to the next stage is lost (taken over by another ``upstream`` link, reset, the next
  stage unreachable for a while) reconnects with backoff and tells the pipeline head, so the gateway's pipeline
  goes down (its requests wait or are replayed) and comes back by itself; no accepted request is lost;
* C: a stage remembers which gateway controls it (fencing epoch): a second gateway is refused with a clear error
  while the first keeps serving; ``--takeover`` wins once, and the fenced gateway does not take the stages back.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import pytest

from molink_lite.model.split import LayerRange
from molink_lite.serving.launcher import start_stages, stop_stages
from molink_lite.wire import auth
from molink_lite.wire.auth import LinkKey, new_secret
from molink_lite.wire.channel import Channel

from serving import GatewayProcess, free_port, http

pytestmark = pytest.mark.slow
SECRET = new_secret()
KEY = LinkKey.from_secret(SECRET)
SHAPE = dict(n_layer=4, n_embd=64, n_head=4, n_vocab=512)
STAGE_ARGS = ["--threads", "1", "--ctx", "2048", "--max-seqs", "8"]
RANGES = [LayerRange(0, 2), LayerRange(2, 4)]


# ---------------------------------------------------------------- helpers
class TcpProxy:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target, run in a thread; ``reset()`` kills every connection through
    it with a TCP reset, ``pause()`` refuses (resets) new ones until ``resume()``."""

    def __init__(self, target: int):
        self.target = target
        self.port = free_port()
        self.paused = False
        self._socks: List[socket.socket] = []
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", self.port))
        self._srv.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.paused:
                _rst(c)
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _rst(c)
                continue
            with self._lock:
                self._socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(1 << 16)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self) -> int:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _rst(s)
        return len(socks) // 2

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def close(self) -> None:
        self._stop = True
        self._srv.close()
        self.reset()


def _rst(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()


class Load:
    """Requests sent one after another from ``n`` threads until stopped; records (status, body, start, end)."""

    def __init__(self, gw: GatewayProcess, n: int = 3, max_tokens: int = 24):
        self.gw, self.n, self.max_tokens = gw, n, max_tokens
        self.results: List[tuple] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(n)
        self._futs = [self._pool.submit(self._run, i) for i in range(n)]

    def _run(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                status, body = http("POST", self.gw.url + "/v1/completions",
                                    {"prompt": f"request {i} {k}", "max_tokens": self.max_tokens, "ignore_eos": True},
                                    timeout=120)
            except OSError as e:  # no answer at all: a lost request
                status, body = None, str(e)
            self.results.append((status, body, t0, time.monotonic()))
            k += 1

    def stop(self) -> List[tuple]:
        self._stop.set()
        for f in self._futs:
            f.result(200)
        self._pool.shutdown()
        return self.results

    def check_nothing_lost(self) -> None:
        """Every request ended with its whole completion (replayed if needed) or an explicit JSON error."""
        for status, body, _, _ in self.results:
            assert status is not None, f"a request got no answer: {body}"
            if status == 200:
                assert body["usage"]["completion_tokens"] == self.max_tokens, body
            else:
                assert isinstance(body, dict) and body["error"]["message"], (status, body)


def _ok(gw: GatewayProcess, timeout: float = 30) -> bool:
    try:
        status, body = http("POST", gw.url + "/v1/completions", {"prompt": "hi", "max_tokens": 4, "ignore_eos": True},
                            timeout=timeout)
    except OSError:
        return False
    return status == 200 and body["usage"]["completion_tokens"] == 4


def _health(gw: GatewayProcess) -> tuple:
    try:
        return http("GET", gw.url + "/health", timeout=10)
    except OSError as e:
        return None, str(e)


def _wait(cond, timeout: float, step: float = 0.1) -> Optional[float]:
    """Seconds until ``cond()`` held (polled), or None if it did not within ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def _stage_stats(gw: GatewayProcess) -> List[dict]:
    status, body = http("GET", gw.url + "/v1/stats", timeout=30)
    assert status == 200, body
    return body["pipelines"][0].get("stages") or []


@pytest.fixture
def model(tiny_models):
    return tiny_models("llama", **SHAPE)


@pytest.fixture
def secret_args(tmp_path):
    f = tmp_path / "cluster.key"
    f.write_text(SECRET + "\n")
    return ["--secret-file", str(f)]


def _recovers(gw: GatewayProcess, within: float = 5.0) -> None:
    """Requests succeed again within ``within`` s, or /health reports the pipeline down within that time and it then
    comes back by itself."""
    t0 = time.monotonic()
    healed = _wait(lambda: _ok(gw, timeout=within), within, 0.2)
    if healed is not None:
        return
    assert _health(gw)[0] == 503 or time.monotonic() - t0 < within + 1, "neither serving nor reported down"
    assert _wait(lambda: _ok(gw), 30, 0.5) is not None, f"the pipeline did not come back: {_health(gw)}"


# ---------------------------------------------------------------- B: lost stage-to-stage links
def test_an_upstream_takeover_by_a_secret_holder_heals(model, secret_args, tmp_path):
    """A peer with the secret opens an `upstream` link to stage 1 (stage 0's link is replaced), then closes it:
    stage 0 reconnects and the head learns of it; requests succeed again within 5 s, none is lost."""
    procs = start_stages(model, RANGES, extra_args=STAGE_ARGS, workdir=str(tmp_path), secret=SECRET)
    gw = GatewayProcess([[sp.url for sp in procs]], extra=secret_args, log_dir=tmp_path)
    try:
        gw.wait_ready()
        assert _ok(gw)
        load = Load(gw)
        time.sleep(1.0)

        async def intrude() -> None:
            ws = await auth.connect(procs[1].url, KEY, "upstream", max_size=1 << 20)
            ch = Channel(ws, name="intruder")
            serving = asyncio.ensure_future(ch.serve(lambda *a: asyncio.sleep(0)))
            await asyncio.sleep(0.5)
            await ch.close()
            serving.cancel()
        asyncio.run(intrude())
        t_closed = time.monotonic()
        _recovers(gw)
        took = time.monotonic() - t_closed
        time.sleep(1.0)
        load.stop()
        load.check_nothing_lost()
        assert load.results and all(r[0] == 200 for r in load.results), \
            [r[:2] for r in load.results if r[0] != 200][:3]
        assert _ok(gw)
        print(f"\nupstream takeover: serving again {took:.2f} s after the intruder closed; "
              f"{len(load.results)} requests, all completed")
    finally:
        gw.stop()
        stop_stages(procs)


def test_a_reset_stage_link_heals_and_an_unreachable_next_stage_is_reported(model, secret_args, tmp_path):
    """Stage 0 reaches stage 1 through a TCP proxy (the gateway reaches both directly). A TCP reset of that link:
    serving again within 5 s. The next stage unreachable for a while: /health reports the pipeline down within 5 s,
    and it comes back by itself once the link can be rebuilt. No accepted request is lost."""
    (tmp_path / "b").mkdir()
    last = start_stages(model, RANGES[1:], extra_args=STAGE_ARGS, workdir=str(tmp_path / "b"), secret=SECRET)
    proxy = TcpProxy(last[0].port)
    first = start_stages(model, RANGES[:1], extra_args=STAGE_ARGS + ["--next", proxy.url], workdir=str(tmp_path),
                         secret=SECRET)
    procs = first + last
    gw = GatewayProcess([[sp.url for sp in procs]], extra=secret_args + ["--recover-timeout", "60"], log_dir=tmp_path)
    try:
        gw.wait_ready()
        assert _ok(gw)
        load = Load(gw)
        time.sleep(1.0)
        assert proxy.reset() >= 1  # the stage-to-stage link dies with a TCP reset; the gateway's links do not
        t0 = time.monotonic()
        _recovers(gw)
        took_reset = time.monotonic() - t0
        # the next stage unreachable for 4 s
        time.sleep(1.0)
        proxy.pause()
        proxy.reset()
        t0 = time.monotonic()
        down_after = _wait(lambda: _health(gw)[0] == 503, 5.0)
        assert down_after is not None, f"the pipeline was not reported down: {_health(gw)}"
        status, body = _health(gw)
        assert "next stage" in str(body), body
        time.sleep(max(0.0, 4.0 - (time.monotonic() - t0)))
        proxy.resume()
        t1 = time.monotonic()
        back = _wait(lambda: _health(gw)[0] == 200, 10.0)
        assert back is not None, f"the pipeline did not come back: {_health(gw)}"
        assert _ok(gw)
        time.sleep(1.0)
        load.stop()
        load.check_nothing_lost()
        assert all(r[0] == 200 for r in load.results), [r[:2] for r in load.results if r[0] != 200][:3]
        st = http("GET", gw.url + "/v1/stats")[1]["pipelines"][0]
        assert st["state"] == "up" and st["recoveries"] >= 2, st
        print(f"\nreset: serving again after {took_reset:.2f} s; unreachable: down after {down_after:.2f} s, back "
              f"{time.monotonic() - t1:.2f} s after the link could be rebuilt; {len(load.results)} requests, all "
              f"completed")
    finally:
        gw.stop()
        proxy.close()
        stop_stages(procs)


# ---------------------------------------------------------------- C: two gateways, one set of stages
def test_a_second_gateway_is_refused_and_the_first_keeps_serving(model, secret_args, tmp_path):
    procs = start_stages(model, RANGES, extra_args=STAGE_ARGS, workdir=str(tmp_path), secret=SECRET)
    gw1 = GatewayProcess([[sp.url for sp in procs]], extra=secret_args, log_dir=tmp_path)
    gw2 = None
    try:
        gw1.wait_ready()
        load = Load(gw1, n=2)
        gw2 = GatewayProcess([[sp.url for sp in procs]], extra=secret_args, log_dir=tmp_path)
        rc = gw2.proc.wait(60)
        out = gw2.output()
        assert rc != 0, out
        assert "controlled by another gateway" in out and "--takeover" in out, out
        time.sleep(3.0)
        load.stop()
        load.check_nothing_lost()
        assert load.results and all(r[0] == 200 for r in load.results), [r[:2] for r in load.results if r[0] != 200]
        st = http("GET", gw1.url + "/v1/stats")[1]["pipelines"][0]
        assert st["state"] == "up" and st["failures"] == 0, st
        assert all(s["takeovers"] == 0 for s in st["stages"]), st["stages"]
    finally:
        if gw2 is not None:
            gw2.stop()
        gw1.stop()
        stop_stages(procs)


def test_takeover_wins_once_and_the_fenced_gateway_stays_down(model, secret_args, tmp_path):
    """`gateway --takeover` takes the stages once; the first gateway reports its pipeline down with the reason and
    does not take them back (no flapping over 10 s: one takeover per stage); it comes back when the new owner
    goes away."""
    procs = start_stages(model, RANGES, extra_args=STAGE_ARGS, workdir=str(tmp_path), secret=SECRET)
    gw1 = GatewayProcess([[sp.url for sp in procs]], extra=secret_args, log_dir=tmp_path)
    gw2 = None
    try:
        gw1.wait_ready()
        assert _ok(gw1)
        gw2 = GatewayProcess([[sp.url for sp in procs]], extra=secret_args + ["--takeover"], log_dir=tmp_path)
        gw2.wait_ready()
        assert _wait(lambda: _health(gw1)[0] == 503, 5.0) is not None, _health(gw1)
        epochs = [s["epoch"] for s in _stage_stats(gw2)]
        t0 = time.monotonic()
        n_ok = 0
        while time.monotonic() - t0 < 10.0:
            assert _ok(gw2), _health(gw2)
            n_ok += 1
            status, body = _health(gw1)
            assert status == 503, body
            time.sleep(0.3)
        status, body = _health(gw1)
        err = str(body)
        assert "another gateway" in err, body
        st = _stage_stats(gw2)
        # stage 0 was taken from a connected gateway; stage 1 too, unless the fenced gateway had let go of it by then
        assert st[0]["takeovers"] == 1 and st[1]["takeovers"] <= 1, st
        assert [s["epoch"] for s in st] == epochs, "the stages changed hands again (flapping)"
        p2 = http("GET", gw2.url + "/v1/stats")[1]["pipelines"][0]
        assert p2["failures"] == 0, p2
        # the new owner goes away: the fenced gateway comes back by itself
        gw2.stop()
        assert _wait(lambda: _health(gw1)[0] == 200, 15.0) is not None, _health(gw1)
        assert _ok(gw1)
        print(f"\ntakeover: {n_ok} requests on the new gateway over 10 s, the old one down throughout; "
              f"fenced gateway's reason: {err[:200]}")
    finally:
        if gw2 is not None:
            gw2.stop()
        gw1.stop()
        stop_stages(procs)
