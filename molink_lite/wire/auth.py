"""Mutual authentication of a WebSocket link with the cluster secret, then every message sealed.

Every link (gateway -> stage, stage -> next stage, stage -> gateway's ``/cluster``, and links relayed
through the gateway) starts with this exchange of three small JSON text messages; nothing else is
read from the peer until it has succeeded:

1. server -> client ``{"t": "challenge", "v": 2, "auth": "hmac-sha256"|"none", "nonce": Ns, "cert": fp}``
2. client -> server ``{"t": "auth", "role": R, "nonce": Nc, "mac": HMAC(K, "client" | Ns | Nc | R | cert)}``
3. server -> client ``{"t": "ok", "mac": HMAC(K, "server" | Ns | Nc | R | cert)}``

``K`` is derived from the secret (the secret itself never crosses the wire); ``Ns`` and ``Nc`` are
fresh 32-byte nonces, so a recorded transcript cannot be replayed against either side. ``cert`` is
the SHA-256 fingerprint of the server's TLS certificate: the server puts in its own, the client the
one it actually received. A man in the middle presenting another certificate therefore makes both
MACs fail, which pins self-signed certificates without any CA (``--tls auto``).
``R`` is what the client will be on this link: ``gateway`` (controls the stage), ``upstream``
(the previous stage, which only sends steps) or ``member`` (a stage joining a gateway).

**An authenticated channel, not only an authenticated handshake.** With a secret, both sides then
derive two session keys from ``K`` and the handshake (``Ns``, ``Nc``, ``R``, ``cert``), one per
direction, and every later message is sealed with AES-256-GCM (:class:`SealedLink`): the nonce is
a per-direction message counter, so a message that was forged, altered, replayed, reordered or
dropped fails to open and the link is closed with code 4401 and a logged reason. A relay or proxy
that passes the handshake through unchanged (it cannot take part: it does not know ``K``) can
therefore neither read nor inject a single message, with or without TLS. TLS stays useful for the
HTTP API; stage links are confidential and authentic through the seal alone.

With no secret on either side (loopback, or ``--insecure``) the same messages flow with
``auth: "none"``, no MACs and no seal. A side that has a secret refuses a peer that has none.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import orjson
import websockets

log = logging.getLogger(__name__)

VERSION = 2              # 2: every message after the handshake is sealed (SealedLink)
ROLES = ("gateway", "upstream", "member", "ring")
HANDSHAKE_TIMEOUT = 10.0
CLOSE_AUTH = 4401        # WebSocket close code: authentication failed
CLOSE_BUSY = 1013        # try again later (too many connections or handshakes)
CLOSE_REPLACED = 4409    # another gateway/upstream took this link's role
SEAL_OVERHEAD = 17       # bytes a sealed message adds: its kind byte and the 16-byte GCM tag
SECRET_ENV = "MOLINK_SECRET"
MIN_SECRET_CHARS = 16


class AuthError(ConnectionError):
    """The link could not be authenticated; the message says why and what to do. ``code``: the close code
    the peer sent, if it closed the connection (e.g. :data:`CLOSE_BUSY`: try again later)."""

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LinkKey:
    """The HMAC key derived from a cluster secret."""

    key: bytes

    @classmethod
    def from_secret(cls, secret: Union[str, bytes]) -> "LinkKey":
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        raw = raw.strip()
        if len(raw) < MIN_SECRET_CHARS:
            raise ValueError(f"the cluster secret is too short ({len(raw)} characters, need at least "
                             f"{MIN_SECRET_CHARS}); make one with `molink-lite secret -o FILE`")
        return cls(hmac.new(raw, b"molink-lite link key v1", hashlib.sha256).digest())

    def mac(self, side: bytes, ns: bytes, nc: bytes, role: str, cert: str) -> str:
        msg = b"|".join((b"molink-lite-auth-v1", side, ns, nc, role.encode(), cert.encode()))
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def session(self, ns: bytes, nc: bytes, role: str, cert: str) -> "tuple[bytes, bytes]":
        """(client -> server key, server -> client key) of one link, from the handshake it passed."""
        base = hmac.new(self.key, b"|".join((b"molink-lite-session-v1", ns, nc, role.encode(), cert.encode())),
                        hashlib.sha256).digest()
        return (hmac.new(base, b"client->server", hashlib.sha256).digest(),
                hmac.new(base, b"server->client", hashlib.sha256).digest())


def new_secret() -> str:
    """A fresh random cluster secret (256 bits, hex)."""
    return secrets.token_hex(32)


def load_secret(path: Optional[str] = None, env: bool = True) -> Optional[LinkKey]:
    """The cluster key from ``path`` (a file made by ``molink-lite secret``), else ``$MOLINK_SECRET``, else None."""
    if path:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read the secret file {path}: {e.strerror or e}") from None
        return LinkKey.from_secret(text)
    value = os.environ.get(SECRET_ENV) if env else None
    return LinkKey.from_secret(value) if value else None


def write_secret(path: str, secret: str, force: bool = False) -> None:
    """Write a secret file readable only by its owner (where the OS supports modes)."""
    p = Path(path).expanduser()
    if p.exists() and not force:
        raise FileExistsError(f"{p} exists; pass --force to replace it")
    fd = os.open(str(p), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    try:
        os.chmod(p, 0o600)
    except OSError:  # pragma: no cover - e.g. some Windows file systems
        pass


class SealError(ConnectionError):
    """A message on a sealed link failed to open: forged, altered, replayed, reordered or not sealed."""


class SealedLink:
    """A WebSocket (or anything with ``send``/``recv``/async iteration) whose messages are sealed.

    Each message, text or binary, travels as one binary message ``kind | AES-256-GCM(data)`` where
    ``kind`` (0 binary, 1 text) is authenticated as associated data and the 96-bit nonce is the
    direction's message counter. Sending is serialized, so counters follow the order on the wire.
    Anything that fails to open closes the link (code 4401) and is logged with the peer's address.
    Other attributes (``remote_address``, ``local_address``, ``transport``, ``close``) are the
    wrapped connection's.
    """

    def __init__(self, ws: Any, send_key: bytes, recv_key: bytes, peer: str = "peer"):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._ws = ws
        self._tx, self._rx = AESGCM(send_key), AESGCM(recv_key)
        self._n_tx = self._n_rx = 0
        self._lock = asyncio.Lock()
        self.peer = peer
        self.broken = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    def seal(self, data: Union[str, bytes]) -> bytes:
        """The next message to send (advances the send counter: send it, in this order)."""
        kind = b"\x01" if isinstance(data, str) else b"\x00"
        raw = data.encode() if isinstance(data, str) else data
        nonce = self._n_tx.to_bytes(12, "big")
        self._n_tx += 1
        return kind + self._tx.encrypt(nonce, raw, kind)

    def open(self, msg: Any) -> Union[str, bytes]:
        """The data of the next received message; raises :class:`SealError` (and closes) if it does not open."""
        from cryptography.exceptions import InvalidTag

        if self.broken:
            raise SealError(self.broken)
        if not isinstance(msg, (bytes, bytearray, memoryview)) or len(msg) < SEAL_OVERHEAD \
                or msg[0] not in (0, 1):
            self._fail("an unsealed message arrived on a sealed link")
        kind = bytes(msg[:1])
        try:
            data = self._rx.decrypt(self._n_rx.to_bytes(12, "big"), memoryview(msg)[1:], kind)
        except InvalidTag:
            self._fail("a message failed authentication (forged, altered, replayed or out of order)")
        self._n_rx += 1
        if kind == b"\x01":
            try:
                return data.decode()
            except UnicodeDecodeError:
                self._fail("a sealed text message is not UTF-8")
        return data

    def _fail(self, why: str) -> "None":
        self.broken = f"{why}; link closed"
        log.warning("link with %s: %s: closing it (a man in the middle, or a peer of another version)",
                    self.peer, why)
        raise SealError(self.broken)

    async def _close_broken(self) -> None:
        try:
            await self._ws.close(CLOSE_AUTH, "a message failed authentication")
        except Exception:  # noqa: BLE001 - closing is best effort; the SealError ends the link anyway
            pass

    async def send(self, data: Union[str, bytes]) -> None:
        async with self._lock:
            await self._ws.send(self.seal(data))

    async def recv(self) -> Union[str, bytes]:
        msg = await self._ws.recv()
        try:
            return self.open(msg)
        except SealError:
            await self._close_broken()
            raise

    def __aiter__(self) -> Any:
        return self._messages()

    async def _messages(self) -> Any:
        async for msg in self._ws:
            try:
                data = self.open(msg)
            except SealError:
                await self._close_broken()
                raise
            yield data


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def _recv_json(ws: Any, timeout: float, what: str) -> dict:
    try:
        msg = await asyncio.wait_for(ws.recv(), timeout)
    except asyncio.TimeoutError:
        raise AuthError(f"no {what} within {timeout:.0f} s") from None
    except websockets.exceptions.ConnectionClosed as e:
        rcvd = getattr(e, "rcvd", None)
        reason = getattr(rcvd, "reason", "") if rcvd is not None else ""
        raise AuthError(f"the peer closed the connection ({reason or 'no reason given'})",
                        getattr(rcvd, "code", None)) from None
    if not isinstance(msg, str) or len(msg) > 4096:
        raise AuthError(f"expected a short {what} text message")
    try:
        data = orjson.loads(msg)
    except orjson.JSONDecodeError:
        raise AuthError(f"{what} is not JSON") from None
    if not isinstance(data, dict):
        raise AuthError(f"{what} is not a JSON object")
    return data


def _hex(data: dict, key: str, n: int) -> bytes:
    v = data.get(key)
    if not isinstance(v, str) or len(v) != 2 * n:
        raise AuthError(f"'{key}' must be {n} bytes of hex")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise AuthError(f"'{key}' must be hex") from None


def _peer_name(ws: Any) -> str:
    addr = getattr(ws, "remote_address", None)
    if isinstance(addr, (tuple, list)) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr or "peer")


async def server_handshake(ws: Any, key: Optional[LinkKey], cert_fp: str = "",
                           timeout: float = HANDSHAKE_TIMEOUT) -> "tuple[str, Any]":
    """Authenticate the client of an accepted connection; returns ``(its role, the link)``: with a
    secret the link is a :class:`SealedLink` over ``ws`` (use it, not ``ws``, from now on), else ``ws``.
    Raises :class:`AuthError`."""
    ns = secrets.token_bytes(32)
    await ws.send(_dumps({"t": "challenge", "v": VERSION, "auth": "hmac-sha256" if key else "none",
                          "nonce": ns.hex(), "cert": cert_fp}))
    data = await _recv_json(ws, timeout, "authentication reply")
    if data.get("t") != "auth":
        raise AuthError("the peer did not answer the authentication challenge")
    role = data.get("role")
    if role not in ROLES:
        raise AuthError(f"unknown link role {role!r}")
    nc = _hex(data, "nonce", 32)
    if key is None:
        if data.get("mac"):
            raise AuthError("the peer has a cluster secret but this side was started without one (--insecure)")
        await ws.send(_dumps({"t": "ok", "mac": ""}))
        return role, ws
    mac = data.get("mac")
    expected = key.mac(b"client", ns, nc, role, cert_fp)
    if not isinstance(mac, str) or not hmac.compare_digest(mac.encode(), expected.encode()):
        raise AuthError("wrong or missing cluster secret" + ("" if mac else " (the peer sent none)"))
    await ws.send(_dumps({"t": "ok", "mac": key.mac(b"server", ns, nc, role, cert_fp)}))
    c2s, s2c = key.session(ns, nc, role, cert_fp)
    return role, SealedLink(ws, s2c, c2s, _peer_name(ws))


async def client_handshake(ws: Any, key: Optional[LinkKey], role: str, seen_cert_fp: str = "",
                           timeout: float = HANDSHAKE_TIMEOUT) -> Any:
    """Authenticate to a server and make it prove it knows the secret too; returns the link to use from
    now on (a :class:`SealedLink` with a secret, else ``ws``). Raises :class:`AuthError`."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    data = await _recv_json(ws, timeout, "authentication challenge")
    if data.get("t") != "challenge" or data.get("v") != VERSION:
        raise AuthError(f"not a molink-lite peer of this version (protocol {data.get('v')!r}, this side speaks "
                        f"{VERSION}; upgrade both sides): got {str(data)[:120]}")
    ns = _hex(data, "nonce", 32)
    nc = secrets.token_bytes(32)
    mode = data.get("auth")
    if key is None:
        if mode != "none":
            raise AuthError("the stage requires the cluster secret: pass --secret-file FILE (or set MOLINK_SECRET)")
        await ws.send(_dumps({"t": "auth", "role": role, "nonce": nc.hex(), "mac": ""}))
        ok = await _recv_json(ws, timeout, "authentication result")
        if ok.get("t") != "ok":
            raise AuthError("the stage refused the connection")
        return ws
    if mode != "hmac-sha256":
        raise AuthError("the stage has no cluster secret (started with --insecure?); refusing to send it work")
    await ws.send(_dumps({"t": "auth", "role": role, "nonce": nc.hex(),
                          "mac": key.mac(b"client", ns, nc, role, seen_cert_fp)}))
    ok = await _recv_json(ws, timeout, "authentication result")
    mac = ok.get("mac")
    expected = key.mac(b"server", ns, nc, role, seen_cert_fp)
    if ok.get("t") != "ok" or not isinstance(mac, str) or not hmac.compare_digest(mac.encode(), expected.encode()):
        raise AuthError("the stage could not prove it knows the cluster secret, or its TLS certificate is not "
                        "the one it signed (a different secret, or a man in the middle)")
    c2s, s2c = key.session(ns, nc, role, seen_cert_fp)
    return SealedLink(ws, c2s, s2c, _peer_name(ws))


async def connect(url: str, key: Optional[LinkKey], role: str, *, max_size: int, open_timeout: float = 10.0,
                  ping_interval: Optional[float] = 20.0, ping_timeout: Optional[float] = 60.0) -> Any:
    """Open a WebSocket to a stage (``ws://`` or ``wss://``), authenticate it and return the link (sealed
    when there is a secret; ``max_size`` counts what the peer may send before sealing).

    Raises :class:`AuthError` when authentication fails (the message says which side lacks what) and
    OSError / websockets errors when the stage cannot be reached.
    """
    from .relay import open_tunnel, split_via
    from .tls import client_context, peer_fingerprint

    url, via = split_via(url)
    ssl_ctx = client_context() if url.startswith("wss://") else None
    # a relayed stage (behind NAT): the link runs end to end inside a byte tunnel through the relay
    extra = {"sock": await asyncio.wait_for(open_tunnel(via), open_timeout)} if via else {}
    # close_timeout: a peer that stopped answering pings will not answer a close either; do not wait 10 s for it
    try:
        ws = await websockets.connect(url, max_size=max_size + SEAL_OVERHEAD, compression=None, open_timeout=open_timeout,
                                      ping_interval=ping_interval, ping_timeout=ping_timeout, ssl=ssl_ctx,
                                      close_timeout=0.25, **extra)
    except BaseException:
        if extra:
            extra["sock"].close()
        raise
    try:
        return await client_handshake(ws, key, role, peer_fingerprint(ws))
    except BaseException:
        await ws.close()
        raise
