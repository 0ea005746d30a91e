"""Fencing: which gateway controls this stage, since when, and the fencing epoch.

A ``configure`` names the controlling gateway (``gateway``: a random id per pipeline; a gateway that names
none is its link) and may ask to take the stage over (``takeover``). While the controlling gateway's link is
connected (it answers a ping), a ``configure`` from another gateway is refused (``error`` with ``code:
"fenced"`` and the fencing ``epoch``) unless it asks to take over; a takeover, or a new gateway after the
previous one went away (a restart), bumps the epoch, and the previous head is disconnected (close code
``CLOSE_REPLACED``, reason ``fenced off: ... epoch N``). The same gateway reconnecting replaces its own older
link. The reply (``configured``) carries the epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Dict, Optional, Tuple

from ..wire.channel import Channel
from ..wire.protocol import ERROR

log = logging.getLogger(__name__)

HEAD_PING_TIMEOUT = 3.0  # a controlling gateway that does not answer a ping within this is taken as gone


class Fencing:
    """The controller of one stage; counts ``epoch``, ``takeovers`` and ``refused_configures`` in ``stats``."""

    def __init__(self, stats: Dict[str, float], stage: str):
        self.stats = stats
        for k in ("epoch", "takeovers", "refused_configures"):
            stats.setdefault(k, 0)
        self.stage = stage  # "a-b", for messages
        self.controller: Optional[str] = None
        self.since = 0.0
        self.epoch = 0
        self.lock = asyncio.Lock()  # one configure at a time: a fencing decision must not interleave with another
        self._refusals_logged: Dict[str, float] = {}

    async def admit(self, gid: str, takeover: bool, ch: Channel, old: Optional[Channel]) -> Tuple[Optional[dict], bool]:
        """May gateway ``gid`` (on ``ch``) configure this stage while ``old`` is its live head? Returns (the refusal
        to reply, or None; whether it takes the stage from a live controller)."""
        if old is None or gid == self.controller or not await head_alive(old):
            return None, False
        if takeover:
            return None, True
        self.stats["refused_configures"] += 1
        since = datetime.fromtimestamp(self.since, timezone.utc).isoformat(timespec="seconds")
        if time.monotonic() - self._refusals_logged.get(gid, -1e9) > 60:  # a fenced gateway retries often
            self._refusals_logged = {gid: time.monotonic()} if len(self._refusals_logged) > 64 \
                else {**self._refusals_logged, gid: time.monotonic()}
            log.warning("refused configure from gateway %s (%s): controlled by gateway %s since %s (epoch %d); it "
                        "retries (logged once a minute)", gid[:16], ch.name, (self.controller or "?")[:16], since,
                        self.epoch)
        return {"type": ERROR, "code": "fenced", "epoch": self.epoch, "since": since,
                "message": f"stage {self.stage} is controlled by another gateway since {since} (fencing epoch "
                           f"{self.epoch}); start this gateway with --takeover to take it over"}, False

    def take(self, gid: str, ch: Channel, forced: bool, replacing: bool) -> str:
        """Gateway ``gid`` controls this stage now (``forced``: it took it over, ``replacing``: from a live head);
        returns the reason the previous head's link is closed with ("" for none in particular)."""
        if gid == self.controller:
            return "replaced by a newer link of the same gateway" if replacing else ""
        self.epoch += 1
        self.stats["epoch"] = self.epoch
        prev, self.controller, self.since = self.controller, gid, time.time()
        if forced:
            self.stats["takeovers"] += 1
            log.warning("gateway %s (%s) took this stage over from gateway %s (--takeover); fencing epoch %d",
                        gid[:16], ch.name, (prev or "?")[:16], self.epoch)
        elif prev is not None:
            log.info("now controlled by gateway %s (%s); fencing epoch %d", gid[:16], ch.name, self.epoch)
        return f"fenced off: another gateway took over this stage (fencing epoch {self.epoch})"


async def head_alive(head: Channel) -> bool:
    """Does the connected pipeline head still answer (a WebSocket ping, within HEAD_PING_TIMEOUT)? A gateway that
    crashed or lost its network may still look connected here for a while."""
    try:
        waiter = await head.ws.ping()
        await asyncio.wait_for(waiter, HEAD_PING_TIMEOUT)
        return not head.closed.is_set()
    except Exception:  # noqa: BLE001 - closed, timed out: gone
        return False


__all__ = ["Fencing", "head_alive", "HEAD_PING_TIMEOUT"]
