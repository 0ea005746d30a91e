"""A man in the middle for tests: a WebSocket proxy that passes a link's handshake through untouched, then
lets the test speak to either side on its own (inject, tamper, replay), as an attacker on the path would.

It does not know the cluster secret, so it cannot take part in the handshake; it only relays the three
messages (challenge, auth, ok), which is exactly what makes a link with an authenticated handshake but
unauthenticated messages fall to it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Awaitable, Callable, List, Optional

import websockets

from molink_lite.wire.tls import client_context, server_context

# after(to_client, to_server, log): the attack, once the handshake went through
Attack = Callable[[Any, Any, List[str]], Awaitable[None]]


class PassThroughMITM:
    """Listens on ``127.0.0.1:port``; each connection is relayed to ``target`` (ws:// or wss://).

    With ``tls=(cert, key)`` the proxy terminates TLS with its own certificate (it can then read the
    handshake); otherwise it relays plain WebSocket messages. ``attack`` runs after the handshake's three
    messages were relayed; without one, the proxy keeps relaying (an eavesdropper: ``seen`` records what
    it saw).
    """

    def __init__(self, target: str, attack: Optional[Attack] = None, tls: Optional[tuple] = None):
        self.target = target
        self.attack = attack
        self.tls = tls
        self.seen: List[Any] = []
        self.log: List[str] = []
        self.port = 0
        self._srv: Any = None
        self.handshakes = 0

    async def start(self) -> "PassThroughMITM":
        ctx: Optional[ssl.SSLContext] = server_context(*self.tls) if self.tls else None
        self._srv = await websockets.serve(self._relay, "127.0.0.1", 0, ssl=ctx, max_size=None, compression=None)
        self.port = next(iter(self._srv.sockets)).getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._srv is not None:
            self._srv.close()
            await self._srv.wait_closed()

    async def _relay(self, client: Any) -> None:
        path = getattr(getattr(client, "request", None), "path", None) or getattr(client, "path", "") or ""
        ssl_ctx = client_context() if self.target.startswith("wss://") else None
        try:
            async with websockets.connect(self.target.rstrip("/") + path, ssl=ssl_ctx, max_size=None,
                                          compression=None) as server:
                # the handshake: challenge (server -> client), auth (client -> server), ok (server -> client)
                for src, dst in ((server, client), (client, server), (server, client)):
                    msg = await src.recv()
                    self.seen.append(msg)
                    await dst.send(msg)
                self.handshakes += 1
                self.log.append("handshake passed through")
                if self.attack is not None:
                    await self.attack(client, server, self.log)
                    return
                await asyncio.gather(self._pump(client, server), self._pump(server, client))
        except (websockets.exceptions.WebSocketException, OSError) as e:
            self.log.append(f"ended: {type(e).__name__}: {e}")

    async def _pump(self, a: Any, b: Any) -> None:
        try:
            async for m in a:
                self.seen.append(m)
                await b.send(m)
        except websockets.exceptions.ConnectionClosed:
            pass
        await b.close()


async def closed_by(ws: Any, timeout: float = 10.0) -> Optional[int]:
    """Wait until ``ws`` is closed by its peer (messages arriving meanwhile are dropped); the close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except websockets.exceptions.ConnectionClosed as e:
        rcvd = getattr(e, "rcvd", None)
        return rcvd.code if rcvd is not None else None
    except asyncio.TimeoutError:
        return None


class MITMThread:
    """A :class:`PassThroughMITM` on its own event loop in a thread, for tests that drive real processes."""

    def __init__(self, target: str, attack: Optional[Attack] = None, tls: Optional[tuple] = None):
        import threading

        self.mitm = PassThroughMITM(target, attack, tls)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the man in the middle did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.mitm.start())
        self._ready.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return self.mitm.url

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.mitm.close(), self._loop)
        try:
            fut.result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
