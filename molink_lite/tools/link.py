"""Portable TCP link emulator (a user-space stand-in for ``tc netem``).

``molink-lite link --listen :9101 --to host:9001 --delay-ms 10 --rate-mbit 100``
accepts TCP connections on the listen address, opens one connection to the
target per client, and relays bytes in both directions through an emulated
link that models:

* **serialization** -- a bandwidth cap per direction (``rate_mbit``), and
* **propagation** -- a fixed one-way delay per direction (``delay_ms``).

Each chunk read from one side at time ``now`` is scheduled for delivery at::

    start      = max(now, link_free_at)
    link_free_at = start + len(chunk) / rate      # serialization (if capped)
    due        = link_free_at + delay             # propagation

Delivery is in order per direction.  The delay is a *pipe*: many chunks are in
flight at once (a reader task keeps reading while a writer task sleeps until
each chunk's due time), so the delay adds latency but does not limit
throughput -- up to the per-direction buffer bound ``buffer_bytes``; with no
rate cap the best-case throughput is about ``buffer_bytes / delay``.

Backpressure: each direction holds at most ``buffer_bytes`` of undelivered
data (queued + "on the wire").  When full, the relay stops reading that side,
so the sender's TCP window closes just as with a real slow link.

Closing: an EOF (half-close) from one side is forwarded *in order*, i.e. after
all data read before it has been delivered, as a ``write_eof`` (FIN) on the
other side; the other direction keeps flowing.  When both directions have
ended, both sockets are closed.  A connection reset / write error on either
side tears down the whole relayed connection.  If the target refuses (or the
connect times out) the client connection is closed and a warning is logged.

Timer precision: times come from ``loop.time()`` (monotonic).  Due times are
absolute, so timer lateness never accumulates: the average rate is exact and
only per-chunk jitter depends on the timer.  On Linux/macOS asyncio sleeps are
accurate to ~1 ms only (epoll/kqueue timeouts are rounded up to whole ms), so the
last 2 ms before each delivery are slept in a thread (``time.sleep``, accurate to
tens of microseconds), and sub-millisecond delays (a LAN's 0.1-0.5 ms) are
emulated as asked.  On
Windows the event loop waits with a millisecond timeout that the system timer
rounds to its tick (~15.6 ms by default), so each delivery can be up to ~16 ms
late; before Python 3.13 ``time.monotonic()`` (hence ``loop.time()``) also
ticks at ~15.6 ms, and asyncio may fire a timer up to one tick early, so
expect about +/-16 ms per crossing there.  Delays well below ~30 ms are not
meaningfully emulated on Windows; chunks due within one tick are sent together
(the average rate is still right).

Pure asyncio + stdlib; works with the default event loops on Linux, macOS and
Windows (Proactor), and with uvloop if the caller installs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Optional, Set, Tuple

__all__ = ["LinkConfig", "LinkRelay", "parse_hostport", "run_link"]

log = logging.getLogger(__name__)

MAX_CHUNK = 64 * 1024  # largest single read (keeps the rate cap smooth)
MIN_CHUNK = 4 * 1024
DEFAULT_BUFFER = 4 * 1024 * 1024  # per-direction in-flight bound (bytes)

# Kinds of queue entries.
_DATA, _EOF, _RESET = 0, 1, 2


@dataclass
class LinkConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    target_host: str = "127.0.0.1"
    target_port: int = 0
    delay_ms: float = 0.0  # one-way added delay, applied in EACH direction
    rate_mbit: Optional[float] = None  # bandwidth cap in EACH direction (None = unlimited)
    # Per-direction bound on undelivered bytes (queued + propagating).  None:
    # max(4 MiB, 2 x bandwidth-delay product) so a capped link can be kept full.
    buffer_bytes: Optional[int] = None
    connect_timeout: float = 10.0  # seconds to wait for the target's accept

    def __post_init__(self) -> None:
        if self.delay_ms is None or self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms!r}")
        if self.rate_mbit is not None and not self.rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0 or None (unlimited), got {self.rate_mbit!r}")
        if self.buffer_bytes is not None and self.buffer_bytes <= 0:
            raise ValueError(f"buffer_bytes must be > 0, got {self.buffer_bytes!r}")
        for name in ("listen_port", "target_port"):
            p = getattr(self, name)
            if not 0 <= int(p) <= 65535:
                raise ValueError(f"{name} out of range: {p!r}")

    # Derived quantities ---------------------------------------------------
    @property
    def rate_bytes_per_s(self) -> Optional[float]:
        return None if self.rate_mbit is None else self.rate_mbit * 1e6 / 8.0

    @property
    def delay_s(self) -> float:
        return self.delay_ms / 1000.0

    def effective_buffer(self) -> int:
        if self.buffer_bytes is not None:
            return int(self.buffer_bytes)
        rate = self.rate_bytes_per_s
        if rate is None:
            return DEFAULT_BUFFER
        return max(DEFAULT_BUFFER, int(2 * rate * self.delay_s))

    def chunk_size(self) -> int:
        """Read size: ~2 ms of serialization time, clamped to [4 KiB, 64 KiB]."""
        rate = self.rate_bytes_per_s
        if rate is None:
            return MAX_CHUNK
        return max(MIN_CHUNK, min(MAX_CHUNK, int(rate * 0.002)))

    def describe(self) -> str:
        rate = "unlimited" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        return (
            f"link {_fmt_hostport(self.listen_host, self.listen_port)} -> "
            f"{_fmt_hostport(self.target_host, self.target_port)}: "
            f"delay {self.delay_ms:g} ms each way (RTT +{2 * self.delay_ms:g} ms), "
            f"rate {rate} each way"
        )


def _fmt_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(s: str, default_host: str = "127.0.0.1") -> Tuple[str, int]:
    """Parse ``":9101"``, ``"9101"``, ``"host:9001"`` or ``"[::1]:80"``.

    An empty host (``":9101"``) or a bare port gives ``default_host``.  IPv6
    literals must be bracketed.  Raises ``ValueError`` with a clear message.
    """
    if not isinstance(s, str):
        raise ValueError(f"expected 'host:port' string, got {s!r}")
    text = s.strip()
    if not text:
        raise ValueError("empty address; expected 'host:port', ':port' or '[v6addr]:port'")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in address {s!r}")
        host = text[1:end]
        rest = text[end + 1:]
        if not host:
            raise ValueError(f"empty IPv6 address in {s!r}")
        if not rest.startswith(":"):
            raise ValueError(f"missing ':port' after ']' in {s!r}")
        port_s = rest[1:]
    elif text.isdigit():
        host, port_s = "", text
    else:
        if ":" not in text:
            raise ValueError(f"missing port in {s!r}; expected 'host:port' or ':port'")
        host, port_s = text.rsplit(":", 1)
        if ":" in host:
            raise ValueError(f"IPv6 address must be bracketed, e.g. '[::1]:80', got {s!r}")
    if not port_s:
        raise ValueError(f"missing port in {s!r}")
    if not port_s.isdigit():
        raise ValueError(f"port must be a number in {s!r}, got {port_s!r}")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range 0-65535 in {s!r}")
    if any(c.isspace() for c in host):
        raise ValueError(f"whitespace in host of {s!r}")
    return (host or default_host), port


FINE_SLEEP_S = 0.002   # the last 2 ms before a delivery are slept in a thread (see _Lane._sleep)
#: The relay learns how late its deliveries come (a thread's wake-up, the event loop's wake-up, the write) and
#: wakes that much earlier (``LinkRelay.leads``, at most the link's delay and LEAD_MAX_S): a 0.25 ms delay otherwise
#: added 0.4-0.5 ms per crossing on 2 busy cores. Each delivery moves the lead by LEAD_GAIN of its lateness.
LEAD_MAX_S = 0.001
LEAD_GAIN = 0.25
_FINE: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _fine_timer() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that sleep the last stretch before deliveries (shared by every relayed connection)."""
    global _FINE
    if _FINE is None:
        _FINE = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="link-timer")
    return _FINE


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # pragma: no cover - platform dependent
        pass


async def _close_writer(writer: asyncio.StreamWriter, abort: bool = False, timeout: float = 1.0) -> None:
    try:
        if abort:
            writer.transport.abort()
        else:
            writer.close()
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (OSError, asyncio.TimeoutError):
        try:
            writer.transport.abort()
        except Exception:  # pragma: no cover
            pass


class _Lane:
    """One direction of an emulated link: src -> (serialize, propagate) -> dst."""

    def __init__(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        cfg: LinkConfig,
        stats: Dict[str, int],
        stat_key: str,
        leads: Dict[str, float],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.src = src
        self.dst = dst
        self.rate = cfg.rate_bytes_per_s
        self.delay = cfg.delay_s
        self.limit = cfg.effective_buffer()
        self.chunk = cfg.chunk_size()
        self.stats = stats
        self.stat_key = stat_key
        self.q: Deque[Tuple[float, int, bytes]] = deque()
        self.queued = 0
        self.free_at = 0.0  # when the emulated link finishes serializing
        self.has_item = asyncio.Event()
        self.has_space = asyncio.Event()
        self.has_space.set()
        # asyncio fires timers up to one clock tick early; accept that slack.
        # (>= 0.1 ms so a coarse-clock loop such as uvloop never micro-spins.)
        self.slack = max(time.get_clock_info("monotonic").resolution, 1e-4)
        # how much earlier than due to wake up, by direction (learned: see LEAD_GAIN): the relay's, shared by its
        # connections, so that a new connection starts with what the earlier ones learned
        self.leads = leads
        self.lead_max = min(LEAD_MAX_S, self.delay)

    def _push(self, kind: int, data: bytes = b"") -> None:
        now = self.loop.time()
        start = max(now, self.free_at)
        if self.rate is not None and data:
            start += len(data) / self.rate
        self.free_at = start
        self.q.append((start + self.delay, kind, data))
        self.queued += len(data)
        self.has_item.set()

    async def read_loop(self) -> None:
        try:
            while True:
                while self.queued >= self.limit:
                    self.has_space.clear()
                    await self.has_space.wait()
                data = await self.src.read(self.chunk)
                if not data:
                    self._push(_EOF)
                    return
                self._push(_DATA, data)
        except (ConnectionError, OSError):
            self._push(_RESET)

    async def write_loop(self) -> bool:
        """Deliver chunks at their due times.  Returns True on clean EOF,
        False if the source was reset (caller tears the connection down)."""
        q = self.q
        while True:
            while not q:
                self.has_item.clear()
                await self.has_item.wait()
            wait = q[0][0] - self._lead() - self.loop.time()
            if wait > self.slack:
                await self._sleep(wait)
                continue
            now = self.loop.time()
            lead = self._lead()
            horizon = now + self.slack + lead
            if q[0][1] == _DATA and self.lead_max > 0:   # learn the lateness of a delivery from its due time
                late = now - q[0][0]
                self.leads[self.stat_key] = min(self.lead_max, max(0.0, lead + LEAD_GAIN * late))
            delivered = 0
            while q and q[0][0] <= horizon:
                _, kind, data = q.popleft()
                if kind == _DATA:
                    self.dst.write(data)
                    delivered += len(data)
                    continue
                self._account(delivered)
                if kind == _EOF:
                    await self.dst.drain()
                    if self.dst.can_write_eof():
                        self.dst.write_eof()
                    else:  # pragma: no cover - e.g. SSL transports
                        self.dst.close()
                    return True
                await self.dst.drain()
                return False  # _RESET
            self._account(delivered)
            await self.dst.drain()

    async def _sleep(self, wait: float) -> None:
        """Sleep ``wait`` seconds, to well under a millisecond: the event loop's own timers wake on whole
        milliseconds (epoll), which turned a 0.5 ms delay into 1-2 ms; the last stretch below
        :data:`FINE_SLEEP_S` is slept in a thread (``time.sleep``: microseconds on Linux and macOS), whose end
        wakes the loop at once."""
        coarse = wait - FINE_SLEEP_S
        if coarse > 0:
            await asyncio.sleep(coarse)
            wait = self.q[0][0] - self._lead() - self.loop.time() if self.q else 0.0
        if wait > self.slack:
            await self.loop.run_in_executor(_fine_timer(), time.sleep, wait)

    def _lead(self) -> float:
        return self.leads.get(self.stat_key, 0.0)

    def _account(self, n: int) -> None:
        if n:
            self.queued -= n
            self.stats[self.stat_key] += n
            self.has_space.set()


class LinkRelay:
    """TCP relay that emulates a link with delay and a rate cap per direction."""

    def __init__(self, cfg: LinkConfig):
        self.cfg = cfg
        self.port: int = cfg.listen_port
        self.leads: Dict[str, float] = {}  # per direction: how early deliveries wake (see LEAD_GAIN)
        self.stats: Dict[str, int] = {
            "connections": 0,  # accepted client connections (total)
            "active": 0,  # relayed connections currently open
            "connect_failures": 0,  # target refused / unreachable / timed out
            "bytes_to_target": 0,  # client -> target, delivered
            "bytes_to_client": 0,  # target -> client, delivered
        }
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: Set[asyncio.Task] = set()
        self._closing = False

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("LinkRelay already started")
        host = self.cfg.listen_host or None  # "" -> all interfaces
        self._server = await asyncio.start_server(self._handle, host, self.cfg.listen_port)
        socks = self._server.sockets or ()
        if socks:
            self.port = socks[0].getsockname()[1]

    async def close(self) -> None:
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except asyncio.TimeoutError:  # pragma: no cover
                pass

    async def __aenter__(self) -> "LinkRelay":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        # Per-connection task created by asyncio.start_server; nobody awaits it
        # except close().  It must not finish in CancelledError: on Python <=
        # 3.11 the stream protocol's done-callback calls task.exception() and
        # reports "Exception in callback ... CancelledError" to the loop.
        try:
            await self._serve_conn(c_reader, c_writer)
        except asyncio.CancelledError:
            pass  # close() or loop shutdown; transports already torn down

    async def _serve_conn(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing:
            c_writer.transport.abort()
            return
        if task is not None:
            self._tasks.add(task)
        self.stats["connections"] += 1
        peer = c_writer.get_extra_info("peername")
        try:
            _set_nodelay(c_writer)
            cfg = self.cfg
            try:
                t_reader, t_writer = await asyncio.wait_for(
                    asyncio.open_connection(cfg.target_host, cfg.target_port), cfg.connect_timeout
                )
            except asyncio.CancelledError:
                c_writer.transport.abort()
                raise
            except (OSError, asyncio.TimeoutError) as e:
                self.stats["connect_failures"] += 1
                log.warning(
                    "link: connect to %s failed (%s); closing client %s",
                    _fmt_hostport(cfg.target_host, cfg.target_port),
                    e.__class__.__name__ if not str(e) else e,
                    peer,
                )
                await _close_writer(c_writer)
                return
            _set_nodelay(t_writer)
            self.stats["active"] += 1
            log.debug("link: %s connected", peer)
            try:
                await self._relay(c_reader, c_writer, t_reader, t_writer)
            finally:
                self.stats["active"] -= 1
                log.debug("link: %s closed", peer)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _relay(self, c_reader, c_writer, t_reader, t_writer) -> None:
        up = _Lane(c_reader, t_writer, self.cfg, self.stats, "bytes_to_target", self.leads)
        down = _Lane(t_reader, c_writer, self.cfg, self.stats, "bytes_to_client", self.leads)
        readers = [asyncio.ensure_future(up.read_loop()), asyncio.ensure_future(down.read_loop())]
        writers = {asyncio.ensure_future(up.write_loop()), asyncio.ensure_future(down.write_loop())}
        clean = True
        try:
            pending = set(writers)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.cancelled() or t.exception() is not None or not t.result():
                        exc = None if t.cancelled() else t.exception()
                        if exc is not None:
                            log.debug("link: connection error: %r", exc)
                        clean = False
                if not clean:
                    break
        except BaseException:
            clean = False
            raise
        finally:
            for t in (*readers, *writers):
                t.cancel()
            await asyncio.gather(*readers, *writers, return_exceptions=True)
            await asyncio.gather(
                _close_writer(c_writer, abort=not clean),
                _close_writer(t_writer, abort=not clean),
                return_exceptions=True,
            )


async def run_link(cfg: LinkConfig) -> None:
    """Start a relay, log one line describing it, and serve until cancelled."""
    relay = LinkRelay(cfg)
    await relay.start()
    desc = dataclasses.replace(cfg, listen_port=relay.port).describe()
    log.info("%s", desc)
    try:
        await asyncio.Event().wait()  # forever; ends by cancellation
    finally:
        await relay.close()
