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
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


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
    m.first_token(0.2)
    for _ in range(9):
        m.token_gap(0.01)
    m.tokens(10)
    m.request_done("completions", 200)
    m.client_gone("chat")
    r = m.recent()
    assert r["generation_tokens"] == 10 and r["requests"] == {"200": 1, "499": 1}
    assert r["last_10s"]["tokens_per_s"] > 0 and abs(r["last_10s"]["ttft_s"] - 0.2) < 1e-9
    assert abs(r["last_60s"]["inter_token_s"] - 0.01) < 1e-9
    s = _samples(asyncio.run(m.exposition()).decode())
    assert s[("molink_inter_token_latency_seconds_count", ())] == 9
    assert s[("molink_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 1
    assert s[("molink_time_to_first_token_seconds_bucket", (("le", "0.1"),))] == 0
    assert s[("molink_client_disconnects_total", ())] == 1
    # several gateways in one process do not share counters
    assert Metrics(FakeRouter([])).recent()["generation_tokens"] == 0
