"""Prometheus metrics of one gateway (``GET /metrics``) and the recent rates behind ``/v1/stats``.

Each :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry` (several gateways in one
process do not share counters). Two kinds of values:

Every series carries a ``model`` label (a gateway may serve several models; :mod:`.models`).

* **Events**, counted as they happen, O(1) each: requests by endpoint and HTTP status, prompt and
  generated tokens, time to first token and inter-token latency (histograms, observed by the pipelines
  through each model's :class:`ModelObserver`).
* **State**, read at scrape time by a collector: queue length, running sequences, pipeline state,
  KV cells reserved, the router's and pipelines' counters, the prefix caches, measured links, and every
  stage's counters (steps, rows, step time, KV cells used, memory). Stage values are fetched through the gateway's
  links with a short timeout and cached for a second (:meth:`Metrics.refresh`), so a scrape never
  waits on a slow stage for long and many scrapers cost the stages one request per second at most.

Everything a stage reports is treated as untrusted: numbers are coerced (anything else is dropped) and
label values are cut to a bounded length.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)
__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "TTFT_BUCKETS", "ITL_BUCKETS", "prefix_cache_summary"]

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PIPELINE_STATES = ("connecting", "up", "down", "recovering")
STAGE_TIMEOUT = 2.0   # seconds a scrape waits for one pipeline's stage counters
STAGE_MAX_AGE = 1.0   # stage counters younger than this are served from the cache
WINDOW_S = 60         # recent rates (/v1/stats) cover at most this many seconds
_LABEL_MAX = 200


def _num(v: Any) -> Optional[float]:
    """A finite number from an untrusted value, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _label(v: Any) -> str:
    return str(v if v is not None else "")[:_LABEL_MAX]


def prefix_cache_summary(p: Any) -> Dict[str, Any]:
    """A pipeline's prefix cache for ``/v1/stats`` and ``/metrics``: counters (``prefix_*``) from ``p.stats``, else
    from ``p.prefix_stats()``, else 0; state from ``p.prefix_stats()`` (entries, cells, budget; all 0 on a pipeline
    without one). ``hit_rate`` is hits / lookups, None before the first lookup. ``enabled``: ``prefix_stats()``'s
    own word if it gives one, else the pipeline's ``prefix_cache`` setting."""
    st = getattr(p, "stats", None) or {}
    get = getattr(p, "prefix_stats", None)
    ps: Dict[str, Any] = {}
    if callable(get):
        try:
            ps = dict(get() or {})
        except Exception:  # noqa: BLE001 - a scrape or /v1/stats must not fail on it
            log.exception("prefix_stats() of pipeline %s failed", getattr(p, "name", "?"))
    if "enabled" in ps:
        enabled = bool(ps["enabled"])
    else:
        flag = getattr(p, "prefix_cache", None) if callable(get) else None
        enabled = flag if isinstance(flag, bool) else flag is not None

    def counter(key: str) -> Any:
        return st[key] if key in st else ps.get(key, 0)

    lookups, hits = counter("prefix_lookups"), counter("prefix_hits")
    return {"enabled": enabled, "entries": ps.get("entries", 0), "cells": ps.get("cells", 0),
            "budget": ps.get("budget", 0), "lookups": lookups, "hits": hits,
            "hit_rate": hits / lookups if lookups else None, "tokens_reused": counter("prefix_tokens_reused"),
            "evictions": counter("prefix_evictions")}


class _Window:
    """Per-second sums of tokens, TTFT and inter-token gaps over the last ``WINDOW_S`` seconds (O(1) per event)."""

    def __init__(self) -> None:
        # [second, tokens, ttft sum, ttft count, gap sum, gap count]
        self.buckets: Deque[List[float]] = deque(maxlen=WINDOW_S + 2)
        self.started = time.monotonic()

    def _now(self) -> List[float]:
        sec = int(time.monotonic())
        if not self.buckets or self.buckets[-1][0] != sec:
            self.buckets.append([sec, 0, 0.0, 0, 0.0, 0])
        return self.buckets[-1]

    def add(self, i: int, value: float, count_i: int = -1) -> None:
        b = self._now()
        b[i] += value
        if count_i >= 0:
            b[count_i] += 1

    def summary(self, window: int) -> dict:
        """Tokens per second and mean TTFT / inter-token gap over the last ``window`` seconds (or since start)."""
        now = time.monotonic()
        since = int(now) - window
        span = max(1.0, min(float(window), now - self.started))
        tok = ttft_s = ttft_n = gap_s = gap_n = 0.0
        for sec, t, fs, fn, gs, gn in self.buckets:
            if sec > since:
                tok += t
                ttft_s += fs
                ttft_n += fn
                gap_s += gs
                gap_n += gn
        return {"tokens_per_s": round(tok / span, 3),
                "ttft_s": round(ttft_s / ttft_n, 5) if ttft_n else None,
                "inter_token_s": round(gap_s / gap_n, 5) if gap_n else None}


class ModelObserver:
    """One model's token timings (its pipelines call these; O(1) each): counted under its ``model`` label."""

    def __init__(self, metrics: "Metrics", model: Any) -> None:
        self.m = metrics
        self.model = model          # a ServedModel (its name may be known only once a stage says it) or a str
        self.window = _Window()

    @property
    def name(self) -> str:
        return str(getattr(self.model, "name", self.model))

    def first_token(self, seconds: float) -> None:
        self.m.ttft.labels(self.name).observe(seconds)
        self.window.add(2, seconds, 3)
        self.m.window.add(2, seconds, 3)

    def token_gap(self, seconds: float) -> None:
        self.m.itl.labels(self.name).observe(seconds)
        self.window.add(4, seconds, 5)
        self.m.window.add(4, seconds, 5)

    def tokens(self, n: int) -> None:
        if n:
            self.m.generation_tokens.labels(self.name).inc(n)
            self.window.add(1, n)
            self.m.window.add(1, n)


class Metrics:
    """The metrics of one gateway over its models' routers (pipelines may be added later, by joins).

    ``Metrics(router)`` watches one router as model ``model``; :meth:`add_model` adds a served model (its router's
    observer becomes this model's :class:`ModelObserver`)."""

    def __init__(self, router: Any = None, model: str = "model") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("molink_requests", "HTTP generation requests answered, by model, endpoint and status "
                                "(model '' for a request refused before its model was known)",
                                ["model", "endpoint", "status"], registry=r)
        self.disconnects = Counter("molink_client_disconnects",
                                   "Generation requests whose client went away before the answer was complete",
                                   ["model"], registry=r)
        self.prompt_tokens = Counter("molink_prompt_tokens", "Prompt tokens of admitted requests", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("molink_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("molink_time_to_first_token_seconds",
                              "From a request's admission to its first generated token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("molink_inter_token_latency_seconds",
                             "Time between consecutive tokens of one sequence", ["model"], buckets=ITL_BUCKETS,
                             registry=r)
        self.window = _Window()   # all models together
        self.observers: List[ModelObserver] = []
        self._routers: List[Any] = []   # (observer, router) in model order: observer i watches router i
        if router is not None:
            self.add_router(model, router)
        # the gateway's HTTP limits (connections, refusals, cut connections), set by the gateway once it listens
        self.http_stats: Optional[Callable[[], dict]] = None
        self.stage_cache: Dict[str, Any] = {}   # pipeline name -> list of stage stats, or an error string
        self._fetched_at = -math.inf
        self._refreshing: Optional[asyncio.Future] = None
        r.register(_StateCollector(self))

    def add_model(self, model: Any) -> ModelObserver:
        """Watch a served model (:class:`~.models.ServedModel`: ``name`` and ``router``)."""
        return self.add_router(model, model.router)

    def add_router(self, model: Any, router: Any) -> ModelObserver:
        obs = ModelObserver(self, model)
        self.observers.append(obs)
        self._routers.append(router)
        router.observer = obs
        return obs

    @property
    def watched(self) -> List[tuple]:
        """(model name, router) of every model, in order."""
        return [(o.name, r) for o, r in zip(self.observers, self._routers)]

    # ------------------------------------------------------------------ events (hot path: O(1) each)
    def prompt(self, model: str, n: int) -> None:
        self.prompt_tokens.labels(model).inc(n)

    def request_done(self, endpoint: str, status: int, model: str = "") -> None:
        self.requests.labels(model, endpoint, str(status)).inc()

    def client_gone(self, endpoint: str, model: str = "") -> None:
        """The client closed the connection before the answer was complete (counted as status 499)."""
        self.requests.labels(model, endpoint, "499").inc()
        self.disconnects.labels(model).inc()

    # ------------------------------------------------------------------ scrape
    async def refresh(self) -> None:
        """Fetch every up pipeline's stage counters (cached ``STAGE_MAX_AGE`` s; one fetch at a time)."""
        if time.monotonic() - self._fetched_at < STAGE_MAX_AGE:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._fetch())
        # shield: a scraper that goes away does not cancel the fetch the others wait for
        await asyncio.shield(self._refreshing)

    async def _fetch(self) -> None:
        pipes = [(name, p) for name, r in self.watched for p in r.pipelines if p.healthy]

        async def one(p: Any) -> Any:
            try:
                return await asyncio.wait_for(p.stage_stats(), STAGE_TIMEOUT)
            except asyncio.TimeoutError:
                return f"stages did not answer within {STAGE_TIMEOUT:g} s"
            except Exception as e:  # noqa: BLE001 - a broken link: reported as the stages' error
                return str(e) or type(e).__name__

        results = await asyncio.gather(*(one(p) for _, p in pipes))
        self.stage_cache = {(name, p.name): r for (name, p), r in zip(pipes, results)}
        self._fetched_at = time.monotonic()

    async def exposition(self) -> bytes:
        """The Prometheus text format of everything (stage values at most ``STAGE_MAX_AGE`` s old)."""
        await self.refresh()
        return generate_latest(self.registry)

    def recent(self, model: Optional[str] = None) -> dict:
        """Totals and recent rates for ``/v1/stats`` (the dashboard and ``molink-lite status``): of all models, or
        of the one called ``model``."""
        by_status: Dict[str, float] = {}
        for m in self.requests.collect():
            for s in m.samples:
                if s.name.endswith("_total") and (model is None or s.labels["model"] == model):
                    by_status[s.labels["status"]] = by_status.get(s.labels["status"], 0) + s.value
        window = self.window
        if model is not None:
            window = next((o.window for o in self.observers if o.name == model), _Window())
        return {"requests": {k: int(v) for k, v in sorted(by_status.items())},
                "prompt_tokens": _total(self.prompt_tokens, model),
                "generation_tokens": _total(self.generation_tokens, model),
                "last_10s": window.summary(10), "last_60s": window.summary(WINDOW_S)}


class _StateCollector:
    """Gateway, pipeline and stage state, read at scrape time."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def describe(self) -> List[Metric]:
        return []  # dynamic: registering must not run a scrape

    def collect(self) -> Iterator[Metric]:
        watched = self.m.watched
        qlen = GaugeMetricFamily("molink_queue_length", "Requests waiting for a slot (parked ones included)",
                                 labels=["model"])
        parked = GaugeMetricFamily("molink_parked_requests", "Requests waiting for a pipeline to come back",
                                   labels=["model"])
        ev = CounterMetricFamily("molink_router_events", "Router events: replayed, parked, recovered, expired, "
                                 "overloaded", labels=["model", "event"])
        for model, router in watched:
            model = _label(model)
            qlen.add_metric([model], router.queued)
            parked.add_metric([model], len(router.parked))
            for k, v in router.stats.items():
                ev.add_metric([model, k], v)
        yield from (qlen, parked, ev)

        state = GaugeMetricFamily("molink_pipeline_state", "1 for the pipeline's current state",
                                  labels=["model", "pipeline", "state"])
        up = GaugeMetricFamily("molink_pipeline_up", "1 while the pipeline serves", labels=["model", "pipeline"])
        running = GaugeMetricFamily("molink_running_sequences", "Sequences holding a slot", labels=["model", "pipeline"])
        queued = GaugeMetricFamily("molink_pipeline_queued_sequences", "Sequences queued on the pipeline",
                                   labels=["model", "pipeline"])
        load = GaugeMetricFamily("molink_pipeline_load", "Share of slots or KV in use (0..1)", labels=["model", "pipeline"])
        kv_res = GaugeMetricFamily("molink_kv_cells_reserved", "KV cells reserved by admitted sequences "
                                   "(prompt + max_tokens)", labels=["model", "pipeline"])
        kv_cap = GaugeMetricFamily("molink_kv_cells_capacity", "KV cells of the pipeline (smallest stage context)",
                                   labels=["model", "pipeline"])
        steps = CounterMetricFamily("molink_pipeline_steps", "Steps sent", labels=["model", "pipeline"])
        rows = CounterMetricFamily("molink_pipeline_rows", "Rows sent, by kind", labels=["model", "pipeline", "kind"])
        seqs = CounterMetricFamily("molink_pipeline_sequences", "Sequences ended, by outcome",
                                   labels=["model", "pipeline", "outcome"])
        fails = CounterMetricFamily("molink_pipeline_failures", "Times the pipeline went down", labels=["model", "pipeline"])
        recs = CounterMetricFamily("molink_pipeline_recoveries", "Times the pipeline came back", labels=["model", "pipeline"])
        rtt = GaugeMetricFamily("molink_link_rtt_seconds", "Measured round-trip time of a stage-to-stage link",
                                labels=["model", "pipeline", "stage", "to"])
        bw = GaugeMetricFamily("molink_link_bandwidth_bytes_per_second", "Measured bandwidth of a stage-to-stage link",
                               labels=["model", "pipeline", "stage", "to"])
        pc_on = GaugeMetricFamily("molink_prefix_cache_enabled", "1 if the pipeline keeps a prefix cache",
                                  labels=["model", "pipeline"])
        pc_lookups = CounterMetricFamily("molink_prefix_cache_lookups", "Requests that looked for a cached prefix",
                                         labels=["model", "pipeline"])
        pc_hits = CounterMetricFamily("molink_prefix_cache_hits", "Requests that found a cached prefix",
                                      labels=["model", "pipeline"])
        pc_reused = CounterMetricFamily("molink_prefix_cache_tokens_reused", "Prompt tokens not prefilled because "
                                        "their KV was copied from a cached prefix", labels=["model", "pipeline"])
        pc_evictions = CounterMetricFamily("molink_prefix_cache_evictions", "Prefix cache entries evicted",
                                           labels=["model", "pipeline"])
        pc_entries = GaugeMetricFamily("molink_prefix_cache_entries", "Prefixes held by the cache",
                                       labels=["model", "pipeline"])
        pc_cells = GaugeMetricFamily("molink_prefix_cache_cells", "KV cells held by cached prefixes (the same on "
                                     "every stage of the pipeline)", labels=["model", "pipeline"])
        pc_budget = GaugeMetricFamily("molink_prefix_cache_budget_cells", "KV cells the prefix cache may hold",
                                      labels=["model", "pipeline"])
        pipes = [(_label(model), router, p) for model, router in watched for p in router.pipelines]
        described = {(id(router), d["name"]): d["state"] for _, router in watched for d in router.describe()}
        for model, router, p in pipes:
            name = _label(p.name)
            cur = described.get((id(router), p.name), p.state)
            for s in PIPELINE_STATES:
                state.add_metric([model, name, s], 1.0 if cur == s else 0.0)
            up.add_metric([model, name], 1.0 if p.healthy else 0.0)
            running.add_metric([model, name], len(p.active))
            queued.add_metric([model, name], len(p.waiting))
            load.add_metric([model, name], p.load)
            kv_res.add_metric([model, name], p.kv_reserved)
            kv_cap.add_metric([model, name], p.n_ctx)
            st = p.stats
            steps.add_metric([model, name], st["steps"])
            rows.add_metric([model, name, "prefill"], st["prefill_rows"])
            rows.add_metric([model, name, "decode"], st["decode_rows"])
            seqs.add_metric([model, name, "completed"], st["completed"])
            seqs.add_metric([model, name, "failed"], st["failed"])
            fails.add_metric([model, name], st["failures"])
            recs.add_metric([model, name], st["recoveries"])
            pc = prefix_cache_summary(p)
            pc_on.add_metric([model, name], 1.0 if pc["enabled"] else 0.0)
            for fam, key in ((pc_lookups, "lookups"), (pc_hits, "hits"), (pc_reused, "tokens_reused"),
                             (pc_evictions, "evictions"), (pc_entries, "entries"), (pc_cells, "cells"),
                             (pc_budget, "budget")):
                fam.add_metric([model, name], pc[key])
            for i, k in enumerate(p.links):
                r, mb = _num(k.get("rtt_ms")), _num(k.get("mbit"))
                if r is not None:
                    rtt.add_metric([model, name, str(i), _label(k.get("to"))], r / 1e3)
                if mb is not None:
                    bw.add_metric([model, name, str(i), _label(k.get("to"))], mb * 1e6 / 8)
        yield from (state, up, running, queued, load, kv_res, kv_cap, steps, rows, seqs, fails, recs, rtt, bw,
                    pc_on, pc_lookups, pc_hits, pc_reused, pc_evictions, pc_entries, pc_cells, pc_budget)
        yield from self._http()
        yield from self._stages([(m, p) for m, _, p in pipes])

    def _http(self) -> Iterator[Metric]:
        get = self.m.http_stats
        h = get() if get is not None else {}
        if "connections" not in h:
            return
        yield _gauge("molink_http_connections", "Open HTTP connections", h["connections"])
        yield _gauge("molink_http_client_addresses", "Remote addresses (IPv6: /64s) with open connections",
                     h["addresses"])
        refused = CounterMetricFamily("molink_http_refused", "Connections or requests turned away by a limit: "
                                      "connections (global cap), per_address, per_key (concurrent requests of "
                                      "one API key)", labels=["limit"])
        for label, k in (("connections", "refused"), ("per_address", "refused_per_address"),
                         ("per_key", "requests_refused_per_key")):
            refused.add_metric([label], h.get(k, 0))
        closed = CounterMetricFamily("molink_http_closed", "Connections closed by the gateway: idle keep-alive ones "
                                     "making room at a cap, slow headers, clients that stopped reading (write "
                                     "timeout)", labels=["reason"])
        for label, k in (("idle_for_room", "idle_closed_for_room"), ("header_timeout", "header_timeouts"),
                         ("write_timeout", "write_timeouts")):
            closed.add_metric([label], h.get(k, 0))
        yield refused
        yield closed

    def _stages(self, pipes: List[tuple]) -> Iterator[Metric]:
        labels = ["model", "pipeline", "stage"]
        info = GaugeMetricFamily("molink_stage_info", "A stage: address, host, layers, backend (value 1)",
                                 labels=labels + ["url", "host", "layers", "backend"])
        gpu = GaugeMetricFamily("molink_stage_gpu_layers", "Layers the stage offloads to a GPU", labels=labels)
        size = GaugeMetricFamily("molink_stage_model_bytes", "Size of the stage's GGUF", labels=labels)
        up = GaugeMetricFamily("molink_stage_up", "1 if the stage answered the last stats request", labels=labels)
        counters = {
            "steps": CounterMetricFamily("molink_stage_steps", "Steps the stage ran", labels=labels),
            "rows": CounterMetricFamily("molink_stage_rows", "Rows the stage ran", labels=labels),
            "busy_s": CounterMetricFamily("molink_stage_busy_seconds", "Time the stage spent on steps",
                                          labels=labels),
            "engine_decode_s": CounterMetricFamily("molink_stage_engine_seconds", "Time in llama.cpp's decode",
                                                   labels=labels),
            "errors": CounterMetricFamily("molink_stage_errors", "Steps that failed on the stage", labels=labels),
        }
        step_s = GaugeMetricFamily("molink_stage_step_seconds", "Mean time of the stage's recent steps (last 512)",
                                   labels=labels)
        rows_per = GaugeMetricFamily("molink_stage_rows_per_step", "Rows per step, mean since the stage started",
                                     labels=labels)
        live = GaugeMetricFamily("molink_stage_live_sequences", "Sequences holding KV on the stage", labels=labels)
        kv_used = GaugeMetricFamily("molink_kv_cells_used", "KV cells (positions) in use on the stage", labels=labels)
        rss = GaugeMetricFamily("molink_stage_memory_bytes", "Resident memory of the stage process", labels=labels)
        for model, p in pipes:
            name = _label(p.name)
            infos = list(p.infos) if p.healthy else []
            cached = self.m.stage_cache.get((model, p.name))
            stats = cached if isinstance(cached, list) else []
            for i, inf in enumerate(infos):
                idx = str(i)
                info.add_metric([model, name, idx, _label(inf.get("url")), _label(inf.get("host")), _layers(inf),
                                 _label(inf.get("backend"))], 1.0)
                for fam, key in ((gpu, "n_gpu_layers"), (size, "model_bytes")):
                    v = _num(inf.get(key))
                    if v is not None:
                        fam.add_metric([model, name, idx], v)
                s = stats[i] if i < len(stats) and isinstance(stats[i], dict) else None
                up.add_metric([model, name, idx], 1.0 if s is not None else 0.0)
                if s is None:
                    continue
                for key, fam in counters.items():
                    v = _num(s.get(key))
                    if v is not None:
                        fam.add_metric([model, name, idx], v)
                n_steps, n_rows = _num(s.get("steps")), _num(s.get("rows"))
                if n_steps and n_rows is not None:
                    rows_per.add_metric([model, name, idx], n_rows / n_steps)
                mean = _mean_step(s.get("timeline"))
                if mean is not None:
                    step_s.add_metric([model, name, idx], mean)
                for fam, key in ((live, "live_seqs"), (kv_used, "kv_positions"), (rss, "rss_bytes")):
                    v = _num(s.get(key))
                    if v is not None:
                        fam.add_metric([model, name, idx], v)
        yield from (info, gpu, size, up, *counters.values(), step_s, rows_per, live, kv_used, rss)


def _layers(info: dict) -> str:
    """'a-b' (inclusive) from a stage's layer_start / layer_stop."""
    a, b = _num(info.get("layer_start")), _num(info.get("layer_stop"))
    return f"{int(a)}-{int(b) - 1}" if a is not None and b is not None else "?"


def _total(counter: Counter, model: Optional[str] = None) -> int:
    return int(sum(s.value for m in counter.collect() for s in m.samples
                   if s.name.endswith("_total") and (model is None or s.labels.get("model") == model)))


def _mean_step(timeline: Any) -> Optional[float]:
    """Mean duration of a stage's recent steps from its ``[(step, start, end), ...]`` timeline."""
    if not isinstance(timeline, list):
        return None
    total, n = 0.0, 0
    for e in timeline:
        if isinstance(e, (list, tuple)) and len(e) == 3:
            a, b = _num(e[1]), _num(e[2])
            if a is not None and b is not None and b >= a:
                total += b - a
                n += 1
    return total / n if n else None


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
