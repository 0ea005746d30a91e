"""WebSocket stage server: runs one layer range and forwards hidden states to the next stage.

Frames (see :mod:`molink_lite.wire.codec`), by ``meta["type"]``:

Every connection first passes the cluster-secret handshake (:mod:`molink_lite.wire.auth`) and
declares its role: ``gateway`` (may configure the stage and drive it) or ``upstream`` (the
previous stage: sends steps and pings only). Nothing else is read before that.

* ``hello`` -> ``info``: model identity (fingerprint, arch, layer range, widths, limits).
* ``configure`` (gateway role): becomes the pipeline head, connects to the next stage. Meta ``gateway``
  names the controlling gateway (a random id per pipeline), ``takeover`` asks to take the stage from another
  one. Fencing: while the controlling gateway's link is connected (it answers a ping), a ``configure`` from
  another gateway is refused (``error`` with ``code: "fenced"`` and the fencing ``epoch``) unless it asks to
  take over; a takeover, or a new gateway after the previous one went away (a restart), bumps the epoch and
  disconnects the previous head (close code ``CLOSE_REPLACED``, reason ``fenced off: ... epoch N``). The same
  gateway reconnecting replaces its own older link. Either way every sequence is forgotten. The reply
  (``configured``) carries the epoch.
* ``link_down`` / ``link_up`` (stage -> head): this stage lost its link to the next stage (taken over by
  another ``upstream`` link, reset, the next stage gone): steps sent since may be lost, so the head fails the
  pipeline over; the stage reconnects to the same next URL with backoff (0.1 s doubling to 2 s) and says
  ``link_up`` when the link is back (meta: ``stage`` "a-b", ``to`` the next URL, ``reason``).
* ``step``: one micro-batch. Arrays ``seq`` / ``pos`` (int32) and ``tokens`` (first stage)
  or ``hidden`` (later stages); ``out`` (u8) marks rows whose next token is wanted.
  Meta ``free`` lists sequences to forget first, ``trim`` maps sequences to the position from
  which their KV is dropped next (rejected speculative drafts), ``start`` maps new sequences to
  sampling parameters (``spec``: the sequence may send drafts), ``drafts`` maps sequences to the
  draft tokens of their last rows, which the last stage verifies (1..k+1 tokens come back). Every field is checked by :mod:`molink_lite.stage.validate` first. Steps are taken
  from the head on the first stage and from the upstream stage on the others. Non-last stages forward the step with their hidden states to the next
  stage; the last stage samples and sends a ``result`` (seq, tokens, eog, text pieces)
  to the head. A failure sends an ``error`` for the step straight to the head.
* ``tokenize`` (first stage) and ``stats``: small requests answered on the same connection.

Steps are processed strictly in arrival order by one worker; llama.cpp runs in a
worker thread so sockets keep flowing while a stage computes.

Connection slots: a stage holds at most ``max_connections`` connections (``max_connections_per_address`` from
one address; IPv6: one /64) and ``max_handshakes`` unauthenticated ones (``max_handshakes_per_address``), which
get ``handshake_timeout`` seconds to answer the challenge. A newcomer that finds a table full takes the slot of
the oldest pending (unauthenticated) connection from its own address (or, for the global tables, from the
address holding the most): an honest peer answers within one round trip, so silent squatters, even from the
address relayed tunnels come from (this host), cannot lock a gateway out. Authenticated connections are never
evicted; when only they fill a table the newcomer is refused with close code 1013 ("too many connections"),
which gateways and stages retry with backoff.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401,I001 - before numpy

import asyncio
import ipaddress
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter, deque
from datetime import datetime, timezone
from typing import Awaitable, Callable, Deque, Dict, List, Optional, Tuple

import numpy as np
import websockets

from ..model.vocab import Detokenizer, Vocab
from ..wire import auth
from ..wire.auth import AuthError, LinkKey
from ..wire.channel import Channel, ChannelClosed, RemoteError
from ..wire.codec import CODECS, encode_frame
from ..wire.tls import fingerprint_file, server_context
from .engine import EngineError, StageEngine, last_row_of_each_seq
from .hostinfo import devices, process_rss
from .sampling import SamplerPool, SamplingError
from .validate import StepError, StepLimits, StepPlan, check_step

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 2
REPLY_MAX_BYTES = 64 << 20   # what a stage accepts on its own link to the next stage (replies only)
# what each link role may send
ROLE_FRAMES = {"gateway": {"hello", "configure", "step", "tokenize", "stats", "ping", "probe_next", "error"},
               "upstream": {"hello", "step", "ping", "error"}}
# connection slots (see the module docstring)
MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS = 128, 48
MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDRESS = 64, 16
HANDSHAKE_TIMEOUT = 5.0      # an unauthenticated peer's time to answer the challenge (honest ones: one round trip)
BUSY = "too many connections"  # the close reason of a refusal for lack of slots (gateways retry on it)
NEXT_RETRY = (0.1, 2.0)      # reconnecting to the next stage: first delay, longest delay (doubling)
NEXT_DIAL_PATIENCE = 5.0     # configure: how long a busy next stage is retried before configure fails
HEAD_PING_TIMEOUT = 3.0      # a controlling gateway that does not answer a ping within this is taken as gone


class _Pending:
    """An admitted connection that has not passed the handshake yet (evictable)."""

    __slots__ = ("addr", "t0", "evicted", "released")

    def __init__(self, addr: str):
        self.addr = addr
        self.t0 = time.monotonic()
        self.evicted = asyncio.Event()
        self.released = False


class StageServer:
    """Serves one :class:`StageEngine` over WebSockets."""

    def __init__(self, engine: StageEngine, *, host: str = "127.0.0.1", port: int = 9001,
                 next_url: Optional[str] = None, codec: str = "f16", key: Optional[LinkKey] = None,
                 tls: Optional[Tuple[str, str]] = None, max_connections: int = MAX_CONNECTIONS,
                 max_handshakes: int = MAX_HANDSHAKES, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
                 max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS):
        self.engine = engine
        self.info = engine.info
        self.host, self.port = host, port
        self.fixed_next = next_url
        self.codec = codec
        self.key = key
        self.tls = tls
        self.cert_fp = fingerprint_file(tls[0]) if tls else ""
        self.max_connections, self.max_handshakes = max_connections, max_handshakes
        self.max_connections_per_address = max_connections_per_address
        self.max_handshakes_per_address = max_handshakes_per_address
        self.handshake_timeout = handshake_timeout
        self._n_conn = 0
        self._conns_by_addr: Counter = Counter()
        self._pending: Dict[str, List[_Pending]] = {}  # per address, oldest first
        self._busy_logged = 0.0
        self._busy_quiet = 0
        self.limits = StepLimits(n_seq_max=engine.n_seq_max, n_ctx=engine.n_ctx,
                                 max_rows=max(engine.n_batch, engine.n_seq_max), n_vocab=self.info.n_vocab,
                                 n_embd_inp=self.info.n_embd_inp, is_first=self.info.is_first,
                                 is_last=self.info.is_last)
        self._seq_len = np.zeros(engine.n_seq_max, dtype=np.int64)  # positions each sequence holds here
        self.vocab = Vocab(engine.model_ptr) if (self.info.is_first or self.info.is_last) else None
        self.samplers = (SamplerPool(self.info.n_vocab, on_greedy=engine.set_device_greedy)
                         if self.info.is_last else None)
        self.detok = Detokenizer(self.vocab) if self.info.is_last and self.vocab else None
        self.head: Optional[Channel] = None
        self.upstream: Optional[Channel] = None
        self.next: Optional[Channel] = None
        self.next_url: Optional[str] = None
        # the link to the next stage: one dial at a time; each link (generation) has a keeper that rebuilds it
        self._next_lock = asyncio.Lock()
        self._next_gen = 0
        self._notified_gen = -1  # the link generation whose loss the head was told about
        self._next_since = 0.0
        self._next_delay = NEXT_RETRY[0]
        self._keepers: set = set()
        self._closing = False
        # fencing: the controlling gateway (its id), since when, and the epoch (bumped when the controller changes)
        self.controller: Optional[str] = None
        self.controller_since = 0.0
        self.epoch = 0
        self._configure_lock = asyncio.Lock()
        self._refusals_logged: Dict[str, float] = {}
        # one worker (queue + llama thread) per engine lane: a lane's steps run in order, lanes run side by side
        self.lanes = engine.lanes
        self._queues: List[asyncio.Queue] = [asyncio.Queue() for _ in range(self.lanes)]
        self._pools = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama{i}") for i in range(self.lanes)]
        self._server = None
        self._workers: List[asyncio.Task] = []
        self.stats: Dict[str, float] = {"steps": 0, "rows": 0, "max_seqs_in_step": 0, "max_queued": 0,
                                        "max_in_flight": 0, "errors": 0, "frees": 0, "busy_s": 0.0,
                                        "refused_links": 0, "rejected_frames": 0,
                                        "trims": 0, "drafted": 0, "accepted": 0,
                                        "busy_refusals": 0, "evicted_handshakes": 0, "next_link_losses": 0,
                                        "next_link_reconnects": 0, "epoch": 0, "takeovers": 0,
                                        "refused_configures": 0}
        self._in_flight = 0  # steps received and not yet finished here
        self.draining = False
        self.drained = asyncio.Event()
        # (step id, start, end) of the latest steps; perf_counter is a system-wide monotonic clock, so
        # timelines of stages on one host can be compared (tests prove micro-batches overlap with it)
        self.timeline: Deque[Tuple[object, float, float]] = deque(maxlen=512)

    # ------------------------------------------------------------------ identity
    def describe(self) -> dict:
        i = self.info
        d = {"type": "info", "protocol": PROTOCOL_VERSION, "arch": i.model_arch or i.arch, "fingerprint": i.fingerprint,
             "layer_start": i.layer_start, "layer_stop": i.layer_stop, "n_layer_total": i.n_layer_total,
             "n_embd": i.n_embd, "n_embd_inp": i.n_embd_inp, "n_vocab": i.n_vocab, "n_ctx": self.engine.n_ctx,
             "max_seqs": self.engine.n_seq_max, "n_batch": self.engine.n_batch, "max_rows": self.limits.max_rows,
             "model": i.path, "name": i.name, "next": self.next_url, "codec": self.codec,
             "host": socket.gethostname(), "backend": self.backend(), "n_gpu_layers": self.engine.n_gpu_layers,
             "model_bytes": _file_size(i.path), "lanes": self.lanes, "n_ctx_lane": self.engine.n_ctx_lane}
        if self.vocab is not None:
            d.update(chat_template=self.vocab.chat_template, bos=self.vocab.token_text(self.vocab.bos),
                     eos=self.vocab.token_text(self.vocab.eos), add_bos=self.vocab.add_bos)
        return d

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._workers = [asyncio.ensure_future(self._work_loop(i)) for i in range(self.lanes)]
        ssl_ctx = server_context(*self.tls) if self.tls else None
        self._server = await websockets.serve(self._on_connect, self.host, self.port,
                                              max_size=self.limits.max_frame_bytes() + auth.SEAL_OVERHEAD,
                                              compression=None,
                                              ping_interval=20, ping_timeout=60, ssl=ssl_ctx)
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info("stage layers %d-%d of %d (%s) listening on %s://%s:%d (%s%s)", self.info.layer_start,
                 self.info.layer_stop - 1, self.info.n_layer_total, self.info.arch, "wss" if ssl_ctx else "ws",
                 self.host, self.port, "cluster secret required" if self.key else "NO authentication",
                 f", TLS certificate sha256 {self.cert_fp}" if ssl_ctx else "")

    async def close(self) -> None:
        self._closing = True
        for k in list(self._keepers):
            k.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for w in self._workers:
            w.cancel()
        for ch in (self.next, self.head, self.upstream):
            if ch is not None:
                await ch.close()
        for pool in self._pools:
            pool.shutdown(wait=True)

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.close()

    # ------------------------------------------------------------------ connections
    async def _on_connect(self, ws) -> None:
        peer = ws.remote_address
        rec, refused = self._enter(_address_key(peer))
        if rec is None:
            self.stats["refused_links"] += 1
            self.stats["busy_refusals"] += 1
            self._log_busy("refused a connection from %s: %s (%s)", peer, BUSY, refused)
            await _close_quickly(ws, auth.CLOSE_BUSY, f"{BUSY} ({refused}); retry later")
            return
        hs = asyncio.ensure_future(auth.server_handshake(ws, self.key, self.cert_fp, self.handshake_timeout))
        try:
            evicted = asyncio.ensure_future(rec.evicted.wait())
            try:
                await asyncio.wait({hs, evicted}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                evicted.cancel()
            if not hs.done():  # a newer connection took this one's slot: it never answered the challenge
                hs.cancel()
                await asyncio.gather(hs, return_exceptions=True)
                self._log_busy("dropped the pending connection from %s (%.1f s without answering the challenge) to "
                               "make room for a newer one", peer, time.monotonic() - rec.t0)
                await _close_quickly(ws, auth.CLOSE_BUSY, f"{BUSY}: this unanswered handshake's slot went to a newer "
                                                          f"connection; retry")
                return
            self._unpend(rec)
            try:
                role, link = hs.result()
            except (AuthError, websockets.exceptions.WebSocketException, OSError) as e:
                self.stats["refused_links"] += 1
                log.warning("refused a connection from %s: authentication failed: %s", peer, e)
                await _close_quickly(ws, auth.CLOSE_AUTH, f"authentication failed: {e}"[:120])
                return
            if role not in ROLE_FRAMES:
                await ws.close(auth.CLOSE_AUTH, f"a {role} link cannot talk to a stage")
                return
            ch = Channel(link, name=f"{role} {peer}")
            ch.role = role
            if role == "upstream":
                await self._take_role("upstream", ch)
            await ch.serve(self._handle)
            if ch is self.head:
                log.warning("pipeline head disconnected (%s); forgetting all sequences", ch.close_reason)
                self.head = None
                self._reset_all()
                if self.draining:
                    self.drained.set()
            if ch is self.upstream:
                self.upstream = None
        finally:
            if not hs.done():
                hs.cancel()
            self._release(rec)

    # ------------------------------------------------------------------ connection slots
    def _enter(self, addr: str) -> Tuple[Optional[_Pending], str]:
        """A slot for a new connection from ``addr`` (pending until ``_unpend``, held until ``_release``), or
        (None, why not)."""
        refused = self._admit(addr)
        if refused:
            return None, refused
        rec = _Pending(addr)
        self._pending.setdefault(addr, []).append(rec)
        self._n_conn += 1
        self._conns_by_addr[addr] += 1
        return rec, ""

    def _admit(self, addr: str) -> str:
        """Make room for a new connection from ``addr``: "" when it may come in (the oldest pending handshake
        evicted if a table was full), else why not (only authenticated connections fill the table)."""
        mine = self._pending.get(addr, [])
        if len(mine) >= self.max_handshakes_per_address \
                or self._conns_by_addr[addr] >= self.max_connections_per_address:
            pool, why = mine, f"{self._conns_by_addr[addr]} authenticated connections from this address"
        elif sum(map(len, self._pending.values())) >= self.max_handshakes or self._n_conn >= self.max_connections:
            pool = max(self._pending.values(), key=lambda v: (len(v), -v[0].t0), default=[])
            why = f"{self._n_conn} authenticated connections"
        else:
            return ""
        if not pool:
            return why
        self._evict(pool[0])
        return ""

    def _evict(self, rec: _Pending) -> None:
        self._release(rec)
        self.stats["evicted_handshakes"] += 1
        rec.evicted.set()

    def _unpend(self, rec: _Pending) -> None:
        mine = self._pending.get(rec.addr)
        if mine is not None and rec in mine:
            mine.remove(rec)
            if not mine:
                del self._pending[rec.addr]

    def _release(self, rec: _Pending) -> None:
        """The connection no longer holds a slot (it ended, or was evicted)."""
        if rec.released:
            return
        rec.released = True
        self._unpend(rec)
        self._n_conn -= 1
        self._conns_by_addr[rec.addr] -= 1
        if self._conns_by_addr[rec.addr] <= 0:
            del self._conns_by_addr[rec.addr]

    def _log_busy(self, msg: str, *args: object) -> None:
        """Warn about refused or evicted connections at most once a second (a flood must not flood the log)."""
        now = time.monotonic()
        if now - self._busy_logged < 1.0:
            self._busy_quiet += 1
            return
        quiet, self._busy_quiet, self._busy_logged = self._busy_quiet, 0, now
        log.warning(msg + (f" (and {quiet} more refused or evicted in the last second)" if quiet else ""), *args)

    def begin_drain(self, timeout: float = 30.0) -> None:
        """Ask the gateway to move this pipeline's sequences away; ``drained`` is set once it let go."""
        if self.draining or self.head is None:
            self.draining = True
            self.drained.set()  # nothing to hand over (or a second signal): go now
            return
        self.draining = True
        log.warning("draining: asking the gateway to move this pipeline's sequences (at most %.0f s)", timeout)
        self._send_head({"type": "drain"}, None)
        asyncio.get_running_loop().call_later(timeout, self.drained.set)

    async def _take_role(self, role: str, ch: Channel, reason: str = "") -> None:
        """``ch`` becomes the head (gateway) or the upstream stage; a previous holder is disconnected."""
        old = self.head if role == "gateway" else self.upstream
        if role == "gateway":
            self.head = ch
        else:
            self.upstream = ch
        if old is not None and old is not ch:
            log.info("a new %s connection (%s) replaces %s", role, ch.name, old.name)
            asyncio.ensure_future(old.close(auth.CLOSE_REPLACED, reason or f"another {role} took over this stage"))

    async def _handle(self, ch: Channel, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        kind = meta.get("type")
        if kind not in ROLE_FRAMES[ch.role]:
            self.stats["rejected_frames"] += 1
            ch.reply(meta, {"type": "error", "message": f"a {ch.role} link may not send {str(kind)[:40]!r} frames"})
            return
        if kind == "step":
            feeder = self.head if self.info.is_first else self.upstream
            if ch is not feeder:
                self.stats["rejected_frames"] += 1
                ch.reply(meta, {"type": "error", "message": "steps are taken only from the pipeline head (first stage) "
                                                            "or the upstream stage"})
                return
            lane = meta.get("lane", 0)
            if isinstance(lane, bool) or not isinstance(lane, int) or not 0 <= lane < self.lanes:
                self.stats["rejected_frames"] += 1
                self._report(meta, f"rejected step: 'lane' must be an integer in 0..{self.lanes - 1}")
                return
            self._in_flight += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self._in_flight)
            q = self._queues[lane]
            q.put_nowait(("step", meta, arrays))
            self.stats["max_queued"] = max(self.stats["max_queued"], q.qsize())
        elif kind == "hello":
            ch.reply(meta, self.describe())
        elif kind == "configure":
            await self._configure(ch, meta)
        elif kind == "tokenize":
            await self._tokenize(ch, meta)
        elif kind == "stats":
            live, positions = self.kv_usage()
            ch.reply(meta, {"type": "stats", **self.stats, **self._engine_stats(), "timeline": list(self.timeline),
                            "live_seqs": live, "kv_positions": positions, "rss_bytes": process_rss()})
        elif kind == "ping":
            ch.reply(meta, {"type": "pong", "bytes": sum(int(a.nbytes) for a in arrays.values())})
        elif kind == "probe_next":
            await self._probe_next(ch, meta)
        elif kind == "error":
            log.warning("peer reported: %s", meta.get("message"))
        else:
            ch.reply(meta, {"type": "error", "message": f"unknown frame type {kind!r}"})

    def backend(self) -> str:
        """Where the layers run: 'cpu', or the GPU devices llama.cpp offloads to (e.g. 'CUDA0')."""
        if not self.engine.n_gpu_layers:
            return "cpu"
        gpus = [d["name"] for d in devices() if d["type"] in ("gpu", "igpu")]
        return ",".join(gpus) or "gpu"

    def kv_usage(self) -> Tuple[int, int]:
        """(sequences holding KV here, KV positions they hold)."""
        seq_len = self._seq_len.copy()
        return int(np.count_nonzero(seq_len)), int(seq_len.sum())

    def _engine_stats(self) -> dict:
        t = self.engine.times
        return {"engine_decode_s": t.decode, "engine_capture_s": t.capture, "engine_steps": t.steps}

    async def _configure(self, ch: Channel, meta: dict) -> None:
        async with self._configure_lock:  # one at a time: a fencing decision must not interleave with another
            await self._configure_locked(ch, meta)

    async def _configure_locked(self, ch: Channel, meta: dict) -> None:
        if self.draining:
            ch.reply(meta, {"type": "error", "message": "this stage is shutting down"})
            return
        codec = meta.get("codec", self.codec)
        if codec not in CODECS:
            ch.reply(meta, {"type": "error", "message": f"unknown codec {codec!r}; choose from {', '.join(CODECS)}"})
            return
        gid = meta.get("gateway")
        if gid is not None and (not isinstance(gid, str) or not 0 < len(gid) <= 64):
            ch.reply(meta, {"type": "error", "message": "'gateway' must be a string of 1..64 characters"})
            return
        gid = gid or f"anonymous link {id(ch):x}"  # a gateway that does not name itself: each link is its own
        takeover = meta.get("takeover") is True
        old = self.head if self.head is not None and self.head is not ch and not self.head.closed.is_set() else None
        forced = False
        if old is not None and gid != self.controller:
            if await self._head_alive(old):
                if not takeover:
                    self.stats["refused_configures"] += 1
                    since = datetime.fromtimestamp(self.controller_since, timezone.utc).isoformat(timespec="seconds")
                    if time.monotonic() - self._refusals_logged.get(gid, -1e9) > 60:  # a fenced gateway retries often
                        self._refusals_logged = {gid: time.monotonic()} if len(self._refusals_logged) > 64 \
                            else {**self._refusals_logged, gid: time.monotonic()}
                        log.warning("refused configure from gateway %s (%s): controlled by gateway %s since %s (epoch "
                                    "%d); it retries (logged once a minute)", gid[:16], ch.name,
                                    (self.controller or "?")[:16], since, self.epoch)
                    ch.reply(meta, {"type": "error", "code": "fenced", "epoch": self.epoch, "since": since,
                                    "message": f"stage {self._range()} is controlled by another gateway since {since} "
                                               f"(fencing epoch {self.epoch}); start this gateway with --takeover to "
                                               f"take it over"})
                    return
                forced = True
            if self.draining or ch.closed.is_set():  # changed while the old head was asked
                ch.reply(meta, {"type": "error", "message": "this stage is shutting down"})
                return
        reason = ""
        if gid != self.controller:
            self.epoch += 1
            self.stats["epoch"] = self.epoch
            prev, self.controller, self.controller_since = self.controller, gid, time.time()
            if forced:
                self.stats["takeovers"] += 1
                log.warning("gateway %s (%s) took this stage over from gateway %s (--takeover); fencing epoch %d",
                            gid[:16], ch.name, (prev or "?")[:16], self.epoch)
            elif prev is not None:
                log.info("now controlled by gateway %s (%s); fencing epoch %d", gid[:16], ch.name, self.epoch)
            reason = f"fenced off: another gateway took over this stage (fencing epoch {self.epoch})"
        elif old is not None:
            reason = "replaced by a newer link of the same gateway"
        if self.head is not None and self.head is not ch:
            log.info("a new pipeline head replaces the previous one; forgetting all sequences")
            self._reset_all()
        await self._take_role("gateway", ch, reason)
        self.codec = codec
        if self.info.is_last:
            ch.reply(meta, {"type": "configured", "next": None, "epoch": self.epoch})
            return
        url = self.fixed_next or meta.get("next")
        if url is not None and (not isinstance(url, str) or not url.startswith(("ws://", "wss://"))):
            ch.reply(meta, {"type": "error", "message": "'next' must be a ws:// or wss:// URL"})
            return
        if not url:
            ch.reply(meta, {"type": "error", "message": f"stage {self._range()} is not the last stage and has no next "
                            f"stage (start it with --next or list it in --pipeline)"})
            return
        try:
            await self._connect_next(url)
        except Exception as e:  # noqa: BLE001
            ch.reply(meta, {"type": "error", "message": str(e)})
            return
        ch.reply(meta, {"type": "configured", "next": url, "epoch": self.epoch})

    def _range(self) -> str:
        return f"{self.info.layer_start}-{self.info.layer_stop - 1}"

    async def _head_alive(self, head: Channel) -> bool:
        """Does the connected pipeline head still answer (a WebSocket ping, within HEAD_PING_TIMEOUT)? A gateway
        that crashed or lost its network may still look connected here for a while."""
        try:
            waiter = await head.ws.ping()
            await asyncio.wait_for(waiter, HEAD_PING_TIMEOUT)
            return not head.closed.is_set()
        except Exception:  # noqa: BLE001 - closed, timed out: gone
            return False

    # ------------------------------------------------------------------ the link to the next stage
    async def _connect_next(self, url: str) -> None:
        """Link to the next stage at ``url`` (kept: a lost link is rebuilt by its keeper)."""
        async with self._next_lock:
            if self.next is not None and not self.next.closed.is_set() and self.next_url == url:
                return
            if url != self.next_url:  # another next stage: the keeper of the previous link stops
                self._next_gen += 1
                if self.next is not None:
                    await self.next.close()
            # (the same URL with the link down: its keeper goes on retrying if this dial fails too)
            ch = await self._dial_next(url, NEXT_DIAL_PATIENCE)
            self._set_next(ch, url)

    async def _dial_next(self, url: str, patience: float = 0.0) -> Channel:
        """An authenticated, checked link to the next stage; a busy one (no free slot) is retried for ``patience`` s."""
        deadline = time.monotonic() + patience
        delay = 0.1
        while True:
            try:
                ws = await auth.connect(url, self.key, "upstream", max_size=REPLY_MAX_BYTES)
                break
            except AuthError as e:
                if BUSY in str(e) and time.monotonic() + delay < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise ConnectionError(f"next stage {url}: authentication failed: {e}") from None
            except Exception as e:  # noqa: BLE001
                raise ConnectionError(f"cannot reach next stage {url}: {e}") from None
        ch = Channel(ws, name=f"next stage {url}")
        asyncio.ensure_future(ch.serve(self._handle_from_next))
        try:
            info, _ = await ch.request({"type": "hello"}, timeout=30)
        except (RemoteError, ChannelClosed, asyncio.TimeoutError) as e:
            await ch.close()
            raise ConnectionError(f"next stage {url} did not answer hello: {e or type(e).__name__}") from None
        problem = chain_mismatch(self.describe(), info)
        if problem:
            await ch.close()
            raise ConnectionError(f"next stage {url}: {problem}")
        log.info("forwarding to next stage %s (layers %d-%d)", url, info["layer_start"], info["layer_stop"] - 1)
        return ch

    def _set_next(self, ch: Channel, url: str) -> None:
        """``ch`` is the link to the next stage now; its keeper rebuilds it when it is lost."""
        self._next_gen += 1
        self.next, self.next_url = ch, url
        self._next_since = time.monotonic()
        k = asyncio.ensure_future(self._keep_next(ch, url, self._next_gen))
        self._keepers.add(k)
        k.add_done_callback(self._keepers.discard)

    def _notify_link_down(self, reason: str) -> None:
        """Tell the head (once per lost link) that steps sent to the next stage may be lost."""
        if self._notified_gen == self._next_gen:
            return
        self._notified_gen = self._next_gen
        self._send_head({"type": "link_down", "stage": self._range(), "to": self.next_url, "reason": reason[:300]},
                        None)

    async def _keep_next(self, ch: Channel, url: str, gen: int) -> None:
        """When the link ``ch`` (generation ``gen``) is lost for any reason, tell the head and reconnect to the same
        URL with backoff until it is back, or a configure has linked this stage anew."""
        await ch.closed.wait()
        if self._closing or gen != self._next_gen:
            return
        reason = (f"closed by the next stage ({ch.peer_close_code}: {ch.peer_close_reason})" if ch.peer_close_reason
                  else ch.close_reason or "connection lost")
        self.stats["next_link_losses"] += 1
        log.warning("lost the link to the next stage %s (%s); reconnecting", url, reason)
        self._notify_link_down(reason)
        # a link that broke soon after it was made (two upstreams fighting over the next stage) backs off further
        lived = time.monotonic() - self._next_since
        delay = NEXT_RETRY[0] if lived > 10.0 else min(self._next_delay * 2, NEXT_RETRY[1])
        self._next_delay = delay
        last_err, t_lost, tries = "", time.monotonic(), 0
        while not self._closing:
            await asyncio.sleep(delay)
            async with self._next_lock:
                if gen != self._next_gen or self._closing:
                    return  # a configure linked this stage meanwhile
                tries += 1
                try:
                    new = await self._dial_next(url)
                except ConnectionError as e:
                    if str(e) != last_err or tries % 10 == 0:
                        log.warning("reconnecting to the next stage %s failed (%s); retrying every %.1f s at most",
                                    url, e, NEXT_RETRY[1])
                    last_err = str(e)
                else:
                    self.stats["next_link_reconnects"] += 1
                    log.info("link to the next stage %s is back after %.1f s", url, time.monotonic() - t_lost)
                    self._set_next(new, url)
                    self._send_head({"type": "link_up", "stage": self._range(), "to": url}, None)
                    return
            delay = min(delay * 2, NEXT_RETRY[1])

    async def _probe_next(self, ch: Channel, meta: dict) -> None:
        """Measure the link to the next stage: round-trip time and bandwidth (a small and a large ping)."""
        if self.next is None or self.next.closed.is_set():
            ch.reply(meta, {"type": "probe", "rtt_s": None, "mbit": None})
            return
        asked = meta.get("bytes", 1 << 20)
        asked = asked if isinstance(asked, int) and not isinstance(asked, bool) else 1 << 20
        big = int(min(max(asked, 1 << 14), min(16 << 20, self.limits.max_frame_bytes() // 2)))
        try:
            rtts = []
            for _ in range(3):
                t0 = time.perf_counter()
                await self.next.request({"type": "ping"}, {"pad": np.zeros(16, np.uint8)}, timeout=30)
                rtts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await self.next.request({"type": "ping"}, {"pad": np.zeros(big, np.uint8)}, timeout=60)
            t_big = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            ch.reply(meta, {"type": "error", "message": f"probing the next stage failed: {e}"})
            return
        rtt = min(rtts)
        mbit = big * 8 / 1e6 / max(t_big - rtt, 1e-6)
        ch.reply(meta, {"type": "probe", "rtt_s": rtt, "mbit": mbit})

    async def _handle_from_next(self, ch: Channel, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        if meta.get("type") == "error":
            log.warning("next stage reported: %s", meta.get("message"))

    async def _tokenize(self, ch: Channel, meta: dict) -> None:
        if self.vocab is None or self.vocab.n_vocab <= 1:
            ch.reply(meta, {"type": "error", "message": "this stage has no tokenizer (ask the first stage)"})
            return
        text = meta.get("text")
        if not isinstance(text, str) or len(text) > 4 * self.engine.n_ctx * 8:
            ch.reply(meta, {"type": "error", "message": "tokenize needs a 'text' string (at most 32 x n_ctx characters)"})
            return
        # off the event loop: a long text takes seconds, and heartbeats and steps must keep flowing
        toks = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.vocab.tokenize(text, add_special=bool(meta.get("add_special", True)),
                                              parse_special=bool(meta.get("parse_special", True))))
        ch.reply(meta, {"type": "tokens"}, {"tokens": toks})

    # ------------------------------------------------------------------ the step worker
    def _reset_all(self) -> None:
        for q in self._queues:  # each lane forgets its sequences after the steps queued before
            q.put_nowait(("reset", None, None))

    def _check_lane(self, plan: StepPlan, lane: int) -> None:
        """Every sequence a step names must live in the step's lane (its KV is in that lane's context)."""
        if self.lanes == 1:
            return
        named = set(plan.free) | set(plan.start) | set(plan.trim) | set(plan.drafts)
        if plan.n:
            named.update(np.unique(plan.seq).tolist())
        wrong = sorted(x for x in named if int(x) % self.lanes != lane)
        if wrong:
            raise StepError(f"sequence {wrong[0]} is not in lane {lane} (lanes hold sequence ids modulo {self.lanes})")

    async def _work_loop(self, lane: int = 0) -> None:
        loop = asyncio.get_running_loop()
        queue, pool = self._queues[lane], self._pools[lane]
        while True:
            kind, meta, arrays = await queue.get()
            if kind == "reset":
                await loop.run_in_executor(pool, self._reset, lane)
                continue
            plan: Optional[StepPlan] = None
            try:
                plan = check_step(meta, arrays, self.limits, self._seq_len)
                self._check_lane(plan, lane)
                if plan.drafts and self.samplers is not None:
                    try:
                        self.samplers.check_verifiable(plan.drafts, plan.start, plan.spec)
                    except SamplingError as e:
                        raise StepError(str(e)) from None
                t0 = time.perf_counter()
                out = await loop.run_in_executor(pool, self._run_step, meta, plan)
                t1 = time.perf_counter()
                self.stats["busy_s"] += t1 - t0
                self.timeline.append((meta.get("step"), t0, t1))
                self._deliver(meta, out)
            except StepError as e:  # rejected before anything was applied
                self.stats["rejected_frames"] += 1
                self._report(meta, f"rejected step: {e}")
            except (EngineError, SamplingError) as e:
                self.stats["errors"] += 1
                await loop.run_in_executor(pool, self._forget, plan)
                self._report(meta, str(e))
            except Exception as e:  # noqa: BLE001 - never lose a step silently
                self.stats["errors"] += 1
                log.exception("step %s failed", meta.get("step"))
                await loop.run_in_executor(pool, self._forget, plan)
                self._report(meta, f"internal error in stage {self.info.layer_start}-{self.info.layer_stop - 1}: {e}")
            finally:
                self._in_flight -= 1

    def _reset(self, lane: int = 0) -> None:
        """Forget every sequence of a lane (the pipeline head went away)."""
        self.engine.clear(lane)
        mine = np.arange(self._seq_len.shape[0]) % self.lanes == lane
        self._seq_len[mine] = 0
        if self.samplers is not None:
            for s in list(self.samplers._by_seq):
                if s % self.lanes == lane:
                    self.samplers.drop(s)

    def _free(self, s: int) -> None:
        self.engine.free(s)
        self._seq_len[s] = 0
        if self.samplers is not None:
            self.samplers.drop(s)
            self.detok.drop(s)

    def _forget(self, plan: Optional[StepPlan]) -> None:
        """After a failed step: drop its sequences here, so a half-written KV entry cannot outlive it."""
        if plan is not None and plan.n:
            for s in np.unique(plan.seq).tolist():
                self._free(int(s))

    def _run_step(self, meta: dict, plan: StepPlan) -> Tuple[dict, object]:
        """Runs in the llama thread: free, start samplers, forward, then encode or sample (``plan`` is checked)."""
        for s in plan.free:
            self._free(s)
            self.stats["frees"] += 1
        for s, p in plan.trim.items():  # rejected speculative drafts leave the KV before anything runs
            if p < self._seq_len[s]:
                self.engine.trim(s, p)
                self._seq_len[s] = p
                self.stats["trims"] += 1
        if self.samplers is not None:
            for s, (params, history) in plan.start.items():  # history: a replayed sequence's earlier tokens
                self.samplers.start(s, params, history, spec=s in plan.spec)
                self.detok.start(s, history)
        seq, pos, n = plan.seq, plan.pos, plan.n
        fwd_meta = {k: v for k, v in meta.items() if k not in ("rid",)}
        if n == 0:
            return fwd_meta, None
        self.stats["steps"] += 1
        self.stats["rows"] += n
        self.stats["max_seqs_in_step"] = max(self.stats["max_seqs_in_step"], int(plan.run_starts.shape[0]))
        out_rows = plan.out
        res = self.engine.forward(seq, pos, tokens=plan.tokens, hidden=plan.hidden, output_rows=out_rows)
        self._seq_len[seq[plan.run_ends]] = pos[plan.run_ends] + 1
        if not self.info.is_last:
            send = {"seq": seq, "pos": pos, "hidden": res}
            if out_rows is not None:
                send["out"] = out_rows.astype(np.uint8)
            return fwd_meta, encode_frame(fwd_meta, send, codec=self.codec)
        # last stage: sample one token per output row
        mask = last_row_of_each_seq(seq) if out_rows is None else out_rows
        seqs = seq[mask]
        if plan.drafts:
            seqs, tokens = self.samplers.sample_verify(seqs, res, plan.drafts, pos[mask], self.engine.last_sampled)
            k = sum(int(d.shape[0]) for d in plan.drafts.values())
            self.stats["drafted"] += k
            # a sequence with k drafts has k+1 output rows and gets acc+1 tokens
            self.stats["accepted"] += int(tokens.shape[0]) - int(mask.sum()) + k
        else:
            tokens = self.samplers.sample(seqs, res, pos[mask], self.engine.last_sampled)
        eog = self.vocab.is_eog(tokens)
        pieces = self.detok.pieces(seqs, tokens, eog)
        return fwd_meta, (seqs, tokens, eog, pieces)

    def _deliver(self, meta: dict, out: object) -> None:
        if self.info.is_last:
            if self.head is None:
                log.warning("step %s finished but no pipeline head is connected", meta.get("step"))
                return
            res = {"type": "result", "step": meta.get("step")}
            if out[1] is None:
                self._send_head(res, {"seq": np.zeros(0, np.int32), "tokens": np.zeros(0, np.int32)})
                return
            seqs, tokens, eog, pieces = out[1]
            res["pieces"] = pieces
            self._send_head(res, {"seq": seqs.astype(np.int32), "tokens": tokens, "eog": eog.astype(np.uint8)})
            return
        _, data = out
        if data is None:  # an empty step (only frees): forward as is
            data = encode_frame(meta, {"seq": np.zeros(0, np.int32), "pos": np.zeros(0, np.int32)})
        if self.next is None or self.next.closed.is_set():
            raise_msg = f"stage {self._range()} has no connection to the next stage"
            if self.next is not None:  # lost: the head hears of it before this step's error
                self._notify_link_down(self.next.close_reason or "connection lost")
            self._report(meta, raise_msg)
            return
        try:
            self.next.send_bytes(data)
        except ChannelClosed as e:
            self._notify_link_down(str(e))
            self._report(meta, str(e))

    def _send_head(self, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        if self.head is None:
            return
        try:
            self.head.send(meta, arrays)
        except ChannelClosed:
            log.warning("pipeline head went away")

    def _report(self, meta: dict, message: str) -> None:
        log.warning("step %s: %s", meta.get("step"), message)
        self._send_head({"type": "step_error", "step": meta.get("step"), "message": message,
                         "stage": f"{self.info.layer_start}-{self.info.layer_stop - 1}"}, None)


def _address_key(peer: object) -> str:
    """The address a connection counts against: its IP (IPv6: its /64, what one host usually holds)."""
    host = peer[0] if isinstance(peer, (tuple, list)) and peer else peer
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


async def _close_quickly(ws, code: int, reason: str) -> None:
    """Close with ``code``/``reason`` but do not wait long for a silent peer's answer (then drop the socket)."""
    try:
        await asyncio.wait_for(ws.close(code, reason), 1.0)
    except Exception:  # noqa: BLE001 - closing is best effort
        pass
    transport = getattr(ws, "transport", None)
    if transport is not None and not transport.is_closing():
        transport.abort()


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def chain_mismatch(prev: dict, nxt: dict) -> Optional[str]:
    """Why stage ``nxt`` cannot follow stage ``prev``, or None if it can."""
    if nxt.get("protocol") != PROTOCOL_VERSION:
        return f"protocol version {nxt.get('protocol')} differs from {PROTOCOL_VERSION}"
    if nxt.get("fingerprint") != prev.get("fingerprint"):
        return (f"holds a different model (fingerprint {nxt.get('fingerprint')} vs {prev.get('fingerprint')}, "
                f"{nxt.get('model')} vs {prev.get('model')})")
    if nxt.get("layer_start") != prev.get("layer_stop"):
        if nxt["layer_start"] > prev["layer_stop"]:
            return f"gap: layers {prev['layer_stop']}-{nxt['layer_start'] - 1} are served by no stage"
        return f"overlap: layers {nxt['layer_start']}-{prev['layer_stop'] - 1} are served twice"
    if nxt.get("n_embd_inp") != prev.get("n_embd"):
        return f"hidden width {prev.get('n_embd')} does not match the next stage's input width {nxt.get('n_embd_inp')}"
    return None


async def run_stage(engine: StageEngine, host: str, port: int, next_url: Optional[str], codec: str,
                    ready_file: Optional[str] = None, key: Optional[LinkKey] = None,
                    tls: Optional[Tuple[str, str]] = None, drain_timeout: float = 30.0,
                    on_listen: Optional[Callable[[int], Awaitable[None]]] = None,
                    metrics: Optional[Tuple[str, int]] = None) -> None:
    """Serve a stage until cancelled or drained; optionally write the bound port to ``ready_file``.

    ``metrics``: (host, port) of the stage's own Prometheus endpoint (:mod:`molink_lite.stage.metrics`).

    SIGTERM (SIGBREAK on Windows) drains: the gateway is told to move this pipeline's sequences
    elsewhere, and the stage exits once it has let go (at most ``drain_timeout`` seconds); a second
    signal exits at once.
    """
    server = StageServer(engine, host=host, port=port, next_url=next_url, codec=codec, key=key, tls=tls)
    stop_metrics: Optional[Callable[[], None]] = None
    if metrics is not None:
        from .metrics import serve_metrics

        try:
            stop_metrics = serve_metrics(server, *metrics)
        except OSError as e:
            raise OSError(e.errno, f"metrics port {metrics[0]}:{metrics[1]}: {e.strerror or e}") from None
    try:
        await server.start()
    except BaseException:
        if stop_metrics is not None:
            stop_metrics()
        raise
    loop = asyncio.get_running_loop()
    restore = _on_stop_signals(lambda: loop.call_soon_threadsafe(server.begin_drain, drain_timeout))
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(str(server.port))
    try:
        if on_listen is not None:  # e.g. tell the gateway this joined stage now serves
            await on_listen(server.port)
        await server.drained.wait()
        log.info("stage drained; exiting")
    finally:
        restore()
        if stop_metrics is not None:
            stop_metrics()
        await server.close()


def _on_stop_signals(callback) -> "Callable[[], None]":
    """Run ``callback`` on SIGTERM/SIGBREAK (portable: signal.signal, main thread only); returns an undo."""
    import signal

    old = {}
    for name in ("SIGTERM", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: callback())
        except (ValueError, OSError):  # not the main thread
            pass

    def restore() -> None:
        for sig, handler in old.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
    return restore


__all__ = ["StageServer", "run_stage", "chain_mismatch", "RemoteError"]
