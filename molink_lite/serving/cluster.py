"""Stages that join: the gateway holds the model file, places layers over the hosts that joined, hands
each its partial GGUF, and adds a pipeline to the router once all its stages serve.

One WebSocket per joining stage at ``GET /cluster`` (the same cluster-secret handshake as every link,
role ``member``). Messages (JSON text; file data as binary):

1. stage -> ``join`` {name, backend, memory_bytes, ram_free, devices, advertise[, sec_per_layer][, serving]};
   gateway -> ``wait`` {name, message} first: the name this host has in the cluster (a second host asking for a
   name already here gets ``name-2``, ``name-3``, ...). Then, unless the join brought its ``sec_per_layer``:
   gateway -> ``calibrate`` {size, rows, name} and the header of a one-layer GGUF of this model (weights all
   zero, left as a sparse tail); stage -> ``calibrated`` {sec_per_layer} (or {error}: placed by nominal speed).
   ``serving`` {layers, fingerprint, file, size, sha256, url, n_ctx, n_seqs, codec}: a stage that already
   serves layers (its link to a gateway dropped, e.g. the gateway restarted) says what it holds.
2. gateway -> ``assign`` {layers, fingerprint, file, size, sha256, n_ctx, n_seqs, codec} once placed
   (``wait`` while too few hosts have joined, ``error`` for a host that cannot hold even one layer)
3. stage -> ``fetch`` {offset}; gateway -> the file from ``offset`` in 1 MiB binary messages (a bad offset gets
   ``error`` {message} and the link stays up). A stage that already holds a file with the assigned sha256
   fetches nothing. Stage -> ``progress`` {what} while it verifies or loads its file.
4. stage -> ``ready`` {url}: when every stage of a pipeline is ready, the gateway checks who can reach
   whom (it dials each stage itself; it asks each stage's upstream peer to ``probe`` {url} and answer
   ``probed`` {ok, why}) and connects it. A stage its dialer cannot reach (behind NAT) is reached
   through the gateway: the dialer opens ``/relay/<token>``, the gateway sends the stage ``dial`` {id},
   the stage opens ``/relay-back/<id>`` and the gateway copies bytes between the two
   (:mod:`molink_lite.wire.relay`). The plan shows every link's route and its measured cost.

A host that does not report ``ready`` within ``ready_timeout`` seconds of its assignment (each download chunk
starts the count again, and so does a ``progress`` message, for at most 4 x ``ready_timeout`` of local work in
all) loses its layers to a spare host or the next host that
joins; it is sent ``error`` {message, rejoin: true} and disconnected.

Placement waits until no host has joined for ``settle`` seconds, then places every waiting host
(:func:`molink_lite.serving.placement.plan`, in a worker thread: the gateway keeps serving meanwhile); hosts
that join later are placed as new replicas. **Rejoining stages** (``serving`` in their join) whose ranges tile
the model are made a pipeline again as they are: no re-placement, no download. Ranges that do not tile yet wait
up to ``rejoin_grace`` seconds for the rest of their pipeline; hosts without layers fill the gaps where they
can hold them; after that everything is placed anew (a stage whose kept file matches its new assignment's
sha256 still downloads nothing).

**Relay limits.** Per remote address (IPv6: per /64) at most ``relay_setup_per_address`` (4) tunnels being set
up and ``relay_open_per_address`` (64) open ones (``/relay/`` and ``/relay-back/`` alike; the gateway's own
dials, marked by a per-process key, count only towards the totals); more get 429. A tunnel counts as being set
up until the link inside could have been authenticated (``relay_setup_window``: the handshake timeout + 2 s;
any stage closes a link that has not authenticated by then), so silent outsiders cannot hold a stage's
handshake slots from one address. A tunnel whose stage does not dial back within ``relay_dial_timeout`` (10)
seconds is closed, and one that carries no byte in either direction for ``relay_idle_timeout`` (120) seconds
too (the stage links inside ping every 20 s). No tunnel WebSocket has a heartbeat of its own: aiohttp re-arms
a closed WebSocket's heartbeat timer when a late frame (the peer's close) arrives, which kept each closed tunnel
(~10 KiB with its request) alive for another 30 s or more: memory grew with the tunnel rate and stayed high.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import aiohttp
import orjson
from aiohttp import web

from ..model.gguf_meta import GGUFFile
from ..model.split import LayerRange, SplitError, parse_range, read_model_info, stage_gguf
from ..wire import auth, relay
from ..wire.auth import LinkKey
from .pipeline import Pipeline, PipelineError
from .placement import BACKENDS, TOO_SMALL, HostSpec, ModelCost, PlacementError, Plan, Stage, plan
from .router import Router

log = logging.getLogger(__name__)
CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
LOCAL_WORK_FACTOR = 4  # progress of local work (verifying, loading) extends the ready timeout up to 4x in all
CLUSTER_KEY = web.AppKey("molink_cluster", object)  # app[CLUSTER_KEY]: the Cluster serving this app's /cluster


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
    ws: Any
    assigned: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    slot: Optional["Slot"] = None
    base: str = ""  # the gateway's address as this stage reaches it, ws(s)://host:port
    offer: dict = field(default_factory=dict)  # what the stage reported: devices, free RAM
    probes: Dict[str, asyncio.Future] = field(default_factory=dict)
    held: Optional[dict] = None  # what a rejoining stage serves already (checked: this model, these settings)
    joined_at: float = field(default_factory=time.monotonic)
    deadline: float = 0.0  # ready by then, or its assignment goes to another host (moved by download progress)
    busy_since: Optional[float] = None  # first progress message since the last download chunk (local work)


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
    vacated: str = ""  # why its previous host lost it ("left", "ready timeout")


def address_key(remote: Optional[str]) -> str:
    """What per-address limits count by: the IPv4 address, an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:
        return remote or "?"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Cluster:
    """Joined hosts, their placement, and the pipelines made of them."""

    def __init__(self, model: str, router: Router, key: Optional[LinkKey], *, n_ctx: int = 8192, n_seqs: int = 16,
                 codec: str = "f16", settle: float = 3.0, cache_dir: Optional[str] = None,
                 pipeline_kw: Optional[dict] = None, cert_fp: str = "", ready_timeout: float = 120.0,
                 rejoin_grace: float = 15.0, relay_setup_per_address: int = 4, relay_open_per_address: int = 64,
                 relay_max_setup: int = 64, relay_max_open: int = 1024, relay_dial_timeout: float = 10.0,
                 relay_setup_window: float = auth.HANDSHAKE_TIMEOUT + 2.0, relay_idle_timeout: float = 120.0,
                 mmproj: Optional[str] = None):
        self.model = model
        # the model's vision projector: counted in the first stage's memory, downloaded by the stage given layer 0
        self.mmproj = mmproj
        self._mm: Optional[dict] = None   # its file name, size and sha256 (hashed once, with the first assignment)
        self.cert_fp = cert_fp  # the gateway's own TLS certificate (bound into /cluster handshakes over https)
        self.info = read_model_info(model)
        self.router = router
        self.key = key
        self.n_ctx, self.n_seqs, self.codec = n_ctx, n_seqs, codec
        # what an assigned stage starts with: a codec of its own ("auto" is the gateway's choice, made from the links
        # once the pipeline connects and sent in its configure)
        self.stage_codec = "f16" if codec == "auto" else codec
        self.settle = settle
        self.ready_timeout = ready_timeout
        self.rejoin_grace = rejoin_grace
        self.cache_dir = cache_dir
        self.pipeline_kw = pipeline_kw or {}
        self.waiting: List[Member] = []
        self.members: Dict[str, Member] = {}
        self._names: set = set()  # names taken, by members and by joins still registering
        self.plans: List[dict] = []
        self.slots: List[Slot] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._grace_timer: Optional[asyncio.TimerHandle] = None
        self._placing = False
        self._place_again = False
        self._n_pipes = 0
        self.by_token: Dict[str, Slot] = {}
        self.backs: Dict[str, Tuple[asyncio.Future, asyncio.Future]] = {}  # relay id -> (dial-back, tunnel done)
        self.local_base = ""  # this gateway as its own pipelines reach it (set once it listens)
        self.replacements: List[dict] = []  # layers moved to a new host after one left, and how long it took
        self.readopted: List[dict] = []  # pipelines formed again from stages that rejoined with their layers
        self.ready_timeouts: List[dict] = []  # hosts that lost their layers for not reporting ready in time
        self._problem = ""  # why the last placement failed ("" once one succeeds)
        self.joining: Dict[int, int] = {}  # hosts registering now (calibrating): link id -> memory offered
        self.pipe_prefix = ""  # before its pipelines' names (j0, j1, ...): the model's name when a gateway has several
        self._calib: Optional[asyncio.Future] = None  # (header, size, name) of the calibration file, or None
        self._cost: Optional[ModelCost] = None
        self._assigns: Dict[str, dict] = {}  # layer range -> its assignment (file written, sha256 known)
        self._sha: Dict[str, Tuple[int, int, str]] = {}  # file path -> (size, mtime_ns, sha256)
        # the relay: per-address limits, and a key marking this gateway's own dials (they count only in the totals)
        self.relay_setup_per_address, self.relay_open_per_address = relay_setup_per_address, relay_open_per_address
        self.relay_max_setup, self.relay_max_open = relay_max_setup, relay_max_open
        self.relay_dial_timeout, self.relay_idle_timeout = relay_dial_timeout, relay_idle_timeout
        self.relay_setup_window = relay_setup_window
        self._own = secrets.token_urlsafe(18)
        self._setup: Counter = Counter()  # address -> tunnels being set up
        self._open: Counter = Counter()  # address -> tunnels open (set up, or stage side connected)
        self.relay_stats = {"opened": 0, "closed": 0, "refused_busy": 0, "refused_address": 0, "dial_timeouts": 0,
                            "idle_closed": 0}

    def routes(self, app: web.Application) -> None:
        app[CLUSTER_KEY] = self
        app.router.add_get("/cluster", self.handle)
        app.router.add_get("/relay/{token}", self.relay)
        app.router.add_get("/relay-back/{cid}", self.relay_back)

    # ------------------------------------------------------------------ state for people
    @property
    def capacity_problem(self) -> str:
        """Why the hosts that joined cannot hold this model ("" while nothing says so)."""
        return self._problem if not self.router.pipelines else ""

    def placing_detail(self) -> str:
        n = sum(1 for m in self.waiting if self._alive(m))
        if not n:
            return ("waiting for stages to join: `molink-lite stage --join URL` (one process per stage; a host may run "
                    "several, each with its own --max-memory)")
        return f"{n} host(s) joined; placing once no other host joins for {self.settle:g} s"

    # ------------------------------------------------------------------ one joining stage
    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws, link = await accept_member(request, self.key, self.cert_fp)
        if link is not None:
            await self.run_member(ws, link, request.remote, member_base(request))
        return ws

    async def run_member(self, ws: web.WebSocketResponse, link: Any, peer: Optional[str], base: str,
                         first: Optional[dict] = None) -> None:
        """One authenticated joining stage, from its join message (``first``, when already read) until it
        leaves."""
        member: Optional[Member] = None
        key = id(link)
        if isinstance(first, dict) and isinstance(first.get("memory_bytes"), int):
            self.joining[key] = first["memory_bytes"]   # counted for this model while it registers (ClusterSet)
        try:
            try:
                member = await self._register(link, peer, base, first)
            finally:
                self.joining.pop(key, None)
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

    def _left(self, m: Member) -> None:
        """A host went away: its layers wait for the next host that joins and can hold them."""
        if m in self.waiting:
            self.waiting.remove(m)
        if self.members.get(m.spec.name) is m:
            del self.members[m.spec.name]
            self._names.discard(m.spec.name)
        slot = m.slot
        if slot is not None and slot.member is m:
            log.warning("stage %s left; layers %s wait for a host with %.0f MiB (requests are replayed meanwhile)",
                        m.spec.name, slot.assign["layers"], slot.est_bytes / 2**20)
            self._vacate(slot, "left")

    def _vacate(self, slot: Slot, why: str) -> None:
        """``slot`` has no host any more: a spare (a joined host not placed yet) takes it if one can hold it."""
        if slot.member is not None:
            slot.member.slot = None
        slot.member = None
        slot.vacated = why
        # a spare that holds these very layers first (no download), then the fastest
        for spare in sorted(self.waiting, key=lambda w: ((w.held or {}).get("sha256") != slot.assign["sha256"],
                                                         w.spec.speed)):
            if not spare.assigned.done() and self._take_over(spare, only=slot):
                self.waiting.remove(spare)
                break

    def _take_over(self, m: Member, only: Optional[Slot] = None) -> bool:
        """Give a newly joined host the layers of a host that left, if it can hold them; a host that already
        holds a slot's file (a stage rejoining after its link dropped) takes that slot first."""
        free = [s for s in ([only] if only is not None else self.slots)
                if s.member is None and m.spec.memory_bytes >= s.est_bytes]
        if not free:
            return False
        held = (m.held or {}).get("sha256")
        slot = next((s for s in free if s.assign["sha256"] == held), free[0])
        self._give(m, slot)
        slot.taken_at = time.monotonic()
        log.info("stage %s takes over layers %s%s", m.spec.name, slot.assign["layers"],
                 " (it holds them already: no download)" if slot.assign["sha256"] == held else "")
        return True

    @staticmethod
    def _give(m: Member, slot: Slot) -> None:
        slot.member = m
        m.slot = slot
        if slot.url.done():  # the pipeline already ran: the new host serves at a new address
            slot.url = asyncio.get_running_loop().create_future()
        m.assigned.set_result(slot.assign)

    def _drop_stale(self, held: dict, name: str) -> None:
        """A stage rejoins while this gateway still has its previous link (not yet noticed as dead: a stage has
        one cluster link at a time): that link is let go, so the stage takes its slot (and its name) back."""
        for slot in self.slots:
            old = slot.member
            if old is not None and slot.url.done() and slot.url.result() == held["url"] \
                    and slot.assign["sha256"] == held["sha256"]:
                log.info("stage %s rejoins; its previous cluster link (as %s) is let go", name, old.spec.name)
                if self.members.get(old.spec.name) is old:
                    del self.members[old.spec.name]
                    self._names.discard(old.spec.name)
                old.slot, slot.member, slot.vacated = None, None, "left"  # kept free for the stage that rejoins
                asyncio.ensure_future(_close_quietly(old.ws))
                return

    def _unique_name(self, wanted: str) -> str:
        """``wanted``, or ``wanted-2``, ``wanted-3``, ... when a host with that name is here already."""
        if wanted not in self._names:
            return wanted
        i = 2
        while f"{wanted}-{i}" in self._names:
            i += 1
        return f"{wanted}-{i}"

    async def _register(self, link: Any, peer: Optional[str], base: str, first: Optional[dict] = None) -> Member:
        msg = first if first is not None else orjson.loads(await link.recv())
        if not isinstance(msg, dict) or msg.get("t") != "join":
            raise ValueError("expected a join message")
        wanted = str(msg.get("name") or peer or "host").strip()[:60] or "host"
        held = self._held(msg.get("serving"), wanted)
        if held is not None:
            self._drop_stale(held, wanted)
        name = self._unique_name(wanted)
        self._names.add(name)  # taken now: a join with the same name arriving meanwhile gets another one
        registered = False
        try:
            await link.send(orjson.dumps({
                "t": "wait", "name": name,
                "message": f"joined as {name}" + (f" (a host named {wanted!r} is here already)" if name != wanted
                                                  else "")}).decode())
            if name != wanted:
                log.info("a host named %r is here already: the host joining from %s is %r", wanted, peer, name)
            spl = msg.get("sec_per_layer")
            if isinstance(spl, bool) or not isinstance(spl, (int, float)) or not 0 < spl < 1e4:
                spl = await self._calibrate(link, name)
            backend = str(msg.get("backend", "cpu"))[:16]
            if backend not in BACKENDS:  # e.g. "gpu" (Metal, Vulkan): placed as a GPU; calibration gives its speed
                backend = "cuda" if backend == "gpu" else "cpu"
            try:
                memory = msg["memory_bytes"]
                if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
                    raise ValueError(f"memory_bytes must be a positive integer, got {str(memory)[:40]}")
                spec = HostSpec(name=name, backend=backend, memory_bytes=memory,
                                address=str(msg.get("advertise", ""))[:200],
                                sec_per_layer=float(spl) if spl is not None else None)
            except (KeyError, ValueError) as e:
                await link.send(orjson.dumps({"t": "error", "message": f"cannot join: {e}"}).decode())
                raise ValueError(f"a join it cannot accept: {e}") from None
            member = Member(spec, str(msg.get("advertise", ""))[:200], link, base=base)
            member.offer = {"ram_free": msg.get("ram_free"), "devices": list(msg.get("devices") or [])[:16]}
            member.held = held
            self.members[name] = member
            registered = True
        finally:
            if not registered:
                self._names.discard(name)
        log.info("stage %s joined from %s: %s, %.0f MiB, %s, serves at %s%s", name, peer, spec.backend,
                 spec.memory_bytes / 2**20,
                 f"{1e3 * spec.sec_per_layer:.2f} ms per layer-step" if spec.sec_per_layer else "not calibrated",
                 member.advertise, f"; rejoining with layers {held['layers']} served at {held['url']}" if held else "")
        if self._take_over(member):
            return member
        self.waiting.append(member)
        await link.send(orjson.dumps({"t": "wait", "name": name, "message": f"placing layers once no other host "
                                      f"joins for {self.settle:g} s"}).decode())
        self._schedule()
        return member

    def _held(self, serving: Any, name: str) -> Optional[dict]:
        """What a rejoining stage serves, if it can serve it here (this model, this gateway's settings)."""
        if not isinstance(serving, dict):
            return None
        try:
            rng = parse_range(str(serving.get("layers")))
        except SplitError:
            rng = None
        url, sha = serving.get("url"), serving.get("sha256")
        why = None
        if rng is None or rng.stop > self.info.n_layer:
            why = f"layers {str(serving.get('layers'))[:20]!r} do not fit this model"
        elif serving.get("fingerprint") != self.info.fingerprint:
            why = "it holds another model"
        elif not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            why = "no valid sha256"
        elif not isinstance(url, str) or not url.startswith(("ws://", "wss://")) or len(url) > 300:
            why = "no valid url"
        elif self.mmproj and rng.start == 0 and (self._mm is None
                                                 or serving.get("mmproj") != self._mm["sha256"]):
            why = "it serves without this gateway's vision projector"
        elif (serving.get("n_ctx"), serving.get("n_seqs"), serving.get("codec")) != (self.n_ctx, self.n_seqs,
                                                                                   self.stage_codec):
            why = (f"it serves ctx {serving.get('n_ctx')}, {serving.get('n_seqs')} sequences, codec "
                   f"{serving.get('codec')}; this gateway places ctx {self.n_ctx}, {self.n_seqs}, {self.stage_codec}")
        if why is not None:
            log.info("stage %s rejoins serving layers %s, which cannot be kept here: %s", name,
                     str(serving.get("layers"))[:20], why)
            return None
        return {"layers": str(rng), "range": rng, "sha256": sha, "url": url}

    async def _calibrate(self, link: Any, name: str) -> Optional[float]:
        """Have the stage time one layer of this model's shape; None when it cannot (nominal speed then)."""
        if self._calib is None:
            self._calib = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                None, calibration_file, self.model, self.cache_dir))
        calib = await asyncio.shield(self._calib)
        if calib is None:
            return None
        header, size, tag = calib
        await link.send(orjson.dumps({"t": "calibrate", "size": size, "rows": self.n_seqs, "name": tag}).decode())
        await link.send(header)
        reply = orjson.loads(await asyncio.wait_for(link.recv(), 300))
        spl = reply.get("sec_per_layer") if isinstance(reply, dict) else None
        if isinstance(spl, (int, float)) and not isinstance(spl, bool) and 0 < spl < 1e4:
            return float(spl)
        log.warning("stage %s could not calibrate (%s); it is placed by nominal speed", name,
                    str(reply.get("error"))[:200] if isinstance(reply, dict) else "bad reply")
        return None

    async def _send(self, m: Member, obj: dict) -> None:
        await m.ws.send(orjson.dumps(obj).decode())

    async def _serve(self, m: Member) -> None:
        # keep reading while the stage waits for its range: pings are answered and a departure is noticed
        nxt = asyncio.ensure_future(m.ws.recv())
        try:
            await asyncio.wait([m.assigned, nxt], return_when=asyncio.FIRST_COMPLETED)
            if not m.assigned.done():
                nxt.result()  # raises: the stage left
                raise ValueError("a message before the layer assignment")
            assign = m.assigned.result()
            if "error" in assign:
                await self._send(m, {"t": "error", "message": assign["error"]})
                return
            await self._send(m, {"t": "assign", **{k: v for k, v in assign.items() if not k.startswith("_")}})
            m.deadline = time.monotonic() + self.ready_timeout
            while not m.ready.done():  # until it serves: downloads, progress, within the ready timeout
                done, _ = await asyncio.wait([nxt], timeout=max(0.0, m.deadline - time.monotonic()))
                if not done:
                    await self._ready_timeout(m)
                    return
                msg = orjson.loads(nxt.result())
                nxt = asyncio.ensure_future(m.ws.recv())
                if not isinstance(msg, dict):
                    continue
                kind = msg.get("t")
                if kind == "fetch":
                    what = assign
                    if msg.get("what") == "mmproj" and "mmproj" in assign:   # the projector, after the layers
                        what = {"size": assign["mmproj"]["size"], "_path": self.mmproj}
                    if not await self._send_file(m, what, msg.get("offset", 0)):
                        return
                elif kind == "progress":  # verifying or loading its file: extends, up to LOCAL_WORK_FACTOR x
                    now = time.monotonic()
                    if m.busy_since is None:
                        m.busy_since = now
                    if now - m.busy_since < LOCAL_WORK_FACTOR * self.ready_timeout:
                        m.deadline = now + self.ready_timeout
                elif kind == "ready":
                    self._ready(m, msg.get("url"))
                elif kind == "probed":
                    self._probed(m, msg)
            while True:  # the link stays open while the stage serves; it ends when the stage leaves
                msg = orjson.loads(await nxt)
                nxt = asyncio.ensure_future(m.ws.recv())
                if isinstance(msg, dict) and msg.get("t") == "probed":
                    self._probed(m, msg)
        finally:
            nxt.cancel()

    async def _send_file(self, m: Member, assign: dict, offset: Any) -> bool:
        """Stream the assigned file from ``offset``; a bad offset gets an error reply. False: the host lost its
        layers meanwhile (the ready timeout ran out while a chunk could not be sent)."""
        size = int(assign["size"])
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= size:
            log.warning("stage %s asked for its layer file from offset %s; refused (the file has %d bytes)",
                        m.spec.name, str(offset)[:40], size)
            await self._send(m, {"t": "error", "message": f"bad download offset {str(offset)[:40]}: must be an "
                                                          f"integer in 0..{size}"})
            return True
        with open(assign["_path"], "rb") as f:
            f.seek(offset)
            for block in iter(lambda: f.read(CHUNK), b""):
                try:
                    await asyncio.wait_for(m.ws.send(block), max(1.0, m.deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    await self._ready_timeout(m)
                    return False
                m.deadline = time.monotonic() + self.ready_timeout  # the download makes progress
                m.busy_since = None
        return True

    def _ready(self, m: Member, url: Any) -> None:
        url = str(url)[:300]
        if not m.ready.done():
            m.ready.set_result(url)
        slot = m.slot
        if slot is not None and slot.member is m and not slot.url.done():
            slot.url.set_result(url)
            if slot.pipeline is not None:  # a replacement host: the pipeline reconnects to it
                asyncio.ensure_future(self._replaced(slot))

    @staticmethod
    def _probed(m: Member, msg: dict) -> None:
        fut = m.probes.pop(str(msg.get("id")), None)
        if fut is not None and not fut.done():
            fut.set_result((bool(msg.get("ok")), str(msg.get("why", ""))[:200]))

    async def _ready_timeout(self, m: Member) -> None:
        """``m`` took its layers and did not report ready in time: they go to another host; it is told and let go."""
        slot = m.slot
        why = (f"did not report ready within {self.ready_timeout:g} s of its assignment (nor any download or "
               f"loading progress)")
        if slot is not None and slot.member is m:
            log.warning("stage %s %s: layers %s go to a spare host or the next host that joins and can hold them",
                        m.spec.name, why, slot.assign["layers"])
            self.ready_timeouts.append({"host": m.spec.name, "layers": slot.assign["layers"],
                                        "at": round(time.time(), 3)})
            self._vacate(slot, "ready timeout")
        try:
            await asyncio.wait_for(self._send(m, {"t": "error", "rejoin": True,
                                                  "message": f"this host {why}; its layers went to another host"}), 5)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass

    # ------------------------------------------------------------------ placement
    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.settle, lambda: asyncio.ensure_future(self._place()))

    async def _place(self) -> None:
        """Place the waiting hosts; one placement at a time (a join during one places again afterwards)."""
        if self._placing:
            self._place_again = True
            return
        self._placing = True
        try:
            self._place_again = True
            while self._place_again:
                self._place_again = False
                await self._place_once()
        except Exception:  # noqa: BLE001 - a bug here must not stop later placements; say what happened
            log.exception("placement failed")
        finally:
            self._placing = False

    def _cost_model(self) -> ModelCost:
        if self._cost is None:
            self._cost = ModelCost(self.model, n_ctx=self.n_ctx, n_seqs=self.n_seqs, mmproj=self.mmproj)
        return self._cost

    async def _assignment(self, rng: LayerRange) -> dict:
        """The assignment of layers ``rng``: its partial GGUF written (once) and hashed (once per file version)."""
        key = str(rng)
        got = self._assigns.get(key)
        if got is None:
            loop = asyncio.get_running_loop()
            path = Path(await loop.run_in_executor(None, stage_gguf, self.model, rng, self.cache_dir))
            size, sha = await loop.run_in_executor(None, self._size_sha, path)
            got = {"layers": key, "fingerprint": self.info.fingerprint, "file": path.name,
                   "size": size, "sha256": sha, "n_ctx": self.n_ctx, "n_seqs": self.n_seqs,
                   "codec": self.stage_codec, "_path": str(path)}
            if self.mmproj and rng.start == 0:   # the first stage also fetches the vision projector
                if self._mm is None:
                    mm = Path(self.mmproj)
                    mm_size, mm_sha = await loop.run_in_executor(None, self._size_sha, mm)
                    self._mm = {"file": mm.name, "size": mm_size, "sha256": mm_sha}
                got["mmproj"] = dict(self._mm)
            self._assigns[key] = got
        return got

    def _size_sha(self, path: Path) -> Tuple[int, str]:
        st = path.stat()
        known = self._sha.get(str(path))
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return st.st_size, known[2]
        size, sha = _size_sha(path)
        self._sha[str(path)] = (st.st_size, st.st_mtime_ns, sha)
        return size, sha

    def _alive(self, m: Member) -> bool:
        return not m.assigned.done() and self.members.get(m.spec.name) is m

    async def _place_once(self) -> None:
        hosts = [m for m in self.waiting if self._alive(m)]
        if not hosts:
            return
        # 1. stages that rejoined with layers that tile the model: the same pipeline again, nothing moves
        held = await self._held_checked([m for m in hosts if m.held is not None])
        if held and self._cost is None:  # the memory model of this model (reads the GGUF: off the event loop)
            self._cost = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
                ModelCost, self.model, n_ctx=self.n_ctx, n_seqs=self.n_seqs, mmproj=self.mmproj))
        for chain in _tilings(held, self.info.n_layer):
            await self._form(chain, [(m, m.held["range"]) for m in chain], "re-adopted")
        hosts = [m for m in hosts if self._alive(m)]
        held = [m for m in held if self._alive(m)]
        # 2. rejoined ranges that do not tile: hosts without layers fill the gaps where they can hold them
        if held:
            fresh = [m for m in hosts if m.held is None]
            for stages in self._fill_gaps(held, fresh):
                await self._form([m for m, _ in stages], stages, "kept ranges")
            hosts = [m for m in hosts if self._alive(m)]
            pending = [m for m in hosts if m.held is not None]
            if pending:
                wait = min(m.joined_at for m in pending) + self.rejoin_grace - time.monotonic()
                if wait > 0:  # the rest of their pipeline may still be on its way back
                    log.info("stages %s rejoined with layers %s; waiting up to %.0f s for the rest of their "
                             "pipeline before placing anew", ", ".join(m.spec.name for m in pending),
                             ", ".join(m.held["layers"] for m in pending), wait)
                    if self._grace_timer is not None:
                        self._grace_timer.cancel()
                    self._grace_timer = asyncio.get_running_loop().call_later(
                        wait + 0.05, lambda: asyncio.ensure_future(self._place()))
                    return
        if not hosts:
            return
        # 3. place anew (a worker thread: the gateway keeps serving and answering heartbeats meanwhile)
        loop = asyncio.get_running_loop()
        try:
            p = await loop.run_in_executor(None, functools.partial(
                plan, self.model, [m.spec for m in hosts], n_ctx=self.n_ctx, n_seqs=self.n_seqs, mmproj=self.mmproj))
        except PlacementError as e:
            self._problem = str(e)
            log.warning("cannot place %s yet: %s", self.info.name, e)
            for m in hosts:
                if self._alive(m):
                    try:
                        await self._send(m, {"t": "wait", "name": m.spec.name, "message": f"not enough hosts yet: {e}"})
                    except (ConnectionError, OSError):
                        pass
            return
        self._problem = ""
        log.info("placement:\n%s", p.describe())
        self.plans.append(p.to_dict())
        by_name = {m.spec.name: m for m in hosts}
        for host, why in p.unused:
            m = by_name[host.name]
            if why.startswith(TOO_SMALL) and self._alive(m):
                if m in self.waiting:
                    self.waiting.remove(m)
                m.assigned.set_result({"error": f"this host cannot serve a layer of {self.info.name}: {why}"})
        for k, stages in enumerate(p.pipelines):
            await self._make_pipeline([(by_name[st.host.name], st.layers, st.est_bytes) for st in stages],
                                      self.plans[-1]["pipelines"][k])

    async def _held_checked(self, held: List[Member]) -> List[Member]:
        """The rejoined hosts whose kept file is exactly what this gateway assigns for their range."""
        out = []
        for m in held:
            try:
                a = await self._assignment(m.held["range"])
            except (SplitError, OSError, ValueError) as e:
                log.warning("stage %s holds layers %s, which this gateway cannot assign (%s)", m.spec.name,
                            m.held["layers"], e)
                m.held = None
                continue
            if a["sha256"] != m.held["sha256"]:
                log.warning("stage %s holds layers %s in a file that differs from this gateway's (sha256 %s..., "
                            "here %s...): placed anew", m.spec.name, m.held["layers"], m.held["sha256"][:12],
                            a["sha256"][:12])
                m.held = None
                continue
            if self._alive(m):
                out.append(m)
        return out

    def _fill_gaps(self, held: List[Member], fresh: List[Member]) -> List[List[Tuple[Member, LayerRange]]]:
        """Pipelines made of rejoined hosts keeping their ranges plus fresh hosts holding the layers between."""
        cost = self._cost_model()
        out = []
        held = sorted(held, key=lambda m: (m.held["range"].start, m.held["range"].stop))
        fresh = sorted(fresh, key=lambda m: m.spec.memory_bytes)  # the smallest host that fits each gap
        while held:
            keep, at = [], 0
            for m in held:  # non-overlapping ranges, in layer order
                r = m.held["range"]
                if r.start >= at:
                    keep.append(m)
                    at = r.stop
            stages, used, at, ok = [], [], 0, True
            for m in keep + [None]:
                stop = m.held["range"].start if m is not None else self.info.n_layer
                if stop > at:  # a gap [at, stop)
                    if cost.refusal(at, stop) is not None:
                        ok = False
                        break
                    need = cost.stage_bytes(at, stop)
                    filler = next((f for f in fresh if f not in used and f.spec.memory_bytes >= need), None)
                    if filler is None:
                        ok = False
                        break
                    used.append(filler)
                    stages.append((filler, LayerRange(at, stop)))
                if m is not None:
                    stages.append((m, m.held["range"]))
                    at = m.held["range"].stop
            if not ok or not used:
                break
            out.append(stages)
            held = [m for m in held if m not in keep]
            fresh = [f for f in fresh if f not in used]
        return out

    async def _form(self, members: List[Member], stages: List[Tuple[Member, LayerRange]], how: str) -> None:
        """A pipeline of the given hosts and ranges, shown in the placement like a planned one."""
        cost = self._cost_model()
        plan_stages = [Stage(m.spec, r, cost.stage_bytes(r.start, r.stop), m.spec.speed * cost.stage_units(r.start,
                                                                                                           r.stop))
                       for m, r in stages]
        shown = Plan(self.info, self.n_ctx, self.n_seqs, [plan_stages], [], self._cost_model().vision_bytes).to_dict()
        shown["kept"] = how
        self.plans.append(shown)
        log.info("pipeline from stages that rejoined with their layers (%s): %s", how,
                 ", ".join(f"{r} on {m.spec.name}" + ("" if m.held is not None else " (placed in a gap)")
                           for m, r in stages))
        self.readopted.append({"how": how, "stages": [{"host": m.spec.name, "layers": str(r)} for m, r in stages],
                               "at": round(time.time(), 3)})
        await self._make_pipeline([(m, r, st.est_bytes) for (m, r), st in zip(stages, plan_stages)],
                                  shown["pipelines"][0])

    async def _make_pipeline(self, stages: List[Tuple[Member, LayerRange, int]], shown: dict) -> None:
        slots: List[Slot] = []
        for i, (m, rng, est) in enumerate(stages):
            slot = Slot(await self._assignment(rng), est, index=i)
            self.slots.append(slot)
            slots.append(slot)
            slot.group = slots
            self.by_token[slot.token] = slot
            if m in self.waiting:
                self.waiting.remove(m)
            if not self._alive(m):  # it left, or took over another host's layers meanwhile
                log.warning("stage %s is gone before its layers %s were assigned; they wait for the next host",
                            m.spec.name, rng)
                continue
            self._give(m, slot)
        asyncio.ensure_future(self._start_pipeline(slots, [r for _, r, _ in stages], shown))

    async def _start_pipeline(self, slots: List[Slot], ranges: List[LayerRange], shown: dict) -> None:
        urls = [await s.url for s in slots]  # a slot whose host left is taken over by the next fitting joiner
        name = f"{self.pipe_prefix}j{self._n_pipes}"
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
        for s in slots:  # layers a host took over before the pipeline first came up
            if s.taken_at and s.member is not None:
                self._record_replacement(s, pipe)
        log.info("pipeline %s: %s", name, ", ".join(f"{r} at {u}" for r, u in zip(ranges, urls)))

    async def _replaced(self, slot: Slot) -> None:
        """A host that took over ``slot`` serves: route to it and report how long the re-placement took."""
        pipe = slot.pipeline
        await self._apply_routes(slot.group, pipe)
        while pipe.state != "up":
            await asyncio.sleep(0.1)
        self._record_replacement(slot, pipe)

    def _record_replacement(self, slot: Slot, pipe: Pipeline) -> None:
        took = time.monotonic() - slot.taken_at
        self.replacements.append({"layers": slot.assign["layers"], "host": slot.member.spec.name if slot.member
                                  else None, "pipeline": pipe.name, "seconds": round(took, 2),
                                  "after": slot.vacated or "left"})
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
            gw_urls.append(url if ok else relay.with_via(url, f"{self.local_base}/relay/{slot.token}?k={self._own}"))
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
    def _relay_admit(self, request: web.Request, setup: bool) -> Tuple[Optional[web.Response], str, bool]:
        """(a refusal or None, the address key, whether this is the gateway's own dial); counts the tunnel."""
        addr = address_key(request.remote)
        own = secrets.compare_digest(request.query.get("k", ""), self._own)
        if setup and sum(self._setup.values()) >= self.relay_max_setup or \
                sum(self._open.values()) >= self.relay_max_open:
            self.relay_stats["refused_busy"] += 1
            busy = web.Response(status=503, text="too many relay connections\n", headers={"Retry-After": "1"})
            return busy, addr, own
        if not own and (setup and self._setup[addr] >= self.relay_setup_per_address
                        or self._open[addr] >= self.relay_open_per_address):
            self.relay_stats["refused_address"] += 1
            if self.relay_stats["refused_address"] in (1, 10, 100) or self.relay_stats["refused_address"] % 1000 == 0:
                log.warning("relay: refused a tunnel from %s: %d being set up, %d open from this address (limits %d, "
                            "%d); %d refused so far", addr, self._setup[addr], self._open[addr],
                            self.relay_setup_per_address, self.relay_open_per_address,
                            self.relay_stats["refused_address"])
            return web.Response(status=429, text="too many relay connections from this address\n",
                                headers={"Retry-After": "1"}), addr, own
        key = ("own" if own else addr)
        if setup:
            self._setup[key] += 1
        self._open[key] += 1
        return None, key, own

    def _relay_release(self, key: str, setup: bool = False, opened: bool = False) -> None:
        for counter, on in ((self._setup, setup), (self._open, opened)):
            if on:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    async def relay(self, request: web.Request) -> web.StreamResponse:
        """A dialer's tunnel to a stage that cannot accept connections: the stage dials back, bytes are copied."""
        slot = self.by_token.get(request.match_info["token"])
        m = slot.member if slot is not None else None
        if m is None:
            return web.Response(status=404, text="no relayed stage with this token (it left?)\n")
        refused, key, _ = self._relay_admit(request, setup=True)
        if refused is not None:
            return refused
        loop = asyncio.get_running_loop()
        setting_up = [True]

        def set_up() -> None:  # counted as being set up no longer
            if setting_up[0]:
                setting_up[0] = False
                self._relay_release(key, setup=True)

        ws = web.WebSocketResponse(max_msg_size=relay.TUNNEL_MAX_MSG)  # no heartbeat: the links inside ping
        done: asyncio.Future = loop.create_future()
        cid = secrets.token_urlsafe(18)
        window: Optional[asyncio.TimerHandle] = None
        try:
            await ws.prepare(request)
            back_fut = loop.create_future()
            self.backs[cid] = (back_fut, done)
            try:
                await m.ws.send(orjson.dumps({"t": "dial", "id": cid}).decode())
                back = await asyncio.wait_for(back_fut, self.relay_dial_timeout)
            except (asyncio.TimeoutError, ConnectionError, OSError) as e:
                if isinstance(e, asyncio.TimeoutError):
                    self.relay_stats["dial_timeouts"] += 1
                    why = f"did not dial back within {self.relay_dial_timeout:g} s"
                else:
                    why = f"could not dial back ({e})"
                log.warning("relay to %s: the stage %s", m.spec.name, why)
                await ws.close(code=1011, message=f"the stage {why}"[:120].encode())
                return ws
            finally:
                self.backs.pop(cid, None)
            # the stage's link handshake runs inside the tunnel now; any stage ends an unauthenticated link within
            # its handshake timeout, so a tunnel older than that window carries an authenticated link (or is over)
            window = loop.call_later(self.relay_setup_window, set_up)
            self.relay_stats["opened"] += 1
            if await _splice(ws, back, self.relay_idle_timeout):
                self.relay_stats["idle_closed"] += 1
            self.relay_stats["closed"] += 1
            return ws
        finally:
            if window is not None:
                window.cancel()
            self.backs.pop(cid, None)
            set_up()
            if not done.done():
                done.set_result(None)  # the stage's side (relay_back) ends too
            self._relay_release(key, opened=True)
            if ws.prepared and not ws.closed:
                await _close_quietly(ws)

    async def relay_back(self, request: web.Request) -> web.StreamResponse:
        pending = self.backs.get(request.match_info["cid"])
        if pending is None or pending[0].done():
            return web.Response(status=404, text="no relay waits for this id\n")
        fut, done = pending
        refused, key, _ = self._relay_admit(request, setup=False)
        if refused is not None:  # the dialer hears it at once instead of waiting for the dial-back timeout
            fut.set_exception(ConnectionError("its dial-back was refused: too many tunnels from its address"))
            return refused
        ws = web.WebSocketResponse(max_msg_size=relay.TUNNEL_MAX_MSG)
        try:
            await ws.prepare(request)
            if fut.done():  # the dialer gave up while this connection was being upgraded
                return ws
            fut.set_result(ws)
            await done  # the relay handler copies bytes until either side ends, then closes both
            return ws
        finally:
            self._relay_release(key, opened=True)
            if ws.prepared and not ws.closed:
                await _close_quietly(ws)

    def relay_counts(self) -> dict:
        """Tunnels being set up and open now, and what the relay did so far (for /v1/stats and tests)."""
        return {"setting_up": sum(self._setup.values()), "open": sum(self._open.values()),
                "addresses": len(set(self._setup) | set(self._open)), "pending_dial_backs": len(self.backs),
                **self.relay_stats}


def member_base(request: web.Request) -> str:
    """The gateway's address as a joining stage reached it, ws(s)://host:port."""
    return f"{'wss' if request.secure else 'ws'}://{request.host}"


async def accept_member(request: web.Request, key: Optional[LinkKey], cert_fp: str) -> Tuple[web.WebSocketResponse,
                                                                                          Optional[Any]]:
    """The ``/cluster`` WebSocket and its link once the cluster-secret handshake passed as role ``member`` (None:
    refused, and the socket is closed)."""
    ws = web.WebSocketResponse(max_msg_size=1 << 20, heartbeat=20)
    await ws.prepare(request)
    try:
        role, link = await auth.server_handshake(_WS(ws), key, cert_fp)
        if role != "member":
            raise auth.AuthError(f"role {role!r} cannot join")
    except (auth.AuthError, ConnectionError) as e:
        log.warning("refused a join from %s: %s", request.remote, e)
        await ws.close(code=auth.CLOSE_AUTH, message=f"authentication failed: {e}"[:120].encode())
        return ws, None
    return ws, link


async def _close_quietly(ws: Any) -> None:
    try:
        await ws.close()
    except Exception:  # noqa: BLE001 - it is gone already
        pass


def _tilings(held: List[Member], n_layer: int) -> List[List[Member]]:
    """Disjoint groups of hosts whose held ranges tile layers [0, n_layer), each in layer order."""
    out: List[List[Member]] = []
    left = list(held)

    def chain(at: int, pool: List[Member]) -> Optional[List[Member]]:
        if at == n_layer:
            return []
        for m in sorted((m for m in pool if m.held["range"].start == at), key=lambda m: -m.held["range"].stop):
            rest = chain(m.held["range"].stop, [x for x in pool if x is not m])
            if rest is not None:
                return [m] + rest
        return None

    while True:
        found = chain(0, left)
        if not found:
            return out
        out.append(found)
        left = [m for m in left if m not in found]


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


async def _splice(a: web.WebSocketResponse, b: web.WebSocketResponse, idle: float) -> bool:
    """Copy binary messages both ways until either side ends or neither sends anything for ``idle`` seconds;
    then close both. True when it ended for idleness."""
    last = [time.monotonic()]
    idle_hit = [False]

    async def copy(src: web.WebSocketResponse, dst: web.WebSocketResponse) -> None:
        while True:
            try:
                msg = await src.receive(timeout=idle)
            except asyncio.TimeoutError:
                if time.monotonic() - last[0] < idle:  # the other direction carried bytes meanwhile
                    continue
                idle_hit[0] = True
                return
            if msg.type != aiohttp.WSMsgType.BINARY:
                return
            last[0] = time.monotonic()
            await dst.send_bytes(msg.data)

    try:
        await relay.until_first_ends(copy(a, b), copy(b, a))
    finally:
        await asyncio.gather(a.close(), b.close(), return_exceptions=True)
    return idle_hit[0]


def _size_sha(path: Path) -> tuple:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()
