"""One chain of stages (a pipeline): connect, verify, send steps, take results back, notice failure.

A :class:`Pipeline` owns the links to its stages (authenticated, with heartbeats), the sequence
slots and KV reservations on them, and the steps in flight. Which rows go into a step is decided
by :mod:`molink_lite.serving.scheduler`; what happens to requests when the pipeline fails is
decided by :mod:`molink_lite.serving.router` (``on_lost``): the pipeline hands back every
unfinished sequence instead of failing it.

States: ``connecting`` (never up yet), ``up``, ``down`` (failed, or a stage is leaving, or a stage lost its link
to the next stage: its sequences were handed back; the reconnect loop keeps trying and the pipeline comes back by
itself).

Fencing: a pipeline names itself to its stages with a random id (``configure``); a stage controlled by another
connected pipeline refuses it (:class:`~molink_lite.serving.chain.FencedError`) unless it asks to ``takeover``,
which it does on its first connect only. A pipeline whose stages were taken over (its link closed with
``CLOSE_REPLACED`` and a "fenced off" reason) stays down and keeps retrying without taking over, so two gateways
never take stages back and forth; it comes back when the other gateway goes away.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..wire.auth import CLOSE_REPLACED, LinkKey
from ..wire.channel import Channel, ChannelClosed
from ..wire.codec import FrameError
from .chain import Chain, FencedError, PipelineError, check_chain
from .scheduler import PrefillBudget, admit, chunk_for_link, is_long, plan_step
from .sequence import GenRequest, SeqState
from .speculative import SpecConfig, SpecState, StepCost, allocate, auto_enabled

log = logging.getLogger(__name__)
__all__ = ["Pipeline", "PipelineError", "FencedError", "RequestError", "check_chain"]


class RequestError(ValueError):
    """A request that can never be served by this pipeline (e.g. longer than the context)."""


@dataclass
class _Step:
    sid: int
    seqs: List[Tuple[SeqState, bool]]   # (sequence, expects a token back)
    sent_at: float
    n_decode: int = 0
    n_prefill: int = 0
    rows: int = 0
    sent: List[Tuple[int, int]] = field(default_factory=list)  # (slot, epoch) of each sequence when sent
    lane: int = 0

    def live(self) -> List[Tuple[SeqState, int]]:
        """(sequence, slot it was sent in) for the sequences this step still speaks for: a sequence handed back
        (replayed) since it was sent has moved on, and this step's outcome is not its own any more."""
        return [(s, slot) for (s, _), (slot, ep) in zip(self.seqs, self.sent) if s.epoch == ep]

    def landed(self) -> List[Tuple[SeqState, int]]:
        """The step is back (result or error): its live sequences have one step fewer in flight."""
        out = self.live()
        for s, _ in out:
            s.in_flight = max(0, s.in_flight - 1)
        return out


LostHandler = Callable[["Pipeline", List[SeqState], str], None]


class Pipeline:
    """One chain of stages (``urls`` in layer order) and the sequences running on it."""

    def __init__(self, urls: Sequence[str], *, codec: str = "f16", max_inflight: Optional[int] = None,
                 prefill_chunk: Optional[int] = None, max_batch_tokens: int = 512, step_timeout: float = 300.0,
                 name: str = "", key: Optional[LinkKey] = None, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 3.0, spec: Optional[SpecConfig] = None, takeover: bool = False):
        if not urls:
            raise PipelineError("a pipeline needs at least one stage URL")
        self.urls = list(urls)
        self.name = name or ",".join(self.urls)
        self.codec = codec
        self.max_inflight = max_inflight or len(self.urls)
        self._auto_inflight = not max_inflight  # then one micro-batch per stage and lane (set at connect)
        self.auto_chunk = not prefill_chunk
        self.prefill_chunk = prefill_chunk or min(256, max_batch_tokens)
        self.budget = PrefillBudget(self.prefill_chunk)
        self.links: List[dict] = []  # measured stage-to-stage links (auto chunk size)
        self.max_batch_tokens = self.max_batch_tokens_opt = max_batch_tokens
        self.step_timeout = step_timeout
        self.chain = Chain(self.urls, codec=codec, key=key, heartbeat=(heartbeat_interval, heartbeat_timeout),
                           name=self.name)
        self.state = "connecting"
        self.error = "not connected"
        # fencing: who this pipeline is to its stages; take stages held by another gateway (first connect only)
        self.controller_id = secrets.token_hex(8)
        self.takeover = takeover
        self.fenced = ""  # why this pipeline's stages belong to another gateway now ("" when they do not)
        self._link_down = ""  # a stage reported its link to the next stage lost (while connecting)
        self._kick = asyncio.Event()  # wakes the reconnect loop early (a stage's link is back)
        self.spec = (spec or SpecConfig()).validate()
        self.spec_on = self.spec.mode == "ngram"   # "auto" is decided when the pipeline connects
        self.path_rtt_s: Optional[float] = None    # gateway -> stages -> gateway, measured at connect
        self.cost = StepCost(0.02, 0.001)
        self.waiting: Deque[SeqState] = deque()
        self.active: Dict[int, SeqState] = {}
        self.free_slots: List[int] = []
        self.pending_free: List[int] = []
        self.n_ctx = 0
        self.max_seqs = 0
        # stages run with --lanes L: sequence slot s lives in lane s % L (its own llama.cpp context on every stage);
        # a step carries one lane's sequences, and lanes run side by side on each stage
        self.lanes = 1
        self.n_ctx_lane = 0
        self.kv_lane: List[int] = [0]  # KV cells reserved by the admitted sequences, per lane
        self.inflight: Dict[int, _Step] = {}
        self._sids = itertools.count(1)
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._bg: List[asyncio.Task] = []
        self.on_lost: LostHandler = _fail_lost
        self.on_up: Callable[["Pipeline"], None] = lambda p: None
        # serving.metrics.Metrics (first_token, token_gap, tokens), set by the gateway; O(1) calls per token
        self.observer: Optional[Any] = None
        self.events: Deque[dict] = deque(maxlen=50)  # failures and recoveries, newest last
        self.stats = {"steps": 0, "rows": 0, "max_inflight_seen": 0, "max_seqs_in_step": 0,
                      "completed": 0, "failed": 0, "prefill_rows": 0, "decode_rows": 0, "mixed_steps": 0,
                      "failures": 0, "recoveries": 0, "handed_back": 0,
                      "spec_rounds": 0, "spec_mixed_steps": 0, "drafted": 0, "accepted": 0, "decode_entries": 0,
                      "decode_tokens": 0}

    # ------------------------------------------------------------------ state
    @property
    def healthy(self) -> bool:
        return self.state == "up"

    @property
    def first(self) -> dict:
        return self.chain.first

    @property
    def infos(self) -> List[dict]:
        return self.chain.infos

    @property
    def channels(self) -> List[Channel]:
        return self.chain.channels

    @property
    def prefill_budget(self) -> int:
        return self.budget.rows

    @property
    def load(self) -> float:
        """Share of this pipeline in use, counted now: queued and running sequences, and reserved KV."""
        seqs = (len(self.active) + len(self.waiting)) / max(1, self.max_seqs)
        kv = (self.kv_reserved + sum(s.need for s in self.waiting)) / max(1, self.n_ctx)
        return max(seqs, kv)

    def summary(self) -> dict:
        return {"name": self.name, "state": self.state, "healthy": self.healthy, "error": self.error or None,
                "fenced": self.fenced or None,
                "load": round(self.load, 4), "running": len(self.active), "queued": len(self.waiting),
                "stages": self.urls, "recoveries": self.stats["recoveries"], "failures": self.stats["failures"]}

    def spec_summary(self) -> dict:
        """Speculative decoding: setting, state, acceptance rate and tokens per round trip (decode entries)."""
        st = self.stats
        a, b = self.cost.params()
        return {"mode": self.spec.mode, "on": self.spec_on, "k": self.spec.k, "n": self.spec.n,
                "path_rtt_ms": None if self.path_rtt_s is None else round(1e3 * self.path_rtt_s, 3),
                "drafted": st["drafted"], "accepted": st["accepted"],
                "acceptance": round(st["accepted"] / st["drafted"], 4) if st["drafted"] else None,
                "tokens_per_round_trip": (round(st["decode_tokens"] / st["decode_entries"], 4)
                                          if st["decode_entries"] else None),
                "step_cost_ms": {"a": round(1e3 * a, 3), "b_per_row": round(1e3 * b, 4)}}

    # ------------------------------------------------------------------ connection
    @property
    def kv_reserved(self) -> int:
        """KV cells reserved by the admitted sequences."""
        return sum(self.kv_lane)

    async def connect(self, timeout: float = 60.0) -> None:
        """Open the chain (checked, linked), size steps for it, start scheduling; a rejoin ends here too."""
        self._link_down = ""
        takeover = self.takeover and not self.fenced
        try:
            await self.chain.open(timeout, self._on_frame, self._on_link_closed, gateway_id=self.controller_id,
                                  takeover=takeover)
        except FencedError as e:
            if self.fenced:
                raise FencedError(f"{e} (this gateway was fenced off: {self.fenced}; it keeps retrying without "
                                  f"taking the stages back)", e.epoch) from None
            raise
        if takeover:
            log.warning("pipeline %s took over its stages from another gateway (--takeover; fencing epochs %s)",
                        self.name, self.chain.epochs)
        self.takeover = False  # a takeover happens once at most: never take stages back later
        infos = self.chain.infos
        # rows per step never exceed what every stage accepts
        self.max_batch_tokens = min([self.max_batch_tokens_opt] + [int(i.get("max_rows") or 1 << 30) for i in infos])
        if self.auto_chunk:
            self.links = await self.chain.probe()
            n_embd = int(infos[0]["n_embd"])
            chunks = [chunk_for_link(k["rtt_ms"] / 1e3, k["mbit"], n_embd, self.codec, self.max_batch_tokens)
                      for k in self.links]
            self.prefill_chunk = min(chunks) if chunks else min(256, self.max_batch_tokens)
            self.budget.set_chunk(self.prefill_chunk)
            log.info("prefill chunk: %d tokens per sequence per step", self.prefill_chunk)
        if self.spec.mode != "off":
            await self._measure_path()
        lanes = {int(i.get("lanes") or 1) for i in infos}
        if len(lanes) > 1:
            await self.chain.close()
            raise PipelineError(f"the stages of pipeline {self.name} run different --lanes ({sorted(lanes)}); "
                                "give every stage of a pipeline the same count")
        self.lanes = lanes.pop()
        if self._auto_inflight:  # measured best on H100s: 1 stage x 2 lanes -> 2, 2 stages x 2 lanes -> 4
            self.max_inflight = len(self.urls) * self.lanes
        self.n_ctx_lane = min(int(i.get("n_ctx_lane") or i["n_ctx"]) for i in infos)
        self.n_ctx = self.n_ctx_lane * self.lanes
        self.max_seqs = min(int(i["max_seqs"]) for i in infos)
        self.free_slots = list(range(self.max_seqs - 1, -1, -1))
        self.pending_free.clear()
        self.kv_lane = [0] * self.lanes
        gone = [ch.name for ch in self.channels if ch.closed.is_set()]
        if gone or self._link_down:  # lost while connecting: not up; the reconnect loop tries again
            await self.chain.close()
            raise PipelineError(f"pipeline {self.name}: " + (self._link_down or f"{gone[0]} disconnected while "
                                                                                 f"connecting"))
        self.fenced = ""
        was = self.state
        self.state, self.error = "up", ""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())
        log.info("pipeline %s %s: %d stage(s), %s, %d layers, %d seqs, ctx %d, %d micro-batches", self.name,
                 "back in service" if was == "down" else "ready", len(infos), infos[0]["arch"],
                 infos[0]["n_layer_total"], self.max_seqs, self.n_ctx, self.max_inflight)
        if was == "down":
            self.stats["recoveries"] += 1
            self.events.append({"at": time.time(), "event": "up", "message": "reconnected"})
        self.on_up(self)
        self._wake.set()

    async def _measure_path(self) -> None:
        """Round trip of a step's path (gateway -> first stage -> ... -> last stage -> gateway): half of the
        gateway's pings to the first and last stages plus half of each stage-to-stage link's; decides
        ``--speculative auto`` and seeds the step cost model."""
        if not self.links and len(self.urls) > 1:
            self.links = await self.chain.probe()
        try:
            pings = []
            for ch in (self.channels[0], self.channels[-1]):
                best = None
                for _ in range(3):
                    t0 = time.perf_counter()
                    await ch.request({"type": "ping"}, {"pad": np.zeros(16, np.uint8)}, timeout=30)
                    dt = time.perf_counter() - t0
                    best = dt if best is None else min(best, dt)
                pings.append(best)
        except Exception as e:  # noqa: BLE001 - measuring is best effort
            log.warning("could not measure the step path: %s", e)
            pings = [0.0, 0.0]
        self.path_rtt_s = (sum(pings) + sum(k["rtt_ms"] / 1e3 for k in self.links)) / 2
        if self.spec.mode == "auto":
            self.spec_on = auto_enabled(self.path_rtt_s)
        self.cost = StepCost(self.path_rtt_s + 0.01, 0.001)
        log.info("step path round trip %.1f ms: speculative decoding %s (--speculative %s, k<=%d, n<=%d)",
                 1e3 * self.path_rtt_s, "on" if self.spec_on else "off", self.spec.mode, self.spec.k, self.spec.n)

    def _on_link_closed(self, ch: Channel, url: str) -> None:
        reason = ch.peer_close_reason
        if ch.peer_close_code == CLOSE_REPLACED and reason.startswith("fenced off"):
            # another gateway took this stage over (--takeover): never take it back; retry only without takeover
            self.takeover = False
            if not self.fenced:
                log.error("pipeline %s: stage %s was taken over by another gateway: %s", self.name, url, reason)
            self.fenced = f"stage {url}: {reason}"
            if ch in self.channels and self.state == "up":
                self.fail(f"fenced off: another gateway took over stage {url} ({reason}); this gateway does not take "
                          f"it back and serves again only when that gateway lets go")
            return
        if ch in self.channels and self.state == "up":
            self.fail(f"stage {url} disconnected ({ch.close_reason})")

    def fail(self, message: str) -> None:
        """The chain is broken: hand every unfinished sequence back (``on_lost``) and go down."""
        if self.state == "down":
            return
        log.error("pipeline %s down: %s", self.name, message)
        self.state, self.error = "down", message
        self.stats["failures"] += 1
        self.events.append({"at": time.time(), "event": "down", "message": message})
        seqs: List[SeqState] = []
        for st in self.inflight.values():
            seqs.extend(s for s, _ in st.live())  # not one already handed back by an earlier step's error
        seqs.extend(self.active.values())
        seqs.extend(self.waiting)
        self.inflight.clear()
        self.active.clear()
        self.waiting.clear()
        self.kv_lane = [0] * self.lanes
        self.pending_free.clear()
        lost = list({id(s): s for s in seqs if not s.finished}.values())
        self.chain.close_soon()
        self._hand_back(lost, message)
        self._wake.set()

    def _hand_back(self, seqs: List[SeqState], message: str) -> None:
        for s in seqs:
            s.prepare_replay()
        self.stats["handed_back"] += len(seqs)
        if seqs:
            self.on_lost(self, seqs, message)

    def start_background(self) -> None:
        """The watchdog and the reconnect loop (once; the gateway calls this when it starts or adds the pipeline)."""
        if not self._bg:
            self._bg = [asyncio.ensure_future(self.watchdog()), asyncio.ensure_future(self.reconnect_forever())]

    async def close(self) -> None:
        self.state = "down"
        for t in self._bg:
            t.cancel()
        if self._task is not None:
            self._task.cancel()
        await self.chain.close()

    async def reconnect_forever(self, interval: float = 1.0) -> None:
        """Keep trying to bring a down pipeline back (a restarted stage at the same address rejoins, a stage's lost
        link to the next stage is rebuilt, the gateway that fenced this one off went away)."""
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            if self.state != "down":
                continue
            await self.chain.close()
            try:
                await self.connect(timeout=max(interval, 2.0))
            except (PipelineError, OSError) as e:
                self.error = str(e)

    async def watchdog(self, interval: float = 5.0) -> None:
        """Fail steps that never came back (a frame was lost; hung stages are caught by heartbeats first)."""
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            late = [st for st in self.inflight.values() if now - st.sent_at > self.step_timeout]
            if late and self.state == "up":
                self.fail(f"step {late[0].sid} got no answer within {self.step_timeout:.0f} s")

    # ------------------------------------------------------------------ requests
    async def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        """Token ids from the first stage's tokenizer."""
        if not self.healthy:
            raise PipelineError(self.error)
        meta, arrays = await self.channels[0].request(
            {"type": "tokenize", "text": text, "add_special": add_special, "parse_special": True})
        return arrays["tokens"]

    def check(self, req: GenRequest) -> None:
        """Raise :class:`RequestError` if the request can never fit this pipeline."""
        n = int(req.prompt.shape[0])
        if n == 0:
            raise RequestError("the prompt is empty")
        if req.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1")
        if self.n_ctx_lane and n + req.max_tokens > self.n_ctx_lane:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceeds the context "
                               f"window ({self.n_ctx_lane} tokens{' per lane' if self.lanes > 1 else ''})")
        if self.infos:
            vocab = int(self.first["n_vocab"])
            if int(req.prompt.min()) < 0 or int(req.prompt.max()) >= vocab:
                raise RequestError(f"prompt token ids must be in 0..{vocab - 1}")

    def add(self, s: SeqState, front: bool = False) -> None:
        """Queue a sequence here (a replayed one goes to the front: it was admitted before the others)."""
        s.pipeline = self
        if front:
            self.waiting.appendleft(s)
        else:
            self.waiting.append(s)
        self._wake.set()

    def cancel(self, s: SeqState) -> None:
        """The client went away: stop generating and free the sequence on every stage."""
        if s.finished:
            return
        s.cancelled = True
        if s in self.waiting:
            self.waiting.remove(s)
            s.finished = True
            return
        if not s.in_flight:
            self._release(s)
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.state != "up":
                continue
            try:
                admit(self.waiting, self.free_slots, self.kv_lane, self.n_ctx_lane, self.active)
                while len(self.inflight) < max(self.max_inflight, self.lanes):
                    if not self._build_and_send():
                        break
            except ChannelClosed as e:
                self.fail(str(e))
            except Exception as e:  # noqa: BLE001 - keep serving; hand back what was involved
                log.exception("scheduler error")
                self.fail(f"scheduler error: {e}")

    def _build_and_send(self) -> bool:
        """The next step, for the lane with the fewest steps in flight that has work (each lane's micro-batches
        share its sequences as :func:`plan_step` shares them; one lane: the whole pipeline); a step carrying only
        frees goes when its lane has nothing in flight."""
        L = self.lanes
        busy = [0] * L
        for st in self.inflight.values():
            busy[st.lane] += 1
        per_lane = max(1, max(self.max_inflight, L) // L)
        for lane in sorted(range(L), key=lambda i: busy[i]):
            mine = [s for s in self.active.values() if s.slot % L == lane]
            plan = plan_step(mine, per_lane, self.max_batch_tokens, self.prefill_chunk, self.budget.rows)
            if plan.decode or plan.prefill:
                self._send_step(plan.decode, plan.prefill, lane)
                return True
            if not busy[lane] and any(x % L == lane for x in self.pending_free):
                self._send_step([], [], lane)
                return True
        return False

    def _plan_drafts(self, decode: List[SeqState], prefill_rows: int) -> List[np.ndarray]:
        """Draft tokens for each decoding sequence of a step (empty arrays where none pay)."""
        empty = np.zeros(0, np.int32)
        if not self.spec_on or not decode:
            return [empty] * len(decode)
        cands, limits, rates = [], [], []
        for s in decode:
            if s.spec is None:
                s.spec = SpecState.for_prompt(s.req.prompt, s.req.max_tokens, s.generated)
            room = min(self.spec.k, s.req.max_tokens - len(s.generated) - 1)
            c = s.spec.candidates(self.spec.n, room)
            cands.append(c)
            limits.append(int(c.shape[0]))
            rates.append(s.spec.rate)
        budget = self.max_batch_tokens - len(decode) - prefill_rows
        if not any(limits) or budget <= 0:
            for s in decode:
                s.spec.idle()
            return [empty] * len(decode)
        a, b = self.cost.params()
        # with m steps in flight the fixed part of a round trip (links, per-step work) is shared by m steps:
        # a busy pipeline is bound by per-row compute, where a draft row must nearly pay for itself
        m = len(self.inflight) + 1
        ks = allocate(rates, limits, len(decode), len(decode) + prefill_rows, a / m, b, budget)
        out = []
        for s, c, k in zip(decode, cands, ks):
            if k == 0:
                s.spec.idle()
            out.append(c[:k])
        return out

    def _send_step(self, decode: List[SeqState], prefill: List[Tuple[SeqState, int]], lane: int = 0) -> None:
        sid = next(self._sids)
        seq_parts, pos_parts, tok_parts, out_parts = [], [], [], []
        entries: List[Tuple[SeqState, bool]] = []
        start: Dict[str, dict] = {}
        trim: Dict[str, int] = {}
        drafts_meta: Dict[str, list] = {}
        n_prefill_rows = sum(take for _, take in prefill)
        drafts = self._plan_drafts(decode, n_prefill_rows)
        if decode and not any(d.shape[0] for d in drafts):
            n = len(decode)
            seq_parts.append(np.fromiter((s.slot for s in decode), dtype=np.int32, count=n))
            pos_parts.append(np.fromiter((s.decode_pos for s in decode), dtype=np.int32, count=n))
            tok_parts.append(np.fromiter((s.generated[-1] for s in decode), dtype=np.int32, count=n))
            out_parts.append(np.ones(n, dtype=np.uint8))
        else:
            for s, d in zip(decode, drafts):  # the last token, then its drafts at the next positions
                k = int(d.shape[0])
                seq_parts.append(np.full(k + 1, s.slot, dtype=np.int32))
                pos_parts.append(np.arange(s.decode_pos, s.decode_pos + k + 1, dtype=np.int32))
                tok_parts.append(np.concatenate(([s.generated[-1]], d)).astype(np.int32))
                out_parts.append(np.ones(k + 1, dtype=np.uint8))
                if k:
                    drafts_meta[str(s.slot)] = d.tolist()
        for s, d in zip(decode, drafts):
            if s.kv_len > s.decode_pos:  # drafts rejected last time: every stage drops them first
                trim[str(s.slot)] = s.decode_pos
            s.kv_len = s.decode_pos + 1 + int(d.shape[0])
            if s.spec is not None:
                s.spec.drafts = d
        entries.extend((s, True) for s in decode)
        for s, take in prefill:
            a, b = s.prefilled, s.prefilled + take
            seq_parts.append(np.full(take, s.slot, dtype=np.int32))
            pos_parts.append(np.arange(a, b, dtype=np.int32))
            tok_parts.append(s.feed[a:b])
            done = b == s.feed.shape[0]
            out = np.zeros(take, dtype=np.uint8)
            out[-1] = 1 if done else 0
            out_parts.append(out)
            entries.append((s, done))
            if not s.started:
                if self.spec_on and s.spec is None:
                    s.spec = SpecState.for_prompt(s.req.prompt, s.req.max_tokens, s.generated)
                start[str(s.slot)] = s.start_params()
                s.started = True
            s.prefilled = b
            s.kv_len = b
        frees = [x for x in self.pending_free if x % self.lanes == lane]
        meta = {"type": "step", "step": sid, "free": frees, "start": start}
        if self.lanes > 1:
            meta["lane"] = lane
        if trim:
            meta["trim"] = trim
        if drafts_meta:
            meta["drafts"] = drafts_meta
        cat = lambda parts, dt: np.concatenate(parts).astype(dt, copy=False) if parts else np.zeros(0, dt)  # noqa: E731
        arrays = {"seq": cat(seq_parts, np.int32), "pos": cat(pos_parts, np.int32),
                  "tokens": cat(tok_parts, np.int32), "out": cat(out_parts, np.uint8)}
        try:
            self.channels[0].send(meta, arrays)
        except FrameError as e:  # cannot happen for checked requests; if it does, fail only this step's requests
            log.error("step %d could not be encoded: %s", sid, e)
            for s, _ in entries:
                self._finish(s, error=f"internal error building a step: {e}")
            return
        self.pending_free = [x for x in self.pending_free if x % self.lanes != lane]
        for s, _ in entries:
            s.in_flight += 1
            s.last_sent = sid
        n = int(arrays["seq"].shape[0])
        self.inflight[sid] = _Step(sid, entries, time.perf_counter(), len(decode), n_prefill_rows, n,
                                   [(s.slot, s.epoch) for s, _ in entries], lane)
        st = self.stats
        st["steps"] += 1
        st["rows"] += n
        st["decode_rows"] += n - n_prefill_rows
        st["prefill_rows"] += n_prefill_rows
        if drafts_meta:
            st["spec_rounds"] += len(drafts_meta)
            st["drafted"] += sum(len(d) for d in drafts_meta.values())
            if len(drafts_meta) < len(decode) or prefill:  # speculating and plain sequences share the step
                st["spec_mixed_steps"] += 1
        if decode and prefill:
            st["mixed_steps"] += 1
        st["max_inflight_seen"] = max(st["max_inflight_seen"], len(self.inflight))
        st["max_seqs_in_step"] = max(st["max_seqs_in_step"], len(entries))

    # ------------------------------------------------------------------ results
    async def _on_frame(self, ch: Channel, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        kind = meta.get("type")
        if kind == "result":
            self._on_result(meta, arrays)
        elif kind == "step_error":
            self._on_step_error(meta)
        elif kind == "drain":  # a stage is shutting down: move its sequences now, then let it go
            self.fail(f"{ch.name} is shutting down (drain)")
        elif kind == "link_down":  # a stage lost its link to the next stage: steps sent into it may be lost
            msg = (f"stage {meta.get('stage')} ({ch.name}) lost its link to the next stage {meta.get('to')}: "
                   f"{meta.get('reason')}; it is reconnecting")
            if ch in self.channels and self.state == "up":
                self.fail(msg)
            elif ch in self.chain.opening and not ch.closed.is_set():
                self._link_down = msg  # while connecting: this attempt must not bring the pipeline up
        elif kind == "link_up":  # the link is back: try to come back now rather than at the next retry
            log.info("pipeline %s: stage %s reconnected to the next stage %s", self.name, meta.get("stage"),
                     meta.get("to"))
            self._kick.set()
        elif kind == "error":
            log.warning("stage reported: %s", meta.get("message"))

    def _on_step_error(self, meta: dict) -> None:
        """A stage could not run a step: free its sequences here and hand them back to be replayed."""
        st = self.inflight.pop(meta.get("step"), None)
        msg = f"stage {meta.get('stage')}: {meta.get('message')}"
        log.warning("pipeline %s: %s", self.name, msg)
        if st is None:
            return
        lost = []
        for s, _ in st.landed():
            if s.finished:
                continue
            if s.cancelled:
                self._release(s)
                continue
            self._release(s, keep=True)
            lost.append(s)
        self._hand_back(lost, msg)
        self._wake.set()

    def _on_result(self, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        st = self.inflight.pop(meta.get("step"), None)
        if st is None:
            return  # a step whose sequences were moved away (drain) or a stale one
        live = st.landed()
        by_slot = {slot: s for s, slot in live}
        seqs = arrays.get("seq", np.zeros(0, np.int32)).tolist()
        toks = arrays.get("tokens", np.zeros(0, np.int32)).tolist()
        eogs = arrays.get("eog", np.zeros(len(seqs), np.uint8)).tolist()
        pieces = meta.get("pieces") or [""] * len(seqs)
        now = time.perf_counter()
        if st.n_prefill == 0:  # decode rows all output logits (the last stage's LM head): prompt rows do not,
            self.cost.observe(st.rows, now - st.sent_at)  # so steps carrying them would skew the per-row cost
        if st.n_decode:
            got = dict(zip(*np.unique(np.asarray(seqs, np.int64), return_counts=True))) if seqs else {}
            for (s, _), (slot, ep) in zip(st.seqs[:st.n_decode], st.sent):  # decode entries come first in a step
                if s.epoch != ep:
                    continue
                n_got = int(got.get(slot, 0))
                self.stats["decode_entries"] += 1
                self.stats["decode_tokens"] += n_got
                if s.spec is None:
                    continue
                k = int(s.spec.drafts.shape[0])
                if k and n_got:
                    acc = min(k, n_got - 1)
                    s.spec.verified(k, acc)
                    self.stats["accepted"] += acc
                s.spec.drafts = s.spec.drafts[:0]
        worst_itl: Optional[float] = None
        obs = self.observer
        taken = 0
        for slot, tok, eog, piece in zip(seqs, toks, eogs, pieces):
            s = by_slot.get(slot)
            if s is None or s.finished or s.pipeline is not self:
                continue
            if s.cancelled:
                self._release(s)
                continue
            if s.t_last is not None and s.t_first is not None:
                gap = now - s.t_last
                worst_itl = max(worst_itl or 0.0, gap)
                if obs is not None:
                    obs.token_gap(gap)
            elif obs is not None:
                obs.first_token(now - s.t_submit)
            taken += 1
            reason = s.take_token(tok, bool(eog), piece, now)
            if reason:
                self._finish(s, reason=reason)
        for s, _ in live:
            if s.cancelled and not s.finished and not s.in_flight:
                self._release(s)
        if obs is not None:
            obs.tokens(taken)
        long_running = any(is_long(s, self.prefill_chunk) and s.prefilling and not s.finished
                           for s in self.active.values())
        self.budget.update(worst_itl, long_running)
        self.stats["prefill_budget"] = self.budget.rows
        self._wake.set()

    def _finish(self, s: SeqState, reason: Optional[str] = None, error: Optional[str] = None) -> None:
        if s.end(reason, error):
            self.stats["failed" if error is not None else "completed"] += 1
        self._release(s)

    def _release(self, s: SeqState, keep: bool = False) -> None:
        """Give the sequence's slot and KV back (``keep``: the request itself goes on elsewhere)."""
        if not keep:
            s.finished = True
        if s.slot >= 0 and self.active.get(s.slot) is s:
            del self.active[s.slot]
            self.kv_lane[s.slot % self.lanes] -= s.need
            if s.started:
                self.pending_free.append(s.slot)
            self.free_slots.append(s.slot)
        self._wake.set()

    async def stage_stats(self) -> List[dict]:
        return await self.chain.stage_stats()


def _fail_lost(p: Pipeline, seqs: List[SeqState], message: str) -> None:
    """Default when no router takes sequences back: they end with the error."""
    for s in seqs:
        if s.end(error=message):
            p.stats["failed"] += 1
