"""Keeping one pipeline's chain of stages up: connect, notice failure, fence, reconnect.

States: ``connecting`` (never up yet), ``up``, ``down`` (failed, or a stage is leaving, or a stage lost its link
to the next stage: the pipeline handed its sequences back; the reconnect loop keeps trying and the pipeline comes
back by itself).

What takes a pipeline down: a link to a stage closes; a stage reports ``link_down`` (it lost its link to the next
stage, so steps sent into it may be lost) or ``drain`` (it is shutting down); a step gets no answer within
``step_timeout`` (the watchdog). What brings it back: :meth:`ChainLifecycle.reconnect_forever`, woken early by a
stage's ``link_up``.

Fencing: a pipeline names itself to its stages with a random id (``configure``); a stage controlled by another
connected pipeline refuses it (:class:`~molink_lite.serving.chain.FencedError`) unless it asks to ``takeover``,
which it does on its first connect only. A pipeline whose stages were taken over (its link closed with
``CLOSE_REPLACED`` and a "fenced off" reason) stays down and keeps retrying without taking over, so two gateways
never take stages back and forth; it comes back when the other gateway goes away.

Measuring (on connect): each stage-to-stage link's round trip and bandwidth (:meth:`Chain.probe`, for the prefill
chunk) and a step's whole path, gateway -> stages -> gateway (for ``--speculative auto`` and the step cost model).
While up, the links are measured again every ``relink_s`` seconds (:meth:`ChainLifecycle.relink`): a link that got
slower or faster changes the link-aware codec and micro-batches (:mod:`.link_policy`) without a reconnect.

The pipeline decides what a failure means for its sequences and how to size steps for a chain: the
:class:`ChainUser` hooks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Protocol

import numpy as np

from ..wire.auth import CLOSE_REPLACED
from ..wire.channel import Channel
from ..wire.protocol import (DRAIN, ERROR, LINK_DOWN, LINK_UP, PING, RESULT, STEP_ERROR, LinkDown, LinkUp,
                             StepErrorFrame)
from .chain import Chain, FencedError, PipelineError

log = logging.getLogger(__name__)


class ChainUser(Protocol):
    """What :class:`ChainLifecycle` needs from the pipeline it keeps up (:class:`~molink_lite.serving.pipeline.
    Pipeline`)."""

    name: str
    inflight: Dict[int, Any]  # steps in flight, each with ``sid`` and ``sent_at`` (the watchdog reads them)

    async def connect(self, timeout: float = 60.0) -> None:
        """Connect through :meth:`ChainLifecycle.connect`, then start scheduling."""

    def fail(self, message: str) -> None:
        """Go down (:meth:`ChainLifecycle.go_down`) and hand the sequences back."""

    link_choice: Any  # the codec and micro-batches it runs with (link_policy.LinkChoice), None before a connect

    async def _choose_link_settings(self, infos: List[dict]) -> None:
        """Choose codec and micro-batches from ``links`` and ``path_rtt_s`` (tells the stages a new codec)."""

    def _size_for(self, infos: List[dict]) -> None:
        """Size steps and slots for a chain just opened; :class:`PipelineError` if it cannot be used."""

    def _on_result(self, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        """A ``result`` frame (decoded there: a malformed one fails the pipeline)."""

    def _on_step_error(self, err: StepErrorFrame) -> None:
        """A stage could not run a step."""


class ChainLifecycle:
    """State, fencing, failure detection and reconnection of one chain (``chain``) run by ``user``."""

    def __init__(self, chain: Chain, user: ChainUser, *, step_timeout: float, takeover: bool, probe_links: bool,
                 measure_path: bool, relink_s: float = 0.0):
        self.chain = chain
        self.user = user
        self.step_timeout = step_timeout
        self.probe_links = probe_links      # measure the stage-to-stage links on every connect (auto chunk size)
        self.measure_path = measure_path    # measure a step's path on every connect (speculative decoding)
        self.state = "connecting"
        self.error = "not connected"
        # fencing: who this pipeline is to its stages; take stages held by another gateway (first connect only)
        self.controller_id = secrets.token_hex(8)
        self.takeover = takeover
        self.fenced = ""  # why this pipeline's stages belong to another gateway now ("" when they do not)
        self._link_down = ""  # a stage reported its link to the next stage lost (while connecting)
        self._kick = asyncio.Event()  # wakes the reconnect loop early (a stage's link is back)
        self.links: List[dict] = []  # measured stage-to-stage links
        self.path_rtt_s: Optional[float] = None  # gateway -> stages -> gateway, measured at connect
        self.first_rtt_s: Optional[float] = None  # gateway -> first stage -> gateway (the best of 3 pings)
        self.events: Deque[dict] = deque(maxlen=50)  # failures and recoveries, newest last
        self.relink_s = relink_s  # measure the links again this often while up (0: only at connect)
        self._bg: List[asyncio.Task] = []

    @property
    def name(self) -> str:
        return self.user.name

    # ------------------------------------------------------------------ up
    async def connect(self, timeout: float) -> bool:
        """Open the chain (checked, linked, fenced), measure it, let the user size itself for it, go up.

        Returns whether the pipeline came back (it was down)."""
        self._link_down = ""
        takeover = self.takeover and not self.fenced
        try:
            await self.chain.open(timeout, self._on_frame, self._on_closed, gateway_id=self.controller_id,
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
        if self.probe_links:
            self.links = await self.chain.probe()
        if self.measure_path:
            await self._measure_path()
        try:
            await self.user._choose_link_settings(self.chain.infos)
            self.user._size_for(self.chain.infos)
        except PipelineError:
            await self.chain.close()
            raise
        gone = [ch.name for ch in self.chain.channels if ch.closed.is_set()]
        if gone or self._link_down:  # lost while connecting: not up; the reconnect loop tries again
            await self.chain.close()
            raise PipelineError(f"pipeline {self.name}: " + (self._link_down or f"{gone[0]} disconnected while "
                                                                                 f"connecting"))
        self.fenced = ""
        was = self.state
        self.state, self.error = "up", ""
        if was == "down":
            self.events.append({"at": time.time(), "event": "up", "message": "reconnected"})
        return was == "down"

    async def _measure_path(self) -> None:
        """Round trip of a step's path (gateway -> first stage -> ... -> last stage -> gateway): half of the
        gateway's pings to the first and last stages plus half of each stage-to-stage link's."""
        if not self.links and len(self.chain.urls) > 1:
            self.links = await self.chain.probe()
        try:
            pings = []
            for ch in (self.chain.channels[0], self.chain.channels[-1]):
                best = None
                for _ in range(3):
                    t0 = time.perf_counter()
                    await ch.request({"type": PING}, {"pad": np.zeros(16, np.uint8)}, timeout=30)
                    dt = time.perf_counter() - t0
                    best = dt if best is None else min(best, dt)
                pings.append(best)
        except Exception as e:  # noqa: BLE001 - measuring is best effort
            log.warning("could not measure the step path: %s", e)
            pings = [0.0, 0.0]
            self.first_rtt_s = None
        else:
            self.first_rtt_s = pings[0]   # the hop a closed ring saves (serving.pipeline.Pipeline.ring_on)
        self.path_rtt_s = (sum(pings) + sum(k["rtt_ms"] / 1e3 for k in self.links)) / 2

    # ------------------------------------------------------------------ down
    def go_down(self, message: str) -> bool:
        """The chain is broken: state ``down``, links closed; False if it was down already."""
        if self.state == "down":
            return False
        log.error("pipeline %s down: %s", self.name, message)
        self.state, self.error = "down", message
        self.events.append({"at": time.time(), "event": "down", "message": message})
        self.chain.close_soon()
        return True

    async def _on_frame(self, ch: Channel, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        kind = meta.get("type")
        if kind == RESULT:
            self.user._on_result(meta, arrays)
        elif kind == STEP_ERROR:
            self.user._on_step_error(StepErrorFrame.decode(meta))
        elif kind == DRAIN:  # a stage is shutting down: move its sequences now, then let it go
            self.user.fail(f"{ch.name} is shutting down (drain)")
        elif kind == LINK_DOWN:  # a stage lost its link to the next stage: steps sent into it may be lost
            down = LinkDown.decode(meta)
            msg = (f"stage {down.stage} ({ch.name}) lost its link to the next stage {down.to}: {down.reason}; it is "
                   f"reconnecting")
            if ch in self.chain.channels and self.state == "up":
                self.user.fail(msg)
            elif ch in self.chain.opening and not ch.closed.is_set():
                self._link_down = msg  # while connecting: this attempt must not bring the pipeline up
        elif kind == LINK_UP:  # the link is back: try to come back now rather than at the next retry
            up = LinkUp.decode(meta)
            log.info("pipeline %s: stage %s reconnected to the next stage %s", self.name, up.stage, up.to)
            self._kick.set()
        elif kind == ERROR:
            log.warning("stage reported: %s", meta.get("message"))

    def _on_closed(self, ch: Channel, url: str) -> None:
        reason = ch.peer_close_reason
        if ch.peer_close_code == CLOSE_REPLACED and reason.startswith("fenced off"):
            # another gateway took this stage over (--takeover): never take it back; retry only without takeover
            self.takeover = False
            if not self.fenced:
                log.error("pipeline %s: stage %s was taken over by another gateway: %s", self.name, url, reason)
            self.fenced = f"stage {url}: {reason}"
            if ch in self.chain.channels and self.state == "up":
                self.user.fail(f"fenced off: another gateway took over stage {url} ({reason}); this gateway does "
                               f"not take it back and serves again only when that gateway lets go")
            return
        if ch in self.chain.channels and self.state == "up":
            self.user.fail(f"stage {url} disconnected ({ch.close_reason})")

    # ------------------------------------------------------------------ background
    def start_background(self) -> None:
        """The watchdog and the reconnect loop (once)."""
        if not self._bg:
            self._bg = [asyncio.ensure_future(self.watchdog()), asyncio.ensure_future(self.reconnect_forever())]
            if self.relink_s > 0:
                self._bg.append(asyncio.ensure_future(self.relink_forever()))

    async def close(self) -> None:
        self.state = "down"
        for t in self._bg:
            t.cancel()
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
                await self.user.connect(timeout=max(interval, 2.0))
            except (PipelineError, OSError) as e:
                self.error = str(e)

    async def relink_forever(self) -> None:
        """Measure the links of an up pipeline again every ``relink_s`` seconds (:meth:`relink`)."""
        while True:
            await asyncio.sleep(self.relink_s)
            if self.state == "up":
                try:
                    await self.relink()
                except Exception as e:  # noqa: BLE001 - measuring is best effort; a broken link is seen elsewhere
                    log.warning("pipeline %s: measuring the links again failed: %s", self.name, e)

    async def relink(self) -> None:
        """Measure the stage-to-stage links and the step path again and let the pipeline choose its codec and
        micro-batches anew (``_choose_link_settings``); a change is logged and kept in ``events``."""
        before = self.user.link_choice
        self.links = await self.chain.probe()
        await self._measure_path()
        await self.user._choose_link_settings(self.chain.infos)
        after = self.user.link_choice
        if after is not None and (before is None or (before.codec, before.micro_batches) !=
                                  (after.codec, after.micro_batches)):
            self.events.append({"at": time.time(), "event": "links", "message": after.why})

    async def watchdog(self, interval: float = 5.0) -> None:
        """Fail steps that never came back (a frame was lost; hung stages are caught by heartbeats first)."""
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            late = [st for st in self.user.inflight.values() if now - st.sent_at > self.step_timeout]
            if late and self.state == "up":
                self.user.fail(f"step {late[0].sid} got no answer within {self.step_timeout:.0f} s")
