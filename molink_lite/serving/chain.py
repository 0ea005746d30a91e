"""The links from the gateway to one chain of stages: open them (authenticated, with heartbeats), check
that the stages tile one model, tell each stage where to send, and measure the stage-to-stage links.

:class:`~molink_lite.serving.pipeline.Pipeline` runs sequences over a :class:`Chain`; this module
knows nothing about requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import websockets

from ..wire import auth
from ..wire.auth import AuthError, LinkKey
from ..wire.channel import Channel, ChannelClosed, RemoteError
from ..wire.media import MediaLayout, MediaPut
from ..wire.protocol import HELLO, PROBE_NEXT, STATS, TOKENIZE, Configure, check_chain

log = logging.getLogger(__name__)
RESULT_MAX_BYTES = 64 << 20  # what the gateway accepts from a stage (results, stats, replies)
FrameHandler = Callable[[Channel, dict, Dict[str, np.ndarray]], Awaitable[None]]


class PipelineError(RuntimeError):
    """A pipeline that cannot be used (unreachable, mis-tiled, mixed models), with the reason."""


class FencedError(PipelineError):
    """A stage of the pipeline is controlled by another gateway (it refused ``configure``); ``epoch`` is its
    fencing epoch. Not retried at start: the message tells the user about ``--takeover``."""

    def __init__(self, message: str, epoch: Optional[int] = None):
        super().__init__(message)
        self.epoch = epoch


BUSY_TEXT = "too many connections"  # what a stage out of connection or handshake slots says (close code 1013)


def is_busy(e: BaseException) -> bool:
    """A refusal to try again later: a stage (or the stage behind it) had no free connection or handshake slot."""
    return getattr(e, "code", None) == auth.CLOSE_BUSY or BUSY_TEXT in str(e)


class Chain:
    """Open links to the stages at ``urls`` (in layer order)."""

    def __init__(self, urls: Sequence[str], *, codec: str, key: Optional[LinkKey], heartbeat: Tuple[float, float],
                 name: str, ring: bool = False, ring_url: Optional[str] = None):
        self.urls = list(urls)
        self.codec = codec
        self.key = key
        self.heartbeat = heartbeat
        self.name = name
        self.channels: List[Channel] = []
        self.infos: List[dict] = []
        self.epochs: List[Optional[int]] = []  # each stage's fencing epoch, from its configure reply
        self.opening: List[Channel] = []  # the links of the attempt to open in progress (or the last one)
        # where each stage sends to, when not simply the next URL (a relayed link: wire/relay.py)
        self.next_urls: Optional[List[Optional[str]]] = None
        self._configured: List[Tuple[Channel, Optional[str], Optional[str]]] = []  # (link, next, ring) configured
        self._gateway_id = ""
        # closing the ring (stage/ring.py): ask the last stage to link to the first (at ``ring_url``: where the last
        # stage reaches the first, when not at the first's URL here); whether it could, and why not
        self.ring_wanted, self.ring_url = ring, ring_url
        self.ring_ok, self.ring_why = False, "not asked for"

    @property
    def first(self) -> dict:
        return self.infos[0]

    async def open(self, timeout: float, on_frame: FrameHandler,
                   on_closed: Callable[[Channel, str], None], *, gateway_id: str = "", takeover: bool = False) -> None:
        """Connect to every stage, check the chain tiles one model, and link the stages to each other.

        ``on_frame`` gets every frame that is not a reply; ``on_closed(channel, url)`` runs when a link ends.
        ``gateway_id`` names this controller to the stages (fencing: a stage controlled by another, connected,
        gateway refuses ``configure`` with :class:`FencedError`, unless ``takeover``). A stage out of connection
        slots (busy) is retried with backoff until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            try:
                return await self._open_once(deadline, on_frame, on_closed, gateway_id, takeover)
            except PipelineError as e:
                if not is_busy(e) or time.monotonic() + delay > deadline:
                    raise
                log.warning("%s; retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _open_once(self, deadline: float, on_frame: FrameHandler, on_closed: Callable[[Channel, str], None],
                         gateway_id: str, takeover: bool) -> None:
        chans: List[Channel] = []
        self.opening = chans  # the links of this attempt (frames from them count for it)
        try:
            for url in self.urls:
                ch = await _connect(url, deadline, self.key, self.heartbeat)
                chans.append(ch)
                asyncio.ensure_future(self._watch(ch, url, on_frame, on_closed))
            infos = []
            for url, ch in zip(self.urls, chans):
                info, _ = await ch.request({"type": HELLO}, timeout=30)
                info["url"] = url
                infos.append(info)
            problem = check_chain(infos)
            if problem:
                raise PipelineError(problem)
            epochs: List[Optional[int]] = []
            configured: List[Tuple[Channel, Optional[str], Optional[str]]] = []
            for i, ch in enumerate(chans):
                nxt = self.urls[i + 1] if i + 1 < len(self.urls) else None
                if self.next_urls is not None and nxt is not None:
                    nxt = self.next_urls[i] or nxt
                ring = (self.ring_url or self.urls[0]) if self.ring_wanted and nxt is None else None
                meta = Configure(nxt, self.codec, gateway_id, bool(takeover), ring).to_meta()
                try:
                    reply, _ = await ch.request(meta, timeout=60)
                except RemoteError as e:
                    if e.meta.get("code") == "fenced":
                        raise FencedError(f"pipeline {self.name}: stage {self.urls[i]}: {e}", e.meta.get("epoch")) \
                            from None
                    raise
                epochs.append(reply.get("epoch"))
                configured.append((ch, nxt, ring))
                if nxt is None:
                    self._note_ring(reply)
        except (RemoteError, ChannelClosed, asyncio.TimeoutError) as e:
            for ch in chans:
                await ch.close()
            raise PipelineError(f"pipeline {self.name}: {e}") from None
        except BaseException:
            for ch in chans:
                await ch.close()
            raise
        self.channels, self.infos, self.epochs = chans, infos, epochs
        self._configured, self._gateway_id = configured, gateway_id

    async def set_codec(self, codec: str) -> None:
        """Tell every stage of the open chain to hand on hidden states with ``codec`` (a ``configure`` with the same
        next stage: the stage keeps its link and its sequences)."""
        try:
            for ch, nxt, ring in self._configured:
                reply, _ = await ch.request(Configure(nxt, codec, self._gateway_id, False, ring).to_meta(), timeout=60)
                if nxt is None:
                    self._note_ring(reply)
        except (RemoteError, ChannelClosed, asyncio.TimeoutError) as e:
            raise PipelineError(f"pipeline {self.name}: could not switch the stages to codec {codec}: {e}") from None
        self.codec = codec

    def _note_ring(self, reply: dict) -> None:
        """What the last stage's ``configured`` says of the ring: linked to the first stage, or why not."""
        self.ring_ok = reply.get("ring") is True
        why = reply.get("ring_why") or "the last stage does not close rings"
        self.ring_why = "" if self.ring_ok else str(why)[:300]

    @staticmethod
    async def _watch(ch: Channel, url: str, on_frame: FrameHandler, on_closed: Callable[[Channel, str], None]) -> None:
        await ch.serve(on_frame)
        on_closed(ch, url)

    async def probe(self) -> List[dict]:
        """Round-trip time and bandwidth of each stage-to-stage link, measured by the sending stage."""
        links = []
        for ch, url in zip(self.channels[:-1], self.urls[1:]):
            try:
                meta, _ = await ch.request({"type": PROBE_NEXT, "bytes": 1 << 20}, timeout=120)
            except (RemoteError, asyncio.TimeoutError) as e:
                log.warning("could not measure the link to %s (%s)", url, e)
                return []
            if meta.get("rtt_s") is not None:
                links.append({"to": url, "rtt_ms": 1e3 * meta["rtt_s"], "mbit": meta["mbit"]})
        for k in links:
            log.info("link to %s: rtt %.2f ms, %.0f Mbit/s", k["to"], k["rtt_ms"], k["mbit"])
        return links

    def close_soon(self) -> None:
        for ch in self.channels:
            asyncio.ensure_future(ch.close())

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    async def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        """Token ids from the first stage's tokenizer."""
        meta, arrays = await self.channels[0].request(
            {"type": TOKENIZE, "text": text, "add_special": add_special, "parse_special": True})
        return arrays["tokens"]

    async def put_media(self, data: bytes, timeout: float = 120) -> MediaLayout:
        """An image to the first stage's vision projector; its layout there (encoding takes a while on a CPU)."""
        meta, arrays = MediaPut(data).to_wire()
        reply, _ = await self.channels[0].request(meta, arrays, timeout=timeout)
        return MediaLayout.decode(reply, int(self.infos[0]["n_vocab"]) if self.infos else 1 << 31)

    async def request_last(self, meta: dict, timeout: float = 30) -> dict:
        """A small request to the last stage (``grammar_check``, ``detokenize``); its reply's meta."""
        reply, _ = await self.channels[-1].request(meta, timeout=timeout)
        return reply

    async def request_all(self, meta: dict, timeout: float = 30) -> List[dict]:
        """The same small request to every stage at once (``release``, ``restore``); their replies' metas."""
        replies = await asyncio.gather(*(ch.request(dict(meta), timeout=timeout) for ch in self.channels))
        return [r for r, _ in replies]

    async def stage_stats(self) -> List[dict]:
        """Counters of every stage (steps, rows, most sequences in one step, ...)."""
        out = []
        for ch in self.channels:
            meta, _ = await ch.request({"type": STATS}, timeout=10)
            out.append(meta)
        return out


async def _connect(url: str, deadline: float, key: Optional[LinkKey], heartbeat: Tuple[float, float]) -> Channel:
    """An authenticated link to the stage at ``url``, retried with backoff (0.2 s doubling to 2 s) until ``deadline``
    while it cannot be reached or is busy (no free connection or handshake slot: close code 1013)."""
    delay = 0.2
    while True:
        try:
            ws = await auth.connect(url, key, "gateway", max_size=RESULT_MAX_BYTES, ping_interval=heartbeat[0],
                                    ping_timeout=heartbeat[1])
            return Channel(ws, name=f"stage {url}")
        except AuthError as e:
            if not is_busy(e):
                raise PipelineError(f"stage {url}: authentication failed: {e}") from None
            if time.monotonic() + delay > deadline:
                raise PipelineError(f"stage {url} stayed busy ({e}) until the connect deadline") from None
            log.info("stage %s is busy (%s); retrying in %.1f s", url, e, delay)
        except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError) as e:
            if time.monotonic() + delay > deadline:
                raise PipelineError(f"cannot reach stage {url}: {e}") from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
