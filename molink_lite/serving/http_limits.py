"""HTTP connection limits for a server exposed to the internet: a cap on open connections and a
timeout for request headers (slow-header clients are closed), on top of aiohttp.

Portable (transports and ``call_later`` only, no POSIX calls).
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from typing import Any, Optional, Tuple

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_HEADER_TIMEOUT = 15.0          # seconds for a request's line + headers to arrive
DEFAULT_BODY_TIMEOUT = 60.0            # seconds for a request's body to arrive
DEFAULT_KEEPALIVE_TIMEOUT = 75.0       # an idle keep-alive connection is closed after this


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Retry-After: 1\r\n")


class ConnectionGuard:
    """Shared by all connections of a listener: the open-connection count, the cap and the header timeout."""

    def __init__(self, max_connections: int, header_timeout: float):
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if header_timeout < 0:
            raise ValueError("header_timeout must be >= 0 (0 disables it)")
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.active = 0
        self.refused = 0
        self.timed_out = 0
        self._last_warn = -math.inf
        body = orjson.dumps({"error": {
            "message": f"too many connections (at most {max_connections}); try again later",
            "type": "service_unavailable", "code": "too_many_connections", "param": None}})
        self.busy_response = _BUSY + f"Content-Length: {len(body)}\r\n\r\n".encode() + body

    def refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_warn > 10.0:
            self._last_warn = now
            log.warning("refusing connections: %d open, the cap is %d (refused so far: %d)", self.active,
                        self.max_connections, self.refused)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol with a connection cap and a request-header timeout.

    aiohttp itself bounds an idle keep-alive connection (``keepalive_timeout``) but not a request
    whose line and headers trickle in byte by byte ("slowloris"). Here a timer starts when a
    connection opens or when the first byte of a new request arrives on an idle one; it stops once
    the headers are parsed (aiohttp queues the message), and if it fires first the connection is
    closed. Over the cap, a new connection gets a 503 and is closed at once. Portable: only
    asyncio's call_later and transports are used. Reads RequestHandler's ``_messages`` (parsed,
    unhandled requests) and ``_request_in_progress``; tests/test_api_security.py checks both paths.
    """

    __slots__ = ("_guard", "_header_handle", "_admitted")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_handle: Optional[asyncio.TimerHandle] = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self._guard
        if g.active >= g.max_connections:
            g.refuse()
            self._manager = None            # RequestHandler.connection_lost becomes a no-op
            self._force_close = True        # data_received ignores anything that still arrives
            t: Any = transport
            try:
                t.write(g.busy_response)
            finally:
                t.close()
            return
        g.active += 1
        self._admitted = True
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._disarm_header_timer()
        if self._admitted:
            self._admitted = False
            self._guard.active -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._header_handle is None and not self._messages and not self._request_in_progress:
            self._arm_header_timer()        # a new request starts on an idle connection
        super().data_received(data)
        if self._header_handle is not None and (self._messages or self._request_in_progress):
            self._disarm_header_timer()     # headers complete

    def _arm_header_timer(self) -> None:
        if self._guard.header_timeout > 0 and self._header_handle is None:
            self._header_handle = self._loop.call_later(self._guard.header_timeout, self._header_expired)

    def _disarm_header_timer(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    def _header_expired(self) -> None:
        self._header_handle = None
        if self._messages or self._request_in_progress or self._force_close or self.transport is None:
            return
        self._guard.timed_out += 1
        log.debug("closing a connection from %s: request headers did not arrive within %.1f s", self.peername,
                  self._guard.header_timeout)
        self.force_close()


class GuardedSite(web.BaseSite):
    """A TCP listener (optionally TLS) whose connections are :class:`GuardedRequestHandler`."""

    def __init__(self, runner: web.BaseRunner, host: Optional[str], port: int, *, guard: ConnectionGuard,
                 keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
                 ssl_context: Optional[ssl.SSLContext] = None, backlog: int = 128):
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port, self.guard = host, port, guard
        self._handler_kwargs = {"keepalive_timeout": keepalive_timeout, "access_log": None}

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host = self._host or "0.0.0.0"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guard, kw = self.guard, self._handler_kwargs

        def factory() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, loop=loop, guard=guard, **kw)

        tls_timeout = (guard.header_timeout or None) if self._ssl_context else None
        self._server = await loop.create_server(factory, self._host, self._port, ssl=self._ssl_context,
                                                backlog=self._backlog, ssl_handshake_timeout=tls_timeout)


async def serve_app(app: web.Application, host: Optional[str], port: int, *,
                    ssl_context: Optional[ssl.SSLContext] = None,
                    max_connections: int = DEFAULT_MAX_CONNECTIONS,
                    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT) -> Tuple[web.AppRunner, GuardedSite]:
    """Start ``app`` on a guarded listener; returns the runner (``cleanup()`` stops it) and the site."""
    guard = ConnectionGuard(max_connections, header_timeout)
    # handler_cancellation: a client that goes away cancels its handler, which frees its sequence
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    site = GuardedSite(runner, host, port, guard=guard, keepalive_timeout=keepalive_timeout, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site
