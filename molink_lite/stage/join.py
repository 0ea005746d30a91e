"""A stage that joins a gateway instead of being configured by hand (``molink-lite stage --join URL``).

Over one authenticated WebSocket to the gateway (``/cluster``, same cluster-secret handshake as
every link, role ``member``): report what this host offers (backend, free memory capped by
``--max-memory``, the address peers should use), wait for a layer range, then fetch only that
range's partial GGUF from the gateway: streamed in chunks, resumable (a ``.part`` file continues
where it stopped), SHA-256 verified, written straight into the local cache. The host never stores
or reads the whole model file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import orjson

from ..wire import auth, relay
from ..wire.auth import LinkKey

log = logging.getLogger(__name__)
CHUNK = 1 << 20
MAX_LAYER_FILE = 1 << 42        # 4 TiB: a larger announced size is a lie
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class JoinError(RuntimeError):
    """Joining failed; the message says why."""


@dataclass
class Assignment:
    layers: str            # "a-b", inclusive
    path: Path             # the fetched partial GGUF
    n_ctx: int
    n_seqs: int
    codec: str


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
    """This stage's link to the gateway while it joins, fetches and serves."""

    def __init__(self, gateway: str, key: Optional[LinkKey], cache_dir: Path):
        self.url = cluster_url(gateway)
        self.key = key
        self.cache_dir = Path(cache_dir)
        self.ws: Any = None
        self._task: Optional[asyncio.Future] = None

    async def open(self, timeout: float = 600.0) -> str:
        """Connect and authenticate (retrying while the gateway is not up yet, at most ``timeout`` seconds);
        returns this host's address on the connection towards the gateway."""
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            try:
                self.ws = await auth.connect(self.url, self.key, "member", max_size=4 * CHUNK, ping_interval=20,
                                             ping_timeout=60)
                break
            except auth.AuthError as e:
                raise JoinError(f"the gateway refused to let this stage join: {e}") from None
            except Exception as e:  # noqa: BLE001 - not reachable (yet)
                if time.monotonic() + delay > deadline:
                    raise JoinError(f"cannot reach the gateway at {self.url}: {e}") from None
                log.info("waiting for the gateway at %s (%s)", self.url, e)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)
        local = self.ws.local_address
        return str(local[0]) if local else socket.gethostname()

    async def _send(self, obj: dict) -> None:
        await self.ws.send(orjson.dumps(obj).decode())

    async def _recv(self) -> Any:
        try:
            return await self.ws.recv()
        except Exception as e:  # noqa: BLE001 - the gateway went away
            raise JoinError(f"the gateway closed the cluster link: {e}") from None

    async def _recv_json(self) -> dict:
        msg = await self._recv()
        if not isinstance(msg, str):
            raise JoinError("unexpected binary message from the gateway")
        data = orjson.loads(msg)
        if data.get("t") == "error":
            raise JoinError(f"the gateway says: {data.get('message')}")
        return data

    async def join(self, *, name: str, offer: dict, advertise: str,
                   calibrate: Optional[Callable[[str, int], float]] = None) -> dict:
        """Register (``offer``: backend, memory_bytes, ram_free, devices), answer the gateway's calibration
        request with ``calibrate(path, n_rows)`` (seconds per step of a one-layer file), and wait for a
        layer range (``{"t": "assign", ...}``)."""
        await self._send({"t": "join", "name": name, "advertise": advertise, **offer})
        log.info("joined %s as %s (%s, %.0f MiB offered); waiting for a layer range", self.url, name,
                 offer["backend"], offer["memory_bytes"] / 2**20)
        while True:
            msg = await self._recv_json()
            if msg.get("t") == "assign":
                return msg
            if msg.get("t") == "wait":
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

    async def fetch(self, assign: dict) -> Path:
        """Download the assigned partial GGUF (resuming a .part file), verify its SHA-256, return its path."""
        dst = self.layer_path(assign)
        size, sha = assign.get("size"), assign.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_LAYER_FILE:
            raise JoinError(f"the gateway sent a bad file size {str(size)[:40]!r}; nothing was written")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise JoinError("the gateway sent a bad sha256; nothing was written")
        if dst.exists() and dst.stat().st_size == size:
            log.info("layer file already here: %s", dst)
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(dst.name + ".part")
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            part.unlink()
            offset = 0
        h = hashlib.sha256()
        if offset:
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    h.update(block)
            log.info("resuming the download at %.1f of %.1f MiB", offset / 2**20, size / 2**20)
        await self._send({"t": "fetch", "offset": offset})
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
        return dst

    async def ready(self, url: str, local: Tuple[str, int]) -> None:
        """Tell the gateway this stage serves at ``url``; then answer its requests on the cluster link:
        reachability probes of peers, and relay dial-backs to this stage's own port at ``local``."""
        await self._send({"t": "ready", "url": url})
        self._task = asyncio.ensure_future(self._serve(local))

    async def _serve(self, local: Tuple[str, int]) -> None:
        base = self.url[: -len("/cluster")]
        while True:
            try:
                msg = orjson.loads(await self.ws.recv())
            except Exception as e:  # noqa: BLE001 - the gateway went away; the stage keeps serving
                log.warning("the cluster link to the gateway ended (%s); this stage keeps serving", e)
                return
            kind = msg.get("t") if isinstance(msg, dict) else None
            if kind == "probe":
                asyncio.ensure_future(self._probe(msg))
            elif kind == "dial" and isinstance(msg.get("id"), str):
                asyncio.ensure_future(relay.dial_back(f"{base}/relay-back/{msg['id']}", *local))

    async def _probe(self, msg: dict) -> None:
        ok, why = await relay.reachable(str(msg.get("url", "")), timeout=float(msg.get("timeout", 2.0)))
        try:
            await self._send({"t": "probed", "id": msg.get("id"), "ok": ok, "why": why})
        except Exception:  # noqa: BLE001 - the gateway went away
            pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.ws is not None:
            await self.ws.close()
