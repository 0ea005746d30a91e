"""Membership of joined stages over time (issue 23): a restarted gateway re-adopts its stages without a download,
two hosts asking for one name both serve, a host that takes layers and never reports ready loses them, bad download
offsets are answered, placement runs off the event loop, and relay tunnels are limited per address and release
everything they hold.

Real processes (a join-mode gateway, `stage --join`) and fake members: test clients speaking the cluster protocol
through ``molink_lite.wire.auth.connect(url, key, "member", ...)``.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List, Optional

import orjson
import pytest
import websockets

from molink_lite.wire import auth
from molink_lite.wire.auth import LinkKey, new_secret

from serving import free_port, http, spawn_cli, stop_processes

pytestmark = pytest.mark.slow
SECRET = new_secret()
KEY = LinkKey.from_secret(SECRET)
MODEL_KW = dict(n_layer=12, n_embd=256, n_head=4, n_vocab=512)  # ~93 MiB whole at ctx 512 x 4; a half ~66 MiB
HALF = "70MiB"  # holds half of it, not all of it: two such hosts make one pipeline


def _spawn(args, log: Path, cache: Path, env: Optional[dict] = None) -> subprocess.Popen:
    return spawn_cli(args, log, {"MOLINK_SECRET": SECRET, "MOLINK_CACHE": str(cache), **(env or {})}, append=True)


def _gateway(model: str, port: int, tmp_path: Path, *extra: str, log: str = "gateway.log") -> subprocess.Popen:
    p = _spawn(["gateway", "--model", model, "--port", str(port), "--codec", "f32", "--ctx", "512", "--max-seqs", "4",
                "--join-settle", "1", *extra], tmp_path / log, tmp_path / "gwcache")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert p.poll() is None, (tmp_path / log).read_text()[-3000:]
        try:
            http("GET", f"http://127.0.0.1:{port}/health", timeout=2)
            return p
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the gateway did not start")


def _stage(url: str, tmp_path: Path, i: int, mem: str, *extra: str) -> subprocess.Popen:
    cache = tmp_path / f"cache{i}"
    cache.mkdir(exist_ok=True)
    return _spawn(["stage", "--join", url, "--host", "127.0.0.1", "--port", "0", "--max-memory", mem, "--threads", "1",
                   "--flash-attn", "off", *extra], tmp_path / f"stage{i}.log", cache)


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(tmp_path.glob("*.log")))


def _wait(cond, timeout: float, what: str, tmp_path: Optional[Path] = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = cond()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n" + (_logs(tmp_path) if tmp_path else ""))


def _healthy(url: str) -> bool:
    return http("GET", url + "/health", timeout=3)[0] == 200


class Fake:
    """A member that speaks the cluster protocol by hand."""

    def __init__(self, port: int, name: str, memory: int):
        self.url = f"ws://127.0.0.1:{port}/cluster"
        self.name, self.memory = name, memory
        self.names: List[str] = []  # the names the gateway gave it (wait messages)
        self.calibrations = 0
        self.ws: Any = None

    async def send(self, obj: dict) -> None:
        await self.ws.send(orjson.dumps(obj).decode())

    async def recv(self, timeout: float = 60) -> Any:
        msg = await asyncio.wait_for(self.ws.recv(), timeout)
        return orjson.loads(msg) if isinstance(msg, str) else msg

    async def join(self, until: str = "assign", **extra: Any) -> dict:
        """Join, decline calibration, and return the first message of type ``until`` (or an error)."""
        self.ws = await auth.connect(self.url, KEY, "member", max_size=1 << 22)
        await self.send({"t": "join", "name": self.name, "backend": "cpu", "memory_bytes": self.memory,
                         "advertise": "", **extra})
        return await self.until(until)

    async def until(self, kind: str, timeout: float = 60) -> dict:
        while True:
            msg = await self.recv(timeout)
            if msg.get("t") == "wait" and msg.get("name"):
                self.names.append(msg["name"])
            if msg.get("t") == "calibrate":
                self.calibrations += 1
                await self.ws.recv()  # the header
                await self.send({"t": "calibrated", "error": "declined (test)"})
                continue
            if msg.get("t") in (kind, "error"):
                return msg

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


# ---------------------------------------------------------------------- 4. download offsets
def test_bad_download_offsets_get_an_error_and_the_gateway_keeps_serving(tiny_models, tmp_path):
    model = tiny_models("llama", **MODEL_KW)
    port = free_port()
    gw = _gateway(model, port, tmp_path)
    try:
        async def run():
            a = Fake(port, "a", 1 << 30)
            assign = await a.join()
            assert assign["t"] == "assign" and assign["layers"] == "0-11", assign
            size = assign["size"]
            for bad in (-1, 10 ** 12, size + 1, "7", 1.5, True, None, [0]):
                await a.send({"t": "fetch", "offset": bad})
                reply = await a.recv(10)
                assert isinstance(reply, dict) and reply["t"] == "error", (bad, reply)
                assert "bad download offset" in reply["message"], reply
            # the link is still up and the file is served from a good offset
            await a.send({"t": "fetch", "offset": size - 1000})
            tail = await a.recv(10)
            assert isinstance(tail, bytes) and len(tail) == 1000
            await a.send({"t": "fetch", "offset": 0})
            got, h = 0, hashlib.sha256()
            while got < size:
                chunk = await a.recv(30)
                assert isinstance(chunk, bytes)
                h.update(chunk)
                got += len(chunk)
            assert got == size and h.hexdigest() == assign["sha256"]
            # the gateway serves others meanwhile: a second host joins, is placed (a replica) and downloads
            b = Fake(port, "b", 1 << 30)
            assign_b = await b.join()
            assert assign_b["t"] == "assign", assign_b
            await b.send({"t": "fetch", "offset": -5})
            assert (await b.recv(10))["t"] == "error"
            await b.send({"t": "fetch", "offset": assign_b["size"] - 10})
            assert len(await b.recv(10)) == 10
            await a.close()
            await b.close()

        asyncio.run(run())
        assert gw.poll() is None
        assert http("GET", f"http://127.0.0.1:{port}/health", timeout=5)[0] in (200, 503)
        text = (tmp_path / "gateway.log").read_text()
        assert "refused (the file has" in text and "Traceback" not in text, text[-3000:]
    finally:
        stop_processes([gw])


# ---------------------------------------------------------------------- 2. one name twice
def test_hosts_asking_for_one_name_get_unique_ones(tiny_models, tmp_path):
    """Simultaneous joins (calibrating at the same time) with one name: name, name-2, name-3; a name that is free
    again is given again."""
    model = tiny_models("llama", **MODEL_KW)
    port = free_port()
    gw = _gateway(model, port, tmp_path, "--join-settle", "30")
    try:
        async def run():
            fakes = [Fake(port, "box", 60 << 20) for _ in range(3)]
            await asyncio.gather(*(f.join(until="wait") for f in fakes))
            assert sorted(f.names[0] for f in fakes) == ["box", "box-2", "box-3"]
            gone = next(f for f in fakes if f.names[0] == "box-2")
            await gone.close()
            await asyncio.sleep(0.5)
            again = Fake(port, "box", 60 << 20)
            await again.join(until="wait")
            assert again.names[0] == "box-2"
            for f in fakes + [again]:
                await f.close()

        asyncio.run(run())
        assert "a host named 'box' is here already" in (tmp_path / "gateway.log").read_text()
    finally:
        stop_processes([gw])


def test_two_stages_with_the_same_name_are_both_placed_and_serve(tiny_models, tmp_path):
    """Two `stage --join` on one machine (default name: the host name): before, both were called the same and the
    placement waited forever on "duplicate host name(s)"."""
    model = tiny_models("llama", **MODEL_KW)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = _gateway(model, port, tmp_path)
    stages = [_stage(url, tmp_path, i, HALF) for i in range(2)]
    try:
        _wait(lambda: _healthy(url), 180, "the pipeline of both stages", tmp_path)
        st = http("GET", url + "/v1/stats")[1]
        names = [s["host"]["name"] for s in st["placement"][-1]["pipelines"][0]["stages"]]
        import socket
        assert sorted(names) == sorted([socket.gethostname(), socket.gethostname() + "-2"]), names
        assert "duplicate host name" not in (tmp_path / "gateway.log").read_text()
        assert "names this host" in "".join((tmp_path / f"stage{i}.log").read_text() for i in range(2))
        status, body = http("POST", url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
    finally:
        stop_processes(stages + [gw])


# ---------------------------------------------------------------------- 3. a host that never reports ready
def test_a_host_that_never_reports_ready_loses_its_layers(tiny_models, tmp_path):
    """A fake member and a real stage are placed together; the fake takes its layers and stays silent. It is told
    and let go after --join-ready-timeout; a real stage that joins later takes its layers and the pipeline serves."""
    model = tiny_models("llama", **MODEL_KW)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = _gateway(model, port, tmp_path, "--join-ready-timeout", "6")
    procs = [gw]
    try:
        async def run():
            silent = Fake(port, "silent", 70 << 20)
            joined = asyncio.ensure_future(silent.join())
            await asyncio.sleep(0.3)
            procs.append(_stage(url, tmp_path, 0, HALF, "--name", "b"))
            assign = await asyncio.wait_for(joined, 120)
            assert assign["t"] == "assign", assign
            t_assigned = time.monotonic()
            procs.append(_stage(url, tmp_path, 1, HALF, "--name", "c"))  # waits as a spare: nothing is free yet
            told = await silent.until("error", timeout=60)  # no fetch, no progress, no ready: it loses the layers
            waited = time.monotonic() - t_assigned
            assert told.get("rejoin") is True and "did not report ready" in told["message"], told
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                await silent.recv(10)  # and is disconnected
            return waited

        waited = asyncio.run(run())
        assert 5 <= waited < 20, waited
        _wait(lambda: _healthy(url), 180, "the pipeline with the later host", tmp_path)
        status, body = http("POST", url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
        assert status == 200, body
        st = http("GET", url + "/v1/stats")[1]
        hosts = {s["host"]["name"] for s in st["placement"][-1]["pipelines"][0]["stages"]}
        assert hosts == {"silent", "b"}, hosts  # the plan as made; the layers of "silent" are served by "c"
        assert [(r["host"], r["after"]) for r in st["replacements"]] == [("c", "ready timeout")], st["replacements"]
        assert "did not report ready within 6 s" in (tmp_path / "gateway.log").read_text()
    finally:
        stop_processes(procs)


# ---------------------------------------------------------------------- 5. placement off the event loop
def test_thirty_joins_at_once_keep_the_gateway_answering(tiny_models, tmp_path):
    """30 hosts join at once (fake members declining calibration); /health, polled every 50 ms, keeps answering
    within 100 ms while they register, are placed (10 pipelines) and get their assignments."""
    model = tiny_models("llama", **MODEL_KW)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = _gateway(model, port, tmp_path)
    lat: List[float] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                http("GET", url + "/health", timeout=10)
                lat.append(time.perf_counter() - t0)
            except OSError as e:
                lat.append(float("inf"))
                print("health failed:", e)
            time.sleep(0.05)

    try:
        for _ in range(10):  # warm up (first requests import and compile lazily)
            http("GET", url + "/health", timeout=10)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

        async def run():
            fakes = [Fake(port, f"h{i}", 60 << 20) for i in range(30)]
            got = await asyncio.gather(*(f.join() for f in fakes))
            await asyncio.sleep(1.0)
            for f in fakes:
                await f.close()
            return got

        t0 = time.monotonic()
        got = asyncio.run(run())
        took = time.monotonic() - t0
        stop.set()
        poller.join(15)
        assert all(g["t"] == "assign" for g in got), [g for g in got if g["t"] != "assign"][:3]
        st = http("GET", url + "/v1/stats")[1]
        assert len(st["placement"][-1]["pipelines"]) == 10
        lat.sort()
        print(f"\n30 joins placed in {took:.1f} s; /health polled {len(lat)} times: p50 {1e3 * lat[len(lat) // 2]:.1f} "
              f"ms, max {1e3 * lat[-1]:.1f} ms")
        assert len(lat) >= 20 and lat[-1] < 0.1, lat[-5:]
    finally:
        stop.set()
        stop_processes([gw])


# ---------------------------------------------------------------------- 1. a gateway restarted under load
def test_a_restarted_gateway_readopts_its_stages_without_a_download(tiny_models, tmp_path):
    model = tiny_models("llama", **MODEL_KW)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = _gateway(model, port, tmp_path, log="gateway-1.log")
    stages = [_stage(url, tmp_path, i, HALF, "--name", f"s{i}") for i in range(2)]
    procs = stages + [gw]
    try:
        _wait(lambda: _healthy(url), 180, "the joined pipeline", tmp_path)
        files = [f for fs in ((tmp_path / f"cache{i}" / "joined").rglob("*.gguf") for i in range(2)) for f in fs]
        assert len(files) == 2, files
        mtimes = {f: f.stat().st_mtime_ns for f in files}
        before = http("GET", url + "/v1/stats")[1]["placement"][-1]["pipelines"][0]["stages"]

        results: List[tuple] = []  # (start, end, status)
        stop = threading.Event()

        def load():
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    status = http("POST", url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 24,
                                                                    "ignore_eos": True}, timeout=60)[0]
                except OSError as e:
                    status = type(e).__name__
                    time.sleep(0.1)
                results.append((t0, time.monotonic(), status))

        with ThreadPoolExecutor(4) as pool:
            try:
                for _ in range(4):
                    pool.submit(load)
                _wait(lambda: sum(r[2] == 200 for r in results) >= 4, 60, "requests through the first gateway")
                gw.send_signal(signal.SIGKILL)  # requests in flight die with it
                gw.wait(10)
                t_kill = time.monotonic()
                gw2 = _gateway(model, port, tmp_path, log="gateway-2.log")
                procs.append(gw2)
                _wait(lambda: _healthy(url), 60, "the stages through the new gateway", tmp_path)
                t_up = time.monotonic()
                time.sleep(3)  # new requests flow through the new gateway
            finally:
                stop.set()
        back = t_up - t_kill
        after = [r for r in results if r[0] >= t_up]
        print(f"\nserving again {back:.1f} s after the gateway was killed; {len(after)} requests since, "
              f"{sum(r[2] == 200 for r in results if r[0] < t_kill)} before; failures around the restart: "
              f"{dict(Counter(r[2] for r in results if r[2] != 200))}")
        assert back < 30, back
        assert after and all(r[2] == 200 for r in after), after
        st = http("GET", url + "/v1/stats")[1]
        placed = st["placement"][-1]
        assert placed.get("kept") == "re-adopted", placed
        assert [(s["host"]["name"], s["layers"]) for s in placed["pipelines"][0]["stages"]] == \
            [(s["host"]["name"], s["layers"]) for s in before]
        # no layer was downloaded again: same files, untouched; each stage fetched once and said so on rejoining
        assert {f: f.stat().st_mtime_ns for f in files} == mtimes
        for i in range(2):
            text = (tmp_path / f"stage{i}.log").read_text()
            assert len(re.findall(r"fetched [\d.]+ MiB in", text)) == 1, text[-3000:]
            # it kept rejoining (one try when the new gateway was already up, more while it was starting)
            assert "nothing downloaded" in text and ("attempt" in text or "joining again" in text), text[-3000:]
        assert "re-adopted" in (tmp_path / "gateway-2.log").read_text()

        # a gateway restarted with another wire codec cannot keep the stages as they are: placed anew (the same
        # ranges), each stage restarts from the file it has (its sha256 is the assigned one): still no download
        gw2.kill()
        gw2.wait(10)
        procs.append(_gateway(model, port, tmp_path, "--codec", "f16", log="gateway-3.log"))
        _wait(lambda: _healthy(url), 90, "the stages placed anew", tmp_path)
        placed = http("GET", url + "/v1/stats")[1]["placement"][-1]
        assert "kept" not in placed, placed
        assert [s["layers"] for s in placed["pipelines"][0]["stages"]] == [s["layers"] for s in before]
        status, body = http("POST", url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
        assert status == 200, body
        assert {f: f.stat().st_mtime_ns for f in files} == mtimes
        for i in range(2):
            text = (tmp_path / f"stage{i}.log").read_text()
            assert len(re.findall(r"fetched [\d.]+ MiB in", text)) == 1, text[-3000:]
            assert "restarting with them" in text and "nothing to download" in text, text[-3000:]
    finally:
        stop_processes(procs)


# ---------------------------------------------------------------------- 1. rejoining hosts (protocol level)
HELD_KEYS = ("layers", "fingerprint", "file", "size", "sha256", "n_ctx", "n_seqs", "codec")


def test_rejoining_hosts_keep_their_ranges_fill_gaps_or_are_placed_anew(tiny_models, tmp_path):
    """Fake members that report what they serve to a restarted gateway: ranges that tile are kept as they are (no
    calibration, the same files assigned back); a missing range goes to a host without layers; a file that is not
    this gateway's (other sha256) is not kept; a host whose pipeline does not come back waits the rejoin grace,
    then is placed anew."""
    model = tiny_models("llama", **MODEL_KW)
    port = free_port()
    gws = [_gateway(model, port, tmp_path, "--join-rejoin-grace", "3", log="g1.log")]

    def restart(n: int) -> None:
        gws[-1].kill()
        gws[-1].wait(10)
        gws.append(_gateway(model, port, tmp_path, "--join-rejoin-grace", "3", log=f"g{n}.log"))

    def serving(assign: dict, i: int) -> dict:
        return {**{k: assign[k] for k in HELD_KEYS}, "url": f"ws://127.0.0.1:{40000 + i}"}

    def last_placement() -> dict:
        return http("GET", f"http://127.0.0.1:{port}/v1/stats")[1]["placement"][-1]

    try:
        async def first():
            fakes = [Fake(port, n, 70 << 20) for n in ("a", "b")]
            got = await asyncio.gather(*(f.join() for f in fakes))
            for f in fakes:
                await f.close()
            return {f.name: g for f, g in zip(fakes, got)}

        held = asyncio.run(first())
        assert sorted(g["layers"] for g in held.values()) == ["0-5", "6-11"], held
        lo = next(n for n, g in held.items() if g["layers"] == "0-5")
        hi = next(n for n, g in held.items() if g["layers"] == "6-11")

        # a restarted gateway: both rejoin with what they serve -> the same pipeline, nothing moves
        restart(2)

        async def second():
            fakes = [Fake(port, n, 70 << 20) for n in ("a", "b")]
            got = await asyncio.gather(*(f.join(serving=serving(held[f.name], i), sec_per_layer=1e-3)
                                         for i, f in enumerate(fakes)))
            for f, g in zip(fakes, got):
                assert g["t"] == "assign" and {k: g[k] for k in HELD_KEYS} == {k: held[f.name][k] for k in HELD_KEYS}
                assert f.calibrations == 0 and f.names[0] == f.name
                await f.close()

        asyncio.run(second())
        placed = last_placement()
        assert placed["kept"] == "re-adopted", placed
        assert "re-adopted" in (tmp_path / "g2.log").read_text()

        # only the host of 0-5 comes back, and a host without layers joins: it gets the missing range
        restart(3)

        async def third():
            back, fresh = Fake(port, lo, 70 << 20), Fake(port, "c", 70 << 20)
            got = await asyncio.gather(back.join(serving=serving(held[lo], 0), sec_per_layer=1e-3), fresh.join())
            assert got[0]["sha256"] == held[lo]["sha256"] and got[1]["sha256"] == held[hi]["sha256"], got
            await back.close()
            await fresh.close()

        asyncio.run(third())
        placed = last_placement()
        assert placed["kept"] == "kept ranges", placed
        assert [(s["host"]["name"], s["layers"]) for s in placed["pipelines"][0]["stages"]] == [(lo, "0-5"),
                                                                                                 ("c", "6-11")]

        # a host whose file is not this gateway's (another sha256) is not kept: it fills the gap of the other
        restart(4)

        async def fourth():
            bad = {**serving(held[lo], 0), "sha256": "0" * 64}
            fakes = [Fake(port, lo, 70 << 20), Fake(port, hi, 70 << 20)]
            got = await asyncio.gather(fakes[0].join(serving=bad, sec_per_layer=1e-3),
                                       fakes[1].join(serving=serving(held[hi], 1), sec_per_layer=1e-3))
            assert [g["sha256"] for g in got] == [held[lo]["sha256"], held[hi]["sha256"]], got
            for f in fakes:
                await f.close()

        asyncio.run(fourth())
        assert last_placement()["kept"] == "kept ranges"
        assert "differs from this gateway's" in (tmp_path / "g4.log").read_text()

        # a host whose pipeline does not come back waits the rejoin grace (3 s), then is placed anew (alone it
        # cannot hold the model: told so)
        restart(5)

        async def fifth():
            alone = Fake(port, hi, 70 << 20)
            t0 = time.monotonic()
            alone.ws = await auth.connect(alone.url, KEY, "member", max_size=1 << 22)
            await alone.send({"t": "join", "name": hi, "backend": "cpu", "memory_bytes": 70 << 20, "advertise": "",
                              "serving": serving(held[hi], 1), "sec_per_layer": 1e-3})
            while True:
                msg = await alone.recv(30)
                if msg["t"] == "wait" and "not enough hosts" in msg["message"]:
                    break
            waited = time.monotonic() - t0
            await alone.close()
            return waited

        waited = asyncio.run(fifth())
        assert waited >= 2.8, waited
        assert "waiting up to" in (tmp_path / "g5.log").read_text()
    finally:
        stop_processes(gws)


def test_a_stage_rejoining_over_a_new_link_takes_its_layers_and_name_back(tiny_models, tmp_path):
    """The stage saw its cluster link drop but the gateway has not noticed yet (half-open): the new link replaces
    the stale one at once; the stage keeps its name and its layers (same file: nothing to download)."""
    model = tiny_models("llama", **MODEL_KW)
    port = free_port()
    gw = _gateway(model, port, tmp_path)
    try:
        async def run():
            old = Fake(port, "a", 1 << 30)
            assign = await old.join()
            url = "ws://127.0.0.1:9"  # nothing listens: the pipeline keeps trying, which does not matter here
            await old.send({"t": "ready", "url": url})
            await asyncio.sleep(0.5)
            new = Fake(port, "a", 1 << 30)
            again = await new.join(serving={**{k: assign[k] for k in HELD_KEYS}, "url": url}, sec_per_layer=1e-3)
            assert again["t"] == "assign" and again["sha256"] == assign["sha256"], again
            assert new.names[0] == "a" and new.calibrations == 0
            with pytest.raises(websockets.exceptions.ConnectionClosed):  # the stale link was let go
                while True:
                    msg = await old.recv(10)
                    assert not isinstance(msg, dict) or msg.get("t") in ("dial", "probe"), msg
            await new.close()

        asyncio.run(run())
        assert "its previous cluster link (as a) is let go" in (tmp_path / "gateway.log").read_text()
    finally:
        stop_processes([gw])


# ---------------------------------------------------------------------- 6. the relay
HARNESS = r'''
import llama_cpp  # noqa
import asyncio, json, sys
import orjson
import websockets
from aiohttp import web
from molink_lite.serving.cluster import Cluster
from molink_lite.serving.router import Router
from molink_lite.wire import auth, relay
from molink_lite.wire.auth import LinkKey


async def echo(r, w):
    try:
        while True:
            d = await r.read(65536)
            if not d:
                break
            w.write(d)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        w.close()


async def main(model, out, secret, open_cap):
    key = LinkKey.from_secret(secret)
    cluster = Cluster(model, Router([]), key, settle=0.1, ready_timeout=1e6, relay_open_per_address=open_cap,
                      relay_dial_timeout=3, relay_setup_window=2)
    app = web.Application()
    cluster.routes(app)
    mode = {"dial": True}

    async def counts(request):
        return web.json_response(cluster.relay_counts())

    async def set_mode(request):
        mode["dial"] = request.query["dial"] == "1"
        return web.json_response(mode)

    app.router.add_get("/_counts", counts)
    app.router.add_get("/_mode", set_mode)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "0.0.0.0", 0)
    await site.start()
    port = runner.addresses[0][1]
    cluster.local_base = f"ws://127.0.0.1:{port}"
    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    eport = srv.sockets[0].getsockname()[1]
    ws = await auth.connect(f"ws://127.0.0.1:{port}/cluster", key, "member", max_size=1 << 22)
    await ws.send(orjson.dumps({"t": "join", "name": "natted", "backend": "cpu", "memory_bytes": 1 << 30,
                                "advertise": ""}).decode())
    while True:
        msg = orjson.loads(await ws.recv())
        if msg["t"] == "calibrate":
            await ws.recv()
            await ws.send(orjson.dumps({"t": "calibrated", "error": "no"}).decode())
        elif msg["t"] == "assign":
            break
    with open(out, "w") as f:
        json.dump({"port": port, "token": cluster.slots[0].token, "own": cluster._own}, f)

    async def dial_back(cid):  # as relay.dial_back, from the stage's own address (127.0.0.3)
        back = await websockets.connect(f"ws://127.0.0.1:{port}/relay-back/{cid}", max_size=relay.TUNNEL_MAX_MSG,
                                        compression=None, local_addr=("127.0.0.3", 0))
        reader, writer = await asyncio.open_connection("127.0.0.1", eport)
        await relay._pump(back, reader, writer)

    while True:  # a stage behind NAT: dial back to the gateway and connect it to "its port" (an echo server)
        msg = orjson.loads(await ws.recv())
        if msg.get("t") == "dial" and mode["dial"]:
            asyncio.ensure_future(dial_back(msg["id"]))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
'''


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_relay_tunnels_release_everything_and_are_limited_per_address(tiny_models, tmp_path):
    """5,000 tunnels opened, used and closed: the relay's memory stays flat (it grew ~10 MiB per 1,000 tunnels
    before: every closed tunnel's WebSocket lingered in a re-armed heartbeat timer). Per-address caps on tunnels
    being set up (silent dialers included) and open, a dial-back that never comes releases its tunnel."""
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    info_file = tmp_path / "harness.json"
    env = {**os.environ, "MOLINK_CACHE": str(tmp_path / "hcache")}
    out = open(tmp_path / "harness.log", "wb")
    h = subprocess.Popen([sys.executable, str(script), model, str(info_file), SECRET, "12"], stdout=out,
                         stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    out.close()
    try:
        info = _wait(lambda: info_file.exists() and info_file.read_text() and orjson.loads(info_file.read_text()),
                     60, "the relay harness", tmp_path)
        base = f"ws://127.0.0.1:{info['port']}"
        hurl = f"http://127.0.0.1:{info['port']}"
        tunnel = f"{base}/relay/{info['token']}"

        def counts() -> dict:
            return http("GET", hurl + "/_counts")[1]

        async def one(payload: bytes, url: str = tunnel, **kw) -> None:
            async with websockets.connect(url, max_size=1 << 20, compression=None, **kw) as ws:
                await ws.send(payload)
                assert await ws.recv() == payload

        async def many(n: int, conc: int = 3) -> None:
            """``n`` tunnels, ``conc`` at a time; a 429 (the gateway had not finished closing a previous tunnel of this
            address when the next one came) is retried like a client honouring Retry-After would, sooner."""
            payload = os.urandom(1024)
            sem = asyncio.Semaphore(conc)

            async def task():
                async with sem:
                    for _ in range(50):
                        try:
                            return await one(payload)
                        except websockets.exceptions.InvalidStatus as e:
                            assert e.response.status_code == 429
                            await asyncio.sleep(0.02)
                    raise AssertionError("refused 50 times")
            await asyncio.gather(*(task() for _ in range(n)))

        # 1. memory: warm up, then 5,000 tunnels
        asyncio.run(many(500))
        time.sleep(0.5)
        warm = _rss_mib(h.pid)
        t0 = time.monotonic()
        asyncio.run(many(5000))
        took = time.monotonic() - t0
        time.sleep(0.5)
        end = _rss_mib(h.pid)
        c = counts()
        print(f"\nRSS after warm-up {warm:.1f} MiB, after 5,000 more tunnels {end:.1f} MiB ({took:.0f} s); {c}")
        assert end - warm < 20, (warm, end)
        assert c["setting_up"] == 0 and c["open"] == 0 and c["pending_dial_backs"] == 0, c
        assert c["opened"] == c["closed"] == 5500, c

        # 2. per-address caps: tunnels being set up (4 per address; here the stage does not dial back) ...
        http("GET", hurl + "/_mode?dial=0")

        async def silent_tunnels(n: int, url: str = tunnel, **kw) -> list:
            out = []
            for _ in range(n):
                try:
                    out.append(await websockets.connect(url, max_size=1 << 20, compression=None, **kw))
                except websockets.exceptions.InvalidStatus as e:
                    out.append(e.response.status_code)
            return out

        async def setup_caps():
            got = await silent_tunnels(10)
            codes = [g for g in got if isinstance(g, int)]
            assert len(got) - len(codes) == 4 and codes == [429] * 6, codes
            other = await silent_tunnels(1, local_addr=("127.0.0.2", 0))  # another address is not affected
            assert not isinstance(other[0], int), other
            own = await silent_tunnels(1, url=f"{tunnel}?k={info['own']}")  # the gateway's own dials neither
            assert not isinstance(own[0], int), own
            assert counts()["setting_up"] == 6
            # ... whose dial-back never comes: closed after the dial timeout (3 s here), everything released
            t0 = time.monotonic()
            for ws in [g for g in got + other + own if not isinstance(g, int)]:
                with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
                    await asyncio.wait_for(ws.recv(), 20)
                assert e.value.rcvd is not None and e.value.rcvd.code == 1011
            assert time.monotonic() - t0 < 10
            await asyncio.sleep(0.3)
            c = counts()
            assert c["setting_up"] == 0 and c["open"] == 0 and c["pending_dial_backs"] == 0, c
            assert c["dial_timeouts"] >= 6, c

        asyncio.run(setup_caps())

        # ... and tunnels whose stage dialed back but whose dialer stays silent: being set up until the link inside
        # could have been authenticated (any stage closes an unauthenticated link by then; 2 s in this harness)
        http("GET", hurl + "/_mode?dial=1")

        async def silent_dialers():
            got = await silent_tunnels(5)
            assert [g for g in got if isinstance(g, int)] == [429], got
            await asyncio.sleep(2.5)
            late = await silent_tunnels(1)  # the first four are past their window: room again
            assert not isinstance(late[0], int), late
            for ws in got[:4] + late:
                await ws.close()
            await asyncio.sleep(0.5)
            c = counts()
            assert c["setting_up"] == 0 and c["open"] == 0, c

        asyncio.run(silent_dialers())

        # 3. ... and open tunnels (12 per address in this harness)
        async def open_caps():
            held = []
            for i in range(12):
                if i and i % 4 == 0:
                    await asyncio.sleep(2.3)  # past the set-up window of the four before
                ws = await websockets.connect(tunnel, max_size=1 << 20, compression=None)
                await ws.send(b"x")
                assert await ws.recv() == b"x"
                held.append(ws)
            await asyncio.sleep(2.3)
            assert counts()["setting_up"] == 0
            with pytest.raises(websockets.exceptions.InvalidStatus) as e:
                await websockets.connect(tunnel, max_size=1 << 20, compression=None)
            assert e.value.response.status_code == 429
            c = counts()  # each tunnel: the dialer's side (127.0.0.1) and the stage's dial-back (127.0.0.3)
            assert c["open"] == 24 and c["refused_address"] >= 1, c
            for ws in held:
                await ws.close()
            await asyncio.sleep(0.5)
            await one(b"z")  # room again
            await asyncio.sleep(0.3)
            assert counts()["open"] == 0

        asyncio.run(open_caps())
        assert h.poll() is None
    finally:
        stop_processes([h])
