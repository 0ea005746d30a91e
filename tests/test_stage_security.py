"""Stages on an open network, tried as an attacker would (real stage processes, real WebSockets).

* without the secret (or with a wrong one) nothing but the handshake is read: no message type gets an
  answer, a `configure` cannot redirect hidden states or results, and the served text is unchanged;
* 1,000 hostile frames from an authenticated peer (truncated, oversized, wrong dtypes, NaN rows,
  out-of-range ids and positions, `free: [256]`, position 2^31-1) get error replies: no crash, flat
  memory, and a greedy run afterwards gives exactly the tokens it gave before;
* a stage refuses to listen on 0.0.0.0 without a secret (unless --insecure);
* two stages and a gateway over TLS (`--tls auto`) serve requests.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import asyncio
import collections
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import websockets

from molink_lite.model.split import LayerRange
from molink_lite.serving.launcher import start_stages, stop_stages
from molink_lite.wire import auth
from molink_lite.wire.auth import AuthError, LinkKey, new_secret
from molink_lite.wire.channel import Channel, RemoteError
from molink_lite.wire.codec import encode_frame
from molink_lite.wire.protocol import SamplingParams, SeqStart, StepFrame

from serving import GatewayProcess, free_port, http, served_pipeline

pytestmark = pytest.mark.slow
SECRET = new_secret()
KEY = LinkKey.from_secret(SECRET)
STAGE_ARGS = ["--ctx", "512", "--max-seqs", "4", "--threads", "1", "--codec", "f32", "--flash-attn", "off"]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cluster(gemma3_path, tmp_path_factory):
    wd = tmp_path_factory.mktemp("sec")
    secret_file = wd / "cluster.key"
    secret_file.write_text(SECRET + "\n")
    with served_pipeline(gemma3_path, [LayerRange(0, 9), LayerRange(9, 18)], STAGE_ARGS, wd, secret=SECRET,
                         gateway_extra=["--codec", "f32", "--secret-file", str(secret_file)]) as (gw, procs):
        yield procs, gw, secret_file


def greedy(gw: GatewayProcess, n: int = 12) -> str:
    status, body = http("POST", gw.url + "/v1/completions",
                        {"prompt": PROMPT, "max_tokens": n, "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["text"]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- outsiders
ALL_TYPES = [
    ({"type": "hello"}, None),
    ({"type": "stats"}, None),
    ({"type": "tokenize", "text": "hi"}, None),
    ({"type": "ping"}, None),
    ({"type": "probe_next", "bytes": 1 << 20}, None),
    ({"type": "configure", "next": "ws://127.0.0.1:1", "codec": "f32"}, None),
    StepFrame(1, free=list(range(16))).to_wire(),
    ({"type": "error", "message": "x"}, None),
]


async def _outsider(url: str, key, attacker_port: int) -> collections.Counter:
    """Send every message type without (or with a wrong) secret; count what comes back."""
    got = collections.Counter()
    for meta, arrays in ALL_TYPES:
        if meta["type"] == "configure":
            meta = {**meta, "next": f"ws://127.0.0.1:{attacker_port}"}
        if key is not None:
            try:
                await auth.connect(url, key, "gateway", max_size=1 << 20)
                got["authenticated"] += 1
            except AuthError:
                got["refused"] += 1
            continue
        ws = await websockets.connect(url, max_size=1 << 20)
        try:
            await ws.recv()  # the challenge
            await ws.send(encode_frame(meta, arrays))  # skip the handshake: speak the protocol directly
            while True:
                msg = await asyncio.wait_for(ws.recv(), 15)
                got["answered"] += 1 if isinstance(msg, bytes) else 0
        except websockets.exceptions.ConnectionClosed as e:
            got["closed:" + str(e.rcvd.code if e.rcvd else None)] += 1
        except asyncio.TimeoutError:
            got["hung"] += 1
        finally:
            await ws.close()
    return got


def test_outsiders_get_nothing_and_change_nothing(cluster):
    procs, gw, _ = cluster
    before = greedy(gw)
    received = []

    async def main():
        async def attacker(ws):  # where a successful redirect would send hidden states or results
            async for m in ws:
                received.append(m)
        port = free_port()
        srv = await websockets.serve(attacker, "127.0.0.1", port)
        counts = collections.Counter()
        for sp in procs:
            counts += await _outsider(sp.url, None, port)
            counts += await _outsider(sp.url, LinkKey.from_secret("w" * 64), port)
        srv.close()
        return counts
    counts = asyncio.run(main())
    print("\noutsider results:", dict(counts))
    assert counts["answered"] == 0 and counts["authenticated"] == 0 and counts["hung"] == 0
    assert counts[f"closed:{auth.CLOSE_AUTH}"] == 2 * len(ALL_TYPES)
    assert counts["refused"] == 2 * len(ALL_TYPES)
    assert received == [], "a stage connected to the attacker"
    assert greedy(gw) == before
    status, body = http("GET", gw.url + "/v1/stats")
    assert all(st["refused_links"] >= 2 * len(ALL_TYPES) for st in body["pipelines"][0]["stages"])


def test_a_second_controller_is_fenced_off_and_changes_nothing(cluster):
    """A peer with the secret sends `configure` (with another gateway id, or none) to stages a connected gateway
    controls: refused with the fencing epoch and the way to take over (--takeover); the gateway keeps its stages
    (no failure, no reconnect) and the served text is unchanged."""
    procs, gw, _ = cluster
    before = greedy(gw)
    _, stats0 = http("GET", gw.url + "/v1/stats")

    async def main():
        refusals = []
        for sp in procs:
            for who in ({"gateway": "someone-else"}, {}):
                ch = Channel(await auth.connect(sp.url, KEY, "gateway", max_size=1 << 20), name=sp.url)
                serving = asyncio.ensure_future(ch.serve(lambda *a: asyncio.sleep(0)))
                try:
                    await ch.request({"type": "configure", "next": "ws://127.0.0.1:1", "codec": "f32", **who})
                    refusals.append("accepted")
                except RemoteError as e:
                    refusals.append(e.meta)
                finally:
                    await ch.close()
                    serving.cancel()
        return refusals
    refusals = asyncio.run(main())
    assert all(isinstance(r, dict) and r.get("code") == "fenced" and r.get("epoch", 0) >= 1 for r in refusals), \
        refusals
    assert all("--takeover" in r["message"] for r in refusals)
    assert greedy(gw) == before
    _, stats1 = http("GET", gw.url + "/v1/stats")
    p0, p1 = stats0["pipelines"][0], stats1["pipelines"][0]
    assert p1["state"] == "up" and p1["failures"] == p0["failures"], p1
    assert all(st["refused_configures"] >= 2 and st["takeovers"] == 0 for st in p1["stages"]), p1["stages"]


# ---------------------------------------------------------------- an authenticated but hostile peer
class Driver:
    """Drives a 2-stage chain as its gateway would, with raw frames (for exact replays)."""

    def __init__(self, urls):
        self.urls = urls
        self.results: asyncio.Queue = asyncio.Queue()
        self.replies = collections.Counter()

    async def open(self):
        self.a = await self._chan(self.urls[0])
        self.b = await self._chan(self.urls[1])
        await self.b.request({"type": "configure", "codec": "f32"})
        await self.a.request({"type": "configure", "next": self.urls[1], "codec": "f32"})

    async def _chan(self, url, role="gateway"):
        ch = Channel(await auth.connect(url, KEY, role, max_size=64 << 20), name=url)
        asyncio.ensure_future(ch.serve(self._on))
        return ch

    async def _on(self, ch, meta, arrays):
        kind = meta.get("type")
        self.replies[kind] += 1
        if kind in ("result", "step_error"):
            await self.results.put((meta, arrays))

    async def greedy(self, tokens, n=8, sid=1000):
        """Prefill + n greedy steps of sequence 0 (freed first); returns the generated tokens."""
        out, pos = [], 0
        start = {0: SeqStart(SamplingParams(temperature=0.0))}
        feed = np.asarray(tokens, np.int32)
        free = [0]
        for i in range(n):
            m = len(feed)
            self.a.send(*StepFrame(sid + i, np.zeros(m, np.int32), np.arange(pos, pos + m, dtype=np.int32),
                                   tokens=feed, out=np.arange(m) == m - 1, free=free, start=start).to_wire())
            meta, arrays = await asyncio.wait_for(self._next_result(sid + i), 60)
            assert meta["type"] == "result", meta
            tok = int(arrays["tokens"][0])
            out.append(tok)
            pos += m
            feed, free, start = np.array([tok], np.int32), [], {}
        return out

    async def _next_result(self, sid):
        while True:
            meta, arrays = await self.results.get()
            if meta.get("step") == sid:
                return meta, arrays


def hostile_frames(rng: np.random.Generator, first: bool, n: int):
    """Random and hostile step frames (bytes) for a first (token) or later (hidden) stage."""
    for i in range(n):
        kind = i % 13
        sid = 1 + i
        m = int(rng.integers(1, 6))
        seq = np.full(m, int(rng.integers(1, 4)), np.int32)
        pos = np.arange(m, dtype=np.int32)
        body = ({"tokens": rng.integers(0, 1000, m).astype(np.int32)} if first
                else {"hidden": rng.standard_normal((m, 640)).astype(np.float32)})
        # a valid frame, built through the protocol type; the kinds below corrupt its meta or arrays as sent
        meta, arrays = StepFrame(sid, seq, pos, **body).to_wire()
        if kind == 0:
            meta["free"] = [256]
        elif kind == 1:
            arrays["pos"] = np.full(m, 2 ** 31 - 1, np.int32)
        elif kind == 2:
            arrays["seq"] = np.full(m, int(rng.choice([-1, 16, 255, 2 ** 31 - 1])), np.int32)
        elif kind == 3:  # truncated frame
            data = encode_frame(meta, arrays, codec="f32")
            yield data[: int(rng.integers(1, len(data)))]
            continue
        elif kind == 4:  # a header that declares far more bytes than sent
            data = bytearray(encode_frame(meta, arrays, codec="f32"))
            yield bytes(data) + b"\0" * int(rng.integers(1, 64))
            continue
        elif kind == 5 and not first:
            arrays["hidden"][0, int(rng.integers(0, 640))] = np.nan
        elif kind == 5:
            arrays["tokens"] = np.full(m, 10 ** 9, np.int32)
        elif kind == 6:
            arrays["seq"] = arrays["seq"].astype(np.float32)
            yield encode_frame(meta, {k: v for k, v in arrays.items()}, codec="f32", float_names={"seq"})
            continue
        elif kind == 7:
            meta["start"] = {str(int(seq[0])): {"top_k": 1e300, "temperature": "x"}}
        elif kind == 8:
            arrays["pos"] = pos[::-1].copy()
        elif kind == 9:  # random bytes
            yield rng.bytes(int(rng.integers(1, 400)))
            continue
        elif kind == 10:
            meta = {"type": rng.choice(["configure", "hello", "stats", "zzz", "step"]), "next": 5, "step": "x"}
        elif kind == 11 and not first:
            arrays["hidden"] = arrays["hidden"][:, :100].copy()
        elif kind == 12:  # a lane this one-lane stage does not have, or not an integer
            meta["lane"] = [1, -1, True, "0", 2 ** 40, None, 0.0][i % 7]
        yield encode_frame(meta, arrays, codec="f32")


def test_hostile_frames_from_an_authenticated_peer(gemma3_path, tmp_path):
    procs = start_stages(gemma3_path, [LayerRange(0, 9), LayerRange(9, 18)], extra_args=STAGE_ARGS,
                         workdir=str(tmp_path), secret=SECRET)
    try:
        asyncio.run(_hostile(procs))
    finally:
        stop_stages(procs)


async def _hostile(procs):
    urls = [sp.url for sp in procs]
    d = Driver(urls)
    await d.open()
    _, arr = await d.a.request({"type": "tokenize", "text": PROMPT})
    prompt = arr["tokens"].tolist()
    want = await d.greedy(prompt)
    await d.greedy(prompt)  # warm-up for the memory baseline
    rss0 = [rss_kb(sp.proc.pid) for sp in procs]
    rng = np.random.default_rng(7)
    sent = collections.Counter()
    # 600 frames to the first stage as its head; 400 to the second stage as its upstream
    for data in hostile_frames(rng, True, 600):
        d.a.send_bytes(data)
        sent["first"] += 1
    up = await d._chan(urls[1], role="upstream")  # takes the upstream role from stage 0 for the attack
    for i, data in enumerate(hostile_frames(rng, False, 400)):
        if up.closed.is_set():
            up = await d._chan(urls[1], role="upstream")
            sent["reconnects"] += 1
        if i % 100 == 99:  # larger than any step this stage can take: refused before it is read
            data = rng.bytes(3 << 20)
            sent["oversized"] += 1
        up.send_bytes(data)
        sent["second"] += 1
        await asyncio.sleep(0)
    await asyncio.sleep(3)
    for sp in procs:
        assert sp.proc.poll() is None, f"stage {sp.layers} died:\n{sp.log_tail()}"
    # the gateway takes the chain back (stage 0 reconnects to stage 1 as its upstream)
    await d.a.request({"type": "configure", "next": urls[1], "codec": "f32"})
    got = await d.greedy(prompt, sid=10 ** 6)
    rss1 = [rss_kb(sp.proc.pid) for sp in procs]
    stats = [await ch.request({"type": "stats"}) for ch in (d.a, d.b)]
    print(f"\nhostile frames sent: {dict(sent)}; replies seen by the head: {dict(d.replies)}; "
          f"rejected per stage: {[int(s[0]['rejected_frames']) for s in stats]}; "
          f"RSS kB before {rss0} after {rss1}")
    assert got == want
    for a, b in zip(rss0, rss1):
        assert b <= a * 1.10, f"RSS grew from {a} to {b} kB"
    assert d.replies["step_error"] >= 500  # rejected steps are answered, not dropped
    assert sent["reconnects"] >= 1  # the oversized frames closed the connection


# ---------------------------------------------------------------- safe defaults
def _stage_cmd(model, *extra):
    return [sys.executable, "-m", "molink_lite.cli", "stage", "--model", model, "--layers", "0-8",
            "--port", str(free_port()), *STAGE_ARGS, *extra]


def test_exposed_stage_without_secret_refuses_to_start(gemma3_path):
    env = {k: v for k, v in os.environ.items() if k != "MOLINK_SECRET"}
    p = subprocess.run(_stage_cmd(gemma3_path, "--host", "0.0.0.0"), capture_output=True, text=True, timeout=60,
                       env=env)
    assert p.returncode == 2
    assert "without a cluster secret" in p.stderr and "molink-lite secret" in p.stderr


def test_insecure_stage_starts_and_warns(gemma3_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MOLINK_SECRET"}
    ready = tmp_path / "port"
    log = tmp_path / "log"
    with open(log, "wb") as out:
        p = subprocess.Popen(_stage_cmd(gemma3_path, "--host", "0.0.0.0", "--insecure", "--ready-file", str(ready)),
                             stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        end = time.monotonic() + 120
        while not (ready.exists() and ready.read_text().strip()) and time.monotonic() < end and p.poll() is None:
            time.sleep(0.2)
        assert p.poll() is None, log.read_text()
        assert "INSECURE" in log.read_text()
    finally:
        p.terminate()
        p.wait(10)


# ---------------------------------------------------------------- TLS
def test_two_stages_and_a_gateway_over_tls(gemma3_path, tmp_path):
    secret_file = tmp_path / "k"
    secret_file.write_text(SECRET)
    procs = start_stages(gemma3_path, [LayerRange(0, 9), LayerRange(9, 18)], extra_args=[*STAGE_ARGS, "--tls", "auto"],
                         workdir=str(tmp_path), secret=SECRET)
    urls = [sp.url.replace("ws://", "wss://") for sp in procs]
    gw = GatewayProcess([urls], extra=["--codec", "f32", "--secret-file", str(secret_file)], log_dir=tmp_path)
    try:
        gw.wait_ready()
        assert greedy(gw, 6)
        logs = "".join(sp.log_tail(200) for sp in procs)
        assert "wss://" in logs and "TLS certificate sha256" in logs
    finally:
        gw.stop()
        stop_stages(procs)
    # a gateway with the wrong secret is refused by the TLS stages, and says why
    bad = tmp_path / "bad"
    bad.write_text("z" * 64)
    from serving import run_gateway_expect_failure
    procs = start_stages(gemma3_path, [LayerRange(0, 18)], extra_args=[*STAGE_ARGS, "--tls", "auto"],
                         workdir=str(tmp_path), secret=SECRET)
    try:
        p = run_gateway_expect_failure([[procs[0].url.replace("ws://", "wss://")]], extra=["--secret-file", str(bad)])
        assert p.returncode != 0 and "authentication failed" in p.stderr
    finally:
        stop_stages(procs)



def test_exposed_gateway_needs_a_secret_and_an_api_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MOLINK_SECRET", "MOLINK_API_KEY")}
    base = [sys.executable, "-m", "molink_lite.cli", "gateway", "--pipeline", "ws://127.0.0.1:9", "--host", "0.0.0.0",
            "--port", str(free_port()), "--connect-timeout", "1"]
    p = subprocess.run(base, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "without a cluster secret" in p.stderr
    key = tmp_path / "k"
    key.write_text(SECRET)
    p = subprocess.run(base + ["--secret-file", str(key)], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "without an API key" in p.stderr and "--api-key-file" in p.stderr
    p = subprocess.run([sys.executable, "-m", "molink_lite.cli", "serve", "--host", "0.0.0.0"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == 2 and "without an API key" in p.stderr


def test_secret_command_writes_a_private_file(tmp_path):
    out = tmp_path / "cluster.key"
    cmd = [sys.executable, "-m", "molink_lite.cli", "secret", "-o", str(out)]
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    text = out.read_text().strip()
    assert len(text) == 64 and int(text, 16) >= 0
    if os.name == "posix":
        assert (out.stat().st_mode & 0o777) == 0o600
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr
    printed = subprocess.run([sys.executable, "-m", "molink_lite.cli", "secret"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    assert len(printed) == 64 and printed != text
