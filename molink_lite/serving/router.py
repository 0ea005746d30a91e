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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Deque, List, Optional, Sequence, Tuple

import numpy as np
import orjson

from .pipeline import Pipeline, PipelineError, RequestError
from .sequence import GenRequest, SeqState

log = logging.getLogger(__name__)
MAX_REPLAYS = 5  # a sequence that kept failing this often ends with an error instead of looping


class Overloaded(RuntimeError):
    """The admission queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Router:
    """The pipelines (replicas) behind one gateway."""

    def __init__(self, pipelines: Sequence[Pipeline], *, recover_timeout: float = 60.0, max_queue: int = 1024):
        self.pipelines = list(pipelines)
        self.recover_timeout = recover_timeout
        self.max_queue = max_queue
        self.parked: Deque[Tuple[SeqState, float]] = deque()  # (sequence, give-up time)
        self._up = asyncio.Event()
        self.stats = {"replayed": 0, "parked": 0, "recovered": 0, "expired": 0, "overloaded": 0}
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
        return len(self.parked) + sum(len(p.waiting) for p in self.pipelines)

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
        """Queue a request on the least-loaded up pipeline now (or park it until one is up)."""
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
        s = SeqState(req=req, events=asyncio.Queue())
        if target is not None:
            target.add(s)
        else:
            self._park(s)
        return s

    def cancel(self, s: SeqState) -> None:
        """The client went away."""
        if s.finished:
            return
        for i, (p, _) in enumerate(self.parked):
            if p is s:
                del self.parked[i]
                s.cancelled = s.finished = True
                return
        if s.pipeline is not None:
            s.pipeline.cancel(s)
        else:
            s.cancelled = s.finished = True

    # ------------------------------------------------------------------ failover
    def _park(self, s: SeqState) -> None:
        s.pipeline = None
        self.parked.append((s, time.monotonic() + self.recover_timeout))
        self.stats["parked"] += 1

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
                min(ups, key=lambda q: q.load).add(s, front=True)
                replayed += 1
            else:
                self._park(s)
        self.stats["replayed"] += replayed
        log.warning("%s: %d sequence(s) re-admitted on an up pipeline, %d waiting for one to come back",
                    message, replayed, len(seqs) - replayed)

    def _on_up(self, p: Pipeline) -> None:
        """A pipeline is (back) up: it takes the parked sequences, oldest first."""
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

    async def expire_parked(self, interval: float = 0.5) -> None:
        """End parked sequences whose wait passed ``recover_timeout`` (and keep the up-flag fresh)."""
        while True:
            await asyncio.sleep(interval)
            self._refresh_up()
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
