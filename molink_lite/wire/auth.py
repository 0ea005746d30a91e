"""Mutual authentication of a WebSocket link with the cluster secret, before any other message.

Every link (gateway -> stage, stage -> next stage) starts with this exchange of three small JSON
text messages; nothing else is read from the peer until it has succeeded:

1. server -> client ``{"t": "challenge", "v": 1, "auth": "hmac-sha256"|"none", "nonce": Ns, "cert": fp}``
2. client -> server ``{"t": "auth", "role": R, "nonce": Nc, "mac": HMAC(K, "client" | Ns | Nc | R | cert)}``
3. server -> client ``{"t": "ok", "mac": HMAC(K, "server" | Ns | Nc | R | cert)}``

``K`` is derived from the secret (the secret itself never crosses the wire); ``Ns`` and ``Nc`` are
fresh 32-byte nonces, so a recorded transcript cannot be replayed against either side. ``cert`` is
the SHA-256 fingerprint of the server's TLS certificate: the server puts in its own, the client the
one it actually received. A man in the middle presenting another certificate therefore makes both
MACs fail, which pins self-signed certificates without any CA (``--tls auto``).
``R`` is what the client will be on this link: ``gateway`` (controls the stage), ``upstream``
(the previous stage, which only sends steps) or ``member`` (a stage joining a gateway).

With no secret on either side (loopback, or ``--insecure``) the same messages flow with
``auth: "none"`` and no MACs. A side that has a secret refuses a peer that has none.
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

VERSION = 1
ROLES = ("gateway", "upstream", "member")
HANDSHAKE_TIMEOUT = 10.0
CLOSE_AUTH = 4401        # WebSocket close code: authentication failed
CLOSE_BUSY = 1013        # try again later (too many connections or handshakes)
CLOSE_REPLACED = 4409    # another gateway/upstream took this link's role
SECRET_ENV = "MOLINK_SECRET"
MIN_SECRET_CHARS = 16


class AuthError(ConnectionError):
    """The link could not be authenticated; the message says why and what to do."""


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
        raise AuthError(f"the peer closed the connection ({reason or 'no reason given'})") from None
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


async def server_handshake(ws: Any, key: Optional[LinkKey], cert_fp: str = "",
                           timeout: float = HANDSHAKE_TIMEOUT) -> str:
    """Authenticate the client of an accepted connection; returns its role. Raises :class:`AuthError`."""
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
        return role
    mac = data.get("mac")
    expected = key.mac(b"client", ns, nc, role, cert_fp)
    if not isinstance(mac, str) or not hmac.compare_digest(mac.encode(), expected.encode()):
        raise AuthError("wrong or missing cluster secret" + ("" if mac else " (the peer sent none)"))
    await ws.send(_dumps({"t": "ok", "mac": key.mac(b"server", ns, nc, role, cert_fp)}))
    return role


async def client_handshake(ws: Any, key: Optional[LinkKey], role: str, seen_cert_fp: str = "",
                           timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Authenticate to a server and make it prove it knows the secret too. Raises :class:`AuthError`."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    data = await _recv_json(ws, timeout, "authentication challenge")
    if data.get("t") != "challenge" or data.get("v") != VERSION:
        raise AuthError(f"not a molink-lite stage of this version (got {str(data)[:120]})")
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
        return
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


async def connect(url: str, key: Optional[LinkKey], role: str, *, max_size: int, open_timeout: float = 10.0,
                  ping_interval: Optional[float] = 20.0, ping_timeout: Optional[float] = 60.0) -> Any:
    """Open a WebSocket to a stage (``ws://`` or ``wss://``) and authenticate it; returns the connection.

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
        ws = await websockets.connect(url, max_size=max_size, compression=None, open_timeout=open_timeout,
                                      ping_interval=ping_interval, ping_timeout=ping_timeout, ssl=ssl_ctx,
                                      close_timeout=0.25, **extra)
    except BaseException:
        if extra:
            extra["sock"].close()
        raise
    try:
        await client_handshake(ws, key, role, peer_fingerprint(ws))
    except BaseException:
        await ws.close()
        raise
    if key is not None and ssl_ctx is None:
        log.debug("link to %s is authenticated but not encrypted (use wss:// and --tls on the stage)", url)
    return ws
