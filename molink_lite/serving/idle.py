"""``--idle-unload``: a model nobody asked for in a while gives its stages' memory back, and loads on demand.

One :class:`IdleUnloader` per served model (:mod:`.models`). It watches the model: once no request has named it
for ``idle_s`` seconds and none of its sequences runs or waits, every stage of every up pipeline frees its
llama.cpp model and context (``release``, :mod:`molink_lite.stage.server`): weights, KV cache and buffers go
back to the host (resident memory drops), while the stage processes, their ports, links and layer files stay.
The model's cached prefixes are forgotten (their KV is gone).

The next request for the model (:meth:`IdleUnloader.touch`, from the gateway's model lookup) starts loading it
again (``restore``: the same files and settings, read from the page cache or disk; no placement, no download);
the request waits (:meth:`IdleUnloader.ready`, at most ``load_timeout`` seconds, with progress in the log) and
then gets a normal answer. A request arriving while the model is being released waits for the release and the
load after it.

States: ``loaded``, ``releasing``, ``unloaded``, ``loading`` (``/v1/models`` shows ``unloaded`` / ``loading``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Deque, Dict, Optional

from .chain import PipelineError

log = logging.getLogger(__name__)
MIN_IDLE_S = 1.0


class IdleUnloader:
    """Releases one model's stages after ``idle_s`` seconds without requests; loads them on the next one."""

    def __init__(self, model: Any, idle_s: float, load_timeout: float = 600.0) -> None:
        if idle_s < MIN_IDLE_S:
            raise ValueError(f"--idle-unload must be at least {MIN_IDLE_S:g} s, got {idle_s}")
        self.model = model              # a models.ServedModel
        self.idle_s = idle_s
        self.load_timeout = load_timeout
        self.state = "loaded"
        self.detail = ""
        self.last_use = time.monotonic()
        self.active = 0                 # requests naming the model that have not ended (never released meanwhile)
        self._loaded = asyncio.Event()
        self._loaded.set()
        self._task: Optional[asyncio.Task] = None   # the release or load running now
        self._released_at = 0.0
        self.history: Deque[Dict[str, Any]] = deque(maxlen=32)   # releases and loads, with times and memory
        self.counts = {"released": 0, "loaded": 0, "load_failures": 0}

    # ------------------------------------------------------------------ requests
    def begin(self) -> None:
        """A request naming the model starts (its tokenization, checks and generation keep the model loaded)."""
        self.active += 1
        self.touch()

    def end(self) -> None:
        """That request has ended (answered, refused or gone)."""
        self.active = max(0, self.active - 1)
        self.last_use = time.monotonic()

    def touch(self) -> None:
        """A request names the model: it is in use now; an unloaded model starts loading."""
        self.last_use = time.monotonic()
        if self.state == "unloaded":
            self._start(self._load())

    async def ready(self) -> None:
        """Return once the model is loaded (loading it if needed); PipelineError after ``load_timeout``."""
        if self.state == "loaded":
            return
        self.touch()
        try:
            await asyncio.wait_for(self._loaded.wait(), self.load_timeout)
        except asyncio.TimeoutError:
            raise PipelineError(f"model {self.model.name} did not load within {self.load_timeout:g} s "
                                f"({self.detail or self.state})") from None
        if self.state != "loaded":   # pragma: no cover - set only with the state
            raise PipelineError(f"model {self.model.name} could not be loaded: {self.detail}")

    # ------------------------------------------------------------------ the watch
    def busy(self) -> bool:
        r = self.model.router
        return bool(self.active) or bool(r.queued) or any(not p.idle for p in r.pipelines)

    async def watch(self, interval: Optional[float] = None) -> None:
        """Release the model once idle (runs for the gateway's life)."""
        interval = interval if interval is not None else min(1.0, self.idle_s / 4)
        while True:
            await asyncio.sleep(interval)
            if self.state != "loaded" or self._task is not None:
                continue
            if time.monotonic() - self.last_use < self.idle_s or self.busy():
                continue
            if not any(p.healthy for p in self.model.router.pipelines):
                continue   # nothing up to release (joining, or down): look again later
            self._start(self._release())

    def _start(self, coro: Any) -> None:
        if self._task is not None:   # a release runs: the load follows it (touch() during it)
            coro.close()
            return
        self._task = asyncio.ensure_future(coro)
        self._task.add_done_callback(self._done)

    def _done(self, task: "asyncio.Task") -> None:
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("model %s: %s", self.model.name, task.exception())
        if self.state == "unloaded" and self.last_use > self._released_at:   # asked for while it was released
            self._start(self._load())

    async def _release(self) -> None:
        name = self.model.name
        self.state, self.detail = "releasing", f"idle for {self.idle_s:g} s: releasing its stages' memory"
        self._loaded.clear()
        self._released_at = time.monotonic()
        pipes = [p for p in self.model.router.pipelines if p.healthy and p.idle]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(p.release() for p in pipes), return_exceptions=True)
        before = after = 0
        for p, r in zip(pipes, results):
            if isinstance(r, BaseException):
                log.warning("model %s: pipeline %s did not release its stages: %s", name, p.name, r)
                continue
            before += sum(int(x.get("rss_before") or 0) for x in r)
            after += sum(int(x.get("rss_bytes") or 0) for x in r)
        self.state = "unloaded"
        self.detail = (f"released after {self.idle_s:g} s without requests; the next request loads it "
                       f"(stages' resident memory {before / 2**20:.0f} -> {after / 2**20:.0f} MiB)")
        self.counts["released"] += 1
        self.history.append({"event": "released", "at": round(time.time(), 3), "pipelines": len(pipes),
                             "seconds": round(time.perf_counter() - t0, 3), "rss_before": before,
                             "rss_after": after})
        log.info("model %s idle for %g s: %d pipeline(s) released their stages' memory (%.0f -> %.0f MiB resident)",
                 name, self.idle_s, len(pipes), before / 2**20, after / 2**20)

    async def _load(self) -> None:
        name = self.model.name
        self.state, self.detail = "loading", "a request arrived: loading its stages again"
        pipes = [p for p in self.model.router.pipelines if p.healthy]
        log.info("model %s: a request waits; loading %d pipeline(s) again", name, len(pipes))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(p.restore(self.load_timeout) for p in pipes), return_exceptions=True)
        took = time.perf_counter() - t0
        failed = [(p, r) for p, r in zip(pipes, results) if isinstance(r, BaseException)]
        for p, r in failed:   # its stages could not load: down, so requests go to the others or wait for it
            self.counts["load_failures"] += 1
            p.fail(f"could not load the model again after it was idle: {r}")
        self.state, self.detail = "loaded", ""
        self.counts["loaded"] += 1
        self.history.append({"event": "loaded", "at": round(time.time(), 3), "pipelines": len(pipes),
                             "failed": len(failed), "seconds": round(took, 3),
                             "rss_after": sum(int(x.get("rss_bytes") or 0) for r in results
                                              if not isinstance(r, BaseException) for x in r)})
        log.info("model %s loaded again in %.2f s (%d of %d pipeline(s))", name, took, len(pipes) - len(failed),
                 len(pipes))
        self._loaded.set()

    def summary(self) -> Dict[str, Any]:
        """For ``/v1/stats``: the setting, state, counts and the latest releases and loads."""
        return {"idle_unload_s": self.idle_s, "state": self.state, "detail": self.detail,
                "idle_for_s": round(time.monotonic() - self.last_use, 1), **self.counts,
                "history": list(self.history)[-8:]}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


__all__ = ["IdleUnloader", "MIN_IDLE_S"]
