"""A stage that joins a gateway instead of being configured by hand (``molink-lite stage --join URL``).

Over one authenticated WebSocket to the gateway (``/cluster``, same cluster-secret handshake as
every link, role ``member``): report what this host offers (backend, free memory capped by
``--max-memory``, the address peers should use), wait for a layer range, then fetch only that
range's partial GGUF from the gateway: streamed in chunks, resumable (a ``.part`` file continues
where it stopped), SHA-256 verified, written straight into the local cache. The host never stores
or reads the whole model file.

The stage stays a member for as long as it runs (:func:`run_joined`): when the cluster link drops (the gateway
restarted, the network failed) it keeps serving and joins again, retrying with backoff, and reports what it
serves (layers, model fingerprint, file sha256, its URL); a gateway that gives it the same layers back gets it
without a download. A file already in the cache is used only when its SHA-256 is the assigned one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

import orjson

from ..wire import auth, relay
from ..wire.auth import LinkKey

log = logging.getLogger(__name__)
CHUNK = 1 << 20
MAX_LAYER_FILE = 1 << 42        # 4 TiB: a larger announced size is a lie
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 5.0   # seconds between attempts to reach the gateway: doubling up to the cap
PROGRESS_EVERY = 5.0    # seconds between progress messages while verifying or loading a layer file


class JoinError(RuntimeError):
    """Joining failed; the message says why."""


class LinkLost(JoinError):
    """The cluster link ended, or the gateway let this stage go for now: join again."""


def cluster_url(gateway: str) -> str:
    """ws(s)://host:port/cluster from the gateway's http(s) address."""
    g = gateway.rstrip("/")
    if g.startswith("https://"):
        return "wss://" + g[len("https://"):] + "/cluster"
    if g.startswith("http://"):
        return "ws://" + g[len("http://"):] + "/cluster"
    if g.startswith(("ws://", "wss://")):
        return g if g.endswith("/cluster") else g + "/cluster"
    raise JoinError(f"--join needs the gateway's http(s):// address, got {gateway!r}")


class Membership:
    """This stage's link to the gateway while it joins, fetches and serves (one link at a time; :meth:`open`
    again after it was lost)."""

    def __init__(self, gateway: str, key: Optional[LinkKey], cache_dir: Path):
        self.url = cluster_url(gateway)
        self.key = key
        self.cache_dir = Path(cache_dir)
        self.ws: Any = None
        self.name: Optional[str] = None  # this host's name in the cluster, as the gateway told it
        self.sec_per_layer: Optional[float] = None  # measured once; reported again when rejoining
        self.downloads = 0  # layer files fetched over the link (not counting files already here)
        self._task: Optional[asyncio.Future] = None
        self._lost: Optional[asyncio.Future] = None  # why the current link ended, once it has
        self._verified: Dict[str, Tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256) checked here

    async def open(self, timeout: Optional[float] = 600.0) -> str:
        """Connect and authenticate, retrying with backoff while the gateway cannot be reached (at most
        ``timeout`` seconds; None: until it can); returns this host's address on the connection towards it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, attempt = BACKOFF_FIRST, 0
        while True:
            attempt += 1
            try:
                self.ws = await auth.connect(self.url, self.key, "member", max_size=4 * CHUNK, ping_interval=20,
                                             ping_timeout=60)
                break
            except auth.AuthError as e:
                raise JoinError(f"the gateway refused to let this stage join: {e}") from None
            except Exception as e:  # noqa: BLE001 - not reachable (yet)
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise JoinError(f"cannot reach the gateway at {self.url}: {e}") from None
                wait = delay * random.uniform(0.8, 1.2)
                log.info("gateway %s: attempt %d failed (%s); next in %.1f s", self.url, attempt, _short(e), wait)
                await asyncio.sleep(wait)
                delay = min(2 * delay, BACKOFF_MAX)
        if attempt > 1:
            log.info("gateway %s reached (attempt %d)", self.url, attempt)
        self._lost = asyncio.get_running_loop().create_future()
        local = self.ws.local_address
        return str(local[0]) if local else socket.gethostname()

    async def _send(self, obj: dict) -> None:
        try:
            await self.ws.send(orjson.dumps(obj).decode())
        except Exception as e:  # noqa: BLE001 - the gateway went away
            raise LinkLost(f"the cluster link to the gateway ended: {_short(e)}") from None

    async def _recv(self) -> Any:
        try:
            return await self.ws.recv()
        except Exception as e:  # noqa: BLE001 - the gateway went away
            raise LinkLost(f"the gateway closed the cluster link: {_short(e)}") from None

    async def _recv_json(self) -> dict:
        msg = await self._recv()
        if not isinstance(msg, str):
            raise JoinError("unexpected binary message from the gateway")
        data = orjson.loads(msg)
        if not isinstance(data, dict):
            raise JoinError("unexpected message from the gateway")
        if data.get("t") == "error":
            if data.get("rejoin"):
                raise LinkLost(f"the gateway says: {data.get('message')}")
            raise JoinError(f"the gateway says: {data.get('message')}")
        return data

    async def join(self, *, name: str, offer: dict, advertise: str,
                   calibrate: Optional[Callable[[str, int], float]] = None, serving: Optional[dict] = None) -> dict:
        """Register (``offer``: backend, memory_bytes, ram_free, devices; ``serving``: the layers this stage
        serves already, when it rejoins), answer the gateway's calibration request with ``calibrate(path,
        n_rows)`` (seconds per step of a one-layer file), and wait for a layer range (``{"t": "assign", ...}``)."""
        msg: Dict[str, Any] = {"t": "join", "name": name, "advertise": advertise, **offer}
        if self.sec_per_layer is not None:
            msg["sec_per_layer"] = self.sec_per_layer
        if serving is not None:
            msg["serving"] = serving
        await self._send(msg)
        log.info("joined %s as %s (%s, %.0f MiB offered%s); waiting for a layer range", self.url, name,
                 offer["backend"], offer["memory_bytes"] / 2**20,
                 f"; serving layers {serving['layers']} at {serving['url']}" if serving else "")
        while True:
            msg = await self._recv_json()
            if msg.get("t") == "assign":
                return msg
            if msg.get("t") == "wait":
                given = msg.get("name")
                if isinstance(given, str) and given and given != self.name:
                    if given != name:
                        log.warning("the gateway names this host %r (a host named %r is there already)", given, name)
                    self.name = given[:80]
                log.info("gateway: %s", msg.get("message"))
            elif msg.get("t") == "calibrate":
                await self._calibrate(msg, calibrate)

    async def _calibrate(self, msg: dict, calibrate: Optional[Callable[[str, int], float]]) -> None:
        """Write the one-layer calibration file (its header as sent; the zero weights as a sparse tail), time
        it, report the seconds per layer-step."""
        header = await self._recv()
        if not isinstance(header, bytes):
            raise JoinError("expected the calibration file's header")
        size, tag = int(msg["size"]), "".join(c for c in str(msg.get("name", "calib")) if c.isalnum() or c in "-_.")
        reply: dict = {"t": "calibrated"}
        if calibrate is None or size < len(header):
            reply["error"] = "no calibration on this stage"
        else:
            path = self.cache_dir / "calibration" / f"{tag[:80]}.gguf"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(header)
                f.truncate(size)
            t0 = time.perf_counter()
            try:
                spl = await asyncio.get_running_loop().run_in_executor(None, calibrate, str(path),
                                                                       int(msg.get("rows", 1)))
                reply["sec_per_layer"] = spl
                self.sec_per_layer = spl
                log.info("calibration: %.2f ms per layer-step at %d rows (took %.1f s)", 1e3 * spl,
                         int(msg.get("rows", 1)), time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - report it; the gateway then assumes a nominal speed
                reply["error"] = f"calibration failed: {e}"[:300]
                log.warning("%s", reply["error"])
            finally:
                path.unlink(missing_ok=True)
        await self._send(reply)

    def layer_path(self, assign: dict) -> Path:
        """Where the assigned file goes: ``<cache>/joined/<fingerprint>/<file>``, both plain names (no separators,
        no ``..``, nothing absolute) and the result checked to lie inside the cache folder. Raises JoinError."""
        parts = []
        for key in ("fingerprint", "file"):
            v = assign.get(key)
            if not isinstance(v, str) or not _SAFE_NAME.fullmatch(v) or ".." in v:
                raise JoinError(f"the gateway sent a bad {key!r} ({str(v)[:80]!r}): a plain file name is required; "
                                f"nothing was written")
            parts.append(v)
        root = (self.cache_dir / "joined").resolve()
        dst = (root / parts[0] / parts[1]).resolve()
        if root not in dst.parents:
            raise JoinError(f"the gateway's file name leads outside the cache folder ({dst}); nothing was written")
        return dst

    @contextlib.asynccontextmanager
    async def progress(self, what: str) -> Any:
        """While inside, tell the gateway every few seconds that this stage is busy with ``what`` (so its wait
        for this stage's ready message starts again)."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(PROGRESS_EVERY)
                try:
                    await self._send({"t": "progress", "what": what})
                except LinkLost:
                    return

        task = asyncio.ensure_future(beat())
        try:
            yield
        finally:
            task.cancel()

    async def _sha_of(self, path: Path) -> str:
        """SHA-256 of a file here (hashed in a worker thread, remembered while the file is unchanged)."""
        st = path.stat()
        known = self._verified.get(str(path))
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        async with self.progress("verifying"):
            sha = await asyncio.get_running_loop().run_in_executor(None, _file_sha, path)
        self._verified[str(path)] = (st.st_size, st.st_mtime_ns, sha)
        return sha

    async def fetch_projector(self, assign: dict) -> Optional[Path]:
        """The vision projector an assignment of layer 0 may come with (``assign["mmproj"]``: file, size, sha256),
        fetched like the layers (checked name, resumed, verified) next to them; None when there is none."""
        mm = assign.get("mmproj")
        if mm is None:
            return None
        if not isinstance(mm, dict):
            raise JoinError("the gateway sent a bad 'mmproj'; nothing was written")
        sub = {"fingerprint": assign.get("fingerprint"), "file": mm.get("file"), "size": mm.get("size"),
               "sha256": mm.get("sha256"), "layers": "vision projector"}
        if sub["file"] == assign.get("file"):
            raise JoinError("the gateway names the projector as the layer file; nothing was written")
        return await self.fetch(sub, what="mmproj")

    async def fetch(self, assign: dict, what: str = "layers") -> Path:
        """The assigned partial GGUF: the file already here when its SHA-256 is the assigned one, else downloaded
        (resuming a .part file of the same SHA-256) and verified. Returns its path. ``what="mmproj"``: the
        assignment's vision projector (:meth:`fetch_projector`)."""
        dst = self.layer_path(assign)
        size, sha = assign.get("size"), assign.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_LAYER_FILE:
            raise JoinError(f"the gateway sent a bad file size {str(size)[:40]!r}; nothing was written")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise JoinError("the gateway sent a bad sha256; nothing was written")
        if dst.exists():
            have = await self._sha_of(dst) if dst.stat().st_size == size else None
            if have == sha:
                log.info("layer file already here (sha256 %s... verified), nothing to download: %s", sha[:16], dst)
                return dst
            log.warning("the layer file here is not the assigned one (%s); downloading it again: %s",
                        f"sha256 {have[:16]}..., assigned {sha[:16]}..." if have else
                        f"{dst.stat().st_size} bytes, assigned {size}", dst)
            dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(f"{dst.name}.{sha[:16]}.part")  # one per file version: never resumed from another
        for old in [*dst.parent.glob(f"{dst.name}.*.part"), dst.with_name(dst.name + ".part")]:
            if old != part:
                old.unlink(missing_ok=True)
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            part.unlink()
            offset = 0
        h = hashlib.sha256()
        if offset:
            async with self.progress("verifying"):
                await asyncio.get_running_loop().run_in_executor(None, _hash_into, h, part)
            log.info("resuming the download at %.1f of %.1f MiB", offset / 2**20, size / 2**20)
        await self._send({"t": "fetch", "offset": offset, **({"what": what} if what != "layers" else {})})
        done, step = offset, max(size // 10, CHUNK)
        bar = None
        if sys.stderr.isatty():  # a progress bar on a terminal; log lines every 10% otherwise
            from tqdm import tqdm

            bar = tqdm(total=size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"layers {assign['layers']}")
        t0 = time.perf_counter()
        try:
            with open(part, "ab") as f:
                while done < size:
                    chunk = await self._recv()
                    if isinstance(chunk, str):
                        try:
                            said = orjson.loads(chunk)
                        except orjson.JSONDecodeError:
                            said = None
                        if isinstance(said, dict) and said.get("rejoin"):
                            raise LinkLost(f"the gateway says: {said.get('message')}")
                        raise JoinError(f"download interrupted: {chunk[:200]}")
                    if done + len(chunk) > size:
                        raise JoinError(f"the gateway sent more than the announced {size} bytes")
                    f.write(chunk)
                    h.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    elif (done + len(chunk)) // step != done // step:
                        log.info("fetched %.0f%% of layers %s (%.1f MiB)", 100 * (done + len(chunk)) / size,
                                 assign["layers"], size / 2**20)
                    done += len(chunk)
        finally:
            if bar is not None:
                bar.close()
        dt = time.perf_counter() - t0
        log.info("fetched %.1f MiB in %.2f s (%.1f MiB/s)", (done - offset) / 2**20, dt,
                 (done - offset) / 2**20 / max(dt, 1e-9))
        if done != size or h.hexdigest() != sha:
            part.unlink(missing_ok=True)
            raise JoinError(f"the downloaded layer file is corrupt (sha256 {h.hexdigest()[:16]}..., expected "
                            f"{sha[:16]}...); run the stage again to download it anew")
        os.replace(part, dst)
        st = dst.stat()
        self._verified[str(dst)] = (st.st_size, st.st_mtime_ns, sha)
        self.downloads += 1
        return dst

    async def ready(self, url: str, local: Tuple[str, int]) -> None:
        """Tell the gateway this stage serves at ``url``; then answer its requests on the cluster link:
        reachability probes of peers, and relay dial-backs to this stage's own port at ``local``.
        Never raises: a link that ended is reported by :meth:`wait_lost`."""
        try:
            await self._send({"t": "ready", "url": url})
        except LinkLost as e:
            self._mark_lost(str(e))
            return
        self._task = asyncio.ensure_future(self._serve(local))

    def _mark_lost(self, why: str) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(why)

    async def wait_lost(self) -> str:
        """Wait until the current cluster link ends; why it did."""
        assert self._lost is not None, "open() first"
        return await asyncio.shield(self._lost)

    async def _serve(self, local: Tuple[str, int]) -> None:
        base = self.url[: -len("/cluster")]
        while True:
            try:
                msg = orjson.loads(await self.ws.recv())
            except Exception as e:  # noqa: BLE001 - the gateway went away; the stage keeps serving
                self._mark_lost(_short(e))
                return
            kind = msg.get("t") if isinstance(msg, dict) else None
            if kind == "probe":
                asyncio.ensure_future(self._probe(msg))
            elif kind == "dial" and isinstance(msg.get("id"), str):
                asyncio.ensure_future(relay.dial_back(f"{base}/relay-back/{msg['id']}", *local))
            elif kind == "error":
                log.warning("gateway: %s", str(msg.get("message"))[:300])

    async def _probe(self, msg: dict) -> None:
        ok, why = await relay.reachable(str(msg.get("url", "")), timeout=float(msg.get("timeout", 2.0)))
        try:
            await self._send({"t": "probed", "id": msg.get("id"), "ok": ok, "why": why})
        except LinkLost:
            pass

    async def drop(self) -> None:
        """End the current link (before opening a new one)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.ws is not None:
            try:
                await self.ws.close()
            except Exception:  # noqa: BLE001 - it is gone already
                pass
            self.ws = None

    async def close(self) -> None:
        await self.drop()


@dataclass
class Serving:
    """Layers this stage serves: the assignment, its file, the engine and the server running it."""

    assign: dict
    path: Path
    engine: Any
    task: Optional[asyncio.Future] = None
    url: str = ""
    local: Tuple[str, int] = ("127.0.0.1", 0)
    listening: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    retiring: bool = False  # stopped on purpose (new layers): its server's end is not the stage's

    KEYS = ("layers", "fingerprint", "file", "size", "sha256", "n_ctx", "n_seqs", "codec")

    def report(self) -> dict:
        """What a rejoin tells the gateway (with the vision projector's sha256 when it serves one)."""
        mm = self.assign.get("mmproj")
        return {**{k: self.assign.get(k) for k in self.KEYS}, "url": self.url,
                "mmproj": mm.get("sha256") if isinstance(mm, dict) else None}

    def same(self, assign: dict) -> bool:
        return all(assign.get(k) == self.assign.get(k) for k in (*self.KEYS, "mmproj"))

    async def stop(self) -> None:
        self.retiring = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


async def run_joined(m: Membership, *, name: str, offer: Callable[[], dict], advertise: str,
                     calibrate: Optional[Callable[[str, int], float]],
                     load: Callable[[Path, dict], Any],
                     serve: Callable[[Any, dict, Callable[[int], Awaitable[None]]], Awaitable[None]],
                     address: Callable[[int, str], Tuple[str, Tuple[str, int]]],
                     first_timeout: float = 600.0) -> None:
    """Be a member until the stage server ends (drained, or a fatal :class:`JoinError`): join, fetch the assigned
    layers (and with layer 0 the vision projector, if any: ``assign["_mmproj"]`` is then its path here;
    ``load(path, assign)`` makes the engine, in a worker thread), run ``serve(engine, assign, on_listen)``
    (``address(port, local_ip)`` gives the URL to report and the local address relay dial-backs connect to).
    Whenever the cluster link ends, keep serving and join again (backoff between attempts, no time limit once
    joined), reporting what is served; the same layers back mean no download and no restart."""
    loop = asyncio.get_running_loop()
    held: Optional[Serving] = None
    joined_once = False
    first_offer: Optional[dict] = None
    ended: asyncio.Future = loop.create_future()  # the server task that stopped on its own (drained, failed)

    def watch(serving: Serving) -> None:
        def done(task: asyncio.Future) -> None:
            if not serving.retiring and not ended.done():
                ended.set_result(task)
        assert serving.task is not None
        serving.task.add_done_callback(done)

    async def session() -> None:
        """One cluster link: join, get layers (the same ones back, or fetch and serve new ones), serve until it ends."""
        nonlocal held, joined_once, first_offer
        try:
            local_ip = await m.open(timeout=None if joined_once else first_timeout)
            if held is None or first_offer is None:
                first_offer = offer()  # while serving, report the offer made before its layers took memory
            assign = await m.join(name=m.name or name, offer=first_offer, advertise=advertise,
                                  calibrate=calibrate if held is None else None,  # busy serving: nominal speed
                                  serving=held.report() if held is not None else None)
            joined_once = True
            if held is not None and held.same(assign):
                log.info("rejoined: the gateway keeps this stage's layers %s (same file, sha256 %s...); serving on "
                         "at %s, nothing downloaded", assign["layers"], str(assign["sha256"])[:16], held.url)
                await m.ready(held.url, held.local)
            else:
                if held is not None:
                    log.warning("the gateway assigns layers %s (this stage served %s): restarting with them",
                                assign.get("layers"), held.assign.get("layers"))
                    old, held = held, None
                    await old.stop()
                path = await m.fetch(assign)
                mm = await m.fetch_projector(assign)
                if mm is not None:   # serve(...) starts the stage with it (--mmproj)
                    assign = {**assign, "_mmproj": str(mm)}
                async with m.progress("loading"):
                    engine = await loop.run_in_executor(None, load, path, assign)
                serving = held = Serving(assign, path, engine)

                async def on_listen(port: int) -> None:
                    serving.url, serving.local = address(port, local_ip)
                    if not serving.listening.done():
                        serving.listening.set_result(None)
                    await m.ready(serving.url, serving.local)

                serving.task = asyncio.ensure_future(serve(engine, assign, on_listen))
                watch(serving)
                await serving.listening
            why = await m.wait_lost()
            log.warning("the cluster link to the gateway ended (%s); this stage keeps serving and joins again", why)
        except LinkLost as e:
            log.warning("%s; %s", e, "this stage keeps serving and joins again" if held is not None
                        else "joining again")

    pause = 0.0  # a link that ends soon after it was made is not retried at once (backoff, as for connecting)
    try:
        while True:
            if pause:
                log.info("joining again in %.1f s", pause)
            t0 = time.monotonic()
            work = asyncio.ensure_future(asyncio.sleep(pause)) if pause else None
            if work is not None:
                await asyncio.wait([work, ended], return_when=asyncio.FIRST_COMPLETED)
            if not ended.done():
                work = asyncio.ensure_future(session())
                await asyncio.wait([work, ended], return_when=asyncio.FIRST_COMPLETED)
            if ended.done():
                if work is not None:
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                ended.result().result()  # raises what stopped the server
                return  # drained
            work.result()  # a fatal JoinError
            await m.drop()
            lasted = time.monotonic() - t0 - pause
            pause = 0.0 if lasted > 30 else min(max(2 * pause, BACKOFF_FIRST), BACKOFF_MAX)
    finally:
        if held is not None:
            await held.stop()
        await m.close()


def _short(e: BaseException) -> str:
    """One line for a log: the exception's type and message."""
    text = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _hash_into(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    _hash_into(h, path)
    return h.hexdigest()
