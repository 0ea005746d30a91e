"""WebSocket stage server: the connections of one stage, which runs one layer range of a model.

The frames are :mod:`molink_lite.wire.protocol` (their types, and what each role may send) over
:mod:`molink_lite.wire.codec`. What the server does with them:

* A connection first gets a slot (:mod:`molink_lite.stage.conn_slots`: a flood of unanswered handshakes cannot
  lock a gateway out), then passes the cluster-secret handshake (:mod:`molink_lite.wire.auth`) and declares its
  role: ``gateway`` (may configure the stage and drive it) or ``upstream`` (the previous stage). Nothing else
  is read before that, and a role may send only its :data:`~molink_lite.wire.protocol.ROLE_FRAMES`. A new
  upstream link replaces the previous one.
* ``configure``: the sending gateway's link becomes the pipeline head if fencing lets it
  (:mod:`molink_lite.stage.fencing`); a new head makes the stage forget every sequence. A stage that is not the
  last links to the next stage (:mod:`molink_lite.stage.next_link`, which also tells the head ``link_down`` /
  ``link_up``).
* ``step``: taken from the head on the first stage and from the upstream stage on the others, and run by the
  :class:`~molink_lite.stage.runner.StepRunner` (in arrival order per lane). The forwarded step goes to the next
  stage, the last stage's ``result`` to the head; a step that cannot run gets a ``step_error`` to the head
  (nothing of a rejected frame is applied).
* ``hello`` (-> :class:`~molink_lite.wire.protocol.StageHello`), ``tokenize`` and ``detokenize`` (a stage with a
  vocabulary), ``grammar_check`` (the last stage compiles a GBNF grammar as a sampler would), ``stats``,
  ``ping`` and ``probe_next`` are answered on the same connection.
* ``release`` (the head, for a model idle for ``--idle-unload``; :mod:`molink_lite.serving.idle`): with no
  sequence here, the stage frees its llama.cpp model and context (memory back to the host) and keeps its
  process, port, links and layer file; steps and vocabulary requests get a clear error meanwhile, ``hello``
  answers as before. ``restore`` loads the same file with the same settings again.
* :meth:`StageServer.begin_drain` (SIGTERM) asks the head to move this pipeline's sequences away (``drain``).
"""

from __future__ import annotations

import llama_cpp  # noqa: F401,I001 - before numpy

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import websockets

from ..model.archs import vision_support
from ..model.gguf_meta import GGUFFile, GGUFFormatError
from ..model.vocab import Vocab
from ..wire import auth
from ..wire.auth import AuthError, LinkKey
from ..wire.channel import Channel, ChannelClosed
from ..wire.media import MediaPut, media_id
from ..wire.protocol import (CONFIGURE, CONFIGURED, DETOKENIZE, ERROR, GRAMMAR_CHECK, HELLO, INFO, MEDIA, PING,
                             PROBE_NEXT, PROTOCOL_VERSION, RELEASE, RELEASED, RESTORE, RESTORED, RING_STOP,
                             ROLE_FRAMES, STATS, STEP, TOKENIZE, Configure, Drain, ProtocolError, ResultFrame, RingStop,
                             StageHello, StepErrorFrame, StepFrame, ring_mismatch)
from ..wire.tls import fingerprint_file, server_context
from .conn_slots import (BUSY, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS, MAX_HANDSHAKES,
                         MAX_HANDSHAKES_PER_ADDRESS, ConnSlots, address_key, close_quickly)
from .engine import EngineError, StageEngine
from .fencing import Fencing
from .grammar import GrammarError
from .hostinfo import devices, process_rss
from .next_link import NextLink
from . import step_costs
from .runner import StepRunner, step_of
from .vision import MediaStore, Projector

log = logging.getLogger(__name__)


class StageServer:
    """Serves one :class:`StageEngine` over WebSockets: connections, roles, and what each frame leads to."""

    def __init__(self, engine: StageEngine, *, host: str = "127.0.0.1", port: int = 9001,
                 next_url: Optional[str] = None, codec: str = "f16", key: Optional[LinkKey] = None,
                 tls: Optional[Tuple[str, str]] = None, max_connections: int = MAX_CONNECTIONS,
                 max_handshakes: int = MAX_HANDSHAKES, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
                 max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS,
                 mmproj: Optional[str] = None, image_min_tokens: int = 0, image_max_tokens: int = 0):
        self.engine = engine
        self._given_engine = engine   # the caller's (it closes it); one loaded again after a release is closed here
        self.info = engine.info
        self.stage = f"{self.info.layer_start}-{self.info.layer_stop - 1}"
        self.host, self.port = host, port
        self.fixed_next = next_url
        self.key, self.tls = key, tls
        self.cert_fp = fingerprint_file(tls[0]) if tls else ""
        self.handshake_timeout = handshake_timeout
        self.lanes = engine.lanes
        # one dict of counters (the ``stats`` reply); the slots, runner, link and fencing add their own
        self.stats: Dict[str, float] = {"refused_links": 0, "busy_refusals": 0}
        self.slots = ConnSlots(self.stats, max_connections=max_connections, max_handshakes=max_handshakes,
                               max_connections_per_address=max_connections_per_address,
                               max_handshakes_per_address=max_handshakes_per_address)
        self.vocab = Vocab(engine.model_ptr) if (self.info.is_first or self.info.is_last) else None
        # a vision projector (first stage only): images become embedding rows here (stage/vision.py)
        if mmproj and not self.info.is_first:
            raise EngineError(f"--mmproj goes to the first stage (this one holds layers {self.stage})")
        self._vision_args = (mmproj, image_min_tokens, image_max_tokens)
        self.projector: Optional[Projector] = None
        self.media = MediaStore() if mmproj else None
        self.step_costs: List[Tuple[int, float]] = []   # (rows, seconds) of a step here (measure_step_costs)
        # images are encoded one at a time in a thread of their own: a burst of them queues here, not in the default
        # executor that tokenization and detokenization share
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtmd") if mmproj else None
        self._load_projector()
        self.runner = self._runner(engine, codec)
        self.timeline = self.runner.timeline
        self.link = NextLink(key, self.stats, self.stage, self.describe, self._send_head)
        # closing the ring (stage/ring.py): the last stage's link to the first stage, when the gateway asks for one
        # (a single stage takes its own rounds); the first stage's peer on that link
        self.ring = (NextLink(key, self.stats, self.stage, self.describe, self._send_head, role="ring",
                              check=ring_mismatch, what="first")
                     if self.info.is_last and not self.info.is_first else None)
        self.ring_on = False
        self.ring_peer: Optional[Channel] = None
        self.fencing = Fencing(self.stats, self.stage)
        self.head: Optional[Channel] = None
        self.upstream: Optional[Channel] = None
        self._server = None
        self.draining = False
        self.drained = asyncio.Event()
        self.released = False              # the model and context are freed (an idle model; ``restore`` loads them)
        self._hello: Optional[StageHello] = None   # what ``hello`` answers while released
        self._memory_lock = asyncio.Lock()  # one release or restore at a time

    def _runner(self, engine: StageEngine, codec: str) -> StepRunner:
        r = StepRunner(engine, self.vocab, self.stats, codec=codec, deliver=self._deliver, report=self._report,
                       ring_out=self._ring_out if self.info.is_last else None, ring_ready=self._ring_ready)
        r.media = self.media
        return r

    def _load_projector(self) -> None:
        path, lo, hi = self._vision_args
        if not path:
            return
        e = self.engine
        try:
            ptype = str(GGUFFile(path).value("clip.projector_type") or "?")
        except (OSError, GGUFFormatError) as err:
            raise EngineError(f"--mmproj {path}: not a readable GGUF ({err})") from None
        good, why = vision_support(ptype)
        if not good:
            raise EngineError(why)
        if self.info.n_embd_inp != self.info.n_embd:
            raise EngineError(f"{path}: this model's image rows are {self.info.n_embd_inp} wide for {self.info.n_embd}"
                              " hidden (Qwen3-VL's deepstack feeds later layers); molink-lite does not split that")
        self.projector = Projector(path, e.model_ptr, self.info.n_embd_inp, use_gpu=bool(e.n_gpu_layers),
                                   n_threads=e.init_kwargs.get("n_threads") or os.cpu_count() or 1,
                                   image_min_tokens=lo, image_max_tokens=hi)
        log.info("vision projector %s loaded (%s)", path, "M-RoPE" if self.projector.mrope else "1-D positions")

    # ------------------------------------------------------------------ identity
    def describe(self) -> StageHello:
        i, e = self.info, self.engine
        d: StageHello = {
            "type": INFO, "protocol": PROTOCOL_VERSION, "arch": i.model_arch or i.arch, "fingerprint": i.fingerprint,
            "layer_start": i.layer_start, "layer_stop": i.layer_stop, "n_layer_total": i.n_layer_total,
            "n_embd": i.n_embd, "n_embd_inp": i.n_embd_inp, "n_vocab": i.n_vocab, "n_ctx": e.n_ctx,
            "max_seqs": e.n_seq_max, "n_batch": e.n_batch, "max_rows": self.runner.limits.max_rows, "model": i.path,
            "name": i.name, "next": self.link.url, "codec": self.runner.codec, "host": socket.gethostname(),
            "backend": self.backend(), "n_gpu_layers": e.n_gpu_layers, "model_bytes": _file_size(i.path),
            "lanes": self.lanes, "n_ctx_lane": e.n_ctx_lane, "prefix_reuse": e.prefix_reuse,
            "stage_output": e.stage_output}
        if self.step_costs:
            d["step_costs"] = [[n, round(s, 6)] for n, s in self.step_costs]
        if self.projector is not None:
            d["vision"] = {**self.projector.describe(), "max_bytes": self._max_image_bytes()}
        if self.vocab is not None:
            d.update(chat_template=self.vocab.chat_template, bos=self.vocab.token_text(self.vocab.bos),
                     eos=self.vocab.token_text(self.vocab.eos), add_bos=self.vocab.add_bos)
        return d

    def measure_step_costs(self, budget_s: float) -> None:
        """What a step of 1, 2, ... rows costs here (stage/step_costs.py), for the hello: before serving only."""
        log.info("measuring what a step costs by rows (at most %.1f s)", budget_s)
        try:
            self.step_costs = step_costs.measure(self.engine, budget_s)
        except Exception as e:  # noqa: BLE001 - the gateway then fits the costs it observes
            log.warning("could not measure step costs: %s", e)
            self.step_costs = []
            return
        log.info("step ms by rows: %s", step_costs.summary(self.step_costs))

    def backend(self) -> str:
        """Where the layers run: 'cpu', or the GPU devices llama.cpp offloads to (e.g. 'CUDA0')."""
        if not self.engine.n_gpu_layers:
            return "cpu"
        gpus = [d["name"] for d in devices() if d["type"] in ("gpu", "igpu")]
        return ",".join(gpus) or "gpu"

    def kv_usage(self) -> Tuple[int, int]:
        """(sequences holding KV here, KV positions they hold)."""
        return self.runner.kv_usage()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.runner.start()
        ssl_ctx = server_context(*self.tls) if self.tls else None
        self._server = await websockets.serve(self._on_connect, self.host, self.port,
                                              max_size=self.runner.limits.max_frame_bytes() + auth.SEAL_OVERHEAD,
                                              compression=None, ping_interval=20, ping_timeout=60, ssl=ssl_ctx)
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        log.info("stage layers %s of %d (%s) listening on %s://%s:%d (%s%s)", self.stage, self.info.n_layer_total,
                 self.info.arch, "wss" if ssl_ctx else "ws", self.host, self.port,
                 "cluster secret required" if self.key else "NO authentication",
                 f", TLS certificate sha256 {self.cert_fp}" if ssl_ctx else "")

    async def close(self) -> None:
        self.link.stop()
        if self.ring is not None:
            await self.ring.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.runner.close()
        if self._encoder is not None:
            self._encoder.shutdown(wait=False, cancel_futures=True)
        if self.projector is not None:
            self.projector.close()
        if self.engine is not self._given_engine:
            self.engine.close()
        await self.link.close()
        for ch in (self.head, self.upstream):
            if ch is not None:
                await ch.close()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.close()

    def begin_drain(self, timeout: float = 30.0) -> None:
        """Ask the gateway to move this pipeline's sequences away; ``drained`` is set once it let go."""
        if self.draining or self.head is None:
            self.draining = True
            self.drained.set()  # nothing to hand over (or a second signal): go now
            return
        self.draining = True
        log.warning("draining: asking the gateway to move this pipeline's sequences (at most %.0f s)", timeout)
        self._send_head(Drain().to_meta())
        asyncio.get_running_loop().call_later(timeout, self.drained.set)

    # ------------------------------------------------------------------ connections
    async def _on_connect(self, ws) -> None:
        peer = ws.remote_address
        rec, refused = self.slots.enter(address_key(peer))
        if rec is None:
            self.stats["refused_links"] += 1
            self.stats["busy_refusals"] += 1
            self.slots.log_busy("refused a connection from %s: %s (%s)", peer, BUSY, refused)
            await close_quickly(ws, auth.CLOSE_BUSY, f"{BUSY} ({refused}); retry later")
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
                self.slots.log_busy("dropped the pending connection from %s (%.1f s without answering the "
                                    "challenge) to make room for a newer one", peer, time.monotonic() - rec.t0)
                await close_quickly(ws, auth.CLOSE_BUSY, f"{BUSY}: this unanswered handshake's slot went to a newer "
                                                         f"connection; retry")
                return
            self.slots.unpend(rec)
            try:
                role, link = hs.result()
            except (AuthError, websockets.exceptions.WebSocketException, OSError) as e:
                self.stats["refused_links"] += 1
                log.warning("refused a connection from %s: authentication failed: %s", peer, e)
                await close_quickly(ws, auth.CLOSE_AUTH, f"authentication failed: {e}"[:120])
                return
            if role not in ROLE_FRAMES:
                await ws.close(auth.CLOSE_AUTH, f"a {role} link cannot talk to a stage")
                return
            ch = Channel(link, name=f"{role} {peer}")
            ch.role = role
            if role in ("upstream", "ring"):
                self._take_role(role, ch)
            await ch.serve(self._handle)
            if ch is self.head:
                log.warning("pipeline head disconnected (%s); forgetting all sequences", ch.close_reason)
                self.head = None
                self.runner.reset_all()
                if self.draining:
                    self.drained.set()
            if ch is self.upstream:
                self.upstream = None
            if ch is self.ring_peer:
                self.ring_peer = None
        finally:
            if not hs.done():
                hs.cancel()
            self.slots.release(rec)

    def _take_role(self, role: str, ch: Channel, reason: str = "") -> None:
        """``ch`` becomes the head (gateway), the upstream stage or the ring peer (the last stage, on the first); a
        previous holder is disconnected."""
        attr = {"gateway": "head", "upstream": "upstream", "ring": "ring_peer"}[role]
        old = getattr(self, attr)
        setattr(self, attr, ch)
        if old is not None and old is not ch:
            log.info("a new %s connection (%s) replaces %s", role, ch.name, old.name)
            asyncio.ensure_future(old.close(auth.CLOSE_REPLACED, reason or f"another {role} took over this stage"))

    async def _handle(self, ch: Channel, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        kind = meta.get("type")
        if not isinstance(kind, str) or kind not in ROLE_FRAMES[ch.role]:
            self.stats["rejected_frames"] += 1
            ch.reply(meta, _error(f"a {ch.role} link may not send {str(kind)[:40]!r} frames"))
        elif self.released and kind in (TOKENIZE, DETOKENIZE, GRAMMAR_CHECK, MEDIA):
            ch.reply(meta, _error(self._released_why()))
        elif kind in (RELEASE, RESTORE):
            if ch is not self.head:
                self.stats["rejected_frames"] += 1
                ch.reply(meta, _error(f"only the pipeline head may {kind} a stage"))
                return
            async with self._memory_lock:
                ch.reply(meta, await (self._release() if kind == RELEASE else self._restore()))
        elif kind == STEP and ch.role == "ring":
            if not self.info.is_first or ch is not self.ring_peer:
                self.stats["rejected_frames"] += 1
                ch.reply(meta, _error("ring rounds go to the first stage, from its ring link"))
            elif self.released:
                self._report(step_of(meta), self._released_why())
            else:
                self.runner.submit(meta, arrays, ring=True)
        elif kind == RING_STOP:
            if ch is not self.head or self.runner.turn is None:
                self.stats["rejected_frames"] += 1
                ch.reply(meta, _error("ring_stop goes from the pipeline head to the last stage"))
                return
            try:
                stop = RingStop.decode(meta, self.engine.n_seq_max)
            except ProtocolError as e:
                ch.reply(meta, _error(str(e)))
                return
            self.runner.turn.stop(stop.step, stop.seqs)
        elif kind == STEP:
            if ch is not (self.head if self.info.is_first else self.upstream):
                self.stats["rejected_frames"] += 1
                ch.reply(meta, _error("steps are taken only from the pipeline head (first stage) or the upstream "
                                      "stage"))
                return
            if self.released:
                self._report(step_of(meta), self._released_why())
                return
            self.runner.submit(meta, arrays)
        elif kind == HELLO:
            ch.reply(meta, self._hello if self.released and self._hello is not None else self.describe())
        elif kind == CONFIGURE:
            async with self.fencing.lock:  # one at a time: a fencing decision must not interleave with another
                ch.reply(meta, await self._configure(ch, meta))
        elif kind == MEDIA:
            await self._media(ch, meta, arrays)
        elif kind == TOKENIZE:
            await self._tokenize(ch, meta)
        elif kind == DETOKENIZE:
            await self._detokenize(ch, meta, arrays)
        elif kind == GRAMMAR_CHECK:
            await self._grammar_check(ch, meta)
        elif kind == STATS:
            live, positions = self.kv_usage()
            t = self.engine.times
            ch.reply(meta, {"type": STATS, **self.stats, "engine_decode_s": t.decode, "engine_capture_s": t.capture,
                            "engine_steps": t.steps, "engine_graphs_reused": self.engine.graphs_reused(),
                            "timeline": list(self.timeline), "live_seqs": live,
                            "codec": self.runner.codec,
                            "kv_positions": positions, "rss_bytes": process_rss()})
        elif kind == PING:
            ch.reply(meta, {"type": "pong", "bytes": sum(int(a.nbytes) for a in arrays.values())})
        elif kind == PROBE_NEXT:
            ch.reply(meta, await self.link.probe(meta.get("bytes", 1 << 20),
                                                 self.runner.limits.max_frame_bytes() // 2))
        elif kind == ERROR:
            log.warning("peer reported: %s", meta.get("message"))

    async def _configure(self, ch: Channel, meta: dict) -> dict:
        """The reply to ``configure`` (under the fencing lock)."""
        if self.draining:
            return _error("this stage is shutting down")
        try:
            req = Configure.decode(meta, self.runner.codec)
        except ProtocolError as e:
            return _error(str(e))
        gid = req.gateway or f"anonymous link {id(ch):x}"  # a gateway that does not name itself: each link is its own
        old = self.head if self.head is not None and self.head is not ch and not self.head.closed.is_set() else None
        refusal, forced = await self.fencing.admit(gid, req.takeover, ch, old)
        if refusal is not None:
            return refusal
        if self.draining or ch.closed.is_set():  # changed while the old head was asked
            return _error("this stage is shutting down")
        reason = self.fencing.take(gid, ch, forced, replacing=old is not None)
        if self.head is not None and self.head is not ch:
            log.info("a new pipeline head replaces the previous one; forgetting all sequences")
            self.runner.reset_all()
        self._take_role("gateway", ch, reason)
        self.runner.codec = req.codec
        if self.info.is_last:
            ring, why = await self._configure_ring(req.ring)
            return {"type": CONFIGURED, "next": None, "epoch": self.fencing.epoch, "ring": ring, "ring_why": why}
        url = self.fixed_next or req.next
        if not url:
            return _error(f"stage {self.stage} is not the last stage and has no next stage (start it with --next or "
                          f"list it in --pipeline)")
        try:
            await self.link.connect(url)
        except Exception as e:  # noqa: BLE001
            return _error(str(e))
        return {"type": CONFIGURED, "next": url, "epoch": self.fencing.epoch}

    async def _configure_ring(self, url: Optional[str]) -> Tuple[bool, str]:
        """The last stage links to the first stage at ``url`` for ring rounds (a single stage takes its own);
        (whether the ring is on, why not)."""
        if not url:
            self.ring_on = False
            if self.ring is not None:
                await self.ring.drop()
            return False, "not asked for"
        if self.ring is not None:
            try:
                await self.ring.connect(url)
            except Exception as e:  # noqa: BLE001 - the gateway serves without the ring and says why
                self.ring_on = False
                log.warning("no ring: %s", e)
                return False, str(e)[:300]
        self.ring_on = True
        return True, ""

    def _ring_ready(self) -> bool:
        return self.ring_on and (self.ring is None or self.ring.up)

    def _ring_out(self, frame: StepFrame) -> None:
        """The next ring round: to the first stage's ring link (a single stage runs it itself)."""
        if self.ring is None:
            meta, arrays = frame.to_wire()
            self.runner.submit(meta, arrays, ring=True)
            return
        problem = self.ring.send(frame.encode("f32")) if self.ring_on else "the ring is off"
        if problem:
            self._report(frame.step, problem)

    # ------------------------------------------------------------------ idle models: release and restore
    def _released_why(self) -> str:
        return f"stage {self.stage} released its model for being idle; the gateway restores it before sending work"

    async def _release(self) -> dict:
        """Free the model and context, and with them every sequence's KV (the gateway asks only when none of its
        sequences runs, and forgets its cached prefixes); the reply says the memory now held."""
        if self.released:
            return {"type": RELEASED, "rss_bytes": process_rss()}
        if self.runner.in_flight:
            return _error(f"stage {self.stage} is busy ({self.runner.in_flight} steps): not released")
        before = process_rss()
        self._hello = {**self.describe(), "released": True}
        self.released = True   # from now on steps and vocabulary requests are refused
        loop = asyncio.get_running_loop()
        await self.runner.stop()   # its llama threads end (no step runs)
        self.vocab = None
        if self.projector is not None:
            self.projector.close()
            self.projector = None
            self.media.clear()
        await loop.run_in_executor(None, self.engine.close)
        rss = process_rss()
        log.info("released the model of layers %s for being idle: resident memory %.0f -> %.0f MiB", self.stage,
                 before / 2**20, rss / 2**20)
        return {"type": RELEASED, "rss_bytes": rss, "rss_before": before}

    async def _restore(self) -> dict:
        """Load the released model again (same file, same settings); the reply says how long it took."""
        if not self.released:
            return {"type": RESTORED, "seconds": 0.0, "rss_bytes": process_rss()}
        t0 = time.perf_counter()
        old = self.engine
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(None, lambda: type(old)(old.path, **old.init_kwargs))
        except Exception as e:  # noqa: BLE001 - the file went away, memory is short: say so, stay released
            log.error("could not load layers %s again: %s", self.stage, e)
            return _error(f"stage {self.stage} could not load its model again: {e}")
        self.engine = engine
        self.vocab = Vocab(engine.model_ptr) if (self.info.is_first or self.info.is_last) else None
        try:
            await loop.run_in_executor(None, self._load_projector)
        except Exception as e:  # noqa: BLE001
            log.error("could not load the vision projector again: %s", e)
        codec = self.runner.codec
        self.runner = self._runner(engine, codec)
        self.timeline = self.runner.timeline
        self.runner.start()
        self.released = False
        took = time.perf_counter() - t0
        log.info("layers %s loaded again in %.2f s", self.stage, took)
        return {"type": RESTORED, "seconds": round(took, 3), "rss_bytes": process_rss()}

    def _max_image_bytes(self) -> int:
        """The largest image a ``media`` frame may carry: a frame this stage takes, less room for its header."""
        return self.runner.limits.max_frame_bytes() - (64 << 10)

    async def _media(self, ch: Channel, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        """An image from the pipeline head: encoded by the projector (off the event loop), its rows kept in the
        media store; the reply is its :class:`~molink_lite.wire.media.MediaLayout` (at once if already stored)."""
        if ch is not self.head:
            self.stats["rejected_frames"] += 1
            ch.reply(meta, _error("images come from the pipeline head"))
            return
        if self.projector is None or self.media is None:
            ch.reply(meta, _error(f"stage {self.stage} has no vision projector (start the first stage with --mmproj)"))
            return
        try:
            put = MediaPut.decode(arrays, self._max_image_bytes())
            lay = self.media.layout(media_id(put.data))
            if lay is None:
                t0 = time.perf_counter()
                lay, rows = await asyncio.get_running_loop().run_in_executor(self._encoder, self.projector.encode,
                                                                             put.data)
                self.media.put(lay, rows)
                self.stats["image_encode_s"] = self.stats.get("image_encode_s", 0.0) + time.perf_counter() - t0
        except (ProtocolError, EngineError) as e:
            ch.reply(meta, _error(f"image refused: {e}"))
            return
        ch.reply(meta, lay.to_wire())

    async def _tokenize(self, ch: Channel, meta: dict) -> None:
        if self.vocab is None or self.vocab.n_vocab <= 1:
            ch.reply(meta, _error("this stage has no tokenizer (ask the first stage)"))
            return
        text = meta.get("text")
        if not isinstance(text, str) or len(text) > 4 * self.engine.n_ctx * 8:
            ch.reply(meta, _error("tokenize needs a 'text' string (at most 32 x n_ctx characters)"))
            return
        # off the event loop: a long text takes seconds, and heartbeats and steps must keep flowing
        toks = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.vocab.tokenize(text, add_special=bool(meta.get("add_special", True)),
                                              parse_special=bool(meta.get("parse_special", True))))
        ch.reply(meta, {"type": "tokens"}, {"tokens": toks})

    async def _detokenize(self, ch: Channel, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        """Token ids (``tokens``: a list in the request or an integer array) -> ``{"type": "text", "text"}``; with
        ``"pieces": true`` also each token's raw bytes (special tokens rendered) as hex, and with
        ``"special": true`` special tokens are rendered in the text too."""
        if self.vocab is None or self.vocab.n_vocab <= 1:
            ch.reply(meta, _error("this stage has no vocabulary (ask the first or the last stage)"))
            return
        toks = arrays.get("tokens") if "tokens" in arrays else meta.get("tokens")
        limit = 8 * self.engine.n_ctx
        n_vocab = self.vocab.n_vocab
        if isinstance(toks, np.ndarray):
            ok = toks.ndim == 1 and np.issubdtype(toks.dtype, np.integer) and toks.shape[0] <= limit and (
                toks.size == 0 or (int(toks.min()) >= 0 and int(toks.max()) < n_vocab))
        else:
            ok = isinstance(toks, list) and len(toks) <= limit and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in toks)
        if not ok:
            ch.reply(meta, _error(f"detokenize needs 'tokens': at most {limit} token ids in 0..{n_vocab - 1}"))
            return
        ids = np.asarray(toks, dtype=np.int32)
        special, pieces = meta.get("special") is True, meta.get("pieces") is True

        def work() -> dict:
            out = {"type": "text", "text": self.vocab.detokenize(ids, special=special)}
            if pieces:
                out["pieces"] = self.vocab.token_hex(ids)
            return out
        ch.reply(meta, await asyncio.get_running_loop().run_in_executor(None, work))

    async def _grammar_check(self, ch: Channel, meta: dict) -> None:
        """Compile ``grammar`` (GBNF, root rule ``root``) with ``triggers`` as a sequence's sampler would (in the
        stage's grammar sandbox, :class:`~molink_lite.stage.grammar.GrammarSandbox`): ``{"type": "grammar_ok"}`` or
        an error reply (``code`` ``grammar``) with llama.cpp's message."""
        box = self.runner.grammar_sandbox
        if not self.info.is_last or box is None:
            ch.reply(meta, _error("grammar_check goes to the last stage"))
            return
        grammar, triggers = meta.get("grammar"), meta.get("triggers") or []
        if not isinstance(grammar, str):
            ch.reply(meta, _error("grammar_check needs a 'grammar' string (GBNF)"))
            return
        try:  # off the event loop: a large grammar takes a while to compile
            await asyncio.get_running_loop().run_in_executor(None, box.check, grammar, triggers)
        except GrammarError as e:
            ch.reply(meta, {**_error(str(e)), "code": "grammar"})
            return
        ch.reply(meta, {"type": "grammar_ok"})

    # ------------------------------------------------------------------ what steps give
    def _deliver(self, frame: StepFrame, out: Union[bytes, ResultFrame]) -> None:
        """A step's outcome: the last stage's result to the head, the forwarded step to the next stage."""
        if isinstance(out, ResultFrame):
            if self.head is None:
                log.warning("step %s finished but no pipeline head is connected", frame.step)
                return
            try:  # logprobs travel as float32 whatever the hidden-state codec
                self.head.send_bytes(out.encode())
            except ChannelClosed:
                log.warning("pipeline head went away")
            return
        problem = self.link.send(out)
        if problem:
            self._report(frame.step, problem)

    def _report(self, step: Optional[int], message: str) -> None:
        log.warning("step %s: %s", step, message)
        self._send_head(StepErrorFrame(step, message, self.stage).to_meta())

    def _send_head(self, meta: dict, arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
        if self.head is None:
            return
        try:
            self.head.send(meta, arrays)
        except ChannelClosed:
            log.warning("pipeline head went away")


def _error(message: str) -> dict:
    return {"type": ERROR, "message": message}


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


from .config import StageConfig  # noqa: E402 - what run_stage reads


async def run_stage(engine: StageEngine, cfg: StageConfig, *, key: Optional[LinkKey] = None,
                    tls: Optional[Tuple[str, str]] = None,
                    on_listen: Optional[Callable[[int], Awaitable[None]]] = None) -> None:
    """Serve a stage as ``cfg`` says until cancelled or drained; writes the bound port to ``cfg.ready_file``.

    ``key`` and ``tls`` (cert, key paths) are what was loaded from ``cfg.security`` (the cluster secret may
    come from the environment). ``cfg.metrics``: (host, port) of the stage's own Prometheus endpoint
    (:mod:`molink_lite.stage.metrics`). ``on_listen``: awaited with the bound port once listening.

    SIGTERM (SIGBREAK on Windows) drains: the gateway is told to move this pipeline's sequences
    elsewhere, and the stage exits once it has let go (at most ``cfg.drain_timeout`` seconds); a second
    signal exits at once.
    """
    server = StageServer(engine, host=cfg.host, port=cfg.port, next_url=cfg.next_url, codec=cfg.codec, key=key,
                         tls=tls, mmproj=cfg.mmproj, image_min_tokens=cfg.image_min_tokens)
    if cfg.step_costs_s > 0:   # before serving: the probe steps have the engine to themselves
        await asyncio.to_thread(server.measure_step_costs, cfg.step_costs_s)
    metrics = cfg.metrics
    drain_timeout = cfg.drain_timeout
    ready_file = cfg.ready_file
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


__all__ = ["StageServer", "run_stage"]
