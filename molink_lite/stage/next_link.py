"""A stage's link to the next stage: dialled as its ``upstream``, checked, kept, and probed.

:meth:`NextLink.connect` dials the next stage (the cluster-secret handshake in the ``upstream`` role, then
``hello``: the next stage must continue this one, :func:`~molink_lite.wire.protocol.chain_mismatch`); a next
stage with no free slot is retried for a while. The link is kept: when it is lost for any reason (taken over
by another ``upstream`` link, reset, the next stage gone), the pipeline head is told
(:class:`~molink_lite.wire.protocol.LinkDown`: steps sent since may be lost, so the head fails the pipeline
over) and the same URL is redialled with backoff (0.1 s doubling to 2 s) until the link is back
(:class:`~molink_lite.wire.protocol.LinkUp`), or a ``configure`` links the stage anew.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Dict, Optional

import numpy as np

from ..wire import auth
from ..wire.auth import AuthError, LinkKey
from ..wire.channel import Channel, ChannelClosed, RemoteError
from ..wire.protocol import ERROR, HELLO, PING, LinkDown, LinkUp, chain_mismatch
from .conn_slots import BUSY

log = logging.getLogger(__name__)

REPLY_MAX_BYTES = 64 << 20  # what a stage accepts on its own link to the next stage (replies only)
NEXT_RETRY = (0.1, 2.0)     # reconnecting to the next stage: first delay, longest delay (doubling)
NEXT_DIAL_PATIENCE = 5.0    # configure: how long a busy next stage is retried before configure fails


class NextLink:
    """The link to the next stage: one dial at a time; each link (generation) has a keeper that rebuilds it.

    ``describe()``: this stage's info (the next stage must continue it); ``tell_head(meta)``: a message to the
    pipeline head; counts ``next_link_losses`` and ``next_link_reconnects`` in ``stats``."""

    def __init__(self, key: Optional[LinkKey], stats: Dict[str, float], stage: str,
                 describe: Callable[[], dict], tell_head: Callable[[dict], None], *, role: str = "upstream",
                 check: Callable[[dict, dict], Optional[str]] = chain_mismatch, what: str = "next"):
        self.key = key
        self.stats = stats
        # the same keeper serves the last stage's ring link to the first stage (stage/ring.py): another role, another
        # check of the peer, its own counters
        self.role, self._check, self.what = role, check, what
        self._losses, self._reconnects = f"{what}_link_losses", f"{what}_link_reconnects"
        for k in (self._losses, self._reconnects):
            stats.setdefault(k, 0)
        self.stage = stage  # "a-b", for messages
        self._describe, self._tell_head = describe, tell_head
        self.ch: Optional[Channel] = None
        self.url: Optional[str] = None
        self._lock = asyncio.Lock()
        self._gen = 0
        self._notified_gen = -1  # the link generation whose loss the head was told about
        self._since = 0.0
        self._delay = NEXT_RETRY[0]
        self._keepers: set = set()
        self._closing = False

    @property
    def up(self) -> bool:
        return self.ch is not None and not self.ch.closed.is_set()

    async def connect(self, url: str) -> None:
        """Link to the next stage at ``url`` (kept: a lost link is rebuilt by its keeper)."""
        async with self._lock:
            if self.up and self.url == url:
                return
            if url != self.url:  # another next stage: the keeper of the previous link stops
                self._gen += 1
                if self.ch is not None:
                    await self.ch.close()
            # (the same URL with the link down: its keeper goes on retrying if this dial fails too)
            ch = await self._dial(url, NEXT_DIAL_PATIENCE)
            self._set(ch, url)

    def send(self, data: bytes) -> Optional[str]:
        """Queue an encoded step for the next stage; returns why it cannot go (the head was told the link is
        down first), or None."""
        ch = self.ch
        if ch is None or ch.closed.is_set():
            if ch is not None:  # lost: the head hears of it before this step's error
                self.notify_down(ch.close_reason or "connection lost")
            return f"stage {self.stage} has no connection to the {self.what} stage"
        try:
            ch.send_bytes(data)
        except ChannelClosed as e:
            self.notify_down(str(e))
            return str(e)
        return None

    def notify_down(self, reason: str) -> None:
        """Tell the head (once per lost link) that steps sent to the next stage may be lost."""
        if self._notified_gen == self._gen:
            return
        self._notified_gen = self._gen
        self._tell_head(LinkDown(self.stage, self.url, reason).to_meta())

    async def probe(self, asked: object, largest: int) -> dict:
        """The reply to ``probe_next``: round-trip time and bandwidth of the link (a small and a large ping of
        about ``asked`` bytes, at most ``largest``)."""
        if not self.up:
            return {"type": "probe", "rtt_s": None, "mbit": None}
        asked = asked if isinstance(asked, int) and not isinstance(asked, bool) else 1 << 20
        big = int(min(max(asked, 1 << 14), min(16 << 20, largest)))
        try:
            rtts = []
            for _ in range(3):
                t0 = time.perf_counter()
                await self.ch.request({"type": PING}, {"pad": np.zeros(16, np.uint8)}, timeout=30)
                rtts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await self.ch.request({"type": PING}, {"pad": np.zeros(big, np.uint8)}, timeout=60)
            t_big = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            return {"type": ERROR, "message": f"probing the next stage failed: {e}"}
        rtt = min(rtts)
        return {"type": "probe", "rtt_s": rtt, "mbit": big * 8 / 1e6 / max(t_big - rtt, 1e-6)}

    def stop(self) -> None:
        """No more redialling (the stage is closing)."""
        self._closing = True
        for k in list(self._keepers):
            k.cancel()

    async def close(self) -> None:
        self.stop()
        if self.ch is not None:
            await self.ch.close()

    async def drop(self) -> None:
        """Let the link go for good (a configure without it): its keeper does not redial."""
        async with self._lock:
            self._gen += 1
            ch, self.ch, self.url = self.ch, None, None
        if ch is not None:
            await ch.close()

    # ------------------------------------------------------------------ dialling and keeping
    async def _dial(self, url: str, patience: float = 0.0) -> Channel:
        """An authenticated, checked link to the next stage; a busy one (no free slot) is retried for ``patience`` s."""
        deadline = time.monotonic() + patience
        delay = 0.1
        while True:
            try:
                ws = await auth.connect(url, self.key, self.role, max_size=REPLY_MAX_BYTES)
                break
            except AuthError as e:
                if BUSY in str(e) and time.monotonic() + delay < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise ConnectionError(f"{self.what} stage {url}: authentication failed: {e}") from None
            except Exception as e:  # noqa: BLE001
                raise ConnectionError(f"cannot reach {self.what} stage {url}: {e}") from None
        ch = Channel(ws, name=f"{self.what} stage {url}")
        asyncio.ensure_future(ch.serve(_from_next))
        try:
            info, _ = await ch.request({"type": HELLO}, timeout=30)
        except (RemoteError, ChannelClosed, asyncio.TimeoutError) as e:
            await ch.close()
            raise ConnectionError(f"{self.what} stage {url} did not answer hello: {e or type(e).__name__}") from None
        problem = self._check(self._describe(), info)
        if problem:
            await ch.close()
            raise ConnectionError(f"{self.what} stage {url}: {problem}")
        log.info("%s to %s stage %s (layers %d-%d)", "ring rounds go" if self.role == "ring" else "forwarding",
                 self.what, url, info["layer_start"], info["layer_stop"] - 1)
        return ch

    def _set(self, ch: Channel, url: str) -> None:
        """``ch`` is the link to the next stage now; its keeper rebuilds it when it is lost."""
        self._gen += 1
        self.ch, self.url = ch, url
        self._since = time.monotonic()
        k = asyncio.ensure_future(self._keep(ch, url, self._gen))
        self._keepers.add(k)
        k.add_done_callback(self._keepers.discard)

    async def _keep(self, ch: Channel, url: str, gen: int) -> None:
        """When the link ``ch`` (generation ``gen``) is lost for any reason, tell the head and reconnect to the same
        URL with backoff until it is back, or a configure has linked this stage anew."""
        await ch.closed.wait()
        if self._closing or gen != self._gen:
            return
        reason = (f"closed by the next stage ({ch.peer_close_code}: {ch.peer_close_reason})" if ch.peer_close_reason
                  else ch.close_reason or "connection lost")
        self.stats[self._losses] += 1
        log.warning("lost the link to the %s stage %s (%s); reconnecting", self.what, url, reason)
        self.notify_down(reason)
        # a link that broke soon after it was made (two upstreams fighting over the next stage) backs off further
        lived = time.monotonic() - self._since
        delay = NEXT_RETRY[0] if lived > 10.0 else min(self._delay * 2, NEXT_RETRY[1])
        self._delay = delay
        last_err, t_lost, tries = "", time.monotonic(), 0
        while not self._closing:
            await asyncio.sleep(delay)
            async with self._lock:
                if gen != self._gen or self._closing:
                    return  # a configure linked this stage meanwhile
                tries += 1
                try:
                    new = await self._dial(url)
                except ConnectionError as e:
                    if str(e) != last_err or tries % 10 == 0:
                        log.warning("reconnecting to the %s stage %s failed (%s); retrying every %.1f s at most",
                                    self.what, url, e, NEXT_RETRY[1])
                    last_err = str(e)
                else:
                    self.stats[self._reconnects] += 1
                    log.info("link to the %s stage %s is back after %.1f s", self.what, url, time.monotonic() - t_lost)
                    self._set(new, url)
                    self._tell_head(LinkUp(self.stage, url).to_meta())
                    return
            delay = min(delay * 2, NEXT_RETRY[1])


async def _from_next(ch: Channel, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
    """The next stage only answers requests on this link; it may report an error."""
    if meta.get("type") == ERROR:
        log.warning("next stage reported: %s", meta.get("message"))


__all__ = ["NextLink", "NEXT_RETRY", "NEXT_DIAL_PATIENCE", "REPLY_MAX_BYTES"]
