"""Stages that join: the gateway holds the model file, places layers over the hosts that joined, hands
each its partial GGUF, and adds a pipeline to the router once all its stages serve.

One WebSocket per joining stage at ``GET /cluster`` (the same cluster-secret handshake as every link,
role ``member``). Messages (JSON text; file data as binary):

1. stage -> ``join`` {name, backend, memory_bytes, advertise}
2. gateway -> ``assign`` {layers, fingerprint, file, size, sha256, n_ctx, n_seqs, codec} once placed
   (``wait`` while too few hosts have joined, ``error`` for a host that cannot hold even one layer)
3. stage -> ``fetch`` {offset}; gateway -> the file from ``offset`` in 1 MiB binary messages
4. stage -> ``ready`` {url}: when every stage of a pipeline is ready, the gateway connects it.

Placement waits until no host has joined for ``settle`` seconds, then places every waiting host
(:func:`molink_lite.serving.placement.plan`); hosts that join later are placed as new replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import aiohttp
import orjson
from aiohttp import web

from ..model.split import LayerRange, read_model_info, stage_gguf
from ..wire import auth
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


@dataclass
class Member:
    spec: HostSpec
    advertise: str
    ws: _WS
    assigned: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    slot: Optional["Slot"] = None


@dataclass
class Slot:
    """One stage of a placed pipeline: its layers, its file, the host serving it (None once it left)."""

    assign: dict
    est_bytes: int
    member: Optional[Member] = None
    url: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    pipeline: Optional[Pipeline] = None
    index: int = 0


class Cluster:
    """Joined hosts, their placement, and the pipelines made of them."""

    def __init__(self, model: str, router: Router, key: Optional[LinkKey], *, n_ctx: int = 8192, n_seqs: int = 16,
                 codec: str = "f16", settle: float = 3.0, cache_dir: Optional[str] = None,
                 pipeline_kw: Optional[dict] = None):
        self.model = model
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

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/cluster", self.handle)

    # ------------------------------------------------------------------ one joining stage
    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20, heartbeat=20)
        await ws.prepare(request)
        link = _WS(ws)
        peer = request.remote
        try:
            role = await auth.server_handshake(link, self.key, "")
            if role != "member":
                raise auth.AuthError(f"role {role!r} cannot join")
        except (auth.AuthError, ConnectionError) as e:
            log.warning("refused a join from %s: %s", peer, e)
            await ws.close(code=auth.CLOSE_AUTH, message=f"authentication failed: {e}"[:120].encode())
            return ws
        member: Optional[Member] = None
        try:
            member = await self._register(link, peer)
            await self._serve(member)
        except (ConnectionError, ValueError, asyncio.CancelledError) as e:
            if not isinstance(e, asyncio.CancelledError):
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

    def _take_over(self, m: Member) -> bool:
        """Give a newly joined host the layers of a host that left, if it can hold them."""
        for slot in self.slots:
            if slot.member is None and m.spec.memory_bytes >= slot.est_bytes:
                self._give(m, slot)
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
        spec = HostSpec(name=name, backend=str(msg.get("backend", "cpu")), memory_bytes=int(msg["memory_bytes"]),
                        address=str(msg.get("advertise", "")))
        member = Member(spec, str(msg.get("advertise", "")), link)
        self.members[name] = member
        log.info("stage %s joined from %s: %s, %.0f MiB, serves at %s", name, peer, spec.backend,
                 spec.memory_bytes / 2**20, member.advertise)
        if self._take_over(member):
            return member
        self.waiting.append(member)
        await link.send(orjson.dumps({"t": "wait", "message": f"joined as {name}; placing layers once no other "
                                                              f"host joins for {self.settle:g} s"}).decode())
        self._schedule()
        return member

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
                offset = int(msg.get("offset", 0))
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
                        slot.pipeline.chain.urls[slot.index] = url
                        slot.pipeline.urls[slot.index] = url
                while True:  # the link stays open while the stage serves; it ends when the stage leaves
                    await m.ws.recv()

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
        for stages in p.pipelines:
            slots = []
            for i, st in enumerate(stages):
                path = await loop.run_in_executor(None, stage_gguf, self.model, st.layers, self.cache_dir)
                size, sha = await loop.run_in_executor(None, _size_sha, Path(path))
                slot = Slot({"layers": str(st.layers), "fingerprint": self.info.fingerprint, "file": Path(path).name,
                             "size": size, "sha256": sha, "n_ctx": self.n_ctx, "n_seqs": self.n_seqs,
                             "codec": self.codec, "_path": str(path)}, st.est_bytes, index=i)
                self.slots.append(slot)
                slots.append(slot)
                m = by_name[st.host.name]
                if m in self.waiting:
                    self.waiting.remove(m)
                if m.assigned.done() or self.members.get(m.spec.name) is not m:  # it left meanwhile
                    log.warning("stage %s left before its layers %s were assigned", m.spec.name, st.layers)
                    continue
                self._give(m, slot)
            asyncio.ensure_future(self._start_pipeline(slots, [st.layers for st in stages]))

    async def _start_pipeline(self, slots: List[Slot], ranges: List[LayerRange]) -> None:
        urls = [await s.url for s in slots]  # a slot whose host left is taken over by the next fitting joiner
        name = f"j{self._n_pipes}"
        self._n_pipes += 1
        pipe = Pipeline(urls, codec=self.codec, name=name, key=self.key, **self.pipeline_kw)
        for s in slots:
            s.pipeline = pipe
        try:
            await pipe.connect(timeout=120)
        except (PipelineError, OSError) as e:
            log.error("pipeline %s (%s) could not start: %s; it keeps trying", name, ", ".join(map(str, ranges)), e)
            pipe.state = "down"
        self.router.add(pipe)
        log.info("pipeline %s: %s", name, ", ".join(f"{r} at {u}" for r, u in zip(ranges, urls)))


def _size_sha(path: Path) -> tuple:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()
