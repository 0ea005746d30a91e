"""A stage's own Prometheus endpoint (``stage --metrics-port``): its counters without going through a gateway.

Optional: the gateway's ``/metrics`` already carries every stage's values. This one serves
``GET /metrics`` from a thread (prometheus_client's HTTP server) on its own port, unauthenticated,
so it listens on loopback unless told otherwise (``--metrics-host``). Values are read from the
:class:`~molink_lite.stage.server.StageServer` at scrape time (copies taken under the GIL).
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Iterator, List

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .hostinfo import process_rss

log = logging.getLogger(__name__)


class StageCollector:
    """Counters and gauges of one stage server."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.host = socket.gethostname()

    def describe(self) -> List[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        srv = self.server
        stats = dict(srv.stats)
        times = srv.engine.times
        info = srv.info
        fam = GaugeMetricFamily("molink_stage_info", "This stage: host, layers, backend (value 1)",
                                labels=["host", "layers", "backend"])
        fam.add_metric([self.host, f"{info.layer_start}-{info.layer_stop - 1}", srv.backend()], 1.0)
        yield fam
        for name, doc, value in (
                ("molink_stage_steps", "Steps the stage ran", stats.get("steps", 0)),
                ("molink_stage_rows", "Rows the stage ran", stats.get("rows", 0)),
                ("molink_stage_busy_seconds", "Time the stage spent on steps", stats.get("busy_s", 0.0)),
                ("molink_stage_engine_seconds", "Time in llama.cpp's decode", times.decode),
                ("molink_stage_errors", "Steps that failed on the stage", stats.get("errors", 0))):
            yield CounterMetricFamily(name, doc, value=float(value))
        timeline = list(srv.timeline)
        steps = [b - a for _, a, b in timeline if b >= a]
        if steps:
            yield GaugeMetricFamily("molink_stage_step_seconds", "Mean time of the stage's recent steps (last 512)",
                                    value=sum(steps) / len(steps))
        if stats.get("steps"):
            yield GaugeMetricFamily("molink_stage_rows_per_step", "Rows per step, mean since the stage started",
                                    value=stats.get("rows", 0) / stats["steps"])
        live, positions = srv.kv_usage()
        yield GaugeMetricFamily("molink_stage_live_sequences", "Sequences holding KV on the stage", value=live)
        yield GaugeMetricFamily("molink_kv_cells_used", "KV cells (positions) in use on the stage", value=positions)
        yield GaugeMetricFamily("molink_kv_cells_capacity", "KV cells of the stage", value=float(srv.engine.n_ctx))
        yield GaugeMetricFamily("molink_stage_gpu_layers", "Layers the stage offloads to a GPU",
                                value=float(srv.engine.n_gpu_layers))
        yield GaugeMetricFamily("molink_stage_memory_bytes", "Resident memory of the stage process",
                                value=float(process_rss()))


def serve_metrics(server: Any, host: str, port: int) -> Callable[[], None]:
    """Serve the stage's ``/metrics`` on ``host:port`` from a thread; returns a function that stops it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StageCollector(server))
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    log.info("stage metrics on http://%s:%d/metrics", host, httpd.server_address[1])

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)

    return stop
