"""Links to a stage that cannot accept connections (behind NAT or a firewall), relayed through the gateway.

A relayed link is a plain byte tunnel: the dialer opens a WebSocket to the gateway's
``/relay/<token>``, the gateway asks the stage (over the cluster link the stage itself opened) to dial
back to ``/relay-back/<id>``, the stage connects that to its own listening port, and the gateway
copies bytes between the two. The stage link (its TLS, when on, and the cluster-secret handshake)
runs end to end *inside* the tunnel, so the relay sees only opaque bytes and cannot impersonate either
side; it only adds a hop.

A relayed stage address is the stage's own URL with the relay appended as a fragment:
``ws://10.0.0.7:7001#via=ws%3A%2F%2Fgateway%3A8000%2Frelay%2F<token>``. Fragments never reach the
server, so the stage's identity (host for TLS, fingerprint binding) stays the stage's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Optional, Tuple
from urllib.parse import quote, unquote, urlsplit

import websockets

log = logging.getLogger(__name__)
VIA = "#via="
TUNNEL_CHUNK = 1 << 18          # bytes per WebSocket message inside a tunnel
TUNNEL_MAX_MSG = 1 << 20        # the largest tunnel message accepted


def with_via(url: str, relay: str) -> str:
    """``url`` reached through the relay WebSocket ``relay``."""
    return split_via(url)[0] + VIA + quote(relay, safe="")


def split_via(url: str) -> Tuple[str, Optional[str]]:
    """``(stage URL, relay URL or None)``."""
    if VIA in url:
        target, via = url.split(VIA, 1)
        return target, unquote(via)
    return url, None


def host_port(url: str) -> Tuple[str, int]:
    """Host and port of a ws(s):// URL (default ports 80/443)."""
    u = urlsplit(split_via(url)[0])
    if not u.hostname:
        raise ValueError(f"no host in {url!r}")
    return u.hostname, u.port or (443 if u.scheme == "wss" else 80)


async def reachable(url: str, timeout: float = 2.0) -> Tuple[bool, str]:
    """Can a TCP connection to the stage at ``url`` be opened from here? ``(ok, why not)``."""
    try:
        host, port = host_port(url)
        t0 = time.perf_counter()
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        w.close()
        return True, f"{1e3 * (time.perf_counter() - t0):.1f} ms to connect"
    except asyncio.TimeoutError:
        return False, f"no answer within {timeout:g} s (inbound connections dropped?)"
    except (OSError, ValueError) as e:
        return False, str(e) or type(e).__name__


async def _ws_open(url: str) -> Any:
    from .tls import client_context

    return await websockets.connect(url, max_size=TUNNEL_MAX_MSG, compression=None, open_timeout=10,
                                    ssl=client_context() if url.startswith("wss://") else None,
                                    ping_interval=20, ping_timeout=60, close_timeout=0.25)


async def _pump(ws: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes both ways between a WebSocket and a stream until either side ends; then close both."""

    async def up() -> None:
        while True:
            data = await reader.read(TUNNEL_CHUNK)
            if not data:
                return
            await ws.send(data)

    async def down() -> None:
        async for msg in ws:
            if isinstance(msg, str):
                return
            writer.write(msg)
            await writer.drain()

    try:
        await until_first_ends(up(), down())
    finally:
        writer.close()
        await ws.close()


async def until_first_ends(*coros: Any) -> None:
    """Run the two directions of a copy until one of them ends (the peer closed); cancel the other."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def open_tunnel(relay: str) -> socket.socket:
    """Dialer side: a local socket whose bytes travel through the relay to the stage (for
    ``websockets.connect(..., sock=...)``). The tunnel closes when either end closes."""
    ws = await _ws_open(relay)
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=theirs)
    task = asyncio.ensure_future(_pump(ws, reader, writer))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return mine


async def dial_back(relay_back: str, local_host: str, local_port: int) -> None:
    """Stage side: connect the gateway's ``relay_back`` WebSocket to this stage's own listening port."""
    try:
        ws = await _ws_open(relay_back)
    except Exception as e:  # noqa: BLE001 - the gateway gave up on this tunnel meanwhile
        log.warning("could not open the relay back to the gateway (%s)", e)
        return
    try:
        reader, writer = await asyncio.open_connection(local_host, local_port)
    except OSError as e:
        log.warning("relay: cannot reach this stage's own port %s:%d (%s)", local_host, local_port, e)
        await ws.close()
        return
    await _pump(ws, reader, writer)


_TASKS: set = set()  # running tunnels (kept referenced)
