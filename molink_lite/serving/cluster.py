"""Stages that join: the gateway holds the model file, places layers over the hosts that joined, hands
each its partial GGUF, and adds a pipeline to the router once all its stages serve.

One WebSocket per joining stage at ``GET /cluster`` (the same cluster-secret handshake as every link,
role ``member``). Messages (JSON text; file data as binary):

1. stage -> ``join`` {name, backend, memory_bytes, ram_free, devices, advertise}; gateway ->
   ``calibrate`` {size, rows, name} and the header of a one-layer GGUF of this model (weights all zero,
   left as a sparse tail); stage -> ``calibrated`` {sec_per_layer} (placement balances by it)
2. gateway -> ``assign`` {layers, fingerprint, file, size, sha256, n_ctx, n_seqs, codec} once placed
   (``wait`` while too few hosts have joined, ``error`` for a host that cannot hold even one layer)
3. stage -> ``fetch`` {offset}; gateway -> the file from ``offset`` in 1 MiB binary messages
4. stage -> ``ready`` {url}: when every stage of a pipeline is ready, the gateway checks who can reach
   whom (it dials each stage itself; it asks each stage's upstream peer to ``probe`` {url} and answer
   ``probed`` {ok, why}) and connects it. A stage its dialer cannot reach (behind NAT) is reached
   through the gateway: the dialer opens ``/relay/<token>``, the gateway sends the stage ``dial`` {id},
   the stage opens ``/relay-back/<id>`` and the gateway copies bytes between the two
   (:mod:`molink_lite.wire.relay`). The plan shows every link's route and its measured cost.

Placement waits until no host has joined for ``settle`` seconds, then places every waiting host
(:func:`molink_lite.serving.placement.plan`); hosts that join later are placed as new replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import aiohttp
import orjson
from aiohttp import web

from ..model.gguf_meta import GGUFFile
from ..model.split import LayerRange, read_model_info, stage_gguf
from ..wire import auth, relay
from ..wire.auth import LinkKey
from .pipeline import Pipeline, PipelineError
from .placement import TOO_SMALL, HostSpec, PlacementError, plan
from .router import Router

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class _WS:
    """aiohttp's server WebSocket with the send/recv that :mod:`molink_lite.wire.auth` expects."""

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws

    async def send(self, data: Any) -> None:
        if isinstance(data, str):
            await self.ws.send_str(data)
        else:
            await self.ws.send_bytes(data)

    async def recv(self) -> Any:
        msg = await self.ws.receive()
        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return msg.data
        raise ConnectionError("the stage closed the cluster link")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code=code, message=reason.encode()[:120])


@dataclass
class Member:
    spec: HostSpec
    advertise: str
    ws: _WS
    assigned: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    slot: Optional["Slot"] = None
    base: str = ""  # the gateway's address as this stage reaches it, ws(s)://host:port
    offer: dict = field(default_factory=dict)  # what the stage reported: devices, free RAM
    probes: Dict[str, asyncio.Future] = field(default_factory=dict)


@dataclass
class Slot:
    """One stage of a placed pipeline: its layers, its file, the host serving it (None once it left)."""

    assign: dict
    est_bytes: int
    member: Optional[Member] = None
    url: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    pipeline: Optional[Pipeline] = None
    index: int = 0
    group: List["Slot"] = field(default_factory=list)  # the slots of this pipeline, in layer order
    token: str = field(default_factory=lambda: secrets.token_urlsafe(18))  # /relay/<token> reaches this slot
    links: List[dict] = field(default_factory=list)  # routes into this slot (from the gateway, from upstream)
    taken_at: float = 0.0  # when a new host took this slot over (re-placement timing)


class Cluster:
    """Joined hosts, their placement, and the pipelines made of them."""

    def __init__(self, model: str, router: Router, key: Optional[LinkKey], *, n_ctx: int = 8192, n_seqs: int = 16,
                 codec: str = "f16", settle: float = 3.0, cache_dir: Optional[str] = None,
                 pipeline_kw: Optional[dict] = None, cert_fp: str = ""):
        self.model = model
        self.cert_fp = cert_fp  # the gateway's own TLS certificate (bound into /cluster handshakes over https)
        self.info = read_model_info(model)
        self.router = router
        self.key = key
        self.n_ctx, self.n_seqs, self.codec = n_ctx, n_seqs, codec
        self.settle = settle
        self.cache_dir = cache_dir
        self.pipeline_kw = pipeline_kw or {}
        self.waiting: List[Member] = []
        self.members: Dict[str, Member] = {}
        self.plans: List[dict] = []
        self.slots: List[Slot] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._n_pipes = 0
        self.by_token: Dict[str, Slot] = {}
        self.backs: Dict[str, asyncio.Future] = {}  # relay id -> the stage's dial-back, once it arrives
        self.local_base = ""  # this gateway as its own pipelines reach it (set once it listens)
        self.replacements: List[dict] = []  # layers moved to a new host after one left, and how long it took
        self._calib: Optional[asyncio.Future] = None  # (header, size, name) of the calibration file, or None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/cluster", self.handle)
        app.router.add_get("/relay/{token}", self.relay)
        app.router.add_get("/relay-back/{cid}", self.relay_back)

    # ------------------------------------------------------------------ one joining stage
    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20, heartbeat=20)
        await ws.prepare(request)
        link = _WS(ws)
        peer = request.remote
        try:
            role, link = await auth.server_handshake(link, self.key, self.cert_fp)
            if role != "member":
                raise auth.AuthError(f"role {role!r} cannot join")
        except (auth.AuthError, ConnectionError) as e:
            log.warning("refused a join from %s: %s", peer, e)
            await ws.close(code=auth.CLOSE_AUTH, message=f"authentication failed: {e}"[:120].encode())
            return ws
        member: Optional[Member] = None
        try:
            member = await self._register(link, peer)
            member.base = f"{'wss' if request.secure else 'ws'}://{request.host}"
            await self._serve(member)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            # a stage that left, or one that sent something malformed (only a secret holder gets this far)
            log.warning("stage %s left the cluster link: %s", member.spec.name if member else peer, e)
        finally:
            if member is not None:
                self._left(member)
            await ws.close()
        return ws

    def _left(self, m: Member) -> None:
        """A host went away: its layers wait for the next host that joins and can hold them."""
        if m in self.waiting:
            self.waiting.remove(m)
        self.members.pop(m.spec.name, None)
        slot = m.slot
        if slot is not None and slot.member is m:
            slot.member = None
            log.warning("stage %s left; layers %s wait for a host with %.0f MiB (requests are replayed meanwhile)",
                        m.spec.name, slot.assign["layers"], slot.est_bytes / 2**20)
            for spare in sorted(self.waiting, key=lambda w: w.spec.speed):  # a joined host not placed yet
                if not spare.assigned.done() and self._take_over(spare):
                    self.waiting.remove(spare)
                    break

    def _take_over(self, m: Member) -> bool:
        """Give a newly joined host the layers of a host that left, if it can hold them."""
        for slot in self.slots:
            if slot.member is None and m.spec.memory_bytes >= slot.est_bytes:
                self._give(m, slot)
                slot.taken_at = time.monotonic()
                log.info("stage %s takes over layers %s", m.spec.name, slot.assign["layers"])
                return True
        return False

    @staticmethod
    def _give(m: Member, slot: Slot) -> None:
        slot.member = m
        m.slot = slot
        if slot.url.done():  # the pipeline already ran: the new host serves at a new address
            slot.url = asyncio.get_running_loop().create_future()
        m.assigned.set_result(slot.assign)

    async def _register(self, link: _WS, peer: Optional[str]) -> Member:
        msg = orjson.loads(await link.recv())
        if msg.get("t") != "join":
            raise ValueError("expected a join message")
        name = str(msg.get("name") or peer)[:64]
        if name in self.members:
            name = f"{name}-{len(self.members)}"
        spl = await self._calibrate(link, name)
        spec = HostSpec(name=name, backend=str(msg.get("backend", "cpu"))[:16], memory_bytes=int(msg["memory_bytes"]),
                        address=str(msg.get("advertise", ""))[:200], sec_per_layer=spl)
        member = Member(spec, str(msg.get("advertise", ""))[:200], link)
        member.offer = {"ram_free": msg.get("ram_free"), "devices": msg.get("devices", [])[:16]}
        self.members[name] = member
        log.info("stage %s joined from %s: %s, %.0f MiB, %s, serves at %s", name, peer, spec.backend,
                 spec.memory_bytes / 2**20, f"{1e3 * spl:.2f} ms per layer-step" if spl else "not calibrated",
                 member.advertise)
        if self._take_over(member):
            return member
        self.waiting.append(member)
        await link.send(orjson.dumps({"t": "wait", "message": f"joined as {name}; placing layers once no other "
                                                              f"host joins for {self.settle:g} s"}).decode())
        self._schedule()
        return member

    async def _calibrate(self, link: _WS, name: str) -> Optional[float]:
        """Have the stage time one layer of this model's shape; None when it cannot (nominal speed then)."""
        if self._calib is None:
            self._calib = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                None, calibration_file, self.model, self.cache_dir))
        calib = await self._calib
        if calib is None:
            return None
        header, size, tag = calib
        await link.send(orjson.dumps({"t": "calibrate", "size": size, "rows": self.n_seqs, "name": tag}).decode())
        await link.send(header)
        reply = orjson.loads(await asyncio.wait_for(link.recv(), 300))
        spl = reply.get("sec_per_layer") if isinstance(reply, dict) else None
        if isinstance(spl, (int, float)) and 0 < spl < 1e4:
            return float(spl)
        log.warning("stage %s could not calibrate (%s); it is placed by nominal speed", name,
                    reply.get("error") if isinstance(reply, dict) else "bad reply")
        return None

    async def _serve(self, m: Member) -> None:
        # keep reading while the stage waits for its range: pings are answered and a departure is noticed
        nxt = asyncio.ensure_future(m.ws.recv())
        await asyncio.wait([m.assigned, nxt], return_when=asyncio.FIRST_COMPLETED)
        if not m.assigned.done():
            nxt.result()  # raises: the stage left
            raise ValueError("a message before the layer assignment")
        assign = m.assigned.result()
        if "error" in assign:
            nxt.cancel()
            await m.ws.send(orjson.dumps({"t": "error", "message": assign["error"]}).decode())
            return
        await m.ws.send(orjson.dumps({"t": "assign", **{k: v for k, v in assign.items() if k != "_path"}}).decode())
        path = Path(assign["_path"])
        while True:
            msg = orjson.loads(await nxt)
            nxt = asyncio.ensure_future(m.ws.recv())
            if msg.get("t") == "fetch":
                offset, size = msg.get("offset", 0), int(assign["size"])
                if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= size:
                    log.warning("stage %s asked for its layer file from offset %r; refused (the file has %d bytes)",
                                m.spec.name, offset, size)
                    await m.ws.send(orjson.dumps({"t": "error", "message": f"bad download offset {str(offset)[:40]}: "
                                                  f"must be an integer in 0..{size}"}).decode())
                    continue
                with open(path, "rb") as f:
                    f.seek(offset)
                    for block in iter(lambda: f.read(CHUNK), b""):
                        await m.ws.send(block)
            elif msg.get("t") == "ready":
                url = str(msg.get("url"))
                if not m.ready.done():
                    m.ready.set_result(url)
                slot = m.slot
                if slot is not None and not slot.url.done():
                    slot.url.set_result(url)
                    if slot.pipeline is not None:  # a replacement host: the pipeline reconnects to it
                        asyncio.ensure_future(self._replaced(slot))
                while True:  # the link stays open while the stage serves; it ends when the stage leaves
                    msg = orjson.loads(await nxt)
                    nxt = asyncio.ensure_future(m.ws.recv())
                    if not isinstance(msg, dict):
                        continue
                    fut = m.probes.pop(str(msg.get("id")), None) if msg.get("t") == "probed" else None
                    if fut is not None and not fut.done():
                        fut.set_result((bool(msg.get("ok")), str(msg.get("why", ""))[:200]))

    # ------------------------------------------------------------------ placement
    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.settle, lambda: asyncio.ensure_future(self._place()))

    async def _place(self) -> None:
        hosts = [m for m in self.waiting if not m.assigned.done()]
        if not hosts:
            return
        try:
            p = plan(self.model, [m.spec for m in hosts], n_ctx=self.n_ctx, n_seqs=self.n_seqs)
        except PlacementError as e:
            log.warning("cannot place %s yet: %s", self.info.name, e)
            for m in hosts:
                await m.ws.send(orjson.dumps({"t": "wait", "message": f"not enough hosts yet: {e}"}).decode())
            return
        log.info("placement:\n%s", p.describe())
        self.plans.append(p.to_dict())
        by_name = {m.spec.name: m for m in hosts}
        for host, why in p.unused:
            m = by_name[host.name]
            if why.startswith(TOO_SMALL):
                m.assigned.set_result({"error": f"this host cannot serve a layer of {self.info.name}: {why}"})
        loop = asyncio.get_running_loop()
        plan_dict = self.plans[-1]
        for k, stages in enumerate(p.pipelines):
            slots: List[Slot] = []
            for i, st in enumerate(stages):
                path = await loop.run_in_executor(None, stage_gguf, self.model, st.layers, self.cache_dir)
                size, sha = await loop.run_in_executor(None, _size_sha, Path(path))
                slot = Slot({"layers": str(st.layers), "fingerprint": self.info.fingerprint, "file": Path(path).name,
                             "size": size, "sha256": sha, "n_ctx": self.n_ctx, "n_seqs": self.n_seqs,
                             "codec": self.codec, "_path": str(path)}, st.est_bytes, index=i)
                self.slots.append(slot)
                slots.append(slot)
                slot.group = slots
                self.by_token[slot.token] = slot
                m = by_name[st.host.name]
                if m in self.waiting:
                    self.waiting.remove(m)
                if m.assigned.done() or self.members.get(m.spec.name) is not m:  # it left meanwhile
                    log.warning("stage %s left before its layers %s were assigned", m.spec.name, st.layers)
                    continue
                self._give(m, slot)
            asyncio.ensure_future(self._start_pipeline(slots, [st.layers for st in stages], plan_dict["pipelines"][k]))

    async def _start_pipeline(self, slots: List[Slot], ranges: List[LayerRange], shown: dict) -> None:
        urls = [await s.url for s in slots]  # a slot whose host left is taken over by the next fitting joiner
        name = f"j{self._n_pipes}"
        self._n_pipes += 1
        pipe = Pipeline(urls, codec=self.codec, name=name, key=self.key, **self.pipeline_kw)
        for s in slots:
            s.pipeline = pipe
        shown["name"] = name
        await self._apply_routes(slots, pipe)
        try:
            await pipe.connect(timeout=120)
            await self._measure(slots, pipe)
        except (PipelineError, OSError) as e:
            log.error("pipeline %s (%s) could not start: %s; it keeps trying", name, ", ".join(map(str, ranges)), e)
            pipe.state = "down"
        shown["links"] = [k for s in slots for k in s.links]
        self.router.add(pipe)
        log.info("pipeline %s: %s", name, ", ".join(f"{r} at {u}" for r, u in zip(ranges, urls)))

    async def _replaced(self, slot: Slot) -> None:
        """A host that took over ``slot`` serves: route to it and report how long the re-placement took."""
        pipe = slot.pipeline
        await self._apply_routes(slot.group, pipe)
        while pipe.state != "up":
            await asyncio.sleep(0.1)
        took = time.monotonic() - slot.taken_at
        self.replacements.append({"layers": slot.assign["layers"], "host": slot.member.spec.name if slot.member
                                  else None, "pipeline": pipe.name, "seconds": round(took, 2)})
        log.info("re-placement of layers %s on %s done in %.2f s (joined -> fetched -> serving -> pipeline up)",
                 slot.assign["layers"], self.replacements[-1]["host"], took)

    # ------------------------------------------------------------------ who reaches whom
    async def _apply_routes(self, slots: List[Slot], pipe: Pipeline) -> None:
        """Direct links where the dialer reaches the stage, else through this gateway's relay."""
        urls = [await s.url for s in slots]
        gw_urls, next_urls = [], []
        for i, (slot, url) in enumerate(zip(slots, urls)):
            name = slot.member.spec.name if slot.member else "?"
            ok, why = await relay.reachable(url)
            gw_urls.append(url if ok else relay.with_via(url, f"{self.local_base}/relay/{slot.token}"))
            slot.links = [{"from": "gateway", "to": name, "route": "direct" if ok else "relay via gateway",
                           "check": why}]
            if i > 0:
                up = slots[i - 1].member
                ok, why = await self._peer_reaches(up, url) if up is not None else (False, "no host upstream")
                base = up.base if up is not None else self.local_base
                next_urls.append(url if ok else relay.with_via(url, f"{base}/relay/{slot.token}"))
                slot.links.append({"from": up.spec.name if up else "?", "to": name,
                                   "route": "direct" if ok else "relay via gateway", "check": why})
            for k in slot.links:
                (log.info if k["route"] == "direct" else log.warning)(
                    "link %s -> %s: %s (%s)", k["from"], k["to"], k["route"], k["check"])
        next_urls.append(None)
        pipe.urls[:] = gw_urls
        pipe.chain.urls[:] = gw_urls
        pipe.chain.next_urls = next_urls

    async def _peer_reaches(self, m: Member, url: str, timeout: float = 2.0) -> tuple:
        """Ask stage ``m`` whether it can open a connection to ``url``."""
        pid = secrets.token_hex(8)
        fut = m.probes[pid] = asyncio.get_running_loop().create_future()
        try:
            await m.ws.send(orjson.dumps({"t": "probe", "id": pid, "url": url, "timeout": timeout}).decode())
            return await asyncio.wait_for(fut, timeout + 5)
        except (asyncio.TimeoutError, ConnectionError) as e:
            return False, f"{m.spec.name} did not answer the reachability check ({e or type(e).__name__})"
        finally:
            m.probes.pop(pid, None)

    async def _measure(self, slots: List[Slot], pipe: Pipeline) -> None:
        """The cost of each link as routed: round trip from the gateway; stage-to-stage rtt and bandwidth."""
        for slot, ch in zip(slots, pipe.channels):
            t0 = time.perf_counter()
            await ch.request({"type": "ping"}, timeout=30)
            slot.links[0]["rtt_ms"] = round(1e3 * (time.perf_counter() - t0), 2)
        measured = pipe.links or await pipe.chain.probe()
        for slot, k in zip(slots[1:], measured):
            slot.links[1].update(rtt_ms=round(k["rtt_ms"], 2), mbit=round(k["mbit"], 1))
        for slot in slots:
            for k in slot.links:
                log.info("link %s -> %s (%s): rtt %s ms%s", k["from"], k["to"], k["route"], k.get("rtt_ms"),
                         f", {k['mbit']} Mbit/s" if "mbit" in k else "")

    # ------------------------------------------------------------------ the relay
    async def relay(self, request: web.Request) -> web.StreamResponse:
        """A dialer's tunnel to a stage that cannot accept connections: the stage dials back, bytes are copied."""
        slot = self.by_token.get(request.match_info["token"])
        m = slot.member if slot is not None else None
        if m is None:
            return web.Response(status=404, text="no relayed stage with this token (it left?)\n")
        if len(self.backs) >= 64:
            return web.Response(status=503, text="too many relay connections being set up\n")
        ws = web.WebSocketResponse(max_msg_size=relay.TUNNEL_MAX_MSG, heartbeat=20)
        await ws.prepare(request)
        cid = secrets.token_urlsafe(18)
        fut = self.backs[cid] = asyncio.get_running_loop().create_future()
        try:
            await m.ws.send(orjson.dumps({"t": "dial", "id": cid}).decode())
            back, done = await asyncio.wait_for(fut, 10)
        except (asyncio.TimeoutError, ConnectionError) as e:
            log.warning("relay to %s: the stage did not dial back (%s)", m.spec.name, e or type(e).__name__)
            await ws.close(code=1011, message=b"the stage did not dial back through the relay")
            return ws
        finally:
            self.backs.pop(cid, None)
        try:
            await _splice(ws, back)
        finally:
            if not done.done():
                done.set_result(None)
        return ws

    async def relay_back(self, request: web.Request) -> web.StreamResponse:
        fut = self.backs.get(request.match_info["cid"])
        if fut is None or fut.done():
            return web.Response(status=404, text="no relay waits for this id\n")
        ws = web.WebSocketResponse(max_msg_size=relay.TUNNEL_MAX_MSG, heartbeat=20)
        await ws.prepare(request)
        done = asyncio.get_running_loop().create_future()
        fut.set_result((ws, done))
        await done  # the relay handler copies bytes until either side ends
        return ws


def calibration_file(model: str, cache_dir: Optional[str]) -> Optional[tuple]:
    """(header bytes, file size, name) of a one-layer middle-stage GGUF of ``model``: the stage writes the
    header and leaves the tensor data as zeros (a sparse file), so only the header crosses the link."""
    info = read_model_info(model)
    mid = info.n_layer // 2
    for layer in sorted(range(1, info.n_layer - 1), key=lambda i: abs(i - mid))[:8]:
        try:
            path = stage_gguf(model, LayerRange(layer, layer + 1), cache_dir)
        except Exception as e:  # noqa: BLE001 - the architecture refuses this cut; try another layer
            log.debug("no calibration file at layer %d: %s", layer, e)
            continue
        off = GGUFFile(path).data_start
        with open(path, "rb") as f:
            header = f.read(off)
        return header, path.stat().st_size, f"{info.fingerprint}-L{layer}"
    return None


async def _splice(a: web.WebSocketResponse, b: web.WebSocketResponse) -> None:
    """Copy binary messages both ways until either side ends; then close both."""

    async def copy(src: web.WebSocketResponse, dst: web.WebSocketResponse) -> None:
        async for msg in src:
            if msg.type != aiohttp.WSMsgType.BINARY:
                return
            await dst.send_bytes(msg.data)

    try:
        await relay.until_first_ends(copy(a, b), copy(b, a))
    finally:
        await a.close()
        await b.close()


def _size_sha(path: Path) -> tuple:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()
