"""Replicas and failover: which pipeline runs a request, and where it goes when that pipeline fails.

* **Balance**: a request goes to the up pipeline with the least load counted at the moment of
  choice (queued + running sequences and reserved KV), chosen and queued without an ``await`` in
  between, so a burst spreads over replicas.
* **Replay**: a failed or draining pipeline hands its unfinished sequences back; each is re-admitted
  at the front of the least-loaded up pipeline, or parked until one comes back (at most
  ``recover_timeout`` seconds, then it ends with an error). The sequence record holds everything
  needed: its prompt plus the tokens generated so far are prefilled again and decoding goes on; the
  client sees a pause, no token twice and none missing.
* **Admission**: at most ``max_queue`` requests wait for a slot (all pipelines together, parked
  ones included); more get :class:`Overloaded` (HTTP 429 with Retry-After).
* **Fair share**: a request waits here, in its owner's queue (the API key it came with), until a
  pipeline can take it now (a free slot and room for its KV reservation); then it goes to the
  least-loaded such pipeline. Owners are served least-used first (KV cells of their running
  requests), oldest request first among equals, and an owner whose next request does not fit yet
  holds back only owners using more than it. So one key's queue of large requests never stands in
  front of another key's request that fits (a FIFO would make every later request wait behind the
  first one that does not fit). With ``reserve_for_others`` (several API keys), an owner already
  running on a pipeline may not take its last free slot nor its last slot's worth of KV: a request of
  another key always finds room at once. Requests of one owner keep their order.
* **n > 1** (:meth:`Router.submit_group`): the n choices of one request go to one pipeline together, as one entry of
  the owner's queue (their leader, :attr:`SeqState.kids`), admitted into one lane; the leader prefills the prompt
  once and the others copy its KV (see :mod:`.step_builder`). Each choice reserves its own KV (prompt + max_tokens:
  the shared prefix is counted per choice). Once on a pipeline they are n sequences: cancelled, finished, handed
  back and replayed one by one (a replay prefills that choice's prompt + generated tokens on its own); a group that
  must wait for a pipeline to come back (parked) is parked as n sequences.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import replace
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import orjson

from ..wire.protocol import lane_of
from .pipeline import Pipeline, PipelineError, RequestError
from .sequence import GenRequest, SeqState

log = logging.getLogger(__name__)
MAX_REPLAYS = 5  # a sequence that kept failing this often ends with an error instead of looping
PREFIX_LOAD_SLACK = 0.25  # a pipeline holding a request's prefix takes it unless it is this much busier (Router.pick)


class Overloaded(RuntimeError):
    """The admission queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Router:
    """The pipelines (replicas) behind one gateway."""

    def __init__(self, pipelines: Sequence[Pipeline], *, recover_timeout: float = 60.0, max_queue: int = 1024,
                 reserve_for_others: bool = False):
        self.pipelines = list(pipelines)
        self.recover_timeout = recover_timeout
        self.max_queue = max_queue
        self.reserve_for_others = reserve_for_others
        self.parked: Deque[Tuple[SeqState, float]] = deque()  # (sequence, give-up time)
        # owner -> its requests not on a pipeline yet, oldest first (see "Fair share")
        self.pending: Dict[Any, Deque[SeqState]] = {}
        self._up = asyncio.Event()
        self.stats = {"replayed": 0, "parked": 0, "recovered": 0, "expired": 0, "overloaded": 0, "prefix_routed": 0}
        self._observer: Any = None
        for p in self.pipelines:
            p.on_lost = self._on_lost
            p.on_up = self._on_up
        self._refresh_up()

    @property
    def observer(self) -> Any:
        """Token timings of every pipeline go here (:class:`~molink_lite.serving.metrics.Metrics`)."""
        return self._observer

    @observer.setter
    def observer(self, obs: Any) -> None:
        self._observer = obs
        for p in self.pipelines:
            p.observer = obs

    def add(self, p: Pipeline) -> None:
        """A pipeline that came up after start (joined stages): it takes parked requests and new ones."""
        p.on_lost = self._on_lost
        p.on_up = self._on_up
        p.observer = self._observer
        self.pipelines.append(p)
        p.start_background()
        if p.healthy:
            self._on_up(p)

    # ------------------------------------------------------------------ state
    def up(self) -> List[Pipeline]:
        return [p for p in self.pipelines if p.healthy]

    def _refresh_up(self) -> None:
        if self.up():
            self._up.set()
        else:
            self._up.clear()

    @property
    def queued(self) -> int:
        return (len(self.parked) + sum(len(q) for q in self.pending.values())
                + sum(len(p.waiting) for p in self.pipelines))

    @property
    def status(self) -> str:
        n = len(self.up())
        return "unavailable" if not n else "ok" if n == len(self.pipelines) else "degraded"

    def describe(self) -> List[dict]:
        out = []
        for p in self.pipelines:
            d = p.summary()
            if p.state == "down" and any(s for s, _ in self.parked):
                d["state"] = "recovering"  # its requests wait for it (or another pipeline) to come back
            out.append(d)
        return out

    def any(self) -> Pipeline:
        """A pipeline to read model facts from (the first up one, else the first)."""
        ups = self.up()
        if not ups and not self.pipelines:
            raise PipelineError("no pipeline yet (stages are still joining)")
        return ups[0] if ups else self.pipelines[0]

    async def wait_up(self, timeout: Optional[float] = None) -> Pipeline:
        """The least-loaded up pipeline, waiting up to ``timeout`` (default recover_timeout) for one."""
        ups = self.up()
        if not ups:
            try:
                await asyncio.wait_for(self._up.wait(), self.recover_timeout if timeout is None else timeout)
            except asyncio.TimeoutError:
                errs = "; ".join(f"{p.name}: {p.error}" for p in self.pipelines)
                raise PipelineError(f"no pipeline is available ({errs})") from None
            ups = self.up()
            if not ups:
                raise PipelineError("no pipeline is available")
        return min(ups, key=lambda p: p.load)

    # ------------------------------------------------------------------ requests
    async def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        """Tokens from an up pipeline's first stage; waits (bounded) during an outage, retries once on a failure."""
        for attempt in range(2):
            p = await self.wait_up()
            try:
                return await p.tokenize(text, add_special=add_special)
            except (PipelineError, ConnectionError, asyncio.TimeoutError):
                if attempt:
                    raise
        raise PipelineError("tokenization failed")  # pragma: no cover

    def submit(self, req: GenRequest) -> SeqState:
        """Queue a request in its owner's queue, from which it goes to a pipeline as soon as one can take it (now,
        if one can), or park it until a pipeline is up."""
        ups, target = self._admit(req)
        s = SeqState(req=req, events=asyncio.Queue())
        self._enqueue([s], target)
        return s

    def _admit(self, req: GenRequest) -> Tuple[List[Pipeline], Optional[Pipeline]]:
        """Refuse a request the queue or the pipelines cannot take (raises); else the up pipelines and the
        least-loaded of them (None: park until one is up)."""
        if self.queued >= self.max_queue:
            self.stats["overloaded"] += 1
            raise Overloaded(f"{self.queued} requests are already waiting (--max-queue {self.max_queue}); "
                             f"retry shortly")
        ups = self.up()
        target = min(ups, key=lambda p: p.load) if ups else None
        (target or self.any()).check(req)
        try:  # what goes into a step must serialize: a bad request fails alone, never a whole step
            orjson.dumps(req.params.validate().to_dict())
        except (TypeError, ValueError) as e:
            raise RequestError(f"invalid sampling parameters: {e}") from None
        return ups, target

    def _enqueue(self, entries: List[SeqState], target: Optional[Pipeline]) -> None:
        """Queue admitted sequences in their owner's queue (dispatching now), or park them until a pipeline is up."""
        if target is not None:
            self.pending.setdefault(entries[0].req.owner, deque()).extend(entries)
            self.dispatch()
        else:
            for x in entries:
                self._park(x)

    def submit_group(self, req: GenRequest, n: int) -> List[SeqState]:
        """Queue ``n`` choices of one request (OpenAI's ``n``) that share one prefill; returns their sequences, choice
        i at index i (n <= 1: ``[submit(req)]``). Each choice gets its own copy of ``req``; with a seed, choice i
        samples with ``seed + i`` (mod 2**32). Counts as one request against ``max_queue``; raises like
        :meth:`submit`. A one-token prompt, or a group that no up pipeline could ever hold in one lane, runs as n
        independent sequences (each prefills the prompt)."""
        if n <= 1:
            return [self.submit(req)]
        ups, target = self._admit(req)
        seed = req.params.seed
        reqs = [replace(req, params=req.params if seed is None else replace(req.params, seed=(seed + i) % 2**32))
                for i in range(n)]
        seqs = [SeqState(req=r, events=asyncio.Queue()) for r in reqs]
        for x in seqs[1:]:
            x.t_submit = seqs[0].t_submit
        share = int(req.prompt.shape[0]) > 1 and (not ups or any(p.group_fits(n, seqs[0].need) for p in ups))
        if share:
            leader, group = seqs[0], tuple(seqs)
            leader.kids = list(seqs[1:])
            for x in seqs:
                x.group = group
                if x is not leader:
                    x.fork_from = leader
        self._enqueue(seqs[:1] if share else seqs, target)
        return seqs

    def cancel(self, s: SeqState) -> None:
        """The client went away (n > 1: call it for each choice)."""
        if s.finished:
            return
        for i, (p, _) in enumerate(self.parked):
            if p is s:
                del self.parked[i]
                s.cancelled = s.finished = True
                return
        q = self.pending.get(s.req.owner)
        if q is not None and s.pipeline is None and any(x is s for x in q):
            i = next(j for j, x in enumerate(q) if x is s)
            del q[i]
            kids = [k for k in s.kids if not k.finished]
            s.ungroup()   # its choices stay queued, each on its own
            for k in reversed(kids):
                q.insert(i, k)
            if not q:
                del self.pending[s.req.owner]
            s.cancelled = s.finished = True
            return
        if s.pipeline is not None:
            s.pipeline.cancel(s)
        else:
            s.cancelled = s.finished = True
            s.ungroup()   # a choice still queued with its leader
        self.dispatch()

    def release(self, s: SeqState) -> None:
        """A request is over (answered, failed or cancelled): its slot may take a waiting request."""
        self.dispatch()

    # ------------------------------------------------------------------ fair share
    def _usage(self) -> Dict[Any, int]:
        """KV cells reserved by each owner's requests on the pipelines (running or about to be)."""
        used: Dict[Any, int] = {}
        for p in self.pipelines:
            for s in itertools.chain(p.active.values(), p.waiting):
                if not s.finished:
                    used[s.req.owner] = used.get(s.req.owner, 0) + s.need
        return used

    def fits(self, p: Pipeline, s: SeqState) -> bool:
        """Pipeline ``p`` (up) can admit ``s`` now: a free slot and room for its KV reservation, counting the
        sequences already queued there; with ``reserve_for_others``, an owner already running there leaves one
        slot and one slot's worth of KV free for other owners."""
        k = 1 + sum(1 for x in s.kids if not x.finished)   # a group comes in whole, in one lane
        need = s.need * k
        if p.n_ctx_lane and need > p.n_ctx_lane:
            return False
        waiting = list(p.waiting)
        free_slots = p.max_seqs - len(p.active) - len(waiting)
        free_kv = p.n_ctx - p.kv_reserved - sum(w.need for w in waiting)
        if free_slots < k or need > free_kv:
            return False
        if p.lanes > 1 and not any(p.n_ctx_lane - used >= need for used in p.kv_lane):
            return False
        if k > 1 and p.lanes > 1 and not any(
                sum(1 for x in p.free_slots if lane_of(x, p.lanes) == lane) >= k for lane in range(p.lanes)):
            return False
        if self.reserve_for_others and (free_slots < k + 1 or need > free_kv - p.n_ctx // max(1, p.max_seqs)):
            owner = s.req.owner
            if any(x.req.owner == owner and not x.finished for x in itertools.chain(p.active.values(), waiting)):
                return False
        return True

    def dispatch(self) -> int:
        """Move waiting requests onto pipelines that can take them now (see "Fair share"); returns how many."""
        if not self.pending:
            return 0
        ups = self.up()
        if not ups:
            return 0   # they wait for a pipeline; expire_parked parks them with a deadline if none comes back
        moved = 0
        while self.pending:
            used = self._usage()
            order = sorted(self.pending.items(), key=lambda kv: (used.get(kv[0], 0), kv[1][0].t_submit))
            progressed = False
            for owner, q in order:
                s = q[0]
                if s.finished:          # ended while waiting here
                    q.popleft()
                else:
                    fit = [p for p in ups if self.fits(p, s)]
                    if not fit:
                        break           # owners using more wait behind this one
                    q.popleft()
                    self.pick(fit, s).add(s)
                    moved += 1
                if not q:
                    del self.pending[owner]
                progressed = True
                break
            if not progressed:
                break
        return moved

    def pick(self, pipes: Sequence[Pipeline], s: SeqState) -> Pipeline:
        """Where a sequence goes: the least-loaded pipeline, unless another holds a longer prefix of its feed
        (prefix cache: cached entries or running sequences) and is at most PREFIX_LOAD_SLACK busier (a quarter of
        its slots or KV): then the one holding the longest prefix (ties: the least loaded)."""
        least = min(pipes, key=lambda p: p.load)
        if len(pipes) == 1:
            return least
        near = [p for p in pipes if p.load <= least.load + PREFIX_LOAD_SLACK]
        k, _, i = max((p.prefix_match(s.feed, s.req.owner), -p.load, -i) for i, p in enumerate(near))
        if k > 0:
            self.stats["prefix_routed"] += near[-i] is not least
            return near[-i]
        return least

    async def dispatch_forever(self, interval: float = 0.05) -> None:
        """Catch every freed slot: sequences also end inside a pipeline (a cancelled one once its step is back)."""
        while True:
            await asyncio.sleep(interval)
            if self.pending:
                self.dispatch()

    # ------------------------------------------------------------------ failover
    def _park(self, s: SeqState) -> None:
        members = [s] + [k for k in s.kids if not k.finished]
        s.ungroup()   # a parked group comes back as n sequences
        for m in members:
            m.pipeline = None
            self.parked.append((m, time.monotonic() + self.recover_timeout))
            self.stats["parked"] += 1

    def _park_pending(self) -> None:
        for q in self.pending.values():
            for s in q:
                if not s.finished:
                    self._park(s)
        self.pending.clear()

    def _on_lost(self, p: Pipeline, seqs: List[SeqState], message: str) -> None:
        """A pipeline handed sequences back: replay them elsewhere, or park them until one is up."""
        self._refresh_up()
        replayed = 0
        for s in seqs:
            if s.cancelled:
                s.finished = True
                continue
            if s.replays > MAX_REPLAYS:
                s.end(error=f"gave up after {MAX_REPLAYS} replays; last failure: {message}")
                continue
            ups = self.up()
            if ups:
                self.pick(ups, s).add(s, front=True)
                replayed += 1
            else:
                self._park(s)
        self.stats["replayed"] += replayed
        log.warning("%s: %d sequence(s) re-admitted on an up pipeline, %d waiting for one to come back",
                    message, replayed, len(seqs) - replayed)
        if not self.up():   # nothing to wait for here any more: waiting requests get the recovery deadline too
            self._park_pending()

    def _on_up(self, p: Pipeline) -> None:
        """A pipeline is (back) up: it takes the parked sequences, oldest first, and waiting requests that fit."""
        self._refresh_up()
        n = 0
        while self.parked:
            s, _ = self.parked.popleft()
            if s.finished:
                continue
            p.add(s)
            n += 1
        if n:
            self.stats["recovered"] += n
            log.info("pipeline %s took %d parked sequence(s)", p.name, n)
        self.dispatch()

    async def expire_parked(self, interval: float = 0.5) -> None:
        """End parked sequences whose wait passed ``recover_timeout`` (and keep the up-flag fresh)."""
        while True:
            await asyncio.sleep(interval)
            self._refresh_up()
            if self.pending and not self.up():   # every pipeline went down: the waiting get the deadline too
                self._park_pending()
            now = time.monotonic()
            keep: Deque[Tuple[SeqState, float]] = deque()
            for s, deadline in self.parked:
                if s.finished:
                    continue
                if now > deadline:
                    errs = "; ".join(f"{p.name}: {p.error}" for p in self.pipelines)
                    s.end(error=f"no pipeline came back within {self.recover_timeout:g} s ({errs})")
                    self.stats["expired"] += 1
                else:
                    keep.append((s, deadline))
            self.parked = keep
            ups = self.up()
            if self.parked and ups:
                self._on_up(min(ups, key=lambda q: q.load))
