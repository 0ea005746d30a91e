"""Ordered, framed messaging over one WebSocket connection (client or server side).

A :class:`Channel` wraps a ``websockets`` connection: one sender task keeps outgoing
frames in order, incoming binary frames are decoded with :mod:`molink_lite.wire.codec`, and
request/response pairs are matched by ``meta["rid"]``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

import numpy as np

from .codec import FrameError, decode_frame, encode_frame

log = logging.getLogger(__name__)
Handler = Callable[["Channel", dict, Dict[str, np.ndarray]], Awaitable[None]]


class ChannelClosed(ConnectionError):
    """The peer went away."""


class RemoteError(RuntimeError):
    """The peer answered a request with an error; ``meta`` is the whole error reply (e.g. ``code``, ``epoch``)."""

    def __init__(self, message: str, meta: Optional[dict] = None):
        super().__init__(message)
        self.meta = meta or {}


class Channel:
    """Frames in order over a WebSocket; ``request`` awaits the matching reply."""

    def __init__(self, ws: Any, name: str = "peer"):
        self.ws = ws
        self.name = name
        self._out: asyncio.Queue = asyncio.Queue()
        self._pending: Dict[int, asyncio.Future] = {}
        self._rids = itertools.count(1)
        self._sender = asyncio.ensure_future(self._send_loop())
        self.closed = asyncio.Event()
        self.close_reason = ""
        # what the peer said when it closed the connection (WebSocket close code and reason), if it did
        self.peer_close_code: Optional[int] = None
        self.peer_close_reason = ""
        self.role = ""  # what the peer is on this link ("gateway", "upstream"), set after authentication

    async def _send_loop(self) -> None:
        try:
            while True:
                data = await self._out.get()
                if data is None:
                    return
                await self.ws.send(data)
        except Exception as e:  # noqa: BLE001 - connection errors of any kind end the channel
            self._mark_closed(f"send failed: {e}")

    def send(self, meta: dict, arrays: Optional[Dict[str, np.ndarray]] = None, codec: str = "f16") -> None:
        """Queue a frame (never blocks; order is preserved)."""
        if self.closed.is_set():
            raise ChannelClosed(f"connection to {self.name} is closed ({self.close_reason})")
        self._out.put_nowait(encode_frame(meta, arrays, codec=codec))

    def send_bytes(self, data: bytes) -> None:
        """Queue an already-encoded frame."""
        if self.closed.is_set():
            raise ChannelClosed(f"connection to {self.name} is closed ({self.close_reason})")
        self._out.put_nowait(data)

    async def request(self, meta: dict, arrays: Optional[Dict[str, np.ndarray]] = None,
                      timeout: float = 30.0) -> Tuple[dict, Dict[str, np.ndarray]]:
        """Send a frame with a fresh ``rid`` and await the reply with the same ``rid``."""
        rid = next(self._rids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self.send({**meta, "rid": rid}, arrays)
            meta_r, arrays_r = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)
        if meta_r.get("type") == "error":
            raise RemoteError(meta_r.get("message", "unknown error"), meta_r)
        return meta_r, arrays_r

    def reply(self, req: dict, meta: dict, arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Answer a request frame."""
        self.send({**meta, "reply_to": req.get("rid")}, arrays)

    async def serve(self, handler: Handler) -> None:
        """Read frames until the connection ends; replies resolve requests, the rest go to ``handler``."""
        try:
            async for data in self.ws:
                if isinstance(data, str):
                    self._protocol_error("text frame received; molink-lite speaks binary frames")
                    continue
                try:
                    meta, arrays = decode_frame(data)
                except FrameError as e:
                    self._protocol_error(f"malformed frame: {e}")
                    continue
                rt = meta.get("reply_to")
                if rt is not None:
                    fut = self._pending.get(rt)
                    if fut is not None and not fut.done():
                        fut.set_result((meta, arrays))
                    continue
                await handler(self, meta, arrays)
        except Exception as e:  # noqa: BLE001
            self._note_peer_close(e)
            self._mark_closed(f"receive failed: {e}")
            return
        self._note_peer_close(None)
        why = f" by the peer ({self.peer_close_code}: {self.peer_close_reason})" if self.peer_close_reason else ""
        self._mark_closed(f"connection closed{why}")

    def _note_peer_close(self, exc: Optional[BaseException]) -> None:
        """Remember the close code and reason the peer sent (from the exception, else from the connection)."""
        rcvd = getattr(exc, "rcvd", None) if exc is not None else None
        if rcvd is None:
            try:
                code, reason = self.ws.close_code, self.ws.close_reason
            except Exception:  # noqa: BLE001 - a connection object without them
                return
            rcvd_code = code
        else:
            rcvd_code, reason = getattr(rcvd, "code", None), getattr(rcvd, "reason", "")
        if self.peer_close_code is None and isinstance(rcvd_code, int):
            self.peer_close_code, self.peer_close_reason = rcvd_code, str(reason or "")

    def _protocol_error(self, message: str) -> None:
        log.warning("%s: %s", self.name, message)
        try:
            self.send({"type": "error", "message": message, "fatal": False})
        except ChannelClosed:
            pass

    def _mark_closed(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"connection to {self.name} lost: {reason}"))
        self._out.put_nowait(None)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Flush queued frames and close the connection (``code``/``reason`` tell the peer why)."""
        self._out.put_nowait(None)
        try:
            await asyncio.wait_for(self._sender, 5)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            self._sender.cancel()
        try:
            await self.ws.close(code, reason)
        except Exception:  # noqa: BLE001
            pass
        self._mark_closed(f"closed locally{': ' + reason if reason else ''}")
