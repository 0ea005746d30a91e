"""One chain of stages (a pipeline) and the sequences running on it: a short loop over its parts.

:mod:`.scheduler` decides which rows go next (policy); :mod:`.step_builder` turns them into a typed
:class:`~molink_lite.wire.protocol.StepFrame` and the record kept while it is in flight; :mod:`.step_result` applies
what comes back; :mod:`.slots` holds sequence slots and KV reservations; :class:`.chain_lifecycle.ChainLifecycle`
keeps the chain up (connect, fencing, failure detection, reconnection). The loop: admit -> schedule -> send until
the micro-batches are full; results come back as frames (:meth:`Pipeline._on_result`) and wake it again.

What happens to requests when the pipeline fails is decided by :mod:`molink_lite.serving.router` (``on_lost``):
the pipeline hands back every unfinished sequence instead of failing it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import numpy as np

from ..wire.auth import LinkKey
from ..wire.channel import ChannelClosed
from ..wire.codec import FrameError
from ..wire.protocol import (RELEASE, RESTORE, ProtocolError, ResultFrame, RingStop, StepErrorFrame,
                             parse_step_costs)
from ..wire.channel import RemoteError
from .chain import Chain, FencedError, PipelineError, check_chain
from .chain_lifecycle import ChainLifecycle
from . import link_policy, ring_policy, speculative
from .media_sender import MediaSender
from .scheduler import PrefillBudget, StepPlan, chunk_for_links, long_prefill_running, next_step
from .sequence import GenRequest, SeqState
from .slots import SlotTable
from .speculative import AcceptancePrior, SpecConfig, StepCost, plan_drafts
from .step_builder import StepRecord, build_step
from .step_result import apply_result, apply_step_error

log = logging.getLogger(__name__)
__all__ = ["Pipeline", "PipelineError", "FencedError", "RequestError", "check_chain"]
_Step = StepRecord  # the name tests and tools knew it by


class RequestError(ValueError):
    """A request that can never be served by this pipeline (e.g. longer than the context)."""


class _Part:
    """An attribute of one of the pipeline's parts (``slots``, ``lifecycle``, ...), read and set through the
    pipeline: the public surface stays where callers look for it."""

    def __init__(self, part: str, attr: str = ""):
        self.part, self.attr = part, attr

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = self.attr or name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        return self if obj is None else getattr(getattr(obj, self.part), self.attr)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(getattr(obj, self.part), self.attr, value)


LostHandler = Callable[["Pipeline", List[SeqState], str], None]
STATS = ("steps", "rows", "max_inflight_seen", "max_seqs_in_step", "completed", "failed", "prefill_rows", "decode_rows",
         "mixed_steps", "failures", "recoveries", "handed_back", "spec_rounds", "spec_mixed_steps", "drafted",
         "accepted", "decode_entries", "decode_tokens", "forks", "prefix_lookups", "prefix_hits",
         "prefix_tokens_reused", "prefix_evictions", "ring_rounds", "ring_stops")  # ``Pipeline.stats``
RING_MODES = ("auto", "on", "off")
# --ring auto closes the ring when the gateway's round trip to the first stage is at least this: the crossing it saves
RING_AUTO_MIN_RTT_S = 1e-3


class Pipeline:
    """One chain of stages (``urls`` in layer order) and the sequences running on it."""

    # the slot table's
    free_slots, active, kv_lane, pending_free = _Part("slots"), _Part("slots"), _Part("slots"), _Part("slots")
    lanes, n_ctx_lane, n_ctx, max_seqs = _Part("slots"), _Part("slots"), _Part("slots"), _Part("slots")
    kv_reserved = _Part("slots")  # KV cells reserved by the admitted sequences
    prefill_budget = _Part("budget", "rows")
    first, infos, channels = _Part("chain"), _Part("chain"), _Part("chain")
    # the lifecycle's
    state, error, fenced, takeover = _Part("lifecycle"), _Part("lifecycle"), _Part("lifecycle"), _Part("lifecycle")
    controller_id, events, links = _Part("lifecycle"), _Part("lifecycle"), _Part("lifecycle")
    path_rtt_s, step_timeout = _Part("lifecycle"), _Part("lifecycle")

    def __init__(self, urls: Sequence[str], *, codec: str = "f16", max_inflight: Optional[int] = None,
                 prefill_chunk: Optional[int] = None, max_batch_tokens: int = 512, step_timeout: float = 300.0,
                 name: str = "", key: Optional[LinkKey] = None, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 3.0, spec: Optional[SpecConfig] = None, takeover: bool = False,
                 prefix_cache: bool = True, prefix_cache_cells: int = 0, prefix_cache_per_key: bool = False,
                 drafter: Optional[Any] = None, relink_s: float = 0.0, ring: str = "auto",
                 ring_via: Optional[Dict[str, str]] = None):
        if not urls:
            raise PipelineError("a pipeline needs at least one stage URL")
        self.urls = list(urls)
        self.name = name or ",".join(self.urls)
        # --codec auto (the default) and --micro-batches left out: chosen from the measured links at each connect
        # (link_policy); until then f16 and one micro-batch per stage
        self.codec_opt = codec
        self.codec = "f16" if codec == link_policy.AUTO else codec
        self.max_inflight = max_inflight or len(self.urls)
        self._auto_inflight = not max_inflight
        self.link_choice: Optional[link_policy.LinkChoice] = None
        self.drafter: Optional[Any] = drafter  # stage.draft.DraftModel (--draft-model), shared by the pipelines
        self.auto_chunk = not prefill_chunk
        self.prefill_chunk = prefill_chunk or min(256, max_batch_tokens)
        self.budget = PrefillBudget(self.prefill_chunk)
        self.max_batch_tokens = self.max_batch_tokens_opt = max_batch_tokens
        self.spec = (spec or SpecConfig()).validate()
        self.spec_on = self.spec.mode == "ngram"   # "auto" is decided when the pipeline connects
        self.cost = StepCost(0.02, 0.001)
        self.accept_prior = AcceptancePrior()   # drafts accepted on this pipeline, all its sequences
        if ring not in RING_MODES:
            raise ValueError(f"ring must be one of {', '.join(RING_MODES)}, not {ring!r}")
        # closing the ring (stage/ring.py): "auto" rings when the gateway is a hop from the first stage and the
        # pipeline does not speculate (a ringed step carries no drafts), "on" rings every step without drafts, "off"
        # never
        self.ring_mode = ring
        self.chain = Chain(self.urls, codec=self.codec, key=key, heartbeat=(heartbeat_interval, heartbeat_timeout),
                           name=self.name, ring=ring != "off", ring_url=(ring_via or {}).get(self.urls[0]))
        self.lifecycle = ChainLifecycle(self.chain, self, step_timeout=step_timeout, takeover=takeover,
                                        probe_links=self.auto_chunk or codec == link_policy.AUTO,
                                        measure_path=self.spec.mode != "off" or self._auto_inflight
                                        or ring == "auto",
                                        relink_s=relink_s if codec == link_policy.AUTO or not max_inflight else 0.0)
        self.slots = SlotTable(prefix_cache, prefix_cache_cells, prefix_cache_per_key)
        self.waiting: Deque[SeqState] = deque()
        self.inflight: Dict[int, StepRecord] = {}
        self._sids = itertools.count(1)
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self.on_lost: LostHandler = _fail_lost
        self.on_up: Callable[["Pipeline"], None] = lambda p: None
        # serving.metrics.Metrics (first_token, token_gap, tokens), set by the gateway; O(1) calls per token
        self.observer: Optional[Any] = None
        self.released = False   # the stages freed their model (release(); serving.idle): restore() before steps
        self.media = MediaSender(self.chain.put_media, ready=self._wake.set,
                                 refused=lambda s, why: self._finish(s, error=why),
                                 broken=lambda why: self.fail(why) if self.healthy else None,
                                 current=lambda s, epoch: s.pipeline is self and s.epoch == epoch)
        self.stats: Dict[str, int] = dict.fromkeys(STATS, 0)
        self.slots.cache.stats = self.stats   # the prefix cache counts into the pipeline's counters

    # ------------------------------------------------------------------ state
    @property
    def healthy(self) -> bool:
        return self.state == "up"

    @property
    def load(self) -> float:
        """Share of this pipeline in use, counted now: queued and running sequences, and reserved KV."""
        seqs = (len(self.active) + len(self.waiting)) / max(1, self.max_seqs)
        kv = (self.kv_reserved + sum(s.need for s in self.waiting)) / max(1, self.n_ctx)
        return max(seqs, kv)

    @property
    def ring_on(self) -> bool:
        """Steps ring now (:mod:`molink_lite.stage.ring`): asked for, the last stage linked to the first, and
        (``auto``) no speculation and a gateway whose link to the first stage is a hop the ring saves."""
        if self.ring_mode == "off" or not self.chain.ring_ok:
            return False
        return self.ring_mode == "on" or (not self.spec_on and self._gateway_hop())

    def _gateway_hop(self) -> bool:
        """The gateway reaches the first stage over a real link (a round trip of at least RING_AUTO_MIN_RTT_S): the
        ring takes that crossing off every token (measured 1.13-1.25x with the gateway 10 ms away). Beside the
        first stage the ring saves only the gateway's own work, and measured 0.92-1.05x (BENCHMARKS_GPU.md)."""
        rtt = self.lifecycle.first_rtt_s
        return rtt is not None and rtt >= RING_AUTO_MIN_RTT_S

    def ring_state(self) -> str:
        """Whether steps ring, and why not."""
        if self.ring_on:
            return "on"
        rtt = self.lifecycle.first_rtt_s
        why = ("--ring off" if self.ring_mode == "off" else
               self.chain.ring_why if not self.chain.ring_ok else
               "speculative decoding is on (--ring on rings the steps without drafts)" if self.spec_on else
               "the gateway's link to the first stage is not measured yet" if rtt is None else
               f"the gateway is {rtt * 1e3:.2f} ms (round trip) from the first stage: the ring would save no link "
               f"crossing (--ring auto rings from {RING_AUTO_MIN_RTT_S * 1e3:g} ms; --ring on)")
        return f"off: {why}"

    def summary(self) -> dict:
        return {"name": self.name, "state": self.state, "healthy": self.healthy, "error": self.error or None,
                "fenced": self.fenced or None,
                "load": round(self.load, 4), "running": len(self.active), "queued": len(self.waiting),
                "stages": self.urls, "recoveries": self.stats["recoveries"], "failures": self.stats["failures"],
                "ring": self.ring_state()}

    def spec_summary(self) -> dict:
        """Speculative decoding: setting, state, acceptance rate and tokens per round trip (decode entries)."""
        out = speculative.summary(self.spec, self.spec_on, self.stats, self.cost, self.path_rtt_s)
        if self.drafter is not None:
            out["draft_model"] = {"path": self.drafter.path, **self.drafter.stats}
        return out

    # ------------------------------------------------------------------ up and down (ChainLifecycle)
    async def connect(self, timeout: float = 60.0) -> None:
        """Open the chain (checked, linked), size steps for it, start scheduling; a rejoin ends here too."""
        back = await self.lifecycle.connect(timeout)
        infos = self.infos
        # stages that released their model (an idle model) say so; the first request loads them again
        self.released = any(i.get("released") is True for i in infos)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())
        log.info("pipeline %s %s: %d stage(s), %s, %d layers, %d seqs, ctx %d, %d micro-batches, ring %s", self.name,
                 "back in service" if back else "ready", len(infos), infos[0]["arch"], infos[0]["n_layer_total"],
                 self.max_seqs, self.n_ctx, self.max_inflight, self.ring_state())
        if back:
            self.stats["recoveries"] += 1
        self.on_up(self)
        self._wake.set()

    async def _choose_link_settings(self, infos: List[dict]) -> None:
        """Codec and micro-batches from the links just measured (:mod:`.link_policy`); the stages are told a codec
        that differs from the one they were configured with."""
        rows = min([self.max_batch_tokens_opt] + [int(i.get("max_seqs") or 1) for i in infos])
        choice = link_policy.choose(codec_opt=self.codec_opt, mb_opt=None if self._auto_inflight else self.max_inflight,
                                    links=self.links, path_rtt_s=self.path_rtt_s, infos=infos, rows=rows)
        if choice.codec != self.chain.codec:
            await self.chain.set_codec(choice.codec)
        self.codec, self.link_choice = choice.codec, choice
        if self._auto_inflight:
            self.max_inflight = choice.micro_batches
            self._wake.set()  # more room in flight takes effect now
        log.info("pipeline %s: %s", self.name, choice.why)

    def _size_for(self, infos: List[dict]) -> None:
        """Slots, rows per step, prefill chunk, speculation and micro-batches for the chain just opened."""
        if self.drafter is not None:
            why = self.drafter.check_vocab(infos[0])
            if why:
                raise PipelineError(f"pipeline {self.name}: --draft-model {self.drafter.path} cannot draft for this "
                                    f"model: {why}")
        self.slots.size_for(infos, self.name)
        self.max_batch_tokens = min([self.max_batch_tokens_opt] + [int(i.get("max_rows") or 1 << 30) for i in infos])
        if self.auto_chunk:
            self.prefill_chunk = chunk_for_links(self.links, int(infos[0]["n_embd"]), self.codec, self.max_batch_tokens)
            self.budget.set_chunk(self.prefill_chunk)
            log.info("prefill chunk: %d tokens per sequence per step", self.prefill_chunk)
        if self.spec.mode != "off":  # the step path was measured: speculate ("auto") and a step's cost prior
            self.spec_on, self.cost = speculative.for_path(self.spec, self.path_rtt_s, self.spec_on,
                                                           [parse_step_costs(i.get("step_costs")) for i in infos])
        if self._auto_inflight and self.link_choice is None:  # not chosen from links (a chain sized directly)
            self.max_inflight = len(self.urls) * self.lanes

    def fail(self, message: str) -> None:
        """The chain is broken: hand every unfinished sequence back (``on_lost``) and go down."""
        if not self.lifecycle.go_down(message):
            return
        self.stats["failures"] += 1
        self.media.forget()   # a first stage that comes back holds no images
        seqs: List[SeqState] = []
        for st in self.inflight.values():
            seqs.extend(s for s, _ in st.live())  # not one already handed back by an earlier step's error
        seqs.extend(self.slots.clear())
        seqs.extend(self.waiting)
        self.inflight.clear()
        self.waiting.clear()
        self._hand_back(list({id(s): s for s in seqs if not s.finished}.values()), message)
        self._wake.set()

    def _hand_back(self, seqs: List[SeqState], message: str) -> None:
        for s in seqs:
            s.prepare_replay()
        self.stats["handed_back"] += len(seqs)
        if seqs:
            self.on_lost(self, seqs, message)

    def start_background(self) -> None:
        """The watchdog and the reconnect loop (once; the gateway calls this when it starts or adds the pipeline)."""
        self.lifecycle.start_background()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.lifecycle.close()

    # ------------------------------------------------------------------ idle models (serving.idle)
    @property
    def idle(self) -> bool:
        """No sequence runs, waits or is in a step here."""
        return not self.active and not self.waiting and not self.inflight

    async def release(self, timeout: float = 120.0) -> List[dict]:
        """Every stage frees its model and context (an idle model, ``--idle-unload``); the cached prefixes are
        forgotten first (their KV goes with the context). The stages' replies (memory they hold now)."""
        if not self.idle:
            raise PipelineError(f"pipeline {self.name} has sequences: not released")
        self.slots.clear()
        self.media.forget()   # the first stage's images go with its model
        try:
            replies = await self.chain.request_all({"type": RELEASE}, timeout=timeout)
            self.released = True
            return replies
        except Exception as e:
            # some stages may have released (their KV is gone) and others not: reconnecting makes every stage
            # forget every sequence, so the slots agree again (nothing runs here to hand back)
            self.fail(f"the stages could not all release their model: {e}")
            raise

    async def restore(self, timeout: float = 600.0) -> List[dict]:
        """Every stage loads its model again (the replies say how long it took)."""
        replies = await self.chain.request_all({"type": RESTORE}, timeout=timeout)
        self.released = False
        return replies

    # ------------------------------------------------------------------ requests
    async def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        """Token ids from the first stage's tokenizer."""
        if not self.healthy:
            raise PipelineError(self.error)
        return await self.chain.tokenize(text, add_special)

    def check(self, req: GenRequest) -> None:
        """Raise :class:`RequestError` if the request can never fit this pipeline."""
        n = int(req.prompt.shape[0])
        if n == 0:
            raise RequestError("the prompt is empty")
        if req.max_tokens < (0 if req.echo else 1):
            raise RequestError("max_tokens must be at least 1" + (" (0 with echo)" if not req.echo else ""))
        if self.n_ctx_lane and n + req.max_tokens > self.n_ctx_lane:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceeds the context "
                               f"window ({self.n_ctx_lane} tokens{' per lane' if self.lanes > 1 else ''})")
        if self.infos:
            vocab = int(self.first["n_vocab"])
            lo = -1 if req.media is not None else 0   # an image's rows are -1
            if int(req.prompt.min()) < lo or int(req.prompt.max()) >= vocab:
                raise RequestError(f"prompt token ids must be in 0..{vocab - 1}")
            if req.media is not None:
                if not self.first.get("vision"):
                    raise RequestError("this pipeline's first stage has no vision projector (--mmproj)")
                if req.media.largest > self.max_batch_tokens:
                    raise RequestError(f"an image takes {req.media.largest} rows; a step of this pipeline holds "
                                       f"at most {self.max_batch_tokens} (raise the stages' --batch)")

    def group_fits(self, n: int, need: int) -> bool:
        """n sequences of ``need`` KV cells each can ever run here together, in one lane, their rows in one step
        (an n > 1 group sharing one prefill); True while the pipeline was never sized."""
        if not self.max_seqs:
            return True
        return (n <= self.max_seqs // max(1, self.lanes) and n * need <= self.n_ctx_lane
                and n <= self.max_batch_tokens)

    def add(self, s: SeqState, front: bool = False) -> None:
        """Queue a sequence here (a replayed one goes to the front: it was admitted before the others); a group's
        leader brings its waiting choices (they share its prefill if the group can ever fit here, else each
        prefills itself)."""
        kids = [k for k in s.kids if not k.finished]
        if s.kids:
            s.ungroup()
            if kids and self.group_fits(1 + len(kids), s.need):
                s.kids = kids
                for k in kids:
                    k.fork_from = s
        s.pipeline = self
        if s.req.media is not None:
            self.media.send_for(s)
        if front:
            self.waiting.appendleft(s)
        else:
            self.waiting.append(s)
        for k in kids:
            k.pipeline = self
            self.waiting.append(k)
        self._wake.set()

    async def put_media(self, data: bytes) -> Any:
        """An image to this pipeline's first stage: its :class:`~molink_lite.wire.media.MediaLayout`."""
        if not self.healthy:
            raise PipelineError(self.error)
        return await self.media.put(data)

    def cancel(self, s: SeqState) -> None:
        """The client went away: stop generating and free the sequence on every stage."""
        if s.finished:
            return
        s.cancelled = True
        if s in self.waiting:
            self.waiting.remove(s)
            s.finished = True
            s.ungroup()
            return
        if not s.in_flight:
            self._release(s, cache=True)
        self._wake.set()

    # ------------------------------------------------------------------ the loop: schedule -> send -> apply
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.state != "up":
                continue
            try:
                if self.released:   # a request for a released pipeline (serving.idle): load the stages first
                    if not self.waiting:
                        continue
                    try:
                        await self.restore()
                    except (RemoteError, PipelineError, ConnectionError, asyncio.TimeoutError) as e:
                        self.fail(f"could not load the stages' model again: {e}")
                        continue
                self.slots.admit(self.waiting)
                if self.drafter is not None and self.spec_on and len(self.inflight) < self.max_inflight:
                    await self._draft()
                    if self.state != "up":
                        continue
                capped = True
                while len(self.inflight) < max(self.max_inflight, self.lanes):
                    picked = self._schedule()
                    if picked is None:
                        capped = False
                        break
                    self._send(*picked)
                if self.ring_on:
                    self._stop_rings(capped)
            except ChannelClosed as e:
                self.fail(str(e))
            except Exception as e:  # noqa: BLE001 - keep serving; hand back what was involved
                log.exception("scheduler error")
                self.fail(f"scheduler error: {e}")

    async def _draft(self) -> None:
        """Drafts from the draft model for the idle decoding sequences, waited for at most one step path round trip
        (what accepted drafts save, each); later ones serve the next step (serving/draft_model.py)."""
        idle = [s for s in self.active.values()
                if not s.in_flight and not s.prefilling and not s.finished and s.spec is not None and s.may_speculate]
        if idle:
            await self.drafter.fill(idle, self.spec.k, self.path_rtt_s or 0.0)

    def _schedule(self) -> Optional[tuple]:
        """(lane, rows) of the next step (:func:`~molink_lite.serving.scheduler.next_step`), or None."""
        busy = [0] * self.lanes
        for st in self.inflight.values():
            busy[st.lane] += 1
        return next_step(self.slots.by_lane(), busy, self.slots.lanes_freeing(), self.max_inflight,
                         self.max_batch_tokens, self.prefill_chunk, self.budget.rows, self.slots.cache.whole_only)

    def _send(self, lane: int, plan: StepPlan) -> None:
        """Build the step (drafts planned when speculating), send it, keep its record until it is back."""
        prefill_rows = sum(take for _, take in plan.prefill)
        for s, _ in plan.prefill:
            if s.snap_at and s.snap_at == s.prefilled and s.started:
                self.slots.snapshot_slot(s)
        drafts = (plan_drafts(plan.decode, prefill_rows, self.spec, self.cost, self.max_batch_tokens,
                              len(self.inflight), self.accept_prior) if self.spec_on else None)
        frame, rec = build_step(next(self._sids), plan.decode, plan.prefill, lane=lane, lanes=self.lanes,
                                drafts=drafts, pending_free=self.pending_free, spec=self.spec_on, ring=self.ring_on)
        try:
            self.channels[0].send(*frame.to_wire())
        except FrameError as e:  # cannot happen for checked requests; if it does, fail only this step's requests
            log.error("step %d could not be encoded: %s", rec.sid, e)
            for s, _ in rec.seqs:
                self._finish(s, error=f"internal error building a step: {e}")
            return
        self.slots.freed(frame.free)
        rec.mark_sent(time.perf_counter())
        self.inflight[rec.sid] = rec
        rec.count(self.stats, len(self.inflight))

    def _on_result(self, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        try:
            res = ResultFrame.decode(meta, arrays)
        except ProtocolError as e:
            self.fail(f"the last stage sent a malformed result: {e}")
            return
        rec = self.inflight.get(res.step)
        if rec is None:
            return  # a step whose sequences were moved away (drain) or a stale one
        if res.round != rec.round:
            self.fail(f"the last stage answered round {res.round} of step {res.step}; round {rec.round} was next")
            return
        now = time.perf_counter()
        if rec.n_prefill == 0 and rec.round == 0:  # decode rows all output logits (the LM head): prompt rows do
            self.cost.observe(rec.rows, now - rec.sent_at)  # not, so steps carrying them would skew the row cost
        ringed = rec.current() if rec.ring_slots else ()
        itl = apply_result(rec, res, now, owner=self, stats=self.stats, finish=self._finish, release=self._release,
                           observer=self.observer)
        if rec.ring_slots:
            rec.sent_at = now   # the ring goes on: its next round is the step the watchdog waits for
        else:
            del self.inflight[res.step]
        for s, _ in ringed:   # released while their ring ran: the ring let them go now
            if not s.ring and s.after_ring is not None:
                keep, s.after_ring = s.after_ring, None
                self._release(s, keep=keep)
        self.budget.update(itl, long_prefill_running(self.active.values(), self.prefill_chunk))
        self.stats["prefill_budget"] = self.budget.rows
        self._wake.set()

    def _on_step_error(self, err: StepErrorFrame) -> None:
        """A stage could not run a step: free its sequences here and hand them back to be replayed."""
        rec = self.inflight.pop(err.step, None)
        msg = f"stage {err.stage}: {err.message}"
        log.warning("pipeline %s: %s", self.name, msg)
        if rec is not None:
            for s, _ in rec.seqs:   # an image the first stage lost (evicted) is sent again on the replay
                if s.req.media is not None:
                    self.media.lost(s.req.media.ids)
            self._hand_back(apply_step_error(rec, self._release), msg)
            self._wake.set()

    def _finish(self, s: SeqState, reason: Optional[str] = None, error: Optional[str] = None) -> None:
        if s.end(reason, error):
            self.stats["failed" if error is not None else "completed"] += 1
        self._release(s, cache=error is None)

    def _release(self, s: SeqState, keep: bool = False, cache: bool = False) -> None:
        """Give the sequence's slot and KV back (``keep``: the request itself goes on elsewhere; ``cache``: it ended
        normally, so its KV may stay as a prefix cache entry). A sequence its ring still runs (a stop string, a
        client gone) is let go by the ring first: its slot is not free while stages still write its KV, and its
        KV (rounds past its end) is not kept as a prefix."""
        if not keep:
            s.finished = True
        if s.ring:
            if s.after_ring is None:
                s.after_ring = keep
                rec = self.inflight.get(s.ring)
                if rec is not None:
                    self._ring_stop(rec, [s.slot])
            return
        self.slots.release(s, cache=cache)
        self._wake.set()

    # ------------------------------------------------------------------ closing the ring (stage/ring.py)
    def _ring_stop(self, rec: StepRecord, slots: List[int]) -> None:
        """Ask the last stage to let these ringed sequences of step ``rec`` go at its next round."""
        try:
            self.channels[-1].send(RingStop(rec.sid, tuple(slots)).to_meta())
            self.stats["ring_stops"] += 1
        except ChannelClosed as e:
            self.fail(str(e))

    def _stop_rings(self, capped: bool) -> None:
        """End a ring when batching its sequences again pays (:func:`.ring_policy.ring_to_stop`)."""
        r = ring_policy.ring_to_stop(self.inflight.values(), self.max_inflight,
                                     lambda: capped and self._schedule() is not None)
        if r is not None:
            r.stopping = True
            self._ring_stop(r, sorted(r.ring_slots))

    # ------------------------------------------------------------------ the prefix cache
    def prefix_match(self, tokens, owner: Any = None) -> int:
        """Prompt tokens a request (of ``owner``) could reuse here now (cached entries, running sequences): for
        routing."""
        return self.slots.cache.match_len(tokens, self.active.values(), owner) if self.healthy else 0

    def prefix_stats(self) -> dict:
        """The prefix cache: entries, cells they hold (the same on every stage), budget, counters."""
        c = self.slots.cache
        return {**c.summary(), **c.stats}

    async def stage_stats(self) -> List[dict]:
        return await self.chain.stage_stats()


def _fail_lost(p: Pipeline, seqs: List[SeqState], message: str) -> None:
    """Default when no router takes sequences back: they end with the error."""
    for s in seqs:
        if s.end(error=message):
            p.stats["failed"] += 1
