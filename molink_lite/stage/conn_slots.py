"""The stage's connection-slot table: who may open a connection now, and whose unanswered handshake makes room.

A stage holds at most ``max_connections`` connections (``max_connections_per_address`` from one address; IPv6:
one /64) and ``max_handshakes`` unauthenticated ones (``max_handshakes_per_address``). A newcomer that finds a
table full takes the slot of the oldest pending (unauthenticated) connection from its own address (or, for the
global tables, from the address holding the most): an honest peer answers within one round trip, so silent
squatters, even from the address relayed tunnels come from (this host), cannot lock a gateway out.
Authenticated connections are never evicted; when only they fill a table the newcomer is refused (the server
closes it with code 1013, :data:`BUSY`, which gateways and stages retry with backoff).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS = 128, 48
MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDRESS = 64, 16
HANDSHAKE_TIMEOUT = 5.0        # an unauthenticated peer's time to answer the challenge (honest ones: one round trip)
BUSY = "too many connections"  # the close reason of a refusal for lack of slots (gateways retry on it)


class Pending:
    """An admitted connection: pending (evictable) until it passed the handshake, held until released."""

    __slots__ = ("addr", "t0", "evicted", "released")

    def __init__(self, addr: str):
        self.addr = addr
        self.t0 = time.monotonic()
        self.evicted = asyncio.Event()  # set when a newer connection took this one's slot
        self.released = False


class ConnSlots:
    """Connection and handshake slots, per address and in all; counts ``evicted_handshakes`` in ``stats``."""

    def __init__(self, stats: Dict[str, float], *, max_connections: int = MAX_CONNECTIONS,
                 max_handshakes: int = MAX_HANDSHAKES,
                 max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
                 max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS):
        self.stats = stats
        stats.setdefault("evicted_handshakes", 0)
        self.max_connections, self.max_handshakes = max_connections, max_handshakes
        self.max_connections_per_address = max_connections_per_address
        self.max_handshakes_per_address = max_handshakes_per_address
        self.n_conn = 0
        self.by_addr: Counter = Counter()
        self.pending: Dict[str, List[Pending]] = {}  # per address, oldest first
        self._busy_logged = 0.0
        self._busy_quiet = 0

    def enter(self, addr: str) -> Tuple[Optional[Pending], str]:
        """A slot for a new connection from ``addr`` (pending until :meth:`unpend`, held until :meth:`release`),
        or (None, why not)."""
        refused = self._admit(addr)
        if refused:
            return None, refused
        rec = Pending(addr)
        self.pending.setdefault(addr, []).append(rec)
        self.n_conn += 1
        self.by_addr[addr] += 1
        return rec, ""

    def _admit(self, addr: str) -> str:
        """Make room for a new connection from ``addr``: "" when it may come in (the oldest pending handshake
        evicted if a table was full), else why not (only authenticated connections fill the table)."""
        mine = self.pending.get(addr, [])
        if len(mine) >= self.max_handshakes_per_address \
                or self.by_addr[addr] >= self.max_connections_per_address:
            pool, why = mine, f"{self.by_addr[addr]} authenticated connections from this address"
        elif sum(map(len, self.pending.values())) >= self.max_handshakes or self.n_conn >= self.max_connections:
            pool = max(self.pending.values(), key=lambda v: (len(v), -v[0].t0), default=[])
            why = f"{self.n_conn} authenticated connections"
        else:
            return ""
        if not pool:
            return why
        self._evict(pool[0])
        return ""

    def _evict(self, rec: Pending) -> None:
        self.release(rec)
        self.stats["evicted_handshakes"] += 1
        rec.evicted.set()

    def unpend(self, rec: Pending) -> None:
        """``rec`` passed the handshake (or failed it): it can no longer be evicted."""
        mine = self.pending.get(rec.addr)
        if mine is not None and rec in mine:
            mine.remove(rec)
            if not mine:
                del self.pending[rec.addr]

    def release(self, rec: Pending) -> None:
        """The connection no longer holds a slot (it ended, or was evicted)."""
        if rec.released:
            return
        rec.released = True
        self.unpend(rec)
        self.n_conn -= 1
        self.by_addr[rec.addr] -= 1
        if self.by_addr[rec.addr] <= 0:
            del self.by_addr[rec.addr]

    def log_busy(self, msg: str, *args: object) -> None:
        """Warn about refused or evicted connections at most once a second (a flood must not flood the log)."""
        now = time.monotonic()
        if now - self._busy_logged < 1.0:
            self._busy_quiet += 1
            return
        quiet, self._busy_quiet, self._busy_logged = self._busy_quiet, 0, now
        log.warning(msg + (f" (and {quiet} more refused or evicted in the last second)" if quiet else ""), *args)


def address_key(peer: object) -> str:
    """The address a connection counts against: its IP (IPv6: its /64, what one host usually holds)."""
    host = peer[0] if isinstance(peer, (tuple, list)) and peer else peer
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


async def close_quickly(ws, code: int, reason: str) -> None:
    """Close with ``code``/``reason`` but do not wait long for a silent peer's answer (then drop the socket)."""
    try:
        await asyncio.wait_for(ws.close(code, reason), 1.0)
    except Exception:  # noqa: BLE001 - closing is best effort
        pass
    transport = getattr(ws, "transport", None)
    if transport is not None and not transport.is_closing():
        transport.abort()


__all__ = ["ConnSlots", "Pending", "address_key", "close_quickly", "BUSY", "HANDSHAKE_TIMEOUT", "MAX_CONNECTIONS",
           "MAX_CONNECTIONS_PER_ADDRESS", "MAX_HANDSHAKES", "MAX_HANDSHAKES_PER_ADDRESS"]
