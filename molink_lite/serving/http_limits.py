"""HTTP connection limits for a server exposed to the internet, on top of aiohttp.

* a cap on open connections (``max_connections``); when it is reached, the connection that has been
  idle longest between keep-alive requests is closed to make room, and only when none is idle is a
  new connection refused (503);
* a cap on open connections per remote address (``max_per_address``; IPv6 addresses count per /64,
  what one host usually gets): the same, per address (429), so one address cannot fill the
  server with idle connections and lock everyone else out;
* a timeout for request headers (slow-header clients are closed), an idle keep-alive timeout, and
  a write timeout: a connection whose response cannot be written for ``write_timeout`` seconds
  (the client stopped reading) is aborted, which cancels its handler (a stream's sequence is freed).

Portable (transports and ``call_later`` only, no POSIX calls).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import ssl
import time
from typing import Any, Dict, Optional, Tuple

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 64  # well below the global cap: 8 addresses are needed to fill it
DEFAULT_HEADER_TIMEOUT = 15.0          # seconds for a request's line + headers to arrive
DEFAULT_BODY_TIMEOUT = 60.0            # seconds for a request's body to arrive
DEFAULT_KEEPALIVE_TIMEOUT = 15.0       # an idle keep-alive connection is closed after this
DEFAULT_WRITE_TIMEOUT = 30.0           # a response that cannot be written for this long is cut
DEFAULT_MAX_REQUESTS_PER_KEY = 32      # concurrent generation requests of one API key (gateway)
# kernel send buffer of a streamed response: kernels autotune it to megabytes (thousands of tokens of SSE that
# a client that stopped reading never takes); an SSE stream needs far less, and the write timeout starts sooner
STREAM_SEND_BUFFER = 64 * 1024


def _reply(status: str, message: str, code: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "service_unavailable" if status.startswith("503")
                                   else "rate_limit_error", "code": code, "param": None}})
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def address_key(peername: Any) -> str:
    """Whom a connection counts against: its IPv4 address, or the /64 of its IPv6 address (an IPv4-mapped one
    counts as IPv4); anything else (a Unix socket, no address) shares one key."""
    host = peername[0] if isinstance(peername, (tuple, list)) and peername else None
    if not isinstance(host, str) or not host:
        return "local"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def bound_send_buffer(transport: Any, nbytes: int = STREAM_SEND_BUFFER) -> None:
    """Cap the kernel send buffer of a connection that carries a long response (an SSE stream), so a client that
    stops reading fills it after about ``nbytes`` (and the write timeout runs) instead of megabytes later."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
    except (OSError, AttributeError, ValueError):   # not a TCP socket: leave it
        pass


class ConnectionGuard:
    """Shared by all connections of a listener: who is connected, the caps and the timeouts."""

    def __init__(self, max_connections: int, header_timeout: float,
                 max_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
                 write_timeout: float = DEFAULT_WRITE_TIMEOUT):
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if header_timeout < 0:
            raise ValueError("header_timeout must be >= 0 (0 disables it)")
        if max_per_address < 0:
            raise ValueError("max_per_address must be >= 0 (0: no per-address cap)")
        if write_timeout < 0:
            raise ValueError("write_timeout must be >= 0 (0 disables it)")
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self.conns: Dict["GuardedRequestHandler", str] = {}   # admitted connection -> address key
        self.per_address: Dict[str, int] = {}
        self.refused = 0            # over the global cap, nothing idle to close
        self.refused_address = 0    # over the per-address cap, nothing idle of that address to close
        self.evicted = 0            # idle keep-alive connections closed to make room
        self.timed_out = 0          # request headers too slow
        self.write_timed_out = 0    # responses the client did not read
        self._last_warn = -math.inf
        self.busy_response = _reply("503 Service Unavailable",
                                    f"too many connections (at most {max_connections}); try again later",
                                    "too_many_connections")
        self.address_busy_response = _reply(
            "429 Too Many Requests", f"too many connections from your address (at most {max_per_address}); close "
                                     f"idle ones or try again later", "too_many_connections_from_address")

    @property
    def active(self) -> int:
        return len(self.conns)

    def admit(self, h: "GuardedRequestHandler", addr: str) -> Optional[bytes]:
        """Count a new connection in, closing the longest-idle keep-alive connection where a cap is reached;
        returns the reply to send instead when it cannot be admitted."""
        if self.max_per_address and self.per_address.get(addr, 0) >= self.max_per_address:
            if not self._evict_idle(addr):
                self.refused_address += 1
                self._warn(f"refusing connections from {addr}: {self.per_address.get(addr, 0)} open, the "
                           f"per-address cap is {self.max_per_address} (refused so far: {self.refused_address})")
                return self.address_busy_response
        if len(self.conns) >= self.max_connections and not self._evict_idle(None):
            self.refused += 1
            self._warn(f"refusing connections: {len(self.conns)} open, the cap is {self.max_connections} "
                       f"(refused so far: {self.refused})")
            return self.busy_response
        self.conns[h] = addr
        self.per_address[addr] = self.per_address.get(addr, 0) + 1
        return None

    def release(self, h: "GuardedRequestHandler") -> None:
        addr = self.conns.pop(h, None)
        if addr is None:
            return
        n = self.per_address.get(addr, 0) - 1
        if n > 0:
            self.per_address[addr] = n
        else:
            self.per_address.pop(addr, None)

    def _evict_idle(self, addr: Optional[str]) -> bool:
        """Close the connection (of ``addr``, or any) idle longest between keep-alive requests; False if none is."""
        best: Optional[GuardedRequestHandler] = None
        for h, a in self.conns.items():
            if (addr is None or a == addr) and h.idle_keepalive and (best is None or h.idle_since < best.idle_since):
                best = h
        if best is None:
            return False
        self.release(best)
        self.evicted += 1
        best.evict()
        return True

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warn > 10.0:
            self._last_warn = now
            log.warning("%s", message)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol with connection caps, a request-header timeout and a write timeout.

    aiohttp itself bounds an idle keep-alive connection (``keepalive_timeout``) but not a request
    whose line and headers trickle in byte by byte ("slowloris"). Here a timer starts when a
    connection opens or when the first byte of a new request arrives on an idle one; it stops once
    the headers are parsed (aiohttp queues the message), and if it fires first the connection is
    closed. Over a cap, the longest-idle keep-alive connection (of the same address for the
    per-address cap) is closed to make room; when none is idle, the new connection gets a 503 (429
    for the per-address cap) and is closed at once. A second timer runs while the transport's
    write buffer is over its high-water mark (asyncio's ``pause_writing``): a client that does not read
    its response for ``write_timeout`` seconds is aborted (its handler is cancelled). Portable: only
    asyncio's call_later and transports are used. Reads RequestHandler's ``_messages`` (parsed,
    unhandled requests), ``_request_in_progress``, ``_request_count``, ``_upgraded`` and ``_waiter``;
    tests/test_api_security.py and tests/test_gateway_limits.py check these paths.
    """

    __slots__ = ("_guard", "_header_handle", "_write_handle", "_admitted", "idle_since")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_handle: Optional[asyncio.TimerHandle] = None
        self._write_handle: Optional[asyncio.TimerHandle] = None
        self._admitted = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self._guard
        refusal = g.admit(self, address_key(transport.get_extra_info("peername")))
        if refusal is not None:
            self._manager = None            # RequestHandler.connection_lost becomes a no-op
            self._force_close = True        # data_received ignores anything that still arrives
            t: Any = transport
            try:
                t.write(refusal)
            finally:
                t.close()
            return
        self._admitted = True
        self.idle_since = self._loop.time()
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._disarm_header_timer()
        self._disarm_write_timer()
        if self._admitted:
            self._admitted = False
            self._guard.release(self)
        super().connection_lost(exc)

    @property
    def idle_keepalive(self) -> bool:
        """Served a request and now waits for the next one, with nothing of it received yet."""
        return (self._admitted and self._request_count > 0 and not self._request_in_progress and not self._messages
                and self._header_handle is None and not self._upgraded and not self._force_close
                and self._waiter is not None and not self._waiter.done())

    def evict(self) -> None:
        """Closed to make room for a new connection (the guard no longer counts it)."""
        self._admitted = False
        log.debug("closing an idle keep-alive connection from %s to make room", self.peername)
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if data and self._header_handle is None and not self._messages and not self._request_in_progress:
            self._arm_header_timer()        # a new request starts on an idle connection
        super().data_received(data)
        if self._header_handle is not None and (self._messages or self._request_in_progress):
            self._disarm_header_timer()     # headers complete

    async def finish_response(self, request: Any, resp: Any, start_time: Optional[float]) -> Any:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self.idle_since = self._loop.time()

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

    # ------------------------------------------------------------------ write timeout
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._guard.write_timeout > 0 and self._write_handle is None and not self._upgraded:
            self._write_handle = self._loop.call_later(self._guard.write_timeout, self._write_expired)

    def resume_writing(self) -> None:
        self._disarm_write_timer()
        super().resume_writing()

    def _disarm_write_timer(self) -> None:
        if self._write_handle is not None:
            self._write_handle.cancel()
            self._write_handle = None

    def _write_expired(self) -> None:
        self._write_handle = None
        t = self.transport
        if t is None or not self.writing_paused:
            return
        self._guard.write_timed_out += 1
        log.info("cutting a connection from %s: the client read nothing of its response for %.0f s", self.peername,
                 self._guard.write_timeout)
        t.abort()   # close() would wait for the unread buffer; abort frees it now (connection_lost follows)


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
                    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
                    max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
                    write_timeout: float = DEFAULT_WRITE_TIMEOUT) -> Tuple[web.AppRunner, GuardedSite]:
    """Start ``app`` on a guarded listener; returns the runner (``cleanup()`` stops it) and the site."""
    guard = ConnectionGuard(max_connections, header_timeout, max_connections_per_address, write_timeout)
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
