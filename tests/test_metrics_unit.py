"""serving.metrics in-process: a scrape never hangs on a stage, and hostile stage values cannot break it."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client.parser import text_string_to_metric_families

from molink_lite.serving.metrics import STAGE_TIMEOUT, Metrics


class FakePipeline:
    def __init__(self, name: str, stats):
        self.name, self._stats = name, stats
        self.state, self.healthy = "up", True
        self.active, self.waiting = {1: object()}, deque()
        self.load, self.kv_reserved, self.n_ctx = 0.25, 40, 1024
        self.stats = {"steps": 5, "prefill_rows": 3, "decode_rows": 7, "completed": 2, "failed": 0, "failures": 1,
                      "recoveries": 1}
        self.links = [{"to": "ws://b", "rtt_ms": 2.0, "mbit": 800.0}, {"to": "ws://c", "rtt_ms": "x", "mbit": None}]
        self.infos = [{"url": "ws://a", "host": "h\n" * 500, "layer_start": 0, "layer_stop": 4, "backend": "cpu",
                       "n_gpu_layers": "lots", "model_bytes": 1e6}]

    async def stage_stats(self):
        if self._stats == "hang":
            await asyncio.sleep(3600)
        if self._stats == "boom":
            raise ConnectionError("link closed")
        return self._stats

    def summary(self):
        return {"name": self.name, "state": self.state}


class FakeRouter:
    def __init__(self, pipes):
        self.pipelines = pipes
        self.parked = deque()
        self.queued = 0
        self.stats = {"replayed": 0, "parked": 0, "recovered": 1, "expired": 0, "overloaded": 0}

    def describe(self):
        return [p.summary() for p in self.pipelines]


def _samples(text: str):
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model"))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}   # one model: its label left out


def test_scrape_survives_hung_broken_and_hostile_stages():
    hostile = [{"steps": "many", "rows": float("nan"), "busy_s": [1], "live_seqs": True, "kv_positions": 12,
                "timeline": [[1, 0.0, 0.5], "junk", [2, "a", "b"], [3, 1.0, 0.2]], "rss_bytes": 1e9}]
    pipes = [FakePipeline("hang", "hang"), FakePipeline("boom", "boom"), FakePipeline("odd", hostile),
             FakePipeline("bad-shape", "not a list")]
    m = Metrics(FakeRouter(pipes))

    async def scrape():
        t0 = time.monotonic()
        text = (await m.exposition()).decode()
        return text, time.monotonic() - t0

    text, took = asyncio.run(scrape())
    assert took < STAGE_TIMEOUT + 1.5  # the hung stage costs the timeout, not the scrape
    s = _samples(text)
    up = {p: s[("molink_stage_up", (("pipeline", p), ("stage", "0")))] for p in ("hang", "boom", "odd", "bad-shape")}
    assert up == {"hang": 0, "boom": 0, "odd": 1, "bad-shape": 0}
    odd = (("pipeline", "odd"), ("stage", "0"))
    assert s[("molink_kv_cells_used", odd)] == 12
    assert s[("molink_stage_step_seconds", odd)] == 0.5          # only the well-formed timeline entry counts
    assert ("molink_stage_steps_total", odd) not in s             # non-numbers are dropped
    assert ("molink_stage_live_sequences", odd) not in s          # a bool is not a count
    assert ("molink_stage_gpu_layers", odd) not in s
    info = [k for k in s if k[0] == "molink_stage_info" and ("pipeline", "odd") in k[1]]
    assert len(dict(info[0][1])["host"]) == 200                   # label values are bounded
    assert s[("molink_link_rtt_seconds", (("pipeline", "odd"), ("stage", "0"), ("to", "ws://b")))] == 0.002
    assert not [k for k in s if k[0] == "molink_link_rtt_seconds" and ("to", "ws://c") in k[1]]
    assert s[("molink_pipeline_state", (("pipeline", "odd"), ("state", "up")))] == 1
    assert s[("molink_running_sequences", (("pipeline", "odd"),))] == 1
    assert s[("molink_router_events_total", (("event", "recovered"),))] == 1


def test_events_and_recent_rates():
    m = Metrics(FakeRouter([]))
    obs = m.observers[0]
    obs.first_token(0.2)
    for _ in range(9):
        obs.token_gap(0.01)
    obs.tokens(10)
    m.request_done("completions", 200, "model")
    m.client_gone("chat", "model")
    r = m.recent()
    assert r["generation_tokens"] == 10 and r["requests"] == {"200": 1, "499": 1}
    assert r["last_10s"]["tokens_per_s"] > 0 and abs(r["last_10s"]["ttft_s"] - 0.2) < 1e-9
    assert abs(r["last_60s"]["inter_token_s"] - 0.01) < 1e-9
    s = _samples(asyncio.run(m.exposition()).decode())
    assert s[("molink_inter_token_latency_seconds_count", ())] == 9
    assert s[("molink_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 1
    assert s[("molink_time_to_first_token_seconds_bucket", (("le", "0.1"),))] == 0
    assert s[("molink_client_disconnects_total", ())] == 1


def test_every_series_is_labelled_by_model():
    """Two models behind one gateway (issue 29): events, queue and pipeline series carry their model's name, and
    each model's recent rates count only its own tokens."""
    from prometheus_client.parser import text_string_to_metric_families

    a, b = FakePipeline("p0", []), FakePipeline("p0", [])   # the same pipeline name in two models
    m = Metrics(FakeRouter([a]), model="chat")
    m.add_router("code", FakeRouter([b]))
    m.observers[0].tokens(5)
    m.observers[1].tokens(7)
    m.observers[1].first_token(0.1)
    m.request_done("completions", 200, "code")
    m.request_done("completions", 404, "")   # an unknown model's request: no model label value
    text = asyncio.run(m.exposition()).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    assert got[("molink_generation_tokens_total", (("model", "chat"),))] == 5
    assert got[("molink_generation_tokens_total", (("model", "code"),))] == 7
    assert got[("molink_requests_total", (("endpoint", "completions"), ("model", "code"), ("status", "200")))] == 1
    assert got[("molink_requests_total", (("endpoint", "completions"), ("model", ""), ("status", "404")))] == 1
    assert got[("molink_queue_length", (("model", "chat"),))] == 0
    assert {k[1] for k in got if k[0] == "molink_pipeline_up"} == {(("model", "chat"), ("pipeline", "p0")),
                                                                  (("model", "code"), ("pipeline", "p0"))}
    assert m.recent("chat")["generation_tokens"] == 5 and m.recent("code")["generation_tokens"] == 7
    assert m.recent("code")["requests"] == {"200": 1} and m.recent()["generation_tokens"] == 12
    assert m.recent("chat")["last_60s"]["ttft_s"] is None and m.recent("code")["last_60s"]["ttft_s"] == 0.1
    # several gateways in one process do not share counters
    assert Metrics(FakeRouter([])).recent()["generation_tokens"] == 0


# ---------------------------------------------------------------------- the prefix cache (issue 27)
PREFIX_STATS = {"prefix_lookups": 8, "prefix_hits": 6, "prefix_tokens_reused": 300, "prefix_evictions": 2,
                "prefill_rows": 120}


def test_prefix_cache_metrics_per_pipeline():
    """Counters from ``pipeline.stats`` (missing keys: 0), gauges from ``pipeline.prefix_stats()``; a pipeline
    without either (an older object) still scrapes, as a disabled cache."""
    from molink_lite.serving.metrics import prefix_cache_summary

    cached, old = FakePipeline("cached", []), FakePipeline("old", [])
    cached.stats = {**cached.stats, **PREFIX_STATS}
    cached.prefix_cache = True
    cached.prefix_stats = lambda: {"entries": 3, "cells": 96, "budget": 1000}
    s = _samples(asyncio.run(Metrics(FakeRouter([cached, old])).exposition()).decode())

    def v(name, pipe, **labels):
        return s[(name, tuple(sorted({"pipeline": pipe, **labels}.items())))]

    assert v("molink_prefix_cache_lookups_total", "cached") == 8
    assert v("molink_prefix_cache_hits_total", "cached") == 6
    assert v("molink_prefix_cache_tokens_reused_total", "cached") == 300
    assert v("molink_prefix_cache_evictions_total", "cached") == 2
    assert v("molink_prefix_cache_entries", "cached") == 3
    assert v("molink_prefix_cache_cells", "cached") == 96
    assert v("molink_prefix_cache_budget_cells", "cached") == 1000
    assert v("molink_prefix_cache_enabled", "cached") == 1
    assert v("molink_pipeline_rows_total", "cached", kind="prefill") == 120   # stage-0 prefill tokens
    for name in ("molink_prefix_cache_lookups_total", "molink_prefix_cache_hits_total", "molink_prefix_cache_entries",
                 "molink_prefix_cache_cells", "molink_prefix_cache_budget_cells", "molink_prefix_cache_enabled"):
        assert v(name, "old") == 0, name
    assert prefix_cache_summary(old)["hit_rate"] is None and not prefix_cache_summary(old)["enabled"]
    # prefix_stats() may say itself whether the cache is on; one that fails costs the scrape nothing
    cached.prefix_stats = lambda: {"enabled": False, "entries": 0, "cells": 0, "budget": 0}
    assert prefix_cache_summary(cached)["enabled"] is False

    def broken():
        raise RuntimeError("boom")

    # counters that only prefix_stats() gives count too (p.stats has the last word when it has them)
    old.prefix_stats = lambda: {"enabled": True, "entries": 1, "cells": 9, "budget": 50, "prefix_lookups": 4,
                                "prefix_hits": 1, "prefix_tokens_reused": 20, "prefix_evictions": 0}
    assert prefix_cache_summary(old) == {"enabled": True, "entries": 1, "cells": 9, "budget": 50, "lookups": 4,
                                         "hits": 1, "hit_rate": 0.25, "tokens_reused": 20, "evictions": 0}
    cached.prefix_stats = broken
    s = _samples(asyncio.run(Metrics(FakeRouter([cached])).exposition()).decode())
    assert s[("molink_prefix_cache_hits_total", (("pipeline", "cached"),))] == 6
    assert s[("molink_prefix_cache_cells", (("pipeline", "cached"),))] == 0


def test_prefix_cache_in_v1_stats_and_metrics_of_a_gateway():
    """A real (unconnected) Pipeline behind a real Gateway: its ``/v1/stats`` entry carries ``prefix_cache`` and
    ``/metrics`` the same numbers; before a prefix cache exists on the pipeline, it reads as off and zero."""
    from aiohttp.test_utils import TestClient, TestServer

    from molink_lite.serving.gateway import Gateway
    from molink_lite.serving.pipeline import Pipeline
    from molink_lite.serving.router import Router

    p, q = Pipeline(["ws://127.0.0.1:9"], name="p0"), Pipeline(["ws://127.0.0.1:9"], name="p1")
    # as they are: one with the cache on (the default), one with it off
    on, off = Pipeline(["ws://127.0.0.1:9"], name="p2"), Pipeline(["ws://127.0.0.1:9"], name="p3", prefix_cache=False)
    p.stats.update(PREFIX_STATS)
    p.prefix_stats = lambda: {"enabled": True, "entries": 2, "cells": 64, "budget": 2048}
    for k in ("prefix_lookups", "prefix_hits", "prefix_tokens_reused", "prefix_evictions"):
        q.stats.pop(k, None)
    if hasattr(q, "prefix_stats"):
        q.prefix_stats = lambda: {"enabled": False, "entries": 0, "cells": 0, "budget": 0}

    async def fetch():
        async with TestClient(TestServer(Gateway(Router([p, q, on, off]), model_name="m").app())) as client:
            r = await client.get("/v1/stats")
            assert r.status == 200
            stats = await r.json()
            r = await client.get("/metrics")
            assert r.status == 200
            return stats, await r.text()

    stats, text = asyncio.run(fetch())
    by_name = {e["name"]: e for e in stats["pipelines"]}
    assert by_name["p0"]["prefix_cache"] == {"enabled": True, "entries": 2, "cells": 64, "budget": 2048, "lookups": 8,
                                             "hits": 6, "hit_rate": 0.75, "tokens_reused": 300, "evictions": 2}
    assert by_name["p1"]["prefix_cache"] == {"enabled": False, "entries": 0, "cells": 0, "budget": 0, "lookups": 0,
                                             "hits": 0, "hit_rate": None, "tokens_reused": 0, "evictions": 0}
    for name, enabled in (("p2", True), ("p3", False)):
        pc = by_name[name]["prefix_cache"]
        assert set(pc) == set(by_name["p0"]["prefix_cache"])
        assert (pc["enabled"], pc["lookups"], pc["hits"], pc["hit_rate"], pc["entries"], pc["cells"]) == \
            (enabled, 0, 0, None, 0, 0), (name, pc)
    s = _samples(text)
    assert s[("molink_prefix_cache_enabled", (("pipeline", "p2"),))] == 1
    assert s[("molink_prefix_cache_hits_total", (("pipeline", "p0"),))] == 6
    assert s[("molink_prefix_cache_tokens_reused_total", (("pipeline", "p0"),))] == 300
    assert s[("molink_prefix_cache_cells", (("pipeline", "p0"),))] == 64
    assert s[("molink_prefix_cache_enabled", (("pipeline", "p1"),))] == 0
    assert s[("molink_pipeline_rows_total", (("kind", "prefill"), ("pipeline", "p0")))] == 120


def test_status_shows_the_prefix_cache():
    from molink_lite.tools.status import render

    on = {"enabled": True, "entries": 2, "cells": 64, "budget": 2048, "lookups": 8, "hits": 6, "hit_rate": 0.75,
          "tokens_reused": 300, "evictions": 2}
    text = render({"pipelines": [{"name": "p0", "prefix_cache": on}, {"name": "p1", "prefix_cache": {"enabled": False}},
                                 {"name": "p2"}]})
    assert "prefix cache: hits 75% (6/8), 300 tokens reused, 2 entries in 64/2048 cells, 2 evicted" in text
    assert text.count("prefix cache: off") == 1   # p2 (an older gateway) shows no line at all
    assert "hits - (0/0)" in render({"pipelines": [{"name": "p0", "prefix_cache": {**on, "hits": 0, "lookups": 0,
                                                                                    "hit_rate": None}}]})
